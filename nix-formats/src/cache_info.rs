//! The `nix-cache-info` file at the root of a binary cache.

use std::fmt;

use thiserror::Error;

use crate::store_path::STORE_DIR;

/// Why a `nix-cache-info` could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CacheInfoError {
    /// A line is not `Key: value`, or a value is malformed; `line` counts from 1.
    #[error("nix-cache-info line {line}: {message}")]
    Line {
        /// Line number, from 1.
        line: usize,
        /// What is wrong.
        message: &'static str,
    },
    /// There is no `StoreDir:` line.
    #[error("nix-cache-info has no StoreDir")]
    MissingStoreDir,
}

/// What a binary cache says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    /// The store directory its paths belong to; clients refuse a cache for another one.
    pub store_dir: String,
    /// Whether clients may query many narinfos at once (`WantMassQuery: 1`).
    pub want_mass_query: bool,
    /// Substituter priority: lower is tried first (cache.nixos.org has 40).
    pub priority: Option<u32>,
}

impl CacheInfo {
    /// The priority fleetcache advertises by default: just after cache.nixos.org's 40. A
    /// machine then asks cache.nixos.org first for the thousands of paths of its system, which
    /// it has, and the fleet's cache for the few it lacks (the fleet's own builds), instead of
    /// sending the fleet's cache a miss for nearly every path.
    pub const FLEETCACHE_PRIORITY: u32 = 41;

    /// What fleetcache serves: `/nix/store`, mass queries welcome, [`Self::FLEETCACHE_PRIORITY`].
    pub fn fleetcache_default() -> Self {
        CacheInfo {
            store_dir: STORE_DIR.to_owned(),
            want_mass_query: true,
            priority: Some(Self::FLEETCACHE_PRIORITY),
        }
    }

    /// Parses the file; unknown keys are ignored, as Nix does.
    pub fn parse(text: &str) -> Result<Self, CacheInfoError> {
        let mut store_dir = None;
        let mut want_mass_query = false;
        let mut priority = None;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let err = |message| CacheInfoError::Line { line: i + 1, message };
            let (k, v) = line.split_once(':').ok_or(err("expected \"Key: value\""))?;
            let v = v.trim();
            match k {
                "StoreDir" => store_dir = Some(v.to_owned()),
                "WantMassQuery" => want_mass_query = v == "1",
                "Priority" => priority = Some(v.parse().map_err(|_| err("Priority is not a number"))?),
                _ => {}
            }
        }
        Ok(CacheInfo {
            store_dir: store_dir.ok_or(CacheInfoError::MissingStoreDir)?,
            want_mass_query,
            priority,
        })
    }
}

impl fmt::Display for CacheInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StoreDir: {}", self.store_dir)?;
        if self.want_mass_query {
            writeln!(f, "WantMassQuery: 1")?;
        }
        if let Some(p) = self.priority {
            writeln!(f, "Priority: {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_nix_written_file() {
        let d = CacheInfo::fleetcache_default();
        assert_eq!(d.to_string(), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n");
        assert_eq!(CacheInfo::parse(&d.to_string()).unwrap(), d);
        // `nix copy --to file://` writes only the store dir (parsed here without its newline too).
        let nix = CacheInfo::parse("StoreDir: /nix/store\n").unwrap();
        assert_eq!(nix, CacheInfo { store_dir: "/nix/store".into(), want_mass_query: false, priority: None });
    }

    #[test]
    fn errors() {
        assert_eq!(CacheInfo::parse("WantMassQuery: 1\n").unwrap_err(), CacheInfoError::MissingStoreDir);
        assert!(matches!(
            CacheInfo::parse("StoreDir: /nix/store\nPriority: high\n"),
            Err(CacheInfoError::Line { line: 2, .. })
        ));
        assert!(matches!(CacheInfo::parse("nonsense\n"), Err(CacheInfoError::Line { line: 1, .. })));
    }
}
