//! Forge webhooks: `POST /hooks/github`, `/hooks/gitea` (and Forgejo), `/hooks/gitlab`.
//!
//! A delivery is authenticated (HMAC-SHA256 of the raw body, or GitLab's token, both compared
//! by library calls in constant time), parsed, matched against the configured repository and
//! branch, recorded once per delivery id, and answered at once with 202. The work happens in
//! [`Webhooks::process_pushes`]: after a debounce the newest push of the branch is kept (older ones are
//! superseded), the repository is fetched, and a build is queued only if `flake.lock` differs
//! between `before` and `after`.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use crate::config::WebhooksConfig;
use crate::flake::FleetRepo;
use crate::forge_status::CommitState;
use crate::state::{Decision, NewPush, PendingPush, State, StateError};

mod payload;

pub use payload::{Forge, Push, hmac_matches, parse_push, same_repository};
use payload::{header, zeros};

/// The webhook endpoints and what decides their pushes: the settings, the state the pushes and
/// the build requests they make are recorded in, and the fleet repository their `flake.lock`
/// is compared in.
pub struct Webhooks {
    config: WebhooksConfig,
    state: State,
    repo: FleetRepo,
    metrics: HookMetrics,
    /// Bytes of bodies that may be held at once ([`DELIVERY_BUDGET`]).
    budget: tokio::sync::Semaphore,
}

/// Counters for `/metrics`, by forge and outcome.
#[derive(Default)]
struct HookMetrics {
    counts: std::sync::Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
}

impl HookMetrics {
    fn count(&self, forge: Forge, outcome: &'static str) {
        *self.counts.lock().expect("metrics").entry((forge.name(), outcome)).or_default() += 1;
    }

    /// Prometheus text.
    fn render(&self) -> String {
        let mut out = "# TYPE fleetcache_webhook_deliveries_total counter\n".to_owned();
        for ((forge, outcome), n) in self.counts.lock().expect("metrics").iter() {
            out.push_str(&format!(
                "fleetcache_webhook_deliveries_total{{forge=\"{forge}\",outcome=\"{outcome}\"}} {n}\n"
            ));
        }
        out
    }
}

#[derive(Serialize)]
struct Answer<'a> {
    outcome: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<&'a str>,
}

