//! A throw-away PostgreSQL server (Debian's `postgresql` package): a fresh cluster in a temporary
//! directory on a free loopback port, trusting local connections, stopped when dropped.
//! PostgreSQL refuses to run as root, so as root it runs as the `postgres` user.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{ChildGuard, free_port, wait_for_port};

/// A running PostgreSQL.
pub struct Postgres {
    _child: ChildGuard,
    dir: TempDir,
    port: u16,
}

/// The directory of `initdb` and `postgres`: `$FLEETCACHE_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLEETCACHE_PG_BIN") {
        return PathBuf::from(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).unwrap_or_else(|| {
        panic!("no PostgreSQL: run scripts/test (it installs Debian's postgresql) or set FLEETCACHE_PG_BIN")
    })
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `program` run as the `postgres` user when we are root.
fn as_postgres(program: PathBuf) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "postgres", "--regid", "postgres", "--init-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// Initialises and starts a cluster; waits until it accepts connections.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("fleetcache-pg-").tempdir().expect("tempdir");
        let data = dir.path().join("data");
        if is_root() {
            let ok = Command::new("chown").args(["postgres:postgres"]).arg(dir.path()).status();
            assert!(ok.is_ok_and(|s| s.success()), "chown of the PostgreSQL directory failed");
        }
        let bin = bin_dir();
        let out = as_postgres(bin.join("initdb"))
            .args(["--auth=trust", "--username=postgres", "--no-sync", "--encoding=UTF8", "-D"])
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let log = std::fs::File::create(dir.path().join(format!("postgres-{port}.log"))).expect("log");
            let mut cmd = as_postgres(bin.join("postgres"));
            cmd.arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
                .args(["-c", "max_connections=200", "-k"])
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            let mut child = ChildGuard::spawn("postgres", &mut cmd);
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let up = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                wait_for_port(&mut child, addr, Duration::from_secs(30))
            }));
            if up.is_ok() {
                return Postgres { _child: child, dir, port };
            }
            last =
                std::fs::read_to_string(dir.path().join(format!("postgres-{port}.log"))).unwrap_or_default();
        }
        panic!("PostgreSQL did not start:\n{last}")
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}
