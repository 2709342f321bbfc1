//! `orchestrator build --rev`: a fleet revision to signed variants in the cache, on this machine.
//!
//! Resolve the revision and read its lock; evaluate every variant against the flake at that
//! commit; skip what the cache has; build the rest with `nix build` (one derivation once, however
//! many variants want it, and never by two runs at once), push each closure and its log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use builder::api::{Verification, VerifySpec};
use builder::push::PushOptions;
use futures_util::StreamExt as _;
use nix_formats::StorePath;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::cache::CacheTarget;
use crate::config::{VariantConfig, attr_path};
use crate::flake::{FlakeError, FleetRepo, LockedInput};
use crate::report::{Phase, Reporter};
use crate::state::{AttemptEnd, Claim, DerivationStatus, LEASE, State, StateError};
use builder::eval::{Evaluation, evaluate};
use builder::nix_build::{self, BuildEnd};

/// Why a build could not run at all (a variant failing is a result, not this).
#[derive(Debug, Error)]
pub enum BuildError {
    /// The revision or its lock.
    #[error(transparent)]
    Flake(#[from] FlakeError),
    /// The state database.
    #[error(transparent)]
    State(#[from] StateError),
}

/// How a variant ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Its outputs were in the cache already.
    Cached,
    /// Built and published by this run.
    Built,
    /// Evaluation, build or push failed.
    Failed,
    /// The run was interrupted before it ended.
    Interrupted,
}

impl Status {
    /// The word in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::Built => "built",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
        }
    }
}

/// One variant's result: the `--json` document's element.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantResult {
    /// The variant's name.
    pub variant: String,
    /// The system.
    pub system: String,
    /// The attribute path evaluated.
    pub attr: String,
    /// The derivation, when evaluation succeeded.
    pub drv_path: Option<String>,
    /// The output paths.
    pub out_paths: Vec<String>,
    /// How it ended.
    pub status: Status,
    /// Seconds from the start of the run to its end.
    pub seconds: f64,
    /// What went wrong.
    pub error: Option<String>,
    /// The check on real hardware, when the variant has one and it was built in this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

/// A run's outcome.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The commit built.
    pub commit: String,
    /// The inputs its lock pins.
    pub inputs: BTreeMap<String, LockedInput>,
    /// Every variant × system, in the order asked.
    pub results: Vec<VariantResult>,
}

/// Settings of a run.
#[derive(Clone)]
pub struct BuildOptions {
    /// Rebuild derivations whose last attempt failed.
    pub retry_failed: bool,
    /// Derivations built at once.
    pub max_jobs: usize,
    /// Push settings.
    pub push: PushOptions,
    /// Log bytes kept per attempt.
    pub max_log_bytes: usize,
    /// This machine's features, for verifications.
    pub features: Vec<String>,
}

/// What a run needs.
pub struct Context {
    /// The state database.
    pub state: State,
    /// Where results go.
    pub cache: Arc<CacheTarget>,
    /// Progress.
    pub reporter: Arc<dyn Reporter>,
    /// This run's name in claims and attempts.
    pub owner: String,
    /// Cancelled on Ctrl-C.
    pub cancel: CancellationToken,
    /// Settings.
    pub options: BuildOptions,
}

/// A variant on one system, as a run tracks it.
pub struct Job {
    /// How reports name it: the variant, with the system when several are built.
    pub label: String,
    /// The variant's name.
    pub variant: String,
    /// The system.
    pub system: String,
    /// The attribute path, `{system}` filled in.
    pub attr: String,
    /// Builder features its build needs.
    pub features: Vec<String>,
    /// Files its output must have.
    pub files: Vec<String>,
    /// Its check on real hardware.
    pub verify: Option<VerifySpec>,
    /// The check's result.
    pub verification: Option<Verification>,
    /// What evaluation gave.
    pub eval: Option<Evaluation>,
    /// How it ended, once it has.
    pub status: Option<Status>,
    /// What went wrong.
    pub error: Option<String>,
    /// Seconds from the start of the run to its end.
    pub seconds: f64,
}

/// A revision resolved, its variants evaluated and checked against the cache: what is left to
/// build is every job without a status.
pub struct Plan {
    start: Instant,
    /// The revision's row in the state.
    pub revision_id: i64,
    /// The commit.
    pub commit: String,
    /// The inputs its lock pins.
    pub inputs: BTreeMap<String, LockedInput>,
    /// The flake URL the variants were evaluated at.
    pub flake_url: String,
    /// Every variant × system, in the order asked.
    pub jobs: Vec<Job>,
}