fn answer(status: StatusCode, outcome: &str, revision: Option<&str>) -> Response {
    let body = serde_json::to_string(&Answer { outcome, revision }).expect("serialises");
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Handles one delivery for `forge`. The body is read here, up to the configured limit (the
/// web framework's own limit does not apply), so an oversized delivery is counted and logged.
pub async fn deliver(hooks: &Webhooks, forge: Forge, headers: HeaderMap, body: Body) -> Response {
    let cfg = &hooks.config;
    let secret_file = match forge {
        Forge::GitHub => &cfg.github_secret_file,
        Forge::Gitea => &cfg.gitea_secret_file,
        Forge::GitLab => &cfg.gitlab_token_file,
    };
    let Some(secret_file) = secret_file else {
        return (StatusCode::NOT_FOUND, "no such endpoint\n").into_response();
    };
    let delivery = header(
        &headers,
        &[
            "x-github-delivery",
            "x-gitea-delivery",
            "x-forgejo-delivery",
            "idempotency-key",
            "x-gitlab-event-uuid",
        ],
    )
    .unwrap_or("")
    .to_owned();
    let reject = |status: StatusCode, outcome: &'static str| {
        hooks.metrics.count(forge, outcome);
        tracing::warn!(forge = forge.name(), delivery = %delivery, outcome, "webhook rejected");
        answer(status, outcome, None)
    };
    // What the forge signs with, checked before a byte of the body is read: a delivery without a
    // well-formed signature (or token) costs nothing.
    let signature = match forge {
        Forge::GitHub => header(&headers, &["x-hub-signature-256"]).and_then(|v| v.strip_prefix("sha256=")),
        Forge::Gitea => header(&headers, &["x-gitea-signature", "x-forgejo-signature"]),
        Forge::GitLab => header(&headers, &["x-gitlab-token"]),
    };
    let well_formed = |s: &&str| match forge {
        Forge::GitHub | Forge::Gitea => s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()),
        Forge::GitLab => !s.trim().is_empty(),
    };
    let Some(signature) = signature.filter(well_formed) else {
        return reject(StatusCode::UNAUTHORIZED, "bad signature");
    };
    let secret = match read_secret(secret_file) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "webhook secret unusable");
            return reject(StatusCode::SERVICE_UNAVAILABLE, "secret unusable");
        }
    };
    let delivery_body = match read_delivery(hooks, &headers, body, cfg.max_body_bytes).await {
        Ok(b) => b,
        Err(DeliveryError::TooLarge) => return reject(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
        Err(DeliveryError::Busy) => {
            return reject(StatusCode::SERVICE_UNAVAILABLE, "too many deliveries at once");
        }
        Err(DeliveryError::Broken) => return reject(StatusCode::BAD_REQUEST, "body interrupted"),
    };
    let body = &delivery_body.bytes;
    let authentic = match forge {
        Forge::GitHub | Forge::Gitea => hmac_matches(&secret, body, signature),
        Forge::GitLab => bool::from(subtle::ConstantTimeEq::ct_eq(signature.as_bytes(), secret.as_slice())),
    };
    if !authentic {
        return reject(StatusCode::UNAUTHORIZED, "bad signature");
    }
    let event = header(&headers, &["x-github-event", "x-gitea-event", "x-forgejo-event", "x-gitlab-event"])
        .unwrap_or("");
    if event == "ping" {
        hooks.metrics.count(forge, "ping");
        return answer(StatusCode::OK, "pong", None);
    }
    let payload: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return reject(StatusCode::BAD_REQUEST, "malformed JSON"),
    };
    let is_push = matches!(event, "push" | "Push Hook") || payload["object_kind"] == "push";
    let ignore = |outcome: &'static str| {
        hooks.metrics.count(forge, outcome);
        tracing::info!(forge = forge.name(), delivery = %delivery, outcome, "webhook ignored");
        answer(StatusCode::ACCEPTED, outcome, None)
    };
    if !is_push {
        return ignore("ignored: not a push");
    }
    let Some(push) = parse_push(forge, &payload) else {
        return reject(StatusCode::BAD_REQUEST, "not a push payload");
    };
    let configured = cfg.repository.as_deref().unwrap_or_default();
    if !same_repository(configured, &push.repository) {
        return ignore("ignored: another repository");
    }
    if push.ref_name != format!("refs/heads/{}", cfg.branch) {
        return ignore("ignored: another branch or a tag");
    }
    if zeros(&push.after) {
        return ignore("ignored: branch deleted");
    }
    let commit = matches!(push.after.len(), 40 | 64) && push.after.bytes().all(|b| b.is_ascii_hexdigit());
    if delivery.is_empty() || !commit {
        return reject(StatusCode::BAD_REQUEST, "no delivery id or no commit");
    }
    let record = NewPush {
        forge: forge.name(),
        delivery: &delivery,
        ref_name: &push.ref_name,
        before: &push.before,
        after: &push.after,
        received_ms: now_millis(),
    };
    match hooks.state.record_push(&record).await {
        Ok(true) => {
            hooks.metrics.count(forge, "accepted");
            tracing::info!(forge = forge.name(), delivery = %delivery, after = %push.after, "push recorded");
            answer(StatusCode::ACCEPTED, "queued", Some(&push.after))
        }
        Ok(false) => {
            hooks.metrics.count(forge, "redelivery");
            answer(StatusCode::OK, "already received", Some(&push.after))
        }
        Err(e) => {
            tracing::error!(error = %e, "recording a push");
            reject(StatusCode::SERVICE_UNAVAILABLE, "state database failed")
        }
    }
}

/// Why a webhook secret cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file cannot be read.
    #[error("webhook secret {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// It holds nothing but blanks: anyone could sign with it (an empty HMAC key, an empty
    /// GitLab token).
    #[error("webhook secret {} is empty: the endpoint would accept anyone's deliveries", path.display())]
    Empty {
        /// The file.
        path: std::path::PathBuf,
    },
}

/// A webhook secret file's secret, refused when empty.
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, SecretError> {
    let text = std::fs::read(path).map_err(|source| SecretError::Read { path: path.to_owned(), source })?;
    let secret = text.trim_ascii();
    if secret.is_empty() {
        return Err(SecretError::Empty { path: path.to_owned() });
    }
    Ok(secret.to_vec())
}

/// Bytes of webhook bodies held at once across deliveries, before their signature is checked:
/// parallel unsigned deliveries cannot take more memory than this.
pub const DELIVERY_BUDGET: usize = 32 << 20;

enum DeliveryError {
    TooLarge,
    Busy,
    Broken,
}

/// A delivery's body, holding its share of [`DELIVERY_BUDGET`] for as long as it lives.
struct Delivery<'a> {
    bytes: Bytes,
    _held: Vec<tokio::sync::SemaphorePermit<'a>>,
}

