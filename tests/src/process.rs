//! Child processes for tests: stopped with SIGTERM on drop, readiness without sleeps-as-sync.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// A running child process, sent SIGTERM (then SIGKILL after 10 s) when dropped.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd`; `name` is used in messages.
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        ChildGuard { name: name.to_owned(), child: Some(child) }
    }

    /// Takes the child's piped stdout.
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.child.as_mut().expect("running").stdout.take().expect("stdout was piped")
    }

    /// Waits for the child to exit by itself and collects what is left of its piped output.
    pub fn wait_with_output(&mut self) -> std::process::Output {
        self.child.take().expect("running").wait_with_output().expect("wait")
    }

    /// Takes the child's piped stderr.
    pub fn take_stderr(&mut self) -> std::process::ChildStderr {
        self.child.as_mut().expect("running").stderr.take().expect("stderr was piped")
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The most memory the process has held so far (its `VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.id())).expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        kib / 1024
    }

    /// Whether the child is still running.
    pub fn try_alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Panics if the child has exited, with its status.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.as_mut().expect("running").try_wait().expect("try_wait") {
            panic!("{} exited early with {status}", self.name);
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        self.signal(Signal::TERM);
    }

    /// Sends SIGINT (what Ctrl-C sends) without waiting.
    pub fn interrupt(&self) {
        self.signal(Signal::INT);
    }

    /// Stops the process where it stands (SIGSTOP): its sockets stay open and answer nothing.
    pub fn pause(&self) {
        self.signal(Signal::STOP);
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(Signal::CONT);
    }

    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.as_ref().and_then(|c| Pid::from_raw(c.id() as i32)) {
            let _ = kill_process(pid, signal);
        }
    }

    /// Sends SIGTERM and waits for the exit (SIGKILL after 10 s). Returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(pid) = Pid::from_raw(child.id() as i32) {
            let _ = kill_process(pid, Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }

    /// Sends SIGKILL and reaps the child, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback TCP port that was free a moment ago, for servers that cannot take a bound
/// socket (Garage). Our own servers take a listener bound to port 0 instead.
///
/// The port is drawn at random from below the kernel's ephemeral range, so neither another
/// test's `bind(0)` nor an outgoing connection's source port can take it between this call and
/// the server binding it, and it is never handed out twice in one process. Test processes run
/// in parallel, so two of them can still draw the same port: servers started on such a port
/// must check they answer as themselves (see `Garage::start`).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|low| low.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    let mut handed_out = HANDED_OUT.lock().expect("port set");
    for _ in 0..1000 {
        let mut b = [0u8; 2];
        getrandom::fill(&mut b).expect("randomness");
        let port = low + u16::from_le_bytes(b) % (high - low);
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}")
}

/// Polls until `addr` accepts TCP connections, checking that `child` is still alive between
/// attempts. Panics after `timeout`.
pub fn wait_for_port(child: &mut ChildGuard, addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        child.assert_alive();
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "{} did not open {addr} within {timeout:?}", child.name);
        std::thread::sleep(Duration::from_millis(25));
    }
}