/// How realising one derivation ended.
enum Realised {
    Built(Option<Verification>),
    Cached,
    Failed(String),
    Interrupted,
}

/// Runs the whole build of `requested` (a commit, tag or branch) for `variants` on this machine.
pub async fn build_revision(
    ctx: &Context,
    repo: &FleetRepo,
    requested: &str,
    variants: &[VariantConfig],
) -> Result<BuildReport, BuildError> {
    let mut plan = plan(ctx, repo, requested, variants).await?;
    build_here(ctx, &mut plan).await?;
    plan.record(ctx).await
}

/// Resolves `requested`, evaluates `variants` and marks what is cached or known to fail.
pub async fn plan(
    ctx: &Context,
    repo: &FleetRepo,
    requested: &str,
    variants: &[VariantConfig],
) -> Result<Plan, BuildError> {
    let start = Instant::now();
    let commit = repo.resolve(requested)?;
    let inputs = repo.locked_inputs(&commit)?;
    let revision_id = ctx
        .state
        .record_revision(&repo.reference, &commit, requested, &inputs.values().cloned().collect::<Vec<_>>())
        .await?;
    ctx.reporter.revision(&repo.reference, requested, &commit, &inputs);

    let multi_system = variants.iter().any(|v| v.systems.len() > 1);
    let mut jobs = Vec::new();
    for v in variants {
        for system in &v.systems {
            let label = if multi_system { format!("{} ({system})", v.name) } else { v.name.clone() };
            ctx.reporter.phase(&label, Phase::Queued);
            jobs.push(Job {
                label,
                variant: v.name.clone(),
                system: system.clone(),
                attr: v.attr.replace("{system}", system),
                features: v.features.clone(),
                files: v.files.clone(),
                verify: v.verify.clone(),
                verification: None,
                eval: None,
                status: None,
                error: None,
                seconds: 0.0,
            });
        }
    }

    // Evaluate everything at once: each is a separate `nix eval`, so one error names one variant.
    let flake_url = repo.flake_url_at(&commit);
    // A few at a time: each `nix eval` is a process with its own evaluator in memory.
    let pending: Vec<_> = jobs
        .iter()
        .map(|job| {
            let (flake_url, label) = (flake_url.clone(), job.label.clone());
            let path = attr_path(&job.attr, &job.system);
            let reporter = ctx.reporter.clone();
            async move {
                reporter.phase(&label, Phase::Evaluating);
                evaluate(&flake_url, &path?).await.map_err(|e| e.to_string())
            }
        })
        .collect();
    let evaluations: Vec<Result<Evaluation, String>> =
        futures_util::stream::iter(pending).buffered(eval_concurrency()).collect().await;
    for (job, result) in jobs.iter_mut().zip(evaluations) {
        match result {
            Ok(eval) if eval.system != job.system => {
                job.fail(start, format!("evaluates to a derivation for {}, not {}", eval.system, job.system))
            }
            Ok(eval) => job.eval = Some(eval),
            Err(e) => job.fail(start, format!("evaluating {}: {e}", job.attr)),
        }
    }

    // Known failures, then one question to the cache for every output.
    for job in jobs.iter_mut().filter(|j| j.status.is_none()) {
        let drv = job.eval.as_ref().expect("evaluated").drv_path.to_absolute();
        if let (DerivationStatus::Failed, failure) = ctx.state.derivation(&drv).await? {
            if !ctx.options.retry_failed {
                let why = failure.map(|f| f.error).unwrap_or_default();
                job.fail(
                    start,
                    format!("{drv} failed before (pass --retry-failed to build it again): {why}"),
                );
            }
        }
    }
    let wanted: Vec<StorePath> = jobs
        .iter()
        .filter(|j| j.status.is_none())
        .flat_map(|j| j.eval.as_ref().expect("evaluated").outputs.values().cloned())
        .collect();
    for job in jobs.iter().filter(|j| j.status.is_none()) {
        ctx.reporter.phase(&job.label, Phase::Checking);
    }
    match missing(ctx, &wanted).await {
        Ok(missing) => {
            for job in jobs.iter_mut().filter(|j| j.status.is_none()) {
                let outs = &job.eval.as_ref().expect("evaluated").outputs;
                if outs.values().all(|o| !missing.contains(o)) {
                    job.finish(start, Status::Cached, None);
                    ctx.reporter.phase(&job.label, Phase::Done(Status::Cached));
                }
            }
        }
        Err(e) => {
            for job in jobs.iter_mut().filter(|j| j.status.is_none()) {
                job.fail(start, format!("asking the cache which outputs it has: {e}"));
            }
        }
    }
    for job in jobs.iter().filter(|j| j.status == Some(Status::Failed)) {
        ctx.reporter.phase(&job.label, Phase::Done(Status::Failed));
    }
    Ok(Plan { start, revision_id, commit, inputs, flake_url, jobs })
}

