//! The fleetcache test harness: real `nix`, a real S3 server (Garage) and the real binaries.
//!
//! - [`nixos`]: the flake, overlay and NixOS modules evaluated offline with stand-ins.
//! - [`nix`]: run the real Nix with the configuration this environment needs, build tiny
//!   fixture derivations, and make throw-away stores that play "a fleet machine".
//! - [`garage`]: a fresh bucket on a real Garage server in one call.
//! - [`process`]: child processes that are stopped with SIGTERM when dropped, and readiness
//!   polling that notices a child that died.
//! - [`fleet`]: an offline stand-in fleet (nixpkgs, llama.cpp and fleet flakes in local git).
//! - [`orchestrator`]: the real `orchestrator` with its own home, and its output parsed.
//! - [`serve`]: `orchestrator serve` and `builder` agents as processes.
//! - [`postgres`]: a throw-away PostgreSQL cluster (Debian's package).
//! - [`cache_server`]: the real `cache-server` on a free port with a fresh key and token.
//! - [`tls`]: a private CA (openssl) and nginx terminating TLS in front of our servers.
//! - [`forge`]: GitHub-shaped push events and a recording stand-in for commit-status APIs.
//! - [`bin`]: where the workspace's binaries are.

pub mod browser;
pub mod cache_server;
pub mod fleet;
pub mod forge;
pub mod garage;
pub mod nix;
pub mod nixos;
pub mod orchestrator;
pub mod postgres;
pub mod process;
pub mod serve;
pub mod tls;

use std::path::PathBuf;

/// Path of a workspace binary (`orchestrator`, `cache-server`, `builder`).
///
/// Found beside the test executable's `deps/` directory, where `cargo test --workspace` and
/// `cargo nextest run --workspace` build them, or in `$FLEETCACHE_BIN_DIR`. Panics with what to
/// do when it is missing, rather than skipping the test.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("FLEETCACHE_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            let deps = exe.parent().expect("test binary has a directory");
            deps.parent().expect("deps/ has a parent").to_owned()
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build the workspace binaries first (`cargo build --workspace --bins`, which scripts/test does) or set FLEETCACHE_BIN_DIR",
        path.display()
    );
    path
}
