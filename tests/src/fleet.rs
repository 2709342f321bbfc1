//! An offline stand-in fleet: three local git repositories used as flakes, made by
//! `fixtures/fleet/stand-in-fleet` (which scripts/demo uses too) from the templates beside it.
//!
//! - `nixpkgs`: `legacyPackages.x86_64-linux.{version, mkLlama, ggml-common}`, a derivation
//!   builder whose every path carries the fixture's nonce and the version string, so each
//!   fixture's paths are new to the store and a version bump changes every derivation;
//! - `llama.cpp`: `packages.x86_64-linux.{default, cuda, vulkan, broken}`, shaped like the real
//!   ones (`bin/llama-cli`, `lib/libggml-cuda.so`, `lib/libggml-vulkan.so`) and all referring to a
//!   shared `ggml-common`; `broken` prints a few lines and fails;
//! - `fleetcache`: a copy of this repository's Nix code (flake, overlay, modules);
//! - the fleet: `llama-cpp.inputs.nixpkgs.follows = "nixpkgs"`, locked with `nix flake lock`, and
//!   machines that use the client module: carbon (cuda), beryllium and boron (cpu), nitrogen
//!   (vulkan) and gateway (no client).
//!
//! Builds wait while the fixture's hold file exists, so a test can keep a build running for as
//! long as it needs ([`Fleet::hold_builds`], [`Fleet::release_builds`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::nix::{command, run};

/// The stand-in fleet's repositories.
pub struct Fleet {
    dir: TempDir,
    /// The stand-in nixpkgs repository.
    pub nixpkgs: PathBuf,
    /// The stand-in llama.cpp repository.
    pub llama: PathBuf,
    /// The fleet repository (branch `main`).
    pub fleet: PathBuf,
    nonce: String,
}

fn git(dir: &Path, args: &[&str]) -> String {
    run(Command::new("git").arg("-C").arg(dir).args(args))
}

fn stand_in_fleet(args: &[&str], dir: &Path) -> String {
    let script = crate::nix::fixtures_dir().join("fleet/stand-in-fleet");
    run(command(script.to_str().expect("utf-8 path")).arg(args[0]).arg(dir).args(&args[1..]))
}

impl Fleet {
    /// Creates the three repositories, locks the fleet and commits the lock on `main`.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("fleetcache-fleet-").tempdir().expect("tempdir");
        stand_in_fleet(&["create"], dir.path());
        let nonce = std::fs::read_to_string(dir.path().join("nonce")).expect("nonce").trim().to_owned();
        let (nixpkgs, llama, fleet) =
            (dir.path().join("nixpkgs"), dir.path().join("llama.cpp"), dir.path().join("fleet"));
        Fleet { dir, nixpkgs, llama, fleet, nonce }
    }

    /// The fleet's current commit.
    pub fn head(&self) -> String {
        git(&self.fleet, &["rev-parse", "HEAD"]).trim().to_owned()
    }

    /// The nonce in every path of this fixture.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// Commits a new nixpkgs version and updates the fleet's lock to it; returns the fleet commit.
    pub fn bump_nixpkgs(&self, version: &str) -> String {
        stand_in_fleet(&["bump-nixpkgs", version], self.dir.path());
        self.head()
    }

    /// Commits a change to a file no variant reads; returns the fleet commit.
    pub fn commit_unrelated(&self, text: &str) -> String {
        stand_in_fleet(&["touch-readme", text], self.dir.path());
        self.head()
    }

    /// The locked revision of a fleet input at `commit` (`nixpkgs`, `llama-cpp`).
    pub fn locked_rev(&self, commit: &str, input: &str) -> String {
        let lock: serde_json::Value =
            serde_json::from_str(&git(&self.fleet, &["show", &format!("{commit}:flake.lock")]))
                .expect("lock JSON");
        lock["nodes"][input]["locked"]["rev"].as_str().expect("locked rev").to_owned()
    }

    /// From now on builds wait (after printing their first line) until [`Fleet::release_builds`].
    pub fn hold_builds(&self) {
        std::fs::write(self.dir.path().join("hold"), b"").expect("hold file");
    }

    /// Lets held builds finish.
    pub fn release_builds(&self) {
        let _ = std::fs::remove_file(self.dir.path().join("hold"));
    }

    /// Commits `machines` (a Nix attribute set of machine name -> list of NixOS modules, beside
    /// or instead of the fixture's carbon, beryllium, boron, nitrogen and gateway) as the
    /// fleet's `machines.nix`; returns the fleet commit.
    pub fn set_machines(&self, machines: &str) -> String {
        let file = self.dir.path().join("machines.nix.new");
        std::fs::write(&file, machines).expect("machines file");
        stand_in_fleet(&["add-machines", file.to_str().expect("utf-8 path")], self.dir.path());
        self.head()
    }

    /// A scratch directory inside the fixture.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}