/// Reads a delivery's body, up to `max` bytes, taking its bytes from the shared budget; a
/// budget spent by other deliveries is "busy" (503), not a wait. A body of declared length
/// takes all of it at once, before a byte is read, so deliveries arriving together are each
/// read whole or refused at once, never all starved half-read; one of unknown length takes its
/// bytes as they come.
async fn read_delivery<'a>(
    hooks: &'a Webhooks,
    headers: &HeaderMap,
    body: Body,
    max: usize,
) -> Result<Delivery<'a>, DeliveryError> {
    use futures_util::StreamExt as _;
    let take = |n: usize| {
        let permit = u32::try_from(n).ok().and_then(|n| hooks.budget.try_acquire_many(n).ok());
        permit.ok_or(DeliveryError::Busy)
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut held = Vec::new();
    if let Some(n) = declared {
        if n > max {
            return Err(DeliveryError::TooLarge);
        }
        held.push(take(n)?);
    }
    let idle = cache_server::listener::Limits::default().body_idle_timeout;
    let mut stream = std::pin::pin!(cache_server::listener::idle_limited(body.into_data_stream(), idle));
    let mut bytes = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| DeliveryError::Broken)?;
        // The server holds a body to its declared length; the check is for one of unknown length.
        if bytes.len() + chunk.len() > declared.unwrap_or(max) {
            return Err(DeliveryError::TooLarge);
        }
        if declared.is_none() {
            held.push(take(chunk.len())?);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Delivery { bytes: bytes.freeze(), _held: held })
}

/// Unix milliseconds: the debounce is shorter than a second in tests.
fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Webhooks {
    /// The endpoints `config` configures, recording into `state`, comparing in `repo`.
    pub fn new(config: WebhooksConfig, state: State, repo: FleetRepo) -> Self {
        Webhooks {
            config,
            state,
            repo,
            metrics: HookMetrics::default(),
            budget: tokio::sync::Semaphore::new(DELIVERY_BUDGET),
        }
    }

    /// The deliveries counted so far, as Prometheus text.
    pub fn metrics(&self) -> String {
        self.metrics.render()
    }

    /// Decides the pushes whose debounce has passed: the newest per ref is looked at, older
    /// ones are superseded; a build is queued if `flake.lock` changed.
    pub async fn process_pushes(&self) -> Result<(), StateError> {
        let state = &self.state;
        let debounce = self.config.debounce_seconds as i64 * 1000;
        let pending = state.pending_pushes().await?;
        let newest_received = pending.iter().map(|p| p.received_ms).max().unwrap_or(0);
        if pending.is_empty() || now_millis() - newest_received < debounce {
            return Ok(());
        }
        let mut newest_per_ref = std::collections::BTreeMap::new();
        for p in pending {
            if let Some(older) = newest_per_ref.insert(p.ref_name.clone(), p) {
                state.decide_push(older.id, &Decision::Superseded, None).await?;
            }
        }
        for push in newest_per_ref.into_values() {
            // Take the decision so one replica makes it.
            if state.take_push(push.id).await? {
                self.decide(push).await?;
            }
        }
        Ok(())
    }

    /// Fetches the repository and queues a build of the push's head if its `flake.lock`
    /// differs from the one before.
    async fn decide(&self, push: PendingPush) -> Result<(), StateError> {
        let repo = self.repo.clone();
        let (before, after) = (push.before.clone(), push.after.clone());
        let changed = tokio::task::spawn_blocking(move || {
            repo.fetch()?;
            repo.lock_changed(&before, &after)
        })
        .await
        .expect("lock comparison task");
        let after = &push.after;
        match changed {
            Ok(true) => {
                let request = self.state.submit_request(after, &[], false).await?;
                self.state.decide_push(push.id, &Decision::Queued, Some(request)).await?;
                tracing::info!(%after, request, "flake.lock changed: build queued");
                self.report_status(after, CommitState::Pending, "building the variants").await;
            }
            Ok(false) => {
                self.state.decide_push(push.id, &Decision::Unchanged, None).await?;
                tracing::info!(%after, "flake.lock unchanged: nothing to build");
            }
            Err(e) => {
                self.state.decide_push(push.id, &Decision::Failed(e.to_string()), None).await?;
                tracing::warn!(%after, error = %e, "could not compare flake.lock");
            }
        }
        Ok(())
    }

    /// Tells the forge how the build `request` ended, if a push queued it: `failed` names the
    /// variants that failed, of `variants`.
    pub async fn request_ended(
        &self,
        request: i64,
        failed: &[&str],
        variants: usize,
    ) -> Result<(), StateError> {
        let Some(sha) = self.state.pushed_commit(request).await? else { return Ok(()) };
        let (state, text) = if failed.is_empty() {
            (CommitState::Success, format!("{variants} variants cached or built"))
        } else {
            (CommitState::Failure, format!("failed: {}", failed.join(", ")))
        };
        self.report_status(&sha, state, &text).await;
        Ok(())
    }

    /// Reports a commit status if configured; a forge that refuses is logged, not fatal.
    async fn report_status(&self, sha: &str, state: CommitState, description: &str) {
        let Some(cfg) = &self.config.status else { return };
        let fallback = self.config.repository.as_deref();
        let http = match builder::http::client() {
            Ok(http) => http,
            Err(e) => return tracing::warn!(sha, error = %e, "could not set the commit status"),
        };
        if let Err(e) = crate::forge_status::report(&http, cfg, fallback, sha, state, description).await {
            tracing::warn!(sha, error = %e, "could not set the commit status");
        }
    }
}
