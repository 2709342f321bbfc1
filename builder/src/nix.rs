//! Asking the local Nix about store paths.

use std::process::Command;

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
    let out =
        Command::new(program).args(args).output().map_err(|source| NixError::Spawn { program, source })?;
    if !out.status.success() {
        return Err(NixError::Failed {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    String::from_utf8(out.stdout)
        .map_err(|_| NixError::Output { command: program.to_owned(), message: "not UTF-8".to_owned() })
}

/// The closures of `paths` with their metadata (`nix path-info --recursive --json`).
pub fn closure_info(paths: &[StorePath]) -> Result<Vec<PathInfo>, NixError> {
    let mut args = vec!["path-info".to_owned(), "--recursive".to_owned(), "--json".to_owned()];
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

/// The argument that makes `nix build` build all outputs of `drv`: `drv^*` from Nix 2.13 on
/// (Nix 2.15 and later take a bare `.drv` path to mean the file itself, and build nothing), the
/// bare path before (Nix 2.8 rejects `^*`).
pub fn build_installable(drv: &StorePath) -> String {
    static VERSION: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    let version = VERSION.get_or_init(|| {
        let out = Command::new("nix").arg("--version").output().ok()?;
        parse_version(&String::from_utf8_lossy(&out.stdout))
    });
    installable_for(drv, *version)
}

fn installable_for(drv: &StorePath, version: Option<(u32, u32)>) -> String {
    match version {
        Some(v) if v < (2, 13) => drv.to_absolute(),
        // Unknown versions are taken to be new: old ones are what this was tested on.
        _ => format!("{}^*", drv.to_absolute()),
    }
}

/// `(major, minor)` from `nix --version` output (`nix (Nix) 2.8.0`, `nix (Nix) 2.28.3pre…`).
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let version = text.split_whitespace().last()?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts.next()?.chars().take_while(char::is_ascii_digit).collect();
    Some((major, minor.parse().ok()?))
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
    use super::{StorePath, installable_for, parse_path_infos, parse_version};

    #[test]
    fn nix_build_gets_the_outputs_syntax_its_version_knows() {
        assert_eq!(parse_version("nix (Nix) 2.8.0\n"), Some((2, 8)));
        assert_eq!(parse_version("nix (Nix) 2.28.3pre20250101_abc\n"), Some((2, 28)));
        assert_eq!(parse_version("nix (Nix) 2.13\n"), Some((2, 13)));
        assert_eq!(parse_version("Lix? no"), None);
        let drv =
            StorePath::from_absolute("/nix/store/a55kqqi1jg0dmdh544krkidzg5bk4x8l-pi-sample.drv").unwrap();
        assert_eq!(installable_for(&drv, Some((2, 8))), drv.to_absolute());
        assert_eq!(installable_for(&drv, Some((2, 13))), format!("{}^*", drv.to_absolute()));
        assert_eq!(installable_for(&drv, Some((2, 28))), format!("{}^*", drv.to_absolute()));
        assert_eq!(installable_for(&drv, None), format!("{}^*", drv.to_absolute()));
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
