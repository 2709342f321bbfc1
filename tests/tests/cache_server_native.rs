//! The builder's protocol against the real cache-server: one streamed request per path, a
//! batch "missing" query, and what happens when the client or S3 goes away mid-upload.

use bytes::Bytes;
use cache_server::native::MissingResponse;
use fleetcache_tests::cache_server::{
    CacheServer, Options, body_for, closure_in_upload_order, push_json, upload,
};
use fleetcache_tests::garage::Garage;
use fleetcache_tests::nix::{self, TempStore};
use nix_formats::{Hash, StorePath};
use reqwest::StatusCode;
use serde_json::Value;

async fn missing(server: &CacheServer, paths: &[&str]) -> Vec<String> {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/missing", server.url))
        .bearer_auth(&server.token)
        .json(&serde_json::json!({ "paths": paths }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json::<MissingResponse>().await.unwrap().missing
}

async fn status_of(server: &CacheServer, path: &str) -> StatusCode {
    reqwest::get(format!("{}/{path}", server.url)).await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closure_uploaded_natively_is_substituted_by_nix() {
    let (_dir, server) = CacheServer::start_local();
    let top = nix::build_closure("native-upload", 4, 0);
    let infos = closure_in_upload_order(&top);
    let paths: Vec<&str> = infos.iter().map(|i| i["path"].as_str().unwrap()).collect();
    assert_eq!(missing(&server, &paths).await, paths);

    for info in &infos {
        let (s, body) = upload(&server, body_for(info)).await;
        assert_eq!(s, StatusCode::OK, "{body}\n{}", server.log());
    }
    assert!(missing(&server, &paths).await.is_empty());
    let store = TempStore::new();
    nix::run(&mut store.copy_from(&server.url, &server.public_key, &[&top]));
    assert!(paths.iter().all(|p| store.has(&p.parse().unwrap())));
    // Uploading again is harmless.
    assert_eq!(upload(&server, body_for(&infos[0])).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn lies_and_broken_streams_publish_nothing() {
    let (dir, server) = CacheServer::start_local();
    let top = nix::build_closure("native-lies", 1, 0);
    let infos = closure_in_upload_order(&top);
    let leaf = &infos[0];
    let leaf_path: StorePath = leaf["path"].as_str().unwrap().parse().unwrap();
    let narinfo = format!("{}.narinfo", leaf_path.hash_part());

    // A claimed NarHash that is not the NAR's.
    let mut lie = leaf.clone();
    let wrong = Hash::sha256_of(b"another nar");
    lie["narHash"] = Value::String(wrong.to_sri());
    let (s, body) = upload(&server, body_for(&lie)).await;
    assert_eq!((s, body.contains("NarHash")), (StatusCode::BAD_REQUEST, true), "{body}");
    assert_eq!(status_of(&server, &narinfo).await, StatusCode::NOT_FOUND);
    assert_eq!(status_of(&server, &format!("nar/{}.nar.zst", wrong.to_nix32())).await, StatusCode::NOT_FOUND);

    // A NarSize that lies.
    let mut lie = leaf.clone();
    lie["narSize"] = Value::from(leaf["narSize"].as_u64().unwrap() + 8);
    assert_eq!(upload(&server, body_for(&lie)).await.0, StatusCode::BAD_REQUEST);

    // A stream cut short: the compressed NAR ends early.
    let mut short = body_for(leaf);
    short.truncate(short.len() - 20);
    let (s, body) = upload(&server, short).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");

    // The client goes away mid-upload.
    let full = body_for(leaf);
    let half = Bytes::copy_from_slice(&full[..full.len() / 2]);
    let stream = futures_util::stream::iter(vec![
        Ok::<Bytes, std::io::Error>(half),
        Err(std::io::Error::other("client crashed")),
    ]);
    let (s, _) = upload(&server, reqwest::Body::wrap_stream(stream)).await;
    assert!(!s.is_success());

    // Not JSON, and a reference that is not in the cache.
    let (s, body) = upload(&server, b"garbage\n".to_vec()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body.contains("upload metadata JSON") && !body.contains("interrupted"), "{body}");
    let top_info = infos.last().unwrap();
    let (s, body) = upload(&server, body_for(top_info)).await;
    assert_eq!((s, body.contains("references not in this cache")), (StatusCode::CONFLICT, true), "{body}");

    // Nothing was published, and no partial file is left in the store directory.
    assert_eq!(status_of(&server, &narinfo).await, StatusCode::NOT_FOUND);
    let nar_files: Vec<_> = std::fs::read_dir(dir.path().join("nar")).unwrap().collect();
    assert!(nar_files.len() <= 1, "only the verified NAR of the unpublished top may remain: {nar_files:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_dir(dir.path().join(".fleetcache-tmp")).unwrap().count() > 0 {
        assert!(std::time::Instant::now() < deadline, "temporary upload files left behind");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Each refusal is counted for what it was: the garbage line as bad metadata.
    let metrics = reqwest::get(format!("{}/metrics", server.url)).await.unwrap().text().await.unwrap();
    for reason in ["bad_metadata", "hash_or_size_mismatch", "missing_references"] {
        assert!(metrics.contains(&format!("reason=\"{reason}\"")), "{reason} not counted:\n{metrics}");
    }

    // And the honest upload still works afterwards.
    assert_eq!(upload(&server, body_for(leaf)).await.0, StatusCode::OK);
    assert_eq!(status_of(&server, &narinfo).await, StatusCode::OK);
}

/// S3 that accepts connections and then answers nothing (a frozen Garage): a narinfo request
/// gets a 503 after `s3-timeout-seconds` (each of three attempts), not a request that never
/// ends, and once S3 answers again so does the cache.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_s3_gives_503_not_a_request_that_never_ends() {
    let g = Garage::start();
    let config = "s3-timeout-seconds = 1\nnarinfo-cache-seconds = 0\nindex-refresh-seconds = 0\n";
    let server = CacheServer::start_with(
        &g.store_url(),
        Options { env: g.credential_env().to_vec(), config: Some(config.to_owned()), ..Default::default() },
    );
    let top = nix::build_closure("native-s3-stalled", 1, 0);
    push_json(&server, &[&top]);
    let narinfo = format!("{}.narinfo", top.hash_part());
    assert_eq!(status_of(&server, &narinfo).await, StatusCode::OK);

    g.stall();
    // Without a limit the request would wait for as long as Garage is frozen.
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60)).build().unwrap();
    let asked = client.get(format!("{}/{narinfo}", server.url)).send().await;
    g.unstall();
    let answer = asked.expect("an answer within 60 s");
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(server.log().contains("GetObject"), "{}", server.log());
    assert_eq!(status_of(&server, &narinfo).await, StatusCode::OK, "S3 answers again, and so does the cache");
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_down_mid_upload_gives_5xx_and_no_narinfo_then_recovers() {
    let mut g = Garage::start();
    let server = CacheServer::start_with(
        &g.store_url(),
        Options { env: g.credential_env().to_vec(), ..Default::default() },
    );
    let top = nix::build_closure("native-s3-down", 2, 0);
    let infos = closure_in_upload_order(&top);
    let (first, rest) = infos.split_first().unwrap();
    assert_eq!(upload(&server, body_for(first)).await.0, StatusCode::OK);

    g.stop();
    let (s, body) = upload(&server, body_for(&rest[0])).await;
    assert!(s.is_server_error(), "{s}: {body}");
    assert!(!body.contains("127.0.0.1"), "internals leaked: {body}");

    g.restart();
    let next: StorePath = rest[0]["path"].as_str().unwrap().parse().unwrap();
    assert_eq!(status_of(&server, &format!("{}.narinfo", next.hash_part())).await, StatusCode::NOT_FOUND);
    for info in rest {
        let (s, body) = upload(&server, body_for(info)).await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    let store = TempStore::new();
    nix::run(&mut store.copy_from(&server.url, &server.public_key, &[&top]));
    assert!(store.has(&top));
    // The stopped upload left no multipart upload open.
    let open = g.client().list_multipart_uploads().bucket(&g.bucket).send().await.unwrap();
    assert!(open.uploads().is_empty());
}
