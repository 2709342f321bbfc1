//! The `pins` table, and which revisions a garbage collection keeps: the newest few, those
//! built lately, and the pinned ones.

use serde::Serialize;
use sqlx::Row as _;

use super::{State, StateError, now};

/// Why a collection keeps a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeptFor {
    /// One of the newest `keep-revisions`.
    Newest,
    /// Built within `keep-days`.
    Recent,
    /// Pinned with `orchestrator pin`.
    Pinned,
}

/// A revision a collection keeps.
#[derive(Debug, Clone, Serialize)]
pub struct KeptRevision {
    /// The commit.
    pub rev: String,
    /// What was asked for when it was built (a branch, a tag, the commit).
    pub requested: String,
    /// Every reason it is kept.
    pub kept_for: Vec<KeptFor>,
    /// Output paths of its variants.
    pub paths: usize,
}

/// What a collection keeps: the revisions and the store paths they built.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Roots {
    /// The kept revisions, newest first.
    pub revisions: Vec<KeptRevision>,
    /// Revisions the state knows that are not kept.
    pub dropped: usize,
    /// Their variants' output paths, each once.
    pub paths: Vec<String>,
}

/// Why a revision cannot be pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// No recorded revision matches.
    #[error("no revision {0:?} was built here (orchestrator status lists them)")]
    Unknown(String),
    /// A prefix matches several.
    #[error("{given:?} matches several revisions: {}", .matches.join(", "))]
    Ambiguous {
        /// What was given.
        given: String,
        /// The commits it matches.
        matches: Vec<String>,
    },
    /// The database failed.
    #[error(transparent)]
    State(#[from] StateError),
}

impl State {
    /// The commit `rev` names: a commit, a prefix of one (7 hex digits or more), or the branch
    /// or tag last built as it.
    async fn resolve_revision(&self, rev: &str) -> Result<String, PinError> {
        let prefix =
            (rev.len() >= 7 && rev.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("{rev}%"));
        let rows = sqlx::query(&self.sql(
            "SELECT rev, requested FROM revisions WHERE rev = ?1 OR rev LIKE ?2 OR requested = ?1
             ORDER BY last_run DESC",
        ))
        .bind(rev)
        .bind(prefix.unwrap_or_default())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        let found: Vec<(String, bool)> =
            rows.iter().map(|r| (r.get(0), r.get::<String, _>(1) == rev)).collect();
        // A branch or tag: what it was last built at.
        if let Some((commit, _)) = found.iter().find(|(c, by_name)| *by_name || c == rev) {
            return Ok(commit.clone());
        }
        match found.as_slice() {
            [] => Err(PinError::Unknown(rev.to_owned())),
            [(commit, _)] => Ok(commit.clone()),
            many => Err(PinError::Ambiguous {
                given: rev.to_owned(),
                matches: many.iter().map(|(c, _)| c.clone()).collect(),
            }),
        }
    }

    /// Pins a revision; returns the commit pinned.
    pub async fn pin(&self, rev: &str) -> Result<String, PinError> {
        let commit = self.resolve_revision(rev).await?;
        sqlx::query(
            &self.sql("INSERT INTO pins (rev, pinned_at) VALUES (?, ?) ON CONFLICT (rev) DO NOTHING"),
        )
        .bind(&commit)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(commit)
    }

    /// Unpins a revision; returns the commit, and whether it was pinned.
    pub async fn unpin(&self, rev: &str) -> Result<(String, bool), PinError> {
        let commit = self.resolve_revision(rev).await?;
        let done = sqlx::query(&self.sql("DELETE FROM pins WHERE rev = ?"))
            .bind(&commit)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok((commit, done.rows_affected() > 0))
    }

