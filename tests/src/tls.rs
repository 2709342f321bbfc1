//! HTTPS for the tests: a private certificate authority made with `openssl`, and nginx (Debian's)
//! as the TLS proxy in front of one of our servers, as a fleet runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::nix::run;
use crate::process::{ChildGuard, free_port, wait_for_port};

/// A certificate authority and a certificate it signed for `127.0.0.1` and `localhost`.
pub struct TestCa {
    dir: TempDir,
}

impl TestCa {
    /// A new CA named `name` (so two CAs of one test differ) and its server certificate.
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("fleetcache-ca-").tempdir().expect("tempdir");
        let d = dir.path();
        let openssl = |args: &[&str]| {
            run(Command::new("openssl").args(args).current_dir(d).stdin(Stdio::null()));
        };
        openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"]);
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-sha256",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "ca.pem",
        ]);
        openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "server.key"]);
        openssl(&["req", "-new", "-key", "server.key", "-subj", "/CN=127.0.0.1", "-out", "server.csr"]);
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n\
             basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n",
        )
        .expect("extensions");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-sha256",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
        TestCa { dir }
    }

    /// The CA's certificate: what a client trusts (`SSL_CERT_FILE`, `NIX_SSL_CERT_FILE`).
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn server(&self) -> (PathBuf, PathBuf) {
        (self.dir.path().join("server.pem"), self.dir.path().join("server.key"))
    }
}

/// nginx terminating TLS with a [`TestCa`] certificate and proxying to `upstream`, streaming
/// bodies both ways (as deploy/'s cache host configures it).
pub struct TlsProxy {
    child: ChildGuard,
    dir: TempDir,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
}

impl TlsProxy {
    /// Starts nginx in front of `upstream` (`http://127.0.0.1:<port>`).
    pub fn start(ca: &TestCa, upstream: &str) -> Self {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("nginx is not installed (scripts/test installs Debian's nginx)");
        let dir = tempfile::Builder::new().prefix("fleetcache-nginx-").tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        let (cert, key) = ca.server();
        for _ in 0..5 {
            let port = free_port();
            let conf = format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                   fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                   server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
                     location / {{\n      proxy_pass {upstream};\n      proxy_http_version 1.1;\n\
                       proxy_set_header Host $host;\n      proxy_set_header Connection \"\";\n\
                       client_max_body_size 0;\n      proxy_request_buffering off;\n      proxy_buffering off;\n\
                       proxy_read_timeout 300s;\n    }}\n  }}\n}}\n",
                cert = cert.display(),
                key = key.display(),
            );
            std::fs::write(dir.path().join("nginx.conf"), conf).expect("nginx.conf");
            let mut child = ChildGuard::spawn(
                "nginx",
                Command::new(nginx)
                    .arg("-c")
                    .arg(dir.path().join("nginx.conf"))
                    .arg("-e")
                    .arg(dir.path().join("error.log"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            );
            // A port another test took in the meantime makes nginx exit: draw another.
            std::thread::sleep(Duration::from_millis(100));
            if child.try_alive() {
                wait_for_port(&mut child, ([127, 0, 0, 1], port).into(), Duration::from_secs(10));
                return TlsProxy { child, dir, url: format!("https://127.0.0.1:{port}") };
            }
        }
        panic!(
            "nginx did not start:\n{}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
    }

    /// nginx's error log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Stops nginx.
    pub fn stop(&mut self) {
        self.child.stop();
    }
}

/// tinyproxy (Debian's), an HTTP proxy that tunnels HTTPS with CONNECT, as a fleet behind a
/// corporate proxy has one.
pub struct HttpProxy {
    child: ChildGuard,
    dir: TempDir,
    /// `http://127.0.0.1:<port>`, for `HTTPS_PROXY`.
    pub url: String,
}

impl HttpProxy {
    /// Starts tinyproxy on a free loopback port.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("fleetcache-proxy-").tempdir().expect("tempdir");
        for _ in 0..5 {
            let port = free_port();
            let conf = format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 32\nAllow 127.0.0.1\nLogLevel Info\nLogFile \"{}\"\n",
                dir.path().join("proxy.log").display()
            );
            std::fs::write(dir.path().join("tinyproxy.conf"), conf).expect("tinyproxy.conf");
            let mut child = ChildGuard::spawn(
                "tinyproxy",
                Command::new("tinyproxy")
                    .arg("-d")
                    .arg("-c")
                    .arg(dir.path().join("tinyproxy.conf"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            );
            std::thread::sleep(Duration::from_millis(100));
            if child.try_alive() {
                wait_for_port(&mut child, ([127, 0, 0, 1], port).into(), Duration::from_secs(10));
                return HttpProxy { child, dir, url: format!("http://127.0.0.1:{port}") };
            }
        }
        panic!("tinyproxy did not start (scripts/test installs Debian's tinyproxy)");
    }

    /// What it logged: each tunnel shows as a `CONNECT` to its host and port.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// Stops it.
    pub fn stop(&mut self) {
        self.child.stop();
    }
}
