//! Starting, configuring and stopping the real cache-server binary.

use std::process::Command;

use fleetcache_tests::bin;
use fleetcache_tests::cache_server::CacheServer;
use nix_formats::SecretKey;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_downloads_in_flight_then_exits_cleanly() {
    use futures_util::StreamExt as _;
    let dir = tempfile::tempdir().unwrap();
    let name = format!("{}.nar", "0".repeat(52));
    std::fs::create_dir_all(dir.path().join("nar")).unwrap();
    let size = 64usize << 20;
    std::fs::write(dir.path().join("nar").join(&name), vec![7u8; size]).unwrap();
    let mut server = CacheServer::start(&format!("file://{}", dir.path().display()));

    let resp = reqwest::get(format!("{}/nar/{name}", server.url)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = body.next().await.unwrap().unwrap().len();
    server.terminate();
    while let Some(chunk) = body.next().await {
        got += chunk.expect("the download in flight is not cut off").len();
    }
    assert_eq!(got, size);
    assert!(server.stop(), "exit status is success after draining");
    assert!(reqwest::get(format!("{}/healthz", server.url)).await.is_err(), "no longer accepting");
}

fn check_config(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("cache-server")).arg("--check-config").args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn check_config_accepts_good_files_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = |f: &str| dir.path().join(f).display().to_string();
    std::fs::write(d("sk"), SecretKey::generate("k-1").unwrap().to_nix_string()).unwrap();
    std::fs::write(d("tokens"), "builder:secret\n").unwrap();
    let good = format!(
        "store = \"file://{}\"\nsigning-key-files = [\"{}\"]\nupload-tokens-file = \"{}\"\n",
        d("cache"),
        d("sk"),
        d("tokens")
    );
    std::fs::write(d("good.toml"), &good).unwrap();
    let (ok, text) = check_config(&["--config", &d("good.toml")]);
    assert!(ok, "{text}");
    assert!(text.contains("configuration OK"), "{text}");

    std::fs::write(d("unknown.toml"), format!("{good}sigining-key = 1\n")).unwrap();
    let (ok, text) = check_config(&["--config", &d("unknown.toml")]);
    assert!(!ok && text.contains("sigining-key"), "{text}");

    let (ok, text) = check_config(&["--config", &d("good.toml"), "--signing-key-file", &d("missing")]);
    assert!(!ok && text.contains("missing"), "{text}");

    std::fs::write(d("bad-sk"), "k-1:not-base64!").unwrap();
    let (ok, text) = check_config(&["--config", &d("good.toml"), "--signing-key-file", &d("bad-sk")]);
    assert!(!ok && text.contains("bad-sk"), "{text}");

    let (ok, text) = check_config(&["--store", "ftp://nope"]);
    assert!(!ok && text.contains("ftp://nope"), "{text}");

    // S3 without credentials is a clear error, not a hang.
    let out = Command::new(bin("cache-server"))
        .args(["--check-config", "--store", "s3://bucket?endpoint=http://127.0.0.1:1&region=garage"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("AWS_ACCESS_KEY_ID"));

    // A credentials file that lacks the secret is named, with what it lacks.
    std::fs::write(d("s3-creds"), "AWS_ACCESS_KEY_ID=GK1\n").unwrap();
    let s3 = format!(
        "store = \"s3://b?endpoint=http://127.0.0.1:1\"\ns3-credentials-file = {:?}\n",
        d("s3-creds")
    );
    std::fs::write(d("s3.toml"), &s3).unwrap();
    let (ok, text) = check_config(&["--config", &d("s3.toml")]);
    assert!(!ok && text.contains("s3-creds") && text.contains("AWS_SECRET_ACCESS_KEY"), "{text}");

    // --settings-only checks the file without the secrets it names (the NixOS module's
    // build-time check); a bad setting still fails it.
    let missing =
        format!("{s3}signing-key-files = [{:?}]\nupload-tokens-file = {:?}\n", d("nokey"), d("notok"));
    std::fs::write(d("no-secrets.toml"), missing).unwrap();
    let (ok, text) = check_config(&["--config", &d("no-secrets.toml"), "--settings-only"]);
    assert!(ok, "{text}");
    let (ok, text) = check_config(&["--config", &d("no-secrets.toml")]);
    assert!(!ok && text.contains("nokey"), "{text}");
    let (ok, text) = check_config(&["--config", &d("unknown.toml"), "--settings-only"]);
    assert!(!ok && text.contains("sigining-key"), "{text}");
    let (ok, text) = check_config(&["--store", "ftp://nope", "--settings-only"]);
    assert!(!ok && text.contains("ftp://nope"), "{text}");
}
