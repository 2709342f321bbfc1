//! NAR downloads that bypass cache-server: with `nar-downloads = "presigned"` on Garage a NAR
//! request is answered with a redirect to a presigned URL, and a fresh store trusting only the
//! fleet key substitutes the closure through it (the real Nix follows the redirect; the bytes
//! come from Garage, not the server), at the address machines reach the bucket by. With
//! `"base-url"` the redirect goes to another server of the same files. A client the read tokens
//! refuse gets no URL.

use fleetcache_tests::cache_server::{self, CacheServer, Options};
use fleetcache_tests::garage::{Garage, REGION};
use fleetcache_tests::nix::{self, TempStore};
use nix_formats::StorePath;
use reqwest::StatusCode;
use reqwest::header::LOCATION;

const READ_TOKEN: &str = "reader-secret";

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// `/metrics` (with the read token, which a server without read tokens ignores).
async fn metrics(server: &CacheServer) -> String {
    let req = reqwest::Client::new().get(format!("{}/metrics", server.url)).bearer_auth(READ_TOKEN);
    req.send().await.unwrap().error_for_status().unwrap().text().await.unwrap()
}

fn counter(metrics: &str, prefix: &str) -> u64 {
    metrics.lines().filter_map(|l| l.strip_prefix(prefix)).map(|n| n.trim().parse::<u64>().unwrap()).sum()
}

/// The narinfo of `path` on `server`.
async fn narinfo(server: &CacheServer, path: &StorePath, token: Option<&str>) -> String {
    let mut req = reqwest::Client::new().get(format!("{}/{}.narinfo", server.url, path.hash_part()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap().error_for_status().unwrap().text().await.unwrap()
}

fn field<'a>(narinfo: &'a str, name: &str) -> &'a str {
    narinfo.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")).expect("the field is there")
}

/// The URL of `path`'s NAR on `server`.
async fn nar_url(server: &CacheServer, path: &StorePath, token: Option<&str>) -> String {
    format!("{}/{}", server.url, field(&narinfo(server, path, token).await, "URL"))
}

/// The compressed size of every NAR of `top`'s closure on `server`.
async fn nar_files(server: &CacheServer, top: &StorePath, token: Option<&str>) -> u64 {
    let mut sum = 0;
    for p in nix::closure(top) {
        sum += field(&narinfo(server, &p, token).await, "FileSize").parse::<u64>().unwrap();
    }
    sum
}

/// `nix copy --from` the cache into a fresh store trusting only `key`, with `netrc` for the
/// cache's host; asserts it worked.
fn substitute(cache: &str, key: &str, netrc: Option<&std::path::Path>, top: &StorePath) -> TempStore {
    let store = TempStore::new();
    let mut copy = store.copy_from(cache, key, &[top]);
    if let Some(n) = netrc {
        copy.arg("--option").arg("netrc-file").arg(n);
    }
    nix::run(&mut copy);
    for p in nix::closure(top) {
        assert!(store.has(&p), "{p} was substituted");
    }
    store
}

