//! The `build`, `status` and `check-config` commands.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use orchestrator::build::build_revision;
use orchestrator::cache::CacheTarget;
use orchestrator::config::{Config, xdg_dir};
use orchestrator::context::{BuildOptions, Context};
use orchestrator::flake::FleetRepo;
use orchestrator::outcome::{BuildReport, Status};
use orchestrator::plan::Selection;
use orchestrator::remote::Remote;
use orchestrator::report::{self, Reporter};
use orchestrator::serve::Submit;
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
    /// `orchestrator serve`'s URL and an API token file.
    pub server: Option<(String, PathBuf)>,
    pub print_build_logs: bool,
    pub json: bool,
}

/// The configuration: the file named, else the user's if it exists, else the defaults.
pub(crate) fn load_config(path: Option<&Path>) -> Result<Config, CliError> {
    if let Some(path) = path {
        return Ok(Config::load(path)?);
    }
    if let Ok(dir) = xdg_dir("XDG_CONFIG_HOME", ".config") {
        let user = dir.join("fleetcache.toml");
        if user.is_file() {
            return Ok(Config::load(&user)?);
        }
    }
    Ok(Config::default())
}

fn state_dir(config: &Config, flag: Option<PathBuf>) -> Result<PathBuf, CliError> {
    match flag {
        Some(d) => Ok(d),
        None => config.state_dir().map_err(CliError::Error),
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
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
    // The report is the output; warnings and errors of the parts (the embedded cache's
    // storage, say) still reach the terminal, and `RUST_LOG=debug` tells the whole story.
    builder::init_logging_at("warn");
    let config = load_config(args.config.as_deref())?;
    // With --server the server's configuration names the variants.
    let selection = if args.server.is_some() {
        Selection::default()
    } else {
        Selection::new(&config, &args.variants).map_err(CliError::Error)?
    };
    let state_dir = state_dir(&config, args.state_dir)?;
    let flake = match args.flake.clone().or_else(|| config.fleet.flake.clone()) {
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
        features: config.build.features.clone().unwrap_or_else(builder::agent::detect_features),
    };
    let tracked = config.fleet.tracked_inputs.clone();
    let reporter: Arc<dyn Reporter> = if std::io::stderr().is_terminal() && !args.print_build_logs {
        Arc::new(report::Terminal::new(tracked))
    } else {
        Arc::new(report::Lines::new(tracked, args.print_build_logs))
    };
    if let Some((url, token_file)) = &args.server {
        if args.flake.is_some() {
            return Err(CliError::Error(
                "--flake does not go with --server: the server builds its configured fleet".into(),
            ));
        }
        let remote = Remote::new(url, &read_token(token_file)?)?;
        let submit = Submit {
            rev: args.rev.clone(),
            variants: args.variants.clone(),
            retry_failed: args.retry_failed,
        };
        return runtime()?.block_on(async move {
            let id = remote.submit(&submit).await?;
            let report = remote.follow(id, reporter.as_ref()).await?;
            finish_report(&report, args.json, &format!("orchestrator {url}"), &[], false)
        });
    }
    runtime()?.block_on(async move {
        let state = open_state(&config, &state_dir).await?;
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
        let outcome = build_revision(&ctx, &repo, &args.rev, &selection).await;
        let Context { cache, .. } = ctx;
        let cache = Arc::into_inner(cache).expect("the build holds no cache reference after it ends");
        let (location, keys) = (cache.location.clone(), cache.public_keys.clone());
        cache.close().await;
        finish_report(&outcome?, args.json, &format!("cache {location}"), &keys, cancel.is_cancelled())
    })
}

/// Prints the table (or JSON) and turns the statuses into the exit code.
fn finish_report(
    report: &BuildReport,
    json: bool,
    place: &str,
    keys: &[String],
    cancelled: bool,
) -> Result<(), CliError> {
    if json {
        println!("{}", serde_json::to_string_pretty(&report.results)?);
    } else {
        print!("{}", report::table(&report.results));
        println!("\ncommit {}; {place}", report.commit);
        if !keys.is_empty() {
            println!("public key: {}", keys.join(" "));
        }
    }
    let statuses: Vec<Status> = report.results.iter().map(|r| r.status).collect();
    let verify_failed = report.results.iter().any(|r| {
        r.verification.as_ref().is_some_and(|v| v.status == builder::api::VerifyStatus::VerifyFailed)
    });
    if statuses.contains(&Status::Interrupted) || cancelled {
        Err(CliError::Interrupted)
    } else if statuses.contains(&Status::Failed) || verify_failed {
        Err(CliError::Failed)
    } else {
        Ok(())
    }
}

/// A token file's token, trimmed.
pub(crate) fn read_token(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_owned())
        .map_err(|e| CliError::Error(format!("reading token file {}: {e}", path.display())))
}

