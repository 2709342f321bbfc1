//! What a server keeps of a planned request (its [`Snapshot`], the `plan` column of the
//! requests table) and what the CLI sees of it: [`RequestView`], with live phases from the
//! jobs and builders, and [`LogView`].

use std::collections::BTreeMap;

use builder::api::{JobKind, VerifySpec};
use serde::{Deserialize, Serialize};

use crate::flake::LockedInput;
use crate::outcome::VariantResult;
use crate::plan::Plan;
use crate::state::{BuilderInfo, JobStatus, JobView, RequestStatus, State, StateError, now};

/// Builders not heard from for this long do not count as able to take a job.
pub const BUILDER_ALIVE: i64 = 120;

/// The builders heard from lately.
pub fn alive(builders: &[BuilderInfo]) -> impl Iterator<Item = &BuilderInfo> + Clone {
    builders.iter().filter(|b| now() - b.last_seen < BUILDER_ALIVE)
}

/// A planned request, kept in the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub(super) revision_id: i64,
    pub(super) flake: String,
    pub(super) requested: String,
    pub(super) commit: String,
    pub(super) inputs: BTreeMap<String, LockedInput>,
    pub(super) entries: Vec<Entry>,
}

/// A variant × system of a planned request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub(super) label: String,
    pub(super) result: VariantResult,
    pub(super) done: bool,
    #[serde(default)]
    pub(super) verify: Option<VerifySpec>,
    #[serde(default)]
    pub(super) main_output: Option<String>,
}

impl Snapshot {
    /// What a server keeps of `plan`, asked as `requested` of the fleet flake `flake`.
    pub fn of(plan: &Plan, flake: &str, requested: &str) -> Snapshot {
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

    /// The text kept in the database.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("serialises")
    }

    /// The derivations its variants build.
    pub fn drvs(&self) -> Vec<String> {
        self.entries.iter().filter_map(|e| e.result.drv_path.clone()).collect()
    }
}

/// A request as the CLI follows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestView {
    /// Where it stands.
    pub status: RequestStatus,
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

/// The request `id` as the CLI sees it, with live phases from the jobs and builders; None if
/// there is no such request.
pub async fn view(state: &State, id: i64) -> Result<Option<RequestView>, StateError> {
    let Some(r) = state.request(id).await? else { return Ok(None) };
    let snap: Option<Snapshot> = r.plan.as_deref().and_then(|p| serde_json::from_str(p).ok());
    let mut view = RequestView {
        status: r.status,
        error: r.error,
        flake: snap.as_ref().map(|s| s.flake.clone()),
        requested: r.requested,
        commit: snap.as_ref().map(|s| s.commit.clone()),
        inputs: snap.as_ref().map(|s| s.inputs.clone()).unwrap_or_default(),
        variants: Vec::new(),
    };
    let Some(snap) = snap else { return Ok(Some(view)) };
    let drvs = snap.drvs();
    let jobs = state.jobs_for(&drvs, JobKind::Build).await?;
    let checks = state.jobs_for(&drvs, JobKind::Verify).await?;
    let builders = state.builders().await?;
    for e in snap.entries {
        let mut result = e.result.clone();
        let phase = if e.done {
            result.status.as_str().to_owned()
        } else {
            result.seconds = (now() - r.created_at) as f64;
            let drv = e.result.drv_path.as_ref();
            match (drv.and_then(|d| jobs.get(d)), drv.and_then(|d| checks.get(d))) {
                (None, _) => "queued".to_owned(),
                (Some(job), Some(check)) if job.status == JobStatus::Built => {
                    format!("built; verification {}", describe_job(check, &builders))
                }
                (Some(job), _) if job.status == JobStatus::Built => "built; verifying".to_owned(),
                (Some(job), _) => describe_job(job, &builders),
            }
        };
        view.variants.push(VariantView { label: e.label, phase, done: e.done, result });
    }
    Ok(Some(view))
}

pub(super) fn describe_job(job: &JobView, builders: &[BuilderInfo]) -> String {
    match job.status {
        JobStatus::Claimed => {
            let on = job.builder.as_deref().unwrap_or("?");
            match job.phase.as_deref() {
                Some("pushing") => {
                    format!("pushing {} on {on}", crate::report::human_bytes(job.pushed_bytes))
                }
                Some(p) => format!("{p} on {on}"),
                None => format!("claimed by {on}"),
            }
        }
        JobStatus::Queued => {
            if alive(builders).any(|b| b.can_take(&job.system, &job.features)) {
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
        other => other.as_str().to_owned(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_plan_written_at_schema_2_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::state::written_at_schema_2(dir.path()).await;
        let view = view(&state, 1).await.unwrap().expect("request 1");
        assert_eq!(
            (view.status, view.commit.as_deref()),
            (RequestStatus::Done, Some("c0ffee0000000000000000000000000000000000"))
        );
        assert_eq!(view.inputs["nixpkgs"].rev.as_deref(), Some("abc123"));
        let v = &view.variants[0];
        assert_eq!((v.label.as_str(), v.phase.as_str(), v.done), ("cuda", "built", true));
        assert_eq!(v.result.machines, ["carbon"]);
        let log = find_log(&state, "main", "cuda").await.unwrap().expect("its log");
        assert_eq!((log.log.as_str(), log.running), ("building llama-cpp\n", false));
    }
}
