//! `orchestrator serve`: the scheduler. The CLI submits revisions; the server resolves and
//! evaluates them as `build` does, queues a job per derivation the cache lacks, and builder
//! agents claim the jobs they can take. Everything is in the state database, so a restart
//! loses nothing: planned requests keep their jobs, running jobs keep their leases.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use builder::api::{JobKind, Verification, VerifySpec, VerifyStatus};
use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use tokio_util::sync::CancellationToken;

use crate::cache::CacheTarget;
use crate::config::Config;
use crate::context::{BuildOptions, Context};
use crate::flake::{FleetRepo, LockedInput};
use crate::outcome::{Status, VariantResult};
use crate::plan::{Plan, Selection, plan};
use crate::queue::{BuilderInfo, NewJob};
use crate::report::Quiet;
use crate::state::{State, StateError, now};
use cache_server::auth::TokenFile;

mod http;

pub use http::router;

/// Builders not heard from for this long do not count as able to take a job.
const BUILDER_ALIVE: i64 = 120;

/// Everything the handlers share.
pub struct Server {
    /// The database.
    pub state: State,
    /// The settings.
    pub config: Config,
    /// The fleet repository.
    pub repo: FleetRepo,
    /// The cache (remote), asked what it lacks.
    pub cache: Arc<CacheTarget>,
    /// Builder tokens.
    pub builder_tokens: TokenFile,
    /// CLI tokens.
    pub api_tokens: TokenFile,
    /// Woken when jobs are queued or released.
    pub work: tokio::sync::Notify,
    /// Claims are serialised (one server owns a SQLite queue).
    pub claim_lock: tokio::sync::Mutex<()>,
    /// Jobs handed out.
    pub claims: AtomicU64,
    /// Requests refused for a bad token.
    pub refused: AtomicU64,
    /// Webhook deliveries by forge and outcome.
    pub hooks: crate::webhooks::HookMetrics,
    /// Bytes of webhook bodies that may be held at once ([`crate::webhooks::DELIVERY_BUDGET`]).
    pub hook_bytes: tokio::sync::Semaphore,
}

/// A submitted build, as the CLI sends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submit {
    /// A commit, tag or branch.
    pub rev: String,
    /// Variant names; empty for all.
    #[serde(default)]
    pub variants: Vec<String>,
    /// Rebuild known failures.
    #[serde(default)]
    pub retry_failed: bool,
}

/// A planned request, kept in the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Snapshot {
    revision_id: i64,
    flake: String,
    requested: String,
    commit: String,
    inputs: BTreeMap<String, LockedInput>,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    label: String,
    result: VariantResult,
    done: bool,
    #[serde(default)]
    verify: Option<VerifySpec>,
    #[serde(default)]
    main_output: Option<String>,
}

fn unverified(detail: String) -> Verification {
    Verification { status: VerifyStatus::Unverified, detail, by: String::new() }
}

/// A request as the CLI follows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestView {
    /// `pending` (not planned yet), `planning`, `running`, `done` or `error`.
    pub status: String,
    /// Why it could not be planned.
    pub error: Option<String>,
    /// The fleet flake.
    pub flake: Option<String>,
    /// What was asked.
    pub requested: String,
    /// The commit, once resolved.
    pub commit: Option<String>,
    /// The locked inputs, once read.
    pub inputs: BTreeMap<String, LockedInput>,
    /// One per variant × system.
    pub variants: Vec<VariantView>,
}

/// A variant of a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantView {
    /// Its label in reports.
    pub label: String,
    /// Where it stands, in words.
    pub phase: String,
    /// Whether it ended (then `result.status` says how).
    pub done: bool,
    /// The result so far.
    pub result: VariantResult,
}

impl Server {
    fn context(&self, retry_failed: bool) -> Context {
        Context {
            state: self.state.clone(),
            cache: self.cache.clone(),
            reporter: Arc::new(Quiet),
            owner: format!("orchestrator:{}", std::process::id()),
            cancel: CancellationToken::new(),
            options: BuildOptions {
                retry_failed,
                max_jobs: 1,
                push: builder::push::PushOptions::default(),
                max_log_bytes: self.config.build.max_log_bytes,
                features: Vec::new(),
            },
        }
    }