    /// What a collection keeps: the `keep_revisions` revisions first built most recently,
    /// every revision built within `keep_days`, and the pinned ones.
    pub async fn gc_roots(&self, keep_revisions: usize, keep_days: u64) -> Result<Roots, StateError> {
        let since = now() - (keep_days as i64).saturating_mul(86_400);
        let rows = sqlx::query(&self.sql(
            "SELECT r.id, r.rev, r.requested, r.last_run, p.rev FROM revisions r
             LEFT JOIN pins p ON p.rev = r.rev ORDER BY r.first_seen DESC, r.id DESC",
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        let mut kept = Vec::new();
        let mut roots = Roots::default();
        for (i, row) in rows.iter().enumerate() {
            let (last_run, pinned): (i64, bool) = (row.get(3), row.get::<Option<String>, _>(4).is_some());
            let kept_for: Vec<KeptFor> = [
                (i < keep_revisions, KeptFor::Newest),
                (keep_days > 0 && last_run >= since, KeptFor::Recent),
                (pinned, KeptFor::Pinned),
            ]
            .into_iter()
            .filter_map(|(yes, why)| yes.then_some(why))
            .collect();
            if kept_for.is_empty() {
                roots.dropped += 1;
                continue;
            }
            kept.push(row.get::<i64, _>(0));
            roots.revisions.push(KeptRevision { rev: row.get(1), requested: row.get(2), kept_for, paths: 0 });
        }
        let mut seen = std::collections::HashSet::new();
        for (id, revision) in kept.iter().zip(roots.revisions.iter_mut()) {
            let outputs = sqlx::query(&self.sql("SELECT out_paths FROM variants WHERE revision_id = ?"))
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.err(e))?;
            for row in outputs {
                let paths: Vec<String> = super::strings(&row.get::<String, _>(0));
                revision.paths += paths.len();
                roots.paths.extend(paths.into_iter().filter(|p| seen.insert(p.clone())));
            }
        }
        Ok(roots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Status, VariantResult};

    async fn built(s: &State, rev: &str, requested: &str, out: &str) {
        let id = s.record_revision("/srv/fleet", rev, requested, &[]).await.unwrap();
        let result = VariantResult {
            variant: "cpu".into(),
            system: "x86_64-linux".into(),
            attr: "a".into(),
            drv_path: None,
            out_paths: vec![out.into()],
            machines: vec![],
            status: Status::Built,
            seconds: 1.0,
            error: None,
            verification: None,
        };
        s.record_variant(id, &result, "built").await.unwrap();
    }

    #[tokio::test]
    async fn the_newest_the_recent_and_the_pinned_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).await.unwrap();
        for (i, rev) in ["aaaaaaaa11", "bbbbbbbb22", "cccccccc33", "dddddddd44"].iter().enumerate() {
            built(&s, rev, if i == 3 { "main" } else { rev }, &format!("/nix/store/{i}")).await;
            // first_seen orders them: one second apart.
            sqlx::query("UPDATE revisions SET first_seen = ?, last_run = ? WHERE rev = ?")
                .bind(1000 + i as i64)
                .bind(1000 + i as i64)
                .bind(*rev)
                .execute(&s.pool)
                .await
                .unwrap();
        }
        assert_eq!(s.pin("aaaaaaa").await.unwrap(), "aaaaaaaa11");
        assert!(matches!(s.pin("eeeeeeee").await, Err(PinError::Unknown(_))));
        // "main" was last built as dddddddd44.
        assert_eq!(s.pin("main").await.unwrap(), "dddddddd44");
        assert_eq!(s.unpin("main").await.unwrap(), ("dddddddd44".to_owned(), true));
        assert_eq!(s.unpin("main").await.unwrap(), ("dddddddd44".to_owned(), false));
        let roots = s.gc_roots(2, 0).await.unwrap();
        let revs: Vec<(&str, &[KeptFor])> =
            roots.revisions.iter().map(|r| (r.rev.as_str(), r.kept_for.as_slice())).collect();
        assert_eq!(
            revs,
            [
                ("dddddddd44", &[KeptFor::Newest][..]),
                ("cccccccc33", &[KeptFor::Newest][..]),
                ("aaaaaaaa11", &[KeptFor::Pinned][..])
            ]
        );
        assert_eq!(roots.paths, ["/nix/store/3", "/nix/store/2", "/nix/store/0"]);
        assert_eq!(roots.dropped, 1);
        // Built within the last day: every revision whose last run is now.
        sqlx::query("UPDATE revisions SET last_run = ? WHERE rev = 'bbbbbbbb22'")
            .bind(now())
            .execute(&s.pool)
            .await
            .unwrap();
        let roots = s.gc_roots(1, 1).await.unwrap();
        let revs: Vec<&str> = roots.revisions.iter().map(|r| r.rev.as_str()).collect();
        assert_eq!(revs, ["dddddddd44", "bbbbbbbb22", "aaaaaaaa11"]);
    }
}
