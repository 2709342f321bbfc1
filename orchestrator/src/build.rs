//! `orchestrator build --rev`: a fleet revision to signed variants in the cache, on this machine.
//!
//! Plan the revision ([`crate::plan`]), then build what the cache lacks (one derivation once,
//! however many variants want it, and never by two runs at once, each through the builder's
//! [`builder::pipeline`]: `nix build`, checks, push, log, verification).

use std::sync::Arc;
use std::time::Duration;

use builder::api::{Verification, VerifySpec};
use nix_formats::StorePath;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::flake::FleetRepo;
use crate::outcome::{BuildReport, Status};
use crate::plan::{Plan, PlanError, Selection, plan};
use crate::report::{Phase, Reporter};
use crate::state::{AttemptEnd, Claim, DerivationStatus, LEASE, StateError};
use builder::pipeline::{self, End, Settings, Stage, Target};

/// How realising one derivation ended.
enum Realised {
    Built(Option<Verification>),
    Cached,
    Failed(String),
    Interrupted,
}

/// Runs the whole build of `requested` (a commit, tag or branch) for `selection` on this machine.
#[tracing::instrument(skip_all, fields(rev = requested))]
pub async fn build_revision(
    ctx: &Context,
    repo: &FleetRepo,
    requested: &str,
    selection: &Selection,
) -> Result<BuildReport, PlanError> {
    let mut plan = plan(ctx, repo, requested, selection).await?;
    build_here(ctx, &mut plan).await?;
    plan.record(ctx).await
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

/// What to check in a built output.
struct Checks {
    main_output: Option<StorePath>,
    files: Vec<String>,
    verify: Option<VerifySpec>,
}

/// Builds and publishes one derivation, or waits for the run that holds it.
#[tracing::instrument(skip_all, fields(drv = %drv.to_absolute()))]
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
                        if ctx.missing(outputs).await.is_ok_and(|m| m.is_empty()) =>
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
    if ctx.missing(outputs).await.is_ok_and(|m| m.is_empty()) {
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

/// Runs the pipeline on a claimed derivation and records the attempt, its log and the
/// derivation's standing.
async fn build_and_push(
    ctx: &Context,
    drv: &StorePath,
    outputs: &[StorePath],
    labels: &[String],
    checks: &Checks,
    lost: &CancellationToken,
) -> Result<Realised, StateError> {
    let drv_abs = drv.to_absolute();
    let stop = CancellationToken::new();
    let _link = {
        let (stop, cancel, lost) = (stop.clone(), ctx.cancel.clone(), lost.clone());
        tokio::spawn(async move {
            tokio::select! { _ = cancel.cancelled() => {}, _ = lost.cancelled() => {} }
            stop.cancel();
        })
    };
    let attempt_id = ctx.state.start_attempt(&drv_abs, &ctx.owner).await?;
    let target = Target {
        drv,
        outputs,
        main_output: checks.main_output.as_ref(),
        required_files: &checks.files,
        verify: checks.verify.as_ref(),
    };
    let settings = Settings {
        cache: &ctx.cache.client,
        push: &ctx.options.push,
        max_log_bytes: ctx.options.max_log_bytes,
        features: &ctx.options.features,
        name: &crate::state::hostname(),
    };
    let watcher = Arc::new(Watch { reporter: ctx.reporter.clone(), labels: labels.to_vec() });
    let attempt = pipeline::realise(&target, &settings, watcher, &stop).await;
    // A push that fails leaves a good build: the attempt failed, the derivation did not (the
    // next run pushes it again without --retry-failed; nix has the outputs already).
    let (end, error, standing, realised) = match attempt.end {
        End::Built(v) => (AttemptEnd::Built, None, DerivationStatus::Built, Realised::Built(v)),
        End::Failed(e) => {
            (AttemptEnd::Failed, Some(e.clone()), DerivationStatus::Failed, Realised::Failed(e))
        }
        End::PushFailed(e) => {
            (AttemptEnd::PushFailed, Some(e.clone()), DerivationStatus::New, Realised::Failed(e))
        }
        End::Stopped(at) => {
            let why = if lost.is_cancelled() {
                format!("lost the claim on {drv_abs} ({at})")
            } else {
                at.to_owned()
            };
            (AttemptEnd::Interrupted, Some(why), DerivationStatus::New, Realised::Interrupted)
        }
    };
    ctx.state.finish_attempt(attempt_id, end, attempt.seconds, error.as_deref(), &attempt.log).await?;
    ctx.state.release(&drv_abs, &ctx.owner, standing).await?;
    Ok(realised)
}

/// The pipeline's steps shown on the variants' lines.
struct Watch {
    reporter: Arc<dyn Reporter>,
    labels: Vec<String>,
}

impl Watch {
    fn phase(&self, phase: Phase) {
        self.labels.iter().for_each(|l| self.reporter.phase(l, phase.clone()));
    }
}

impl pipeline::Watcher for Watch {
    fn stage(&self, stage: Stage) {
        self.phase(match stage {
            Stage::Building => Phase::Building,
            Stage::Pushing => Phase::Pushing(0),
            Stage::Verifying => Phase::Remote("verifying".to_owned()),
        });
    }
    fn log_line(&self, line: &str) {
        self.labels.iter().for_each(|l| self.reporter.log_line(l, line));
    }
    fn pushed(&self, total: u64) {
        self.phase(Phase::Pushing(total));
    }
    fn note(&self, message: &str) {
        self.reporter.note(message);
    }
}
