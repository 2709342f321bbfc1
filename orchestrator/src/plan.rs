//! Planning a revision: resolve it, read its lock, find what to build — the llama.cpp every fleet
//! machine installs and the configured variants — evaluate it against the flake at that commit,
//! and mark what the cache has or is known to fail. What is left is built by `build` (here) or
//! queued by `serve` (for builder agents).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use builder::api::VerifySpec;
use builder::eval::{Evaluation, MachinePackage, evaluate, machine_package, machine_package_attr, machines};
use futures_util::StreamExt as _;
use nix_formats::StorePath;
use thiserror::Error;

use crate::config::{Config, VariantConfig, attr_path};
use crate::context::Context;
use crate::flake::{FlakeError, FleetRepo, LockedInput};
use crate::outcome::{BuildReport, Status, VariantResult};
use crate::report::Phase;
use crate::state::{DerivationStatus, StateError};

/// Why a revision could not be planned (a variant failing is a result, not this).
#[derive(Debug, Error)]
pub enum PlanError {
    /// The revision or its lock.
    #[error(transparent)]
    Flake(#[from] FlakeError),
    /// The state database.
    #[error(transparent)]
    State(#[from] StateError),
    /// The fleet's machines could not be listed.
    #[error("listing the machines (nixosConfigurations) of {flake}: {message}")]
    Machines {
        /// The flake, at the commit.
        flake: String,
        /// Nix's message.
        message: String,
    },
    /// Nothing is left to build: no machine installs anything, or no name matched.
    #[error("{0}")]
    Nothing(String),
}

/// What a run builds: configured variants and what the fleet's machines install.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// The configured variants (only the named ones when names are given).
    pub variants: Vec<VariantConfig>,
    /// Whether the machines say what to build too.
    pub machines: bool,
    /// The variant or machine names asked for (`--variant`); empty for everything.
    pub names: Vec<String>,
}

impl Selection {
    /// What `config` builds, narrowed to `names` (variant names, or machine names when the
    /// machines are asked). A name no configured variant has is an error here when the
    /// machines are not asked; otherwise it is checked once they have answered.
    pub fn new(config: &Config, names: &[String]) -> Result<Self, String> {
        let machines = config.builds_machines();
        let known: Vec<&str> = config.variants.iter().map(|v| v.name.as_str()).collect();
        if !machines && let Some(n) = names.iter().find(|n| !known.contains(&n.as_str())) {
            return Err(format!("no variant {n:?} is configured (known: {})", known.join(", ")));
        }
        // A name that is not a configured variant may be a machine, whose derivation may be a
        // configured variant's: then every configured variant is evaluated and matched later.
        let all = names.is_empty() || names.iter().any(|n| !known.contains(&n.as_str()));
        let variants = config.variants.iter().filter(|v| all || names.contains(&v.name)).cloned().collect();
        Ok(Selection { variants, machines, names: names.to_vec() })
    }
}

/// A variant on one system, as a run tracks it.
pub struct Job {
    /// How reports name it: the variant, with the system when several are built.
    pub label: String,
    /// The variant's name.
    pub variant: String,
    /// The system.
    pub system: String,
    /// The attribute path as shown, `{system}` filled in.
    pub attr: String,
    /// The attribute path's components, as evaluated.
    pub attr_path: Vec<String>,
    /// Builder features its build needs.
    pub features: Vec<String>,
    /// Files its output must have.
    pub files: Vec<String>,
    /// Its check on real hardware.
    pub verify: Option<VerifySpec>,
    /// The check's result.
    pub verification: Option<builder::api::Verification>,
    /// The fleet's machines that install it.
    pub machines: Vec<String>,
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

/// Resolves `requested`, finds and evaluates what `selection` builds and marks what is cached
/// or known to fail.
pub async fn plan(
    ctx: &Context,
    repo: &FleetRepo,
    requested: &str,
    selection: &Selection,
) -> Result<Plan, PlanError> {
    let start = Instant::now();
    let commit = repo.resolve(requested)?;
    let inputs = repo.locked_inputs(&commit)?;
    let revision_id = ctx
        .state
        .record_revision(&repo.reference, &commit, requested, &inputs.values().cloned().collect::<Vec<_>>())
        .await?;
    ctx.reporter.revision(&repo.reference, requested, &commit, &inputs);
    let flake_url = repo.flake_url_at(&commit);

    let mut jobs = configured_jobs(ctx, &selection.variants);
    // The configured variants evaluate while the machines are asked.
    let discovery =
        async { if selection.machines { discover(ctx, &flake_url).await.map(Some) } else { Ok(None) } };
    let (discovered, ()) = tokio::join!(discovery, evaluate_jobs(ctx, start, &flake_url, &mut jobs));
    if let Some(found) = discovered? {
        add_machines(ctx, start, &mut jobs, found);
    }
    select(&mut jobs, &selection.names)?;
    if jobs.is_empty() {
        return Err(PlanError::Nothing(format!(
            "nothing to build at {commit}: no machine of {} enables services.fleetcache.client, and no \
             [[variant]] is configured",
            repo.reference
        )));
    }

    // Known failures, then one question to the cache for every output.
    for job in jobs.iter_mut().filter(|j| j.status.is_none()) {
        let drv = job.eval.as_ref().expect("evaluated").drv_path.to_absolute();
        if let (DerivationStatus::Failed, failure) = ctx.state.derivation(&drv).await?
            && !ctx.options.retry_failed
        {
            let why = failure.map(|f| f.error).unwrap_or_default();
            job.fail(start, format!("{drv} failed before (pass --retry-failed to build it again): {why}"));
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
    match ctx.missing(&wanted).await {
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

/// A job per configured variant and system, not evaluated yet.
fn configured_jobs(ctx: &Context, variants: &[VariantConfig]) -> Vec<Job> {
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
                // Checked when the configuration was loaded.
                attr_path: attr_path(&v.attr, system).unwrap_or_default(),
                features: v.features.clone(),
                files: v.files.clone(),
                verify: v.verify.clone(),
                verification: None,
                machines: Vec::new(),
                eval: None,
                status: None,
                error: None,
                seconds: 0.0,
            });
        }
    }
    jobs
}

/// Evaluates every job, a few at a time: each `nix eval` is a process with its own evaluator in
/// memory, and one error names one variant.
async fn evaluate_jobs(ctx: &Context, start: Instant, flake_url: &str, jobs: &mut [Job]) {
    let pending: Vec<_> = jobs
        .iter()
        .map(|job| {
            let (label, path) = (job.label.clone(), job.attr_path.clone());
            let reporter = ctx.reporter.clone();
            async move {
                reporter.phase(&label, Phase::Evaluating);
                evaluate(flake_url, &path).await.map_err(|e| e.to_string())
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
}

/// What one machine answered.
struct Found {
    machine: String,
    package: Result<Option<MachinePackage>, String>,
}

/// Asks every machine of the flake what it installs through the client module.
async fn discover(ctx: &Context, flake_url: &str) -> Result<Vec<Found>, PlanError> {
    let names = machines(flake_url)
        .await
        .map_err(|e| PlanError::Machines { flake: flake_url.to_owned(), message: e.to_string() })?;
    ctx.reporter.note(&format!("asking {} machines what they install", names.len()));
    let asked = names.into_iter().map(|machine| async move {
        let package = machine_package(flake_url, &machine).await.map_err(|e| e.to_string());
        Found { machine, package }
    });
    Ok(futures_util::stream::iter(asked).buffered(eval_concurrency()).collect().await)
}

/// The attribute path of machine `name`'s client package, as shown (quoted where needed).
fn machine_attr(name: &str) -> String {
    let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_'".contains(c));
    let name = if plain { name.to_owned() } else { format!("{name:?}") };
    format!("nixosConfigurations.{name}.config.services.fleetcache.client.package")
}

/// One derivation some machines install.
struct Group {
    kind: String,
    machines: Vec<String>,
    features: BTreeSet<String>,
    eval: Evaluation,
}

/// Adds what the machines install to `jobs`: a derivation a configured variant already builds
/// gains the machines (and their features); every other one becomes a job named after the
/// client's variant (`cpu`, `cuda`, …; `cuda-<machine>` for a second `cuda` derivation). A
/// machine that does not evaluate is a failed job of its own: its package is never missed.
fn add_machines(ctx: &Context, start: Instant, jobs: &mut Vec<Job>, found: Vec<Found>) {
    let mut groups: BTreeMap<StorePath, Group> = BTreeMap::new();
    let mut failed = Vec::new();
    let (asked, mut clients) = (found.len(), 0);
    for f in found {
        match f.package {
            Ok(None) => {}
            Ok(Some(p)) => {
                clients += 1;
                let group = groups.entry(p.eval.drv_path.clone()).or_insert_with(|| Group {
                    kind: p.variant.clone(),
                    machines: Vec::new(),
                    features: BTreeSet::new(),
                    eval: p.eval.clone(),
                });
                group.machines.push(f.machine);
                group.features.extend(p.features);
            }
            Err(e) => failed.push((f.machine, e)),
        }
    }
    ctx.reporter.note(&format!(
        "{clients} of {asked} machines use the fleetcache client: {} derivations{}",
        groups.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(", {} machines did not evaluate", failed.len())
        }
    ));
    let by_drv: BTreeMap<StorePath, usize> = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, j)| j.eval.as_ref().map(|e| (e.drv_path.clone(), i)))
        .collect();
    let mut new = Vec::new();
    for (drv, mut group) in groups {
        group.machines.sort();
        match by_drv.get(&drv) {
            Some(&i) => {
                jobs[i].machines = group.machines;
                let features: BTreeSet<String> = jobs[i].features.drain(..).chain(group.features).collect();
                jobs[i].features = features.into_iter().collect();
            }
            None => new.push(group),
        }
    }
    // The derivation most machines of a kind share keeps the kind's bare name.
    new.sort_by(|a, b| {
        (&a.kind, std::cmp::Reverse(a.machines.len()), &a.machines).cmp(&(
            &b.kind,
            std::cmp::Reverse(b.machines.len()),
            &b.machines,
        ))
    });
    let mut taken: BTreeSet<String> = jobs.iter().map(|j| j.variant.clone()).collect();
    for group in new {
        let first = group.machines[0].clone();
        let name = if taken.contains(&group.kind) { format!("{}-{first}", group.kind) } else { group.kind };
        taken.insert(name.clone());
        ctx.reporter.phase(&name, Phase::Queued);
        jobs.push(Job {
            label: name.clone(),
            variant: name,
            system: group.eval.system.clone(),
            attr: machine_attr(&first),
            attr_path: machine_package_attr(&first),
            features: group.features.into_iter().collect(),
            files: Vec::new(),
            verify: None,
            verification: None,
            machines: group.machines,
            eval: Some(group.eval),
            status: None,
            error: None,
            seconds: 0.0,
        });
    }
    for (machine, error) in failed {
        let mut job = Job {
            label: machine.clone(),
            variant: machine.clone(),
            system: String::new(),
            attr: machine_attr(&machine),
            attr_path: machine_package_attr(&machine),
            features: Vec::new(),
            files: Vec::new(),
            verify: None,
            verification: None,
            machines: vec![machine.clone()],
            eval: None,
            status: None,
            error: None,
            seconds: 0.0,
        };
        job.fail(start, format!("evaluating machine {machine}: {error}"));
        jobs.push(job);
    }
}

/// Keeps the jobs `names` ask for, by variant or machine name; a name that matches nothing is
/// an error that lists what there is.
fn select(jobs: &mut Vec<Job>, names: &[String]) -> Result<(), PlanError> {
    if names.is_empty() {
        return Ok(());
    }
    let matches = |job: &Job, name: &String| job.variant == *name || job.machines.contains(name);
    if let Some(unknown) = names.iter().find(|n| !jobs.iter().any(|j| matches(j, n))) {
        let mut known: Vec<&str> = jobs.iter().map(|j| j.variant.as_str()).collect();
        known.extend(jobs.iter().flat_map(|j| j.machines.iter().map(String::as_str)));
        known.sort();
        known.dedup();
        return Err(PlanError::Nothing(format!(
            "no variant or machine {unknown:?} (known: {})",
            known.join(", ")
        )));
    }
    jobs.retain(|j| names.iter().any(|n| matches(j, n)));
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

    /// Builder features the derivation wanted by jobs `idx` needs: all they name.
    pub fn features_of(&self, idx: &[usize]) -> Vec<String> {
        let features: BTreeSet<String> = idx.iter().flat_map(|&i| self.jobs[i].features.clone()).collect();
        features.into_iter().collect()
    }

    /// Marks job `i` ended now.
    pub fn finish(&mut self, i: usize, status: Status, error: Option<String>) {
        let start = self.start;
        self.jobs[i].finish(start, status, error);
    }

    /// Records every job's end in the state and returns the report.
    pub async fn record(self, ctx: &Context) -> Result<BuildReport, PlanError> {
        let mut results = Vec::new();
        for job in &self.jobs {
            let result = job.result();
            ctx.state.record_variant(self.revision_id, &result, result.status.as_str()).await?;
            results.push(result);
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

    /// Where it stands, as a result (interrupted while it has not ended).
    pub fn result(&self) -> VariantResult {
        let (drv_path, out_paths) = match &self.eval {
            Some(e) => {
                (Some(e.drv_path.to_absolute()), e.outputs.values().map(StorePath::to_absolute).collect())
            }
            None => (None, Vec::new()),
        };
        VariantResult {
            variant: self.variant.clone(),
            system: self.system.clone(),
            attr: self.attr.clone(),
            drv_path,
            out_paths,
            machines: self.machines.clone(),
            status: self.status.unwrap_or(Status::Interrupted),
            seconds: self.seconds,
            error: self.error.clone(),
            verification: self.verification.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_attributes_are_quoted_when_they_must_be() {
        assert_eq!(
            machine_attr("carbon"),
            "nixosConfigurations.carbon.config.services.fleetcache.client.package"
        );
        let dotted = machine_attr("carbon.lan");
        assert_eq!(dotted, "nixosConfigurations.\"carbon.lan\".config.services.fleetcache.client.package");
        assert_eq!(attr_path(&dotted, "x").unwrap(), machine_package_attr("carbon.lan"));
    }
}
