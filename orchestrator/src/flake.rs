//! The fleet flake: where its git repository is, a revision resolved to a commit, and the inputs
//! its `flake.lock` pins at that commit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a revision could not be resolved or its lock read.
#[derive(Debug, Error)]
pub enum FlakeError {
    /// `git` could not be run.
    #[error("running git: {0}")]
    Spawn(#[source] std::io::Error),
    /// The mirror directory could not be prepared.
    #[error("mirror {path}: {source}")]
    Mirror {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A git command failed.
    #[error("{what}: {stderr}")]
    Git {
        /// What was being done.
        what: String,
        /// git's message.
        stderr: String,
    },
    /// The flake reference is not one we can use.
    #[error("flake {0:?}: {1}")]
    Reference(String, String),
    /// The commit has no usable `flake.lock`.
    #[error("{rev}: {message}")]
    Lock {
        /// The commit.
        rev: String,
        /// What is wrong.
        message: String,
    },
}

/// The fleet repository, as given and as a local git directory we can read.
#[derive(Debug, Clone)]
pub struct FleetRepo {
    /// The reference as the user gave it (recorded, and what remote builders will fetch).
    pub reference: String,
    /// A local git directory holding its commits (the checkout itself, or our mirror).
    pub git_dir: PathBuf,
    /// The flake's directory inside the repository, if not the root (`?dir=`).
    pub subdir: Option<String>,
    /// Whether `git_dir` is our bare mirror of a remote.
    pub mirrored: bool,
}

/// One input pinned by `flake.lock`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockedInput {
    /// The root input's name (`nixpkgs`).
    pub name: String,
    /// The locked git revision, when the input has one.
    pub rev: Option<String>,
    /// The locked source, as a flake URL-like string (`github:NixOS/nixpkgs`, `git+file:///…`).
    pub source: String,
    /// The locked NAR hash.
    pub nar_hash: Option<String>,
}

fn git(dir: &Path, args: &[&str], what: impl Fn() -> String) -> Result<String, FlakeError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .map_err(FlakeError::Spawn)?;
    if !out.status.success() {
        return Err(FlakeError::Git {
            what: what(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl FleetRepo {
    /// Finds the repository for `reference`: a local checkout is used in place; a git URL
    /// (`git+https://`, `git+ssh://`, `git+file://`, `github:`, `gitlab:`) is mirrored under
    /// `mirrors` (cloned once, fetched on every call) so branches resolve to what the remote has.
    pub fn open(reference: &str, mirrors: &Path) -> Result<Self, FlakeError> {
        let (base, subdir) = split_query(reference)?;
        let bad = |why: &str| FlakeError::Reference(reference.to_owned(), why.to_owned());
        let url = if let Some(rest) = base.strip_prefix("git+") {
            rest.to_owned()
        } else if let Some(rest) = base.strip_prefix("github:") {
            format!("https://github.com/{}.git", rest.trim_end_matches('/'))
        } else if let Some(rest) = base.strip_prefix("gitlab:") {
            format!("https://gitlab.com/{}.git", rest.trim_end_matches('/'))
        } else if base.contains(':') {
            return Err(bad(
                "use a local checkout, or git+https://, git+ssh://, git+file://, github:owner/repo",
            ));
        } else {
            // A checkout: used in place, so uncommitted work is simply not seen (we read commits).
            let path = PathBuf::from(base);
            let path = std::fs::canonicalize(&path).map_err(|e| bad(&format!("{}: {e}", path.display())))?;
            let top = git(&path, &["rev-parse", "--show-toplevel"], || {
                format!("{} is not a git repository (a fleet flake must be committed to git)", path.display())
            })?;
            return Ok(FleetRepo {
                reference: reference.to_owned(),
                git_dir: PathBuf::from(top.trim()),
                subdir,
                mirrored: false,
            });
        };
        let digest = hex_sha256(url.as_bytes());
        let mirror = mirrors.join(&digest[..16]);
        if !mirror.join("HEAD").exists() {
            // A bare clone fetching branches and tags only: `--prune` then never touches the
            // refs/fleetcache/ pins that keep built commits reachable for Nix.
            let io = |source| FlakeError::Mirror { path: mirror.clone(), source };
            std::fs::create_dir_all(mirrors).map_err(io)?;
            let tmp = mirrors.join(format!("{}.tmp-{}", &digest[..16], std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            let tmp_str = tmp.display().to_string();
            git(mirrors, &["init", "--quiet", "--bare", &tmp_str], || {
                format!("creating a mirror in {tmp_str}")
            })?;
            for args in [
                &["remote", "add", "origin", &url][..],
                &["config", "remote.origin.fetch", "+refs/heads/*:refs/heads/*"],
                &["config", "--add", "remote.origin.fetch", "+refs/tags/*:refs/tags/*"],
            ] {
                git(&tmp, args, || format!("configuring the mirror of {url}"))?;
            }
            git(&tmp, &["fetch", "--quiet", "origin"], || format!("cloning {url}"))?;
            std::fs::rename(&tmp, &mirror)
                // Another run may have finished the same clone first.
                .or_else(|e| if mirror.join("HEAD").exists() { Ok(()) } else { Err(e) })
                .map_err(io)?;
        } else {
            git(&mirror, &["fetch", "--quiet", "--prune", "origin"], || format!("fetching {url}"))?;
        }
        Ok(FleetRepo { reference: reference.to_owned(), git_dir: mirror, subdir, mirrored: true })
    }

    /// The full commit `rev` (a commit, tag or branch) names. In a mirror the commit is pinned
    /// under `refs/fleetcache/`, where Nix fetches it from (Nix 2.8 cannot find a commit in a
    /// bare repository by `allRefs`).
    pub fn resolve(&self, rev: &str) -> Result<String, FlakeError> {
        if rev.starts_with('-') {
            return Err(FlakeError::Git {
                what: format!("resolving {rev:?}"),
                stderr: "not a revision".into(),
            });
        }
        let spec = format!("{rev}^{{commit}}");
        let out = git(&self.git_dir, &["rev-parse", "--verify", "--quiet", &spec], || {
            format!("{rev:?} is not a commit, tag or branch of {}", self.reference)
        })?;
        let commit = out.trim().to_owned();
        if self.mirrored {
            git(&self.git_dir, &["update-ref", &format!("refs/fleetcache/{commit}"), &commit], || {
                format!("pinning {commit} in the mirror")
            })?;
        }
        Ok(commit)
    }

    /// The flake URL Nix evaluates for `commit` (after [`FleetRepo::resolve`]): our local copy,
    /// pinned to the commit.
    pub fn flake_url_at(&self, commit: &str) -> String {
        let mut url = if self.mirrored {
            format!("git+file://{}?ref=refs/fleetcache/{commit}&rev={commit}", self.git_dir.display())
        } else {
            format!("git+file://{}?rev={commit}&allRefs=1", self.git_dir.display())
        };
        if let Some(dir) = &self.subdir {
            url.push_str(&format!("&dir={dir}"));
        }
        url
    }

    /// The flake URL a builder agent evaluates for `commit`: the repository as given, pinned
    /// (a local checkout is only reachable by builders on this machine or a shared filesystem).
    pub fn builder_flake_url(&self, commit: &str) -> String {
        if !self.mirrored {
            return self.flake_url_at(commit);
        }
        let (base, _) = split_query(&self.reference).unwrap_or((self.reference.as_str(), None));
        let mut url = match base.strip_prefix("github:").or_else(|| base.strip_prefix("gitlab:")) {
            Some(rest) => {
                format!("{}:{}/{commit}", &base[..base.len() - rest.len() - 1], rest.trim_end_matches('/'))
            }
            None => format!("{base}?rev={commit}"),
        };
        if let Some(dir) = &self.subdir {
            url.push_str(if url.contains('?') { "&" } else { "?" });
            url.push_str(&format!("dir={dir}"));
        }
        url
    }

    /// Brings a mirror up to date with its remote (a local checkout needs nothing).
    pub fn fetch(&self) -> Result<(), FlakeError> {
        if self.mirrored {
            git(&self.git_dir, &["fetch", "--quiet", "--prune", "origin"], || {
                format!("fetching {}", self.reference)
            })?;
        }
        Ok(())
    }

    /// Whether `flake.lock` differs between two commits (as data: formatting does not count).
    /// A `before` that is all zeros (a new branch) or unknown here (history rewritten) counts
    /// as changed, and so does a lock that appears or disappears.
    pub fn lock_changed(&self, before: &str, after: &str) -> Result<bool, FlakeError> {
        let after = self.resolve(after)?;
        let Ok(before) = self.resolve(before) else { return Ok(true) };
        let read = |commit: &str| -> Option<serde_json::Value> {
            let file = match &self.subdir {
                Some(d) => format!("{commit}:{}/flake.lock", d.trim_end_matches('/')),
                None => format!("{commit}:flake.lock"),
            };
            let text = git(&self.git_dir, &["show", &file], String::new).ok()?;
            serde_json::from_str(&text).ok()
        };
        Ok(read(&before) != read(&after))
    }

    /// The root inputs `flake.lock` pins at `commit`, by name.
    pub fn locked_inputs(&self, commit: &str) -> Result<BTreeMap<String, LockedInput>, FlakeError> {
        let file = match &self.subdir {
            Some(d) => format!("{commit}:{}/flake.lock", d.trim_end_matches('/')),
            None => format!("{commit}:flake.lock"),
        };
        let text = git(&self.git_dir, &["show", &file], || format!("reading {file}")).map_err(|e| {
            FlakeError::Lock {
                rev: commit.to_owned(),
                message: format!("no flake.lock is committed ({e}); run `nix flake lock` and commit it"),
            }
        })?;
        parse_lock(&text).map_err(|message| FlakeError::Lock { rev: commit.to_owned(), message })
    }
}

/// Splits `?dir=…` off a flake reference; other parameters are refused (we pick the revision).
fn split_query(reference: &str) -> Result<(&str, Option<String>), FlakeError> {
    let Some((base, query)) = reference.split_once('?') else { return Ok((reference, None)) };
    let mut dir = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("dir", d)) if !d.is_empty() && !d.split('/').any(|c| c == "..") => dir = Some(d.to_owned()),
            _ => {
                return Err(FlakeError::Reference(
                    reference.to_owned(),
                    format!("parameter {pair:?} is not supported (only dir=; the revision comes from --rev)"),
                ));
            }
        }
    }
    Ok((base, dir))
}

/// Reads the root inputs of a `flake.lock` (version 7), following `follows` paths.
pub fn parse_lock(text: &str) -> Result<BTreeMap<String, LockedInput>, String> {
    let lock: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("flake.lock is not JSON: {e}"))?;
    let nodes = lock.get("nodes").and_then(|n| n.as_object()).ok_or("flake.lock has no nodes")?;
    let root_name = lock.get("root").and_then(|r| r.as_str()).unwrap_or("root");
    let root = nodes.get(root_name).ok_or("flake.lock has no root node")?;
    let mut inputs = BTreeMap::new();
    let Some(root_inputs) = root.get("inputs").and_then(|i| i.as_object()) else { return Ok(inputs) };
    for (name, target) in root_inputs {
        let node_name = resolve_input(nodes, root_name, target, 0)
            .ok_or_else(|| format!("flake.lock: input {name:?} points at no node"))?;
        let node = &nodes[&node_name];
        let locked = node.get("locked").cloned().unwrap_or_default();
        let field = |k: &str| locked.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        inputs.insert(
            name.clone(),
            LockedInput {
                name: name.clone(),
                rev: field("rev"),
                source: describe_source(&locked),
                nar_hash: field("narHash"),
            },
        );
    }
    Ok(inputs)
}

/// The node an input names: a node name, or a `follows` path from the root.
fn resolve_input(
    nodes: &serde_json::Map<String, serde_json::Value>,
    root: &str,
    target: &serde_json::Value,
    depth: usize,
) -> Option<String> {
    if depth > 32 {
        return None;
    }
    match target {
        serde_json::Value::String(node) => nodes.contains_key(node).then(|| node.clone()),
        serde_json::Value::Array(path) => {
            let mut current = root.to_owned();
            for step in path {
                let next = nodes.get(&current)?.get("inputs")?.get(step.as_str()?)?;
                current = resolve_input(nodes, root, next, depth + 1)?;
            }
            Some(current)
        }
        _ => None,
    }
}

fn describe_source(locked: &serde_json::Value) -> String {
    let field = |k: &str| locked.get(k).and_then(|v| v.as_str()).unwrap_or("");
    match field("type") {
        "github" | "gitlab" | "sourcehut" => {
            format!("{}:{}/{}", field("type"), field("owner"), field("repo"))
        }
        "git" => format!("git+{}", field("url")),
        "path" => format!("path:{}", field("path")),
        "" => "unknown".to_owned(),
        other => format!("{other}:{}", field("url")),
    }
}

/// Hex of a SHA-256, for naming mirrors.
fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: &str = r#"{
  "nodes": {
    "llama-cpp": {
      "inputs": { "flake-parts": "flake-parts", "nixpkgs": ["nixpkgs"] },
      "locked": { "lastModified": 1, "narHash": "sha256-L", "owner": "ggml-org", "repo": "llama.cpp",
                  "rev": "aaaa", "type": "github" },
      "original": { "owner": "ggml-org", "repo": "llama.cpp", "type": "github" }
    },
    "flake-parts": { "locked": { "type": "github", "owner": "hercules-ci", "repo": "flake-parts", "rev": "cccc" } },
    "nixpkgs": {
      "locked": { "lastModified": 2, "narHash": "sha256-N", "rev": "bbbb", "type": "git",
                  "url": "file:///srv/nixpkgs" },
      "original": { "type": "git", "url": "file:///srv/nixpkgs" }
    },
    "root": { "inputs": { "llama-cpp": "llama-cpp", "nixpkgs": "nixpkgs", "parts": ["llama-cpp", "flake-parts"] } }
  },
  "root": "root",
  "version": 7
}"#;

    #[test]
    fn lock_inputs_and_follows() {
        let inputs = parse_lock(LOCK).unwrap();
        assert_eq!(inputs["nixpkgs"].rev.as_deref(), Some("bbbb"));
        assert_eq!(inputs["nixpkgs"].source, "git+file:///srv/nixpkgs");
        assert_eq!(inputs["llama-cpp"].source, "github:ggml-org/llama.cpp");
        assert_eq!(inputs["llama-cpp"].nar_hash.as_deref(), Some("sha256-L"));
        assert_eq!(inputs["parts"].rev.as_deref(), Some("cccc"), "a follows path is resolved");
    }

    #[test]
    fn broken_locks_are_errors() {
        assert!(parse_lock("not json").unwrap_err().contains("not JSON"));
        assert!(parse_lock("{}").unwrap_err().contains("no nodes"));
        let dangling = r#"{"nodes":{"root":{"inputs":{"x":"nope"}}},"root":"root","version":7}"#;
        assert!(parse_lock(dangling).unwrap_err().contains("\"x\" points at no node"));
        let cycle = r#"{"nodes":{"root":{"inputs":{"x":["x"]}}},"root":"root","version":7}"#;
        assert!(parse_lock(cycle).is_err());
    }

    #[test]
    fn references() {
        assert_eq!(split_query("/srv/fleet").unwrap(), ("/srv/fleet", None));
        assert_eq!(split_query("/srv/fleet?dir=hosts").unwrap(), ("/srv/fleet", Some("hosts".to_owned())));
        assert!(split_query("/srv/fleet?rev=abc").is_err());
        assert!(split_query("/srv/fleet?dir=../x").is_err());
        let tmp = tempfile::tempdir().unwrap();
        let err = FleetRepo::open(&tmp.path().display().to_string(), tmp.path()).unwrap_err();
        assert!(err.to_string().contains("is not a git repository"), "{err}");
        let err = FleetRepo::open("ftp://x/y", tmp.path()).unwrap_err();
        assert!(err.to_string().contains("git+https://"), "{err}");
        let err = FleetRepo::open("git+file:///nonexistent/fleet", tmp.path()).unwrap_err();
        assert!(err.to_string().contains("cloning file:///nonexistent/fleet"), "{err}");
    }
}
