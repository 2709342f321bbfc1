//! The fleetcache orchestrator: resolves fleet revisions, evaluates variants, schedules builds.
//!
//! So far it holds the key management the cache and the embedded default need.

pub mod keys;
