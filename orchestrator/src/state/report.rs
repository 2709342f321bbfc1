//! What `orchestrator status` shows: revisions, their variants and every build attempt.

use serde::{Deserialize, Serialize};
use sqlx::Row as _;

use super::{State, StateError};
use crate::flake::LockedInput;

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
    /// The fleet machines that install it, when the machines were asked.
    #[serde(default)]
    pub machines: Vec<String>,
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

impl State {
    /// The most recently run revisions, newest first, with their variants and attempts.
    pub async fn report(&self, limit: u32) -> Result<Vec<RevisionReport>, StateError> {
        let e = |e| self.err(e);
        let revisions = sqlx::query(&self.sql(
            "SELECT id, flake, rev, requested, last_run FROM revisions ORDER BY last_run DESC, id DESC LIMIT ?",
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(e)?;
        let mut out = Vec::new();
        for r in revisions {
            let id: i64 = r.get(0);
            let inputs = sqlx::query(&self.sql(
                "SELECT name, rev, source, nar_hash FROM lock_inputs WHERE revision_id = ? ORDER BY name",
            ))
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(e)?
            .into_iter()
            .map(|i| LockedInput { name: i.get(0), rev: i.get(1), source: i.get(2), nar_hash: i.get(3) })
            .collect();
            let mut variants = Vec::new();
            for v in sqlx::query(&self.sql(
                "SELECT variant, system, attr, drv_path, out_paths, status, error, seconds, machines FROM variants
                 WHERE revision_id = ? ORDER BY position, variant, system",
            ))
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(e)?
            {
                let drv_path: Option<String> = v.get(3);
                let attempts = match &drv_path {
                    None => Vec::new(),
                    Some(drv) => sqlx::query(&self.sql(
                        "SELECT id, owner, started_at, status, seconds, error, CAST(length(coalesce(log, '')) AS BIGINT)
                         FROM attempts WHERE drv_path = ? ORDER BY id",
                    ))
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
                    machines: serde_json::from_str(v.get::<&str, _>(8)).unwrap_or_default(),
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
