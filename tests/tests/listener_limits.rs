//! Anyone can open sockets: the real cache-server and `orchestrator serve` keep answering while
//! idle, slow and silent connections are held against them, under the open-files limit systemd
//! gives a service by default, and stop on SIGTERM with such clients connected.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use fleetcache_tests::cache_server::{CacheServer, Options};
use fleetcache_tests::orchestrator::Setup;
use fleetcache_tests::serve::{DEFAULT_AND_CUDA, configure, start_orchestrator};

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// A plain GET on a new connection: the status line, and how long the whole answer took.
fn get(addr: SocketAddr, path: &str) -> (String, Duration) {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(30)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    (answer.lines().next().unwrap_or_default().to_owned(), start.elapsed())
}

/// `n` connections that never send a byte.
fn idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
}

/// Whether the server closed `s` (a read sees the end, or the connection was reset).
fn closed_by_server(mut s: &TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn a_normal_get_is_answered_at_once_while_2000_idle_and_200_slow_connections_are_held() {
    cache_server::listener::raise_open_files_limit();
    let (_dir, server) = CacheServer::start_local();
    let addr = addr_of(&server.url);
    let _idle = idle(addr, 2000);
    // Slow ones: a request line, then a header byte now and then.
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    let mut times = Vec::new();
    for round in 0..10 {
        for s in &mut slow {
            let _ = s.write_all(b"a");
        }
        let (status, took) = get(addr, "/nix-cache-info");
        assert_eq!(status, "HTTP/1.1 200 OK", "round {round}\n{}", server.log());
        times.push(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    times.sort();
    let median = times[times.len() / 2];
    eprintln!("GET with 2200 hostile connections held: median {median:?}, worst {:?}", times.last().unwrap());
    assert!(median < Duration::from_millis(100), "{times:?}");
}

#[test]
fn connections_that_send_nothing_are_closed_and_the_open_files_limit_is_survived() {
    // The systemd default (1024) made smaller, and a header timeout of 2 s.
    let (_dir, server) = CacheServer::start_local_with(Options {
        open_files: Some(256),
        config: Some("header-timeout-seconds = 2\n".to_owned()),
        ..Options::default()
    });
    let addr = addr_of(&server.url);
    // More silent connections than the server has descriptors for.
    let silent = idle(addr, 400);
    std::thread::sleep(Duration::from_millis(300));
    // Within the header timeout they are closed, and a normal client is answered again.
    let started = Instant::now();
    let (status, _) = get(addr, "/healthz");
    assert_eq!(status, "HTTP/1.1 200 OK", "{}", server.log());
    assert!(started.elapsed() < Duration::from_secs(8), "answered after {:?}", started.elapsed());
    std::thread::sleep(Duration::from_secs(3));
    let closed = silent.iter().filter(|s| closed_by_server(s)).count();
    assert_eq!(closed, silent.len(), "silent connections left open");
    // An idle keep-alive connection after its request is closed the same way.
    let mut kept = TcpStream::connect(addr).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 256];
    assert!(kept.read(&mut buf).unwrap() > 0);
    std::thread::sleep(Duration::from_secs(3));
    assert!(closed_by_server(&kept), "an idle keep-alive connection stayed open");
}

#[test]
fn sigterm_stops_the_servers_with_idle_clients_connected() {
    let (_dir, mut server) = CacheServer::start_local();
    let addr = addr_of(&server.url);
    let _idle = idle(addr, 50);
    // Keep-alive connections that made a request and wait for the next.
    let mut kept: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for s in &mut kept {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 256];
        assert!(s.read(&mut buf).unwrap() > 0);
    }
    let started = Instant::now();
    assert!(server.stop(), "cache-server did not exit cleanly\n{}", server.log());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());

    // orchestrator serve the same, and it answers /healthz with 300 idle sockets held first.
    let s = Setup::new();
    let (_cache_dir, cache) = CacheServer::start_local();
    let (config, api_token) = configure(&s, &cache, "", DEFAULT_AND_CUDA);
    let mut o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    let addr = addr_of(&o.url);
    let _idle = idle(addr, 300);
    let (status, took) = get(addr, "/healthz");
    assert_eq!(status, "HTTP/1.1 200 OK", "{}", o.log());
    assert!(took < Duration::from_secs(1), "{took:?}");
    let started = Instant::now();
    let exit = o.child.stop().unwrap();
    assert!(exit.success(), "{exit}\n{}", o.log());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}
