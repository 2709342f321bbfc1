//! The server's state and its round: every 200 ms it decides the pushes, releases lost leases,
//! plans pending requests (queueing a job per derivation the cache lacks) and settles running
//! ones whose jobs ended.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use builder::api::JobKind;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::record::Snapshot;
use super::settle::{Step, step};
use crate::cache::CacheTarget;
use crate::config::Config;
use crate::context::{BuildOptions, Context};
use crate::flake::FleetRepo;
use crate::outcome::Status;
use crate::plan::{Plan, PlanError, Selection, plan};
use crate::report::Quiet;
use crate::state::{BuilderInfo, NewJob, Request, RequestStatus, State, StateError, now};
use crate::webhooks::Webhooks;
use cache_server::auth::TokenFile;

/// A request a replica began to plan this long ago and never finished is planned again.
const ABANDONED_PLAN_SECONDS: i64 = 600;

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
    /// The forge endpoints.
    pub webhooks: Webhooks,
    /// Woken when jobs are queued or released.
    pub work: tokio::sync::Notify,
    /// Claims are serialised (one server owns a SQLite queue).
    pub claim_lock: tokio::sync::Mutex<()>,
    /// Jobs handed out.
    pub claims: AtomicU64,
    /// Requests refused for a bad token.
    pub refused: AtomicU64,
    /// Logins to the status pages.
    pub sessions: super::sessions::Sessions,
    /// The build logs pages follow, each read by one task.
    pub log_feeds: super::follow::LogFeeds,
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

impl Server {
    /// A server of `config` over `state`, the fleet `repo` and the `cache` builders push to.
    pub fn new(
        config: Config,
        state: State,
        repo: FleetRepo,
        cache: CacheTarget,
        builder_tokens: TokenFile,
        api_tokens: TokenFile,
    ) -> Self {
        Server {
            webhooks: Webhooks::new(config.webhooks.clone(), state.clone(), repo.clone()),
            state,
            config,
            repo,
            cache: Arc::new(cache),
            builder_tokens,
            api_tokens,
            work: tokio::sync::Notify::new(),
            claim_lock: tokio::sync::Mutex::new(()),
            claims: AtomicU64::default(),
            refused: AtomicU64::default(),
            sessions: super::sessions::Sessions::default(),
            log_feeds: super::follow::LogFeeds::default(),
        }
    }

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

    /// Moves everything along once: pushes, lost leases, pending and running requests.
    pub(super) async fn tick(&self) -> Result<(), StateError> {
        self.webhooks.process_pushes().await?;
        if self.state.reap_expired(self.config.server.max_attempts).await? > 0 {
            self.work.notify_waiters();
        }
        // A replica that died while planning leaves its request to the others.
        self.state.requeue_abandoned_plans(ABANDONED_PLAN_SECONDS).await?;
        let mut builders = None;
        for request in self.state.open_requests().await? {
            match request.status {
                // One replica plans it: whoever takes it out of `pending` first.
                RequestStatus::Pending => {
                    if self.state.take_request(request.id).await? {
                        self.plan_request(&request).await?;
                    }
                }
                _ => {
                    if builders.is_none() {
                        builders = Some(self.state.builders().await?);
                    }
                    self.settle_request(&request, builders.as_deref().unwrap_or_default()).await?;
                }
            }
        }
        Ok(())
    }

    /// Plans a request taken from `pending` and queues its jobs.
    #[tracing::instrument(skip_all, fields(request = request.id, rev = %request.requested))]
    async fn plan_request(&self, request: &Request) -> Result<(), StateError> {
        let why = match Selection::new(&self.config, &request.variants) {
            Err(e) => e,
            Ok(selection) => {
                match plan(&self.context(request.retry_failed), &self.repo, &request.requested, &selection)
                    .await
                {
                    Ok(planned) => return self.start_request(request, &planned).await,
                    Err(PlanError::State(e)) => return Err(e),
                    Err(e) => e.to_string(),
                }
            }
        };
        tracing::warn!(error = %why, "the request cannot be planned");
        self.state.set_request(request.id, RequestStatus::Error, None, Some(&why)).await
    }

    /// Queues the jobs of a planned request and records it running.
    async fn start_request(&self, request: &Request, planned: &Plan) -> Result<(), StateError> {
        self.queue_jobs(planned).await?;
        let snapshot = Snapshot::of(planned, &self.repo.reference, &request.requested);
        // `status` shows the variants while they are queued, not only once they ended.
        self.record_variants(&snapshot).await?;
        tracing::info!(commit = %planned.commit, variants = snapshot.entries.len(), "planned");
        self.state.set_request(request.id, RequestStatus::Running, Some(&snapshot.to_text()), None).await
    }

