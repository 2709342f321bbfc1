//! `orchestrator keygen` writes keys that the real Nix signs and verifies with.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use fleetcache_tests::{bin, nix};
use nix_formats::narinfo::fingerprint;
use nix_formats::{Hash, PublicKey, Signature, StorePath};

fn keygen(dir: &std::path::Path, name: &str, force: bool) -> std::process::Output {
    let mut c = Command::new(bin("orchestrator"));
    c.args(["keygen", "--name", name])
        .arg("--secret-key-file")
        .arg(dir.join("sk"))
        .arg("--public-key-file")
        .arg(dir.join("pk"));
    if force {
        c.arg("--force");
    }
    c.output().unwrap()
}

#[test]
fn keygen_writes_a_pair_that_nix_signs_and_verifies_with() {
    let dir = tempfile::tempdir().unwrap();
    let out = keygen(dir.path(), "cache.test-1", false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pk_text = fs::read_to_string(dir.path().join("pk")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pk_text, "prints the public key");
    assert_eq!(fs::metadata(dir.path().join("sk")).unwrap().permissions().mode() & 0o777, 0o600);
    let pk = PublicKey::parse(&pk_text).unwrap();

    // Real nix signs a real path with our secret key file...
    let top = nix::build_closure("keygen-cli", 1, 0);
    // The path outlives this test, so earlier runs left signatures by other keys of this name:
    // the one that matters is the one this run adds.
    let signatures = |top: &StorePath| -> Vec<String> {
        let info = &nix::path_info(&[top], false)[0];
        info["signatures"]
            .as_array()
            .map_or(vec![], |a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
    };
    let before = signatures(&top);
    nix::run(
        nix::command("nix")
            .args(["store", "sign", "--key-file"])
            .arg(dir.path().join("sk"))
            .arg(top.to_absolute()),
    );
    let info = &nix::path_info(&[&top], false)[0];
    let added: Vec<Signature> = signatures(&top)
        .iter()
        .filter(|s| !before.contains(s))
        .map(|s| Signature::parse(s).unwrap())
        .collect();
    assert_eq!(added.len(), 1, "nix added one signature: {added:?}");
    let sig = &added[0];
    assert_eq!(sig.key_name(), "cache.test-1");

    // ...we verify it over the fingerprint we compute...
    let refs: Vec<StorePath> =
        info["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().parse().unwrap()).collect();
    let nar_hash = Hash::parse(info["narHash"].as_str().unwrap()).unwrap();
    let fp = fingerprint(&top, &nar_hash, info["narSize"].as_u64().unwrap(), &refs);
    assert!(pk.verify(fp.as_bytes(), sig));

    // ...and real nix verifies it with our public key, and not without it.
    nix::run(nix::command("nix").args(["store", "verify", "--no-contents", "--sigs-needed", "1"]).args([
        "--option",
        "trusted-public-keys",
        &pk_text,
        &top.to_absolute(),
    ]));
    let other = "other-1:3dZGpITQEAvITs/GM3rf9mIy/RBif4t3Tpo9+FyHDzY=";
    nix::run_expecting_failure(
        nix::command("nix").args(["store", "verify", "--no-contents", "--sigs-needed", "1"]).args([
            "--option",
            "trusted-public-keys",
            other,
            &top.to_absolute(),
        ]),
    );
}

#[test]
fn keygen_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    assert!(keygen(dir.path(), "k-1", false).status.success());
    let before = fs::read_to_string(dir.path().join("sk")).unwrap();
    let out = keygen(dir.path(), "k-1", false);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read_to_string(dir.path().join("sk")).unwrap(), before);
    assert!(keygen(dir.path(), "k-1", true).status.success());
    assert_ne!(fs::read_to_string(dir.path().join("sk")).unwrap(), before);
}
