//! The `builder` command: fleetcache's build agent.

use std::path::PathBuf;
use std::process::ExitCode;

use builder::agent::{AgentOptions, detect_features, run};
use builder::api::Register;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// fleetcache builder: claims build jobs from an orchestrator, builds them with the local `nix`
/// and pushes the results to the cache-server with its own upload token.
///
/// A job is taken only if this builder has the job's system and every feature it requires
/// (and, with --mandatory-features, only jobs that require those). The builder evaluates the
/// job itself and refuses it if its derivation differs from the orchestrator's. SIGTERM or
/// Ctrl-C stops it: running builds are stopped and their jobs go back to the queue.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// The orchestrator, e.g. `http://orchestrator:8090`.
    #[arg(long)]
    orchestrator: String,
    /// File holding this builder's token (a line of the orchestrator's builder-tokens-file).
    #[arg(long)]
    token_file: PathBuf,
    /// Features this machine supports, comma-separated; replaces detection (nvidia-smi -> cuda,
    /// vulkaninfo -> vulkan, /dev/kvm -> kvm). `--features ''` for none.
    #[arg(long, value_delimiter = ',')]
    features: Option<Vec<String>>,
    /// Features a job must require for this builder to take it (e.g. a GPU box that should only
    /// build GPU variants).
    #[arg(long, value_delimiter = ',', default_value = "")]
    mandatory_features: Vec<String>,
    /// Jobs built at once.
    #[arg(long, default_value_t = 1)]
    max_jobs: u32,
    /// Systems this machine builds for, comma-separated (default: its own).
    #[arg(long, value_delimiter = ',')]
    systems: Option<Vec<String>>,
    /// The cache-server to push to (default: the one the orchestrator names).
    #[arg(long)]
    cache: Option<String>,
    /// File holding an upload token of the cache-server.
    #[arg(long)]
    cache_token_file: PathBuf,
}

fn read(path: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_owned())
        .map_err(|e| format!("reading {}: {e}", path.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    builder::init_logging();
    let (token, cache_token) = match (read(&cli.token_file), read(&cli.cache_token_file)) {
        (Ok(t), Ok(c)) => (t, c),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let clean =
        |v: Vec<String>| v.into_iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
    let features: Vec<String> = clean(cli.features.unwrap_or_else(detect_features));
    let opts = AgentOptions {
        orchestrator: cli.orchestrator,
        token,
        register: Register {
            systems: clean(cli.systems.unwrap_or_else(|| vec![builder::local_system()])),
            features,
            mandatory_features: clean(cli.mandatory_features),
            max_jobs: cli.max_jobs.max(1),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        },
        cache_url: cli.cache,
        cache_token,
        push: builder::push::PushOptions::default(),
        max_log_bytes: 4 << 20,
    };
    tracing::info!(systems = ?opts.register.systems, features = ?opts.register.features,
        mandatory = ?opts.register.mandatory_features, max_jobs = opts.register.max_jobs, "starting");
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = CancellationToken::new();
    let outcome = rt.block_on(async {
        let signals = {
            let stop = stop.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) =
                    (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
                else {
                    return;
                };
                tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
                tracing::info!("stopping: running jobs go back to the queue");
                stop.cancel();
            })
        };
        let r = run(opts, stop).await;
        signals.abort();
        r
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