/// Builds every job of `jobs` without a status here, each derivation once.
async fn build_here(ctx: &Context, plan: &mut Plan) -> Result<(), StateError> {
    // Build each derivation once, whatever number of variants want it.
    let by_drv = plan.to_build();
    let jobs = &plan.jobs;
    let slots = Arc::new(tokio::sync::Semaphore::new(ctx.options.max_jobs));
    let outcomes = futures_util::future::join_all(by_drv.iter().map(|(drv, idx)| {
        let labels: Vec<String> = idx.iter().map(|&i| jobs[i].label.clone()).collect();
        let first = &jobs[idx[0]];
        let outputs: Vec<StorePath> =
            first.eval.as_ref().expect("evaluated").outputs.values().cloned().collect();
        let main_output = first.eval.as_ref().and_then(|e| e.main_output()).cloned();
        let checks = Checks { main_output, files: plan.files_of(idx), verify: first.verify.clone() };
        let slots = slots.clone();
        async move {
            let _slot = tokio::select! {
                slot = slots.acquire_owned() => slot.expect("semaphore open"),
                _ = ctx.cancel.cancelled() => return Ok(Realised::Interrupted),
            };
            realise(ctx, drv, &outputs, &labels, &checks).await
        }
    }))
    .await;
    for ((_, idx), outcome) in by_drv.iter().zip(outcomes) {
        let (status, error, verification) = match outcome? {
            Realised::Built(v) => (Status::Built, None, v),
            Realised::Cached => (Status::Cached, None, None),
            Realised::Failed(e) => (Status::Failed, Some(e), None),
            Realised::Interrupted => (Status::Interrupted, Some("interrupted".to_owned()), None),
        };
        for &i in idx {
            plan.finish(i, status, error.clone());
            plan.jobs[i].verification = verification.clone();
            ctx.reporter.phase(&plan.jobs[i].label, Phase::Done(status));
        }
    }
    Ok(())
}

impl Plan {
    /// The derivations left to build, each with the indices of the jobs that want it.
    pub fn to_build(&self) -> BTreeMap<StorePath, Vec<usize>> {
        let mut by_drv: BTreeMap<StorePath, Vec<usize>> = BTreeMap::new();
        for (i, job) in self.jobs.iter().enumerate().filter(|(_, j)| j.status.is_none()) {
            by_drv.entry(job.eval.as_ref().expect("evaluated").drv_path.clone()).or_default().push(i);
        }
        by_drv
    }

    /// Files the output of the derivation wanted by jobs `idx` must have: all they name.
    pub fn files_of(&self, idx: &[usize]) -> Vec<String> {
        let mut files: Vec<String> = idx.iter().flat_map(|&i| self.jobs[i].files.clone()).collect();
        files.sort();
        files.dedup();
        files
    }

    /// Marks job `i` ended now.
    pub fn finish(&mut self, i: usize, status: Status, error: Option<String>) {
        let start = self.start;
        self.jobs[i].finish(start, status, error);
    }

    /// Records every job's end in the state and returns the report.
    pub async fn record(self, ctx: &Context) -> Result<BuildReport, BuildError> {
        let mut results = Vec::new();
        for job in self.jobs {
            let status = job.status.unwrap_or(Status::Interrupted);
            let (drv_path, out_paths) = match &job.eval {
                Some(e) => {
                    (Some(e.drv_path.to_absolute()), e.outputs.values().map(StorePath::to_absolute).collect())
                }
                None => (None, Vec::new()),
            };
            ctx.state
                .record_variant(
                    self.revision_id,
                    &job.variant,
                    &job.system,
                    &job.attr,
                    drv_path.as_deref(),
                    &out_paths,
                    status.as_str(),
                    job.error.as_deref(),
                    Some(job.seconds),
                )
                .await?;
            results.push(VariantResult {
                variant: job.variant,
                system: job.system,
                attr: job.attr,
                drv_path,
                out_paths,
                status,
                seconds: job.seconds,
                error: job.error,
                verification: job.verification,
            });
        }
        Ok(BuildReport { commit: self.commit, inputs: self.inputs, results })
    }
}

