//! The `cache-server` command: fleetcache's Nix binary cache (substituter and upload endpoint).

use std::process::ExitCode;

use clap::Parser;

/// fleetcache cache-server: serves a Nix binary cache from a local directory or S3 and
/// verifies, signs and stores uploads.
///
/// Not implemented yet: this release only ships the formats library and the orchestrator's
/// `keygen`. Serving arrives with the cache-server milestone.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {}

fn main() -> ExitCode {
    Cli::parse();
    eprintln!(
        "error: cache-server cannot serve yet: this build has no serving code (see the README's status)"
    );
    ExitCode::from(2)
}
