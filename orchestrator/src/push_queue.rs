//! The push queue: what a machine builds reaches the cache without anyone running a push.
//!
//! Nix's `post-build-hook` runs `orchestrator hook`, which writes the built paths (`$OUT_PATHS`)
//! into a file in the queue directory and returns at once (Nix waits for the hook, so it must
//! not upload). `orchestrator push --from-queue DIR` (with `--watch`, as a service) pushes
//! what is queued with the ordinary push pipeline and removes a file only once every path in it
//! is in the cache, so a push that fails — the cache down, the machine rebooted — is retried on
//! the pusher's next round or start. Files are written under a temporary name and renamed, so a
//! pusher never reads half a file.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where queued files end.
const SUFFIX: &str = ".paths";

/// The queue directory unless told: `/var/lib/fleetcache-push/queue` for root (the Nix daemon
/// runs hooks as root), `$XDG_STATE_HOME/fleetcache/push-queue` for anyone else.
pub fn default_dir() -> Result<PathBuf, String> {
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/fleetcache-push/queue"));
    }
    Ok(crate::config::xdg_dir("XDG_STATE_HOME", ".local/state")?.join("push-queue"))
}

/// Queues `paths` (store paths, one batch); returns the file written.
pub fn enqueue(dir: &Path, paths: &[String]) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let name = format!("{:020}-{}", now.as_nanos(), std::process::id());
    let temp = dir.join(format!(".{name}.tmp"));
    let file = dir.join(format!("{name}{SUFFIX}"));
    let mut f = fs::File::create(&temp)?;
    for p in paths {
        writeln!(f, "{p}")?;
    }
    f.sync_all()?;
    fs::rename(&temp, &file)?;
    Ok(file)
}

/// What is queued now: the files, oldest first, and their paths (each once).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// The queue files.
    pub files: Vec<PathBuf>,
    /// The store paths in them.
    pub paths: Vec<String>,
}

/// Reads everything queued in `dir` (none if it does not exist).
pub fn pending(dir: &Path) -> io::Result<Batch> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(SUFFIX) && !n.starts_with('.'))
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    files.sort();
    let mut batch = Batch::default();
    for file in files {
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            // Taken by another pusher meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if !batch.paths.iter().any(|p| p == line) {
                batch.paths.push(line.to_owned());
            }
        }
        batch.files.push(file);
    }
    Ok(batch)
}

/// Removes a batch's files once its paths are in the cache.
pub fn done(batch: &Batch) -> io::Result<()> {
    for f in &batch.files {
        match fs::remove_file(f) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// What Nix gives a post-build hook: the paths `$OUT_PATHS` names (space-separated), or when it
/// is empty (Nix 2.8 sets it empty) the derivation `$DRV_PATH`, whose outputs the pusher finds.
pub fn built_paths_from_env() -> Vec<String> {
    let outputs: Vec<String> =
        std::env::var("OUT_PATHS").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
    if !outputs.is_empty() {
        return outputs;
    }
    std::env::var("DRV_PATH").ok().filter(|d| !d.is_empty()).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_paths_come_back_once_in_order_until_done() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("queue");
        assert_eq!(pending(&q).unwrap(), Batch::default(), "no directory is an empty queue");
        let a = enqueue(&q, &["/nix/store/a".into(), "/nix/store/b".into()]).unwrap();
        let b = enqueue(&q, &["/nix/store/b".into(), "/nix/store/c".into()]).unwrap();
        fs::write(q.join(".half-written.tmp"), "/nix/store/x\n").unwrap();
        let batch = pending(&q).unwrap();
        assert_eq!(batch.files, vec![a, b]);
        assert_eq!(batch.paths, ["/nix/store/a", "/nix/store/b", "/nix/store/c"]);
        done(&batch).unwrap();
        assert_eq!(pending(&q).unwrap(), Batch::default());
    }
}
