//! `orchestrator serve`: the scheduler. The CLI submits revisions; the server resolves and
//! evaluates them as `build` does, queues a job per derivation the cache lacks, and builder
//! agents claim the jobs they can take. Everything is in the state database, so a restart
//! loses nothing: planned requests keep their jobs, running jobs keep their leases.
//!
//! [`http`] is the edge (routes, tokens, handlers), [`pages`] the status pages for a browser
//! and [`logs`] its build logs (the frame they share and the login in [`frame`], the logins'
//! sessions in [`sessions`], one reader per followed log in [`follow`]); [`server`] holds the
//! shared state and the round that plans and settles requests; [`settle`] decides a variant's
//! next step from its jobs alone; [`record`] is what is kept of a plan and what the CLI sees of
//! it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

mod follow;
mod frame;
mod http;
mod logs;
mod pages;
mod record;
mod server;
mod sessions;
mod settle;

pub use http::router;
pub use logs::CACHE_LOG_SHOWN;
pub use record::{LogView, RequestView, VariantView, find_log};
pub use server::{Server, Submit};

/// How long a round in progress at shutdown may take to finish.
const ROUND_GRACE: Duration = Duration::from_secs(30);

/// Serves until `shutdown`, moving requests along in the background; at shutdown the round in
/// progress ends before the server returns (or is abandoned after [`ROUND_GRACE`]; what it
/// left half done is picked up again at the next start).
pub async fn run(
    listener: tokio::net::TcpListener,
    server: Arc<Server>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = CancellationToken::new();
    let mut ticker = {
        let (server, stop) = (server.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Err(e) = server.tick().await {
                    tracing::error!(error = %e, "moving requests along");
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        })
    };
    let collector = (server.config.gc.every_hours > 0).then(|| {
        let (server, stop) = (server.clone(), stop.clone());
        tokio::spawn(collect_on_schedule(server, stop))
    });
    let limits = cache_server::listener::Limits::default();
    let served = cache_server::listener::serve(listener, router(server), limits, shutdown).await;
    stop.cancel();
    if let Some(collector) = collector {
        // A collection in progress is only a request to the cache: it finishes there.
        collector.abort();
    }
    if tokio::time::timeout(ROUND_GRACE, &mut ticker).await.is_err() {
        tracing::warn!("the round in progress did not end in time; it is picked up at the next start");
        ticker.abort();
    }
    served
}

/// Has the cache collect garbage every `gc.every-hours`, the first time one period after start
/// (a restart loop never collects in a loop). With several replicas on one database each asks;
/// the cache runs one collection at a time and refuses the others.
async fn collect_on_schedule(server: Arc<Server>, stop: CancellationToken) {
    let every = Duration::from_secs(server.config.gc.every_hours.saturating_mul(3600));
    let keep =
        crate::gc::Keep { revisions: server.config.gc.keep_revisions, days: server.config.gc.keep_days };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match crate::gc::collect(&server.config, &server.state, keep, false).await {
            Ok(o) => tracing::info!(
                cache = %o.cache,
                revisions = o.kept.revisions.len(),
                deleted = o.report.deleted.narinfos,
                freed_bytes = o.report.deleted.bytes,
                seconds = o.report.seconds,
                "garbage collected"
            ),
            Err(e) => tracing::error!(error = %e, "scheduled garbage collection"),
        }
    }
}
