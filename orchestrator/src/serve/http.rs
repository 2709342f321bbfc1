//! The HTTP edge of `orchestrator serve`: routes, authentication, and the handlers of the
//! builder API, the CLI API and the forge webhooks.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::record::{alive, find_log, view};
use super::server::{Server, Submit};
use crate::state::{AttemptEnd, StateError};
use axum::Router;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use builder::api::{ClaimRequest, Heartbeat, JobResult, LogChunk, Outcome, Register, Registered};
use cache_server::auth::presented_token;
use serde::{Deserialize, Serialize};

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        tracing::error!(error = %e, "state");
        ApiError(StatusCode::SERVICE_UNAVAILABLE, "the state database failed; retry later".to_owned())
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

impl Server {
    fn builder_name(&self, headers: &HeaderMap) -> ApiResult<String> {
        let name = presented_token(headers).and_then(|t| self.builder_tokens.check(&t));
        name.ok_or_else(|| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            ApiError(StatusCode::UNAUTHORIZED, "unknown builder token".to_owned())
        })
    }

    fn api_user(&self, headers: &HeaderMap) -> ApiResult<()> {
        match presented_token(headers).and_then(|t| self.api_tokens.check(&t).map(drop)) {
            Some(()) => Ok(()),
            None => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(ApiError(StatusCode::UNAUTHORIZED, "unknown API token".to_owned()))
            }
        }
    }
}

/// The router.
pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/", get(super::pages::overview))
        .route("/revisions/{rev}", get(super::pages::revision))
        .route("/logs", get(super::logs::log))
        .route("/logs/events", get(super::logs::events))
        .route("/builders", get(super::pages::builders))
        .route("/webhooks", get(super::pages::webhooks))
        .route("/login", get(super::frame::login_form).post(super::frame::login))
        .route("/logout", post(super::frame::logout))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/builders/register", post(register))
        .route("/api/v1/builders", get(list_builders))
        .route("/api/v1/jobs/claim", post(claim))
        .route("/api/v1/jobs/{id}/heartbeat", post(heartbeat))
        .route("/api/v1/jobs/{id}/log", post(log))
        .route("/api/v1/jobs/{id}/result", post(result))
        .route("/api/v1/builds", post(submit))
        .route("/api/v1/builds/{id}", get(request))
        .route("/api/v1/status", get(status))
        .route("/api/v1/logs", get(logs))
        .route("/api/v1/pushes", get(list_pushes))
        .route("/hooks/github", post(hook_github))
        .route("/hooks/gitea", post(hook_gitea))
        .route("/hooks/gitlab", post(hook_gitlab))
        .with_state(server)
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(value).expect("serialises"),
    )
        .into_response()
}

