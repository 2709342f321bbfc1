//! The `builder` command: fleetcache's build agent.

use std::process::ExitCode;

use clap::Parser;

/// fleetcache builder: claims build jobs from an orchestrator, builds them with the local `nix`
/// and pushes the results to the cache-server.
///
/// Not implemented yet: the agent arrives with the distributed-builds milestone. Its push
/// pipeline is available today as `orchestrator push`.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {}

fn main() -> ExitCode {
    Cli::parse();
    eprintln!("error: builder cannot claim jobs yet: this build has no agent code (see the README's status)");
    ExitCode::from(2)
}
