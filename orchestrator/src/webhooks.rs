//! Forge webhooks: `POST /hooks/github`, `/hooks/gitea` (and Forgejo), `/hooks/gitlab`.
//!
//! A delivery is authenticated (HMAC-SHA256 of the raw body, or GitLab's token, both compared
//! by library calls in constant time), parsed, matched against the configured repository and
//! branch, recorded once per delivery id, and answered at once with 202. The work happens in
//! [`process_pushes`]: after a debounce the newest push of the branch is kept (older ones are
//! superseded), the repository is fetched, and a build is queued only if `flake.lock` differs
//! between `before` and `after`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::Value;
use sqlx::Row as _;

use crate::forge_status::CommitState;
use crate::serve::Server;
use crate::state::StateError;

/// A forge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    /// github.com or GitHub Enterprise.
    GitHub,
    /// Gitea or Forgejo.
    Gitea,
    /// GitLab.
    GitLab,
}

impl Forge {
    fn name(self) -> &'static str {
        match self {
            Forge::GitHub => "github",
            Forge::Gitea => "gitea",
            Forge::GitLab => "gitlab",
        }
    }
}

/// What a push delivery says.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// `refs/heads/main`.
    pub ref_name: String,
    /// The branch's head before the push (all zeros for a new branch).
    pub before: String,
    /// The new head (all zeros when the branch was deleted).
    pub after: String,
    /// Names the repository goes by in the payload: full name and URLs.
    pub repository: Vec<String>,
}

/// Counters for `/metrics`, by forge and outcome.
#[derive(Default)]
pub struct HookMetrics {
    counts: std::sync::Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
}

impl HookMetrics {
    fn count(&self, forge: Forge, outcome: &'static str) {
        *self.counts.lock().expect("metrics").entry((forge.name(), outcome)).or_default() += 1;
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let mut out = "# TYPE fleetcache_webhook_deliveries_total counter\n".to_owned();
        for ((forge, outcome), n) in self.counts.lock().expect("metrics").iter() {
            out.push_str(&format!(
                "fleetcache_webhook_deliveries_total{{forge=\"{forge}\",outcome=\"{outcome}\"}} {n}\n"
            ));
        }
        out
    }
}

fn header<'a>(headers: &'a HeaderMap, names: &[&str]) -> Option<&'a str> {
    names.iter().find_map(|n| headers.get(*n).and_then(|v| v.to_str().ok()))
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Whether `signature_hex` is the HMAC-SHA256 of `body` with `secret` (constant time).
pub fn hmac_matches(secret: &[u8], body: &[u8], signature_hex: &str) -> bool {
    let Some(signature) = hex_decode(signature_hex.trim()) else { return false };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&signature).is_ok()
}

/// Reads the push out of a forge's payload.
pub fn parse_push(forge: Forge, v: &Value) -> Option<Push> {
    let s = |v: &Value| v.as_str().map(str::to_owned);
    let mut repository = Vec::new();
    let (names, repo) = match forge {
        Forge::GitLab => (["path_with_namespace", "git_http_url", "git_ssh_url", "web_url"], &v["project"]),
        Forge::GitHub | Forge::Gitea => (["full_name", "clone_url", "ssh_url", "html_url"], &v["repository"]),
    };
    for n in names {
        if let Some(x) = s(&repo[n]) {
            repository.push(x);
        }
    }
    Some(Push { ref_name: s(&v["ref"])?, before: s(&v["before"])?, after: s(&v["after"])?, repository })
}

/// A repository name or URL without the parts that vary between spellings.
fn normalise(name: &str) -> String {
    let n = name.trim().trim_end_matches('/').trim_end_matches(".git").to_ascii_lowercase();
    let n = n.split_once("://").map_or(n.as_str(), |(_, rest)| rest).to_owned();
    n.split_once('@').map_or(n.clone(), |(_, rest)| rest.replacen(':', "/", 1))
}

/// Whether a repository name's first part is a host (`github.com`, `git.lan:3000`), not an
/// owner.
fn is_host(part: &str) -> bool {
    part.contains('.') || part.contains(':') || part == "localhost"
}

/// Whether the payload's repository is the configured one: the same name or URL, or, for a
/// configured name without a host (`ops/fleet`), that name on whatever host the payload's URLs
/// name — exactly, never as a suffix of a longer path.
pub fn same_repository(configured: &str, payload_names: &[String]) -> bool {
    let want = normalise(configured);
    let want_has_host = want.split('/').next().is_some_and(is_host);
    payload_names.iter().any(|n| {
        let n = normalise(n);
        n == want
            || (!want_has_host && n.split_once('/').is_some_and(|(host, path)| is_host(host) && path == want))
    })
}