async fn metrics(AxState(s): AxState<Arc<Server>>) -> ApiResult {
    let mut out = String::new();
    out.push_str("# TYPE fleetcache_jobs gauge\n");
    for (status, n) in s.state.job_counts().await? {
        out.push_str(&format!("fleetcache_jobs{{status=\"{}\"}} {n}\n", status.as_str()));
    }
    let alive = alive(&s.state.builders().await?).count();
    out.push_str(&format!("# TYPE fleetcache_builders_alive gauge\nfleetcache_builders_alive {alive}\n"));
    out.push_str(&format!(
        "# TYPE fleetcache_claims_total counter\nfleetcache_claims_total {}\n",
        s.claims.load(Ordering::Relaxed)
    ));
    out.push_str(&format!(
        "# TYPE fleetcache_refused_requests_total counter\nfleetcache_refused_requests_total {}\n",
        s.refused.load(Ordering::Relaxed)
    ));
    out.push_str(&s.webhooks.metrics());
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

async fn register(
    AxState(s): AxState<Arc<Server>>,
    headers: HeaderMap,
    body: axum::Json<Register>,
) -> ApiResult {
    let name = s.builder_name(&headers)?;
    s.state.register_builder(&name, &body).await?;
    tracing::info!(builder = %name, systems = ?body.systems, features = ?body.features, "builder registered");
    s.work.notify_waiters();
    Ok(json(
        StatusCode::OK,
        &Registered {
            name,
            cache_url: s.config.cache.url.clone(),
            lease_seconds: s.config.server.lease_seconds,
        },
    ))
}

async fn list_builders(AxState(s): AxState<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    s.api_user(&headers)?;
    Ok(json(StatusCode::OK, &s.state.builders().await?))
}

async fn claim(
    AxState(s): AxState<Arc<Server>>,
    headers: HeaderMap,
    body: axum::Json<ClaimRequest>,
) -> ApiResult {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(body.wait_seconds.min(60));
    loop {
        // Checked on every round: a token revoked while its builder waits stops working within
        // a second (token files are looked at once a second).
        let name = s.builder_name(&headers)?;
        let notified = s.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let got = {
            let _one_at_a_time = s.claim_lock.lock().await;
            s.state.claim(&name, s.config.server.lease_seconds).await?
        };
        if let Some(job) = got {
            s.claims.fetch_add(1, Ordering::Relaxed);
            tracing::info!(builder = %name, job = job.id, drv = %job.drv_path, "claimed");
            return Ok(json(StatusCode::OK, &job));
        }
        // Woken by new work, or look again every second (leases expire, builders leave).
        let wake = tokio::time::Instant::now() + Duration::from_secs(1);
        if tokio::time::timeout_at(wake.min(deadline), notified).await.is_err()
            && tokio::time::Instant::now() >= deadline
        {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

fn gone() -> ApiError {
    ApiError(StatusCode::GONE, "this lease is no longer yours: the job went back to the queue".to_owned())
}

impl Server {
    /// The job `id` if builder `name` holds it with `lease` (a lease is only ever good for the
    /// builder it was handed to).
    async fn held_job(&self, id: i64, lease: &str, name: &str) -> ApiResult<crate::state::LeasedJob> {
        match self.state.leased_job(id, lease).await? {
            Some(job) if job.builder == name => Ok(job),
            _ => Err(gone()),
        }
    }
}

async fn heartbeat(
    AxState(s): AxState<Arc<Server>>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    body: axum::Json<Heartbeat>,
) -> ApiResult {
    let name = s.builder_name(&headers)?;
    s.held_job(id, &body.lease, &name).await?;
    if s.state
        .heartbeat(id, &body.lease, &body.phase, body.pushed_bytes, s.config.server.lease_seconds)
        .await?
    {
        Ok(StatusCode::OK.into_response())
    } else {
        Err(gone())
    }
}

async fn log(
    AxState(s): AxState<Arc<Server>>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    body: axum::Json<LogChunk>,
) -> ApiResult {
    let name = s.builder_name(&headers)?;
    s.held_job(id, &body.lease, &name).await?;
    if s.state.append_log(id, &body.lease, &body.text, s.config.build.max_log_bytes).await? {
        Ok(StatusCode::OK.into_response())
    } else {
        Err(gone())
    }
}

async fn result(
    AxState(s): AxState<Arc<Server>>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    body: axum::Json<JobResult>,
) -> ApiResult {
    let name = s.builder_name(&headers)?;
    let job = s.held_job(id, &body.lease, &name).await?;
    let mut end = match body.outcome {
        Outcome::Built => AttemptEnd::Built,
        Outcome::Failed => AttemptEnd::Failed,
        Outcome::PushFailed => AttemptEnd::PushFailed,
        Outcome::Refused => AttemptEnd::Interrupted,
    };
    let mut error = match (body.outcome, &body.error) {
        (Outcome::Refused, Some(e)) => Some(format!("refused by {name}: {e}")),
        (_, e) => e.clone(),
    };
    // "Built" is what the cache says, not what the builder says: every output must be there.
    if end == AttemptEnd::Built && job.kind == builder::api::JobKind::Build {
        let outputs = job
            .out_paths
            .iter()
            .map(|p| nix_formats::StorePath::from_absolute(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("job {id}: {e}")))?;
        match s.cache.client.missing(&outputs).await {
            Ok(missing) if missing.is_empty() => {}
            Ok(missing) => {
                let missing: Vec<String> = missing.iter().map(|p| p.to_string()).collect();
                tracing::warn!(builder = %name, job = id, ?missing, "reported built, but the cache lacks outputs");
                end = AttemptEnd::PushFailed;
                error = Some(format!("{name} reported it built, but the cache lacks {}", missing.join(", ")));
            }
            Err(e) => {
                // The builder retries its result; the job keeps its lease meanwhile.
                return Err(ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cannot ask the cache whether the outputs are there ({e}); retry"),
                ));
            }
        }
    }
    // A verification counts only for a job that asked for one.
    let verification = match (&job.verify, &body.verification) {
        (Some(_), v) => v.as_ref(),
        (None, Some(_)) => {
            tracing::warn!(builder = %name, job = id, "a verification for a job that asked for none; ignored");
            None
        }
        (None, None) => None,
    };
    let max = s.config.server.max_attempts;
    if s.state.finish_job(id, &body.lease, end, error.as_deref(), verification, body.seconds, max).await? {
        tracing::info!(builder = %name, job = id, outcome = ?body.outcome, "job ended");
        s.work.notify_waiters();
        Ok(StatusCode::OK.into_response())
    } else {
        tracing::info!(builder = %name, job = id, "late result ignored");
        Err(gone())
    }
}

async fn submit(AxState(s): AxState<Arc<Server>>, headers: HeaderMap, body: axum::Json<Submit>) -> ApiResult {
    s.api_user(&headers)?;
    if let Err(e) = crate::plan::Selection::new(&s.config, &body.variants) {
        return Err(ApiError(StatusCode::BAD_REQUEST, e));
    }
    let id = s.state.submit_request(&body.rev, &body.variants, body.retry_failed).await?;
    Ok(json(StatusCode::ACCEPTED, &serde_json::json!({ "id": id })))
}

async fn list_pushes(AxState(s): AxState<Arc<Server>>, headers: HeaderMap) -> ApiResult {
    s.api_user(&headers)?;
    Ok(json(StatusCode::OK, &s.state.pushes().await?))
}

async fn hook_github(
    AxState(s): AxState<Arc<Server>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    crate::webhooks::deliver(&s.webhooks, crate::webhooks::Forge::GitHub, headers, body).await
}

async fn hook_gitea(
    AxState(s): AxState<Arc<Server>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    crate::webhooks::deliver(&s.webhooks, crate::webhooks::Forge::Gitea, headers, body).await
}

async fn hook_gitlab(
    AxState(s): AxState<Arc<Server>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    crate::webhooks::deliver(&s.webhooks, crate::webhooks::Forge::GitLab, headers, body).await
}

async fn request(AxState(s): AxState<Arc<Server>>, Path(id): Path<i64>, headers: HeaderMap) -> ApiResult {
    s.api_user(&headers)?;
    match view(&s.state, id).await? {
        Some(view) => Ok(json(StatusCode::OK, &view)),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no build request {id}"))),
    }
}

#[derive(Deserialize)]
struct LogQuery {
    rev: String,
    variant: String,
}

async fn logs(AxState(s): AxState<Arc<Server>>, Query(q): Query<LogQuery>, headers: HeaderMap) -> ApiResult {
    s.api_user(&headers)?;
    match find_log(&s.state, &q.rev, &q.variant).await? {
        Some(view) => Ok(json(StatusCode::OK, &view)),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no build of variant {:?} at {:?}", q.variant, q.rev),
        )),
    }
}

#[derive(Deserialize)]
struct StatusQuery {
    limit: Option<u32>,
}

async fn status(
    AxState(s): AxState<Arc<Server>>,
    Query(q): Query<StatusQuery>,
    headers: HeaderMap,
) -> ApiResult {
    s.api_user(&headers)?;
    Ok(json(StatusCode::OK, &s.state.report(q.limit.unwrap_or(10)).await?))
}
