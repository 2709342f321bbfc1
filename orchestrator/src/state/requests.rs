//! The `requests` table: builds submitted to `orchestrator serve` (by the CLI or a webhook),
//! each [`RequestStatus::Pending`] until a replica takes it to plan, then running until every
//! variant ended. The plan itself is the server's record, kept here as text.

use sqlx::Row as _;

use super::{State, StateError, json, now, strings};

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    /// Submitted, not planned yet.
    Pending,
    /// A replica is resolving and evaluating it.
    Planning,
    /// Planned: its jobs are queued or running.
    Running,
    /// Every variant ended.
    Done,
    /// It could not be planned.
    Error,
}

impl RequestStatus {
    /// The word in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Pending => "pending",
            RequestStatus::Planning => "planning",
            RequestStatus::Running => "running",
            RequestStatus::Done => "done",
            RequestStatus::Error => "error",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "planning" => RequestStatus::Planning,
            "running" => RequestStatus::Running,
            "done" => RequestStatus::Done,
            "error" => RequestStatus::Error,
            _ => RequestStatus::Pending,
        }
    }
}

/// A request as recorded.
#[derive(Debug, Clone)]
pub struct Request {
    /// Its id.
    pub id: i64,
    /// Where it stands.
    pub status: RequestStatus,
    /// The commit, tag or branch asked for.
    pub requested: String,
    /// The variants asked for; empty for all.
    pub variants: Vec<String>,
    /// Whether known failures are rebuilt.
    pub retry_failed: bool,
    /// The server's plan, once planned.
    pub plan: Option<String>,
    /// Why it could not be planned.
    pub error: Option<String>,
    /// Unix seconds of its submission.
    pub created_at: i64,
}

const COLUMNS: &str = "id, status, requested, variants, retry_failed, plan, error, created_at";

fn request(r: &sqlx::any::AnyRow) -> Request {
    Request {
        id: r.get(0),
        status: RequestStatus::parse(r.get(1)),
        requested: r.get(2),
        variants: strings(r.get(3)),
        retry_failed: r.get::<i64, _>(4) != 0,
        plan: r.get(5),
        error: r.get(6),
        created_at: r.get(7),
    }
}

impl State {
    /// Records a build request for `rev`; a server plans it on its next round. Returns its id.
    pub async fn submit_request(
        &self,
        rev: &str,
        variants: &[String],
        retry_failed: bool,
    ) -> Result<i64, StateError> {
        let now = now();
        Ok(sqlx::query(&self.sql(
            "INSERT INTO requests (requested, variants, retry_failed, status, created_at, updated_at)
             VALUES (?, ?, ?, 'pending', ?, ?) RETURNING id",
        ))
        .bind(rev)
        .bind(json(&variants))
        .bind(retry_failed as i64)
        .bind(now)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(e))?
        .get(0))
    }

    /// Sets a request's status, its plan (kept if `None`) and its error.
    pub async fn set_request(
        &self,
        id: i64,
        status: RequestStatus,
        plan: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), StateError> {
        sqlx::query(&self.sql(
            "UPDATE requests SET status = ?, plan = coalesce(?, plan), error = ?, updated_at = ? WHERE id = ?",
        ))
        .bind(status.as_str())
        .bind(plan)
        .bind(error)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Puts back to pending the requests a replica began to plan more than `seconds` ago and
    /// never finished (it died while planning).
    pub async fn requeue_abandoned_plans(&self, seconds: i64) -> Result<(), StateError> {
        sqlx::query(
            &self.sql("UPDATE requests SET status = 'pending' WHERE status = 'planning' AND updated_at < ?"),
        )
        .bind(now() - seconds)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The requests still to move along (pending or running), oldest first.
    pub async fn open_requests(&self) -> Result<Vec<Request>, StateError> {
        let rows = sqlx::query(&self.sql(&format!(
            "SELECT {COLUMNS} FROM requests WHERE status IN ('pending', 'running') ORDER BY id"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(request).collect())
    }

    /// Takes a pending request to plan it; false if another replica took it first.
    pub async fn take_request(&self, id: i64) -> Result<bool, StateError> {
        let mine = sqlx::query(&self.sql(
            "UPDATE requests SET status = 'planning', updated_at = ? WHERE id = ? AND status = 'pending'",
        ))
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(mine.rows_affected() == 1)
    }

    /// One request.
    pub async fn request(&self, id: i64) -> Result<Option<Request>, StateError> {
        let row = sqlx::query(&self.sql(&format!("SELECT {COLUMNS} FROM requests WHERE id = ?")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.as_ref().map(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_replica_takes_a_request_and_an_abandoned_plan_returns() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).await.unwrap();
        let id = s.submit_request("main", &["cuda".to_owned()], true).await.unwrap();
        let r = s.request(id).await.unwrap().unwrap();
        assert_eq!(
            (r.status, r.requested.as_str(), r.variants, r.retry_failed),
            (RequestStatus::Pending, "main", vec!["cuda".to_owned()], true)
        );
        assert!(s.take_request(id).await.unwrap());
        assert!(!s.take_request(id).await.unwrap(), "taken once");
        assert!(s.open_requests().await.unwrap().is_empty(), "a request being planned is nobody else's");
        s.requeue_abandoned_plans(-1).await.unwrap();
        assert_eq!(s.open_requests().await.unwrap()[0].status, RequestStatus::Pending);
        s.set_request(id, RequestStatus::Running, Some("{}"), None).await.unwrap();
        s.set_request(id, RequestStatus::Done, None, None).await.unwrap();
        let r = s.request(id).await.unwrap().unwrap();
        assert_eq!((r.status, r.plan.as_deref()), (RequestStatus::Done, Some("{}")), "the plan is kept");
        assert!(s.request(id + 1).await.unwrap().is_none());
    }
}