/// Evaluations run at once: the number of cores, between 2 and 8.
fn eval_concurrency() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8)
}

impl Job {
    fn finish(&mut self, start: Instant, status: Status, error: Option<String>) {
        self.status = Some(status);
        self.error = error;
        self.seconds = start.elapsed().as_secs_f64();
    }
    fn fail(&mut self, start: Instant, error: String) {
        self.finish(start, Status::Failed, Some(error));
    }
}

/// The subset of `paths` the cache lacks, retrying transient failures.
async fn missing(ctx: &Context, paths: &[StorePath]) -> Result<Vec<StorePath>, builder::client::ClientError> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let mut tries = 0;
    loop {
        tries += 1;
        match ctx.cache.client.missing(paths).await {
            Err(e) if e.is_transient() && tries < ctx.options.push.attempts => {
                ctx.reporter.note(&format!("asking the cache failed ({e}); retrying"));
                tokio::time::sleep(ctx.options.push.backoff * tries).await;
            }
            other => return other,
        }
    }
}

/// Builds and publishes one derivation, or waits for the run that holds it.
/// What to check in a built output.
struct Checks {
    main_output: Option<StorePath>,
    files: Vec<String>,
    verify: Option<VerifySpec>,
}

async fn realise(
    ctx: &Context,
    drv: &StorePath,
    outputs: &[StorePath],
    labels: &[String],
    checks: &Checks,
) -> Result<Realised, StateError> {
    let drv_abs = drv.to_absolute();
    let phase = |p: Phase| labels.iter().for_each(|l| ctx.reporter.phase(l, p.clone()));
    loop {
        if ctx.cancel.is_cancelled() {
            return Ok(Realised::Interrupted);
        }
        match ctx.state.try_claim(&drv_abs, &ctx.owner).await? {
            Claim::Acquired => break,
            Claim::HeldBy(holder) => {
                phase(Phase::Waiting(holder));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = ctx.cancel.cancelled() => return Ok(Realised::Interrupted),
                }
                // The other run may have finished it meanwhile.
                match ctx.state.derivation(&drv_abs).await? {
                    (DerivationStatus::Built, _)
                        if missing(ctx, outputs).await.is_ok_and(|m| m.is_empty()) =>
                    {
                        return Ok(Realised::Cached);
                    }
                    (DerivationStatus::Failed, f) if !ctx.options.retry_failed => {
                        let why = f.map(|f| f.error).unwrap_or_default();
                        return Ok(Realised::Failed(format!("failed in another run: {why}")));
                    }
                    _ => {}
                }
            }
        }
    }
    // We hold the claim. Someone may have published it between our check and the claim.
    if missing(ctx, outputs).await.is_ok_and(|m| m.is_empty()) {
        ctx.state.release(&drv_abs, &ctx.owner, DerivationStatus::Built).await?;
        return Ok(Realised::Cached);
    }
    let lost = CancellationToken::new();
    let heartbeat = {
        let (state, owner, drv_abs, lost) =
            (ctx.state.clone(), ctx.owner.clone(), drv_abs.clone(), lost.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 6).await;
                if !state.renew(&drv_abs, &owner).await.unwrap_or(false) {
                    lost.cancel();
                    return;
                }
            }
        })
    };
    let outcome = build_and_push(ctx, drv, outputs, labels, checks, &lost).await;
    heartbeat.abort();
    outcome
}

