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

/// CRC-32 (IEEE), as the xz format checks its headers with.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// `data` as an xz file whose LZMA2 block header declares a `dict_code` dictionary (38: 2 GiB)
/// although it was compressed with a small one: what a decoder must allocate before it reads
/// anything else.
fn xz_declaring_a_huge_dictionary(data: &[u8], dict_code: u8) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = xz2::write::XzEncoder::new(Vec::new(), 0);
    enc.write_all(data).unwrap();
    let mut xz = enc.finish().unwrap();
    // The block header follows the 12-byte stream header: its size, flags, optional sizes,
    // then the filter (LZMA2 is 0x21, one byte of properties: the dictionary), padding, CRC32.
    let start = 12;
    let size = (usize::from(xz[start]) + 1) * 4;
    let flags = xz[start + 1];
    let mut at = start + 2;
    let skip_vli = |at: &mut usize, xz: &[u8]| {
        while xz[*at] & 0x80 != 0 {
            *at += 1;
        }
        *at += 1;
    };
    if flags & 0x40 != 0 {
        skip_vli(&mut at, &xz);
    }
    if flags & 0x80 != 0 {
        skip_vli(&mut at, &xz);
    }
    assert_eq!((xz[at], xz[at + 1]), (0x21, 0x01), "an LZMA2 filter with one property byte");
    xz[at + 2] = dict_code;
    let crc = crc32(&xz[start..start + size - 4]);
    xz[start + size - 4..start + size].copy_from_slice(&crc.to_le_bytes());
    xz
}

#[tokio::test(flavor = "multi_thread")]
async fn decompressors_and_nar_depth_are_bounded_in_memory() {
    let (_dir, server) = CacheServer::start_local();
    let infos = closure_in_upload_order(&nix::build_closure("hostile-memory", 1, 0));
    let leaf = &infos[0];

    // An xz NAR declaring a 2 GiB dictionary, uploaded the `nix copy --to` way: its name is its
    // hash, so it is stored; verifying it for the narinfo must not allocate the dictionary.
    let path = leaf["path"].as_str().unwrap();
    let nar = dump_path(Path::new(path), Vec::new()).unwrap();
    let file = xz_declaring_a_huge_dictionary(&nar, 38);
    let file_hash = Hash::sha256_of(&file);
    let name = format!("{}.nar.xz", file_hash.to_nix32());
    assert_eq!(put(&server, &format!("nar/{name}"), file.clone()).await.0, StatusCode::OK);
    let narinfo = format!(
        "StorePath: {path}\nURL: nar/{name}\nCompression: xz\nFileHash: {}\nFileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: \n",
        file_hash.to_nix32_prefixed(),
        file.len(),
        Hash::sha256_of(&nar).to_nix32_prefixed(),
        nar.len()
    );
    let (s, body) =
        put(&server, &format!("{}.narinfo", path_of(leaf).hash_part()), narinfo.into_bytes()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("memory"), "{body}");

    // A NAR of 2000 nested directories with 64 KiB names (128 MiB, a few hundred KiB
    // compressed): refused at the first name no Linux can create, its memory never held.
    let mut hashing = nix_formats::hash::HashingWriter::new(zstd::Encoder::new(Vec::new(), 3).unwrap());
    {
        let mut e = nix_formats::nar::NarEncoder::new(&mut hashing).unwrap();
        let name = vec![b'd'; 64 * 1024];
        e.directory_start().unwrap();
        for _ in 0..2000 {
            e.entry_start(&name).unwrap();
            e.directory_start().unwrap();
        }
        for _ in 0..2000 {
            e.directory_end().unwrap();
            e.entry_end().unwrap();
        }
        e.directory_end().unwrap();
        e.finish().unwrap();
    }
    let (nar_hash, nar_size, zstd) = hashing.finish();
    let compressed = zstd.finish().unwrap();
    let meta = json!({ "store_path": path, "references": [], "deriver": null, "ca": null,
                       "nar_hash": nar_hash.to_string(), "nar_size": nar_size });
    let mut body = serde_json::to_vec(&meta).unwrap();
    body.push(b'\n');
    body.extend(compressed);
    let (s, answer) = upload(&server, body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer.contains("longer than the 255 bytes Linux allows"), "{answer}");

    let peak = server.peak_rss_mib();
    eprintln!("cache-server peak RSS after both: {peak} MiB");
    assert!(peak < 200, "the server held {peak} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_narinfo_cache_holds_bytes_not_a_count() {
    // A cache written by another tool (served read-only, as is): 3000 narinfos of 60 KiB.
    let dir = tempfile::tempdir().unwrap();
    let filler = "X".repeat(60 * 1024);
    let mut names = Vec::new();
    for i in 0..3000u32 {
        let hash = nix_formats::nixbase32::encode(&Hash::sha256_of(&i.to_le_bytes()).digest()[..20]);
        std::fs::write(dir.path().join(format!("{hash}.narinfo")), format!("StorePath: x\n{filler}\n"))
            .unwrap();
        names.push(format!("{hash}.narinfo"));
    }
    let server = CacheServer::start_with(
        &format!("file://{}", dir.path().display()),
        fleetcache_tests::cache_server::Options { read_only: true, ..Default::default() },
    );
    let http = reqwest::Client::new();
    for round in 0..2 {
        for name in &names {
            let resp = http.get(format!("{}/{name}", server.url)).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "round {round}");
            resp.bytes().await.unwrap();
        }
    }
    let peak = server.peak_rss_mib();
    eprintln!("cache-server peak RSS after 6000 GETs of 60 KiB narinfos: {peak} MiB");
    // 180 MiB of narinfos were served; the cache holds at most its 64 MiB budget.
    assert!(peak < 150, "the server held {peak} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_upload_token_is_refused_without_a_restart() {
    let (_dir, server) = CacheServer::start_local();
    let infos = closure_in_upload_order(&nix::build_closure("hostile-revoke", 1, 0));
    assert_eq!(upload(&server, body_for(&infos[0])).await.0, StatusCode::OK);
    // The line is removed (a stolen builder token): once the server has looked at the file
    // again (at most a second later), the token is refused.
    let tokens = server.dir().join("upload-tokens");
    std::fs::write(&tokens, "someone-else:another-token\n").unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options().write(true).open(&tokens).unwrap().set_modified(later).unwrap();
    tokio::time::sleep(cache_server::auth::RECHECK_AFTER + Duration::from_millis(200)).await;
    let (s, body) = upload(&server, body_for(&infos[1])).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(narinfo_of(&server, &path_of(&infos[1])).await, None);
}
