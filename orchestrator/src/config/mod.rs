//! `fleetcache.toml`: what the orchestrator builds, where it keeps its state, where it publishes.
//!
//! Every field has a default, stated on it, so an empty file (or none) is the embedded default:
//! state under the XDG state directory, a local cache directory under the XDG data directory,
//! a signing key generated there on first use, and the llama.cpp every machine of the fleet
//! installs (`nixosConfigurations.*` enabling `services.fleetcache.client`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

mod gc;
mod webhooks;

pub use gc::GcConfig;
pub use webhooks::{CommitStatusConfig, Forge, WebhooksConfig};

/// Why the configuration is unusable.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for these settings (unknown keys included).
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error, with its line.
        #[source]
        source: toml::de::Error,
    },
    /// The settings parse but contradict each other or name something impossible.
    #[error("{path}: {message}")]
    Invalid {
        /// The file (or `<defaults>`).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The orchestrator's settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// The fleet repository.
    #[serde(default)]
    pub fleet: FleetConfig,
    /// Where the state database lives. Default `$XDG_STATE_HOME/fleetcache`
    /// (`~/.local/state/fleetcache`).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The state database: `postgres://user@host/db` lets several orchestrator replicas share one
    /// queue (a password is read from `PGPASSWORD` if the URL has none). Default: SQLite,
    /// `state.db` in the state directory.
    #[serde(default)]
    pub database: Option<String>,
    /// Where results are published.
    #[serde(default)]
    pub cache: CacheConfig,
    /// How builds run on this machine.
    #[serde(default)]
    pub build: BuildConfig,
    /// `orchestrator serve`: the scheduler for builder agents.
    #[serde(default)]
    pub server: ServerConfig,
    /// Forge webhooks on `orchestrator serve`: a push that changes `flake.lock` builds.
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    /// Garbage collection of the cache by fleet revision.
    #[serde(default)]
    pub gc: GcConfig,
    /// Variants to build by attribute path, beside (or, by default, instead of) what the
    /// fleet's machines install (see `fleet.machines`). Default none.
    #[serde(default, rename = "variant")]
    pub variants: Vec<VariantConfig>,
}

/// The fleet flake.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FleetConfig {
    /// The fleet flake: a local git checkout (`/srv/fleet`, used in place) or a git URL
    /// (`git+https://…`, `git+ssh://…`, `git+file://…`, `github:owner/repo`), mirrored under the
    /// state directory and fetched on every build.
    /// Default: the git repository in the current directory. `--flake` overrides it.
    #[serde(default)]
    pub flake: Option<String>,
    /// The lock-file inputs shown and recorded for each revision. Default `["nixpkgs", "llama-cpp"]`.
    #[serde(default = "default_tracked_inputs")]
    pub tracked_inputs: Vec<String>,
    /// Build what the fleet's machines install: every `nixosConfigurations.<machine>` that
    /// enables `services.fleetcache.client` contributes its `package`, deduplicated by
    /// derivation, for a builder with its `builderFeatures`. Where a `[[variant]]` is the same
    /// derivation, the variant's name and checks are used. Default: on when no `[[variant]]` is
    /// configured, off otherwise.
    #[serde(default)]
    pub machines: Option<bool>,
}

/// Where results go: an embedded cache (a store plus signing keys, served in-process while the
/// command runs) or a remote cache-server.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CacheConfig {
    /// A remote cache-server (`https://cache.example.org`). When set, uploads go there with
    /// `token-file`, and `store`/`signing-key-files` must not be set (the server signs).
    /// Default none: the embedded cache.
    #[serde(default)]
    pub url: Option<String>,
    /// File holding an upload token of the remote cache-server. Required with `url`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// File holding an admin token of the remote cache-server (one of its
    /// `admin-tokens-file`): what `orchestrator gc` collects with. Default none.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// The embedded cache's store: `file:///dir` or `s3://bucket?endpoint=…&region=…` (AWS_*
    /// credentials from the environment). Default `file://$XDG_DATA_HOME/fleetcache/cache`.
    #[serde(default)]
    pub store: Option<String>,
    /// The embedded cache's secret signing keys (every key signs). Default: one key at
    /// `$XDG_DATA_HOME/fleetcache/signing-key`, generated on first use with its public half beside
    /// it (`signing-key.pub`).
    #[serde(default)]
    pub signing_key_files: Vec<PathBuf>,
    /// Upstream caches of the embedded cache (`[[cache.upstream]]` tables of `url` and
    /// `public-keys`, as cache-server's `[[upstream]]`): pushes skip what they serve. A remote
    /// cache-server has its own. Default none.
    #[serde(default)]
    pub upstream: Vec<cache_server::upstream::UpstreamConfig>,
}

