//! The `derivations` and `attempts` tables: a derivation's standing across runs, the claim a
//! run holds on it while it builds (a lease renewed while the build runs, taken over when it
//! runs out or its owner's process is gone from this host), and every build attempt with its
//! log.

use sqlx::Row as _;

use super::{LEASE, State, StateError, hostname, now};

/// A derivation's standing across runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerivationStatus {
    /// Never built, or its last attempt was interrupted.
    New,
    /// Built and published.
    Built,
    /// Its last attempt failed.
    Failed,
}

impl DerivationStatus {
    fn as_str(self) -> &'static str {
        match self {
            DerivationStatus::New => "new",
            DerivationStatus::Built => "built",
            DerivationStatus::Failed => "failed",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "built" => DerivationStatus::Built,
            "failed" => DerivationStatus::Failed,
            _ => DerivationStatus::New,
        }
    }
}

/// The outcome of trying to claim a derivation.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// We hold it: build it, renew it, release it.
    Acquired,
    /// Another run holds it.
    HeldBy(String),
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Built and published.
    Built,
    /// The build failed: the derivation is marked failed.
    Failed,
    /// The build succeeded but publishing it failed: the next run tries again.
    PushFailed,
    /// Stopped by the user (Ctrl-C) or lost; the derivation goes back to `new`.
    Interrupted,
}

/// The last failure of a derivation.
#[derive(Debug, Clone)]
pub struct Failure {
    /// When it ended (unix seconds).
    pub finished_at: i64,
    /// What went wrong.
    pub error: String,
}

/// Whether `owner` names a process of this host that no longer exists.
fn owner_is_gone(owner: &str) -> bool {
    let mut parts = owner.split(':');
    let (Some(host), Some(pid)) = (parts.next(), parts.next()) else { return false };
    if host != hostname() {
        return false;
    }
    match pid.parse::<i32>().ok().and_then(rustix::process::Pid::from_raw) {
        Some(pid) => rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH),
        None => false,
    }
}

impl State {
    /// The derivation's standing, and its last failure if it failed.
    pub async fn derivation(&self, drv: &str) -> Result<(DerivationStatus, Option<Failure>), StateError> {
        let row = sqlx::query(&self.sql("SELECT status FROM derivations WHERE drv_path = ?"))
            .bind(drv)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        let status =
            row.map(|r| DerivationStatus::parse(r.get::<&str, _>(0))).unwrap_or(DerivationStatus::New);
        if status != DerivationStatus::Failed {
            return Ok((status, None));
        }
        let failure = sqlx::query(&self.sql(
            "SELECT finished_at, error FROM attempts WHERE drv_path = ? AND status = 'failed' ORDER BY id DESC LIMIT 1",
        ))
        .bind(drv)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?
        .map(|r| Failure {
            finished_at: r.get::<Option<i64>, _>(0).unwrap_or(0),
            error: r.get::<Option<String>, _>(1).unwrap_or_default(),
        });
        Ok((status, failure))
    }

    /// Tries to claim `drv` for `owner`. A claim whose lease ran out, or whose owner's process
    /// is gone from this host, is taken over.
    pub async fn try_claim(&self, drv: &str, owner: &str) -> Result<Claim, StateError> {
        let now = now();
        let lease_until = now + LEASE.as_secs() as i64;
        sqlx::query(&self.sql(
            "INSERT INTO derivations (drv_path, status, updated_at) VALUES (?, 'new', ?) ON CONFLICT DO NOTHING",
        ))
        .bind(drv)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        let taken = sqlx::query(&self.sql(
            "UPDATE derivations SET owner = ?1, lease_until = ?2, updated_at = ?3
             WHERE drv_path = ?4 AND (owner IS NULL OR owner = ?1 OR lease_until < ?3)",
        ))
        .bind(owner)
        .bind(lease_until)
        .bind(now)
        .bind(drv)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        if taken.rows_affected() == 1 {
            return Ok(Claim::Acquired);
        }
        let holder: Option<String> =
            sqlx::query(&self.sql("SELECT owner FROM derivations WHERE drv_path = ?"))
                .bind(drv)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| self.err(e))?
                .get(0);
        let Some(holder) = holder else { return Box::pin(self.try_claim(drv, owner)).await };
        if owner_is_gone(&holder) {
            let stolen = sqlx::query(&self.sql(
                "UPDATE derivations SET owner = ?, lease_until = ?, updated_at = ? WHERE drv_path = ? AND owner = ?",
            ))
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(drv)
            .bind(&holder)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
            if stolen.rows_affected() == 1 {
                sqlx::query(&self.sql(
                    "UPDATE attempts SET status = 'interrupted', error = 'its run died', finished_at = ?
                     WHERE drv_path = ? AND owner = ? AND status = 'running'",
                ))
                .bind(now)
                .bind(drv)
                .bind(&holder)
                .execute(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
                return Ok(Claim::Acquired);
            }
        }
        Ok(Claim::HeldBy(holder))
    }

