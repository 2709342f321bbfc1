//! The orchestrator's record, in SQLite: every revision and the inputs its lock pins, each
//! variant's derivation, outputs and result, and every build attempt with its log.
//!
//! It is also the lock between concurrent runs: a derivation is built by whoever holds its
//! claim, a lease renewed while the build runs. A run that dies loses the claim when the lease
//! runs out, or at once when its process is gone from this host.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use thiserror::Error;

use crate::flake::LockedInput;

/// How long a claim lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(30);

/// A database failure.
#[derive(Debug, Error)]
#[error("state database {path}: {source}")]
pub struct StateError {
    path: PathBuf,
    #[source]
    source: sqlx::Error,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS revisions (
    id INTEGER PRIMARY KEY,
    flake TEXT NOT NULL,
    rev TEXT NOT NULL,
    requested TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_run INTEGER NOT NULL,
    UNIQUE (flake, rev)
);
CREATE TABLE IF NOT EXISTS lock_inputs (
    revision_id INTEGER NOT NULL REFERENCES revisions (id),
    name TEXT NOT NULL,
    rev TEXT,
    source TEXT NOT NULL,
    nar_hash TEXT,
    PRIMARY KEY (revision_id, name)
);
CREATE TABLE IF NOT EXISTS variants (
    revision_id INTEGER NOT NULL REFERENCES revisions (id),
    variant TEXT NOT NULL,
    system TEXT NOT NULL,
    attr TEXT NOT NULL,
    drv_path TEXT,
    out_paths TEXT NOT NULL DEFAULT '[]',
    status TEXT NOT NULL,
    error TEXT,
    seconds REAL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (revision_id, variant, system)
);
CREATE TABLE IF NOT EXISTS derivations (
    drv_path TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    owner TEXT,
    lease_until INTEGER,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    drv_path TEXT NOT NULL,
    owner TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    status TEXT NOT NULL,
    seconds REAL,
    error TEXT,
    log TEXT
);
CREATE INDEX IF NOT EXISTS attempts_by_derivation ON attempts (drv_path, id);
CREATE TABLE IF NOT EXISTS builders (
    name TEXT PRIMARY KEY,
    systems TEXT NOT NULL,
    features TEXT NOT NULL,
    mandatory_features TEXT NOT NULL,
    max_jobs INTEGER NOT NULL,
    version TEXT NOT NULL,
    last_seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    drv_path TEXT NOT NULL UNIQUE,
    system TEXT NOT NULL,
    features TEXT NOT NULL,
    flake_url TEXT NOT NULL,
    attr_path TEXT NOT NULL,
    out_paths TEXT NOT NULL,
    status TEXT NOT NULL,
    builder TEXT,
    lease TEXT,
    lease_until INTEGER,
    attempt_id INTEGER,
    phase TEXT,
    pushed_bytes INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    log TEXT NOT NULL DEFAULT '',
    required_files TEXT NOT NULL DEFAULT '[]',
    verify TEXT,
    verification TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, id);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    requested TEXT NOT NULL,
    variants TEXT NOT NULL,
    retry_failed INTEGER NOT NULL,
    status TEXT NOT NULL,
    plan TEXT,
    error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
PRAGMA user_version = 1;
"#;

/// The state database.
#[derive(Clone)]
pub struct State {
    pub(crate) pool: SqlitePool,
    path: PathBuf,
}

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

/// A revision as `orchestrator status` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RevisionReport {
    /// The fleet flake as given.
    pub flake: String,
    /// The commit.
    pub rev: String,
    /// What the user asked for (a branch, a tag, the commit).
    pub requested: String,
    /// Unix seconds of the last run.
    pub last_run: i64,
    /// The locked inputs.
    pub inputs: Vec<LockedInput>,
    /// The variants.
    pub variants: Vec<VariantReport>,
}

/// A variant of a revision with its derivation's attempts.
#[derive(Debug, Serialize, Deserialize)]
pub struct VariantReport {
    /// The variant's name.
    pub variant: String,
    /// The system.
    pub system: String,
    /// The attribute evaluated.
    pub attr: String,
    /// Its derivation, if it evaluated.
    pub drv_path: Option<String>,
    /// Its outputs.
    pub out_paths: Vec<String>,
    /// `cached`, `built`, `failed`, or a state the run was in when it stopped.
    pub status: String,
    /// The error, if it failed.
    pub error: Option<String>,
    /// Seconds the last run spent on it.
    pub seconds: Option<f64>,
    /// Every build attempt of its derivation, oldest first.
    pub attempts: Vec<AttemptReport>,
}

