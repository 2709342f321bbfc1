//! The `orchestrator` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod collect;
mod commands;
mod pushing;

/// fleetcache orchestrator: builds a NixOS fleet's hardware variants and publishes them to its
/// binary cache.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a signing key pair in Nix's format (as `nix-store --generate-binary-cache-key`).
    ///
    /// The secret key goes to the cache-server (never to builders); the public key goes into
    /// every fleet machine's `trusted-public-keys`.
    Keygen {
        /// Key name, conventionally the cache's host name and a generation: `cache.example.org-1`.
        #[arg(long)]
        name: String,
        /// Where to write the secret key (created with mode 0600).
        #[arg(long)]
        secret_key_file: PathBuf,
        /// Where to write the public key.
        #[arg(long)]
        public_key_file: PathBuf,
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Build a fleet revision's variants and publish them to the cache.
    ///
    /// Resolves REV in the fleet flake, reads the inputs its flake.lock pins, evaluates every
    /// variant against the flake at that commit, skips what the cache already has, builds the
    /// rest with nix and pushes each closure and build log. With no configuration everything
    /// happens here: state under $XDG_STATE_HOME/fleetcache, results in a local cache under
    /// $XDG_DATA_HOME/fleetcache/cache signed with a key generated there on first use.
    /// Exits 0 only if every variant is cached or built; 130 when interrupted.
    Build {
        /// A commit, tag or branch of the fleet repository.
        #[arg(long)]
        rev: String,
        /// The fleet flake (local checkout or git URL); default: the config's fleet.flake, else
        /// the git repository in the current directory.
        #[arg(long)]
        flake: Option<String>,
        /// Build only this variant (repeatable); default: every configured variant.
        #[arg(long = "variant", value_name = "NAME")]
        variants: Vec<String>,
        #[command(flatten)]
        common: Common,
        /// Rebuild derivations whose last attempt failed.
        #[arg(long)]
        retry_failed: bool,
        /// Derivations built at once (default: the config's build.max-jobs, 1).
        #[arg(long)]
        max_jobs: Option<usize>,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Print build logs (on a terminal the last line of each shows anyway).
        #[arg(short = 'L', long)]
        print_build_logs: bool,
        /// Print one JSON document on stdout:
        /// [{"variant","system","attr","drv_path","out_paths","status","seconds","error"}].
        #[arg(long)]
        json: bool,
    },
    /// Show recorded revisions: locked inputs, variants, derivations and build attempts.
    Status {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        remote: RemoteArgs,
        /// How many revisions, newest first.
        #[arg(long, default_value_t = 10)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a variant's build log at a revision; with --follow, keep printing while it builds.
    Logs {
        /// The variant.
        variant: String,
        /// The revision (a commit or a prefix of one, or the branch or tag that was built).
        #[arg(long)]
        rev: String,
        /// Keep printing until the build ends.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Show the builder agents: systems, features, jobs held, last heartbeat.
    Builders {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the scheduler: builder agents claim jobs from it, `build --server` submits to it.
    ///
    /// Needs a remote cache-server (cache.url, cache.token-file) that builders push to, and the
    /// token files server.builder-tokens-file and server.api-tokens-file. Prints
    /// "listening on http://ADDR" first; SIGTERM stops it after the requests in flight. All
    /// state is in the database: a restart loses no queued or running job.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to listen on (default: the config's server.listen, 127.0.0.1:8090); port 0
        /// picks a free one.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Collect garbage in the cache: keep the outputs of the revisions that matter, delete the
    /// rest.
    ///
    /// Kept: the newest gc.keep-revisions revisions (by when first built), every revision built
    /// within gc.keep-days, and the pinned ones (`orchestrator pin`), each with everything its
    /// outputs refer to. The cache deletes the other narinfos, NARs, listings and build logs
    /// older than gc.grace-seconds. A remote cache needs cache.admin-token-file; the embedded
    /// one is collected here.
    Gc {
        #[command(flatten)]
        common: Common,
        /// Keep this many of the newest revisions (default: the config's gc.keep-revisions, 5).
        #[arg(long)]
        keep_revisions: Option<usize>,
        /// Keep revisions built within this many days (default: the config's gc.keep-days, 14).
        #[arg(long)]
        keep_days: Option<u64>,
        /// Only print what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Print one JSON document: {"cache", "kept": {"revisions", "paths", …}, "report": {…}}.
        #[arg(long)]
        json: bool,
    },
    /// Keep a revision's outputs in the cache whatever its age, until `unpin`.
    Pin {
        /// A commit (or a prefix of one), or the branch or tag last built as it.
        rev: String,
        #[command(flatten)]
        common: Common,
    },
    /// Let garbage collection treat a pinned revision like any other again.
    Unpin {
        /// A commit (or a prefix of one), or the branch or tag last built as it.
        rev: String,
        #[command(flatten)]
        common: Common,
    },
    /// Check a fleetcache.toml and print the settings it gives.
    CheckConfig {
        /// The file (default: $FLEETCACHE_CONFIG, else $XDG_CONFIG_HOME/fleetcache/fleetcache.toml).
        #[arg(long, env = "FLEETCACHE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Use a fleetcache cache from this machine's Nix (a laptop, a CI runner; on NixOS use
    /// services.fleetcache.client).
    ///
    /// Adds the cache to nix.conf's extra-substituters, its keys to extra-trusted-public-keys
    /// and, with --token-file, the read token to the netrc file nix.conf names (netrc beside
    /// nix.conf unless one is named): only what is missing, so running it again changes nothing.
    Use {
        /// The cache, e.g. `https://cache.example.org`.
        url: String,
        /// The cache's public key (repeatable). Default: the keys the cache announces, trusted
        /// on first use (the command says so).
        #[arg(long = "public-key", value_name = "KEY")]
        public_keys: Vec<String>,
        /// File holding a read token, for a cache-server with read tokens.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Change the system's nix.conf ($NIX_CONF_DIR/nix.conf, else /etc/nix/nix.conf): the
        /// default for root.
        #[arg(long, conflicts_with_all = ["user", "nix_conf"])]
        system: bool,
        /// Change the user's nix.conf ($XDG_CONFIG_HOME/nix/nix.conf, else
        /// ~/.config/nix/nix.conf): the default for anyone but root.
        #[arg(long, conflicts_with = "nix_conf")]
        user: bool,
        /// Change this nix.conf.
        #[arg(long)]
        nix_conf: Option<PathBuf>,
        /// Print what would change and the new nix.conf; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Seconds Nix waits to connect to a substituter, set when nix.conf sets none (0: leave
        /// Nix's default, no limit of its own, which lets an unreachable cache that drops
        /// packets hold every Nix command for up to 25 minutes).
        #[arg(long, value_name = "SECONDS", default_value_t = 5)]
        connect_timeout: u64,
    },
    /// Push the closures of store paths (or of the outputs of .drv files) to a cache-server.
    ///
    /// Asks the cache once which paths it lacks and uploads only those, each verified and
    /// signed by the server. Interrupted pushes resume where they stopped when run again.
    Push {
        /// The cache-server, e.g. `http://cache.example.org:8080`.
        #[arg(long)]
        cache: String,
        /// File holding an upload token (the cache-server's upload-tokens-file has it).
        #[arg(long)]
        token_file: PathBuf,
        /// Paths uploaded at once (default: 16); at most two of them NARs over 32 MiB.
        #[arg(long)]
        jobs: Option<usize>,
        /// zstd level.
        #[arg(long, default_value_t = builder::push::DEFAULT_ZSTD_LEVEL)]
        zstd_level: i32,
        /// zstd long-distance matching on NARs over 32 MiB: ~16% fewer bytes on those for ~40%
        /// more compression time and ~150 MiB more memory.
        #[arg(long)]
        long_distance_matching: bool,
        /// Print a JSON summary on stdout: {"uploaded", "already_present", "from_upstream", "bytes", "seconds", …}.
        #[arg(long)]
        json: bool,
        /// Push what `orchestrator hook` queued in this directory (then remove it), instead of
        /// PATHS; with --watch, keep doing so (a service).
        #[arg(long, value_name = "DIR", conflicts_with = "paths")]
        from_queue: Option<PathBuf>,
        /// With --from-queue: wait for more, pushing each batch as it comes. A batch that failed
        /// for a reason that may pass (the cache unreachable) stays queued and is retried (with
        /// backoff, and at the next start); one the cache refused moves to DIR/refused/.
        #[arg(long, requires = "from_queue")]
        watch: bool,
        /// Store paths or .drv files.
        #[arg(required_unless_present = "from_queue")]
        paths: Vec<String>,
    },
    /// Nix's post-build-hook: queue the built paths ($OUT_PATHS, or PATHS) for `orchestrator
    /// push --from-queue` and return at once.
    ///
    /// In nix.conf: `post-build-hook = /path/to/script` running `exec orchestrator hook`. The
    /// hook never talks to the cache, so a build never waits for or fails by an upload.
    Hook {
        /// The queue directory (default: /var/lib/fleetcache-push/queue for root, else
        /// $XDG_STATE_HOME/fleetcache/push-queue).
        #[arg(long, value_name = "DIR")]
        queue: Option<PathBuf>,
        /// Store paths (default: $OUT_PATHS, which Nix sets for the hook).
        paths: Vec<String>,
    },
    /// Show the push queue: the batches waiting for `orchestrator push --from-queue`, and those
    /// the cache refused with its reasons. Reads the directory only; never talks to the cache.
    Queue {
        /// The queue directory (default: /var/lib/fleetcache-push/queue for root, else
        /// $XDG_STATE_HOME/fleetcache/push-queue).
        #[arg(long, value_name = "DIR")]
        queue: Option<PathBuf>,
    },
}

/// Settings shared by the commands that use the state.
#[derive(clap::Args)]
struct Common {
    /// fleetcache.toml (default: $FLEETCACHE_CONFIG, else $XDG_CONFIG_HOME/fleetcache/fleetcache.toml
    /// if it exists, else built-in defaults).
    #[arg(long, env = "FLEETCACHE_CONFIG")]
    config: Option<PathBuf>,
    /// The state directory (default: the config's state-dir, else $XDG_STATE_HOME/fleetcache).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

/// Talking to a running `orchestrator serve` instead of working here.
#[derive(clap::Args)]
struct RemoteArgs {
    /// The orchestrator, e.g. `http://orchestrator:8090`.
    #[arg(long, requires = "token_file")]
    server: Option<String>,
    /// File holding an API token (one of the server's api-tokens-file).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// A command's failure: already reported, or an error to print.
enum CliError {
    /// The command printed its own report (e.g. which paths failed).
    Failed,
    /// The command was interrupted and said so.
    Interrupted,
    /// An error to print.
    Error(String),
}

impl<E: std::error::Error> From<E> for CliError {
    /// The error and each cause its message does not already say, one per line.
    fn from(e: E) -> Self {
        let mut text = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            let said = c.to_string();
            if !text.contains(&said) {
                text.push_str(&format!("\n  caused by: {said}"));
            }
            cause = c.source();
        }
        CliError::Error(text)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<(), CliError> = match cli.command {
        Command::Keygen { name, secret_key_file, public_key_file, force } => {
            orchestrator::keys::write_key_pair(&name, &secret_key_file, &public_key_file, force)
                .map(|pk| {
                    println!("{pk}");
                    eprintln!(
                        "wrote secret key {} and public key {}",
                        secret_key_file.display(),
                        public_key_file.display()
                    );
                })
                .map_err(CliError::from)
        }
        Command::Build {
            rev,
            flake,
            variants,
            common,
            retry_failed,
            max_jobs,
            remote,
            print_build_logs,
            json,
        } => commands::build(commands::BuildArgs {
            rev,
            flake,
            variants,
            config: common.config,
            state_dir: common.state_dir,
            retry_failed,
            max_jobs,
            server: remote.server.zip(remote.token_file),
            print_build_logs,
            json,
        }),
        Command::Status { common, remote, limit, json } => commands::status(
            common.config.as_deref(),
            common.state_dir,
            remote.server.zip(remote.token_file),
            limit,
            json,
        ),
        Command::Builders { common, remote, json } => commands::builders(
            common.config.as_deref(),
            common.state_dir,
            remote.server.zip(remote.token_file),
            json,
        ),
        Command::Logs { variant, rev, follow, common, remote } => commands::logs(
            common.config.as_deref(),
            common.state_dir,
            remote.server.zip(remote.token_file),
            &rev,
            &variant,
            follow,
        ),
        Command::Serve { common, listen } => {
            commands::serve(common.config.as_deref(), common.state_dir, listen)
        }
        Command::CheckConfig { config } => commands::check_config(config.as_deref()),
        Command::Gc { common, keep_revisions, keep_days, dry_run, json } => collect::gc(collect::GcArgs {
            config: common.config,
            state_dir: common.state_dir,
            keep_revisions,
            keep_days,
            dry_run,
            json,
        }),
        Command::Pin { rev, common } => collect::pin(common.config.as_deref(), common.state_dir, &rev, true),
        Command::Unpin { rev, common } => {
            collect::pin(common.config.as_deref(), common.state_dir, &rev, false)
        }
        Command::Use { url, public_keys, token_file, system, user, nix_conf, dry_run, connect_timeout } => {
            let (nix_conf, system) = orchestrator::use_cache::target(nix_conf, system, user);
            match token_file.as_deref().map(commands::read_token).transpose() {
                Err(e) => Err(e),
                Ok(token) => orchestrator::use_cache::run(orchestrator::use_cache::Args {
                    url,
                    public_keys,
                    token,
                    nix_conf,
                    system,
                    dry_run,
                    connect_timeout,
                })
                .map_err(CliError::from),
            }
        }
        Command::Push {
            cache,
            token_file,
            jobs,
            zstd_level,
            long_distance_matching,
            json,
            from_queue,
            watch,
            paths,
        } => {
            let defaults = builder::push::PushOptions::default();
            let opts = builder::push::PushOptions {
                jobs: jobs.unwrap_or(defaults.jobs),
                zstd_level,
                long_distance_matching,
                ..defaults
            };
            match from_queue {
                Some(queue) => pushing::from_queue(&cache, &token_file, &opts, &queue, watch),
                None => pushing::push(&cache, &token_file, &opts, json, &paths),
            }
        }
        Command::Hook { queue, paths } => pushing::hook(queue, paths),
        Command::Queue { queue } => pushing::show_queue(queue),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Failed) => ExitCode::FAILURE,
        Err(CliError::Interrupted) => ExitCode::from(130),
        Err(CliError::Error(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
