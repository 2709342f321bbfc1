//! The real Nix against the real cache-server: `nix copy --to http://…` uploads (with a netrc),
//! and a fresh store substitutes with only the server's key trusted — on both backends.

use fleetcache_tests::cache_server::{CacheServer, Options};
use fleetcache_tests::garage::Garage;
use fleetcache_tests::nix::{self, TempStore};
use nix_formats::{NarInfo, PublicKey, StorePath};

fn upload(server: &CacheServer, top: &StorePath, compression: Option<&str>) {
    let url = match compression {
        Some(c) => format!("{}?compression={c}", server.url),
        None => server.url.clone(),
    };
    let out = nix::command("nix")
        .args(["copy", "--to", &url, "--netrc-file"])
        .arg(server.netrc())
        .arg(top.to_absolute())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix copy --to {url} failed:\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
}

async fn narinfo_over_http(server: &CacheServer, path: &StorePath) -> NarInfo {
    let resp = reqwest::get(format!("{}/{}.narinfo", server.url, path.hash_part())).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/x-nix-narinfo");
    NarInfo::parse(&resp.text().await.unwrap()).unwrap()
}

/// Upload with plain `nix copy`, then substitute into fresh stores.
async fn round_trip(server: &CacheServer, nonce: &str, compression: Option<&str>) {
    let top = nix::build_closure(nonce, 3, 0);
    let closure = nix::closure(&top);
    upload(server, &top, compression);

    let pk = PublicKey::parse(&server.public_key).unwrap();
    for p in &closure {
        let info = narinfo_over_http(server, p).await;
        assert!(info.is_signed_by_any(std::slice::from_ref(&pk)), "{p} is not signed by the server");
    }

    let store = TempStore::new();
    nix::run(&mut store.copy_from(&server.url, &server.public_key, &[&top]));
    assert!(closure.iter().all(|p| store.has(p)));
    let exe = store.real_path(&closure[0]);
    assert!(exe.exists());

    let stranger = nix_formats::SecretKey::generate("fleetcache-test-1").unwrap().public_key().to_string();
    let refused = TempStore::new();
    let err = nix::run_expecting_failure(&mut refused.copy_from(&server.url, &stranger, &[&top]));
    assert!(nix::refused_for_signature(&err), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nix_uploads_and_substitutes_on_a_local_directory() {
    let (dir, server) = CacheServer::start_local();
    round_trip(&server, "cache-server-local-zstd", Some("zstd")).await;
    // Nix's default compression for http caches is xz; it works too.
    round_trip(&server, "cache-server-local-xz", None).await;
    // The directory is a valid cache on its own: Nix reads it with file:// directly.
    let top = nix::build_closure("cache-server-local-zstd", 3, 0);
    let store = TempStore::new();
    nix::run(&mut store.copy_from(&format!("file://{}", dir.path().display()), &server.public_key, &[&top]));
    assert!(store.has(&top));
}

#[tokio::test(flavor = "multi_thread")]
async fn nix_uploads_and_substitutes_on_garage() {
    // The credentials come from a file in the format of a systemd EnvironmentFile, as the NixOS
    // module passes them; the environment has none.
    let g = Garage::start();
    let creds = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        creds.path(),
        format!(
            "# Garage key\nexport AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY=\"{}\"\n",
            g.access_key_id, g.secret_access_key
        ),
    )
    .unwrap();
    let server = CacheServer::start_with(
        &g.store_url(),
        Options {
            env: vec![("AWS_ACCESS_KEY_ID", String::new()), ("AWS_SECRET_ACCESS_KEY", String::new())],
            config: Some(format!("s3-credentials-file = {:?}\n", creds.path().display().to_string())),
            ..Default::default()
        },
    );
    round_trip(&server, "cache-server-garage", Some("zstd")).await;
    // Objects are in the bucket in Nix's layout.
    let objects = g.client().list_objects_v2().bucket(&g.bucket).send().await.unwrap();
    let keys: Vec<&str> = objects.contents().iter().filter_map(|o| o.key()).collect();
    assert!(keys.contains(&"nix-cache-info"), "{keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("nar/") && k.ends_with(".nar.zst")), "{keys:?}");
    assert_eq!(keys.iter().filter(|k| k.ends_with(".narinfo")).count(), 4, "{keys:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_nix_cache_is_served_read_only() {
    // A cache written by `nix copy --to file://` and signed there, served without any key.
    let top = nix::build_closure("read-only-serving", 2, 0);
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let (sk, pk) = (keys.path().join("sk"), keys.path().join("pk"));
    nix::run(nix::command("nix-store").args(["--generate-binary-cache-key", "upstream-1"]).arg(&sk).arg(&pk));
    nix::run(
        nix::command("nix")
            .args(["copy", "--to"])
            .arg(format!("file://{}?secret-key={}", dir.path().display(), sk.display()))
            .arg(top.to_absolute()),
    );
    let mut server = CacheServer::start_with(
        &format!("file://{}", dir.path().display()),
        Options { read_only: true, ..Default::default() },
    );
    let store = TempStore::new();
    nix::run(&mut store.copy_from(&server.url, &std::fs::read_to_string(&pk).unwrap(), &[&top]));
    assert!(store.has(&top));

    // Uploads are refused with a clear 403.
    let resp = reqwest::Client::new()
        .put(format!("{}/{}.narinfo", server.url, top.hash_part()))
        .bearer_auth(&server.token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(resp.text().await.unwrap().contains("read-only"));
    assert!(server.stop(), "SIGTERM gives a clean exit");
}
