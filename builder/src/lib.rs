//! fleetcache's builder library: what a build machine does with the real `nix` and the
//! cache-server. So far: [`push`], the pipeline that puts a closure into the cache.

pub mod client;
pub mod nix;
pub mod progress;
pub mod push;
