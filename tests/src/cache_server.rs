//! The real `cache-server` binary, started on a free port with a fresh key and upload token.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cache_server::native::UploadMeta;
use nix_formats::nar::dump_path;
use nix_formats::{SecretKey, StorePath};
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;

use crate::bin;
use crate::nix;
use crate::process::ChildGuard;

/// A running cache-server.
pub struct CacheServer {
    child: ChildGuard,
    dir: TempDir,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// The public key of its signing key, in Nix's format.
    pub public_key: String,
    /// An upload token it accepts.
    pub token: String,
}

/// How to start one.
#[derive(Default)]
pub struct Options {
    /// No signing key and no upload tokens: read-only.
    pub read_only: bool,
    /// Require this read token for GET/HEAD.
    pub read_token: Option<String>,
    /// Extra environment (S3 credentials).
    pub env: Vec<(&'static str, String)>,
    /// A configuration file's text, passed with --config (the flags above still win).
    pub config: Option<String>,
    /// Run it with this limit on open files (soft and hard, as `ulimit -n` sets them).
    pub open_files: Option<u64>,
    /// The name of its signing key (default `fleetcache-test-1`); Nix keeps one trusted key per
    /// name, so two caches a store trusts at once need two names.
    pub key_name: Option<&'static str>,
}

impl CacheServer {
    /// Starts a writable server on `store` (`file:///…` or `s3://…`).
    pub fn start(store: &str) -> Self {
        Self::start_with(store, Options::default())
    }

    /// Starts a writable server on a fresh temporary directory; returns the directory too (drop
    /// it after the server).
    pub fn start_local() -> (TempDir, Self) {
        Self::start_local_with(Options::default())
    }

    /// [`CacheServer::start_local`] with options.
    pub fn start_local_with(opts: Options) -> (TempDir, Self) {
        let dir = tempfile::Builder::new().prefix("fleetcache-cache-").tempdir().expect("tempdir");
        let server = Self::start_with(&format!("file://{}", dir.path().display()), opts);
        (dir, server)
    }

    /// Starts a server with options.
    pub fn start_with(store: &str, opts: Options) -> Self {
        let dir = tempfile::Builder::new().prefix("fleetcache-cache-server-").tempdir().expect("tempdir");
        let key = SecretKey::generate(opts.key_name.unwrap_or("fleetcache-test-1")).expect("key");
        let token = format!("tok-{}", std::process::id());
        std::fs::write(dir.path().join("signing.key"), key.to_nix_string()).expect("write key");
        std::fs::write(dir.path().join("upload-tokens"), format!("tester:{token}\n")).expect("write tokens");
        let mut cmd = match opts.open_files {
            None => Command::new(bin("cache-server")),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", "ulimit -n \"$0\" && exec \"$@\"", &n.to_string()]).arg(bin("cache-server"));
                sh
            }
        };
        cmd.args(["--listen", "127.0.0.1:0", "--store", store]);
        if !opts.read_only {
            cmd.arg("--signing-key-file").arg(dir.path().join("signing.key"));
            cmd.arg("--upload-tokens-file").arg(dir.path().join("upload-tokens"));
        }
        if let Some(t) = &opts.read_token {
            std::fs::write(dir.path().join("read-tokens"), format!("reader:{t}\n")).expect("write tokens");
            cmd.arg("--read-tokens-file").arg(dir.path().join("read-tokens"));
        }
        if let Some(text) = &opts.config {
            std::fs::write(dir.path().join("config.toml"), text).expect("write config");
            cmd.arg("--config").arg(dir.path().join("config.toml"));
        }
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
        cmd.envs(opts.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "cache_server=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = ChildGuard::spawn("cache-server", &mut cmd);
        let stdout = child.take_stdout();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read cache-server stdout");
        let url = line.trim().strip_prefix("listening on ").map(str::to_owned).unwrap_or_else(|| {
            child.assert_alive();
            panic!(
                "cache-server did not print its address; log:\n{}",
                std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
            )
        });
        CacheServer { child, dir, url, public_key: key.public_key().to_string(), token }
    }

    /// A netrc file with the upload token, for `nix copy --netrc-file`.
    pub fn netrc(&self) -> PathBuf {
        let p = self.dir.path().join("netrc");
        std::fs::write(&p, format!("machine 127.0.0.1 login tester password {}\n", self.token))
            .expect("netrc");
        p
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Stops it with SIGTERM; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        self.child.stop().is_some_and(|s| s.success())
    }

    /// Sends SIGTERM without waiting for the exit.
    pub fn terminate(&self) {
        self.child.terminate();
    }

    /// The most memory the process has held so far (its `VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> u64 {
        self.child.peak_rss_mib()
    }

    /// The directory holding its key and token files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// `orchestrator push` of `paths` to `server` with `token` (written to a file in the server's
