//! Bad input to the real cache-server over real HTTP: each is refused with a 4xx, nothing is
//! published, and the server stays healthy.

use fleetcache_tests::cache_server::{CacheServer, Options};
use nix_formats::nar::NarEncoder;
use nix_formats::{Hash, NarInfo, PublicKey, StorePath, nixbase32};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A NAR of a directory holding `files` (name, contents), in the given order.
fn nar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut e = NarEncoder::new(Vec::new()).unwrap();
    e.directory_start().unwrap();
    for (name, data) in files {
        e.entry_start(name.as_bytes()).unwrap();
        e.regular(false, data).unwrap();
        e.entry_end().unwrap();
    }
    e.directory_end().unwrap();
    e.finish().unwrap()
}

fn path(name: &str) -> StorePath {
    let hash = nixbase32::encode(&Hash::sha256_of(name.as_bytes()).digest()[..20]);
    StorePath::from_base_name(&format!("{hash}-{name}")).unwrap()
}

/// A compressed NAR file and the narinfo that truthfully describes it.
struct Upload {
    file: Vec<u8>,
    file_name: String,
    info: NarInfo,
}

fn upload_of(store_path: StorePath, nar: &[u8], references: Vec<StorePath>) -> Upload {
    let file = zstd::encode_all(nar, 3).unwrap();
    let file_hash = Hash::sha256_of(&file);
    let file_name = format!("{}.nar.zst", file_hash.to_nix32());
    let info = NarInfo {
        store_path,
        url: format!("nar/{file_name}"),
        compression: Some("zstd".into()),
        file_hash: Some(file_hash),
        file_size: Some(file.len() as u64),
        nar_hash: Hash::sha256_of(nar),
        nar_size: nar.len() as u64,
        references,
        deriver: None,
        system: None,
        signatures: vec![],
        ca: None,
        unknown: vec![],
    };
    Upload { file, file_name, info }
}

struct Client<'a> {
    http: reqwest::Client,
    server: &'a CacheServer,
}

impl Client<'_> {
    async fn put(&self, path: &str, body: Vec<u8>, token: Option<&str>) -> (StatusCode, String) {
        let mut req = self.http.put(format!("{}/{path}", self.server.url)).body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(format!("{}/{path}", self.server.url)).send().await.unwrap()
    }

    async fn publish(&self, u: &Upload) -> (StatusCode, String) {
        let t = Some(self.server.token.as_str());
        let (s, body) = self.put(&format!("nar/{}", u.file_name), u.file.clone(), t).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        self.put(&u.info.file_name(), u.info.to_string().into_bytes(), t).await
    }

    async fn is_published(&self, p: &StorePath) -> bool {
        self.get(&format!("{}.narinfo", p.hash_part())).await.status() == StatusCode::OK
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truthful_upload_is_published_signed_and_served_with_ranges() {
    let (_dir, server) = CacheServer::start_local();
    let c = Client { http: reqwest::Client::new(), server: &server };
    let u = upload_of(path("good"), &nar(&[("a", b"hello"), ("b", b"world")]), vec![]);
    let (s, body) = c.publish(&u).await;
    assert_eq!(s, StatusCode::OK, "{body}");

    let resp = c.get(&u.info.file_name()).await;
    assert_eq!(resp.headers()["content-type"], "text/x-nix-narinfo");
    let served = NarInfo::parse(&resp.text().await.unwrap()).unwrap();
    assert!(served.is_signed_by_any(&[PublicKey::parse(&server.public_key).unwrap()]));
    assert_eq!(served.nar_hash, u.info.nar_hash);

    let nar_url = format!("nar/{}", u.file_name);
    let resp = c.get(&nar_url).await;
    assert_eq!(resp.headers()["content-type"], "application/x-nix-nar");
    assert!(resp.headers()["cache-control"].to_str().unwrap().contains("immutable"));
    assert_eq!(resp.bytes().await.unwrap(), u.file);
    let resp =
        c.http.get(format!("{}/{nar_url}", server.url)).header("Range", "bytes=4-9").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.headers()["content-range"], format!("bytes 4-9/{}", u.file.len()));
    assert_eq!(resp.bytes().await.unwrap(), u.file[4..10]);
    let resp = c
        .http
        .get(format!("{}/{nar_url}", server.url))
        .header("Range", "bytes=999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let head = c.http.head(format!("{}/{nar_url}", server.url)).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], u.file.len().to_string());

    let missing = c.get(&format!("{}.narinfo", path("missing").hash_part())).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(missing.headers()["cache-control"], "no-store");
    assert_eq!(
        c.get("nix-cache-info").await.text().await.unwrap(),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n"
    );

    // The same upload twice, and two at once, all succeed.
    assert_eq!(c.publish(&u).await.0, StatusCode::OK);
    let (a, b) = tokio::join!(c.publish(&u), c.publish(&u));
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK));
}

