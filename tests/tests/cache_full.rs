//! A cache whose storage fills up: the push stops at the first "full" answer (507) instead of
//! retrying, says so, and nothing half-stored is published; once there is space the same push
//! finishes. On a directory that is a small tmpfs (the suite runs as root, as Nix does here),
//! and on Garage with a bucket quota.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fleetcache_tests::cache_server::{CacheServer, Options, push_command};
use fleetcache_tests::garage::Garage;
use fleetcache_tests::nix::{self, TempStore};
use nix_formats::{NarInfo, StorePath};
use serde_json::Value;

/// A tmpfs of a given size, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("fleetcache-full-").tempdir().expect("tempdir");
        let t = Tmpfs { dir };
        t.mount_with(&format!("size={size}"));
        t
    }

    fn mount_with(&self, options: &str) {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "fleetcache-full"])
            .arg(self.path())
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount -o {options}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Gives it more room, keeping what it holds.
    fn grow(&self, size: &str) {
        self.mount_with(&format!("remount,size={size}"));
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// A push with `--json` of `paths` with `args`: its output, stdout parsed.
fn push(server: &CacheServer, args: &[&str], paths: &[&StorePath]) -> (Output, Value) {
    let mut all = vec!["--json"];
    all.extend(args);
    let out = push_command(server, &server.token, &all, paths).output().expect("run orchestrator push");
    let summary = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, summary)
}

fn failed_reasons(summary: &Value) -> Vec<(String, String)> {
    summary["failed"]
        .as_array()
        .expect("a failed list")
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_owned(), f["reason"].as_str().unwrap().to_owned()))
        .collect()
}

/// The paths of `closure` the server publishes, each one's NAR checked to be there too, and
/// those NARs' keys (`nar/….nar.zst`).
fn published(server: &CacheServer, closure: &[StorePath]) -> (Vec<StorePath>, Vec<String>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let (mut paths, mut nars) = (Vec::new(), Vec::new());
        for p in closure {
            let r = http.get(format!("{}/{}.narinfo", server.url, p.hash_part())).send().await.unwrap();
            if r.status() == reqwest::StatusCode::NOT_FOUND {
                continue;
            }
            assert!(r.status().is_success(), "{p}: {}", r.status());
            let info = NarInfo::parse(&r.text().await.unwrap()).unwrap();
            let nar = http.head(format!("{}/{}", server.url, info.url)).send().await.unwrap();
            assert!(
                nar.status().is_success(),
                "{p} is published but its NAR {} answers {}",
                info.url,
                nar.status()
            );
            paths.push(p.clone());
            nars.push(info.url);
        }
        (paths, nars)
    })
}

/// What of `stored` (a store's NARs, and for a directory what its upload area holds) no
/// published narinfo names.
fn left_behind(stored: &[String], published_nars: &[String]) -> Vec<String> {
    stored.iter().filter(|k| !published_nars.contains(k)).cloned().collect()
}

