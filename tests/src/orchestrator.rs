//! Running the real `orchestrator` against the stand-in fleet with its own XDG directories,
//! and reading what it prints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix_formats::StorePath;
use serde_json::Value;

use crate::bin;
use crate::fleet::Fleet;
use crate::nix::{NIX_CONFIG, run};
use crate::process::ChildGuard;

/// A fleet fixture plus the XDG directories the orchestrator runs with (so nothing of the
/// user's or of another test leaks in).
pub struct Setup {
    /// The stand-in fleet.
    pub fleet: Fleet,
    /// HOME and the XDG directories are under it.
    pub home: PathBuf,
    /// More environment for every orchestrator and builder started (`SSL_CERT_FILE`).
    pub env: Vec<(String, PathBuf)>,
}

impl Setup {
    /// A new fleet and an empty home.
    pub fn new() -> Self {
        let fleet = Fleet::new();
        let home = fleet.scratch("home");
        Setup { fleet, home, env: Vec::new() }
    }

    /// `orchestrator ARGS` in the fleet checkout with this home.
    pub fn orchestrator(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("orchestrator"));
        c.args(args)
            .current_dir(&self.fleet.fleet)
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("HOME", &self.home)
            .env("XDG_STATE_HOME", self.home.join("state"))
            .env("XDG_DATA_HOME", self.home.join("data"))
            .env("XDG_CONFIG_HOME", self.home.join("config"))
            .env_remove("FLEETCACHE_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        c
    }

    /// Runs `orchestrator build --json …` and returns the exit code, the results by variant and
    /// stderr.
    pub fn build(&self, args: &[&str]) -> (i32, BTreeMap<String, Value>, String) {
        let mut all = vec!["build", "--json"];
        all.extend_from_slice(args);
        let out = self.orchestrator(&all).output().expect("run orchestrator");
        parse_build(out)
    }

    /// `orchestrator status --json`.
    pub fn status(&self) -> Vec<Value> {
        let out = run(&mut self.orchestrator(&["status", "--json"]));
        serde_json::from_str::<Value>(&out).expect("status JSON").as_array().expect("array").clone()
    }

    /// The embedded cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.home.join("data/fleetcache/cache")
    }

    /// The generated public key.
    pub fn public_key(&self) -> String {
        std::fs::read_to_string(self.home.join("data/fleetcache/signing-key.pub"))
            .expect("public key")
            .trim()
            .to_owned()
    }

    /// Writes `fleetcache.toml` in the home; returns its path.
    pub fn write_config(&self, text: &str) -> PathBuf {
        let p = self.home.join("fleetcache.toml");
        std::fs::write(&p, text).expect("config");
        p
    }
}

/// Exit code, results by variant and stderr of `build --json`.
pub fn parse_build(out: Output) -> (i32, BTreeMap<String, Value>, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or(-1);
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("build printed no JSON ({e}); exit {code}; stderr:\n{stderr}"));
    let by_variant = doc
        .as_array()
        .expect("an array")
        .iter()
        .map(|r| (r["variant"].as_str().expect("variant").to_owned(), r.clone()))
        .collect();
    (code, by_variant, stderr)
}

/// Variant -> status.
pub fn status_of(results: &BTreeMap<String, Value>) -> BTreeMap<&str, &str> {
    results.iter().map(|(k, v)| (k.as_str(), v["status"].as_str().expect("status"))).collect()
}

/// The first output of a result.
pub fn out_path(result: &Value) -> StorePath {
    StorePath::from_absolute(result["out_paths"][0].as_str().expect("an output")).expect("store path")
}

/// The attempt statuses of a variant of the newest revision of `status --json`.
pub fn attempts(status: &[Value], variant: &str) -> Vec<String> {
    let v =
        status[0]["variants"].as_array().unwrap().iter().find(|v| v["variant"] == variant).expect("variant");
    v["attempts"].as_array().unwrap().iter().map(|a| a["status"].as_str().unwrap().to_owned()).collect()
}

/// Waits until `path`'s contents satisfy `pred` or panics after `timeout`.
pub fn wait_for_file(path: &Path, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if pred(&text) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} did not happen within {timeout:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `orchestrator build --json ARGS` with stdout and stderr in files.
pub fn spawn_build(s: &Setup, name: &str, args: &[&str]) -> (ChildGuard, PathBuf, PathBuf) {
    let (out, err) = (s.home.join(format!("{name}.out")), s.home.join(format!("{name}.err")));
    let mut all = vec!["build", "--json"];
    all.extend_from_slice(args);
    let mut cmd = s.orchestrator(&all);
    cmd.stdout(std::fs::File::create(&out).unwrap()).stderr(std::fs::File::create(&err).unwrap());
    (ChildGuard::spawn(name, &mut cmd), out, err)
}

/// Waits for a [`spawn_build`] and parses what it printed.
pub fn collect(mut child: ChildGuard, out: PathBuf, err: PathBuf) -> (i32, BTreeMap<String, Value>, String) {
    let status = child.wait_with_output().status;
    let mut output =
        Output { status, stdout: std::fs::read(out).unwrap(), stderr: std::fs::read(err).unwrap() };
    output.status = status;
    parse_build(output)
}

impl Default for Setup {
    fn default() -> Self {
        Self::new()
    }
}