    /// Plans a pending request and queues its jobs.
    async fn plan_request(&self, id: i64, submit: &Submit) -> Result<(), StateError> {
        let selection = match Selection::new(&self.config, &submit.variants) {
            Ok(v) => v,
            Err(e) => return self.set_request(id, "error", None, Some(&e)).await,
        };
        let ctx = self.context(submit.retry_failed);
        let planned: Result<Plan, _> = plan(&ctx, &self.repo, &submit.rev, &selection).await;
        let planned = match planned {
            Ok(p) => p,
            Err(crate::plan::PlanError::State(e)) => return Err(e),
            Err(e) => return self.set_request(id, "error", None, Some(&e.to_string())).await,
        };
        let builder_url = self.repo.builder_flake_url(&planned.commit);
        for (drv, idx) in planned.to_build() {
            let job = &planned.jobs[idx[0]];
            let eval = job.eval.as_ref().expect("evaluated");
            let features = planned.features_of(&idx);
            let out_paths: Vec<String> = eval.outputs.values().map(|p| p.to_absolute()).collect();
            let files = planned.files_of(&idx);
            self.state
                .enqueue(&NewJob {
                    drv_path: &drv.to_absolute(),
                    system: &job.system,
                    features: &features,
                    flake_url: &builder_url,
                    attr_path: &job.attr_path,
                    out_paths: &out_paths,
                    required_files: &files,
                    verify: job.verify.as_ref(),
                })
                .await?;
        }
        self.work.notify_waiters();
        let snapshot = snapshot_of(&planned, &self.repo.reference, &submit.rev);
        // `status` shows the variants while they are queued, not only once they ended.
        self.record_variants(&snapshot).await?;
        self.set_request(id, "running", Some(&snapshot), None).await
    }

    /// Records every variant of a request: its result once it ended, else `queued`.
    async fn record_variants(&self, snap: &Snapshot) -> Result<(), StateError> {
        for e in &snap.entries {
            let status = if e.done { e.result.status.as_str() } else { "queued" };
            self.state.record_variant(snap.revision_id, &e.result, status).await?;
        }
        Ok(())
    }

    async fn set_request(
        &self,
        id: i64,
        status: &str,
        snapshot: Option<&Snapshot>,
        error: Option<&str>,
    ) -> Result<(), StateError> {
        sqlx::query(&self.state.sql("UPDATE requests SET status = ?, plan = coalesce(?, plan), error = ?, updated_at = ? WHERE id = ?"))
            .bind(status)
            .bind(snapshot.map(|s| serde_json::to_string(s).expect("serialises")))
            .bind(error)
            .bind(now())
            .bind(id)
            .execute(&self.state.pool)
            .await
            .map_err(|e| self.state.err(e))?;
        Ok(())
    }

