//! The `builders` table: every builder agent that registered, what it can build (Nix's rule on
//! systems and features), and when it was last heard from.

use builder::api::Register;
use serde::{Deserialize, Serialize};
use sqlx::Row as _;

use super::{State, StateError, json, now, strings};

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
    /// Builds it finished that were published.
    #[serde(default)]
    pub built: u64,
    /// Builds it finished that failed.
    #[serde(default)]
    pub failed: u64,
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
        built: r.get::<i64, _>(8) as u64,
        failed: r.get::<i64, _>(9) as u64,
    }
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
               (SELECT count(*) FROM jobs j WHERE j.builder = b.name AND j.status = 'claimed'),
               (SELECT count(*) FROM attempts a WHERE a.owner = b.name AND a.status = 'built'),
               (SELECT count(*) FROM attempts a WHERE a.owner = b.name AND a.status = 'failed')
             FROM builders b ORDER BY b.name",
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(builder_info).collect())
    }

    /// One builder, with the jobs it holds.
    pub(super) async fn builder(&self, name: &str) -> Result<Option<BuilderInfo>, StateError> {
        let row = sqlx::query(&self.sql(
            "SELECT b.name, b.systems, b.features, b.mandatory_features, b.max_jobs, b.version, b.last_seen,
               (SELECT count(*) FROM jobs j WHERE j.builder = b.name AND j.status = 'claimed'),
               (SELECT count(*) FROM attempts a WHERE a.owner = b.name AND a.status = 'built'),
               (SELECT count(*) FROM attempts a WHERE a.owner = b.name AND a.status = 'failed')
             FROM builders b WHERE b.name = ?",
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(row.map(|r| builder_info(&r)))
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
            built: 0,
            failed: 0,
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
}
