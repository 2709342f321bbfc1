//! The `cache-server` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use cache_server::config::Config;
use cache_server::storage::{Key, put_bytes};
use clap::Parser;

/// fleetcache cache-server: serves a Nix binary cache from a local directory or an S3 bucket,
/// and verifies, signs and stores uploads (from builders, or `nix copy --to http://…`).
///
/// Settings come from `--config FILE` (TOML) and the flags below; flags win. Without a signing
/// key or without upload tokens the server is read-only.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (see cache-server.example.toml).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port (printed on start). Default 127.0.0.1:8080.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The cache: `file:///dir` or `s3://bucket?endpoint=URL&region=R`.
    #[arg(long, global = true)]
    store: Option<String>,
    /// Secret key file in Nix's format; repeat during a rotation (every key signs).
    #[arg(long = "signing-key-file")]
    signing_key_files: Vec<PathBuf>,
    /// File of `name:token` lines allowed to upload.
    #[arg(long)]
    upload_tokens_file: Option<PathBuf>,
    /// File of `name:token` lines allowed to read (default: reads are public).
    #[arg(long)]
    read_tokens_file: Option<PathBuf>,
    /// Check the configuration (files readable, keys and tokens valid) and exit.
    #[arg(long)]
    check_config: bool,
    /// With --check-config: check the settings only, without reading the key, token and
    /// credential files they name (for checks at build time, such as the NixOS module's, where
    /// those files do not exist yet).
    #[arg(long, requires = "check_config")]
    settings_only: bool,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Collect garbage on the store itself: keep what the roots reach through narinfo
    /// references (with NARs, listings and build logs), delete the rest that is older than the
    /// grace period. Uploads through a server running on the same store are not seen: prefer
    /// `POST /api/v1/gc` on it (what `orchestrator gc` does) while it serves.
    Gc {
        /// File of store paths to keep, one per line (`#` comments).
        #[arg(long)]
        roots_file: PathBuf,
        /// Only print what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Objects written less than this many seconds ago stay.
        #[arg(long, default_value_t = cache_server::gc::DEFAULT_GRACE.as_secs())]
        grace_seconds: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn config(cli: &Cli) -> anyhow::Result<Config> {
    let mut c = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(l) = cli.listen {
        c.listen = l;
    }
    if let Some(s) = &cli.store {
        c.store = s.clone();
    }
    if !cli.signing_key_files.is_empty() {
        c.signing_key_files = cli.signing_key_files.clone();
    }
    if cli.upload_tokens_file.is_some() {
        c.upload_tokens_file = cli.upload_tokens_file.clone();
    }
    if cli.read_tokens_file.is_some() {
        c.read_tokens_file = cli.read_tokens_file.clone();
    }
    Ok(c)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down: finishing requests in flight");
}

async fn collect(config: &Config, roots_file: &std::path::Path, opts: GcFlags) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(roots_file).with_context(|| format!("reading {}", roots_file.display()))?;
    let roots: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let state = cache_server::setup(config).await?;
    eprintln!(
        "collecting garbage in {}: {} root(s), grace {} s{}",
        state.storage.describe(),
        roots.len(),
        opts.grace_seconds,
        if opts.dry_run { ", dry run" } else { "" }
    );
    let gc = cache_server::gc::Options {
        roots,
        dry_run: opts.dry_run,
        grace: std::time::Duration::from_secs(opts.grace_seconds),
    };
    let report = cache_server::gc::collect(state.storage.as_ref(), &state.gc, None, &gc).await?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let verb = if report.dry_run { "would delete" } else { "deleted" };
    for key in &report.sample {
        println!("{verb} {key}");
    }
    let listed = report.sample.len() as u64;
    let d = report.deleted;
    let total = d.objects();
    if total > listed {
        println!("… and {} more", total - listed);
    }
    println!(
        "{verb} {} narinfo(s), {} NAR(s), {} listing(s), {} log(s): {} bytes; kept {} narinfo(s) ({} reachable from {} root(s), {} absent; {} young), {} bytes; {} storage request(s) in {:.1} s",
        d.narinfos,
        d.nars,
        d.listings,
        d.logs,
        d.bytes,
        report.kept.narinfos,
        report.reachable,
        report.roots,
        report.roots_absent,
        report.young,
        report.kept.bytes,
        report.requests,
        report.seconds
    );
    if report.abandoned_uploads > 0 {
        println!(
            "dropped {} upload(s) that never ended (begun before the grace period)",
            report.abandoned_uploads
        );
    }
    Ok(())
}

struct GcFlags {
    dry_run: bool,
    grace_seconds: u64,
    json: bool,
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let config = config(&cli)?;
    if let Some(Command::Gc { roots_file, dry_run, grace_seconds, json }) = &cli.command {
        let flags = GcFlags { dry_run: *dry_run, grace_seconds: *grace_seconds, json: *json };
        return collect(&config, roots_file, flags).await;
    }
    if cli.settings_only {
        cache_server::config::StoreUrl::parse(&config.store)?;
        cache_server::upstream::check(&config.upstream)?;
        println!("configuration OK (settings only: key, token and credential files not read)");
        return Ok(());
    }
    let state = cache_server::setup(&config).await?;
    if cli.check_config {
        println!(
            "configuration OK: store {}, {} signing key(s)",
            state.storage.describe(),
            state.signing_keys.len()
        );
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    if state.writable() {
        // The bucket or directory alone must be a valid cache: make sure it says what it is.
        if let Err(e) =
            put_bytes(state.storage.as_ref(), &Key::cache_info(), state.cache_info.clone().into()).await
        {
            tracing::warn!(error = %e, "could not write nix-cache-info to the store");
        }
    }
    for key in &state.signing_keys {
        tracing::info!(public_key = %key.public_key(), "signing with");
    }
    if !state.writable() {
        tracing::info!("read-only: no signing key or no upload tokens");
    }
    tracing::info!(store = %state.storage.describe(), "serving");
    // The first line on stdout is the address, for scripts and tests that asked for port 0.
    println!("listening on http://{addr}");
    cache_server::run(listener, state, shutdown_signal()).await?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(serve(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