#[tokio::test(flavor = "multi_thread")]
async fn lies_and_broken_nars_are_refused_and_nothing_is_published() {
    let (_dir, server) = CacheServer::start_local();
    let c = Client { http: reqwest::Client::new(), server: &server };
    let token = Some(server.token.as_str());
    let good_nar = nar(&[("a", b"hello"), ("b", b"world")]);

    // No token, wrong token.
    let u = upload_of(path("auth"), &good_nar, vec![]);
    let (s, _) = c.put(&format!("nar/{}", u.file_name), u.file.clone(), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = c.put(&format!("nar/{}", u.file_name), u.file.clone(), Some("wrong")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(c.get(&format!("nar/{}", u.file_name)).await.status(), StatusCode::NOT_FOUND);

    // A NAR whose bytes do not hash to its name.
    let (s, body) = c.put(&format!("nar/{}", u.file_name), b"not the file".to_vec(), token).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(c.get(&format!("nar/{}", u.file_name)).await.status(), StatusCode::NOT_FOUND);

    // NarHash and NarSize that lie.
    let mut u = upload_of(path("lying-hash"), &good_nar, vec![]);
    u.info.nar_hash = Hash::sha256_of(b"something else");
    let (s, body) = c.publish(&u).await;
    assert_eq!((s, body.contains("NarHash")), (StatusCode::BAD_REQUEST, true), "{body}");
    assert!(!c.is_published(&u.info.store_path).await);
    let mut u = upload_of(path("lying-size"), &good_nar, vec![]);
    u.info.nar_size += 8;
    let (s, body) = c.publish(&u).await;
    assert_eq!((s, body.contains("NarSize")), (StatusCode::BAD_REQUEST, true), "{body}");
    assert!(!c.is_published(&u.info.store_path).await);

    // A truncated NAR, truthfully described.
    let u = upload_of(path("truncated"), &good_nar[..good_nar.len() - 16], vec![]);
    let (s, body) = c.publish(&u).await;
    assert_eq!((s, body.contains("truncated")), (StatusCode::BAD_REQUEST, true), "{body}");
    assert!(!c.is_published(&u.info.store_path).await);

    // A NAR with unsorted entries: Nix 2.8 would restore it, but it is not canonical.
    let u = upload_of(path("unsorted"), &nar(&[("b", b"1"), ("a", b"2")]), vec![]);
    let (s, body) = c.publish(&u).await;
    assert_eq!((s, body.contains("sorted")), (StatusCode::BAD_REQUEST, true), "{body}");
    assert!(!c.is_published(&u.info.store_path).await);

    // Bytes that are not zstd at all.
    let mut u = upload_of(path("not-zstd"), &good_nar, vec![]);
    u.file = b"definitely not zstd".to_vec();
    u.file_name = format!("{}.nar.zst", Hash::sha256_of(&u.file).to_nix32());
    u.info.url = format!("nar/{}", u.file_name);
    u.info.file_hash = None;
    u.info.file_size = None;
    let (s, body) = c.publish(&u).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(!c.is_published(&u.info.store_path).await);

    // A reference that is not in the cache, then is.
    let dep = upload_of(path("dep"), &nar(&[("d", b"dep")]), vec![]);
    let top = upload_of(path("top"), &good_nar, vec![dep.info.store_path.clone()]);
    let (s, body) = c.publish(&top).await;
    assert_eq!((s, body.contains(&dep.info.store_path.to_string())), (StatusCode::CONFLICT, true), "{body}");
    assert!(!c.is_published(&top.info.store_path).await);
    assert_eq!(c.publish(&dep).await.0, StatusCode::OK);
    assert_eq!(c.publish(&top).await.0, StatusCode::OK);

    // A narinfo PUT under another path's name, and one with an invalid store path.
    let u = upload_of(path("renamed"), &good_nar, vec![]);
    let other = format!("{}.narinfo", path("other").hash_part());
    let (s, body) = c.put(&other, u.info.to_string().into_bytes(), token).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    let text = u.info.to_string().replace("-renamed", "-bad name!");
    let (s, body) = c.put(&u.info.file_name(), text.into_bytes(), token).await;
    assert_eq!((s, body.contains("line 1")), (StatusCode::BAD_REQUEST, true), "{body}");

    // A 10 MiB narinfo: refused from its Content-Length, before the body is sent (curl asks
    // first with `Expect: 100-continue`).
    let head = format!(
        "PUT /{} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        u.info.file_name(),
        server.token,
        10 << 20
    );
    assert_eq!(raw_request(&server, head.as_bytes()).await.0, 413);
    assert!(!c.is_published(&u.info.store_path).await);

    // Still healthy, and the refusals were counted.
    assert_eq!(c.get("healthz").await.status(), StatusCode::OK);
    let metrics = c.get("metrics").await.text().await.unwrap();
    for reason in ["hash_or_size_mismatch", "invalid_nar", "missing_references", "file_hash_mismatch"] {
        assert!(metrics.contains(&format!("reason=\"{reason}\"")), "{reason} not counted:\n{metrics}");
    }
    assert!(metrics.contains("route=\"narinfo\",method=\"PUT\",status=\"400\""), "{metrics}");
}

/// Sends raw bytes (no client-side normalisation of `..`), returns the status and the response
/// read until the server closes or the first final response's head is complete.
async fn raw_request(server: &CacheServer, request: &[u8]) -> (u16, String) {
    let addr = server.url.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap_or(0);
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if n == 0 || (text.contains("\r\n\r\n") && !text.starts_with("HTTP/1.1 100")) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, text)
}

async fn raw_get(server: &CacheServer, target: &str) -> (u16, String) {
    raw_request(server, format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn path_traversal_never_leaves_the_store() {
    let (dir, server) = CacheServer::start_local();
    // A file just outside the cache directory, and one inside it that is not part of the layout.
    std::fs::write(dir.path().join("secret.txt"), "root:secret").unwrap();
    for target in [
        "/../../../../etc/passwd",
        "/nar/../../../../etc/passwd",
        "/nar/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/..%2Fsecret.txt",
        "/secret.txt",
        "/nar/%2e%2e/secret.txt",
        "/log/..%2Fsecret.txt",
        "/log/../secret.txt",
        "/.fleetcache-tmp/x",
        "/xn8dpmm67grflgfcrf021vfc6gln5s1h.narinfo/../secret.txt",
    ] {
        let (status, text) = raw_get(&server, target).await;
        assert!((400..500).contains(&status), "{target}: {status}");
        assert!(!text.contains("root:"), "{target} leaked a file");
    }
    assert_eq!(raw_get(&server, "/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn read_tokens_guard_reads_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let server = CacheServer::start_with(
        &format!("file://{}", dir.path().display()),
        Options { read_token: Some("reader-secret".into()), ..Default::default() },
    );
    let http = reqwest::Client::new();
    let url = format!("{}/nix-cache-info", server.url);
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().contains_key("www-authenticate"));
    assert_eq!(http.get(&url).bearer_auth("wrong").send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(http.get(&url).bearer_auth("reader-secret").send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        http.get(&url).basic_auth("x", Some("reader-secret")).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(http.get(&url).bearer_auth(&server.token).send().await.unwrap().status(), StatusCode::OK);
}
