//! What a machine builds reaches the cache by itself: the real Nix runs `orchestrator hook` as
//! its post-build-hook, which only queues; `orchestrator push --from-queue` uploads. A build
//! succeeds while the cache is unreachable, and what it built is pushed on the pusher's next
//! start; a watching pusher pushes a new build within seconds; a batch the cache refuses (a
//! corrupted store path) is set aside with the reason instead of blocking the rest.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetcache_tests::bin;
use fleetcache_tests::cache_server::CacheServer;
use fleetcache_tests::nix::{self, TempStore};
use fleetcache_tests::process::ChildGuard;
use nix_formats::StorePath;

/// A post-build-hook script queueing into `queue`.
fn hook_script(dir: &Path, queue: &Path) -> std::path::PathBuf {
    let script = dir.join("post-build-hook");
    let text =
        format!("#!/bin/sh\nexec {} hook --queue {}\n", bin("orchestrator").display(), queue.display());
    std::fs::write(&script, text).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

/// `nix-build` of a fresh closure with the hook; returns the top path.
fn build_with_hook(nonce: &str, hook: &Path) -> StorePath {
    let out = nix::run(
        nix::command("nix-build")
            .arg(nix::fixtures_dir().join("closure.nix"))
            .args(["--no-out-link", "--argstr", "nonce", nonce, "--arg", "count", "2"])
            .args(["--option", "post-build-hook"])
            .arg(hook),
    );
    StorePath::from_absolute(out.trim()).unwrap()
}

fn queued(queue: &Path) -> Vec<String> {
    let mut texts = Vec::new();
    for entry in std::fs::read_dir(queue).into_iter().flatten() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "paths") {
            texts.push(std::fs::read_to_string(path).unwrap());
        }
    }
    texts
}

fn pusher(server_url: &str, token_file: &Path, queue: &Path, watch: bool) -> Command {
    let mut c = Command::new(bin("orchestrator"));
    c.env("NIX_CONFIG", nix::NIX_CONFIG)
        .args(["push", "--cache", server_url, "--token-file"])
        .arg(token_file)
        .arg("--from-queue")
        .arg(queue);
    if watch {
        c.arg("--watch");
    }
    c
}

