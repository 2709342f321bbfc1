//! A token holder (a builder, or whoever stole its token) trying to make the cache-server sign
//! what Nix would read differently from what the server checked, or the orchestrator record
//! what never happened. The real Nix is the judge of what a published narinfo says.

use std::path::Path;
use std::time::{Duration, Instant};

use fleetcache_tests::cache_server::{CacheServer, body_at_level, body_for, closure_in_upload_order, upload};
use fleetcache_tests::nix::{self, TempStore};
use fleetcache_tests::orchestrator::Setup;
use fleetcache_tests::serve::{DEFAULT_AND_CUDA, configure, start_orchestrator};
use nix_formats::nar::dump_path;
use nix_formats::{Hash, NarInfo, StorePath};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn get(server: &CacheServer, path: &str) -> (StatusCode, Vec<u8>) {
    let resp = reqwest::get(format!("{}/{path}", server.url)).await.unwrap();
    (resp.status(), resp.bytes().await.unwrap().to_vec())
}

async fn narinfo_of(server: &CacheServer, path: &StorePath) -> Option<String> {
    let (status, body) = get(server, &format!("{}.narinfo", path.hash_part())).await;
    (status == StatusCode::OK).then(|| String::from_utf8(body).unwrap())
}

async fn put(server: &CacheServer, path: &str, body: Vec<u8>) -> (StatusCode, String) {
    let resp = reqwest::Client::new()
        .put(format!("{}/{path}", server.url))
        .bearer_auth(&server.token)
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status(), resp.text().await.unwrap())
}

