//! What a planned request's variant does next, as a plain function of what the state says of
//! its build job, its verification job and the builders: wait, have its verification queued, or
//! end.

use std::collections::HashMap;

use builder::api::{Verification, VerifyStatus};

use super::record::{Entry, alive};
use crate::outcome::Status;
use crate::state::{BuilderInfo, JobStatus, JobView};

/// The next step of a variant that has not ended.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Its job has not ended, or its verification is queued or running.
    Wait,
    /// Built where its verification could not run, and a builder with the features is alive:
    /// queue the verification of `output` there.
    Verify {
        /// The output to check.
        output: String,
    },
    /// It ended.
    Done {
        /// How.
        status: Status,
        /// Why it failed.
        error: Option<String>,
        /// The check on real hardware, if it has one.
        verification: Option<Verification>,
    },
}

fn unverified(detail: String) -> Verification {
    Verification { status: VerifyStatus::Unverified, detail, by: String::new() }
}

/// The next step of `entry`, from the build and verify jobs of the request's derivations and
/// the registered builders.
pub fn step(
    entry: &Entry,
    jobs: &HashMap<String, JobView>,
    checks: &HashMap<String, JobView>,
    builders: &[BuilderInfo],
) -> Step {
    let Some(drv) = entry.result.drv_path.as_ref() else { return Step::Wait };
    let Some(job) = jobs.get(drv) else { return Step::Wait };
    let status = match job.status {
        JobStatus::Built => Status::Built,
        JobStatus::Failed => Status::Failed,
        JobStatus::Queued | JobStatus::Claimed => return Step::Wait,
    };
    let done = |verification| Step::Done { status, error: job.error.clone(), verification };
    let settled = job.verification.as_ref().is_some_and(|v| v.status != VerifyStatus::Unverified);
    let (Status::Built, Some(spec), Some(output), false) =
        (status, &entry.verify, &entry.main_output, settled)
    else {
        return done(job.verification.clone());
    };
    // Built where the verification could not run: a builder with its features runs it.
    match checks.get(drv) {
        Some(check) if check.status == JobStatus::Built => done(check.verification.clone()),
        Some(check) if check.status == JobStatus::Failed => done(Some(unverified(format!(
            "the verification could not run: {}",
            check.error.as_deref().unwrap_or("?")
        )))),
        Some(_) => Step::Wait,
        None if alive(builders).any(|b| b.can_take(&job.system, &spec.features)) => {
            Step::Verify { output: output.clone() }
        }
        None => done(Some(unverified(format!(
            "no registered builder has {} to verify it",
            spec.features.join(", ")
        )))),
    }
}

#[cfg(test)]
mod tests {
    use builder::api::VerifySpec;

    use super::*;
    use crate::outcome::VariantResult;
    use crate::state::now;

    const DRV: &str = "/nix/store/00000000000000000000000000000000-llama-cpp.drv";

    fn entry(verify: bool) -> Entry {
        Entry {
            label: "cuda".into(),
            result: VariantResult {
                variant: "cuda".into(),
                system: "x86_64-linux".into(),
                attr: "a".into(),
                drv_path: Some(DRV.into()),
                out_paths: vec![],
                machines: vec![],
                status: Status::Interrupted,
                seconds: 0.0,
                error: None,
                verification: None,
            },
            done: false,
            verify: verify.then(|| VerifySpec {
                features: vec!["cuda".into()],
                command: "bin/llama-cli --list-devices".into(),
                expect: "CUDA0".into(),
            }),
            main_output: Some("/nix/store/o".into()),
        }
    }

    fn job(status: JobStatus, verification: Option<VerifyStatus>) -> HashMap<String, JobView> {
        let view = JobView {
            id: 1,
            drv_path: DRV.into(),
            system: "x86_64-linux".into(),
            features: vec![],
            status,
            builder: None,
            phase: None,
            pushed_bytes: 0,
            attempts: 1,
            error: (status == JobStatus::Failed).then(|| "exit 1".to_owned()),
            verification: verification.map(|status| Verification {
                status,
                detail: "d".into(),
                by: "b".into(),
            }),
        };
        HashMap::from([(DRV.to_owned(), view)])
    }

    fn builder(features: &[&str], last_seen: i64) -> BuilderInfo {
        BuilderInfo {
            name: "gpu".into(),
            systems: vec!["x86_64-linux".into()],
            features: features.iter().map(|f| (*f).to_owned()).collect(),
            mandatory_features: vec![],
            max_jobs: 1,
            version: "t".into(),
            last_seen,
            running: 0,
            built: 0,
            failed: 0,
        }
    }

    #[test]
    fn a_job_that_has_not_ended_waits_and_one_that_ended_ends() {
        let none = HashMap::new();
        assert_eq!(step(&entry(false), &none, &none, &[]), Step::Wait, "not queued yet");
        assert_eq!(step(&entry(false), &job(JobStatus::Claimed, None), &none, &[]), Step::Wait);
        assert_eq!(
            step(&entry(true), &job(JobStatus::Failed, None), &none, &[]),
            Step::Done { status: Status::Failed, error: Some("exit 1".into()), verification: None },
            "a failed build is not verified"
        );
        let Step::Done { status, verification, .. } =
            step(&entry(true), &job(JobStatus::Built, Some(VerifyStatus::Verified)), &none, &[])
        else {
            panic!("a build verified where it ran ends")
        };
        assert_eq!((status, verification.map(|v| v.status)), (Status::Built, Some(VerifyStatus::Verified)));
    }

    #[test]
    fn a_verification_that_could_not_run_goes_where_it_can() {
        let none = HashMap::new();
        let built = job(JobStatus::Built, Some(VerifyStatus::Unverified));
        let gpu = [builder(&["cuda"], now())];
        assert_eq!(step(&entry(true), &built, &none, &gpu), Step::Verify { output: "/nix/store/o".into() });
        // Nobody alive can: it ends unverified, saying why.
        for builders in [vec![], vec![builder(&["cuda"], now() - 3600)], vec![builder(&[], now())]] {
            let Step::Done { verification: Some(v), .. } = step(&entry(true), &built, &none, &builders)
            else {
                panic!("ends unverified")
            };
            assert_eq!(v.status, VerifyStatus::Unverified);
            assert!(v.detail.contains("no registered builder has cuda"), "{}", v.detail);
        }
        // Queued: wait; ended: its result.
        assert_eq!(step(&entry(true), &built, &job(JobStatus::Queued, None), &gpu), Step::Wait);
        let Step::Done { verification: Some(v), .. } =
            step(&entry(true), &built, &job(JobStatus::Built, Some(VerifyStatus::VerifyFailed)), &gpu)
        else {
            panic!("the check's result")
        };
        assert_eq!(v.status, VerifyStatus::VerifyFailed);
        let Step::Done { verification: Some(v), .. } =
            step(&entry(true), &built, &job(JobStatus::Failed, None), &gpu)
        else {
            panic!("a check that could not run")
        };
        assert!(v.detail.contains("could not run: exit 1"), "{}", v.detail);
    }
}
