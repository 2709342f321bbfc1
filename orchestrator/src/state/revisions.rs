//! The `revisions`, `lock_inputs` and `variants` tables: every fleet revision built, the inputs
//! its lock pins, and where each of its variants stands.

use sqlx::Row as _;

use super::{State, StateError, now};
use crate::flake::LockedInput;

impl State {
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
    /// The derivation of `variant` in the newest build of `rev` (a commit, a prefix of one, or
    /// the branch or tag that was asked for), built here or planned by a server.
    pub async fn variant_drv(&self, rev: &str, variant: &str) -> Result<Option<String>, StateError> {
        // A commit prefix: hex, long enough not to be a branch name by accident.
        let prefix =
            (rev.len() >= 7 && rev.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("{rev}%"));
        let row = sqlx::query(&self.sql(
            "SELECT v.drv_path FROM variants v JOIN revisions r ON r.id = v.revision_id
             WHERE v.variant = ?1 AND (r.requested = ?2 OR r.rev LIKE ?3)
             ORDER BY r.last_run DESC, v.position LIMIT 1",
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
    use super::super::AttemptEnd;
    use super::*;

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
}
