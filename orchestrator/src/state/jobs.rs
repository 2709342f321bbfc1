//! The `jobs` table, the queue of `orchestrator serve`: one job per derivation (and one per
//! verification), claimed by a builder that can take it, held by a lease renewed by
//! heartbeats, back in the queue when the lease runs out ([`super::leases`]).
//!
//! A job is [`JobStatus::Queued`] until a builder claims it, [`JobStatus::Claimed`] while the
//! lease holds, then [`JobStatus::Built`] or [`JobStatus::Failed`] as its builder reports. A lost
//! lease, a refused push or an interrupted build queues it again, up to the server's
//! `max-attempts`; a derivation queued again after it ended (gone from the cache, or a failure
//! retried) starts over at `queued`.

use builder::api::{JobKind, Verification, VerifySpec};
use serde::Serialize;
use sqlx::Row as _;

use super::{State, StateError, json, now, strings};

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting for a builder that can take it.
    Queued,
    /// A builder holds its lease.
    Claimed,
    /// Built and in the cache (or, for a verification, its result recorded).
    Built,
    /// Failed, or given up after `max-attempts`.
    Failed,
}

impl JobStatus {
    /// Every status, for counting.
    pub const ALL: [JobStatus; 4] =
        [JobStatus::Queued, JobStatus::Claimed, JobStatus::Built, JobStatus::Failed];

    /// The word in the database, the API and `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Claimed => "claimed",
            JobStatus::Built => "built",
            JobStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "claimed" => JobStatus::Claimed,
            "built" => JobStatus::Built,
            "failed" => JobStatus::Failed,
            _ => JobStatus::Queued,
        }
    }
}

pub(super) fn kind_of(s: &str) -> JobKind {
    if s == "verify" { JobKind::Verify } else { JobKind::Build }
}

fn kind_str(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Verify => "verify",
        JobKind::Build => "build",
    }
}

/// A job as the API and the CLI show it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    /// The job.
    pub id: i64,
    /// Its derivation.
    pub drv_path: String,
    /// Its system.
    pub system: String,
    /// Features it requires.
    pub features: Vec<String>,
    /// Where it stands.
    pub status: JobStatus,
    /// The builder holding it.
    pub builder: Option<String>,
    /// What the builder says it is doing.
    pub phase: Option<String>,
    /// NAR bytes pushed so far.
    pub pushed_bytes: u64,
    /// Claims so far.
    pub attempts: u32,
    /// Why it failed.
    pub error: Option<String>,
    /// The verification its builder ran.
    pub verification: Option<Verification>,
}

/// What a job needs to be queued.
pub struct NewJob<'a> {
    /// Its derivation.
    pub drv_path: &'a str,
    /// Its system.
    pub system: &'a str,
    /// Features it requires.
    pub features: &'a [String],
    /// The flake, locked at the revision, builders evaluate.
    pub flake_url: &'a str,
    /// The attribute path in it.
    pub attr_path: &'a [String],
    /// Its outputs.
    pub out_paths: &'a [String],
    /// Files the output must have.
    pub required_files: &'a [String],
    /// The verification its builder runs if it can.
    pub verify: Option<&'a VerifySpec>,
}

