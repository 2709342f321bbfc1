//! The `build`, `status` and `check-config` commands.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use orchestrator::build::{BuildOptions, Context, Status, build_revision};
use orchestrator::cache::CacheTarget;
use orchestrator::config::{Config, xdg_dir};
use orchestrator::flake::FleetRepo;
use orchestrator::report::{self, Reporter};
use orchestrator::state::{State, new_owner};
use tokio_util::sync::CancellationToken;

use crate::CliError;

/// `orchestrator build`'s arguments.
pub struct BuildArgs {
    pub rev: String,
    pub flake: Option<String>,
    pub variants: Vec<String>,
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub retry_failed: bool,
    pub max_jobs: Option<usize>,
    pub print_build_logs: bool,
    pub json: bool,
}

/// The configuration: the file named, else the user's if it exists, else the defaults.
fn load_config(path: Option<&Path>) -> Result<Config, CliError> {
    if let Some(path) = path {
        return Ok(Config::load(path)?);
    }
    if let Ok(dir) = xdg_dir("XDG_CONFIG_HOME", ".config") {
        let user = dir.join("fleetcache.toml");
        if user.is_file() {
            return Ok(Config::load(&user)?);
        }
    }
    Ok(Config::defaults())
}

fn state_dir(config: &Config, flag: Option<PathBuf>) -> Result<PathBuf, CliError> {
    match flag {
        Some(d) => Ok(d),
        None => config.state_dir().map_err(CliError::Error),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    Ok(tokio::runtime::Runtime::new()?)
}

/// Cancels on the first SIGINT or SIGTERM; exits at once on the second.
fn cancel_on_signals(cancel: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
        else {
            return;
        };
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        eprintln!(
            "interrupted: stopping builds (nothing half-published; run again to resume; again to quit now)"
        );
        cancel.cancel();
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        std::process::exit(130);
    });
}

/// `orchestrator build`.
pub fn build(args: BuildArgs) -> Result<(), CliError> {
    let config = load_config(args.config.as_deref())?;
    let variants = config.select_variants(&args.variants).map_err(CliError::Error)?;
    let state_dir = state_dir(&config, args.state_dir)?;
    let flake = match args.flake.or_else(|| config.fleet.flake.clone()) {
        Some(f) => f,
        None => std::env::current_dir()?.display().to_string(),
    };
    let max_jobs = args.max_jobs.unwrap_or(config.build.max_jobs).max(1);
    let defaults = builder::push::PushOptions::default();
    let options = BuildOptions {
        retry_failed: args.retry_failed,
        max_jobs,
        push: builder::push::PushOptions {
            jobs: config.build.push_jobs.unwrap_or(defaults.jobs),
            zstd_level: config.build.zstd_level,
            ..defaults
        },
        max_log_bytes: config.build.max_log_bytes,
    };
    let tracked = config.fleet.tracked_inputs.clone();
    let reporter: Arc<dyn Reporter> = if std::io::stderr().is_terminal() && !args.print_build_logs {
        Arc::new(report::Terminal::new(tracked))
    } else {
        Arc::new(report::Lines::new(tracked, args.print_build_logs))
    };
    runtime()?.block_on(async move {
        let state = State::open(&state_dir).await?;
        let mirrors = state_dir.join("repos");
        let repo = tokio::task::spawn_blocking(move || FleetRepo::open(&flake, &mirrors))
            .await
            .expect("open task")?;
        let cache = CacheTarget::open(&config.cache).await?;
        if let Some(secret) = &cache.generated_key {
            eprintln!(
                "generated the cache's signing key {} (public key {}); fleet machines need the public key in \
                 trusted-public-keys",
                secret.display(),
                cache.public_keys.join(" ")
            );
        }
        let cancel = CancellationToken::new();
        cancel_on_signals(cancel.clone());
        let ctx = Context {
            state,
            cache: Arc::new(cache),
            reporter,
            owner: new_owner(),
            cancel: cancel.clone(),
            options,
        };
        let outcome = build_revision(&ctx, &repo, &args.rev, &variants).await;
        let Context { cache, .. } = ctx;
        let cache = Arc::into_inner(cache).expect("the build holds no cache reference after it ends");
        let (location, keys) = (cache.location.clone(), cache.public_keys.clone());
        cache.close().await;
        let report = outcome?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report.results)?);
        } else {
            print!("{}", report::table(&report.results));
            println!("\ncommit {}; cache {location}", report.commit);
            if !keys.is_empty() {
                println!("public key: {}", keys.join(" "));
            }
        }
        let statuses: Vec<Status> = report.results.iter().map(|r| r.status).collect();
        if statuses.contains(&Status::Interrupted) || cancel.is_cancelled() {
            Err(CliError::Interrupted)
        } else if statuses.contains(&Status::Failed) {
            Err(CliError::Failed)
        } else {
            Ok(())
        }
    })
}

/// `orchestrator status`.
pub fn status(
    config: Option<&Path>,
    state_dir_flag: Option<PathBuf>,
    limit: u32,
    json: bool,
) -> Result<(), CliError> {
    let config = load_config(config)?;
    let dir = state_dir(&config, state_dir_flag)?;
    if !dir.join("state.db").exists() {
        return Err(CliError::Error(format!(
            "no state in {} yet: run `orchestrator build` first",
            dir.display()
        )));
    }
    runtime()?.block_on(async move {
        let report = State::open(&dir).await?.report(limit).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
            return Ok(());
        }
        for r in &report {
            println!("{} {} ({})", &r.rev[..r.rev.len().min(12)], r.requested, r.flake);
            for i in &r.inputs {
                println!("  input {:<12} {} {}", i.name, i.rev.as_deref().unwrap_or("-"), i.source);
            }
            for v in &r.variants {
                let last = v.attempts.last();
                println!(
                    "  {:<10} {:<14} {:<11} {:>6.1}s  attempts {:<2} {}",
                    v.variant,
                    v.system,
                    v.status,
                    v.seconds.unwrap_or(0.0),
                    v.attempts.len(),
                    v.drv_path.as_deref().unwrap_or("-"),
                );
                if let Some(e) = v.error.as_deref().or(last.and_then(|a| a.error.as_deref())) {
                    if v.status == "failed" {
                        println!("             {}", e.lines().next().unwrap_or_default());
                    }
                }
            }
        }
        Ok(())
    })
}

/// `orchestrator check-config`.
pub fn check_config(path: Option<&Path>) -> Result<(), CliError> {
    let config = load_config(path)?;
    let text = toml::to_string_pretty(&config)?;
    print!("{text}");
    eprintln!("configuration OK");
    Ok(())
}
