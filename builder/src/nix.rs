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
    let bad = |message: String| NixError::Output { command: "nix path-info".to_owned(), message };
    let raw: Vec<RawPathInfo> = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
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
