//! fleetcache's Nix code (flake outputs, overlay, NixOS modules) evaluated offline by the real
//! `nix` with `fixtures/nixos/eval.nix`: the stand-in nixpkgs library and NixOS options in
//! `fixtures/nixos/`, the stand-in fleet's nixpkgs and llama.cpp flakes, and a package whose
//! programs are the binaries under test (so the modules' build-time `check-config` runs them).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::fleet::Fleet;
use crate::nix::{command, fixtures_dir};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
}

/// A test bench: a stand-in fleet and the expression that loads `eval.nix` for it.
pub struct Bench {
    /// The stand-in fleet whose nixpkgs and llama.cpp the Nix code is evaluated with.
    pub fleet: Fleet,
}

impl Default for Bench {
    fn default() -> Self {
        Self::new()
    }
}

impl Bench {
    /// A new bench on a new stand-in fleet.
    pub fn new() -> Self {
        Bench { fleet: Fleet::new() }
    }

    /// `eval.nix` applied to this bench, for `system`.
    fn prelude(&self, system: &str) -> String {
        let bin_dir = crate::bin("orchestrator").parent().expect("bin dir").display().to_string();
        format!(
            "let t = import {eval} {{ repo = {repo:?}; binDir = {bin_dir:?}; \
             nixpkgsUrl = \"git+file://{nixpkgs}\"; llamaUrl = \"git+file://{llama}\"; system = {system:?}; }}; in ",
            eval = fixtures_dir().join("nixos/eval.nix").display(),
            repo = repo_root().display().to_string(),
            nixpkgs = self.fleet.nixpkgs.display(),
            llama = self.fleet.llama.display(),
        )
    }

    /// Evaluates `body` (which may use `t`, the bench) to JSON, or returns Nix's error.
    pub fn try_eval_on(&self, system: &str, body: &str) -> Result<Value, String> {
        let expr = format!("{}{body}", self.prelude(system));
        let out = command("nix")
            .args(["eval", "--json", "--impure", "--expr", &expr])
            .output()
            .expect("run nix eval");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).expect("nix eval --json prints JSON"))
    }

    /// Evaluates `body` on x86_64-linux; panics with Nix's error if it fails.
    pub fn eval(&self, body: &str) -> Value {
        self.try_eval_on("x86_64-linux", body).unwrap_or_else(|e| panic!("evaluating {body}:\n{e}"))
    }

    /// Evaluates `body` on x86_64-linux, expecting an error; returns it.
    pub fn eval_error(&self, body: &str) -> String {
        match self.try_eval_on("x86_64-linux", body) {
            Ok(v) => panic!("evaluating {body} succeeded with {v}, expected an error"),
            Err(e) => e,
        }
    }

    /// Builds a derivation (by its .drv path) and everything it needs; Nix's log on failure.
    pub fn realise(&self, drv: &str) -> Result<String, String> {
        let out = command("nix-store").args(["--realise", drv]).output().expect("run nix-store");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

/// The configuration file a service's `ExecStart` names after `--config`.
pub fn config_file_of(exec_start: &str) -> PathBuf {
    let mut words = exec_start.split_whitespace();
    words.find(|w| *w == "--config").expect("ExecStart has --config");
    PathBuf::from(words.next().expect("a file after --config"))
}
