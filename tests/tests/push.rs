//! `orchestrator push` against the real cache-server and the real Nix.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;

use fleetcache_tests::cache_server::{CacheServer, Options, push_command, push_json};
use fleetcache_tests::garage::Garage;
use fleetcache_tests::nix::{self, TempStore};
use fleetcache_tests::process::ChildGuard;
use nix_formats::NarInfo;
use serde_json::Value;

/// A counter from the server's `/metrics` (these tests are not async: a small runtime here).
fn metric(server: &CacheServer, name: &str) -> u64 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = format!("{}/metrics", server.url);
    let text = rt.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() });
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap().parse().unwrap()
}

/// Pushes a closure of many paths and one NAR over 256 MiB, substitutes all of it into a fresh
/// store, then pushes again and sends nothing.
fn push_substitute_and_repush(server: &CacheServer) {
    let top = nix::build_closure("push-big", 30, 257);
    let closure = nix::closure(&top);
    assert!(closure.len() >= 32);

    let first = push_json(server, &[&top]);
    assert_eq!(first["uploaded"], closure.len(), "{first}");
    assert_eq!(first["already_present"], 0, "{first}");
    // Half of the big file is random bytes: at least that much went over the wire.
    assert!(first["bytes"].as_u64().unwrap() > 128 << 20, "{first}");
    assert!(first["seconds"].as_f64().is_some());

    let store = TempStore::new();
    nix::run(&mut store.copy_from(&server.url, &server.public_key, &[&top]));
    assert!(closure.iter().all(|p| store.has(p)));

    let ingested = metric(server, "fleetcache_bytes_ingested_total");
    let second = push_json(server, &[&top]);
    assert_eq!(
        (second["uploaded"].as_u64(), second["already_present"].as_u64()),
        (Some(0), Some(closure.len() as u64))
    );
    assert_eq!(second["bytes"], 0);
    assert_eq!(metric(server, "fleetcache_bytes_ingested_total"), ingested, "the second push wrote nothing");
}

/// Every narinfo of a cache directory, parsed.
fn narinfos(dir: &std::path::Path) -> Vec<NarInfo> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "narinfo")
                .then(|| NarInfo::parse(&std::fs::read_to_string(p).unwrap()).unwrap())
        })
        .collect()
}

/// The zstd frames of a compressed file, counted from their headers.
fn zstd_frames(data: &[u8]) -> usize {
    let mut rest = data;
    let mut frames = 0;
    while !rest.is_empty() {
        let size = zstd::zstd_safe::find_frame_compressed_size(rest).expect("a whole zstd frame");
        rest = &rest[size..];
        frames += 1;
    }
    frames
}

#[test]
fn push_to_a_local_directory() {
    let (dir, server) = CacheServer::start_local();
    push_substitute_and_repush(&server);
    // The big NAR was compressed on several threads, a frame per 4 MiB segment, and Nix read
    // those frames as one stream above.
    let big = narinfos(dir.path()).into_iter().max_by_key(|n| n.nar_size).unwrap();
    let frames = zstd_frames(&std::fs::read(dir.path().join(&big.url)).unwrap());
    assert_eq!(frames as u64, big.nar_size.div_ceil(builder::compress::SEGMENT as u64), "{}", big.store_path);
    assert!(frames > 60, "257 MiB in 4 MiB segments");
}

#[test]
fn push_to_garage() {
    let g = Garage::start();
    let server = CacheServer::start_with(
        &g.store_url(),
        Options { env: g.credential_env().to_vec(), ..Default::default() },
    );
    push_substitute_and_repush(&server);
}

#[test]
fn a_killed_push_leaves_only_complete_paths_and_the_rerun_finishes() {
    let (dir, server) = CacheServer::start_local();
    let top = nix::build_closure("push-killed", 12, 64);
    let closure = nix::closure(&top);

    let mut cmd = push_command(&server, &server.token, &["--jobs", "1"], &[&top]);
    cmd.stderr(Stdio::piped()).stdout(Stdio::null());
    let mut child = ChildGuard::spawn("orchestrator push", &mut cmd);
    let stderr = child.take_stderr();
    let mut uploaded = 0;
    for line in BufReader::new(stderr).lines() {
        if line.unwrap().contains("uploaded ") {
            uploaded += 1;
            if uploaded == 3 {
                break;
            }
        }
    }
    child.kill();
    assert_eq!(uploaded, 3, "the push got going before it was killed");

    // Every narinfo that exists points at a complete NAR whose references are all there.
    let narinfos = narinfos(dir.path());
    assert!(narinfos.len() >= 3 && narinfos.len() < closure.len(), "{} of {}", narinfos.len(), closure.len());
    for n in &narinfos {
        assert_eq!(std::fs::metadata(dir.path().join(&n.url)).unwrap().len(), n.file_size.unwrap());
        // Checked by decompressing to the NarHash; no second hash of the compressed bytes.
        assert_eq!(n.file_hash, None, "{}", n.store_path);
        for r in &n.references {
            assert!(dir.path().join(format!("{}.narinfo", r.hash_part())).exists(), "{r} missing");
        }
    }

    let rerun = push_json(&server, &[&top]);
    assert_eq!(rerun["already_present"].as_u64().unwrap(), narinfos.len() as u64, "{rerun}");
    assert_eq!(rerun["uploaded"].as_u64().unwrap(), (closure.len() - narinfos.len()) as u64, "{rerun}");
    let store = TempStore::new();
    nix::run(&mut store.copy_from(&server.url, &server.public_key, &[&top]));
    assert!(store.has(&top));
}

#[test]
fn a_wrong_token_fails_the_push_at_once_with_the_reason() {
    let (dir, server) = CacheServer::start_local();
    let top = nix::build_closure("push-refused", 2, 0);
    // The first question (what is missing?) is an uploader's already: refused before any
    // upload starts, and not retried.
    let out = push_command(&server, "not-an-upload-token", &[], &[&top]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("invalid upload token"), "{err}");
    assert!(!err.contains("retrying"), "{err}");
    let published = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "narinfo"));
    assert_eq!(published.count(), 0);
}

#[test]
fn s3_down_while_pushing_is_retried_until_it_is_back() {
    let mut g = Garage::start();
    let server = CacheServer::start_with(
        &g.store_url(),
        Options { env: g.credential_env().to_vec(), ..Default::default() },
    );
    let top = nix::build_closure("push-s3-down", 3, 0);
    g.stop();

    let mut cmd = push_command(&server, &server.token, &["--json"], &[&top]);
    cmd.stderr(Stdio::piped()).stdout(Stdio::piped());
    let mut child = ChildGuard::spawn("orchestrator push", &mut cmd);
    let mut stderr = BufReader::new(child.take_stderr());
    let mut line = String::new();
    while !line.contains("retrying") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "push ended without retrying");
    }
    assert!(line.contains("503"), "{line}");
    g.restart();
    let out = child.wait_with_output();
    assert!(out.status.success(), "push did not recover: {}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["uploaded"], 4, "{summary}");
}