/// The state database the configuration names: PostgreSQL, or SQLite in `dir`.
async fn open_state(config: &Config, dir: &Path) -> Result<State, CliError> {
    Ok(match &config.database {
        Some(url) => State::connect(url).await?,
        None => State::open(dir).await?,
    })
}

/// The local state database, if a build or serve made one.
pub(crate) async fn local_state(
    config: Option<&Path>,
    state_dir_flag: Option<PathBuf>,
) -> Result<State, CliError> {
    let config = load_config(config)?;
    if config.database.is_some() {
        return open_state(&config, Path::new(".")).await;
    }
    let dir = state_dir(&config, state_dir_flag)?;
    if !dir.join("state.db").exists() {
        return Err(CliError::Error(format!(
            "no state in {} yet: run `orchestrator build` first (or pass --server)",
            dir.display()
        )));
    }
    Ok(State::open(&dir).await?)
}

/// `orchestrator status`.
pub fn status(
    config: Option<&Path>,
    state_dir_flag: Option<PathBuf>,
    server: Option<(String, PathBuf)>,
    limit: u32,
    json: bool,
) -> Result<(), CliError> {
    runtime()?.block_on(async move {
        let report = match &server {
            Some((url, token)) => Remote::new(url, &read_token(token)?)?.status(limit).await?,
            None => local_state(config, state_dir_flag).await?.report(limit).await?,
        };
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
                if !v.machines.is_empty() {
                    println!("             installed by {}", v.machines.join(", "));
                }
                if let Some(e) = v.error.as_deref().or(last.and_then(|a| a.error.as_deref()))
                    && v.status == "failed"
                {
                    println!("             {}", e.lines().next().unwrap_or_default());
                }
            }
        }
        Ok(())
    })
}

/// `orchestrator logs`.
pub fn logs(
    config: Option<&Path>,
    state_dir_flag: Option<PathBuf>,
    server: Option<(String, PathBuf)>,
    rev: &str,
    variant: &str,
    follow: bool,
) -> Result<(), CliError> {
    use std::io::Write as _;
    runtime()?.block_on(async move {
        let remote = match &server {
            Some((url, token)) => Some(Remote::new(url, &read_token(token)?)?),
            None => None,
        };
        let local = match &remote {
            Some(_) => None,
            None => Some(local_state(config, state_dir_flag).await?),
        };
        let mut printed = String::new();
        loop {
            let view = match (&remote, &local) {
                (Some(r), _) => r.log(rev, variant).await?,
                (None, Some(state)) => {
                    orchestrator::serve::find_log(state, rev, variant).await?.ok_or_else(|| {
                        CliError::Error(format!("no build of variant {variant:?} at {rev:?} is recorded"))
                    })?
                }
                (None, None) => unreachable!("one of them is set"),
            };
            // The kept log is its tail: print what is new since the last look.
            let new = match view.log.strip_prefix(printed.as_str()) {
                Some(rest) => rest.to_owned(),
                None => view.log.get(overlap(&printed, &view.log)..).unwrap_or_default().to_owned(),
            };
            print!("{new}");
            std::io::stdout().flush()?;
            printed = view.log;
            if !follow || !view.running {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    })
}

/// Where `next` continues `printed` when the head of the log was dropped: just after the last
/// occurrence of `printed`'s final line(s) in `next` (0 when they are gone too).
fn overlap(printed: &str, next: &str) -> usize {
    let mut start = printed.len().saturating_sub(256);
    while !printed.is_char_boundary(start) {
        start += 1;
    }
    let anchor = &printed[start..];
    match next.rfind(anchor) {
        Some(at) if !anchor.is_empty() => at + anchor.len(),
        _ => 0,
    }
}

/// `orchestrator builders`.
pub fn builders(
    config: Option<&Path>,
    state_dir_flag: Option<PathBuf>,
    server: Option<(String, PathBuf)>,
    json: bool,
) -> Result<(), CliError> {
    runtime()?.block_on(async move {
        let builders = match &server {
            Some((url, token)) => Remote::new(url, &read_token(token)?)?.builders().await?,
            None => local_state(config, state_dir_flag).await?.builders().await?,
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&builders)?);
            return Ok(());
        }
        println!("{:<16} {:<16} {:<24} {:>7}  LAST SEEN", "BUILDER", "SYSTEMS", "FEATURES", "JOBS");
        let now = orchestrator::state::now();
        for b in &builders {
            let mut features = b.features.join(",");
            if !b.mandatory_features.is_empty() {
                features.push_str(&format!(" (only {})", b.mandatory_features.join(",")));
            }
            println!(
                "{:<16} {:<16} {:<24} {:>3}/{:<3}  {}s ago",
                b.name,
                b.systems.join(","),
                if features.is_empty() { "-" } else { &features },
                b.running,
                b.max_jobs,
                now - b.last_seen
            );
        }
        Ok(())
    })
}