    /// Moves every request along: plans pending ones, ends running ones whose jobs ended.
    async fn tick(&self) -> Result<(), StateError> {
        crate::webhooks::process_pushes(self).await?;
        let max_attempts = self.config.server.max_attempts;
        if self.state.reap_expired(max_attempts).await? > 0 {
            self.work.notify_waiters();
        }
        // A replica that died while planning leaves its request to the others.
        sqlx::query(
            &self
                .state
                .sql("UPDATE requests SET status = 'pending' WHERE status = 'planning' AND updated_at < ?"),
        )
        .bind(now() - 600)
        .execute(&self.state.pool)
        .await
        .map_err(|e| self.state.err(e))?;
        let rows = sqlx::query(&self.state.sql("SELECT id, status, requested, variants, retry_failed, plan, created_at FROM requests WHERE status IN ('pending', 'running') ORDER BY id"))
            .fetch_all(&self.state.pool)
            .await
            .map_err(|e| self.state.err(e))?;
        for r in rows {
            let (id, status, created): (i64, String, i64) = (r.get(0), r.get(1), r.get(6));
            if status == "pending" {
                // One replica plans it: whoever moves it out of `pending` first.
                let mine = sqlx::query(&self.state.sql(
                    "UPDATE requests SET status = 'planning', updated_at = ? WHERE id = ? AND status = 'pending'",
                ))
                .bind(now())
                .bind(id)
                .execute(&self.state.pool)
                .await
                .map_err(|e| self.state.err(e))?;
                if mine.rows_affected() != 1 {
                    continue;
                }
                let submit = Submit {
                    rev: r.get(2),
                    variants: serde_json::from_str(r.get::<&str, _>(3)).unwrap_or_default(),
                    retry_failed: r.get::<i64, _>(4) != 0,
                };
                self.plan_request(id, &submit).await?;
                continue;
            }
            let Some(mut snap) =
                r.get::<Option<String>, _>(5).and_then(|p| serde_json::from_str::<Snapshot>(&p).ok())
            else {
                continue;
            };
            let drvs: Vec<String> = snap.entries.iter().filter_map(|e| e.result.drv_path.clone()).collect();
            let jobs = self.state.jobs_for(&drvs, JobKind::Build).await?;
            let checks = self.state.jobs_for(&drvs, JobKind::Verify).await?;
            let mut builders = None;
            let mut changed = false;
            for e in snap.entries.iter_mut().filter(|e| !e.done) {
                let Some(drv) = e.result.drv_path.clone() else { continue };
                let Some(job) = jobs.get(&drv) else { continue };
                let status = match job.status.as_str() {
                    "built" => Status::Built,
                    "failed" => Status::Failed,
                    _ => continue,
                };
                let mut verification = job.verification.clone();
                // Built where the verification could not run: a builder with its features runs it.
                let settled = |v: &Option<Verification>| {
                    v.as_ref().is_some_and(|v| v.status != VerifyStatus::Unverified)
                };
                if let (Status::Built, Some(spec), Some(output)) = (status, &e.verify, &e.main_output)
                    && !settled(&verification)
                {
                    match checks.get(&drv) {
                        Some(check) if check.status == "built" => verification = check.verification.clone(),
                        Some(check) if check.status == "failed" => {
                            verification = Some(unverified(format!(
                                "the verification could not run: {}",
                                check.error.as_deref().unwrap_or("?")
                            )));
                        }
                        Some(_) => continue,
                        None => {
                            if builders.is_none() {
                                builders = Some(self.state.builders().await?);
                            }
                            let alive = builders
                                .as_deref()
                                .unwrap_or_default()
                                .iter()
                                .filter(|b| now() - b.last_seen < BUILDER_ALIVE);
                            if alive.clone().any(|b| b.can_take(&job.system, &spec.features)) {
                                self.state.enqueue_verification(&drv, &job.system, output, spec).await?;
                                self.work.notify_waiters();
                                continue;
                            }
                            verification = Some(unverified(format!(
                                "no registered builder has {} to verify it",
                                spec.features.join(", ")
                            )));
                        }
                    }
                }
                e.done = true;
                e.result.status = status;
                e.result.error = job.error.clone();
                e.result.verification = verification;
                e.result.seconds = (now() - created) as f64;
                changed = true;
            }
            if snap.entries.iter().all(|e| e.done) {
                self.record_variants(&snap).await?;
                self.set_request(id, "done", Some(&snap), None).await?;
                if let Some(sha) = crate::webhooks::pushed_commit(&self.state, id).await? {
                    let failed: Vec<&str> = snap
                        .entries
                        .iter()
                        .filter(|e| e.result.status == Status::Failed)
                        .map(|e| e.label.as_str())
                        .collect();
                    let (state, text) = if failed.is_empty() {
                        (
                            crate::forge_status::CommitState::Success,
                            format!("{} variants cached or built", snap.entries.len()),
                        )
                    } else {
                        (crate::forge_status::CommitState::Failure, format!("failed: {}", failed.join(", ")))
                    };
                    crate::webhooks::report_status(self, &sha, state, &text).await;
                }
            } else if changed {
                self.set_request(id, "running", Some(&snap), None).await?;
            }
        }
        Ok(())
    }

    /// The request as the CLI sees it, with live phases from the jobs and builders; None if
    /// there is no such request.
    async fn view(&self, id: i64) -> Result<Option<RequestView>, StateError> {
        let Some(r) = sqlx::query(
            &self.state.sql("SELECT status, error, requested, plan, created_at FROM requests WHERE id = ?"),
        )
        .bind(id)
        .fetch_optional(&self.state.pool)
        .await
        .map_err(|e| self.state.err(e))?
        else {
            return Ok(None);
        };
        let snap: Option<Snapshot> =
            r.get::<Option<String>, _>(3).and_then(|p| serde_json::from_str(&p).ok());
        let mut view = RequestView {
            status: r.get(0),
            error: r.get(1),
            flake: snap.as_ref().map(|s| s.flake.clone()),
            requested: r.get(2),
            commit: snap.as_ref().map(|s| s.commit.clone()),
            inputs: snap.as_ref().map(|s| s.inputs.clone()).unwrap_or_default(),
            variants: Vec::new(),
        };
        let Some(snap) = snap else { return Ok(Some(view)) };
        let created: i64 = r.get(4);
        let drvs: Vec<String> = snap.entries.iter().filter_map(|e| e.result.drv_path.clone()).collect();
        let jobs = self.state.jobs_for(&drvs, JobKind::Build).await?;
        let checks = self.state.jobs_for(&drvs, JobKind::Verify).await?;
        let builders = self.state.builders().await?;
        for e in snap.entries {
            let mut result = e.result.clone();
            let phase = if e.done {
                result.status.as_str().to_owned()
            } else {
                result.seconds = (now() - created) as f64;
                let drv = e.result.drv_path.as_ref();
                match (drv.and_then(|d| jobs.get(d)), drv.and_then(|d| checks.get(d))) {
                    (None, _) => "queued".to_owned(),
                    (Some(job), Some(check)) if job.status == "built" => {
                        format!("built; verification {}", describe_job(check, &builders))
                    }
                    (Some(job), _) if job.status == "built" => "built; verifying".to_owned(),
                    (Some(job), _) => describe_job(job, &builders),
                }
            };
            view.variants.push(VariantView { label: e.label, phase, done: e.done, result });
        }
        Ok(Some(view))
    }
}

