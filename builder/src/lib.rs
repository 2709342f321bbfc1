//! fleetcache's builder library: what a build machine does with the real `nix` and the
//! cache-server — evaluate a variant ([`eval`]), build it ([`nix_build`]), put its closure
//! into the cache ([`push`]) — and the agent that does it for an orchestrator ([`agent`],
//! speaking [`api`]).

pub mod agent;
pub mod api;
pub mod client;
pub mod eval;
pub mod nix;
pub mod nix_build;
pub mod progress;
pub mod push;
pub mod verify;