/// `orchestrator serve`.
pub fn serve(
    config_path: Option<&Path>,
    state_dir_flag: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
) -> Result<(), CliError> {
    use cache_server::auth::TokenFile;
    let config = load_config(config_path)?;
    let need = |what: &str| CliError::Error(format!("orchestrator serve needs {what} in the configuration"));
    if config.cache.url.is_none() {
        return Err(need("cache.url and cache.token-file (the cache-server builders push to)"));
    }
    let builder_tokens =
        config.server.builder_tokens_file.as_deref().ok_or_else(|| need("server.builder-tokens-file"))?;
    let builder_tokens = TokenFile::load(builder_tokens)?;
    let api_tokens =
        config.server.api_tokens_file.as_deref().ok_or_else(|| need("server.api-tokens-file"))?;
    let api_tokens = TokenFile::load(api_tokens)?;
    // An endpoint with an empty secret would take anyone's deliveries: refuse to start.
    for secret in config.webhook_secret_files() {
        orchestrator::webhooks::read_secret(secret)?;
    }
    let dir = state_dir(&config, state_dir_flag)?;
    let flake = match config.fleet.flake.clone() {
        Some(f) => f,
        None => std::env::current_dir()?.display().to_string(),
    };
    builder::init_logging();
    runtime()?.block_on(async move {
        let state = open_state(&config, &dir).await?;
        let mirrors = dir.join("repos");
        let repo = tokio::task::spawn_blocking(move || FleetRepo::open(&flake, &mirrors))
            .await
            .expect("open task")?;
        let cache = CacheTarget::open(&config.cache).await?;
        let addr = listen.unwrap_or(config.server.listen);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CliError::Error(format!("binding {addr}: {e}")))?;
        let addr = listener.local_addr()?;
        let server = Arc::new(orchestrator::serve::Server::new(
            config,
            state,
            repo,
            cache,
            builder_tokens,
            api_tokens,
        ));
        tracing::info!(fleet = %server.repo.reference, state = %dir.display(), "serving");
        println!("listening on http://{addr}");
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) =
                (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
            else {
                return std::future::pending().await;
            };
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        };
        orchestrator::serve::run(listener, server, shutdown).await?;
        Ok(())
    })
}

/// `orchestrator check-config`.
pub fn check_config(path: Option<&Path>) -> Result<(), CliError> {
    let config = load_config(path)?;
    // Secrets exist only on the machine (not where a NixOS module checks its file): those that
    // are here must not be empty.
    for secret in config.webhook_secret_files().filter(|p| p.exists()) {
        orchestrator::webhooks::read_secret(secret)?;
    }
    let text = toml::to_string_pretty(&config)?;
    print!("{text}");
    eprintln!("configuration OK");
    Ok(())
}