    /// Extends `owner`'s claim on `drv`; false if the claim was lost.
    pub async fn renew(&self, drv: &str, owner: &str) -> Result<bool, StateError> {
        let now = now();
        let r =
            sqlx::query(&self.sql(
                "UPDATE derivations SET lease_until = ?, updated_at = ? WHERE drv_path = ? AND owner = ?",
            ))
            .bind(now + LEASE.as_secs() as i64)
            .bind(now)
            .bind(drv)
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives up `owner`'s claim on `drv`, setting the derivation's standing.
    pub async fn release(&self, drv: &str, owner: &str, status: DerivationStatus) -> Result<(), StateError> {
        sqlx::query(&self.sql(
            "UPDATE derivations SET owner = NULL, lease_until = NULL, status = ?, updated_at = ?
             WHERE drv_path = ? AND owner = ?",
        ))
        .bind(status.as_str())
        .bind(now())
        .bind(drv)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Sets a derivation's standing (a distributed job ended).
    pub async fn set_derivation_status(&self, drv: &str, status: DerivationStatus) -> Result<(), StateError> {
        sqlx::query(&self.sql(
            "INSERT INTO derivations (drv_path, status, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (drv_path) DO UPDATE SET status = ?2, updated_at = ?3",
        ))
        .bind(drv)
        .bind(status.as_str())
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records the start of a build attempt; returns its id.
    pub async fn start_attempt(&self, drv: &str, owner: &str) -> Result<i64, StateError> {
        let row = sqlx::query(&self.sql(
            "INSERT INTO attempts (drv_path, owner, started_at, status) VALUES (?, ?, ?, 'running') RETURNING id",
        ))
        .bind(drv)
        .bind(owner)
        .bind(now())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(row.get(0))
    }

    /// Records how an attempt ended, with its log.
    pub async fn finish_attempt(
        &self,
        id: i64,
        end: AttemptEnd,
        seconds: f64,
        error: Option<&str>,
        log: &str,
    ) -> Result<(), StateError> {
        let status = match end {
            AttemptEnd::Built => "built",
            AttemptEnd::Failed => "failed",
            AttemptEnd::PushFailed => "push-failed",
            AttemptEnd::Interrupted => "interrupted",
        };
        sqlx::query(&self.sql(
            "UPDATE attempts SET status = ?, seconds = ?, error = ?, log = ?, finished_at = ? WHERE id = ?",
        ))
        .bind(status)
        .bind(seconds)
        .bind(error)
        .bind(log)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The log of an attempt.
    pub async fn attempt_log(&self, id: i64) -> Result<Option<String>, StateError> {
        let row = sqlx::query(&self.sql("SELECT log FROM attempts WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.and_then(|r| r.get(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::new_owner;
    use super::*;

    #[tokio::test]
    async fn one_claim_at_a_time_and_dead_owners_lose_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = State::open(dir.path()).await.unwrap();
        let b = State::open(dir.path()).await.unwrap();
        let drv = "/nix/store/00000000000000000000000000000000-x.drv";
        let me = new_owner();
        assert_eq!(a.try_claim(drv, &me).await.unwrap(), Claim::Acquired);
        assert_eq!(b.try_claim(drv, "other:1:x").await.unwrap(), Claim::HeldBy(me.clone()));
        assert!(a.renew(drv, &me).await.unwrap());
        assert!(!b.renew(drv, "other:1:x").await.unwrap());

        let attempt = a.start_attempt(drv, &me).await.unwrap();
        a.finish_attempt(attempt, AttemptEnd::Failed, 1.5, Some("exit 1"), "log\n").await.unwrap();
        a.release(drv, &me, DerivationStatus::Failed).await.unwrap();
        let (status, failure) = b.derivation(drv).await.unwrap();
        assert_eq!(status, DerivationStatus::Failed);
        assert_eq!(failure.unwrap().error, "exit 1");
        assert_eq!(a.attempt_log(attempt).await.unwrap().as_deref(), Some("log\n"));

        // A claim held by a process of this host that has exited is taken over.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let dead = format!("{}:{dead_pid}:dead", hostname());
        assert_eq!(a.try_claim(drv, &dead).await.unwrap(), Claim::Acquired);
        a.start_attempt(drv, &dead).await.unwrap();
        assert_eq!(b.try_claim(drv, "other:2:y").await.unwrap(), Claim::Acquired);
        let report_attempts: Vec<String> = sqlx::query(&b.sql("SELECT status FROM attempts ORDER BY id"))
            .fetch_all(&b.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(report_attempts, ["failed", "interrupted"]);
    }
}
