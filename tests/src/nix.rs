//! The real Nix, configured for this environment (single-user, offline, no sandbox).

use std::path::{Path, PathBuf};
use std::process::Command;

use nix_formats::StorePath;
use serde_json::Value;
use tempfile::TempDir;

/// The `NIX_CONFIG` every Nix command in the tests runs with: no sandbox and no build users
/// (Debian's single-user `nix-bin` as root), the new CLI and flakes, and no substituters (there
/// is no network to reach cache.nixos.org).
///
/// The narinfo disk cache TTLs are 0 because every test server is a new cache on a port an
/// earlier one may have used, and because `nix copy --to http://…` records the narinfo it
/// *uploaded* (unsigned) in that cache, which a later `nix copy --from` of the same URL would
/// believe for 30 days instead of fetching the signed one the server published.
pub const NIX_CONFIG: &str = "sandbox = false\nbuild-users-group =\n\
    experimental-features = nix-command flakes\nsubstituters =\n\
    narinfo-cache-negative-ttl = 0\nnarinfo-cache-positive-ttl = 0\n";

/// A command for a Nix program (`nix`, `nix-store`, `nix-build`) with [`NIX_CONFIG`].
pub fn command(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("NIX_CONFIG", NIX_CONFIG);
    c
}

/// Runs `cmd`, panics with its stderr if it fails, returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is nix installed? scripts/test installs it): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs `cmd`, panics if it *succeeds*, returns its stderr.
pub fn run_expecting_failure(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(!out.status.success(), "{cmd:?} succeeded but should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The directory of the bundled fixture expressions.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Builds `fixtures/closure.nix` with the given arguments and returns the top path.
///
/// `nonce` makes the paths unique to the caller; `count` leaves; `big_mib` adds a path with one
/// large file.
pub fn build_closure(nonce: &str, count: u32, big_mib: u32) -> StorePath {
    let out = run(command("nix-build")
        .arg(fixtures_dir().join("closure.nix"))
        .args(["--no-out-link", "--argstr", "nonce", nonce])
        .args(["--arg", "count", &count.to_string(), "--arg", "bigMiB", &big_mib.to_string()]));
    StorePath::from_absolute(out.trim()).expect("nix-build prints a store path")
}

/// `nix path-info --json` of `paths` (with `--recursive` when `recursive`), as a list of objects
/// with a `path` each: Nix before 2.19 prints that; later ones an object keyed by path, which
/// is turned into it.
pub fn path_info(paths: &[&StorePath], recursive: bool) -> Vec<Value> {
    let mut c = command("nix");
    c.arg("path-info").args(builder::nix::path_info_json());
    if recursive {
        c.arg("--recursive");
    }
    c.args(paths.iter().map(|p| p.to_absolute()));
    match serde_json::from_str(&run(&mut c)).expect("path-info prints JSON") {
        Value::Array(list) => list,
        Value::Object(map) => map
            .into_iter()
            .map(|(path, mut info)| {
                info["path"] = Value::String(path);
                info
            })
            .collect(),
        other => panic!("path-info printed {other}"),
    }
}

/// Whether `stderr` is Nix refusing a path for its signatures (Nix 2.8: "lacks a valid
/// signature"; later: "lacks a signature by a trusted key").
pub fn refused_for_signature(stderr: &str) -> bool {
    stderr.contains("lacks a valid signature") || stderr.contains("lacks a signature by a trusted key")
}

/// The closure of `path`, as store paths.
pub fn closure(path: &StorePath) -> Vec<StorePath> {
    path_info(&[path], true)
        .iter()
        .map(|i| StorePath::from_absolute(i["path"].as_str().expect("path field")).expect("valid path"))
        .collect()
}

/// A throw-away Nix store in a temporary directory: "a fleet machine" that starts empty.
pub struct TempStore {
    dir: TempDir,
}

impl Default for TempStore {
    fn default() -> Self {
        Self::new()
    }
}

impl TempStore {
    /// An empty store.
    pub fn new() -> Self {
        TempStore { dir: tempfile::Builder::new().prefix("fleetcache-store-").tempdir().expect("tempdir") }
    }

    /// The store URL to pass to `--store` or `nix copy --to` (a local chroot store).
    pub fn url(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// `nix copy --from <from> --to <this store> <paths>`, requiring signatures by `trusted_key`.
    /// Returns the command to run, so the caller can expect success or failure.
    pub fn copy_from(&self, from: &str, trusted_key: &str, paths: &[&StorePath]) -> Command {
        let mut c = command("nix");
        c.args(["copy", "--from", from, "--to", &self.url()])
            .args(["--option", "trusted-public-keys", trusted_key, "--option", "require-sigs", "true"])
            .args(paths.iter().map(|p| p.to_absolute()));
        c
    }

    /// `nix copy --from <from> --to <this store> <path>` with `conf_dir` as Nix's configuration
    /// directory and nothing else set (but the nix-command feature and no build users): what a
    /// machine with that nix.conf does.
    pub fn copy_with_nix_conf(&self, conf_dir: &Path, from: &str, path: &StorePath) -> Command {
        let mut c = Command::new("nix");
        c.args(["copy", "--from", from, "--to", &self.url(), &path.to_absolute()])
            .env("NIX_CONF_DIR", conf_dir)
            .env("NIX_CONFIG", "experimental-features = nix-command\nbuild-users-group =\n");
        c
    }

    /// True if `path` is valid (registered and present) in this store.
    pub fn has(&self, path: &StorePath) -> bool {
        command("nix")
            .args(["path-info", "--store", &self.url(), &path.to_absolute()])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Where `path`'s files are on disk.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        self.dir.path().join(path.to_absolute().trim_start_matches('/'))
    }
}