/// One build attempt.
#[derive(Debug, Serialize, Deserialize)]
pub struct AttemptReport {
    /// The attempt's number in the database.
    pub id: i64,
    /// Which run made it (`host:pid:nonce`).
    pub owner: String,
    /// Unix seconds.
    pub started_at: i64,
    /// `running`, `built`, `failed`, `push-failed` or `interrupted`.
    pub status: String,
    /// How long it took.
    pub seconds: Option<f64>,
    /// What went wrong.
    pub error: Option<String>,
    /// Bytes of log kept.
    pub log_bytes: i64,
}

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// This host's name, for claim owners.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

/// A unique name for this run: `host:pid:nonce`.
pub fn new_owner() -> String {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("randomness");
    format!("{}:{}:{:08x}", hostname(), std::process::id(), u32::from_le_bytes(b))
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
    /// Opens (creating if needed) `state.db` in `dir`.
    pub async fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join("state.db");
        let err = |source| StateError { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(|e| err(sqlx::Error::Io(e)))?;
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(60))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await.map_err(err)?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await.map_err(err)?;
        Ok(State { pool, path })
    }

    pub(crate) fn err(&self, source: sqlx::Error) -> StateError {
        StateError { path: self.path.clone(), source }
    }

    /// Records a run of `rev` and the inputs its lock pins; returns the revision's id.
    pub async fn record_revision(
        &self,
        flake: &str,
        rev: &str,
        requested: &str,
        inputs: &[LockedInput],
    ) -> Result<i64, StateError> {
        let now = now();
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let id: i64 = sqlx::query(
            "INSERT INTO revisions (flake, rev, requested, first_seen, last_run) VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (flake, rev) DO UPDATE SET last_run = ?4, requested = ?3 RETURNING id",
        )
        .bind(flake)
        .bind(rev)
        .bind(requested)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| self.err(e))?
        .get(0);
        for i in inputs {
            sqlx::query(
                "INSERT OR REPLACE INTO lock_inputs (revision_id, name, rev, source, nar_hash) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(&i.name)
            .bind(&i.rev)
            .bind(&i.source)
            .bind(&i.nar_hash)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(id)
    }

    /// Records where a variant of a revision stands.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_variant(
        &self,
        revision_id: i64,
        variant: &str,
        system: &str,
        attr: &str,
        drv_path: Option<&str>,
        out_paths: &[String],
        status: &str,
        error: Option<&str>,
        seconds: Option<f64>,
    ) -> Result<(), StateError> {
        sqlx::query(
            "INSERT OR REPLACE INTO variants
             (revision_id, variant, system, attr, drv_path, out_paths, status, error, seconds, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(revision_id)
        .bind(variant)
        .bind(system)
        .bind(attr)
        .bind(drv_path)
        .bind(serde_json::to_string(out_paths).expect("strings serialise"))
        .bind(status)
        .bind(error)
        .bind(seconds)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The derivation's standing, and its last failure if it failed.
    pub async fn derivation(&self, drv: &str) -> Result<(DerivationStatus, Option<Failure>), StateError> {
        let row = sqlx::query("SELECT status FROM derivations WHERE drv_path = ?")
            .bind(drv)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        let status =
            row.map(|r| DerivationStatus::parse(r.get::<&str, _>(0))).unwrap_or(DerivationStatus::New);
        if status != DerivationStatus::Failed {
            return Ok((status, None));
        }
        let failure = sqlx::query(
            "SELECT finished_at, error FROM attempts WHERE drv_path = ? AND status = 'failed' ORDER BY id DESC LIMIT 1",
        )
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
        sqlx::query(
            "INSERT INTO derivations (drv_path, status, updated_at) VALUES (?, 'new', ?) ON CONFLICT DO NOTHING",
        )
        .bind(drv)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        let taken = sqlx::query(
            "UPDATE derivations SET owner = ?1, lease_until = ?2, updated_at = ?3
             WHERE drv_path = ?4 AND (owner IS NULL OR owner = ?1 OR lease_until < ?3)",
        )
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
        let holder: Option<String> = sqlx::query("SELECT owner FROM derivations WHERE drv_path = ?")
            .bind(drv)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?
            .get(0);
        let Some(holder) = holder else { return Box::pin(self.try_claim(drv, owner)).await };
        if owner_is_gone(&holder) {
            let stolen = sqlx::query(
                "UPDATE derivations SET owner = ?, lease_until = ?, updated_at = ? WHERE drv_path = ? AND owner = ?",
            )
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(drv)
            .bind(&holder)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
            if stolen.rows_affected() == 1 {
                sqlx::query(
                    "UPDATE attempts SET status = 'interrupted', error = 'its run died', finished_at = ?
                     WHERE drv_path = ? AND owner = ? AND status = 'running'",
                )
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
        let r = sqlx::query(
            "UPDATE derivations SET lease_until = ?, updated_at = ? WHERE drv_path = ? AND owner = ?",
        )
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
        sqlx::query(
            "UPDATE derivations SET owner = NULL, lease_until = NULL, status = ?, updated_at = ?
             WHERE drv_path = ? AND owner = ?",
        )
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
        sqlx::query(
            "INSERT INTO derivations (drv_path, status, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (drv_path) DO UPDATE SET status = ?2, updated_at = ?3",
        )
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
        let row = sqlx::query(
            "INSERT INTO attempts (drv_path, owner, started_at, status) VALUES (?, ?, ?, 'running') RETURNING id",
        )
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
        sqlx::query(
            "UPDATE attempts SET status = ?, seconds = ?, error = ?, log = ?, finished_at = ? WHERE id = ?",
        )
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
        let row = sqlx::query("SELECT log FROM attempts WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// The most recently run revisions, newest first, with their variants and attempts.
    pub async fn report(&self, limit: u32) -> Result<Vec<RevisionReport>, StateError> {
        let e = |e| self.err(e);
        let revisions = sqlx::query(
            "SELECT id, flake, rev, requested, last_run FROM revisions ORDER BY last_run DESC, id DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        let mut out = Vec::new();
        for r in revisions {
            let id: i64 = r.get(0);
            let inputs = sqlx::query(
                "SELECT name, rev, source, nar_hash FROM lock_inputs WHERE revision_id = ? ORDER BY name",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(e)?
            .into_iter()
            .map(|i| LockedInput { name: i.get(0), rev: i.get(1), source: i.get(2), nar_hash: i.get(3) })
            .collect();
            let mut variants = Vec::new();
            for v in sqlx::query(
                "SELECT variant, system, attr, drv_path, out_paths, status, error, seconds FROM variants
                 WHERE revision_id = ? ORDER BY rowid",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(e)?
            {
                let drv_path: Option<String> = v.get(3);
                let attempts = match &drv_path {
                    None => Vec::new(),
                    Some(drv) => sqlx::query(
                        "SELECT id, owner, started_at, status, seconds, error, length(coalesce(log, ''))
                         FROM attempts WHERE drv_path = ? ORDER BY id",
                    )
                    .bind(drv)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(e)?
                    .into_iter()
                    .map(|a| AttemptReport {
                        id: a.get(0),
                        owner: a.get(1),
                        started_at: a.get(2),
                        status: a.get(3),
                        seconds: a.get(4),
                        error: a.get(5),
                        log_bytes: a.get(6),
                    })
                    .collect(),
                };
                variants.push(VariantReport {
                    variant: v.get(0),
                    system: v.get(1),
                    attr: v.get(2),
                    drv_path,
                    out_paths: serde_json::from_str(v.get::<&str, _>(4)).unwrap_or_default(),
                    status: v.get(5),
                    error: v.get(6),
                    seconds: v.get(7),
                    attempts,
                });
            }
            out.push(RevisionReport {
                flake: r.get(1),
                rev: r.get(2),
                requested: r.get(3),
                last_run: r.get(4),
                inputs,
                variants,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
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
        let report_attempts: Vec<String> = sqlx::query("SELECT status FROM attempts ORDER BY id")
            .fetch_all(&b.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(report_attempts, ["failed", "interrupted"]);
    }

    #[tokio::test]
    async fn revisions_and_variants_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).await.unwrap();
        let inputs = [LockedInput {
            name: "nixpkgs".into(),
            rev: Some("abc".into()),
            source: "github:NixOS/nixpkgs".into(),
            nar_hash: None,
        }];
        let id = s.record_revision("/srv/fleet", "c0ffee", "main", &inputs).await.unwrap();
        assert_eq!(s.record_revision("/srv/fleet", "c0ffee", "c0ffee", &inputs).await.unwrap(), id);
        let drv = "/nix/store/00000000000000000000000000000000-x.drv";
        s.record_variant(
            id,
            "cuda",
            "x86_64-linux",
            "a.b",
            Some(drv),
            &["/nix/store/o".into()],
            "built",
            None,
            Some(2.0),
        )
        .await
        .unwrap();
        s.try_claim(drv, "h:1:a").await.unwrap();
        let attempt = s.start_attempt(drv, "h:1:a").await.unwrap();
        s.finish_attempt(attempt, AttemptEnd::Built, 2.0, None, "ok").await.unwrap();
        let report = s.report(10).await.unwrap();
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].requested, "c0ffee");
        assert_eq!(report[0].inputs, inputs);
        let v = &report[0].variants[0];
        assert_eq!((v.variant.as_str(), v.status.as_str()), ("cuda", "built"));
        assert_eq!(v.out_paths, ["/nix/store/o"]);
        assert_eq!(v.attempts.len(), 1);
        assert_eq!((v.attempts[0].status.as_str(), v.attempts[0].log_bytes), ("built", 2));
    }
}
