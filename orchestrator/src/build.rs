//! `orchestrator build --rev`: a fleet revision to signed variants in the cache, on this machine.
//!
//! Plan the revision ([`crate::plan`]), then build what the cache lacks with `nix build` (one
//! derivation once, however many variants want it, and never by two runs at once), push each
//! closure and its log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use builder::api::{Verification, VerifySpec};
use nix_formats::StorePath;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::flake::FleetRepo;
use crate::outcome::{BuildReport, Status};
use crate::plan::{Plan, PlanError, Selection, plan};
use crate::report::{Phase, Reporter};
use crate::state::{AttemptEnd, Claim, DerivationStatus, LEASE, StateError};
use builder::nix_build::{self, BuildEnd};

/// How realising one derivation ended.
enum Realised {
    Built(Option<Verification>),
    Cached,
    Failed(String),
    Interrupted,
}

/// Runs the whole build of `requested` (a commit, tag or branch) for `selection` on this machine.
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
