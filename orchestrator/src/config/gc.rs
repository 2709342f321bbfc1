//! The `[gc]` table: which revisions' outputs a garbage collection of the cache keeps, and
//! whether `orchestrator serve` collects on a schedule.

use serde::{Deserialize, Serialize};

/// Garbage collection of the cache by fleet revision.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GcConfig {
    /// The newest revisions kept (by when they were first built). Default 5.
    #[serde(default = "default_keep_revisions")]
    pub keep_revisions: usize,
    /// Revisions built within this many days are kept too (0: none for being recent).
    /// Default 14.
    #[serde(default = "default_keep_days")]
    pub keep_days: u64,
    /// `orchestrator serve` collects every this many hours. Default 0: never (run
    /// `orchestrator gc` yourself).
    #[serde(default)]
    pub every_hours: u64,
    /// What the cache wrote less than this many seconds ago stays whatever it is (uploads in
    /// flight). Default 3600.
    #[serde(default = "default_grace_seconds")]
    pub grace_seconds: u64,
}

fn default_keep_revisions() -> usize {
    5
}
fn default_keep_days() -> u64 {
    14
}
fn default_grace_seconds() -> u64 {
    3600
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            keep_revisions: default_keep_revisions(),
            keep_days: default_keep_days(),
            every_hours: 0,
            grace_seconds: default_grace_seconds(),
        }
    }
}

impl GcConfig {
    /// What is wrong with these settings.
    pub fn check(&self) -> Result<(), String> {
        if self.keep_revisions == 0 && self.keep_days == 0 {
            return Err(
                "gc.keep-revisions and gc.keep-days are both 0: a collection would keep only pinned revisions; \
                 keep at least one revision"
                    .to_owned(),
            );
        }
        Ok(())
    }
}
