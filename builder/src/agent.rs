//! The builder agent: registers with the orchestrator, claims jobs it can take by long-poll,
//! checks that its own evaluation gives the expected derivation, builds with the real `nix`,
//! streams the log, pushes the closure with its own upload token, and reports the result.
//! A heartbeat holds the lease; when the orchestrator says the lease is gone, the build stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix_formats::StorePath;
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::api::{
    ClaimRequest, ClaimedJob, Heartbeat, JobKind, JobResult, LogChunk, Outcome, Register, Registered,
    Verification,
};
use crate::client::CacheClient;
use crate::pipeline::{End, Stage, Target};
use crate::push::PushOptions;

/// Why the agent stopped.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The orchestrator refused the token: nothing will work until it is fixed.
    #[error(
        "the orchestrator refused this builder's token ({0}); check --token-file and the orchestrator's builder-tokens-file"
    )]
    Unauthorized(String),
    /// No cache to push to.
    #[error("no cache-server to push to: the orchestrator names none; pass --cache")]
    NoCache,
    /// No HTTP client could be set up (a certificate bundle the environment names is unusable).
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    /// The orchestrator's certificate is not trusted: retrying cannot fix it.
    #[error("orchestrator {url}: {message}")]
    Untrusted {
        /// The orchestrator's URL.
        url: String,
        /// What failed, with the hint.
        message: String,
    },
}

/// A call to the orchestrator failed.
#[derive(Debug, Error)]
enum CallError {
    #[error("{}", crate::http::describe(.0))]
    Transport(#[from] reqwest::Error),
    #[error("lease lost")]
    Gone,
    #[error("{status}: {message}")]
    Status { status: reqwest::StatusCode, message: String },
}

/// Largest answer read from the orchestrator (a job, a registration).
const MAX_ANSWER: usize = 16 << 20;

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The orchestrator's URL.
    pub orchestrator: String,
    /// This builder's token.
    pub token: String,
    /// What it registers.
    pub register: Register,
    /// The cache to push to, if not the one the orchestrator names.
    pub cache_url: Option<String>,
    /// The upload token of the cache.
    pub cache_token: String,
    /// Push settings.
    pub push: PushOptions,
    /// Log bytes kept for the failure message.
    pub max_log_bytes: usize,
}

struct Agent {
    http: reqwest::Client,
    opts: AgentOptions,
    cache: CacheClient,
    cache_url: String,
    name: String,
}

impl Agent {
    /// Every feature this builder has, mandatory ones included: what a verification may use.
    fn features(&self) -> Vec<String> {
        let mut have = self.opts.register.features.clone();
        have.extend(self.opts.register.mandatory_features.iter().cloned());
        have
    }

    /// Runs a verification with every feature this builder has.
    async fn verify(&self, out: &StorePath, spec: &crate::api::VerifySpec) -> Verification {
        let mut v = crate::verify::verify(out, spec, &self.features()).await;
        v.by = self.name.clone();
        v
    }

    async fn call<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<Option<T>, CallError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.opts.orchestrator.trim_end_matches('/')))
            .bearer_auth(&self.opts.token)
            .json(body)
            .send()
            .await?;
        match resp.status() {
            reqwest::StatusCode::NO_CONTENT => Ok(None),
            reqwest::StatusCode::GONE => Err(CallError::Gone),
            s if s.is_success() => {
                let text = crate::http::read_limited(resp, MAX_ANSWER)
                    .await
                    .map_err(|message| CallError::Status { status: s, message })?;
                if text.trim_ascii().is_empty() {
                    return Ok(None);
                }
                serde_json::from_slice(&text)
                    .map(Some)
                    .map_err(|e| CallError::Status { status: s, message: format!("unexpected answer: {e}") })
            }
            status => Err(CallError::Status { status, message: crate::http::error_text(resp).await }),
        }
    }
}

