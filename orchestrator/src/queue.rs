//! The job queue of `orchestrator serve`, in the state database: one job per derivation,
//! claimed by a builder that can take it (Nix's rule on systems and features), held by a lease
//! renewed by heartbeats, back in the queue when the lease runs out.

use builder::api::{ClaimedJob, JobKind, Register, Verification, VerifySpec};
use serde::{Deserialize, Serialize};
use sqlx::Row as _;

use crate::state::{AttemptEnd, DerivationStatus, State, StateError, now};

/// A registered builder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BuilderInfo {
    /// Its name (from its token).
    pub name: String,
    /// Systems it builds for.
    pub systems: Vec<String>,
    /// Features it supports.
    pub features: Vec<String>,
    /// Features a job must require for it to take the job.
    pub mandatory_features: Vec<String>,
    /// Jobs it runs at once.
    pub max_jobs: u32,
    /// Its version.
    pub version: String,
    /// Unix seconds of its last request.
    pub last_seen: i64,
    /// Jobs it holds now.
    pub running: u32,
}

impl BuilderInfo {
    /// Nix's rule: the builder has the system and every required feature, and the job requires
    /// every one of the builder's mandatory features.
    pub fn can_take(&self, system: &str, features: &[String]) -> bool {
        self.systems.iter().any(|s| s == system)
            && features.iter().all(|f| self.features.contains(f) || self.mandatory_features.contains(f))
            && self.mandatory_features.iter().all(|m| features.contains(m))
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
    /// `queued`, `claimed`, `built` or `failed`.
    pub status: String,
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

fn json(v: &impl Serialize) -> String {
    serde_json::to_string(v).expect("plain data serialises")
}
fn strings(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}

fn builder_info(r: &sqlx::any::AnyRow) -> BuilderInfo {
    BuilderInfo {
        name: r.get(0),
        systems: strings(r.get(1)),
        features: strings(r.get(2)),
        mandatory_features: strings(r.get(3)),
        max_jobs: r.get::<i64, _>(4) as u32,
        version: r.get(5),
        last_seen: r.get(6),
        running: r.get::<i64, _>(7) as u32,
    }
}

fn random_lease() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("randomness");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl State {
    /// Records (or updates) a builder's registration.
    pub async fn register_builder(&self, name: &str, r: &Register) -> Result<(), StateError> {
        sqlx::query(&self.sql(
            "INSERT INTO builders (name, systems, features, mandatory_features, max_jobs, version, last_seen)
             VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET systems = excluded.systems, features = excluded.features,
               mandatory_features = excluded.mandatory_features, max_jobs = excluded.max_jobs,
               version = excluded.version, last_seen = excluded.last_seen",
        ))
        .bind(name)
        .bind(json(&r.systems))
        .bind(json(&r.features))
        .bind(json(&r.mandatory_features))
        .bind(r.max_jobs as i64)
        .bind(&r.version)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every registered builder, with the jobs it holds.
    pub async fn builders(&self) -> Result<Vec<BuilderInfo>, StateError> {
        let rows = sqlx::query(&self.sql(
            "SELECT b.name, b.systems, b.features, b.mandatory_features, b.max_jobs, b.version, b.last_seen,
               (SELECT count(*) FROM jobs j WHERE j.builder = b.name AND j.status = 'claimed')
             FROM builders b ORDER BY b.name",
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(builder_info).collect())
    }

    /// One builder, with the jobs it holds.
    async fn builder(&self, name: &str) -> Result<Option<BuilderInfo>, StateError> {
        let row = sqlx::query(&self.sql(
            "SELECT b.name, b.systems, b.features, b.mandatory_features, b.max_jobs, b.version, b.last_seen,
               (SELECT count(*) FROM jobs j WHERE j.builder = b.name AND j.status = 'claimed')
             FROM builders b WHERE b.name = ?",
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(row.map(|r| builder_info(&r)))
    }

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
        let kind = if c.get::<&str, _>(9) == "verify" { JobKind::Verify } else { JobKind::Build };
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
            kind: if r.get::<&str, _>(1) == "verify" { JobKind::Verify } else { JobKind::Build },
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
        let is_build = row.get::<&str, _>(4) == "build";
        let (status, drv_status) = match end {
            AttemptEnd::Built => ("built", DerivationStatus::Built),
            AttemptEnd::Failed => ("failed", DerivationStatus::Failed),
            AttemptEnd::PushFailed | AttemptEnd::Interrupted if attempts as u32 >= max_attempts => {
                ("failed", DerivationStatus::New)
            }
            AttemptEnd::PushFailed | AttemptEnd::Interrupted => ("queued", DerivationStatus::New),
        };
        let job_error = match (status, error) {
            ("failed", Some(e)) if end != AttemptEnd::Failed => {
                Some(format!("gave up after {attempts} attempts: {e}"))
            }
            (_, e) => e.map(str::to_owned),
        };
        let r = sqlx::query(&self.sql(
            "UPDATE jobs SET status = ?, error = ?, verification = ?, builder = NULL, lease = NULL, lease_until = NULL,
               phase = NULL, updated_at = ? WHERE id = ? AND lease = ?",
        ))
        .bind(status)
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

    /// The build (or verify) jobs of these derivations, by derivation.
    pub async fn jobs_for(
        &self,
        drv_paths: &[String],
        kind: JobKind,
    ) -> Result<std::collections::HashMap<String, JobView>, StateError> {
        let kind = if kind == JobKind::Verify { "verify" } else { "build" };
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
                        status: r.get(4),
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
            && row.get::<&str, _>(0) == "claimed"
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

    /// The derivation of `variant` in the newest build of `rev` (a commit, a prefix of one, or
    /// the branch or tag that was asked for), submitted or run here.
    pub async fn variant_drv(&self, rev: &str, variant: &str) -> Result<Option<String>, StateError> {
        let plans = sqlx::query(
            &self.sql("SELECT plan FROM requests WHERE plan IS NOT NULL ORDER BY id DESC LIMIT 200"),
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        for row in plans {
            let plan: serde_json::Value = serde_json::from_str(row.get::<&str, _>(0)).unwrap_or_default();
            let commit = plan["commit"].as_str().unwrap_or_default();
            if !(plan["requested"] == rev || (rev.len() >= 7 && commit.starts_with(rev))) {
                continue;
            }
            let entries = plan["entries"].as_array().cloned().unwrap_or_default();
            if let Some(e) = entries.iter().find(|e| e["result"]["variant"] == variant) {
                return Ok(e["result"]["drv_path"].as_str().map(str::to_owned));
            }
        }
        // A commit prefix: hex, long enough not to be a branch name by accident.
        let prefix =
            (rev.len() >= 7 && rev.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("{rev}%"));
        let row = sqlx::query(&self.sql(
            "SELECT v.drv_path FROM variants v JOIN revisions r ON r.id = v.revision_id
             WHERE v.variant = ?1 AND (r.requested = ?2 OR r.rev LIKE ?3)
             ORDER BY r.last_run DESC LIMIT 1",
        ))
        .bind(variant)
        .bind(rev)
        .bind(prefix.unwrap_or_default())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(row.and_then(|r| r.get(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder(systems: &[&str], features: &[&str], mandatory: &[&str]) -> BuilderInfo {
        let v = |x: &[&str]| x.iter().map(|s| (*s).to_owned()).collect();
        BuilderInfo {
            name: "b".into(),
            systems: v(systems),
            features: v(features),
            mandatory_features: v(mandatory),
            max_jobs: 1,
            version: "0".into(),
            last_seen: 0,
            running: 0,
        }
    }

    #[test]
    fn matching_follows_nix() {
        let f = |x: &[&str]| x.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let cuda_box = builder(&["x86_64-linux"], &["cuda", "big-parallel"], &[]);
        assert!(cuda_box.can_take("x86_64-linux", &f(&["cuda"])));
        assert!(cuda_box.can_take("x86_64-linux", &f(&[])));
        assert!(!cuda_box.can_take("aarch64-linux", &f(&[])));
        assert!(!cuda_box.can_take("x86_64-linux", &f(&["vulkan"])));
        let only_cuda = builder(&["x86_64-linux"], &[], &["cuda"]);
        assert!(only_cuda.can_take("x86_64-linux", &f(&["cuda"])), "a mandatory feature counts as supported");
        assert!(!only_cuda.can_take("x86_64-linux", &f(&[])), "it takes only jobs that require it");
    }

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
            (views["/nix/store/b.drv"].status.as_str(), views["/nix/store/b.drv"].attempts),
            ("built", 2)
        );

        // A refused job is retried until the cap, then failed.
        assert!(s.finish_job(a, &gpu.lease, AttemptEnd::PushFailed, Some("x"), None, 0.0, 1).await.unwrap());
        let views = s.jobs_for(&["/nix/store/a.drv".to_owned()], JobKind::Build).await.unwrap();
        assert_eq!(views["/nix/store/a.drv"].status, "failed");
        assert!(views["/nix/store/a.drv"].error.as_deref().unwrap().contains("gave up after 1 attempts"));
    }
}