impl State {
    /// Queues a job for a derivation. A derivation already queued or running is not queued
    /// twice; one that ended (built but gone from the cache, or failed and retried) is queued
    /// again. Returns the job's id.
    pub async fn enqueue(&self, job: &NewJob<'_>) -> Result<i64, StateError> {
        let now = now();
        let row = sqlx::query(&self.sql(
            "INSERT INTO jobs (drv_path, system, features, flake_url, attr_path, out_paths, required_files, verify,
               status, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?8, ?9, 'queued', ?7, ?7)
             ON CONFLICT (drv_path, kind) DO UPDATE SET status = 'queued', attempts = 0, error = NULL, verification = NULL,
               features = excluded.features, flake_url = excluded.flake_url, attr_path = excluded.attr_path,
               required_files = excluded.required_files, verify = excluded.verify,
               updated_at = excluded.updated_at
             WHERE jobs.status IN ('built', 'failed')
             RETURNING id",
        ))
        .bind(job.drv_path)
        .bind(job.system)
        .bind(json(&job.features))
        .bind(job.flake_url)
        .bind(json(&job.attr_path))
        .bind(json(&job.out_paths))
        .bind(now)
        .bind(json(&job.required_files))
        .bind(job.verify.map(json))
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        match row {
            Some(r) => Ok(r.get(0)),
            None => Ok(sqlx::query(&self.sql("SELECT id FROM jobs WHERE drv_path = ? AND kind = 'build'"))
                .bind(job.drv_path)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| self.err(e))?
                .get(0)),
        }
    }

    /// Queues the verification of a built derivation's output on a builder with the spec's
    /// features (once per derivation). Returns the job's id.
    pub async fn enqueue_verification(
        &self,
        drv_path: &str,
        system: &str,
        output: &str,
        spec: &VerifySpec,
    ) -> Result<i64, StateError> {
        let now = now();
        sqlx::query(&self.sql(
            "INSERT INTO jobs (drv_path, kind, system, features, flake_url, attr_path, out_paths, verify, status,
               created_at, updated_at)
             VALUES (?1, 'verify', ?2, ?3, '', '[]', ?4, ?5, 'queued', ?6, ?6)
             ON CONFLICT (drv_path, kind) DO NOTHING",
        ))
        .bind(drv_path)
        .bind(system)
        .bind(json(&spec.features))
        .bind(json(&[output]))
        .bind(json(spec))
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(sqlx::query(&self.sql("SELECT id FROM jobs WHERE drv_path = ? AND kind = 'verify'"))
            .bind(drv_path)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?
            .get(0))
    }
    /// The build (or verify) jobs of these derivations, by derivation.
    pub async fn jobs_for(
        &self,
        drv_paths: &[String],
        kind: JobKind,
    ) -> Result<std::collections::HashMap<String, JobView>, StateError> {
        let kind = kind_str(kind);
        let mut out = std::collections::HashMap::new();
        for drv in drv_paths {
            if let Some(r) = sqlx::query(&self.sql(
                "SELECT id, drv_path, system, features, status, builder, phase, pushed_bytes, attempts, error, verification
                 FROM jobs WHERE drv_path = ? AND kind = ?",
            ))
            .bind(drv)
            .bind(kind)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?
            {
                out.insert(
                    drv.clone(),
                    JobView {
                        id: r.get(0),
                        drv_path: r.get(1),
                        system: r.get(2),
                        features: strings(r.get(3)),
                        status: JobStatus::parse(r.get(4)),
                        builder: r.get(5),
                        phase: r.get(6),
                        pushed_bytes: r.get::<i64, _>(7) as u64,
                        attempts: r.get::<i64, _>(8) as u32,
                        error: r.get(9),
                        verification: r.get::<Option<&str>, _>(10).and_then(|v| serde_json::from_str(v).ok()),
                    },
                );
            }
        }
        Ok(out)
    }

    /// How many jobs are in each status.
    pub async fn job_counts(&self) -> Result<Vec<(JobStatus, u64)>, StateError> {
        let mut out = Vec::new();
        for status in JobStatus::ALL {
            let n: i64 = sqlx::query(&self.sql("SELECT count(*) FROM jobs WHERE status = ?"))
                .bind(status.as_str())
                .fetch_one(&self.pool)
                .await
                .map_err(|e| self.err(e))?
                .get(0);
            out.push((status, n as u64));
        }
        Ok(out)
    }

    /// The log of a derivation's build: so far while a builder runs it (then `true`), else
    /// that of its last attempt (distributed or embedded).
    pub async fn job_log(&self, drv_path: &str) -> Result<Option<(String, bool)>, StateError> {
        let row =
            sqlx::query(&self.sql("SELECT status, log FROM jobs WHERE drv_path = ? AND kind = 'build'"))
                .bind(drv_path)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        if let Some(row) = row
            && JobStatus::parse(row.get(0)) == JobStatus::Claimed
        {
            return Ok(Some((row.get(1), true)));
        }
        let last = sqlx::query(
            &self.sql("SELECT log, status FROM attempts WHERE drv_path = ? ORDER BY id DESC LIMIT 1"),
        )
        .bind(drv_path)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(last
            .map(|r| (r.get::<Option<String>, _>(0).unwrap_or_default(), r.get::<&str, _>(1) == "running")))
    }
}