/// Build settings for this machine.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BuildConfig {
    /// Derivations built at once by this machine (each `nix build` also uses every core Nix is
    /// allowed). Default 1.
    #[serde(default = "default_max_jobs")]
    pub max_jobs: usize,
    /// Paths uploaded at once by each push (at most two of them NARs over 32 MiB). Default: 16.
    #[serde(default)]
    pub push_jobs: Option<usize>,
    /// zstd level of pushed NARs. Default 1.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Largest build log kept per attempt in the state database, in bytes (the head is dropped
    /// beyond it; the cache gets Nix's whole log). Default 4 MiB.
    #[serde(default = "default_max_log_bytes")]
    pub max_log_bytes: usize,
    /// This machine's features, for verifications of the embedded build. Default: detected
    /// (`nvidia-smi` -> `cuda`, `vulkaninfo` -> `vulkan`, `/dev/kvm` -> `kvm`).
    #[serde(default)]
    pub features: Option<Vec<String>>,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            max_jobs: default_max_jobs(),
            push_jobs: None,
            zstd_level: default_zstd_level(),
            max_log_bytes: default_max_log_bytes(),
            features: None,
        }
    }
}

/// `orchestrator serve`'s settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// Address to listen on (`--listen` overrides it). Default `127.0.0.1:8090`.
    #[serde(default = "default_server_listen")]
    pub listen: std::net::SocketAddr,
    /// File of `name:token` lines, one per builder agent; removing a line revokes it within a
    /// second, without a restart. Required by `serve`.
    #[serde(default)]
    pub builder_tokens_file: Option<PathBuf>,
    /// File of `name:token` lines for the CLI (`build --server`, `status --server`). Required by
    /// `serve`.
    #[serde(default)]
    pub api_tokens_file: Option<PathBuf>,
    /// Seconds a builder holds a job without a heartbeat before it goes back to the queue.
    /// Default 60.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u64,
    /// Claims of one job before it is failed (builders dying, refusing or failing to push).
    /// Default 3.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Who may read the status pages (`/`, `/revisions/…`, `/logs`, `/builders`, `/webhooks`):
    /// `"token"` (an API token, by a login form that sets a cookie or by `Authorization`) or
    /// `"public"` (anyone who reaches the server; no secret is ever shown on them).
    /// Default `"token"`.
    #[serde(default)]
    pub status_page: StatusPage,
}

/// The `server.status-page` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StatusPage {
    /// An API token is needed.
    #[default]
    Token,
    /// Anyone may read them.
    Public,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_server_listen(),
            builder_tokens_file: None,
            api_tokens_file: None,
            lease_seconds: default_lease_seconds(),
            max_attempts: default_max_attempts(),
            status_page: StatusPage::default(),
        }
    }
}

fn default_server_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 8090))
}
fn default_lease_seconds() -> u64 {
    60
}
fn default_max_attempts() -> u32 {
    3
}

