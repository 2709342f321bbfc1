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

mod builders;
mod derivations;
mod jobs;
mod leases;
mod pins;
mod pushes;
mod report;
mod requests;
mod revisions;
mod schema;

pub use builders::BuilderInfo;
pub use derivations::{AttemptEnd, Claim, DerivationStatus, Failure};
pub use jobs::{JobStatus, JobView, NewJob};
pub use leases::LeasedJob;
pub use pins::{KeptFor, KeptRevision, PinError, Roots};
pub use pushes::{Decision, NewPush, PendingPush, PushRecord};
pub use report::{AttemptReport, RevisionReport, VariantReport};
pub use requests::{Request, RequestStatus};
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

/// A JSON column's text.
fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("plain data serialises")
}

/// A JSON column of strings; empty if it does not parse.
fn strings(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
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
}

/// A state database in `dir` holding `fixtures/schema-2.sql`: what fleetcache wrote at schema
/// version 2, opened (and so migrated) by the current code.
#[cfg(test)]
pub(crate) async fn written_at_schema_2(dir: &Path) -> State {
    {
        let s = State::open(dir).await.expect("a new database");
        sqlx::query("DELETE FROM schema_version").execute(&s.pool).await.unwrap();
        sqlx::query("INSERT INTO schema_version (version) VALUES (2)").execute(&s.pool).await.unwrap();
        sqlx::raw_sql(include_str!("fixtures/schema-2.sql"))
            .execute(&s.pool)
            .await
            .expect("the fixture loads");
        s.pool.close().await;
    }
    State::open(dir).await.expect("a database of schema 2 opens")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_database_written_at_schema_2_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = written_at_schema_2(dir.path()).await;
        let report = s.report(10).await.unwrap();
        assert_eq!((report.len(), report[0].inputs[0].name.as_str()), (1, "nixpkgs"));
        let v = &report[0].variants[0];
        assert_eq!(
            (v.variant.as_str(), v.status.as_str(), v.machines.as_slice()),
            ("cuda", "built", &["carbon".to_owned()][..])
        );
        assert_eq!(v.attempts.len(), 1);
        let drv = "/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-llama-cpp.drv";
        assert_eq!(s.variant_drv("c0ffee0", "cuda").await.unwrap().as_deref(), Some(drv));
        assert_eq!(s.job_log(drv).await.unwrap(), Some(("building llama-cpp\n".to_owned(), false)));
        let jobs = s.jobs_for(&[drv.to_owned()], builder::api::JobKind::Build).await.unwrap();
        let job = &jobs[drv];
        assert_eq!((job.status, job.pushed_bytes), (JobStatus::Built, 123456));
        assert_eq!(job.verification.as_ref().map(|v| v.status), Some(builder::api::VerifyStatus::Verified));
        assert_eq!(s.builders().await.unwrap()[0].features, ["cuda", "big-parallel"]);
        assert_eq!(s.derivation(drv).await.unwrap().0, DerivationStatus::Built);
        let request = s.request(1).await.unwrap().unwrap();
        assert_eq!((request.status, request.plan.is_some()), (RequestStatus::Done, true));
        assert_eq!(s.pushes().await.unwrap()[0].decision, "queued");
        assert_eq!(
            s.pushed_commit(1).await.unwrap().as_deref(),
            Some("c0ffee0000000000000000000000000000000000")
        );
        let version: i64 =
            sqlx::query("SELECT version FROM schema_version").fetch_one(&s.pool).await.unwrap().get(0);
        assert_eq!(version, current_version());
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
