//! The fleetcache orchestrator: resolves fleet revisions, evaluates variants, builds what the
//! cache lacks and publishes it.
//!
//! `orchestrator build --rev` runs everything in one process (the embedded default): state in
//! SQLite ([`state`]), builds with the local `nix` (`builder::nix_build`), results through the
//! cache-server's own code over a local directory or S3 ([`cache`]).

pub mod build;
pub mod cache;
pub mod config;
pub mod context;
pub mod flake;
pub mod forge_status;
pub mod gc;
pub mod keys;
pub mod outcome;
pub mod plan;
pub mod push_queue;
pub mod remote;
pub mod report;
pub mod serve;
pub mod state;
pub mod use_cache;
pub mod webhooks;
