//! Upstream caches: a second cache-server with its own key plays cache.nixos.org. A push to the
//! fleet cache uploads only what the upstream lacks, the fleet cache accepts references to the
//! upstream's signed paths, a fresh store with both substituters gets the whole closure, and
//! nothing is taken on trust (an unknown reference is refused, an upstream that is down stops
//! the upload that needs it and only that).

use fleetcache_tests::cache_server::{self, CacheServer, Options, push_json as push};
use fleetcache_tests::garage::Garage;
use fleetcache_tests::nix::{self, TempStore};
use nix_formats::StorePath;
use reqwest::StatusCode;

fn fleet_config(upstream: &CacheServer) -> String {
    format!("[[upstream]]\nurl = \"{}\"\npublic-keys = [\"{}\"]\n", upstream.url, upstream.public_key)
}

async fn narinfo_status(server: &CacheServer, path: &StorePath) -> StatusCode {
    reqwest::get(format!("{}/{}.narinfo", server.url, path.hash_part())).await.unwrap().status()
}

async fn upstream_requests(server: &CacheServer) -> u64 {
    let text = reqwest::get(format!("{}/metrics", server.url)).await.unwrap().text().await.unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix("fleetcache_upstream_requests_total "));
    line.expect("the metric is there when upstreams are configured").parse().unwrap()
}

/// The references of `top` other than itself.
fn leaves(top: &StorePath) -> Vec<StorePath> {
    let info = &nix::path_info(&[top], false)[0];
    let refs = info["references"].as_array().unwrap().iter();
    let mut leaves: Vec<StorePath> =
        refs.map(|r| StorePath::from_absolute(r.as_str().unwrap()).unwrap()).filter(|r| r != top).collect();
    leaves.sort();
    leaves
}

/// Uploads `top` alone by the native protocol (its references are not pushed).
async fn upload_top_alone(server: &CacheServer, top: &StorePath) -> (StatusCode, String) {
    let closure = cache_server::closure_in_upload_order(top);
    let info = closure.iter().find(|i| i["path"] == top.to_absolute()).unwrap();
    cache_server::upload(server, cache_server::body_for(info)).await
}

fn skips_what_upstream_has(fleet_store: &str, env: Vec<(&'static str, String)>) {
    let nonce = format!("upstream-{}-{}", std::process::id(), fleet_store.len());
    let top = nix::build_closure(&nonce, 4, 0);
    let closure = nix::closure(&top);
    let leaves = leaves(&top);
    assert!(leaves.len() >= 4, "{leaves:?}");
    let (in_upstream, own) = leaves.split_at(2);

    let (_upstream_dir, mut upstream) =
        CacheServer::start_local_with(Options { key_name: Some("upstream-test-1"), ..Options::default() });
    let pushed = push(&upstream, &in_upstream.iter().collect::<Vec<_>>());
    assert_eq!(pushed["uploaded"], 2, "{pushed}");
    let fleet = CacheServer::start_with(
        fleet_store,
        Options { config: Some(fleet_config(&upstream)), env, ..Options::default() },
    );

    // Only what the upstream lacks goes to the fleet cache.
    let summary = push(&fleet, &[&top]);
    assert_eq!(summary["uploaded"].as_u64(), Some((closure.len() - 2) as u64), "{summary}");
    assert_eq!(summary["from_upstream"], 2, "{summary}");
    assert!(summary["upstream_nar_bytes"].as_u64().unwrap() > 0, "{summary}");
    assert!(summary["failed"].as_array().unwrap().is_empty(), "{summary}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for p in in_upstream {
            assert_eq!(narinfo_status(&fleet, p).await, StatusCode::NOT_FOUND, "{p} was not uploaded");
        }
        for p in own.iter().chain([&top]) {
            assert_eq!(narinfo_status(&fleet, p).await, StatusCode::OK, "{p} was uploaded");
        }
    });
    // A second push sends nothing, and the upstream is not asked again.
    let asked = rt.block_on(upstream_requests(&fleet));
    assert!(asked >= 2, "{asked}");
    let again = push(&fleet, &[&top]);
    assert_eq!((again["uploaded"].as_u64(), again["from_upstream"].as_u64()), (Some(0), Some(2)), "{again}");
    assert_eq!(rt.block_on(upstream_requests(&fleet)), asked, "what an upstream has is remembered");

    // A fresh machine with both caches as substituters gets the whole closure, each path
    // signed by the cache it came from.
    let store = TempStore::new();
    nix::run(
        nix::command("nix-store")
            .args(["--store", &store.url(), "--realise", &top.to_absolute()])
            .args(["--option", "substituters", &format!("{} {}", fleet.url, upstream.url)])
            .args([
                "--option",
                "trusted-public-keys",
                &format!("{} {}", fleet.public_key, upstream.public_key),
            ])
            .args(["--option", "require-sigs", "true"]),
    );
    for p in &closure {
        assert!(store.has(p), "{p} substituted");
    }
    // With only the fleet cache, the upstream's paths are what is missing.
    let alone = TempStore::new();
    let err = nix::run_expecting_failure(&mut alone.copy_from(&fleet.url, &fleet.public_key, &[&top]));
    assert!(err.contains(in_upstream[0].hash_part()) || err.contains(in_upstream[1].hash_part()), "{err}");

    // A reference that neither cache has is still refused.
    let other = nix::build_closure(&format!("{nonce}-unknown"), 2, 0);
    let (status, text) = rt.block_on(upload_top_alone(&fleet, &other));
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    assert!(text.contains("not in this cache or an upstream"), "{text}");

    // With the upstream down, an upload that needs it waits (503, naming it); a push of a
    // closure it might hold uploads all of it here instead.
    let down_url = upstream.url.clone();
    assert!(upstream.stop());
    let third = nix::build_closure(&format!("{nonce}-down"), 2, 0);
    let (status, text) = rt.block_on(upload_top_alone(&fleet, &third));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains(&down_url), "{text}");
    let summary = push(&fleet, &[&third]);
    assert_eq!(summary["uploaded"].as_u64(), Some(nix::closure(&third).len() as u64), "{summary}");
    assert_eq!(summary["from_upstream"], 0, "{summary}");
}

#[test]
fn a_directory_cache_skips_what_upstream_has() {
    let dir = tempfile::tempdir().unwrap();
    skips_what_upstream_has(&format!("file://{}", dir.path().display()), Vec::new());
}

#[test]
fn a_garage_cache_skips_what_upstream_has() {
    let g = Garage::start();
    skips_what_upstream_has(&g.store_url(), g.credential_env().to_vec());
}

#[test]
fn an_upstream_narinfo_signed_by_another_key_does_not_count() {
    let (_u, upstream) = CacheServer::start_local();
    let top = nix::build_closure(&format!("upstream-key-{}", std::process::id()), 2, 0);
    let leaves = leaves(&top);
    push(&upstream, &leaves.iter().collect::<Vec<_>>());
    // The fleet cache trusts a key the upstream does not sign with.
    let wrong = nix_formats::SecretKey::generate("cache.example.org-1").unwrap().public_key().to_string();
    let config = format!("[[upstream]]\nurl = \"{}\"\npublic-keys = [\"{wrong}\"]\n", upstream.url);
    let (_f, fleet) = CacheServer::start_local_with(Options { config: Some(config), ..Options::default() });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, text) = rt.block_on(upload_top_alone(&fleet, &top));
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    let summary = push(&fleet, &[&top]);
    assert_eq!(summary["from_upstream"], 0, "{summary}");
    assert_eq!(summary["uploaded"].as_u64(), Some(leaves.len() as u64 + 1), "{summary}");
}
