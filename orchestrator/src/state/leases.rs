//! The leases on the `jobs` table: a builder claims a queued job it can take (Nix's rule on
//! systems and features), renews the lease with heartbeats while it builds, appends to the
//! job's log and reports how it ended; a lease that runs out puts the job back in the queue.

use builder::api::{ClaimedJob, JobKind, Verification, VerifySpec};
use sqlx::Row as _;

use super::builders::BuilderInfo;
use super::jobs::{JobStatus, kind_of};
use super::{AttemptEnd, DerivationStatus, State, StateError, json, now, strings};

/// A claimed job as its lease holder's requests are checked against it.
#[derive(Debug, Clone)]
pub struct LeasedJob {
    /// The builder holding it.
    pub builder: String,
    /// A build or a verification.
    pub kind: JobKind,
    /// The outputs a build must have put into the cache.
    pub out_paths: Vec<String>,
    /// The check it asked for, if any.
    pub verify: Option<VerifySpec>,
}

fn random_lease() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("randomness");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl State {
    /// Gives `builder` the oldest queued job it can take, if it has room. Callers serialise
    /// claims (one orchestrator owns a SQLite queue); the conditional update keeps a job from
    /// being claimed twice even so.
    pub async fn claim(&self, builder: &str, lease_seconds: u64) -> Result<Option<ClaimedJob>, StateError> {
        sqlx::query(&self.sql("UPDATE builders SET last_seen = ? WHERE name = ?"))
            .bind(now())
            .bind(builder)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        let Some(me) = self.builder(builder).await? else { return Ok(None) };
        if me.running >= me.max_jobs {
            return Ok(None);
        }
        // The oldest queued jobs first, a page at a time: most claims take one of the first.
        let mut after = 0i64;
        loop {
            let page = sqlx::query(&self.sql(
                "SELECT id, drv_path, system, features, flake_url, attr_path, out_paths, required_files, verify, kind
                 FROM jobs WHERE status = 'queued' AND id > ? ORDER BY id LIMIT 32",
            ))
            .bind(after)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
            let Some(last) = page.last() else { return Ok(None) };
            after = last.get(0);
            for c in page {
                if let Some(job) = self.try_take(&me, &c, lease_seconds).await? {
                    return Ok(Some(job));
                }
            }
        }
    }

    /// Claims the job in row `c` for `me` if it can take it and nobody took it meanwhile.
    async fn try_take(
        &self,
        me: &BuilderInfo,
        c: &sqlx::any::AnyRow,
        lease_seconds: u64,
    ) -> Result<Option<ClaimedJob>, StateError> {
        let builder = me.name.as_str();
        let (system, features): (String, Vec<String>) = (c.get(2), strings(c.get(3)));
        if !me.can_take(&system, &features) {
            return Ok(None);
        }
        let (id, drv_path): (i64, String) = (c.get(0), c.get(1));
        let lease = random_lease();
        let now = now();
        let taken = sqlx::query(&self.sql(
            "UPDATE jobs SET status = 'claimed', builder = ?, lease = ?, lease_until = ?, attempts = attempts + 1,
               phase = 'claimed', pushed_bytes = 0, log = '', updated_at = ?
             WHERE id = ? AND status = 'queued'",
        ))
        .bind(builder)
        .bind(&lease)
        .bind(now + lease_seconds as i64)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        if taken.rows_affected() != 1 {
            return Ok(None);
        }
        let kind = kind_of(c.get(9));
        // Build attempts are the derivation's history; verifications are recorded on the job.
        if kind == JobKind::Build {
            let attempt = self.start_attempt(&drv_path, builder).await?;
            sqlx::query(&self.sql("UPDATE jobs SET attempt_id = ? WHERE id = ?"))
                .bind(attempt)
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(Some(ClaimedJob {
            id,
            kind,
            lease,
            drv_path,
            system,
            flake_url: c.get(4),
            attr_path: strings(c.get(5)),
            out_paths: strings(c.get(6)),
            lease_seconds,
            required_files: strings(c.get(7)),
            verify: c.get::<Option<&str>, _>(8).and_then(|v| serde_json::from_str(v).ok()),
        }))
    }

    /// The claimed job `id` if `lease` holds it.
    pub async fn leased_job(&self, id: i64, lease: &str) -> Result<Option<LeasedJob>, StateError> {
        let row = sqlx::query(&self.sql(
            "SELECT builder, kind, out_paths, verify FROM jobs WHERE id = ? AND lease = ? AND status = 'claimed'",
        ))
        .bind(id)
        .bind(lease)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(row.map(|r| LeasedJob {
            builder: r.get::<Option<String>, _>(0).unwrap_or_default(),
            kind: kind_of(r.get(1)),
            out_paths: serde_json::from_str(r.get::<&str, _>(2)).unwrap_or_default(),
            verify: r.get::<Option<&str>, _>(3).and_then(|v| serde_json::from_str(v).ok()),
        }))
    }

    /// Renews a lease and records the builder's phase; false if the lease is no longer held.
    pub async fn heartbeat(
        &self,
        id: i64,
        lease: &str,
        phase: &str,
        pushed: u64,
        lease_seconds: u64,
    ) -> Result<bool, StateError> {
        let now = now();
        let r = sqlx::query(&self.sql(
            "UPDATE jobs SET lease_until = ?, phase = ?, pushed_bytes = ?, updated_at = ?
             WHERE id = ? AND lease = ? AND status = 'claimed'",
        ))
        .bind(now + lease_seconds as i64)
        .bind(phase)
        .bind(pushed as i64)
        .bind(now)
        .bind(id)
        .bind(lease)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(r.rows_affected() == 1)
    }

    /// Appends to a running job's log, keeping its last `max_bytes`; false if the lease is lost.
    pub async fn append_log(
        &self,
        id: i64,
        lease: &str,
        text: &str,
        max_bytes: usize,
    ) -> Result<bool, StateError> {
        let keep_tail = if self.is_postgres() {
            "right(log || ?1, CAST(?2 AS INTEGER))"
        } else {
            "substr(log || ?1, -?2)"
        };
        let sql =
            format!("UPDATE jobs SET log = {keep_tail} WHERE id = ?3 AND lease = ?4 AND status = 'claimed'");
        let r = sqlx::query(&self.sql(&sql))
            .bind(text)
            .bind(max_bytes as i64)
            .bind(id)
            .bind(lease)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(r.rows_affected() == 1)
    }

    /// Ends a claimed job as its builder reports. A push failure or a refusal puts it back in
    /// the queue until `max_attempts`. False if the lease is no longer held (the result of a
    /// lost lease is ignored).
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_job(
        &self,
        id: i64,
        lease: &str,
        end: AttemptEnd,
        error: Option<&str>,
        verification: Option<&Verification>,
        seconds: f64,
        max_attempts: u32,
    ) -> Result<bool, StateError> {
        let Some(row) =
            sqlx::query(&self.sql("SELECT drv_path, attempt_id, log, attempts, kind FROM jobs WHERE id = ? AND lease = ? AND status = 'claimed'"))
                .bind(id)
                .bind(lease)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| self.err(e))?
        else {
            return Ok(false);
        };
        let (drv, attempt, log, attempts): (String, Option<i64>, String, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let is_build = kind_of(row.get(4)) == JobKind::Build;
        let (status, drv_status) = match end {
            AttemptEnd::Built => (JobStatus::Built, DerivationStatus::Built),
            AttemptEnd::Failed => (JobStatus::Failed, DerivationStatus::Failed),
            AttemptEnd::PushFailed | AttemptEnd::Interrupted if attempts as u32 >= max_attempts => {
                (JobStatus::Failed, DerivationStatus::New)
            }
            AttemptEnd::PushFailed | AttemptEnd::Interrupted => (JobStatus::Queued, DerivationStatus::New),
        };
        let job_error = match (status, error) {
            (JobStatus::Failed, Some(e)) if end != AttemptEnd::Failed => {
                Some(format!("gave up after {attempts} attempts: {e}"))
            }
            (_, e) => e.map(str::to_owned),
        };
        let r = sqlx::query(&self.sql(
            "UPDATE jobs SET status = ?, error = ?, verification = ?, builder = NULL, lease = NULL, lease_until = NULL,
               phase = NULL, updated_at = ? WHERE id = ? AND lease = ?",
        ))
        .bind(status.as_str())
        .bind(&job_error)
        .bind(verification.map(json))
        .bind(now())
        .bind(id)
        .bind(lease)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        if r.rows_affected() != 1 {
            return Ok(false);
        }
        if let Some(attempt) = attempt {
            self.finish_attempt(attempt, end, seconds, error, &log).await?;
        }
        if is_build {
            self.set_derivation_status(&drv, drv_status).await?;
        }
        Ok(true)
    }

    /// Puts jobs whose lease ran out back in the queue (or fails them after `max_attempts`);
    /// returns how many were released.
    pub async fn reap_expired(&self, max_attempts: u32) -> Result<u64, StateError> {
        let expired = sqlx::query(
            &self.sql("SELECT id, lease, builder FROM jobs WHERE status = 'claimed' AND lease_until < ?"),
        )
        .bind(now())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        let mut n = 0;
        for row in expired {
            let (id, lease, builder): (i64, String, Option<String>) = (row.get(0), row.get(1), row.get(2));
            let why = format!("lease expired: builder {} stopped answering", builder.unwrap_or_default());
            if self
                .finish_job(id, &lease, AttemptEnd::Interrupted, Some(&why), None, 0.0, max_attempts)
                .await?
            {
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use builder::api::Register;

    use super::super::NewJob;
    use super::*;

    #[tokio::test]
    async fn claims_leases_and_late_results() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).await.unwrap();
        let reg = |features: &[&str]| Register {
            systems: vec!["x86_64-linux".into()],
            features: features.iter().map(|f| (*f).to_owned()).collect(),
            mandatory_features: vec![],
            max_jobs: 1,
            version: "t".into(),
        };
        s.register_builder("plain", &reg(&[])).await.unwrap();
        s.register_builder("gpu", &reg(&["cuda"])).await.unwrap();
        let cuda = vec!["cuda".to_owned()];
        fn new<'a>(drv: &'a str, features: &'a [String]) -> NewJob<'a> {
            NewJob {
                drv_path: drv,
                system: "x86_64-linux",
                features,
                flake_url: "f",
                attr_path: &[],
                out_paths: &[],
                required_files: &[],
                verify: None,
            }
        }
        let a = s.enqueue(&new("/nix/store/a.drv", &cuda)).await.unwrap();
        let b = s.enqueue(&new("/nix/store/b.drv", &[])).await.unwrap();
        assert_eq!(s.enqueue(&new("/nix/store/a.drv", &[])).await.unwrap(), a, "queued once");

        // The plain builder cannot take the cuda job; it gets the other one, then nothing (max-jobs 1).
        let got = s.claim("plain", 30).await.unwrap().unwrap();
        assert_eq!(got.id, b);
        assert!(s.claim("plain", 30).await.unwrap().is_none());
        let gpu = s.claim("gpu", 30).await.unwrap().unwrap();
        assert_eq!(gpu.id, a);

        // A lease that runs out goes back to the queue; the late result is ignored.
        assert!(s.heartbeat(b, &got.lease, "building", 0, 30).await.unwrap());
        sqlx::query(&s.sql("UPDATE jobs SET lease_until = 0 WHERE id = ?"))
            .bind(b)
            .execute(&s.pool)
            .await
            .unwrap();
        assert_eq!(s.reap_expired(3).await.unwrap(), 1);
        assert!(!s.heartbeat(b, &got.lease, "building", 0, 30).await.unwrap());
        assert!(!s.finish_job(b, &got.lease, AttemptEnd::Built, None, None, 1.0, 3).await.unwrap());
        let again = s.claim("plain", 30).await.unwrap().unwrap();
        assert_eq!((again.id, again.lease == got.lease), (b, false));
        assert!(s.append_log(b, &again.lease, "line\n", 100).await.unwrap());
        assert!(s.finish_job(b, &again.lease, AttemptEnd::Built, None, None, 1.0, 3).await.unwrap());
        assert_eq!(s.job_log("/nix/store/b.drv").await.unwrap(), Some(("line\n".to_owned(), false)));
        let views = s.jobs_for(&["/nix/store/b.drv".to_owned()], JobKind::Build).await.unwrap();
        assert_eq!(
            (views["/nix/store/b.drv"].status, views["/nix/store/b.drv"].attempts),
            (JobStatus::Built, 2)
        );

        // A refused job is retried until the cap, then failed.
        assert!(s.finish_job(a, &gpu.lease, AttemptEnd::PushFailed, Some("x"), None, 0.0, 1).await.unwrap());
        let views = s.jobs_for(&["/nix/store/a.drv".to_owned()], JobKind::Build).await.unwrap();
        assert_eq!(views["/nix/store/a.drv"].status, JobStatus::Failed);
        assert!(views["/nix/store/a.drv"].error.as_deref().unwrap().contains("gave up after 1 attempts"));
    }
}
