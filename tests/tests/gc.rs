//! Garbage collection with the real Nix and the real binaries: the cache keeps what the roots
//! reach through narinfo references and deletes the rest, on a directory and on Garage; an
//! upload during a collection ends up whole; `orchestrator gc` keeps the newest, the pinned.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use fleetcache_tests::bin;
use fleetcache_tests::cache_server::{CacheServer, Options};
use fleetcache_tests::garage::Garage;
use fleetcache_tests::nix::{self, TempStore, run, run_expecting_failure};
use fleetcache_tests::orchestrator::{Setup, out_path};
use nix_formats::{NarInfo, StorePath};
use serde_json::{Value, json};

const ADMIN: &str = "adm-0123456789";

/// A cache-server on `store` that takes [`ADMIN`] as an admin token.
fn start(store: &str, env: Vec<(&'static str, String)>) -> (tempfile::TempDir, CacheServer) {
    let dir = tempfile::tempdir().unwrap();
    let admins = dir.path().join("admin-tokens");
    std::fs::write(&admins, format!("operator:{ADMIN}\n")).unwrap();
    let config = format!("admin-tokens-file = \"{}\"\n", admins.display());
    let server = CacheServer::start_with(store, Options { env, config: Some(config), ..Default::default() });
    (dir, server)
}

fn pushed(server: &CacheServer, paths: &[&StorePath]) {
    let out = push(&server.url, &server.token, server.dir(), paths);
    assert!(out.status.success(), "push: {}\n{}", String::from_utf8_lossy(&out.stderr), server.log());
}

async fn collect(server: &CacheServer, token: Option<&str>, body: &Value) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(format!("{}/api/v1/gc", server.url)).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap_or_default())
}

/// Every narinfo of `paths` answers 200 and its NAR too, or (`present` false) both are gone.
async fn assert_served(server: &CacheServer, paths: &[StorePath], present: bool) {
    for p in paths {
        let (code, text) = get(&format!("{}/{}.narinfo", server.url, p.hash_part())).await;
        if !present {
            assert_eq!(code, 404, "{p} is still served");
            continue;
        }
        assert_eq!(code, 200, "{p} is gone");
        let info = NarInfo::parse(&text).unwrap();
        let (nar, _) = get(&format!("{}/{}", server.url, info.url)).await;
        assert_eq!(nar, 200, "{p}: its narinfo points at a missing {}", info.url);
    }
}

fn deriver(path: &StorePath) -> String {
    let info = nix::path_info(&[path], false);
    let drv = info[0]["deriver"].as_str().expect("a built path has a deriver");
    drv.rsplit('/').next().unwrap().to_owned()
}

