//! The orchestrator's builder API, as both sides speak it: JSON over HTTP, the builder's token
//! as `Authorization: Bearer`.
//!
//! - `POST /api/v1/builders/register` [`Register`] -> [`Registered`]
//! - `POST /api/v1/jobs/claim` [`ClaimRequest`] -> [`ClaimedJob`], or 204 after the wait
//! - `POST /api/v1/jobs/{id}/heartbeat` [`Heartbeat`] -> 200, or 410 when the lease was lost
//! - `POST /api/v1/jobs/{id}/log` [`LogChunk`] -> 200 / 410
//! - `POST /api/v1/jobs/{id}/result` [`JobResult`] -> 200 / 410 (a late result is ignored)

use serde::{Deserialize, Serialize};

/// A builder announces what it can build.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Register {
    /// Systems it builds for (`x86_64-linux`).
    pub systems: Vec<String>,
    /// Features it supports (`cuda`, `vulkan`, `kvm`, `big-parallel`).
    pub features: Vec<String>,
    /// Features a job must require for this builder to take it (Nix's mandatory features).
    pub mandatory_features: Vec<String>,
    /// Jobs it runs at once.
    pub max_jobs: u32,
    /// The builder's version.
    pub version: String,
}

/// The orchestrator's answer to [`Register`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Registered {
    /// The builder's name (from its token).
    pub name: String,
    /// The cache-server builders push to, when the orchestrator knows it.
    pub cache_url: Option<String>,
    /// Seconds a claim lasts without a heartbeat.
    pub lease_seconds: u64,
}

/// A builder asks for work, waiting up to `wait_seconds` for some.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClaimRequest {
    /// Seconds to wait for a job before answering 204.
    pub wait_seconds: u64,
}

/// What a job asks of a builder.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Evaluate, build, push.
    #[default]
    Build,
    /// Fetch the built output from the cache and run the variant's verification.
    Verify,
}

/// A job given to a builder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClaimedJob {
    /// The job.
    pub id: i64,
    /// Build it, or verify what was built.
    #[serde(default)]
    pub kind: JobKind,
    /// This claim; heartbeats and the result name it.
    pub lease: String,
    /// The derivation the orchestrator evaluated; the builder must get the same.
    pub drv_path: String,
    /// The system.
    pub system: String,
    /// The fleet flake, locked at the revision.
    pub flake_url: String,
    /// The attribute path inside it.
    pub attr_path: Vec<String>,
    /// The outputs to push.
    pub out_paths: Vec<String>,
    /// Seconds the claim lasts without a heartbeat.
    pub lease_seconds: u64,
    /// Files that must exist in the output (`lib/libggml-cuda.so`); the build fails otherwise.
    #[serde(default)]
    pub required_files: Vec<String>,
    /// A check to run after the build if this builder has its features.
    #[serde(default)]
    pub verify: Option<VerifySpec>,
}

/// Where a claimed job stands, sent at least every third of the lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Heartbeat {
    /// The claim.
    pub lease: String,
    /// `evaluating`, `building`, `pushing`.
    pub phase: String,
    /// NAR bytes pushed so far.
    pub pushed_bytes: u64,
}

/// Build log lines, appended to the job's log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogChunk {
    /// The claim.
    pub lease: String,
    /// Lines, each ending in a newline.
    pub text: String,
}

/// How a job ended on the builder.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Built and pushed.
    Built,
    /// The build failed (the derivation is marked failed).
    Failed,
    /// Built, but the push failed (the job goes back to the queue).
    PushFailed,
    /// The builder would not build it: its evaluation gave another derivation, or it cannot.
    Refused,
}

/// The end of a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    /// The claim.
    pub lease: String,
    /// How it ended.
    pub outcome: Outcome,
    /// What went wrong.
    pub error: Option<String>,
    /// Seconds the builder spent.
    pub seconds: f64,
    /// The verification, when the job asked for one.
    #[serde(default)]
    pub verification: Option<Verification>,
}

/// A check of a built variant on real hardware: on a builder with `features`, `command` is
/// run in the output (its `bin/` first on `PATH`) and must print `expect`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VerifySpec {
    /// Features the verifying builder needs (`cuda`).
    #[serde(default)]
    pub features: Vec<String>,
    /// A shell command, run in the output directory (`bin/llama-cli --list-devices`).
    pub command: String,
    /// Text its output (stdout and stderr) must contain (`CUDA0`).
    pub expect: String,
}

/// How a verification ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyStatus {
    /// The command printed what was expected.
    Verified,
    /// It did not (or could not run).
    VerifyFailed,
    /// No builder with the features built it, so it was not run.
    Unverified,
}

/// A verification's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verification {
    /// How it ended.
    pub status: VerifyStatus,
    /// What it printed (its tail), or why it did not run.
    pub detail: String,
    /// The builder that ran it.
    #[serde(default)]
    pub by: String,
}
