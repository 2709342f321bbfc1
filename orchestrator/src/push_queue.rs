//! The push queue: what a machine builds reaches the cache without anyone running a push.
//!
//! Nix's `post-build-hook` runs `orchestrator hook`, which writes the built paths (`$OUT_PATHS`)
//! into a file in the queue directory and returns at once (Nix waits for the hook, so it must
//! not upload). `orchestrator push --from-queue DIR` (with `--watch`, as a service) pushes
//! what is queued with the ordinary push pipeline and removes a file only once every path in it
//! is in the cache, so a push that fails — the cache down, the machine rebooted — is retried on
//! the pusher's next round or start. A file whose paths the cache refuses (a NAR that does not
//! match its hash: a corrupted store) would fail the same way for ever: it moves to `refused/`
//! in the queue with a `.why` beside it, and moving it back queues it again. Files are written
//! under a temporary name and renamed, so a pusher never reads half a file.

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

/// Where refused files go, inside the queue directory.
pub const REFUSED: &str = "refused";

/// One queued file and its store paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// The queue file.
    pub file: PathBuf,
    /// The store paths in it.
    pub paths: Vec<String>,
}

/// Reads everything queued in `dir`, oldest first (none if it does not exist).
pub fn pending(dir: &Path) -> io::Result<Vec<Queued>> {
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
    let mut queued = Vec::new();
    for file in files {
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            // Taken by another pusher meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let paths = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
        queued.push(Queued { file, paths });
    }
    Ok(queued)
}

/// Removes a queued file once its paths are in the cache.
pub fn done(queued: &Queued) -> io::Result<()> {
    match fs::remove_file(&queued.file) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Moves a queued file the cache refused into `refused/` beside it, with `why` (one reason per
/// line) in a `.why` file of the same name; returns where it went.
pub fn refuse(queued: &Queued, why: &[String]) -> io::Result<PathBuf> {
    let dir = queued.file.parent().unwrap_or(Path::new(".")).join(REFUSED);
    fs::create_dir_all(&dir)?;
    let name = queued.file.file_name().unwrap_or_default();
    let to = dir.join(name);
    let mut text = why.join("\n");
    text.push('\n');
    fs::write(to.with_extension("why"), text)?;
    fs::rename(&queued.file, &to)?;
    Ok(to)
}

/// The files in `refused/` of the queue `dir`, oldest first, each with its `.why` (empty if
/// that is missing).
pub fn refused(dir: &Path) -> io::Result<Vec<(Queued, String)>> {
    let mut out = Vec::new();
    for queued in pending(&dir.join(REFUSED))? {
        let why = match fs::read_to_string(queued.file.with_extension("why")) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        out.push((queued, why));
    }
    Ok(out)
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
    fn queued_files_come_back_in_order_until_done_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("queue");
        assert_eq!(pending(&q).unwrap(), [], "no directory is an empty queue");
        let a = enqueue(&q, &["/nix/store/a".into(), "/nix/store/b".into()]).unwrap();
        let b = enqueue(&q, &["/nix/store/b".into(), "/nix/store/c".into()]).unwrap();
        fs::write(q.join(".half-written.tmp"), "/nix/store/x\n").unwrap();
        let queued = pending(&q).unwrap();
        let files: Vec<&PathBuf> = queued.iter().map(|f| &f.file).collect();
        assert_eq!(files, [&a, &b]);
        assert_eq!(queued[0].paths, ["/nix/store/a", "/nix/store/b"]);
        assert_eq!(queued[1].paths, ["/nix/store/b", "/nix/store/c"]);

        done(&queued[0]).unwrap();
        let moved = refuse(&queued[1], &["/nix/store/c: bad".into(), "/nix/store/b: worse".into()]).unwrap();
        assert_eq!(pending(&q).unwrap(), [], "a refused file is no longer queued");
        assert_eq!(moved, q.join(REFUSED).join(b.file_name().unwrap()));
        assert_eq!(fs::read_to_string(&moved).unwrap(), "/nix/store/b\n/nix/store/c\n");
        let why = fs::read_to_string(moved.with_extension("why")).unwrap();
        assert_eq!(why, "/nix/store/c: bad\n/nix/store/b: worse\n");
        assert_eq!(
            refused(&q).unwrap(),
            [(Queued { file: moved.clone(), paths: queued[1].paths.clone() }, why)]
        );

        // Moved back, it is queued again.
        fs::rename(&moved, &b).unwrap();
        assert_eq!(pending(&q).unwrap(), [queued[1].clone()]);
        assert_eq!(refused(&q).unwrap(), []);
    }
}