fn zeros(rev: &str) -> bool {
    !rev.is_empty() && rev.bytes().all(|b| b == b'0')
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
pub async fn deliver(server: Arc<Server>, forge: Forge, headers: HeaderMap, body: Body) -> Response {
    let cfg = &server.config.webhooks;
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
        server.hooks.count(forge, outcome);
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
    let delivery_body = match read_delivery(&server, body, cfg.max_body_bytes).await {
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
        server.hooks.count(forge, "ping");
        return answer(StatusCode::OK, "pong", None);
    }
    let payload: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return reject(StatusCode::BAD_REQUEST, "malformed JSON"),
    };
    let is_push = matches!(event, "push" | "Push Hook") || payload["object_kind"] == "push";
    let ignore = |outcome: &'static str| {
        server.hooks.count(forge, outcome);
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
    match record(&server, forge, &delivery, &push).await {
        Ok(true) => {
            server.hooks.count(forge, "accepted");
            tracing::info!(forge = forge.name(), delivery = %delivery, after = %push.after, "push recorded");
            answer(StatusCode::ACCEPTED, "queued", Some(&push.after))
        }
        Ok(false) => {
            server.hooks.count(forge, "redelivery");
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
/// budget spent by other deliveries is "busy" (503), not a wait.
async fn read_delivery(server: &Server, body: Body, max: usize) -> Result<Delivery<'_>, DeliveryError> {
    use futures_util::StreamExt as _;
    let idle = cache_server::listener::Limits::default().body_idle_timeout;
    let mut stream = std::pin::pin!(cache_server::listener::idle_limited(body.into_data_stream(), idle));
    let mut held = Vec::new();
    let mut bytes = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| DeliveryError::Broken)?;
        if bytes.len() + chunk.len() > max {
            return Err(DeliveryError::TooLarge);
        }
        let permit = u32::try_from(chunk.len()).ok().and_then(|n| server.hook_bytes.try_acquire_many(n).ok());
        held.push(permit.ok_or(DeliveryError::Busy)?);
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

/// Records a push once per delivery; false for a redelivery.
async fn record(server: &Server, forge: Forge, delivery: &str, push: &Push) -> Result<bool, StateError> {
    let state = &server.state;
    let r = sqlx::query(&state.sql(
        "INSERT INTO pushes (forge, delivery, ref_name, before_rev, after_rev, received_ms, decision)
         VALUES (?, ?, ?, ?, ?, ?, 'pending') ON CONFLICT (forge, delivery) DO NOTHING",
    ))
    .bind(forge.name())
    .bind(delivery)
    .bind(&push.ref_name)
    .bind(&push.before)
    .bind(&push.after)
    .bind(now_millis())
    .execute(&state.pool)
    .await
    .map_err(|e| state.err(e))?;
    Ok(r.rows_affected() == 1)
}

/// A recorded push, for `GET /api/v1/pushes`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PushRecord {
    /// `github`, `gitea`, `gitlab`.
    pub forge: String,
    /// The forge's delivery id.
    pub delivery: String,
    /// The ref pushed.
    pub ref_name: String,
    /// Head before.
    pub before: String,
    /// Head after.
    pub after: String,
    /// `pending`, `queued` (a build request was made), `unchanged` (flake.lock is the same),
    /// `superseded` (a newer push came first) or `failed: …`.
    pub decision: String,
    /// The build request, when queued.
    pub request_id: Option<i64>,
}

/// The newest pushes.
pub async fn pushes(state: &crate::state::State) -> Result<Vec<PushRecord>, StateError> {
    let rows = sqlx::query(&state.sql(
        "SELECT forge, delivery, ref_name, before_rev, after_rev, decision, request_id FROM pushes ORDER BY id DESC LIMIT 100",
    ))
    .fetch_all(&state.pool)
    .await
    .map_err(|e| state.err(e))?;
    Ok(rows
        .into_iter()
        .map(|r| PushRecord {
            forge: r.get(0),
            delivery: r.get(1),
            ref_name: r.get(2),
            before: r.get(3),
            after: r.get(4),
            decision: r.get(5),
            request_id: r.get(6),
        })
        .collect())
}

/// Decides the pushes whose debounce has passed: the newest per ref is looked at, older ones
/// are superseded; a build is queued if `flake.lock` changed.
pub async fn process_pushes(server: &Server) -> Result<(), StateError> {
    let state = &server.state;
    let debounce = server.config.webhooks.debounce_seconds as i64 * 1000;
    let rows = sqlx::query(&state.sql(
        "SELECT id, ref_name, before_rev, after_rev, received_ms FROM pushes WHERE decision = 'pending' ORDER BY id",
    ))
    .fetch_all(&state.pool)
    .await
    .map_err(|e| state.err(e))?;
    let newest_received = rows.iter().map(|r| r.get::<i64, _>(4)).max().unwrap_or(0);
    if rows.is_empty() || now_millis() - newest_received < debounce {
        return Ok(());
    }
    let mut newest_per_ref: std::collections::BTreeMap<String, (i64, String, String)> = Default::default();
    for r in &rows {
        let (id, ref_name, before, after): (i64, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        if let Some((older, _, _)) = newest_per_ref.insert(ref_name, (id, before, after)) {
            decide(state, older, "superseded", None).await?;
        }
    }
    for (_, (id, before, after)) in newest_per_ref {
        // Claim the decision so one replica makes it.
        let mine = sqlx::query(
            &state.sql("UPDATE pushes SET decision = 'deciding' WHERE id = ? AND decision = 'pending'"),
        )
        .bind(id)
        .execute(&state.pool)
        .await
        .map_err(|e| state.err(e))?;
        if mine.rows_affected() != 1 {
            continue;
        }
        let repo = server.repo.clone();
        let (b, a) = (before.clone(), after.clone());
        let changed = tokio::task::spawn_blocking(move || {
            repo.fetch()?;
            repo.lock_changed(&b, &a)
        })
        .await
        .expect("lock comparison task");
        match changed {
            Ok(true) => {
                let request = crate::serve::submit_request(state, &after, &[], false).await?;
                decide(state, id, "queued", Some(request)).await?;
                tracing::info!(after = %after, request, "flake.lock changed: build queued");
                report_status(server, &after, CommitState::Pending, "building the variants").await;
            }
            Ok(false) => {
                decide(state, id, "unchanged", None).await?;
                tracing::info!(after = %after, "flake.lock unchanged: nothing to build");
            }
            Err(e) => {
                decide(state, id, &format!("failed: {e}"), None).await?;
                tracing::warn!(after = %after, error = %e, "could not compare flake.lock");
            }
        }
    }
    Ok(())
}

/// Reports a commit status if configured; a forge that refuses is logged, not fatal.
pub async fn report_status(server: &Server, sha: &str, state: CommitState, description: &str) {
    let Some(cfg) = &server.config.webhooks.status else { return };
    let fallback = server.config.webhooks.repository.as_deref();
    let http = match builder::http::client() {
        Ok(http) => http,
        Err(e) => return tracing::warn!(sha, error = %e, "could not set the commit status"),
    };
    if let Err(e) = crate::forge_status::report(&http, cfg, fallback, sha, state, description).await {
        tracing::warn!(sha, error = %e, "could not set the commit status");
    }
}

/// The commit a build request was queued for by a push, if it was.
pub async fn pushed_commit(state: &crate::state::State, request: i64) -> Result<Option<String>, StateError> {
    let row = sqlx::query(&state.sql("SELECT after_rev FROM pushes WHERE request_id = ?"))
        .bind(request)
        .fetch_optional(&state.pool)
        .await
        .map_err(|e| state.err(e))?;
    Ok(row.map(|r| r.get(0)))
}

async fn decide(
    state: &crate::state::State,
    id: i64,
    decision: &str,
    request: Option<i64>,
) -> Result<(), StateError> {
    sqlx::query(&state.sql("UPDATE pushes SET decision = ?, request_id = ? WHERE id = ?"))
        .bind(decision)
        .bind(request)
        .bind(id)
        .execute(&state.pool)
        .await
        .map_err(|e| state.err(e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        // RFC 4231 test case 2.
        let sig = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert!(hmac_matches(b"Jefe", b"what do ya want for nothing?", sig));
        assert!(!hmac_matches(b"Jefe", b"what do ya want for nothing!", sig));
        assert!(!hmac_matches(b"jefe", b"what do ya want for nothing?", sig));
        assert!(!hmac_matches(b"Jefe", b"what do ya want for nothing?", "zz"));
        assert!(!hmac_matches(b"Jefe", b"what do ya want for nothing?", ""));
    }

    #[test]
    fn repositories_match_by_name_or_url() {
        let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let gh = names(&["ops/fleet", "https://github.com/ops/fleet.git", "git@github.com:ops/fleet.git"]);
        assert!(same_repository("ops/fleet", &gh));
        assert!(same_repository("https://github.com/Ops/fleet", &gh));
        assert!(same_repository("git@github.com:ops/fleet.git", &gh));
        assert!(!same_repository("ops/fleet-old", &gh));
        assert!(!same_repository("evil/ops/fleet2", &gh));
        assert!(!same_repository("other/fleet", &gh));
        // Another repository whose path merely ends in the configured name.
        let evil = names(&["x/ops/fleet", "https://evil.org/x/ops/fleet", "git@evil.org:x/ops/fleet.git"]);
        assert!(!same_repository("ops/fleet", &evil));
        // GitLab's nested groups are names like any other.
        let lab = names(&["infra/ops/fleet", "https://gitlab.example.org/infra/ops/fleet.git"]);
        assert!(same_repository("infra/ops/fleet", &lab));
        assert!(!same_repository("ops/fleet", &lab));
    }
}
