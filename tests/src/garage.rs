//! A real S3 server for tests: Garage, run as a separate process (it is AGPL; never linked).
//!
//! [`Garage::start`] gives a fresh single-node server with one bucket and one key on free
//! loopback ports. [`Garage::stop`] and [`Garage::restart`] simulate "S3 down" and recovery
//! with the same data. The binary is found in `$FLEETCACHE_GARAGE` (set by scripts/test), else
//! under `/var/cache/fleetcache-test/garage-<version>/bin/garage`, else on `PATH`.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use tempfile::TempDir;

use crate::process::{ChildGuard, free_port, wait_for_port};

/// The Garage version scripts/test installs.
pub const GARAGE_VERSION: &str = "2.5.0";

/// The region Garage answers to; S3 clients must sign requests for it.
pub const REGION: &str = "garage";

/// A running single-node Garage with one bucket.
pub struct Garage {
    dir: TempDir,
    child: Option<ChildGuard>,
    s3_addr: SocketAddr,
    /// The bucket created at start.
    pub bucket: String,
    /// Access key id with read/write on the bucket.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: String,
}

/// Where the Garage binary is (see the module documentation).
pub fn garage_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEETCACHE_GARAGE") {
        return PathBuf::from(p);
    }
    let cached = PathBuf::from(format!("/var/cache/fleetcache-test/garage-{GARAGE_VERSION}/bin/garage"));
    if cached.is_file() {
        return cached;
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join("garage")).find(|p| p.is_file()));
    on_path.unwrap_or_else(|| {
        panic!("no garage binary: run scripts/test (it installs Garage {GARAGE_VERSION}) or set FLEETCACHE_GARAGE")
    })
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).expect("randomness");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Garage {
    /// Starts a fresh Garage and waits until its S3 API answers as this server (our key can
    /// see our bucket). Ports are drawn at random; when another test's server holds one of them
    /// (Garage keeps running when it cannot bind its S3 port), it starts over on new ports.
    pub fn start() -> Self {
        let mut g = Self::unstarted();
        let mut failures = Vec::new();
        for _ in 0..5 {
            match g.start_on(free_port(), free_port()) {
                Ok(()) => return g,
                Err(e) => failures.push(e),
            }
        }
        panic!("Garage did not start: {failures:#?}\nlog:\n{}", g.log())
    }

    /// Starts a fresh Garage on the given ports, or says why its S3 API does not answer as it.
    pub fn try_start_on(s3_port: u16, rpc_port: u16) -> Result<Self, String> {
        let mut g = Self::unstarted();
        g.start_on(s3_port, rpc_port).map(|()| g)
    }

    /// A directory, a bucket name and a key; no process yet.
    fn unstarted() -> Self {
        let dir = tempfile::Builder::new().prefix("fleetcache-garage-").tempdir().expect("tempdir");
        Garage {
            dir,
            child: None,
            s3_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            bucket: "fleetcache-test".to_owned(),
            access_key_id: format!("GK{}", random_hex(12)),
            secret_access_key: random_hex(32),
        }
    }

    fn start_on(&mut self, s3_port: u16, rpc_port: u16) -> Result<(), String> {
        self.configure(s3_port, rpc_port);
        self.spawn().inspect_err(|_| self.stop())
    }

    /// Writes a configuration for these ports with empty data and metadata directories.
    fn configure(&mut self, s3_port: u16, rpc_port: u16) {
        let (meta, data) = (self.dir.path().join("meta"), self.dir.path().join("data"));
        for d in [&meta, &data] {
            if d.exists() {
                fs::remove_dir_all(d).expect("clear garage directory");
            }
        }
        let config = format!(
            r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
            meta = meta.display(),
            data = data.display(),
            secret = random_hex(32),
        );
        fs::write(self.dir.path().join("garage.toml"), config).expect("write garage.toml");
        self.s3_addr = SocketAddr::from(([127, 0, 0, 1], s3_port));
    }

    /// The S3 endpoint URL, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.s3_addr)
    }

    /// The store URL cache-server takes for this bucket.
    pub fn store_url(&self) -> String {
        format!("s3://{}?endpoint={}&region={REGION}", self.bucket, self.endpoint())
    }

    /// Environment variables that give an AWS SDK client this server's credentials.
    pub fn credential_env(&self) -> [(&'static str, String); 3] {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
            ("AWS_REGION", REGION.to_owned()),
        ]
    }

    /// An S3 client for this server: path-style, region `garage`, and checksums only when
    /// required (Garage refuses aws-chunked bodies with checksum trailers).
    pub fn client(&self) -> aws_sdk_s3::Client {
        use aws_sdk_s3::config::{
            BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
        };
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(self.endpoint())
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new(
                &self.access_key_id,
                &self.secret_access_key,
                None,
                None,
                "test",
            ))
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// Sets the bucket's size quota in bytes (`None` lifts it), as `garage bucket set-quotas`
    /// does: past it Garage refuses writes.
    pub fn set_max_size(&self, bytes: Option<u64>) {
        let size = bytes.map_or_else(|| "none".to_owned(), |b| b.to_string());
        let out = Command::new(garage_binary())
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(["bucket", "set-quotas", &self.bucket, "--max-size", &size])
            .output()
            .expect("run garage bucket set-quotas");
        assert!(out.status.success(), "garage bucket set-quotas: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Freezes the server (SIGSTOP): connections are still accepted by the kernel, and nothing
    /// answers them — S3 that stalls rather than refuses. [`Garage::unstall`] lets it go on.
    pub fn stall(&self) {
        self.child.as_ref().expect("running").pause();
    }

    /// Lets a stalled server go on.
    pub fn unstall(&self) {
        self.child.as_ref().expect("running").resume();
    }

    /// Stops the server with SIGTERM ("S3 is down"); data stays for [`Garage::restart`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.stop();
        }
    }

    /// Starts the server again on the same ports with the same data, and waits for it.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("Garage did not restart: {e}\nlog:\n{}", self.log());
        }
    }

    /// Runs the server and waits until its S3 API answers our signed requests.
    fn spawn(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("garage.log"))
            .expect("garage log");
        let mut cmd = Command::new(garage_binary());
        cmd.arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.access_key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret_access_key)
            .env("GARAGE_DEFAULT_BUCKET", &self.bucket)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        let mut child = ChildGuard::spawn("garage", &mut cmd);
        wait_for_port(&mut child, self.s3_addr, Duration::from_secs(60));
        self.child = Some(child);
        self.answers_as_itself()
    }

    /// Whether the S3 port is this server: a signed HeadBucket of our bucket succeeds. Another
    /// process on the port (a port drawn twice by parallel tests) fails it. Runs on its own
    /// thread and runtime, so it can be called from async tests too.
    fn answers_as_itself(&self) -> Result<(), String> {
        let no_retries = self.client().config().to_builder().retry_config(RetryConfig::disabled()).build();
        let client = aws_sdk_s3::Client::from_conf(no_retries);
        let (bucket, addr) = (self.bucket.clone(), self.s3_addr);
        let attempt = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let mut last = String::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while std::time::Instant::now() < deadline {
                    match client.head_bucket().bucket(&bucket).send().await {
                        Ok(_) => return Ok(()),
                        Err(e) => last = aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(format!("{addr} does not answer as this Garage: {last}"))
            })
        });
        attempt.join().expect("garage check thread")
    }

    /// Garage's own log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }
}
