//! Asking the local Nix about store paths.

use nix_formats::{Hash, StorePath};
use serde::Deserialize;
use thiserror::Error;

/// Why Nix could not answer.
#[derive(Debug, Error)]
pub enum NixError {
    /// `nix` could not be started.
    #[error("cannot run {program}: {source} (is Nix installed?)")]
    Spawn {
        /// The program.
        program: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("{command} failed: {stderr}")]
    Failed {
        /// What ran.
        command: String,
        /// Its error output.
        stderr: String,
    },
    /// It printed something this version does not understand.
    #[error("unexpected output from {command}: {message}")]
    Output {
        /// What ran.
        command: String,
        /// What was wrong.
        message: String,
    },
}

/// What Nix knows about a valid store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The path.
    pub path: StorePath,
    /// Its NarHash.
    pub nar_hash: Hash,
    /// Its NarSize.
    pub nar_size: u64,
    /// What it refers to.
    pub references: Vec<StorePath>,
    /// Its derivation, if known.
    pub deriver: Option<StorePath>,
    /// Its content address, if any.
    pub ca: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPathInfo {
    /// Present in the list form (Nix before 2.19); the object form keys entries by path.
    #[serde(default)]
    path: String,
    nar_hash: String,
    nar_size: u64,
    #[serde(default)]
    references: Vec<String>,
    #[serde(default)]
    deriver: Option<String>,
    #[serde(default)]
    ca: Option<String>,
}

fn run(program: &'static str, args: &[String]) -> Result<String, NixError> {
    let out = command(program).args(args).output().map_err(|source| NixError::Spawn { program, source })?;
    if !out.status.success() {
        return Err(NixError::Failed {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    String::from_utf8(out.stdout)
        .map_err(|_| NixError::Output { command: program.to_owned(), message: "not UTF-8".to_owned() })
}

/// The experimental features the `nix` commands we run need, enabled on their command line so
/// that a stock nix.conf (NixOS enables none) works: `nix-command` for the new CLI, `flakes`
/// for `builtins.getFlake`.
pub const EXPERIMENTAL_FEATURES: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];

/// A command for a Nix program: `nix` gets [`EXPERIMENTAL_FEATURES`]; `nix-store` and the other
/// old commands need none.
pub fn command(program: &str) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    if program == "nix" {
        c.args(EXPERIMENTAL_FEATURES);
    }
    c
}

/// [`command`] for tokio.
pub fn async_command(program: &str) -> tokio::process::Command {
    tokio::process::Command::from(command(program))
}

/// The Nix on this machine, as far as the commands we run depend on its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NixVersion {
    /// `2`.
    pub major: u32,
    /// `28`.
    pub minor: u32,
    /// Lix, which forked from Nix 2.18 and numbers its releases 2.90 on.
    pub lix: bool,
}

impl NixVersion {
    /// Parses `nix --version` output (`nix (Nix) 2.8.0`, `nix (Nix) 2.28.3pre…`,
    /// `nix (Lix, like Nix) 2.91.1`).
    pub fn parse(text: &str) -> Option<Self> {
        let version = text.split_whitespace().last()?;
        let mut parts = version.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor: String = parts.next()?.chars().take_while(char::is_ascii_digit).collect();
        Some(NixVersion { major, minor: minor.parse().ok()?, lix: text.contains("Lix") })
    }

    /// The Nix on `PATH`, asked once per process; `None` if it cannot be run or says something
    /// unexpected (then every choice below takes the newest behaviour that is safe).
    pub fn detect() -> Option<Self> {
        static VERSION: std::sync::OnceLock<Option<NixVersion>> = std::sync::OnceLock::new();
        *VERSION.get_or_init(|| {
            let out = std::process::Command::new("nix").arg("--version").output().ok()?;
            Self::parse(&String::from_utf8_lossy(&out.stdout))
        })
    }

    fn at_least(self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }

    /// `drv^*` names a derivation's outputs: from Nix 2.13 (Lix has it from its fork). Nix 2.15
    /// and later read a bare `.drv` as the file itself.
    pub fn has_outputs_syntax(self) -> bool {
        self.lix || self.at_least(2, 13)
    }

    /// `nix path-info --json` takes `--json-format` from Nix 2.33 on, and warns without it that
    /// it will become an error; older Nix and Lix refuse the flag.
    pub fn has_json_format(self) -> bool {
        !self.lix && self.at_least(2, 33)
    }
}

/// The flags that make this machine's `nix path-info` print the JSON this module reads.
pub fn path_info_json() -> &'static [&'static str] {
    path_info_json_flags(NixVersion::detect())
}

/// The flags that make `nix path-info` print JSON this module reads, for `version`.
fn path_info_json_flags(version: Option<NixVersion>) -> &'static [&'static str] {
    match version {
        Some(v) if v.has_json_format() => &["--json", "--json-format", "1"],
        // Unknown versions get no `--json-format`: without it the newest Nix only warns.
        _ => &["--json"],
    }
}

/// The closures of `paths` with their metadata (`nix path-info --recursive --json`).
pub fn closure_info(paths: &[StorePath]) -> Result<Vec<PathInfo>, NixError> {
    let mut args = vec!["path-info".to_owned(), "--recursive".to_owned()];
    args.extend(path_info_json().iter().map(|f| (*f).to_owned()));
    args.extend(paths.iter().map(StorePath::to_absolute));
    let text = run("nix", &args)?;
    parse_path_infos(&text)
}