    /// Queues a job for every derivation of the plan the cache lacks.
    async fn queue_jobs(&self, planned: &Plan) -> Result<(), StateError> {
        let builder_url = self.repo.builder_flake_url(&planned.commit);
        for (drv, idx) in planned.to_build() {
            let job = &planned.jobs[idx[0]];
            let eval = job.eval.as_ref().expect("evaluated");
            let out_paths: Vec<String> = eval.outputs.values().map(|p| p.to_absolute()).collect();
            self.state
                .enqueue(&NewJob {
                    drv_path: &drv.to_absolute(),
                    system: &job.system,
                    features: &planned.features_of(&idx),
                    flake_url: &builder_url,
                    attr_path: &job.attr_path,
                    out_paths: &out_paths,
                    required_files: &planned.files_of(&idx),
                    verify: job.verify.as_ref(),
                })
                .await?;
        }
        self.work.notify_waiters();
        Ok(())
    }

    /// Records every variant of a request: its result once it ended, else `queued`.
    async fn record_variants(&self, snap: &Snapshot) -> Result<(), StateError> {
        for e in &snap.entries {
            let status = if e.done { e.result.status.as_str() } else { "queued" };
            self.state.record_variant(snap.revision_id, &e.result, status).await?;
        }
        Ok(())
    }

    /// Ends the variants of a running request whose jobs ended, queues the verifications that
    /// could not run where they were built, and ends the request when every variant ended.
    #[tracing::instrument(level = "debug", skip_all, fields(request = request.id))]
    async fn settle_request(&self, request: &Request, builders: &[BuilderInfo]) -> Result<(), StateError> {
        let parsed = request.plan.as_deref().map(serde_json::from_str::<Snapshot>);
        let mut snap = match parsed {
            Some(Ok(snap)) => snap,
            // Another fleetcache wrote a plan this one cannot read: say so rather than keep the
            // request running for ever.
            Some(Err(e)) => {
                let why =
                    format!("its plan cannot be read by this orchestrator ({e}); submit the build again");
                tracing::warn!(request = request.id, error = %why, "ending a request");
                return self.state.set_request(request.id, RequestStatus::Error, None, Some(&why)).await;
            }
            None => return Ok(()),
        };
        let drvs = snap.drvs();
        let jobs = self.state.jobs_for(&drvs, JobKind::Build).await?;
        let checks = self.state.jobs_for(&drvs, JobKind::Verify).await?;
        let mut changed = false;
        for e in snap.entries.iter_mut().filter(|e| !e.done) {
            match step(e, &jobs, &checks, builders) {
                Step::Wait => {}
                Step::Verify { output } => {
                    let (drv, spec) = (e.result.drv_path.as_deref(), e.verify.as_ref());
                    let (Some(drv), Some(spec)) = (drv, spec) else { continue };
                    let system = jobs.get(drv).map_or(e.result.system.as_str(), |j| j.system.as_str());
                    tracing::info!(drv, "queueing the verification where its hardware is");
                    self.state.enqueue_verification(drv, system, &output, spec).await?;
                    self.work.notify_waiters();
                }
                Step::Done { status, error, verification } => {
                    tracing::info!(variant = %e.label, status = status.as_str(), "variant ended");
                    e.done = true;
                    e.result.status = status;
                    e.result.error = error;
                    e.result.verification = verification;
                    e.result.seconds = (now() - request.created_at) as f64;
                    changed = true;
                }
            }
        }
        if snap.entries.iter().all(|e| e.done) {
            self.record_variants(&snap).await?;
            self.state.set_request(request.id, RequestStatus::Done, Some(&snap.to_text()), None).await?;
            let failed: Vec<&str> = snap
                .entries
                .iter()
                .filter(|e| e.result.status == Status::Failed)
                .map(|e| e.label.as_str())
                .collect();
            tracing::info!(request = request.id, failed = failed.len(), "request ended");
            self.webhooks.request_ended(request.id, &failed, snap.entries.len()).await?;
        } else if changed {
            self.state.set_request(request.id, RequestStatus::Running, Some(&snap.to_text()), None).await?;
        }
        Ok(())
    }
}
