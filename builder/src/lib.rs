//! fleetcache's builder library: what a build machine does with the real `nix` and the
//! cache-server — evaluate a variant ([`eval`]), build it ([`nix_build`]), put its closure
//! into the cache ([`push`]), the whole way from `nix build` to a verified output in the cache
//! ([`pipeline`]) — and the agent that does it for an orchestrator ([`agent`], speaking
//! [`api`]).

pub mod agent;
pub mod api;
pub mod client;
pub mod compress;
pub mod config;
pub mod eval;
pub mod nix;
pub mod nix_build;
pub mod pipeline;
pub mod progress;
pub mod push;
pub mod verify;

pub use cache_protocol::http;

/// This machine's Nix system name (`x86_64-linux`).
pub fn local_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        other => other,
    };
    format!("{arch}-{}", std::env::consts::OS)
}

/// Logs to standard error at `RUST_LOG` (default `info`), in colour only on a terminal.
pub fn init_logging() {
    init_logging_at("info");
}

/// Logs to standard error at `RUST_LOG`, else at `default` (`warn` for a command whose own
/// report is the output), in colour only on a terminal.
pub fn init_logging_at(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