/// directory) and `args`.
pub fn push_command(server: &CacheServer, token: &str, args: &[&str], paths: &[&StorePath]) -> Command {
    let token_file = server.dir().join(format!("push-token-{}", token.len()));
    std::fs::write(&token_file, format!("{token}\n")).expect("write token");
    let mut c = Command::new(bin("orchestrator"));
    c.env("NIX_CONFIG", nix::NIX_CONFIG)
        .args(["push", "--cache", &server.url, "--token-file"])
        .arg(token_file)
        .args(args)
        .args(paths.iter().map(|p| p.to_absolute()));
    c
}

/// Pushes `paths` with the server's upload token and returns the `--json` summary; panics with
/// the push's and the server's logs if it fails.
pub fn push_json(server: &CacheServer, paths: &[&StorePath]) -> Value {
    let out =
        push_command(server, &server.token, &["--json"], paths).output().expect("run orchestrator push");
    assert!(
        out.status.success(),
        "push failed:\n{}\nserver:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON document")
}

/// The closure of `top` with `nix path-info` metadata, dependencies before dependents.
pub fn closure_in_upload_order(top: &StorePath) -> Vec<Value> {
    let mut todo = nix::path_info(&[top], true);
    let mut done: Vec<Value> = Vec::new();
    while !todo.is_empty() {
        let ready = todo
            .iter()
            .position(|i| {
                i["references"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|r| r == &i["path"] || done.iter().any(|d| &d["path"] == r))
            })
            .expect("closure is acyclic");
        done.push(todo.remove(ready));
    }
    done
}

/// The body of a native upload (`POST /api/v1/upload`) of the path `info` describes (a
/// [`closure_in_upload_order`] element), its NAR compressed at `level`.
pub fn body_at_level(info: &Value, level: i32) -> Vec<u8> {
    let meta = UploadMeta {
        store_path: info["path"].as_str().unwrap().to_owned(),
        references: info["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect(),
        deriver: info["deriver"].as_str().map(str::to_owned),
        ca: info["ca"].as_str().map(str::to_owned),
        nar_hash: info["narHash"].as_str().unwrap().to_owned(),
        nar_size: info["narSize"].as_u64().unwrap(),
    };
    let nar = dump_path(Path::new(&meta.store_path), Vec::new()).unwrap();
    let mut body = serde_json::to_vec(&meta).unwrap();
    body.push(b'\n');
    body.extend(zstd::encode_all(&nar[..], level).unwrap());
    body
}

/// [`body_at_level`] at zstd level 1, as `orchestrator push` compresses.
pub fn body_for(info: &Value) -> Vec<u8> {
    body_at_level(info, 1)
}

/// Sends a native upload with the server's upload token; 599 if the connection failed.
pub async fn upload(server: &CacheServer, body: impl Into<reqwest::Body>) -> (StatusCode, String) {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/upload", server.url))
        .bearer_auth(&server.token)
        .body(body)
        .send()
        .await;
    match resp {
        Ok(r) => (r.status(), r.text().await.unwrap()),
        Err(e) => (StatusCode::from_u16(599).unwrap(), e.to_string()),
    }
}
