//! The `builder` command: fleetcache's build agent.

use std::path::PathBuf;
use std::process::ExitCode;

use builder::agent::{AgentOptions, detect_features, run};
use builder::api::Register;
use builder::config::{Config, Settings};
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
    /// TOML configuration file (see builder.example.toml); the flags below win over it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The orchestrator, e.g. `http://orchestrator:8090`.
    #[arg(long)]
    orchestrator: Option<String>,
    /// File holding this builder's token (a line of the orchestrator's builder-tokens-file).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Features this machine supports, comma-separated; replaces detection (nvidia-smi -> cuda,
    /// vulkaninfo -> vulkan, /dev/kvm -> kvm). `--features ''` for none.
    #[arg(long, value_delimiter = ',')]
    features: Option<Vec<String>>,
    /// Features a job must require for this builder to take it (e.g. a GPU box that should only
    /// build GPU variants).
    #[arg(long, value_delimiter = ',')]
    mandatory_features: Option<Vec<String>>,
    /// Jobs built at once (default 1).
    #[arg(long)]
    max_jobs: Option<u32>,
    /// Systems this machine builds for, comma-separated (default: its own).
    #[arg(long, value_delimiter = ',')]
    systems: Option<Vec<String>>,
    /// The cache-server to push to (default: the one the orchestrator names).
    #[arg(long)]
    cache: Option<String>,
    /// File holding an upload token of the cache-server.
    #[arg(long)]
    cache_token_file: Option<PathBuf>,
    /// Check the configuration (settings, and that the token files are readable) and exit.
    #[arg(long)]
    check_config: bool,
    /// With --check-config: check the settings only, without reading the token files (for
    /// checks at build time, such as the NixOS module's, where those files do not exist yet).
    #[arg(long, requires = "check_config")]
    settings_only: bool,
}

fn read(path: &PathBuf) -> Result<String, String> {
    let token = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(token)
}

fn settings(cli: Cli) -> Result<Settings, String> {
    let file = match &cli.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let flags = Config {
        orchestrator: cli.orchestrator,
        token_file: cli.token_file,
        cache_token_file: cli.cache_token_file,
        cache: cli.cache,
        features: cli.features,
        mandatory_features: cli.mandatory_features,
        max_jobs: cli.max_jobs,
        systems: cli.systems,
    };
    file.merge(flags).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (check_config, settings_only) = (cli.check_config, cli.settings_only);
    let settings = match settings(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if check_config && settings_only {
        println!("configuration OK (settings only: token files not read)");
        return ExitCode::SUCCESS;
    }
    let (token, cache_token) = match (read(&settings.token_file), read(&settings.cache_token_file)) {
        (Ok(t), Ok(c)) => (t, c),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    builder::init_logging();
    let features = settings.features.unwrap_or_else(detect_features);
    let opts = AgentOptions {
        orchestrator: settings.orchestrator,
        token,
        register: Register {
            systems: settings.systems.unwrap_or_else(|| vec![builder::local_system()]),
            features,
            mandatory_features: settings.mandatory_features,
            max_jobs: settings.max_jobs,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        },
        cache_url: settings.cache,
        cache_token,
        push: builder::push::PushOptions::default(),
        max_log_bytes: builder::nix_build::DEFAULT_MAX_LOG_BYTES,
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