/// One variant: a package attribute of the fleet flake, built for some systems.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VariantConfig {
    /// Name used on the command line (`--variant cuda`) and in reports: letters, digits, `-`, `_`.
    pub name: String,
    /// Attribute path in the fleet flake at the revision; `{system}` is replaced by each system.
    /// Components may be quoted: `nixosConfigurations."carbon.lan".pkgs.llama-cpp-cuda`.
    pub attr: String,
    /// Systems to build for. Default: this machine's (`x86_64-linux` on x86-64 Linux).
    #[serde(default = "default_systems")]
    pub systems: Vec<String>,
    /// Builder features the build needs (used when builders are distributed; the embedded build
    /// builds everything here). Default none.
    #[serde(default)]
    pub features: Vec<String>,
    /// Files that must exist in the output (`lib/libggml-cuda.so`), checked wherever it is
    /// built; the build fails (and nothing is published) without them. Default none.
    #[serde(default)]
    pub files: Vec<String>,
    /// A check on real hardware after the build: `{ features = ["cuda"], command =
    /// "bin/llama-cli --list-devices", expect = "CUDA0" }`, run where the variant was built if
    /// that machine has the features; recorded as verified, verify-failed or unverified.
    #[serde(default)]
    pub verify: Option<builder::api::VerifySpec>,
}

fn default_tracked_inputs() -> Vec<String> {
    vec!["nixpkgs".to_owned(), "llama-cpp".to_owned()]
}
fn default_max_jobs() -> usize {
    1
}
fn default_zstd_level() -> i32 {
    builder::push::DEFAULT_ZSTD_LEVEL
}
fn default_max_log_bytes() -> usize {
    builder::nix_build::DEFAULT_MAX_LOG_BYTES
}
fn default_systems() -> Vec<String> {
    vec![local_system()]
}
pub use builder::local_system;

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig { flake: None, tracked_inputs: default_tracked_inputs(), machines: None }
    }
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and checks `text`, naming `path` in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        config.check().map_err(|message| ConfigError::Invalid { path: path.to_owned(), message })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        let mut names = std::collections::BTreeSet::new();
        if self.variants.is_empty() && self.fleet.machines == Some(false) {
            return Err(
                "nothing to build: fleet.machines = false and no [[variant]] is configured".to_owned()
            );
        }
        for v in &self.variants {
            if v.name.is_empty() || !v.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!("variant name {:?}: use letters, digits, '-' and '_'", v.name));
            }
            if !names.insert(&v.name) {
                return Err(format!("variant {:?} is configured twice", v.name));
            }
            if v.systems.is_empty() {
                return Err(format!("variant {:?} has no systems", v.name));
            }
            for system in &v.systems {
                attr_path(&v.attr, system).map_err(|e| format!("variant {:?}: {e}", v.name))?;
            }
            if let Some(f) = v.files.iter().find(|f| !builder::verify::valid_file(f)) {
                return Err(format!(
                    "variant {:?}: file {f:?} must be a relative path inside the output",
                    v.name
                ));
            }
        }
        let w = &self.webhooks;
        let any_secret =
            w.github_secret_file.is_some() || w.gitea_secret_file.is_some() || w.gitlab_token_file.is_some();
        if any_secret && w.repository.is_none() {
            return Err("webhooks need webhooks.repository (which repository's pushes count)".to_owned());
        }
        if let Some(st) = &w.status
            && st.repository.is_none()
            && w.repository.is_none()
        {
            return Err("webhooks.status needs a repository (or webhooks.repository)".to_owned());
        }
        if self.server.lease_seconds < 3 {
            return Err("server.lease-seconds must be at least 3".to_owned());
        }
        if self.server.max_attempts == 0 {
            return Err("server.max-attempts must be at least 1".to_owned());
        }
        if self.build.max_jobs == 0 {
            return Err("build.max-jobs must be at least 1".to_owned());
        }
        match (&self.cache.url, &self.cache.token_file) {
            (Some(_), None) => return Err("cache.url needs cache.token-file (an upload token)".to_owned()),
            (None, Some(_)) => return Err("cache.token-file is set but cache.url is not".to_owned()),
            (Some(_), Some(_))
                if self.cache.store.is_some()
                    || !self.cache.signing_key_files.is_empty()
                    || !self.cache.upstream.is_empty() =>
            {
                return Err(
                    "cache.url (a remote cache-server) excludes cache.store, cache.signing-key-files and \
                     cache.upstream: the server holds the store, the keys and its upstreams"
                        .to_owned(),
                );
            }
            _ => {}
        }
        cache_server::upstream::check(&self.cache.upstream).map_err(|e| format!("cache.{e}"))?;
        if self.cache.admin_token_file.is_some() && self.cache.url.is_none() {
            return Err("cache.admin-token-file is set but cache.url is not".to_owned());
        }
        self.gc.check()?;
        if self.gc.every_hours > 0 && self.cache.url.is_some() && self.cache.admin_token_file.is_none() {
            return Err(
                "gc.every-hours collects on the remote cache: it needs cache.admin-token-file".to_owned()
            );
        }
        if let Some(db) = &self.database
            && !(db.starts_with("postgres://")
                || db.starts_with("postgresql://")
                || db.starts_with("sqlite://"))
        {
            return Err(format!("database {db:?}: use postgres://… (or sqlite://…)"));
        }
        if let Some(store) = &self.cache.store {
            cache_server::config::StoreUrl::parse(store).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The state directory: `state-dir`, else `$XDG_STATE_HOME/fleetcache`, else
    /// `~/.local/state/fleetcache`.
    pub fn state_dir(&self) -> Result<PathBuf, String> {
        match &self.state_dir {
            Some(d) => Ok(d.clone()),
            None => xdg_dir("XDG_STATE_HOME", ".local/state"),
        }
    }

    /// The webhook secret files configured.
    pub fn webhook_secret_files(&self) -> impl Iterator<Item = &Path> {
        let w = &self.webhooks;
        [&w.github_secret_file, &w.gitea_secret_file, &w.gitlab_token_file]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    /// Whether the fleet's machines say what to build (`fleet.machines`, by default when no
    /// `[[variant]]` is configured).
    pub fn builds_machines(&self) -> bool {
        self.fleet.machines.unwrap_or(self.variants.is_empty())
    }
}

/// `$VAR/fleetcache`, else `~/<fallback>/fleetcache`.
pub fn xdg_dir(var: &str, fallback: &str) -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os(var).filter(|d| Path::new(d).is_absolute()) {
        return Ok(PathBuf::from(d).join("fleetcache"));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| format!("neither {var} nor HOME is set"))?;
    Ok(PathBuf::from(home).join(fallback).join("fleetcache"))
}

