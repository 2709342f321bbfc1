//! Serving a router on an already-bound listener with the limits every fleetcache listener
//! holds to (cache-server and `orchestrator serve` both use it):
//!
//! - a request's headers must arrive within `header_timeout` of the connection being ready for
//!   one (so a connection that sends nothing, trickles its headers, or idles between requests
//!   is closed);
//! - at most `max_connections` connections at once (more wait in the kernel's backlog), and
//!   never more than the file descriptors allow, after raising the soft limit to the hard one;
//! - a request body that sends nothing for `body_idle_timeout` is cut ([`idle_limited`]);
//! - on shutdown, requests in flight get `drain_timeout` to finish, idle connections are closed
//!   at once, and then the server returns whatever is still open.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

/// Descriptors kept for what is not a connection (files, the state database, S3).
const RESERVED_DESCRIPTORS: u64 = 64;

/// The limits of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once. Default 4096 (fewer if the file descriptors allow fewer).
    pub max_connections: usize,
    /// Time for a request's headers to arrive, from the moment the connection waits for one.
    /// Default 10 s.
    pub header_timeout: Duration,
    /// Time a request body may send nothing. Default 60 s.
    pub body_idle_timeout: Duration,
    /// Time requests in flight get to finish after shutdown starts. Default 20 s.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit (systemd's default soft
/// limit is 1024, its hard limit far higher) and returns the soft limit now in force.
pub fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!(error = %e, "raising the open files limit");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// `wanted` connections, or fewer if `open_files` descriptors cannot hold them.
fn connection_bound(wanted: usize, open_files: u64) -> usize {
    let usable = open_files.saturating_sub(RESERVED_DESCRIPTORS).max(1);
    wanted.min(usize::try_from(usable).unwrap_or(usize::MAX)).max(1)
}

/// Serves `app` on `listener` with `limits` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max = connection_bound(limits.max_connections, raise_open_files_limit());
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let service = TowerToHyperService::new(app);
    tokio::pin!(shutdown);
    let mut warned_full = false;
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors (or a connection reset before accept): wait for one
                    // to be freed instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if slots.available_permits() == 0 && !warned_full {
            tracing::warn!(max, "the connection limit is reached; new connections wait");
        }
        warned_full = slots.available_permits() == 0;
        // Headers and a small body go out in separate writes; without TCP_NODELAY, Nagle's
        // algorithm and the client's delayed ACK hold the second one back for ~40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let conn = graceful.watch(http.serve_connection(TokioIo::new(tcp), service.clone()));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            seconds = limits.drain_timeout.as_secs(),
            "requests still running at the drain deadline; stopping"
        );
    }
    Ok(())
}

/// A body stream that fails when it sends nothing for `idle`: an upload that stalls frees its
/// connection instead of holding it for ever.
pub fn idle_limited<S, E>(body: S, idle: Duration) -> impl Stream<Item = Result<Bytes, String>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    // The state is the body until it failed: a stream that errs once ends.
    futures_util::stream::unfold(Some(Box::pin(body)), move |state| async move {
        let mut body = state?;
        match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(body))),
            Ok(Some(Err(e))) => Some((Err(e.to_string()), None)),
            Ok(None) => None,
            Err(_) => Some((Err(format!("the body sent nothing for {} s", idle.as_secs())), None)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_the_descriptors() {
        assert_eq!(connection_bound(4096, 1_048_576), 4096);
        assert_eq!(connection_bound(4096, 1024), 960);
        assert_eq!(connection_bound(4096, 10), 1);
    }

    #[tokio::test]
    async fn a_stalled_body_is_cut_and_ends() {
        let stalled = futures_util::stream::iter([Ok::<_, String>(Bytes::from_static(b"a"))])
            .chain(futures_util::stream::pending());
        let got: Vec<_> = idle_limited(stalled, Duration::from_millis(50)).collect().await;
        assert_eq!(got.len(), 2);
        assert!(got[1].as_ref().unwrap_err().contains("sent nothing"));
    }
}