fn describe_job(job: &crate::queue::JobView, builders: &[BuilderInfo]) -> String {
    match job.status.as_str() {
        "claimed" => {
            let on = job.builder.as_deref().unwrap_or("?");
            match job.phase.as_deref() {
                Some("pushing") => {
                    format!("pushing {} on {on}", crate::report::human_bytes(job.pushed_bytes))
                }
                Some(p) => format!("{p} on {on}"),
                None => format!("claimed by {on}"),
            }
        }
        "queued" => {
            let alive = builders.iter().filter(|b| now() - b.last_seen < BUILDER_ALIVE);
            if alive.clone().any(|b| b.can_take(&job.system, &job.features)) {
                "queued".to_owned()
            } else {
                let features =
                    if job.features.is_empty() { "no features".to_owned() } else { job.features.join(", ") };
                format!(
                    "waiting for a builder of {} with {features} (none registered can take it)",
                    job.system
                )
            }
        }
        other => other.to_owned(),
    }
}

fn snapshot_of(plan: &Plan, flake: &str, requested: &str) -> Snapshot {
    let entries = plan
        .jobs
        .iter()
        .map(|j| Entry {
            label: j.label.clone(),
            done: j.status.is_some(),
            verify: j.verify.clone(),
            main_output: j.eval.as_ref().and_then(|e| e.main_output()).map(|p| p.to_absolute()),
            result: j.result(),
        })
        .collect();
    Snapshot {
        revision_id: plan.revision_id,
        flake: flake.to_owned(),
        requested: requested.to_owned(),
        commit: plan.commit.clone(),
        inputs: plan.inputs.clone(),
        entries,
    }
}

/// Serves until `shutdown`, moving requests along in the background.
pub async fn run(
    listener: tokio::net::TcpListener,
    server: Arc<Server>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ticker = {
        let server = server.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = server.tick().await {
                    tracing::error!(error = %e, "moving requests along");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let limits = cache_server::listener::Limits::default();
    let served = cache_server::listener::serve(listener, router(server), limits, shutdown).await;
    ticker.abort();
    served
}

/// Records a build request for `rev`; the server plans it on its next round. Returns its id.
pub async fn submit_request(
    state: &State,
    rev: &str,
    variants: &[String],
    retry_failed: bool,
) -> Result<i64, StateError> {
    let now = now();
    Ok(sqlx::query(&state.sql(
        "INSERT INTO requests (requested, variants, retry_failed, status, created_at, updated_at)
         VALUES (?, ?, ?, 'pending', ?, ?) RETURNING id",
    ))
    .bind(rev)
    .bind(serde_json::to_string(variants).expect("serialises"))
    .bind(retry_failed as i64)
    .bind(now)
    .bind(now)
    .fetch_one(&state.pool)
    .await
    .map_err(|e| state.err(e))?
    .get(0))
}

/// A variant's build log, as `orchestrator logs` reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogView {
    /// The derivation.
    pub drv_path: String,
    /// Whether a build of it is running (the log grows).
    pub running: bool,
    /// The log so far (its last `build.max-log-bytes`).
    pub log: String,
}

/// The log of `variant` at `rev`, from the state.
pub async fn find_log(state: &State, rev: &str, variant: &str) -> Result<Option<LogView>, StateError> {
    let Some(drv_path) = state.variant_drv(rev, variant).await? else { return Ok(None) };
    let (log, running) = state.job_log(&drv_path).await?.unwrap_or_default();
    Ok(Some(LogView { drv_path, running, log }))
}
