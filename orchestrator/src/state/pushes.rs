//! The `pushes` table: every forge push delivery, recorded once per delivery id, then decided
//! after the debounce — [`Decision::Queued`] (a build request was made), unchanged,
//! superseded by a newer push of the branch, or failed.

use serde::{Deserialize, Serialize};
use sqlx::Row as _;

use super::{State, StateError};

/// What became of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Waiting for the debounce.
    Pending,
    /// A replica is fetching and comparing `flake.lock`.
    Deciding,
    /// `flake.lock` changed: a build request was made.
    Queued,
    /// `flake.lock` is the same.
    Unchanged,
    /// A newer push of the same ref came first.
    Superseded,
    /// The comparison failed, with why.
    Failed(String),
}

impl Decision {
    /// The words in the database and the API.
    pub fn to_text(&self) -> String {
        match self {
            Decision::Pending => "pending".to_owned(),
            Decision::Deciding => "deciding".to_owned(),
            Decision::Queued => "queued".to_owned(),
            Decision::Unchanged => "unchanged".to_owned(),
            Decision::Superseded => "superseded".to_owned(),
            Decision::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// A push delivery to record.
pub struct NewPush<'a> {
    /// `github`, `gitea`, `gitlab`.
    pub forge: &'a str,
    /// The forge's delivery id.
    pub delivery: &'a str,
    /// The ref pushed.
    pub ref_name: &'a str,
    /// Head before.
    pub before: &'a str,
    /// Head after.
    pub after: &'a str,
    /// Unix milliseconds of its arrival.
    pub received_ms: i64,
}

/// A push waiting for its decision.
#[derive(Debug, Clone)]
pub struct PendingPush {
    /// Its row.
    pub id: i64,
    /// The ref pushed.
    pub ref_name: String,
    /// Head before.
    pub before: String,
    /// Head after.
    pub after: String,
    /// Unix milliseconds of its arrival.
    pub received_ms: i64,
}

/// A recorded push, for `GET /api/v1/pushes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushRecord {
    /// `github`, `gitea`, `gitlab`.
    pub forge: String,
    /// The forge's delivery id.
    pub delivery: String,
    /// The ref pushed.
    pub ref_name: String,
    /// Head before.
    pub before: String,
    /// Head after.
    pub after: String,
    /// `pending`, `queued` (a build request was made), `unchanged` (flake.lock is the same),
    /// `superseded` (a newer push came first) or `failed: …`.
    pub decision: String,
    /// The build request, when queued.
    pub request_id: Option<i64>,
}

impl State {
    /// Records a push once per delivery; false for a redelivery.
    pub async fn record_push(&self, push: &NewPush<'_>) -> Result<bool, StateError> {
        let r = sqlx::query(&self.sql(
            "INSERT INTO pushes (forge, delivery, ref_name, before_rev, after_rev, received_ms, decision)
             VALUES (?, ?, ?, ?, ?, ?, 'pending') ON CONFLICT (forge, delivery) DO NOTHING",
        ))
        .bind(push.forge)
        .bind(push.delivery)
        .bind(push.ref_name)
        .bind(push.before)
        .bind(push.after)
        .bind(push.received_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(r.rows_affected() == 1)
    }

    /// The newest pushes.
    pub async fn pushes(&self) -> Result<Vec<PushRecord>, StateError> {
        let rows = sqlx::query(&self.sql(
            "SELECT forge, delivery, ref_name, before_rev, after_rev, decision, request_id
             FROM pushes ORDER BY id DESC LIMIT 100",
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|r| PushRecord {
                forge: r.get(0),
                delivery: r.get(1),
                ref_name: r.get(2),
                before: r.get(3),
                after: r.get(4),
                decision: r.get(5),
                request_id: r.get(6),
            })
            .collect())
    }

    /// The pushes waiting for their decision, oldest first.
    pub async fn pending_pushes(&self) -> Result<Vec<PendingPush>, StateError> {
        let rows = sqlx::query(&self.sql(
            "SELECT id, ref_name, before_rev, after_rev, received_ms FROM pushes WHERE decision = 'pending' ORDER BY id",
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|r| PendingPush {
                id: r.get(0),
                ref_name: r.get(1),
                before: r.get(2),
                after: r.get(3),
                received_ms: r.get(4),
            })
            .collect())
    }

    /// Takes a pending push to decide it; false if another replica took it first.
    pub async fn take_push(&self, id: i64) -> Result<bool, StateError> {
        let mine = sqlx::query(
            &self.sql("UPDATE pushes SET decision = 'deciding' WHERE id = ? AND decision = 'pending'"),
        )
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(mine.rows_affected() == 1)
    }

    /// Records what became of a push, and the build request it made.
    pub async fn decide_push(
        &self,
        id: i64,
        decision: &Decision,
        request: Option<i64>,
    ) -> Result<(), StateError> {
        sqlx::query(&self.sql("UPDATE pushes SET decision = ?, request_id = ? WHERE id = ?"))
            .bind(decision.to_text())
            .bind(request)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The commit a build request was queued for by a push, if it was.
    pub async fn pushed_commit(&self, request: i64) -> Result<Option<String>, StateError> {
        let row = sqlx::query(&self.sql("SELECT after_rev FROM pushes WHERE request_id = ?"))
            .bind(request)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.map(|r| r.get(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_push_is_recorded_once_and_decided_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).await.unwrap();
        let push = NewPush {
            forge: "github",
            delivery: "d1",
            ref_name: "refs/heads/main",
            before: "a",
            after: "b",
            received_ms: 5,
        };
        assert!(s.record_push(&push).await.unwrap());
        assert!(!s.record_push(&push).await.unwrap(), "a redelivery is not a second push");
        let pending = s.pending_pushes().await.unwrap();
        assert_eq!((pending.len(), pending[0].after.as_str(), pending[0].received_ms), (1, "b", 5));
        assert!(s.take_push(pending[0].id).await.unwrap());
        assert!(!s.take_push(pending[0].id).await.unwrap());
        s.decide_push(pending[0].id, &Decision::Failed("no such commit".into()), None).await.unwrap();
        assert_eq!(s.pushes().await.unwrap()[0].decision, "failed: no such commit");
        s.decide_push(pending[0].id, &Decision::Queued, Some(7)).await.unwrap();
        assert_eq!(s.pushed_commit(7).await.unwrap().as_deref(), Some("b"));
        assert_eq!(s.pushed_commit(8).await.unwrap(), None);
    }
}