#[test]
fn built_paths_are_queued_by_the_hook_and_pushed_even_after_a_failed_push() {
    let work = tempfile::tempdir().unwrap();
    let queue = work.path().join("queue");
    let hook = hook_script(work.path(), &queue);
    let token_file = work.path().join("token");

    // Built while no cache is reachable: the build succeeds, its paths wait in the queue.
    let top = build_with_hook(&format!("hook-{}", std::process::id()), &hook);
    let texts = queued(&queue);
    // Nix 2.8 gives the hook an empty $OUT_PATHS: the derivation is queued instead.
    let deriver = nix::path_info(&[&top], false)[0]["deriver"].as_str().unwrap().to_owned();
    assert!(texts.iter().any(|t| t.contains(&top.to_absolute()) || t.contains(&deriver)), "{texts:?}");
    std::fs::write(&token_file, "whatever\n").unwrap();
    let failed = pusher("http://127.0.0.1:1", &token_file, &queue, false).output().unwrap();
    assert!(!failed.status.success());
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("stay queued"),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    assert_eq!(queued(&queue), texts, "a failed push keeps the queue");

    // The pusher's next start, with the cache up, pushes it all and empties the queue.
    let (_cache_dir, server) = CacheServer::start_local();
    std::fs::write(&token_file, format!("{}\n", server.token)).unwrap();
    let pushed = pusher(&server.url, &token_file, &queue, false).output().unwrap();
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
    assert!(queued(&queue).is_empty());
    let store = TempStore::new();
    nix::run(&mut store.copy_from(&server.url, &server.public_key, &[&top]));
    assert!(nix::closure(&top).iter().all(|p| store.has(p)));

    // A watching pusher pushes a new build as it is made.
    let mut watch = pusher(&server.url, &token_file, &queue, true);
    watch.stdout(Stdio::null()).stderr(Stdio::null());
    let _watching = ChildGuard::spawn("orchestrator push --watch", &mut watch);
    let second = build_with_hook(&format!("hook-watch-{}", std::process::id()), &hook);
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = format!("{}/{}.narinfo", server.url, second.hash_part());
    let rt = tokio::runtime::Runtime::new().unwrap();
    while rt.block_on(async { reqwest::get(&url).await.unwrap().status() }) != reqwest::StatusCode::OK {
        assert!(Instant::now() < deadline, "the watching pusher did not push {second} within 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let store = TempStore::new();
    nix::run(&mut store.copy_from(&server.url, &server.public_key, &[&second]));
}

/// The queue files in `queue/refused` and the `.why` files beside them.
fn refused(queue: &Path) -> (Vec<String>, Vec<String>) {
    let (mut paths, mut whys) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(queue.join("refused")).into_iter().flatten() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        match path.extension().and_then(|e| e.to_str()) {
            Some("paths") => paths.push(text),
            Some("why") => whys.push(text),
            _ => panic!("{} in refused/", path.display()),
        }
    }
    (paths, whys)
}

#[test]
fn a_batch_the_cache_refuses_is_set_aside_and_the_rest_is_pushed() {
    let work = tempfile::tempdir().unwrap();
    let queue = work.path().join("queue");
    let hook = hook_script(work.path(), &queue);
    let (_cache_dir, server) = CacheServer::start_local();
    let token_file = work.path().join("token");
    std::fs::write(&token_file, format!("{}\n", server.token)).unwrap();

    // A build whose leaf is corrupted in the store after it was queued (bit rot, a stray
    // write): same size, other bytes, while Nix's database keeps the hash it was built with.
    let bad = build_with_hook(&format!("hook-bad-{}", std::process::id()), &hook);
    let run = std::fs::read_link(Path::new(&bad.to_absolute()).join("bin/run")).unwrap();
    let leaf = StorePath::from_absolute(run.ancestors().nth(2).unwrap().to_str().unwrap()).unwrap();
    let data = Path::new(&leaf.to_absolute()).join("lib/data");
    let size = std::fs::metadata(&data).unwrap().len() as usize;
    std::fs::write(&data, "y".repeat(size)).unwrap();
    let bad_files = queued(&queue).len();
    // And a sound build queued after it.
    let good = build_with_hook(&format!("hook-good-{}", std::process::id()), &hook);

    let out = pusher(&server.url, &token_file, &queue, false).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a refusal fails the run: {stderr}");
    assert!(stderr.contains("moved to") && stderr.contains("2 batches the cache refused in"), "{stderr}");
    assert!(queued(&queue).is_empty(), "nothing stays in the queue to be retried for ever: {stderr}");

    // The leaf's file and the top's (which needs the leaf) are set aside with the cache's reason;
    // the other leaf of that build and the whole sound build are in the cache.
    let (paths, whys) = refused(&queue);
    assert_eq!(paths.len(), 2, "the leaf's batch and the top's: {paths:?} of {bad_files} files");
    assert_eq!(whys.len(), paths.len());
    for why in &whys {
        assert!(why.contains(&format!("{leaf}: ")) && why.contains("NarHash mismatch"), "{why}");
    }
    assert!(whys.iter().any(|w| w.contains(&format!("{bad}: not uploaded: it needs {leaf}"))), "{whys:?}");
    // `orchestrator queue` shows it, without a cache.
    let shown = Command::new(bin("orchestrator")).arg("queue").arg("--queue").arg(&queue).output().unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    assert!(
        text.contains("0 batches waiting (0 paths)") && text.contains("2 batches refused by the cache"),
        "{text}"
    );
    assert!(text.contains(&format!("    {leaf}: the cache answered 400")), "{text}");
    let store = TempStore::new();
    nix::run(&mut store.copy_from(&server.url, &server.public_key, &[&good]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = |p: &StorePath| {
        let url = format!("{}/{}.narinfo", server.url, p.hash_part());
        rt.block_on(async { reqwest::get(&url).await.unwrap().status() })
    };
    assert_eq!(status(&leaf), reqwest::StatusCode::NOT_FOUND);
    let others: Vec<StorePath> = nix::closure(&bad).into_iter().filter(|p| *p != leaf && *p != bad).collect();
    assert!(!others.is_empty());
    for p in &others {
        assert_eq!(status(p), reqwest::StatusCode::OK, "{p} is pushed");
    }

    // Repaired and moved back, the batches are queued again and pushed.
    std::fs::write(&data, "x".repeat(size)).unwrap();
    for entry in std::fs::read_dir(queue.join("refused")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "paths") {
            std::fs::rename(&path, queue.join(path.file_name().unwrap())).unwrap();
        }
    }
    let out = pusher(&server.url, &token_file, &queue, false).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(queued(&queue).is_empty());
    assert_eq!(refused(&queue).0.len(), 0);
    nix::run(&mut store.copy_from(&server.url, &server.public_key, &[&bad]));
}
