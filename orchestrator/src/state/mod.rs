//! The orchestrator's record, in SQLite (the default) or PostgreSQL (replicated orchestrators
//! sharing one queue): every revision and the inputs its lock pins, each variant's derivation,
//! outputs and result, every build attempt with its log, the builders and the job queue.
//!
//! Queries are written once, with SQLite's `?`/`?N` parameters; [`State::sql`] turns them into
//! PostgreSQL's `$N`. Every state change that two runs or replicas could race on is a single
//! conditional statement, so it happens once whatever the interleaving.
//!
//! It is also the lock between concurrent runs: a derivation is built by whoever holds its
//! claim, a lease renewed while the build runs. A run that dies loses the claim when the lease
//! runs out, or at once when its process is gone from this host.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::AnyPool;
use sqlx::Row as _;
use sqlx::any::AnyPoolOptions;
use thiserror::Error;

use crate::flake::LockedInput;

mod report;
mod schema;

pub use report::{AttemptReport, RevisionReport, VariantReport};
use schema::{MIGRATIONS, SCHEMA, current_version, postgres_ddl, to_postgres};

/// How long a claim lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(30);

/// A database failure.
#[derive(Debug, Error)]
pub enum StateError {
    /// The database refused or could not be reached.
    #[error("state database {place}: {source}")]
    Database {
        /// The file or (password-less) URL.
        place: String,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
    /// A newer fleetcache wrote it: this one does not know its tables.
    #[error(
        "state database {place} is at schema version {found}, newer than this orchestrator's {known}: \
         run the fleetcache that wrote it, or a newer one"
    )]
    Newer {
        /// The file or URL.
        place: String,
        /// The version it is at.
        found: i64,
        /// The newest this one knows.
        known: i64,
    },
}