async fn build_and_push(
    ctx: &Context,
    drv: &StorePath,
    outputs: &[StorePath],
    labels: &[String],
    checks: &Checks,
    lost: &CancellationToken,
) -> Result<Realised, StateError> {
    let drv_abs = drv.to_absolute();
    let phase = |p: Phase| labels.iter().for_each(|l| ctx.reporter.phase(l, p.clone()));
    let stop = CancellationToken::new();
    let _link = {
        let (stop, cancel, lost) = (stop.clone(), ctx.cancel.clone(), lost.clone());
        tokio::spawn(async move {
            tokio::select! { _ = cancel.cancelled() => {}, _ = lost.cancelled() => {} }
            stop.cancel();
        })
    };
    let attempt = ctx.state.start_attempt(&drv_abs, &ctx.owner).await?;
    let started = Instant::now();
    phase(Phase::Building);
    let (end, log) = nix_build::build(drv, ctx.options.max_log_bytes, &stop, |line| {
        labels.iter().for_each(|l| ctx.reporter.log_line(l, line))
    })
    .await;
    let interrupted = |why: &str| {
        if lost.is_cancelled() { format!("lost the claim on {drv_abs} ({why})") } else { why.to_owned() }
    };
    // Only a finished build has an output to check.
    let lacking = match end {
        BuildEnd::Built => {
            checks.main_output.as_ref().and_then(|out| builder::verify::lacking(out, &checks.files))
        }
        _ => None,
    };
    let result = match (end, lacking) {
        (BuildEnd::Cancelled, _) => Err((AttemptEnd::Interrupted, interrupted("stopped while building"))),
        (BuildEnd::Failed(e), _) => Err((AttemptEnd::Failed, e)),
        (BuildEnd::Built, Some(why)) => Err((AttemptEnd::Failed, why)),
        // A push that fails leaves a good build: the attempt failed, the derivation did not
        // (the next run pushes it again without --retry-failed; nix has the outputs already).
        (BuildEnd::Built, None) => {
            phase(Phase::Pushing(0));
            let progress = Arc::new(PushProgress {
                reporter: ctx.reporter.clone(),
                labels: labels.to_vec(),
                pushed: Default::default(),
            });
            let pushed = tokio::select! {
                r = builder::push::push(&ctx.cache.client, outputs, &ctx.options.push, progress) => Some(r),
                _ = stop.cancelled() => None,
            };
            match pushed {
                None => Err((AttemptEnd::Interrupted, interrupted("stopped while pushing"))),
                Some(Err(e)) => Err((AttemptEnd::PushFailed, format!("push: {e}"))),
                Some(Ok(summary)) => {
                    summary.refusal().map_or(Ok(()), |why| Err((AttemptEnd::PushFailed, why)))
                }
            }
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            if let Err(e) = nix_build::upload_stored_log(&ctx.cache.client, drv).await {
                ctx.reporter.note(&format!("{drv_abs}: the build log was not uploaded: {e}"));
            }
            ctx.state.finish_attempt(attempt, AttemptEnd::Built, seconds, None, &log.text()).await?;
            ctx.state.release(&drv_abs, &ctx.owner, DerivationStatus::Built).await?;
            let verification = match (&checks.verify, &checks.main_output) {
                (Some(spec), Some(out)) => {
                    phase(Phase::Remote("verifying".to_owned()));
                    let mut v = builder::verify::verify(out, spec, &ctx.options.features).await;
                    v.by = crate::state::hostname();
                    Some(v)
                }
                _ => None,
            };
            Ok(Realised::Built(verification))
        }
        Err((end, error)) => {
            ctx.state.finish_attempt(attempt, end, seconds, Some(&error), &log.text()).await?;
            let (status, realised) = match end {
                AttemptEnd::Failed => (DerivationStatus::Failed, Realised::Failed(error)),
                AttemptEnd::PushFailed => (DerivationStatus::New, Realised::Failed(error)),
                AttemptEnd::Built | AttemptEnd::Interrupted => (DerivationStatus::New, Realised::Interrupted),
            };
            ctx.state.release(&drv_abs, &ctx.owner, status).await?;
            Ok(realised)
        }
    }
}

/// Push progress shown on the variants' lines: NAR bytes read so far.
struct PushProgress {
    reporter: Arc<dyn Reporter>,
    labels: Vec<String>,
    pushed: std::sync::atomic::AtomicU64,
}

impl builder::push::Progress for PushProgress {
    fn planned(&self, _closure: usize, _to_upload: usize, _nar_bytes: u64) {}
    fn started(&self, _path: &StorePath, _nar_size: u64) {}
    fn advanced(&self, _path: &StorePath, n: u64) {
        let total = self.pushed.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        self.labels.iter().for_each(|l| self.reporter.phase(l, Phase::Pushing(total)));
    }
    fn finished(&self, _path: &StorePath, _outcome: &Result<u64, String>, _will_retry: bool) {}
    fn note(&self, message: &str) {
        self.reporter.note(message);
    }
}