/// Splits an attribute path into its components after putting `system` for `{system}`.
pub fn attr_path(attr: &str, system: &str) -> Result<Vec<String>, String> {
    let attr = attr.replace("{system}", system);
    let mut parts = Vec::new();
    let mut chars = attr.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(format!("attribute path {attr:?}: unterminated quote")),
                }
            }
            if !matches!(chars.peek(), None | Some('.')) {
                return Err(format!("attribute path {attr:?}: '.' expected after a quoted name"));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if c == '"' || c.is_whitespace() {
                    return Err(format!("attribute path {attr:?}: unexpected {c:?}"));
                }
                part.push(c);
                chars.next();
            }
            if part.is_empty() {
                return Err(format!("attribute path {attr:?}: empty component"));
            }
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => {}
            Some(c) => return Err(format!("attribute path {attr:?}: unexpected {c:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_is_the_embedded_default() {
        let c = Config::parse("", Path::new("x.toml")).unwrap();
        assert!(c.variants.is_empty());
        assert!(c.builds_machines(), "with no [[variant]], the machines say what to build");
        assert_eq!(c.cache, CacheConfig::default());
        assert_eq!(c, Config::default());
        let explicit =
            Config::parse("[[variant]]\nname = \"x\"\nattr = \"a.b\"\n", Path::new("x.toml")).unwrap();
        assert!(!explicit.builds_machines(), "explicit variants replace the machines by default");
        let both = Config::parse(
            "[fleet]\nmachines = true\n[[variant]]\nname = \"x\"\nattr = \"a.b\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert!(both.builds_machines());
    }

    #[test]
    fn the_example_file_is_valid_and_says_the_defaults() {
        let example = include_str!("../../../fleetcache.example.toml");
        let c = Config::parse(example, Path::new("fleetcache.example.toml")).unwrap();
        assert_eq!(c.build, BuildConfig::default());
        assert_eq!(c.server, ServerConfig::default());
        assert_eq!(c.webhooks, WebhooksConfig::default());
        assert_eq!(c.fleet, FleetConfig::default());
        assert_eq!(c, Config::default(), "every value the example sets is the default");
        // Its commented-out variant is valid too.
        let variant: String = example
            .lines()
            .skip_while(|l| !l.starts_with("# [[variant]]"))
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches('#').trim_start()))
            .collect();
        assert!(variant.contains("verify"), "{variant}");
        let c = Config::parse(&variant, Path::new("variant")).unwrap();
        assert_eq!(c.variants.len(), 1);
        assert_eq!(c.variants[0].features, ["cuda"]);
    }

    #[test]
    fn mistakes_are_named() {
        let bad = |text: &str| Config::parse(text, Path::new("f.toml")).unwrap_err().to_string();
        assert!(bad("[fleet]\nflak = \"x\"").contains("unknown field `flak`"));
        assert!(bad("[cache]\nurl = \"http://c\"").contains("needs cache.token-file"));
        assert!(
            bad("[cache]\nurl = \"http://c\"\ntoken-file = \"t\"\nstore = \"file:///x\"")
                .contains("excludes")
        );
        assert!(bad("[cache]\nstore = \"ftp://x\"").contains("invalid store URL"));
        let upstream = "[[cache.upstream]]\nurl = \"https://u\"\npublic-keys = [\"u-1:bad\"]\n";
        assert!(bad(upstream).contains("cache.upstream https://u: public key"), "{}", bad(upstream));
        let remote = "[cache]\nurl = \"http://c\"\ntoken-file = \"t\"\n";
        let key = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
        let both = format!("{remote}[[cache.upstream]]\nurl = \"https://u\"\npublic-keys = [\"{key}\"]\n");
        assert!(bad(&both).contains("its upstreams"), "{}", bad(&both));
        let variant = |attr: &str| format!("[[variant]]\nname = \"x\"\nattr = '{attr}'\n");
        assert!(bad(&variant("a..b")).contains("empty component"));
        assert!(bad(&variant("a.\"b")).contains("unterminated quote"));
        assert!(bad(&(variant("a") + &variant("b"))).contains("configured twice"));
        assert!(bad("[[variant]]\nname = \"a b\"\nattr = 'x'").contains("variant name"));
        assert!(bad("[build]\nmax-jobs = 0").contains("at least 1"));
        assert!(
            bad(&(variant("a") + "files = [\"../etc/passwd\"]\n"))
                .contains("relative path inside the output")
        );
        assert!(bad(&(variant("a") + "verify = { command = \"x\" }\n")).contains("missing field `expect`"));
        assert!(bad("[fleet]\nmachines = false").contains("nothing to build"));
        let status = |forge: &str| {
            format!(
                "[webhooks]\nrepository = \"o/f\"\n[webhooks.status]\nforge = \"{forge}\"\napi-url = \"https://f\"\ntoken-file = \"t\"\n"
            )
        };
        assert!(
            bad(&status("bitbucket")).contains("unknown variant `bitbucket`"),
            "{}",
            bad(&status("bitbucket"))
        );
        let forgejo = Config::parse(&status("forgejo"), Path::new("f.toml")).unwrap();
        assert_eq!(forgejo.webhooks.status.unwrap().forge, Forge::Gitea, "Forgejo speaks Gitea's API");
    }

    #[test]
    fn attribute_paths() {
        assert_eq!(
            attr_path("inputs.llama-cpp.packages.{system}.cuda", "aarch64-linux").unwrap(),
            ["inputs", "llama-cpp", "packages", "aarch64-linux", "cuda"]
        );
        assert_eq!(
            attr_path("nixosConfigurations.\"carbon.lan\".pkgs.x", "s").unwrap(),
            ["nixosConfigurations", "carbon.lan", "pkgs", "x"]
        );
        assert!(attr_path("a.", "s").is_err());
        assert!(attr_path("\"a\"b", "s").is_err());
    }
}