/// The state database.
#[derive(Clone)]
pub struct State {
    pub(crate) pool: AnyPool,
    place: String,
    postgres: bool,
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

/// A database URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
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
        let err = |source| StateError::Database { place: path.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(|e| err(sqlx::Error::Io(e)))?;
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    use sqlx::Executor as _;
                    conn.execute(
                        "PRAGMA busy_timeout = 60000; PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;",
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .map_err(err)?;
        sqlx::raw_sql("PRAGMA journal_mode = WAL;").execute(&pool).await.map_err(err)?;
        let state = State { pool, place: path.display().to_string(), postgres: false };
        state.create_or_migrate().await?;
        Ok(state)
    }

    /// Connects to the database at `url`: `postgres://…` (shared by orchestrator replicas) or
    /// `sqlite://…`; creates the tables if needed.
    pub async fn connect(url: &str) -> Result<Self, StateError> {
        let place = redact(url);
        let err = |source| StateError::Database { place: place.clone(), source };
        sqlx::any::install_default_drivers();
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let pool = AnyPoolOptions::new().max_connections(8).connect(url).await.map_err(err)?;
        let state = State { pool, place, postgres };
        state.create_or_migrate().await?;
        Ok(state)
    }

    /// Creates the tables of a new database, or brings an older one to [`current_version`], in
    /// one transaction (on PostgreSQL under a lock, so replicas starting together do it once).
    async fn create_or_migrate(&self) -> Result<(), StateError> {
        let e = |source| self.err(source);
        let ddl = |sql: &str| if self.postgres { postgres_ddl(sql) } else { sql.to_owned() };
        let mut tx = self.pool.begin().await.map_err(e)?;
        if self.postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(7340821)").execute(&mut *tx).await.map_err(e)?;
        }
        sqlx::raw_sql(&ddl(SCHEMA)).execute(&mut *tx).await.map_err(e)?;
        let recorded: Option<i64> = sqlx::query("SELECT max(version) FROM schema_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(e)?
            .get(0);
        let found = recorded.unwrap_or(1);
        let known = current_version();
        if found > known {
            return Err(StateError::Newer { place: self.place.clone(), found, known });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
            tracing::info!(version, "upgrading the state database");
            sqlx::raw_sql(&ddl(sql)).execute(&mut *tx).await.map_err(e)?;
        }
        if recorded != Some(known) {
            sqlx::query("DELETE FROM schema_version").execute(&mut *tx).await.map_err(e)?;
            sqlx::query(&self.sql("INSERT INTO schema_version (version) VALUES (?)"))
                .bind(known)
                .execute(&mut *tx)
                .await
                .map_err(e)?;
        }
        tx.commit().await.map_err(e)
    }

    /// A query in this database's parameter style.
    pub(crate) fn sql(&self, sql: &str) -> String {
        if self.postgres { to_postgres(sql) } else { sql.to_owned() }
    }

    /// Whether this is PostgreSQL.
    pub(crate) fn is_postgres(&self) -> bool {
        self.postgres
    }

    pub(crate) fn err(&self, source: sqlx::Error) -> StateError {
        StateError::Database { place: self.place.clone(), source }
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
        let id: i64 = sqlx::query(&self.sql(
            "INSERT INTO revisions (flake, rev, requested, first_seen, last_run) VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (flake, rev) DO UPDATE SET last_run = ?4, requested = ?3 RETURNING id",
        ))
        .bind(flake)
        .bind(rev)
        .bind(requested)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| self.err(e))?
        .get(0);
        for i in inputs {
            sqlx::query(&self.sql(
                "INSERT INTO lock_inputs (revision_id, name, rev, source, nar_hash) VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT (revision_id, name) DO UPDATE SET
                   rev = excluded.rev, source = excluded.source, nar_hash = excluded.nar_hash",
            ))
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

    /// Records where a variant of a revision stands: `result`, with `status` as the word shown
    /// (the result's, or `queued` while a server's request runs).
    pub async fn record_variant(
        &self,
        revision_id: i64,
        result: &crate::outcome::VariantResult,
        status: &str,
    ) -> Result<(), StateError> {
        let json = |v: &[String]| serde_json::to_string(v).expect("strings serialise");
        sqlx::query(&self.sql(
            "INSERT INTO variants
             (revision_id, variant, system, attr, drv_path, out_paths, machines, status, error, seconds,
              updated_at, position)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11,
                     (SELECT count(*) FROM variants WHERE revision_id = ?1))
             ON CONFLICT (revision_id, variant, system) DO UPDATE SET
               attr = excluded.attr, drv_path = excluded.drv_path, out_paths = excluded.out_paths,
               machines = excluded.machines, status = excluded.status, error = excluded.error,
               seconds = excluded.seconds, updated_at = excluded.updated_at",
        ))
        .bind(revision_id)
        .bind(&result.variant)
        .bind(&result.system)
        .bind(&result.attr)
        .bind(&result.drv_path)
        .bind(json(&result.out_paths))
        .bind(json(&result.machines))
        .bind(status)
        .bind(&result.error)
        .bind(Some(result.seconds))
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

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
        let result = crate::outcome::VariantResult {
            variant: "cuda".into(),
            system: "x86_64-linux".into(),
            attr: "a.b".into(),
            drv_path: Some(drv.into()),
            out_paths: vec!["/nix/store/o".into()],
            machines: vec!["carbon".into(), "forge1".into()],
            status: crate::outcome::Status::Built,
            seconds: 2.0,
            error: None,
            verification: None,
        };
        s.record_variant(id, &result, "built").await.unwrap();
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
        assert_eq!(v.machines, ["carbon", "forge1"]);
        assert_eq!(v.attempts.len(), 1);
        assert_eq!((v.attempts[0].status.as_str(), v.attempts[0].log_bytes), ("built", 2));
    }

    #[tokio::test]
    async fn a_database_of_the_first_schema_is_upgraded_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        // What fleetcache wrote before schema versions were recorded: version 1's tables, a
        // revision and a variant.
        let v1 = SCHEMA.replace("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);", "");
        assert_ne!(v1, SCHEMA);
        {
            sqlx::any::install_default_drivers();
            let path = dir.path().join("state.db");
            let pool = AnyPoolOptions::new()
                .connect(&format!("sqlite://{}?mode=rwc", path.display()))
                .await
                .unwrap();
            sqlx::raw_sql(&(v1 + "PRAGMA user_version = 1;")).execute(&pool).await.unwrap();
            sqlx::raw_sql(
                "INSERT INTO revisions (id, flake, rev, requested, first_seen, last_run) VALUES (1, '/f', 'c0', 'main', 1, 1);
                 INSERT INTO variants (revision_id, variant, system, attr, out_paths, status, updated_at)
                 VALUES (1, 'default', 'x86_64-linux', 'a.b', '[\"/nix/store/o\"]', 'built', 1);",
            )
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        let s = State::open(dir.path()).await.unwrap();
        let report = s.report(10).await.unwrap();
        assert_eq!(report[0].variants[0].variant, "default");
        assert_eq!(report[0].variants[0].machines, Vec::<String>::new());
        let version: i64 =
            sqlx::query("SELECT version FROM schema_version").fetch_one(&s.pool).await.unwrap().get(0);
        assert_eq!(version, current_version());
        // The new column takes values; opening again changes nothing.
        let result = crate::outcome::VariantResult {
            machines: vec!["boron".into()],
            ..crate::outcome::VariantResult {
                variant: "cpu".into(),
                system: "x86_64-linux".into(),
                attr: "x".into(),
                drv_path: None,
                out_paths: Vec::new(),
                machines: Vec::new(),
                status: crate::outcome::Status::Cached,
                seconds: 0.0,
                error: None,
                verification: None,
            }
        };
        s.record_variant(1, &result, "cached").await.unwrap();
        drop(s);
        let s = State::open(dir.path()).await.unwrap();
        assert_eq!(s.report(10).await.unwrap()[0].variants[1].machines, ["boron"]);

        // A database a newer fleetcache wrote is refused, not half-read.
        sqlx::query("UPDATE schema_version SET version = 99").execute(&s.pool).await.unwrap();
        drop(s);
        let err = State::open(dir.path()).await.err().expect("refused").to_string();
        assert!(err.contains("schema version 99") && err.contains("newer"), "{err}");
    }
}
