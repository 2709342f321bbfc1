//! The in-memory narinfo index: once loaded, a miss costs no storage request; an upload through
//! one replica is served by another replica on the same store within the refresh bound, and by
//! the replica it went through at once. On a directory and on Garage.

use std::time::{Duration, Instant};

use fleetcache_tests::cache_server::{self, CacheServer, Options};
use fleetcache_tests::garage::Garage;
use fleetcache_tests::nix;
use reqwest::StatusCode;

async fn metrics(server: &CacheServer) -> String {
    reqwest::get(format!("{}/metrics", server.url)).await.unwrap().text().await.unwrap()
}

fn gets(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("fleetcache_storage_operation_seconds_count{op=\"get\"} "))
        .map_or(0, |n| n.parse().unwrap())
}

async fn status(server: &CacheServer, hash: &str) -> StatusCode {
    reqwest::get(format!("{}/{hash}.narinfo", server.url)).await.unwrap().status()
}

/// Waits until `server`'s index has been listed.
async fn loaded(server: &CacheServer) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !metrics(server).await.contains("fleetcache_index_paths ") {
        assert!(Instant::now() < deadline, "the index was not loaded within 30 s:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn replicas_see_each_others_uploads(store: &str, env: Vec<(&'static str, String)>) {
    let config = Some("index-refresh-seconds = 1\n".to_owned());
    let a = CacheServer::start_with(
        store,
        Options { config: config.clone(), env: env.clone(), ..Options::default() },
    );
    let b = CacheServer::start_with(store, Options { config, env, ..Options::default() });
    loaded(&a).await;
    loaded(&b).await;

    // A miss asks no storage.
    let before = gets(&metrics(&a).await);
    for i in 0..20 {
        assert_eq!(status(&a, &format!("{i:032}")).await, StatusCode::NOT_FOUND);
    }
    assert_eq!(gets(&metrics(&a).await), before, "misses were answered from the index");

    // Uploaded through A: served by A at once, by B within the refresh bound (1 s here).
    let top = nix::build_closure(&format!("index-{}-{}", std::process::id(), store.len()), 1, 0);
    for info in cache_server::closure_in_upload_order(&top) {
        let (code, text) = cache_server::upload(&a, cache_server::body_for(&info)).await;
        assert_eq!(code, StatusCode::OK, "{text}");
    }
    assert_eq!(status(&a, top.hash_part()).await, StatusCode::OK);
    let uploaded = Instant::now();
    while status(&b, top.hash_part()).await != StatusCode::OK {
        assert!(uploaded.elapsed() < Duration::from_secs(10), "replica B did not see the upload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen_after = uploaded.elapsed();
    // One refresh period, plus a listing and a little scheduling.
    assert!(seen_after < Duration::from_secs(5), "seen after {seen_after:?}");
}

#[tokio::test]
async fn replicas_on_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    replicas_see_each_others_uploads(&format!("file://{}", dir.path().display()), Vec::new()).await;
}

#[tokio::test]
async fn replicas_on_garage() {
    let g = Garage::start();
    replicas_see_each_others_uploads(&g.store_url(), g.credential_env().to_vec()).await;
}

#[tokio::test]
async fn without_an_index_a_miss_asks_storage() {
    let (_dir, server) = CacheServer::start_local_with(Options {
        config: Some("index-refresh-seconds = 0\n".to_owned()),
        ..Options::default()
    });
    let before = gets(&metrics(&server).await);
    assert_eq!(status(&server, &format!("{:032}", 7)).await, StatusCode::NOT_FOUND);
    assert_eq!(gets(&metrics(&server).await), before + 1);
    assert!(!metrics(&server).await.contains("fleetcache_index_paths"));
}
