//! The `gc`, `pin` and `unpin` commands.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};

use orchestrator::gc::{Keep, collect};
use orchestrator::state::KeptFor;

use crate::CliError;
use crate::commands::{load_config, local_state, runtime};

/// `orchestrator gc`'s arguments.
pub struct GcArgs {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub keep_revisions: Option<usize>,
    pub keep_days: Option<u64>,
    pub dry_run: bool,
    pub json: bool,
}

/// `orchestrator gc`.
pub fn gc(args: GcArgs) -> Result<(), CliError> {
    let config = load_config(args.config.as_deref())?;
    let keep = Keep {
        revisions: args.keep_revisions.unwrap_or(config.gc.keep_revisions),
        days: args.keep_days.unwrap_or(config.gc.keep_days),
    };
    runtime()?.block_on(async move {
        let state = local_state(args.config.as_deref(), args.state_dir).await?;
        let spinner = std::io::stderr().is_terminal().then(|| {
            let s = indicatif::ProgressBar::new_spinner();
            s.set_message(if args.dry_run { "collecting garbage (dry run)…" } else { "collecting garbage…" });
            s.enable_steady_tick(std::time::Duration::from_millis(120));
            s
        });
        let outcome = collect(&config, &state, keep, args.dry_run).await;
        if let Some(s) = spinner {
            s.finish_and_clear();
        }
        let outcome = outcome?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&outcome)?);
            return Ok(());
        }
        for r in &outcome.kept.revisions {
            let why: Vec<&str> = r
                .kept_for
                .iter()
                .map(|k| match k {
                    KeptFor::Newest => "newest",
                    KeptFor::Recent => "recent",
                    KeptFor::Pinned => "pinned",
                })
                .collect();
            println!("keep {} ({}): {} path(s), {}", &r.rev[..r.rev.len().min(12)], r.requested, r.paths, why.join(", "));
        }
        let report = &outcome.report;
        let verb = if report.dry_run { "would delete" } else { "deleted" };
        for key in &report.sample {
            println!("{verb} {key}");
        }
        let d = report.deleted;
        let total = d.objects();
        if total > report.sample.len() as u64 {
            println!("… and {} more", total - report.sample.len() as u64);
        }
        eprintln!(
            "{}: kept {} revision(s) ({} dropped), {} root path(s) ({} not in the cache), {} narinfo(s) reachable; \
             {verb} {} narinfo(s), {} NAR(s), {} listing(s), {} log(s), {:.1} MiB; {:.1} MiB kept; {:.1} s",
            outcome.cache,
            outcome.kept.revisions.len(),
            outcome.kept.dropped,
            report.roots,
            report.roots_absent,
            report.reachable,
            d.narinfos,
            d.nars,
            d.listings,
            d.logs,
            d.bytes as f64 / 1048576.0,
            report.kept.bytes as f64 / 1048576.0,
            report.seconds
        );
        if report.abandoned_uploads > 0 {
            eprintln!("dropped {} upload(s) that never ended (begun before the grace period)", report.abandoned_uploads);
        }
        Ok(())
    })
}

/// `orchestrator pin` and `unpin`.
pub fn pin(config: Option<&Path>, state_dir: Option<PathBuf>, rev: &str, pin: bool) -> Result<(), CliError> {
    runtime()?.block_on(async move {
        let state = local_state(config, state_dir).await?;
        if pin {
            let commit = state.pin(rev).await?;
            eprintln!(
                "pinned {commit}: garbage collection keeps its outputs until `orchestrator unpin {commit}`"
            );
        } else {
            match state.unpin(rev).await? {
                (commit, true) => eprintln!("unpinned {commit}"),
                (commit, false) => eprintln!("{commit} was not pinned"),
            }
        }
        Ok(())
    })
}