/// Uploads the NAR of `info`'s path as `nix copy --to` does and returns the narinfo Nix would
/// send for it, for the test to change before PUTting it.
async fn nar_uploaded_the_nix_way(server: &CacheServer, info: &Value) -> String {
    let path = info["path"].as_str().unwrap();
    let nar = dump_path(Path::new(path), Vec::new()).unwrap();
    let file = zstd::encode_all(&nar[..], 3).unwrap();
    let file_hash = Hash::sha256_of(&file);
    let name = format!("{}.nar.zst", file_hash.to_nix32());
    let (s, body) = put(server, &format!("nar/{name}"), file.clone()).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let refs: Vec<String> = info["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().trim_start_matches("/nix/store/").to_owned())
        .collect();
    format!(
        "StorePath: {path}\nURL: nar/{name}\nCompression: zstd\nFileHash: {}\nFileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
        file_hash.to_nix32_prefixed(),
        file.len(),
        Hash::sha256_of(&nar).to_nix32_prefixed(),
        nar.len(),
        refs.join(" ")
    )
}

fn path_of(info: &Value) -> StorePath {
    info["path"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_content_address_is_parsed_and_never_injects_lines() {
    let (_dir, server) = CacheServer::start_local();
    let infos = closure_in_upload_order(&nix::build_closure("hostile-ca", 1, 0));
    let leaf = &infos[0];
    // Each of these was signed and published as given: the first made a fresh Nix fetch the NAR
    // from another host, the second made the path unsubstitutable.
    for ca in ["\nURL: http://elsewhere.invalid/x.nar.zst", "\nCompression: none", "garbage"] {
        let mut lie = leaf.clone();
        lie["ca"] = json!(ca);
        let (s, body) = upload(&server, body_for(&lie)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{ca:?}: {body}");
        assert!(body.contains("ca"), "{body}");
        assert_eq!(narinfo_of(&server, &path_of(leaf)).await, None, "{ca:?} was published");
    }

    // A real content-addressed path (as `nix-store --add` makes one): published with the CA
    // Nix gave, which a fresh Nix reads back and substitutes the path by.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("content-addressed");
    std::fs::write(&file, format!("content-addressed {:?}", Instant::now())).unwrap();
    let added = nix::run(nix::command("nix-store").arg("--add").arg(&file));
    let added: StorePath = added.trim().parse().unwrap();
    let info = nix::path_info(&[&added], false).remove(0);
    let ca = info["ca"].as_str().expect("nix-store --add makes a content-addressed path").to_owned();
    let (s, body) = upload(&server, body_for(&info)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let published = narinfo_of(&server, &added).await.unwrap();
    assert!(published.contains(&format!("\nCA: {ca}\n")), "{published}");
    let fresh = TempStore::new();
    nix::run(&mut fresh.copy_from(&server.url, &server.public_key, &[&added]));
    assert!(fresh.has(&added));
}

#[tokio::test(flavor = "multi_thread")]
async fn narinfo_lines_are_read_as_nix_reads_them_and_unknown_keys_are_never_echoed() {
    let (_dir, server) = CacheServer::start_local();
    let infos = closure_in_upload_order(&nix::build_closure("hostile-keys", 1, 0));
    let leaf = &infos[0];
    let narinfo = nar_uploaded_the_nix_way(&server, leaf).await;
    let name = format!("{}.narinfo", path_of(leaf).hash_part());

    // Nix reads the key up to the first ':' and skips one character: these would be a second
    // NarHash, StorePath and URL to Nix, and unknown keys to a reader splitting at ": ".
    for line in [
        "NarHash:Xsha256:0000000000000000000000000000000000000000000000000000:".to_owned(),
        format!("StorePath:X{}", path_of(&infos[1])),
        "URL:Xnar/0000000000000000000000000000000000000000000000000000.nar".to_owned(),
        "CA: garbage".to_owned(),
    ] {
        let (s, body) = put(&server, &name, format!("{narinfo}{line}\n").into_bytes()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{line}: {body}");
        assert_eq!(narinfo_of(&server, &path_of(leaf)).await, None, "published with {line}");
    }

    // Keys Nix does not know, and System, are dropped: the cache publishes only what it checked.
    let extra = format!("{narinfo}System: x86_64-linux\nX-Evil: Nix never reads this\n");
    let (s, body) = put(&server, &name, extra.into_bytes()).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let published = narinfo_of(&server, &path_of(leaf)).await.unwrap();
    assert!(!published.contains("X-Evil") && !published.contains("System:"), "{published}");
    // What is published parses to the same fields again, and every line is one Nix knows.
    let parsed = NarInfo::parse(&published).unwrap();
    assert_eq!(parsed.to_string(), published);
    let known = [
        "StorePath",
        "URL",
        "Compression",
        "FileHash",
        "FileSize",
        "NarHash",
        "NarSize",
        "References",
        "Deriver",
        "Sig",
        "CA",
    ];
    for line in published.lines() {
        let key = line.split_once(':').unwrap().0;
        assert!(known.contains(&key), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_references_are_signed_as_the_set_nix_fingerprints() {
    let (_dir, server) = CacheServer::start_local();
    let top = nix::build_closure("hostile-refs", 2, 0);
    let infos = closure_in_upload_order(&top);
    let (leaves, top_info) = infos.split_at(infos.len() - 1);
    let top_info = &top_info[0];

    // The leaves natively, one of them listing its own (first) reference twice.
    for info in leaves {
        let mut twice = info.clone();
        if let Some(first) = info["references"].as_array().unwrap().first().cloned() {
            twice["references"].as_array_mut().unwrap().push(first);
        }
        let (s, body) = upload(&server, body_for(&twice)).await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    // The top the `nix copy --to` way, its References line naming a leaf twice.
    let narinfo = nar_uploaded_the_nix_way(&server, top_info).await;
    let leaf = path_of(&leaves[0]).base_name();
    let doubled = narinfo.replacen("References: ", &format!("References: {leaf} "), 1);
    assert_ne!(doubled, narinfo);
    let name = format!("{}.narinfo", top.hash_part());
    let (s, body) = put(&server, &name, doubled.into_bytes()).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let published = NarInfo::parse(&narinfo_of(&server, &top).await.unwrap()).unwrap();
    let mut once = published.references.clone();
    once.dedup();
    assert_eq!(published.references, once, "each reference once");

    // Nix computes the fingerprint over the set: every path is substituted with only our key
    // trusted (with the duplicate signed as sent, Nix said "lacks a valid signature").
    let fresh = TempStore::new();
    let out = fresh.copy_from(&server.url, &server.public_key, &[&top]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(infos.iter().all(|i| fresh.has(&path_of(i))));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_nar_is_never_replaced_by_other_bytes() {
    let (dir, server) = CacheServer::start_local();
    let infos = closure_in_upload_order(&nix::build_closure("hostile-nar", 1, 0));
    let leaf = &infos[0];
    let (s, body) = upload(&server, body_at_level(leaf, 1)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let first = NarInfo::parse(&narinfo_of(&server, &path_of(leaf)).await.unwrap()).unwrap();
    let nar_file = dir.path().join(&first.url);
    let stored = std::fs::read(&nar_file).unwrap();

    // The same NAR again, compressed otherwise: verified, not stored again, and the narinfo
    // still names exactly the file that is there.
    let (s, body) = upload(&server, body_at_level(leaf, 19)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(std::fs::read(&nar_file).unwrap(), stored, "the stored NAR file was replaced");
    let second = NarInfo::parse(&narinfo_of(&server, &path_of(leaf)).await.unwrap()).unwrap();
    assert_eq!(second.url, first.url);
    assert_eq!(second.file_size, Some(stored.len() as u64));
    if let Some(h) = &second.file_hash {
        assert_eq!(*h, Hash::sha256_of(&stored), "FileHash names another file");
    }
    let (_, served) = get(&server, &first.url).await;
    assert_eq!(Hash::sha256_of(&served), Hash::sha256_of(&stored));
    let fresh = TempStore::new();
    nix::run(&mut fresh.copy_from(&server.url, &server.public_key, &[&path_of(leaf)]));
}

/// A builder's side of the orchestrator's API, spoken by hand.
struct FakeBuilder {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl FakeBuilder {
    async fn call(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn claim(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, job) = self.call("/api/v1/jobs/claim", json!({ "wait_seconds": 5 })).await;
            if status == StatusCode::OK {
                return job;
            }
            assert!(Instant::now() < deadline, "no job to claim: {status} {job}");
        }
    }
}

/// Starts `orchestrator build --json ARGS --server …` in the background.
fn follow(
    s: &Setup,
    o: &fleetcache_tests::serve::Orchestrator,
    args: &[&str],
) -> std::thread::JoinHandle<std::process::Output> {
    let mut all = vec!["build", "--json"];
    all.extend_from_slice(args);
    let client = o.client_args();
    all.extend(client.iter().map(String::as_str));
    let mut cmd = s.orchestrator(&all);
    std::thread::spawn(move || cmd.output().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_orchestrator_believes_the_cache_not_the_builder() {
    let s = Setup::new();
    let (_dir, cache) = CacheServer::start_local();
    let (config, api_token) = configure(&s, &cache, "", DEFAULT_AND_CUDA);
    let o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    let fake = |token: &str| FakeBuilder {
        http: reqwest::Client::new(),
        url: o.url.clone(),
        token: token.to_owned(),
    };
    let (builder, other) = (fake("token-a"), fake("token-b"));
    for (b, features) in [(&builder, json!(["cuda"])), (&other, json!([]))] {
        let register = json!({ "systems": ["x86_64-linux"], "features": features, "mandatory_features": [],
                               "max_jobs": 1, "version": "fake" });
        assert_eq!(b.call("/api/v1/builders/register", register).await.0, StatusCode::OK);
    }
    let invented = json!({ "status": "verified", "detail": "CUDA0 (invented)", "by": "fake" });

    // "Built", and nothing pushed: each time the job goes back to the queue, until the attempts
    // run out, and the build fails saying why.
    let following = follow(&s, &o, &["--rev", "main", "--variant", "cuda"]);
    for attempt in 0..3 {
        let job = builder.claim().await;
        let (id, lease) = (job["id"].as_i64().unwrap(), job["lease"].as_str().unwrap().to_owned());
        // Another builder cannot speak for this lease.
        let beat = json!({ "lease": lease, "phase": "building", "pushed_bytes": 0 });
        let path = format!("/api/v1/jobs/{id}/heartbeat");
        assert_eq!(other.call(&path, beat.clone()).await.0, StatusCode::GONE);
        assert_eq!(builder.call(&path, beat).await.0, StatusCode::OK);
        let result = json!({ "lease": lease, "outcome": "built", "seconds": 1.0, "verification": invented });
        let (status, body) = other.call(&format!("/api/v1/jobs/{id}/result"), result.clone()).await;
        assert_eq!(status, StatusCode::GONE, "{body}");
        let (status, body) = builder.call(&format!("/api/v1/jobs/{id}/result"), result).await;
        assert_eq!(status, StatusCode::OK, "attempt {attempt}: {body}");
    }
    let (code, results, stderr) = fleetcache_tests::orchestrator::parse_build(following.join().unwrap());
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(results["cuda"]["status"], "failed");
    let error = results["cuda"]["error"].as_str().unwrap();
    assert!(error.contains("reported it built, but the cache lacks"), "{error}");

    // Built and pushed for real, with a verification the job did not ask for: built, and the
    // invented verification is not recorded.
    let following = follow(&s, &o, &["--rev", "main", "--variant", "default"]);
    let job = builder.claim().await;
    let (id, lease) = (job["id"].as_i64().unwrap(), job["lease"].as_str().unwrap().to_owned());
    nix::run(nix::command("nix-store").args(["--realise", job["drv_path"].as_str().unwrap()]));
    let cache_token = s.home.join("orchestrator/cache-token");
    let mut push =
        s.orchestrator(&["push", "--cache", &cache.url, "--token-file", cache_token.to_str().unwrap()]);
    push.args(job["out_paths"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()));
    nix::run(&mut push);
    let result = json!({ "lease": lease, "outcome": "built", "seconds": 1.0, "verification": invented });
    assert_eq!(builder.call(&format!("/api/v1/jobs/{id}/result"), result).await.0, StatusCode::OK);
    let (code, results, stderr) = fleetcache_tests::orchestrator::parse_build(following.join().unwrap());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(results["default"]["status"], "built");
    assert!(results["default"].get("verification").is_none_or(Value::is_null), "{:?}", results["default"]);
}
