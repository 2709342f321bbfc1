//! An offline stand-in fleet: three local git repositories used as flakes.
//!
//! - `nixpkgs`: `legacyPackages.x86_64-linux.{version, mkLlama, ggml-common}`, a derivation
//!   builder whose every path carries the fixture's nonce and the version string, so each
//!   fixture's paths are new to the store and a version bump changes every derivation;
//! - `llama.cpp`: `packages.x86_64-linux.{default, cuda, vulkan, broken}`, shaped like the real
//!   ones (`bin/llama-cli`, `lib/libggml-cuda.so`, `lib/libggml-vulkan.so`) and all referring to a
//!   shared `ggml-common`; `broken` prints a few lines and fails;
//! - the fleet: `llama-cpp.inputs.nixpkgs.follows = "nixpkgs"`, locked with `nix flake lock`.
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
    run(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=fleetcache tests", "-c", "user.email=tests@fleetcache.invalid"])
        .args(args))
}

fn nixpkgs_flake(nonce: &str, version: &str) -> String {
    format!(
        r#"{{
  description = "stand-in nixpkgs for fleetcache tests";
  outputs = {{ self }}: let
    system = "x86_64-linux";
    version = "{version}";
    mk = {{ name, script, deps ? [ ] }}: derivation {{
      inherit name system deps;
      builder = "/bin/sh";
      args = [ "-c" script ];
      PATH = "/usr/bin:/bin";
      nonce = "{nonce}";
      nixpkgsVersion = version;
    }};
  in {{
    legacyPackages.${{system}} = rec {{
      inherit version;
      ggml-common = mk {{
        name = "ggml-common-${{version}}";
        script = "mkdir -p $out/share && echo 'ggml common data ${{version}}' > $out/share/ggml.txt";
      }};
      mkLlama = {{ variant, libs, hold, fail ? false }}: mk {{
        name = "llama-cpp-${{variant}}-${{version}}";
        deps = [ ggml-common ];
        script = ''
          echo "configuring llama.cpp ${{variant}} against nixpkgs ${{version}}"
          while [ -e ${{hold}} ]; do sleep 0.1; done
          ${{if fail then ''echo "compiling ggml-${{variant}}: error: this variant is broken"; exit 1'' else ""}}
          mkdir -p $out/bin $out/lib
          printf '#!/bin/sh\necho "llama-cli ${{variant}} (nixpkgs ${{version}})"\ncat ${{ggml-common}}/share/ggml.txt\n' > $out/bin/llama-cli
          chmod +x $out/bin/llama-cli
          for l in ${{toString libs}}; do echo "$l for ${{variant}}" > $out/lib/$l; done
          echo "built llama.cpp ${{variant}}"
        '';
      }};
    }};
  }};
}}
"#
    )
}

fn llama_flake(nixpkgs: &Path, hold: &Path) -> String {
    format!(
        r#"{{
  description = "stand-in llama.cpp for fleetcache tests";
  inputs.nixpkgs.url = "git+file://{nixpkgs}";
  outputs = {{ self, nixpkgs }}: let
    pkgs = nixpkgs.legacyPackages.x86_64-linux;
    mk = args: pkgs.mkLlama ({{ hold = "{hold}"; }} // args);
  in {{
    packages.x86_64-linux = {{
      default = mk {{ variant = "cpu"; libs = [ "libggml-cpu.so" ]; }};
      cuda = mk {{ variant = "cuda"; libs = [ "libggml-cpu.so" "libggml-cuda.so" ]; }};
      vulkan = mk {{ variant = "vulkan"; libs = [ "libggml-cpu.so" "libggml-vulkan.so" ]; }};
      broken = mk {{ variant = "broken"; libs = [ ]; fail = true; }};
    }};
  }};
}}
"#,
        nixpkgs = nixpkgs.display(),
        hold = hold.display(),
    )
}

fn fleet_flake(nixpkgs: &Path, llama: &Path) -> String {
    format!(
        r#"{{
  description = "stand-in fleet for fleetcache tests";
  inputs.nixpkgs.url = "git+file://{nixpkgs}";
  inputs.llama-cpp = {{ url = "git+file://{llama}"; inputs.nixpkgs.follows = "nixpkgs"; }};
  outputs = {{ self, nixpkgs, llama-cpp }}: {{ }};
}}
"#,
        nixpkgs = nixpkgs.display(),
        llama = llama.display(),
    )
}

impl Fleet {
    /// Creates the three repositories, locks the fleet and commits the lock on `main`.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("fleetcache-fleet-").tempdir().expect("tempdir");
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("randomness");
        let nonce: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let (nixpkgs, llama, fleet) =
            (dir.path().join("nixpkgs"), dir.path().join("llama.cpp"), dir.path().join("fleet"));
        let hold = dir.path().join("hold");
        let init = |repo: &Path, file: &str, text: String| {
            std::fs::create_dir_all(repo).expect("mkdir");
            git(repo, &["init", "-q", "-b", "main"]);
            std::fs::write(repo.join(file), text).expect("write flake");
            git(repo, &["add", "."]);
            git(repo, &["commit", "-q", "-m", "init"]);
        };
        init(&nixpkgs, "flake.nix", nixpkgs_flake(&nonce, "1"));
        init(&llama, "flake.nix", llama_flake(&nixpkgs, &hold));
        // llama.cpp's own lock pins the same stand-in nixpkgs (the fleet overrides it anyway).
        run(command("nix").current_dir(&llama).args(["flake", "lock"]));
        git(&llama, &["add", "flake.lock"]);
        git(&llama, &["commit", "-q", "-m", "lock"]);
        init(&fleet, "flake.nix", fleet_flake(&nixpkgs, &llama));
        let f = Fleet { dir, nixpkgs, llama, fleet, nonce };
        f.relock(&["flake", "lock"], "lock");
        f
    }

    fn relock(&self, args: &[&str], message: &str) -> String {
        run(command("nix").current_dir(&self.fleet).args(args));
        git(&self.fleet, &["add", "flake.lock"]);
        git(&self.fleet, &["commit", "-q", "-m", message]);
        self.head()
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
        std::fs::write(self.nixpkgs.join("flake.nix"), nixpkgs_flake(&self.nonce, version)).expect("write");
        git(&self.nixpkgs, &["commit", "-q", "-am", &format!("version {version}")]);
        self.relock(&["flake", "lock", "--update-input", "nixpkgs"], &format!("nixpkgs {version}"))
    }

    /// Commits a change to a file no variant reads; returns the fleet commit.
    pub fn commit_unrelated(&self, text: &str) -> String {
        std::fs::write(self.fleet.join("README.md"), text).expect("write");
        git(&self.fleet, &["add", "README.md"]);
        git(&self.fleet, &["commit", "-q", "-m", "docs"]);
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
