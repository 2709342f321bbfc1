//! What a machine builds reaches the cache by itself: the real Nix runs `orchestrator hook` as
//! its post-build-hook, which only queues; `orchestrator push --from-queue` uploads. A build
//! succeeds while the cache is unreachable, and what it built is pushed on the pusher's next
//! start; a watching pusher pushes a new build within seconds.

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
