//! The builder's settings: a TOML file (`builder --config FILE`), overridden by flags.
//!
//! The NixOS module renders this file; `builder --check-config --settings-only` validates it at
//! build time, where the token files it names do not exist yet.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// Why the builder's configuration is unusable.
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
    /// The file is not valid TOML for [`Config`] (unknown keys included).
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error, with its line.
        #[source]
        source: toml::de::Error,
    },
    /// A required setting is in neither the file nor the flags.
    #[error("no {key}: give --{key} or `{key}` in the configuration file")]
    Missing {
        /// The setting's name.
        key: &'static str,
    },
    /// A setting has a value the builder cannot use.
    #[error("{key} = {value:?}: {why}")]
    Invalid {
        /// The setting's name.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// The settings as written in the file; flags of the same name win. Every key is optional in
/// the file, but `orchestrator`, `token-file` and `cache-token-file` must come from one of them.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// The orchestrator, e.g. `http://orchestrator:8090`.
    pub orchestrator: Option<String>,
    /// File holding this builder's token (a line of the orchestrator's builder-tokens-file).
    pub token_file: Option<PathBuf>,
    /// File holding an upload token of the cache-server.
    pub cache_token_file: Option<PathBuf>,
    /// The cache-server to push to. Default: the one the orchestrator names.
    pub cache: Option<String>,
    /// Features this machine supports. Default: detected (nvidia-smi -> cuda, vulkaninfo ->
    /// vulkan, /dev/kvm -> kvm).
    pub features: Option<Vec<String>>,
    /// Features a job must require for this builder to take it. Default none.
    pub mandatory_features: Option<Vec<String>>,
    /// Jobs built at once. Default 1.
    pub max_jobs: Option<u32>,
    /// Systems this machine builds for. Default: its own.
    pub systems: Option<Vec<String>>,
}

/// The settings once file and flags are merged and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The orchestrator's base URL.
    pub orchestrator: String,
    /// This builder's token file.
    pub token_file: PathBuf,
    /// The cache-server upload token file.
    pub cache_token_file: PathBuf,
    /// The cache-server, when not the orchestrator's.
    pub cache: Option<String>,
    /// Features, or `None` to detect them.
    pub features: Option<Vec<String>>,
    /// Mandatory features.
    pub mandatory_features: Vec<String>,
    /// Jobs at once (at least 1).
    pub max_jobs: u32,
    /// Systems, or `None` for this machine's own.
    pub systems: Option<Vec<String>>,
}

impl Config {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
    }

    /// Lays `flags` over this file's settings (a flag that is set wins) and checks the result.
    pub fn merge(self, flags: Config) -> Result<Settings, ConfigError> {
        let orchestrator =
            flags.orchestrator.or(self.orchestrator).ok_or(ConfigError::Missing { key: "orchestrator" })?;
        check_url("orchestrator", &orchestrator)?;
        let cache = flags.cache.or(self.cache);
        if let Some(cache) = &cache {
            check_url("cache", cache)?;
        }
        let max_jobs = flags.max_jobs.or(self.max_jobs).unwrap_or(1);
        if max_jobs == 0 {
            return Err(ConfigError::Invalid {
                key: "max-jobs",
                value: "0".into(),
                why: "a builder builds at least one job at a time",
            });
        }
        Ok(Settings {
            orchestrator,
            token_file: flags
                .token_file
                .or(self.token_file)
                .ok_or(ConfigError::Missing { key: "token-file" })?,
            cache_token_file: flags
                .cache_token_file
                .or(self.cache_token_file)
                .ok_or(ConfigError::Missing { key: "cache-token-file" })?,
            cache,
            features: flags.features.or(self.features).map(clean),
            mandatory_features: clean(
                flags.mandatory_features.or(self.mandatory_features).unwrap_or_default(),
            ),
            max_jobs,
            systems: flags.systems.or(self.systems).map(clean).filter(|s| !s.is_empty()),
        })
    }
}

/// Trims names and drops empty ones (`--features ''` means none).
fn clean(names: Vec<String>) -> Vec<String> {
    names.into_iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
}

fn check_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => Ok(()),
        _ => Err(ConfigError::Invalid {
            key,
            value: url.to_owned(),
            why: "expected an http:// or https:// URL with a host",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = parse(
            "orchestrator = \"http://o:8090\"\ntoken-file = \"/t\"\ncache-token-file = \"/c\"\n\
             features = [\"cuda\", \" \"]\nmax-jobs = 2\n",
        )
        .unwrap();
        let flags = Config { max_jobs: Some(4), ..Config::default() };
        let s = file.merge(flags).unwrap();
        assert_eq!(s.orchestrator, "http://o:8090");
        assert_eq!(s.features, Some(vec!["cuda".to_owned()]));
        assert_eq!(s.max_jobs, 4);
        assert_eq!(s.systems, None);
        assert_eq!(s.mandatory_features, Vec::<String>::new());
    }

    #[test]
    fn missing_and_invalid_settings_are_named() {
        let err = Config::default().merge(Config::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no orchestrator: give --orchestrator or `orchestrator` in the configuration file"
        );
        let file = parse("orchestrator = \"orchestrator:8090\"\n").unwrap();
        assert!(file.merge(Config::default()).unwrap_err().to_string().contains("http://"));
        let file = parse("orchestrator = \"http://o\"\ntoken-file = \"/t\"\n").unwrap();
        assert!(file.merge(Config::default()).unwrap_err().to_string().contains("cache-token-file"));
        let file = parse(
            "orchestrator = \"http://o\"\ntoken-file = \"/t\"\ncache-token-file = \"/c\"\nmax-jobs = 0\n",
        )
        .unwrap();
        assert!(file.merge(Config::default()).unwrap_err().to_string().contains("max-jobs"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = parse("orchestrator = \"http://o\"\nmax_jobs = 2\n").unwrap_err();
        assert!(err.to_string().contains("max_jobs"), "{err}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let c = parse(include_str!("../builder.example.toml")).unwrap();
        let s = c.merge(Config::default()).unwrap();
        assert_eq!(s.features.as_deref(), Some(&["cuda".to_owned()][..]));
    }
}