/// Fills the cache with `top`'s closure (one path of 12 MiB, eleven small) while `fill` keeps
/// it too small for the large one, then `free` makes room and the push finishes.
fn fill_then_free(
    server: &CacheServer,
    top: &StorePath,
    fill: impl Fn(),
    free: impl Fn(),
    stored: impl Fn() -> Vec<String>,
) {
    let closure = nix::closure(top);
    assert_eq!(closure.len(), 12);
    let big = closure.iter().find(|p| p.name() == "big").expect("the large path").clone();
    fill();

    // One upload at a time, largest first: the large one is refused as "full", and nothing
    // else starts (without a retry: a full cache does not empty itself in seconds).
    let (out, summary) = push(server, &["--jobs", "1"], &[top]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a push into a full cache succeeded: {stderr}");
    assert!(!stderr.contains("retrying"), "a full cache is not retried:\n{stderr}");
    assert!(stderr.contains("the cache is full"), "{stderr}");
    assert_eq!(summary["uploaded"], 0, "{summary}");
    let reasons = failed_reasons(&summary);
    assert_eq!(reasons.len(), 12, "{reasons:?}");
    let big_reason = &reasons.iter().find(|(p, _)| *p == big.to_absolute()).expect("the large path failed").1;
    assert!(big_reason.contains("507") && big_reason.contains("storage is full"), "{big_reason}");
    let not_started = reasons.iter().filter(|(_, r)| r == "not uploaded: the cache is full").count();
    assert_eq!(not_started, 10, "every small leaf was left unstarted: {reasons:?}");
    assert!(summary["failed"].as_array().unwrap().iter().all(|f| f["permanent"] == false), "{summary}");
    // The CLI names a few and counts the rest.
    assert!(stderr.contains("error: 7 more paths: not uploaded: the cache is full"), "{stderr}");
    let (now, nars) = published(server, &closure);
    assert!(now.is_empty(), "{now:?}");
    assert_eq!(left_behind(&stored(), &nars), Vec::<String>::new(), "a refused upload left bytes behind");

    // The small ones fit, and are published whole. (Pushed on their own: beside the large
    // one, which fills a directory while it is written, one could be refused too.)
    let small: Vec<&StorePath> = closure.iter().filter(|p| **p != big && *p != top).collect();
    let (out, summary) = push(server, &[], &small);
    assert!(out.status.success(), "{}\nserver:\n{}", String::from_utf8_lossy(&out.stderr), server.log());
    assert_eq!(summary["uploaded"], 10, "{summary}");
    let (out, summary) = push(server, &[], &[top]);
    assert!(!out.status.success(), "the large one fits: {summary}");
    assert_eq!(summary["uploaded"], 0, "{summary}");
    let (now, nars) = published(server, &closure);
    assert_eq!(now.len(), 10);
    assert!(!now.contains(&big) && !now.contains(top));
    assert_eq!(left_behind(&stored(), &nars), Vec::<String>::new(), "a refused upload left bytes behind");

    // Room again: the same push finishes, and a fresh store gets the whole closure.
    free();
    let (out, summary) = push(server, &[], &[top]);
    assert!(out.status.success(), "{}\nserver:\n{}", String::from_utf8_lossy(&out.stderr), server.log());
    assert_eq!((summary["uploaded"].as_u64(), summary["already_present"].as_u64()), (Some(2), Some(10)));
    let store = TempStore::new();
    nix::run(&mut store.copy_from(&server.url, &server.public_key, &[top]));
    assert!(closure.iter().all(|p| store.has(p)));
}

#[test]
fn a_full_directory_stops_the_push_and_publishes_nothing_half_stored() {
    let disk = Tmpfs::mount("2m");
    let cache: PathBuf = disk.path().join("cache");
    let server = CacheServer::start(&format!("file://{}", cache.display()));
    let top = nix::build_closure("cache-full-dir", 10, 12);
    // The NARs, and whatever an upload left in the upload area.
    let stored = || {
        let names = |dir: &str| -> Vec<String> {
            let entries =
                std::fs::read_dir(cache.join(dir)).map(|d| d.map(|e| e.unwrap().file_name()).collect());
            let names: Vec<_> = entries.unwrap_or_default();
            names.into_iter().map(|n| format!("{dir}/{}", n.to_string_lossy())).collect()
        };
        [names("nar"), names(".fleetcache-tmp")].concat()
    };
    fill_then_free(&server, &top, || {}, || disk.grow("64m"), stored);
    assert!(server.log().contains("No space left on device"), "the server's log names the cause");
}

#[test]
fn a_garage_bucket_over_its_quota_stops_the_push_and_publishes_nothing_half_stored() {
    let g = Garage::start();
    let server = CacheServer::start_with(
        &g.store_url(),
        Options { env: g.credential_env().to_vec(), ..Default::default() },
    );
    let top = nix::build_closure("cache-full-s3", 10, 12);
    // The NARs in the bucket. (A multipart upload whose completion the quota refuses is
    // dropped by Garage itself: it lists none afterwards, aborted or not.)
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = g.client();
    let stored = || {
        let listed = rt.block_on(client.list_objects_v2().bucket(&g.bucket).prefix("nar/").send()).unwrap();
        listed.contents().iter().map(|o| o.key().unwrap().to_owned()).collect()
    };
    fill_then_free(&server, &top, || g.set_max_size(Some(2 << 20)), || g.set_max_size(None), stored);
    assert!(server.log().contains("quota"), "the server's log names the cause");
}