/// `nix path-info --json` output: a list of objects with a `path` (Nix before 2.19) or an object
/// mapping each path to its metadata (Nix 2.19 and later, where NixOS machines are).
fn parse_path_infos(text: &str) -> Result<Vec<PathInfo>, NixError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<RawPathInfo>),
        Map(std::collections::BTreeMap<String, Option<RawPathInfo>>),
    }
    let bad = |message: String| NixError::Output { command: "nix path-info".to_owned(), message };
    let raw = match serde_json::from_str(text).map_err(|e| bad(e.to_string()))? {
        Raw::List(list) => list,
        Raw::Map(map) => map
            .into_iter()
            .map(|(path, info)| match info {
                Some(info) => Ok(RawPathInfo { path, ..info }),
                None => Err(bad(format!("{path} is not valid"))),
            })
            .collect::<Result<_, _>>()?,
    };
    raw.into_iter()
        .map(|r| {
            let parse = |p: &str| StorePath::from_absolute(p).map_err(|e| bad(e.to_string()));
            Ok(PathInfo {
                path: parse(&r.path)?,
                nar_hash: Hash::parse_sha256(&r.nar_hash).map_err(|e| bad(e.to_string()))?,
                nar_size: r.nar_size,
                references: r.references.iter().map(|p| parse(p)).collect::<Result<_, _>>()?,
                deriver: r.deriver.as_deref().map(parse).transpose()?,
                ca: r.ca,
            })
        })
        .collect()
}

/// The argument that makes `nix build` build all outputs of `drv` with this machine's Nix.
pub fn build_installable(drv: &StorePath) -> String {
    installable_for(drv, NixVersion::detect())
}

fn installable_for(drv: &StorePath, version: Option<NixVersion>) -> String {
    match version {
        Some(v) if !v.has_outputs_syntax() => drv.to_absolute(),
        // Unknown versions are taken to be new: old ones are what this was tested on.
        _ => format!("{}^*", drv.to_absolute()),
    }
}

/// The outputs of a derivation (`nix-store --query --outputs`).
pub fn derivation_outputs(drv: &StorePath) -> Result<Vec<StorePath>, NixError> {
    let text = run("nix-store", &["--query".to_owned(), "--outputs".to_owned(), drv.to_absolute()])?;
    text.lines()
        .map(|l| {
            StorePath::from_absolute(l.trim()).map_err(|e| NixError::Output {
                command: "nix-store --query --outputs".to_owned(),
                message: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{NixVersion, StorePath, installable_for, parse_path_infos, path_info_json_flags};

    #[test]
    fn each_nix_gets_the_flags_it_knows() {
        let v = |text: &str| NixVersion::parse(text);
        assert_eq!(v("nix (Nix) 2.8.0\n"), Some(NixVersion { major: 2, minor: 8, lix: false }));
        assert_eq!(v("nix (Nix) 2.28.3pre20250101_abc\n").map(|v| v.minor), Some(28));
        assert_eq!(v("nix (Nix) 2.13\n").map(|v| v.minor), Some(13));
        let lix = v("nix (Lix, like Nix) 2.91.1\n").unwrap();
        assert!(lix.lix);
        assert_eq!(v("Lix? no"), None);

        let drv =
            StorePath::from_absolute("/nix/store/a55kqqi1jg0dmdh544krkidzg5bk4x8l-pi-sample.drv").unwrap();
        let outputs = format!("{}^*", drv.to_absolute());
        assert_eq!(installable_for(&drv, v("nix (Nix) 2.8.0")), drv.to_absolute());
        assert_eq!(installable_for(&drv, v("nix (Nix) 2.12.1")), drv.to_absolute());
        for new in ["nix (Nix) 2.13.0", "nix (Nix) 2.28.3", "nix (Nix) 2.34.8"] {
            assert_eq!(installable_for(&drv, v(new)), outputs, "{new}");
        }
        assert_eq!(installable_for(&drv, Some(lix)), outputs);
        assert_eq!(installable_for(&drv, None), outputs);

        let json = |text: &str| path_info_json_flags(v(text));
        assert_eq!(json("nix (Nix) 2.8.0"), ["--json"]);
        assert_eq!(json("nix (Nix) 2.32.4"), ["--json"]);
        assert_eq!(json("nix (Nix) 2.33.0"), ["--json", "--json-format", "1"]);
        assert_eq!(json("nix (Nix) 2.34.8"), ["--json", "--json-format", "1"]);
        assert_eq!(path_info_json_flags(Some(lix)), ["--json"], "Lix has no --json-format");
        assert_eq!(path_info_json_flags(None), ["--json"]);
    }

    /// What Nix 2.8 printed here for a one-file output.
    const LIST: &str = r#"[{"path":"/nix/store/5vafvlpiscy71rns01ypxdl31253m3wl-pi-sample","narHash":"sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=","narSize":120,"references":[],"deriver":"/nix/store/a55kqqi1jg0dmdh544krkidzg5bk4x8l-pi-sample.drv","registrationTime":1795769704,"ultimate":true}]"#;

    #[test]
    fn path_info_json_of_old_and_new_nix() {
        let old = parse_path_infos(LIST).unwrap();
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].path.to_absolute(), "/nix/store/5vafvlpiscy71rns01ypxdl31253m3wl-pi-sample");
        assert_eq!(old[0].nar_size, 120);
        assert_eq!(old[0].nar_hash.to_sri(), "sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=");
        // Nix 2.19 and later: the same metadata under its path, without `path`.
        let mut list: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_str(LIST).unwrap();
        let path = list[0].remove("path").unwrap();
        let map = serde_json::json!({ path.as_str().unwrap(): list[0] }).to_string();
        assert_eq!(parse_path_infos(&map).unwrap(), old);
        // An invalid path is null there: an error, not a silently shorter closure.
        let err = parse_path_infos(r#"{"/nix/store/5vafvlpiscy71rns01ypxdl31253m3wl-pi-sample": null}"#)
            .unwrap_err();
        assert!(err.to_string().contains("is not valid"), "{err}");
    }
}