#[tokio::test]
async fn presigned_redirects_on_garage() {
    let garage = Garage::start();
    // The server reaches the bucket at 127.0.0.1 and the machines at `localhost`, as a server
    // inside reaches S3 by another address than machines outside; and the cache is at
    // 127.0.0.1, a host apart from the bucket's, so curl sends the netrc's read token to the
    // cache only.
    let port = garage.endpoint().rsplit(':').next().unwrap().to_owned();
    let store = format!("s3://{}?endpoint=http://127.0.0.1:{port}&region={REGION}", garage.bucket);
    let presigned = |extra: &str| Options {
        config: Some(format!("nar-downloads = \"presigned\"\nnar-presigned-seconds = 120\n{extra}")),
        read_token: Some(READ_TOKEN.into()),
        env: garage.credential_env().to_vec(),
        ..Options::default()
    };
    let server = CacheServer::start_with(
        &store,
        presigned(&format!("nar-presigned-endpoint = \"http://localhost:{port}\"\n")),
    );
    let top = nix::build_closure(&format!("redirect-{}", std::process::id()), 3, 2);
    let pushed = cache_server::push_json(&server, &[&top]);
    assert_eq!(pushed["uploaded"], nix::closure(&top).len(), "{pushed}");

    // The redirect: to the bucket's host, signed, valid as configured; only for a reader.
    let nar = nar_url(&server, &top, Some(READ_TOKEN)).await;
    let client = no_redirects();
    let refused = client.get(&nar).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.headers().get(LOCATION).is_none());
    let answer = client.get(&nar).bearer_auth(READ_TOKEN).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::TEMPORARY_REDIRECT);
    // (Responses to a reader are also marked private.)
    assert!(answer.headers()["cache-control"].to_str().unwrap().contains("no-store"));
    let location = answer.headers()[LOCATION].to_str().unwrap().to_owned();
    assert!(location.starts_with(&format!("http://localhost:{port}/{}/nar/", garage.bucket)), "{location}");
    assert!(location.contains("X-Amz-Signature=") && location.contains("X-Amz-Expires=120"), "{location}");
    // The presigned URL fetches the object; the same URL unsigned does not (the bucket is
    // private), so the signature is what lets the machine in.
    let direct = reqwest::get(&location).await.unwrap();
    assert_eq!(direct.status(), StatusCode::OK);
    let size = direct.bytes().await.unwrap().len();
    let unsigned = reqwest::get(location.split('?').next().unwrap()).await.unwrap();
    assert_eq!(unsigned.status(), StatusCode::FORBIDDEN, "{:?}", unsigned.text().await);
    // Without nar-presigned-endpoint the URL names the store's own endpoint.
    let plain = CacheServer::start_with(&store, presigned(""));
    let plain_nar = format!("{}/nar/{}", plain.url, nar.rsplit('/').next().unwrap());
    let answer = client.get(&plain_nar).bearer_auth(READ_TOKEN).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::TEMPORARY_REDIRECT);
    let plain_location = answer.headers()[LOCATION].to_str().unwrap();
    assert!(
        plain_location.starts_with(&format!("http://127.0.0.1:{port}/{}/nar/", garage.bucket)),
        "{plain_location}"
    );
    // HEAD is answered here (a presigned URL is for GET only), with the object's size.
    let head = client.head(&nar).bearer_auth(READ_TOKEN).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"].to_str().unwrap(), size.to_string());

    // A fresh store trusting only the fleet key substitutes everything through the redirects,
    // and the NAR bytes do not pass through the server.
    let netrc = server.dir().join("read-netrc");
    std::fs::write(&netrc, format!("machine 127.0.0.1 login reader password {READ_TOKEN}\n")).unwrap();
    let before = metrics(&server).await;
    substitute(&server.url, &server.public_key, Some(&netrc), &top);
    let after = metrics(&server).await;
    let redirects = r#"fleetcache_http_requests_total{route="nar",method="GET",status="307"} "#;
    let closure = nix::closure(&top).len() as u64;
    assert_eq!(counter(&after, redirects) - counter(&before, redirects), closure, "{after}");
    let served = counter(&after, "fleetcache_bytes_served_total ")
        - counter(&before, "fleetcache_bytes_served_total ");
    assert!(served < 64 * 1024, "only narinfos went through the server: {served} bytes");
    let nar_files = nar_files(&server, &top, Some(READ_TOKEN)).await;
    assert!(nar_files > 256 * 1024, "the NARs are bigger than that: {nar_files}");
}

#[tokio::test]
async fn base_url_redirects_to_a_mirror() {
    // The "CDN": a read-only cache-server on the same directory, serving the files itself.
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().display());
    let mirror = CacheServer::start_with(&store, Options { read_only: true, ..Options::default() });
    let server = CacheServer::start_with(
        &store,
        Options {
            config: Some(format!("nar-downloads = \"base-url\"\nnar-base-url = \"{}/\"\n", mirror.url)),
            ..Options::default()
        },
    );
    let top = nix::build_closure(&format!("base-url-{}", std::process::id()), 2, 1);
    cache_server::push_json(&server, &[&top]);

    let nar = nar_url(&server, &top, None).await;
    let answer = no_redirects().get(&nar).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::TEMPORARY_REDIRECT);
    let file = nar.rsplit('/').next().unwrap();
    assert_eq!(answer.headers()[LOCATION], format!("{}/nar/{file}", mirror.url).as_str());

    let mirror_before = counter(&metrics(&mirror).await, "fleetcache_bytes_served_total ");
    substitute(&server.url, &server.public_key, None, &top);
    let mirror_served = counter(&metrics(&mirror).await, "fleetcache_bytes_served_total ") - mirror_before;
    let nar_files = nar_files(&server, &top, None).await;
    assert!(nar_files > 256 * 1024);
    assert!(
        mirror_served >= nar_files,
        "the NARs ({nar_files} bytes) came from the mirror: {mirror_served} bytes"
    );
}

#[test]
fn presigned_needs_an_s3_store() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(fleetcache_tests::bin("cache-server"))
        .args(["--listen", "127.0.0.1:0", "--store", &format!("file://{}", dir.path().display())])
        .arg("--config")
        .arg({
            let c = dir.path().join("c.toml");
            std::fs::write(&c, "nar-downloads = \"presigned\"\n").unwrap();
            c
        })
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nar-downloads = \"presigned\" needs an s3:// store"), "{err}");
}