async fn put_log(server: &CacheServer, drv: &str) {
    let resp = reqwest::Client::new()
        .put(format!("{}/log/{drv}", server.url))
        .bearer_auth(&server.token)
        .body(format!("building {drv}\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

/// Two closures pushed, the collection rooted at one: a dry run changes nothing, the real run
/// deletes exactly the other closure with its NARs and log, a fresh store substitutes the kept
/// one and not the other.
async fn keeps_what_the_roots_reach(server: &CacheServer, objects: impl Fn() -> BTreeSet<String>) {
    let pid = std::process::id();
    let kept = nix::build_closure(&format!("gc-kept-{pid}"), 3, 0);
    let gone = nix::build_closure(&format!("gc-gone-{pid}"), 4, 1);
    let (kept_closure, gone_closure) = (nix::closure(&kept), nix::closure(&gone));
    pushed(server, &[&kept, &gone]);
    put_log(server, &deriver(&kept)).await;
    put_log(server, &deriver(&gone)).await;

    let before = objects();
    let roots = json!({ "roots": [kept.to_absolute()], "dry_run": true, "grace_seconds": 0 });
    let (code, dry) = collect(server, Some(ADMIN), &roots).await;
    assert_eq!(code, 200, "{dry}");
    assert_eq!(objects(), before, "a dry run deleted something");
    let n = gone_closure.len() as u64;
    assert_eq!(
        (&dry["deleted"]["narinfos"], &dry["deleted"]["nars"], &dry["deleted"]["logs"]),
        (&json!(n), &json!(n), &json!(1)),
        "{dry}"
    );
    assert_eq!(dry["reachable"], kept_closure.len(), "{dry}");

    let roots = json!({ "roots": [kept.to_absolute()], "grace_seconds": 0 });
    let (code, report) = collect(server, Some(ADMIN), &roots).await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["deleted"], dry["deleted"], "the run did what the dry run said");
    assert!(report["deleted"]["bytes"].as_u64().unwrap() > 512 << 10, "{report}");
    let after = objects();
    assert_eq!(
        (before.len() - after.len()) as u64,
        2 * n + 1,
        "exactly the other closure's narinfos, NARs and log went"
    );
    assert_served(server, &kept_closure, true).await;
    assert_served(server, &gone_closure, false).await;
    assert_eq!(get(&format!("{}/log/{}", server.url, deriver(&kept))).await.0, 200);
    assert_eq!(get(&format!("{}/log/{}", server.url, deriver(&gone))).await.0, 404);

    let machine = TempStore::new();
    run(&mut machine.copy_from(&server.url, &server.public_key, &[&kept]));
    assert!(kept_closure.iter().all(|p| machine.has(p)));
    run_expecting_failure(&mut machine.copy_from(&server.url, &server.public_key, &[&gone]));

    let metrics = get(&format!("{}/metrics", server.url)).await.1;
    let freed = format!("fleetcache_gc_freed_bytes {}", report["deleted"]["bytes"]);
    assert!(metrics.contains(&freed), "{metrics}");
    assert!(
        metrics.contains(&format!("fleetcache_store_objects{{kind=\"narinfo\"}} {}", kept_closure.len()))
    );

    // Nothing left to collect.
    let (_, again) = collect(server, Some(ADMIN), &roots).await;
    assert_eq!(again["deleted"]["narinfos"], 0, "{again}");
    assert_eq!(objects(), after);
}

/// The files of the cache layout under `dir`, by name (what a listing sees) and path.
fn layout_files(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for sub in ["", "nar", "log"] {
        for e in std::fs::read_dir(dir.join(sub)).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_file() {
                out.push((format!("{sub}/{}", e.file_name().to_string_lossy()), e.path()));
            }
        }
    }
    out
}

/// Names of the files of the cache layout under `dir`.
fn files(dir: &Path) -> BTreeSet<String> {
    layout_files(dir).into_iter().map(|(name, _)| name).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collection_keeps_what_the_roots_reach_in_a_directory() {
    let store = tempfile::tempdir().unwrap();
    let (_d, server) = start(&format!("file://{}", store.path().display()), Vec::new());
    keeps_what_the_roots_reach(&server, || files(store.path())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collection_keeps_what_the_roots_reach_on_garage() {
    let g = Garage::start();
    let (_d, server) = start(&g.store_url(), g.credential_env().to_vec());
    let client = g.client();
    let bucket = g.store_url().trim_start_matches("s3://").split('?').next().unwrap().to_owned();
    let objects = || {
        let (client, bucket) = (client.clone(), bucket.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut keys = BTreeSet::new();
                let mut pages = client.list_objects_v2().bucket(bucket).into_paginator().send();
                while let Some(page) = pages.next().await {
                    for o in page.unwrap().contents() {
                        keys.insert(o.key().unwrap().to_owned());
                    }
                }
                keys
            })
        })
        .join()
        .unwrap()
    };
    keeps_what_the_roots_reach(&server, objects).await;
}

/// A multipart upload a killed server left on Garage is dropped by a collection (not by its
/// dry run), and counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_collection_drops_the_uploads_a_killed_server_left() {
    let g = Garage::start();
    let (_d, server) = start(&g.store_url(), g.credential_env().to_vec());
    let top = nix::build_closure(&format!("gc-abandoned-{}", std::process::id()), 1, 0);
    pushed(&server, &[&top]);
    let client = g.client();
    let key = "nar/0r2p2nhw2q1anv2lgkzgax4qq2xchnibgn67cnark67s0jm1dm7m.nar.zst";
    let up = client.create_multipart_upload().bucket(&g.bucket).key(key).send().await.unwrap();
    let part = client.upload_part().bucket(&g.bucket).key(key).upload_id(up.upload_id().unwrap());
    part.part_number(1).body(vec![7u8; 5 << 20].into()).send().await.unwrap();
    let open =
        || async { client.list_multipart_uploads().bucket(&g.bucket).send().await.unwrap().uploads().len() };

    let dry = json!({ "roots": [top.to_absolute()], "dry_run": true, "grace_seconds": 0 });
    let (code, report) = collect(&server, Some(ADMIN), &dry).await;
    assert_eq!((code, &report["abandoned_uploads"]), (200, &json!(0)), "{report}");
    assert_eq!(open().await, 1, "a dry run dropped an upload");
    // Within the grace period it may still be in flight.
    let (code, report) = collect(&server, Some(ADMIN), &json!({ "roots": [top.to_absolute()] })).await;
    assert_eq!((code, &report["abandoned_uploads"]), (200, &json!(0)), "{report}");
    assert_eq!(open().await, 1, "an upload younger than the grace period was dropped");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let roots = json!({ "roots": [top.to_absolute()], "grace_seconds": 1 });
    let (code, report) = collect(&server, Some(ADMIN), &roots).await;
    assert_eq!((code, &report["abandoned_uploads"]), (200, &json!(1)), "{report}");
    assert_eq!(open().await, 0);
    assert_served(&server, &nix::closure(&top), true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collection_needs_an_admin_token_and_roots() {
    let (_store, plain) = CacheServer::start_local();
    let body = json!({ "roots": ["/nix/store/00000000000000000000000000000000-x"] });
    let (code, text) = collect(&plain, Some(ADMIN), &body).await;
    assert_eq!(code, 403, "no admin tokens configured: {text}");

    let store = tempfile::tempdir().unwrap();
    let (_d, server) = start(&format!("file://{}", store.path().display()), Vec::new());
    assert_eq!(collect(&server, None, &body).await.0, 401);
    assert_eq!(collect(&server, Some(&server.token), &body).await.0, 401, "an upload token is no admin's");
    let (code, text) = collect(&server, Some(ADMIN), &json!({ "roots": [] })).await;
    assert_eq!(code, 400);
    assert!(text.as_str().unwrap().contains("would delete everything"), "{text}");
    let (code, _) = collect(&server, Some(ADMIN), &json!({ "roots": ["../../etc/passwd"] })).await;
    assert_eq!(code, 400);
}

/// Sets every file of the cache layout under `dir` two hours into the past.
fn age(dir: &Path) {
    let past = SystemTime::now() - Duration::from_secs(7200);
    for (_, path) in layout_files(dir) {
        std::fs::File::options().write(true).open(path).unwrap().set_modified(past).unwrap();
    }
}

/// Builds a path that refers to `dep`.
fn build_referring_to(dep: &StorePath, nonce: &str) -> StorePath {
    let dir = tempfile::tempdir().unwrap();
    let expr = dir.path().join("c.nix");
    std::fs::write(
        &expr,
        format!(
            r#"derivation {{
  name = "gc-refers"; system = builtins.currentSystem; builder = "/bin/sh"; nonce = "{nonce}";
  args = [ "-c" "echo ${{builtins.storePath "{}"}} > $out" ];
}}"#,
            dep.to_absolute()
        ),
    )
    .unwrap();
    let out = run(nix::command("nix-build").arg(&expr).arg("--no-out-link"));
    StorePath::from_absolute(out.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_during_a_collection_is_published_whole() {
    let pid = std::process::id();
    let store = tempfile::tempdir().unwrap();
    let (_d, server) = start(&format!("file://{}", store.path().display()), Vec::new());
    let root = nix::build_closure(&format!("gc-root-{pid}"), 2, 0);
    let old = nix::build_closure(&format!("gc-old-{pid}"), 3, 0);
    pushed(&server, &[&root, &old]);
    // Thousands of old unreachable narinfos, so the collection takes a while to sweep.
    for i in 0..3000u32 {
        let hash = nix_formats::nixbase32::encode(&[&i.to_le_bytes()[..], &[7u8; 16]].concat());
        std::fs::write(store.path().join(format!("{hash}.narinfo")), "StorePath: junk\n").unwrap();
    }
    // Everything is older than the grace period: `old` may go, unless an upload needs it.
    age(store.path());
    let new = build_referring_to(&old, &format!("gc-new-{pid}"));

    let body = json!({ "roots": [root.to_absolute()] });
    let pushing = {
        let (new, token, url, dir) =
            (new.clone(), server.token.clone(), server.url.clone(), server.dir().to_owned());
        tokio::task::spawn_blocking(move || push(&url, &token, &dir, &[&new]))
    };
    let (collection, upload) = tokio::join!(collect(&server, Some(ADMIN), &body), pushing);
    let (code, report) = collection;
    assert_eq!(code, 200, "{report}");
    let upload = upload.unwrap();
    assert!(upload.status.success(), "the push failed: {}", String::from_utf8_lossy(&upload.stderr));
    assert!(report["deleted"]["narinfos"].as_u64().unwrap() >= 3000, "{report}");
    // Whatever the order, the new path is served with its whole closure.
    let whole = nix::closure(&new);
    assert_served(&server, &whole, true).await;
    let machine = TempStore::new();
    run(&mut machine.copy_from(&server.url, &server.public_key, &[&new]));
    assert!(whole.iter().all(|p| machine.has(p)));
}

/// `orchestrator push` of `paths` to the cache at `url` with an upload token (its file in `dir`).
fn push(url: &str, token: &str, dir: &Path, paths: &[&StorePath]) -> std::process::Output {
    let token_file = dir.join("push-token");
    std::fs::write(&token_file, token).unwrap();
    Command::new(bin("orchestrator"))
        .env("NIX_CONFIG", nix::NIX_CONFIG)
        .args(["push", "--cache", url, "--token-file"])
        .arg(token_file)
        .args(paths.iter().map(|p| p.to_absolute()))
        .output()
        .unwrap()
}

/// Five revisions built (a nixpkgs bump each), the first pinned, `orchestrator gc
/// --keep-revisions 2`: the newest two and the pinned one substitute, the others are gone, no
/// kept narinfo lacks its NAR, and the dry run changed nothing.
#[test]
fn orchestrator_gc_keeps_the_newest_revisions_and_the_pinned() {
    let s = Setup::new();
    s.write_config("[gc]\ngrace-seconds = 0\nkeep-days = 0\n");
    let config = s.home.join("fleetcache.toml");
    let config = config.to_str().unwrap();
    let mut outs = Vec::new();
    let mut revs = Vec::new();
    for i in 1..=5 {
        let rev = if i == 1 { s.fleet.head() } else { s.fleet.bump_nixpkgs(&i.to_string()) };
        let (code, results, stderr) = s.build(&["--rev", &rev, "--variant", "cpu", "--config", config]);
        assert_eq!(code, 0, "{stderr}");
        outs.push(out_path(&results["cpu"]));
        revs.push(rev);
    }
    let first = &revs[0][..10];
    run(&mut s.orchestrator(&["pin", first, "--config", config]));
    let cache = s.cache_dir();
    let before = files(&cache);

    let dry =
        run(&mut s.orchestrator(&["gc", "--keep-revisions", "2", "--dry-run", "--json", "--config", config]));
    let dry: Value = serde_json::from_str(&dry).unwrap();
    assert_eq!(files(&cache), before, "the dry run deleted something");
    let kept: Vec<&str> =
        dry["kept"]["revisions"].as_array().unwrap().iter().map(|r| r["rev"].as_str().unwrap()).collect();
    assert_eq!(kept, [revs[4].as_str(), &revs[3], &revs[0]], "{dry}");
    assert!(dry["report"]["deleted"]["narinfos"].as_u64().unwrap() >= 2, "{dry}");

    let out = run(&mut s.orchestrator(&["gc", "--keep-revisions", "2", "--json", "--config", config]));
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["report"]["deleted"], dry["report"]["deleted"], "{report}");

    let key = s.public_key();
    let url = format!("file://{}", cache.display());
    for (i, out) in outs.iter().enumerate() {
        let machine = TempStore::new();
        if [0, 3, 4].contains(&i) {
            run(&mut machine.copy_from(&url, &key, &[out]));
        } else {
            assert!(
                !cache.join(format!("{}.narinfo", out.hash_part())).exists(),
                "revision {} is kept",
                i + 1
            );
            run_expecting_failure(&mut machine.copy_from(&url, &key, &[out]));
        }
    }
    for name in files(&cache).iter().filter(|n| n.ends_with(".narinfo")) {
        let info =
            NarInfo::parse(&std::fs::read_to_string(cache.join(name.trim_start_matches('/'))).unwrap())
                .unwrap();
        assert!(cache.join(&info.url).exists(), "{name} points at a missing {}", info.url);
    }

    // Unpinned, the first revision goes at the next collection.
    run(&mut s.orchestrator(&["unpin", first, "--config", config]));
    run(&mut s.orchestrator(&["gc", "--keep-revisions", "2", "--config", config]));
    assert!(!cache.join(format!("{}.narinfo", outs[0].hash_part())).exists());
    assert!(cache.join(format!("{}.narinfo", outs[4].hash_part())).exists());
}
