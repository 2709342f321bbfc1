//! `orchestrator serve` and `builder` agents as real processes, for the distributed tests and
//! the scheduler benchmark.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::bin;
use crate::cache_server::CacheServer;
use crate::nix::{NIX_CONFIG, run};
use crate::orchestrator::Setup;
use crate::process::ChildGuard;

/// The stand-in fleet's `default` and `cuda` variants, `cuda` requiring the `cuda` feature.
pub const DEFAULT_AND_CUDA: &str = r#"
[[variant]]
name = "default"
attr = "inputs.llama-cpp.packages.{system}.default"

[[variant]]
name = "cuda"
attr = "inputs.llama-cpp.packages.{system}.cuda"
features = ["cuda"]
"#;

/// A running `orchestrator serve` and what clients need to talk to it.
pub struct Orchestrator {
    /// The process.
    pub child: ChildGuard,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its configuration file.
    pub config: PathBuf,
    /// A file with an API token it accepts.
    pub api_token: PathBuf,
    log: PathBuf,
}

/// Writes builder tokens (`builder-a:token-a` … `builder-d:token-d`), an API token and the
/// configuration of a server building the fleet of `s` into `cache`, with lease-seconds 3. `top`
/// goes before the tables (e.g. `database = …`), then the `variants` tables. Returns the
/// configuration and API token files.
pub fn configure(s: &Setup, cache: &CacheServer, top: &str, variants: &str) -> (PathBuf, PathBuf) {
    configure_with(s, &cache.url, &cache.token, top, variants)
}

/// [`configure`] for the cache at `cache_url` (a TLS proxy in front of one, say) taking upload
/// token `cache_token`.
pub fn configure_with(
    s: &Setup,
    cache_url: &str,
    cache_token: &str,
    top: &str,
    variants: &str,
) -> (PathBuf, PathBuf) {
    let dir = s.home.join("orchestrator");
    std::fs::create_dir_all(&dir).unwrap();
    let tokens: String = ["a", "b", "c", "d"].iter().map(|x| format!("builder-{x}:token-{x}\n")).collect();
    std::fs::write(dir.join("builder-tokens"), tokens).unwrap();
    std::fs::write(dir.join("api-tokens"), "cli:api-token\n").unwrap();
    std::fs::write(dir.join("api-token"), "api-token\n").unwrap();
    std::fs::write(dir.join("cache-token"), cache_token).unwrap();
    let config = dir.join("fleetcache.toml");
    std::fs::write(
        &config,
        format!(
            r#"state-dir = "{state}"
{top}
[fleet]
flake = "{fleet}"
[cache]
url = "{cache}"
token-file = "{dir}/cache-token"
[server]
builder-tokens-file = "{dir}/builder-tokens"
api-tokens-file = "{dir}/api-tokens"
lease-seconds = 3
max-attempts = 3
{variants}"#,
            state = dir.join("state").display(),
            fleet = s.fleet.fleet.display(),
            cache = cache_url,
            dir = dir.display(),
        ),
    )
    .unwrap();
    (config, dir.join("api-token"))
}

/// Starts `orchestrator serve` on `listen` (`127.0.0.1:0` for any port).
pub fn start_orchestrator(s: &Setup, config: &Path, api_token: &Path, listen: &str) -> Orchestrator {
    let log = s.home.join("orchestrator/serve.log");
    let mut cmd = s.orchestrator(&["serve", "--config", config.to_str().unwrap(), "--listen", listen]);
    cmd.stdout(Stdio::piped())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap());
    let mut child = ChildGuard::spawn("orchestrator serve", &mut cmd);
    let mut line = String::new();
    BufReader::new(child.take_stdout()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").map(str::to_owned).unwrap_or_else(|| {
        panic!("orchestrator serve did not start:\n{}", std::fs::read_to_string(&log).unwrap_or_default())
    });
    Orchestrator { child, url, config: config.to_owned(), api_token: api_token.to_owned(), log }
}

impl Orchestrator {
    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `--server URL --token-file F`.
    pub fn client_args(&self) -> Vec<String> {
        vec!["--server".into(), self.url.clone(), "--token-file".into(), self.api_token.display().to_string()]
    }

    /// Waits until `names` are all registered.
    pub fn wait_for_builders(&self, s: &Setup, names: &[&str]) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let mut args = vec!["builders", "--json"];
            let client = self.client_args();
            args.extend(client.iter().map(String::as_str));
            let listed: Value = serde_json::from_str(&run(&mut s.orchestrator(&args))).unwrap();
            let have: Vec<&str> =
                listed.as_array().unwrap().iter().filter_map(|b| b["name"].as_str()).collect();
            if names.iter().all(|n| have.contains(n)) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "builders {names:?} did not register: {have:?}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// `orchestrator status --json --server …`.
    pub fn status(&self, s: &Setup) -> Vec<Value> {
        let mut args = vec!["status", "--json"];
        let client = self.client_args();
        args.extend(client.iter().map(String::as_str));
        serde_json::from_str(&run(&mut s.orchestrator(&args))).unwrap()
    }
}

/// Starts `builder` named `name` (its token is `token-<letter>`), with `features`.
pub fn start_builder(
    s: &Setup,
    o: &Orchestrator,
    name: &str,
    token: &str,
    features: &str,
) -> (ChildGuard, PathBuf) {
    start_builder_with(s, o, name, token, features, &[])
}

/// [`start_builder`] with more arguments.
pub fn start_builder_with(
    s: &Setup,
    o: &Orchestrator,
    name: &str,
    token: &str,
    features: &str,
    extra: &[&str],
) -> (ChildGuard, PathBuf) {
    let dir = s.home.join(format!("builder-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), token).unwrap();
    let log = dir.join("builder.log");
    // The settings come from a file, as the NixOS module gives them; --features (and `extra`)
    // on the command line win over the file's.
    let config = format!(
        "orchestrator = {:?}\ntoken-file = {:?}\ncache-token-file = {:?}\nfeatures = [\"from-the-file\"]\n",
        o.url,
        dir.join("token").display().to_string(),
        s.home.join("orchestrator/cache-token").display().to_string(),
    );
    std::fs::write(dir.join("builder.toml"), config).unwrap();
    let mut cmd = Command::new(bin("builder"));
    cmd.arg("--config")
        .arg(dir.join("builder.toml"))
        .args(["--features", features])
        .args(extra)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("HOME", &s.home)
        .envs(s.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    (ChildGuard::spawn(name, &mut cmd), log)
}

/// (builder, status) of each attempt of `variant` in the newest revision of `status`.
pub fn attempts_by_builder(status: &[Value], variant: &str) -> Vec<(String, String)> {
    let v =
        status[0]["variants"].as_array().unwrap().iter().find(|v| v["variant"] == variant).expect("variant");
    v["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["owner"].as_str().unwrap().to_owned(), a["status"].as_str().unwrap().to_owned()))
        .collect()
}