/// Registers (retrying while the orchestrator is unreachable), then runs `max_jobs` workers
/// until `stop`. Returns an error only for what retrying cannot fix.
pub async fn run(opts: AgentOptions, stop: CancellationToken) -> Result<(), AgentError> {
    let http = crate::http::client()?;
    let mut delay = Duration::from_millis(250);
    let registered: Registered = loop {
        let probe = Agent {
            http: http.clone(),
            opts: opts.clone(),
            cache: CacheClient::with_http(http.clone(), "http://unused", ""),
            cache_url: String::new(),
            name: String::new(),
        };
        match probe.call::<Registered>("/api/v1/builders/register", &opts.register).await {
            Ok(Some(r)) => break r,
            Err(CallError::Status { status, message }) if status == reqwest::StatusCode::UNAUTHORIZED => {
                return Err(AgentError::Unauthorized(message));
            }
            Err(CallError::Transport(e)) if crate::http::is_certificate_error(&e) => {
                return Err(AgentError::Untrusted {
                    url: opts.orchestrator.clone(),
                    message: crate::http::describe(&e),
                });
            }
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "empty answer".to_owned(),
                };
                tracing::warn!(error = %why, "registering with the orchestrator failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    };
    let cache_url = opts.cache_url.clone().or(registered.cache_url.clone()).ok_or(AgentError::NoCache)?;
    tracing::info!(name = %registered.name, cache = %cache_url, "registered");
    let agent = Arc::new(Agent {
        cache: CacheClient::with_http(http.clone(), &cache_url, &opts.cache_token),
        http,
        opts,
        cache_url,
        name: registered.name.clone(),
    });
    let workers: Vec<_> = (0..agent.opts.register.max_jobs.max(1))
        .map(|_| {
            let (agent, stop) = (agent.clone(), stop.clone());
            tokio::spawn(async move { worker(agent, stop).await })
        })
        .collect();
    let mut result = Ok(());
    for w in workers {
        if let Ok(Err(e)) = w.await {
            result = Err(e);
        }
    }
    result
}

async fn worker(agent: Arc<Agent>, stop: CancellationToken) -> Result<(), AgentError> {
    let mut delay = Duration::from_millis(250);
    while !stop.is_cancelled() {
        let claimed = tokio::select! {
            c = agent.call::<ClaimedJob>("/api/v1/jobs/claim", &ClaimRequest { wait_seconds: 25 }) => c,
            _ = stop.cancelled() => return Ok(()),
        };
        match claimed {
            Ok(Some(job)) => {
                delay = Duration::from_millis(250);
                run_job(&agent, job, &stop).await;
            }
            Ok(None) => {}
            Err(CallError::Status { status, message }) if status == reqwest::StatusCode::UNAUTHORIZED => {
                return Err(AgentError::Unauthorized(message));
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    Ok(())
}

/// What the heartbeat reports.
/// What the heartbeats report and the log chunks carry, as the job runs.
struct Progress {
    phase: std::sync::Mutex<&'static str>,
    pushed: AtomicU64,
    log: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Progress {
    fn set_phase(&self, phase: &'static str) {
        *self.phase.lock().expect("phase") = phase;
    }
}

impl crate::pipeline::Watcher for Progress {
    fn stage(&self, stage: Stage) {
        self.set_phase(stage.as_str());
    }
    fn log_line(&self, line: &str) {
        let _ = self.log.send(line.to_owned());
    }
    fn pushed(&self, total: u64) {
        self.pushed.store(total, Ordering::Relaxed);
    }
    fn note(&self, message: &str) {
        tracing::warn!("{message}");
    }
}

#[tracing::instrument(skip_all, fields(job = job.id, kind = ?job.kind))]
async fn run_job(agent: &Arc<Agent>, job: ClaimedJob, stop: &CancellationToken) {
    let started = Instant::now();
    tracing::info!(job = job.id, drv = %job.drv_path, "building");
    let lost = CancellationToken::new();
    let (log_tx, mut log_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let progress = Arc::new(Progress {
        phase: std::sync::Mutex::new("evaluating"),
        pushed: AtomicU64::new(0),
        log: log_tx,
    });
    // Heartbeats and log chunks, until the attempt ends (`done`).
    let done = CancellationToken::new();
    let beat = {
        let (agent, lost, progress, job, done) =
            (agent.clone(), lost.clone(), progress.clone(), job.clone(), done.clone());
        tokio::spawn(async move {
            let every = Duration::from_secs(job.lease_seconds.max(3) / 3);
            let mut next_beat = tokio::time::Instant::now();
            let mut pending = String::new();
            let mut log_open = true;
            loop {
                let ending = tokio::select! {
                    line = log_rx.recv(), if log_open => {
                        match line {
                            Some(l) => { pending.push_str(&l); pending.push('\n'); }
                            None => log_open = false,
                        }
                        continue;
                    }
                    _ = done.cancelled() => true,
                    _ = tokio::time::sleep_until(next_beat.min(tokio::time::Instant::now() + Duration::from_secs(1))) => false,
                };
                if !pending.is_empty() {
                    let chunk = LogChunk { lease: job.lease.clone(), text: std::mem::take(&mut pending) };
                    if let Err(CallError::Gone) =
                        agent.call::<()>(&format!("/api/v1/jobs/{}/log", job.id), &chunk).await
                    {
                        lost.cancel();
                    }
                }
                if ending {
                    return;
                }
                if tokio::time::Instant::now() >= next_beat {
                    next_beat = tokio::time::Instant::now() + every;
                    let hb = Heartbeat {
                        lease: job.lease.clone(),
                        phase: (*progress.phase.lock().expect("phase")).to_owned(),
                        pushed_bytes: progress.pushed.load(Ordering::Relaxed),
                    };
                    if let Err(CallError::Gone) =
                        agent.call::<()>(&format!("/api/v1/jobs/{}/heartbeat", job.id), &hb).await
                    {
                        tracing::warn!(job = job.id, "the orchestrator took the job back; stopping it");
                        lost.cancel();
                    }
                }
            }
        })
    };
    let cancel = CancellationToken::new();
    let link = {
        let (cancel, lost, stop) = (cancel.clone(), lost.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! { _ = lost.cancelled() => {}, _ = stop.cancelled() => {} }
            cancel.cancel();
        })
    };
    let (outcome, error, verification) = attempt(agent, &job, progress, &cancel).await;
    link.abort();
    done.cancel();
    let _ = beat.await;
    if lost.is_cancelled() {
        return;
    }
    let (outcome, error) = if stop.is_cancelled() && outcome != Outcome::Built {
        (Outcome::Refused, Some("the builder is shutting down".to_owned()))
    } else {
        (outcome, error)
    };
    let seconds = started.elapsed().as_secs_f64();
    let result = JobResult { lease: job.lease.clone(), outcome, error, seconds, verification };
    for _ in 0..10 {
        match agent.call::<()>(&format!("/api/v1/jobs/{}/result", job.id), &result).await {
            Ok(_) | Err(CallError::Gone) => break,
            Err(e) => {
                tracing::warn!(job = job.id, error = %e, "reporting the result failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    tracing::info!(job = job.id, outcome = ?result.outcome, seconds = result.seconds, "done");
}

async fn attempt(
    agent: &Agent,
    job: &ClaimedJob,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> (Outcome, Option<String>, Option<Verification>) {
    let refuse = |why: String| (Outcome::Refused, Some(why), None);
    if job.kind == JobKind::Verify {
        return verify_built(agent, job, &progress).await;
    }
    let eval = match crate::eval::evaluate(&job.flake_url, &job.attr_path).await {
        Ok(e) => e,
        Err(e) => return refuse(format!("evaluating {}: {e}", job.attr_path.join("."))),
    };
    if eval.drv_path.to_absolute() != job.drv_path {
        return refuse(format!(
            "evaluation is not reproducible: this builder gets {}, the orchestrator {}",
            eval.drv_path.to_absolute(),
            job.drv_path
        ));
    }
    let outputs: Vec<StorePath> = eval.outputs.values().cloned().collect();
    let target = Target {
        drv: &eval.drv_path,
        outputs: &outputs,
        main_output: eval.main_output(),
        required_files: &job.required_files,
        verify: job.verify.as_ref(),
    };
    let features = agent.features();
    let settings = crate::pipeline::Settings {
        cache: &agent.cache,
        push: &agent.opts.push,
        max_log_bytes: agent.opts.max_log_bytes,
        features: &features,
        name: &agent.name,
    };
    // The log goes to the orchestrator as it comes; the attempt's own copy is not needed.
    match crate::pipeline::realise(&target, &settings, progress, cancel).await.end {
        End::Built(verification) => (Outcome::Built, None, verification),
        End::Failed(why) => (Outcome::Failed, Some(why), None),
        End::PushFailed(why) => (Outcome::PushFailed, Some(why), None),
        End::Stopped(at) => refuse(at.to_owned()),
    }
}

/// A verify job: fetch the output from the cache (this builder trusts the cache it pushes to)
/// and run the check.
async fn verify_built(
    agent: &Agent,
    job: &ClaimedJob,
    progress: &Arc<Progress>,
) -> (Outcome, Option<String>, Option<Verification>) {
    let (Some(output), Some(spec)) = (job.out_paths.first(), &job.verify) else {
        return (Outcome::Refused, Some("a verify job without an output or a check".to_owned()), None);
    };
    let out = match StorePath::from_absolute(output) {
        Ok(p) => p,
        Err(e) => return (Outcome::Refused, Some(format!("{output}: {e}")), None),
    };
    progress.set_phase("fetching");
    let fetched = crate::nix::async_command("nix")
        .args(["copy", "--no-check-sigs", "--from", &agent.cache_url, output])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match fetched {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr).trim().to_owned();
            return (Outcome::Refused, Some(format!("fetching {output} from the cache: {why}")), None);
        }
        Err(e) => return (Outcome::Refused, Some(format!("running nix copy: {e}")), None),
    }
    progress.set_phase("verifying");
    (Outcome::Built, None, Some(agent.verify(&out, spec).await))
}

/// Features this machine has: `cuda` when `nvidia-smi` works, `vulkan` when `vulkaninfo` lists
/// a device, `kvm` when `/dev/kvm` exists.
pub fn detect_features() -> Vec<String> {
    let prints = |cmd: &str, args: &[&str], wanted: &dyn Fn(&str) -> bool| {
        std::process::Command::new(cmd)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .map(|o| o.status.success() && wanted(&String::from_utf8_lossy(&o.stdout)))
            .unwrap_or(false)
    };
    let mut features = Vec::new();
    if prints("nvidia-smi", &["-L"], &|out| out.contains("GPU")) {
        features.push("cuda".to_owned());
    }
    // A software rasteriser (Mesa's llvmpipe, deviceType CPU) is not a Vulkan GPU.
    if prints("vulkaninfo", &["--summary"], &vulkan_gpu_listed) {
        features.push("vulkan".to_owned());
    }
    if std::path::Path::new("/dev/kvm").exists() {
        features.push("kvm".to_owned());
    }
    features
}

/// Whether `vulkaninfo --summary` output lists a device that is a GPU.
fn vulkan_gpu_listed(summary: &str) -> bool {
    summary.lines().any(|l| {
        let l = l.trim();
        l.starts_with("deviceType") && l.contains("_GPU")
    })
}

#[cfg(test)]
mod tests {
    use super::vulkan_gpu_listed;

    #[test]
    fn only_vulkan_gpus_count() {
        let llvmpipe = "Devices:\n========\nGPU0:\n\tapiVersion         = 1.3.255\n\
                        \tdeviceType         = PHYSICAL_DEVICE_TYPE_CPU\n\tdeviceName         = llvmpipe (LLVM 15.0.6, 256 bits)\n";
        assert!(!vulkan_gpu_listed(llvmpipe));
        let nvidia = format!(
            "{llvmpipe}GPU1:\n\tdeviceType         = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU\n\tdeviceName         = NVIDIA GeForce RTX 4090\n"
        );
        assert!(vulkan_gpu_listed(&nvidia));
        assert!(!vulkan_gpu_listed(""));
    }
}
