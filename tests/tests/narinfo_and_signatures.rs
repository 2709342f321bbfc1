//! narinfos and signatures against the real Nix: what `nix copy --to file://` writes parses and
//! serialises back byte for byte, and narinfos we sign are accepted by `nix copy --from` with
//! only our key trusted (and refused with another).

use std::fs;
use std::io;
use std::path::Path;

use fleetcache_tests::nix::{self, TempStore};
use nix_formats::hash::HashingWriter;
use nix_formats::nar::dump_path;
use nix_formats::{Hash, NarInfo, PublicKey, SecretKey, StorePath};

fn copy_to_file_cache(path: &StorePath, dir: &Path, compression: &str) -> String {
    let url = format!("file://{}", dir.display());
    nix::run(nix::command("nix").args([
        "copy",
        "--to",
        &format!("{url}?compression={compression}"),
        &path.to_absolute(),
    ]));
    url
}

fn narinfo_files(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "narinfo"))
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn narinfos_written_by_nix_round_trip_and_describe_the_nar_we_compute() {
    let top = nix::build_closure("narinfo-round-trip", 3, 0);
    let closure = nix::closure(&top);
    assert_eq!(closure.len(), 4);
    let info = nix::path_info(&[&top], true);
    for compression in ["xz", "zstd", "none"] {
        let dir = tempfile::tempdir().unwrap();
        copy_to_file_cache(&top, dir.path(), compression);
        let files = narinfo_files(dir.path());
        assert_eq!(files.len(), closure.len());
        for (file, text) in files {
            let n = NarInfo::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert_eq!(n.to_string(), text, "{} re-serialised differently", file.display());
            assert_eq!(n.file_name(), file.file_name().unwrap().to_str().unwrap());
            assert_eq!(n.compression.as_deref(), Some(compression));
            // The NAR hash and size Nix recorded are what our writer produces from the store.
            let (hash, size, _) =
                dump_path(Path::new(&n.store_path.to_absolute()), HashingWriter::new(io::sink()))
                    .unwrap()
                    .finish();
            assert_eq!((&hash, size), (&n.nar_hash, n.nar_size), "{}", n.store_path);
            // The file it points at has the stated hash and size.
            let nar_file = fs::read(dir.path().join(&n.url)).unwrap();
            assert_eq!(Some(Hash::sha256_of(&nar_file)), n.file_hash);
            assert_eq!(Some(nar_file.len() as u64), n.file_size);
            // References agree with `nix path-info`.
            let pi = info.iter().find(|i| i["path"] == n.store_path.to_absolute()).unwrap();
            let mut refs: Vec<String> =
                pi["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect();
            refs.sort();
            let ours: Vec<String> = n.references.iter().map(|r| r.to_absolute()).collect();
            assert_eq!(ours, refs);
        }
    }
}

/// Replaces every signature in a file:// cache with one by `key`.
fn resign(dir: &Path, key: &SecretKey) {
    for (file, text) in narinfo_files(dir) {
        let mut n = NarInfo::parse(&text).unwrap();
        n.signatures.clear();
        n.sign(key);
        fs::write(file, n.to_string()).unwrap();
    }
}

fn nix_generated_key(dir: &Path, name: &str) -> (SecretKey, PublicKey) {
    let (sk, pk) = (dir.join("nix.sk"), dir.join("nix.pk"));
    nix::run(nix::command("nix-store").arg("--generate-binary-cache-key").arg(name).arg(&sk).arg(&pk));
    (
        SecretKey::parse(&fs::read_to_string(sk).unwrap()).unwrap(),
        PublicKey::parse(&fs::read_to_string(pk).unwrap()).unwrap(),
    )
}

#[test]
fn nix_accepts_our_signatures_only_with_our_key_trusted() {
    let top = nix::build_closure("our-signatures", 2, 0);
    let closure = nix::closure(&top);
    let keys = tempfile::tempdir().unwrap();
    let (nix_sk, nix_pk) = nix_generated_key(keys.path(), "made-by-nix-1");
    assert_eq!(nix_sk.public_key(), nix_pk, "a key made by nix loads and its halves match");
    let ours = SecretKey::generate("made-by-fleetcache-1").unwrap();
    let stranger = SecretKey::generate("made-by-fleetcache-1").unwrap().public_key();

    for key in [&ours, &nix_sk] {
        let cache = tempfile::tempdir().unwrap();
        let url = copy_to_file_cache(&top, cache.path(), "zstd");
        resign(cache.path(), key);

        // A stranger's key of the same name: every path lacks a valid signature.
        let refused = TempStore::new();
        let err = nix::run_expecting_failure(&mut refused.copy_from(&url, &stranger.to_string(), &[&top]));
        assert!(nix::refused_for_signature(&err), "{err}");
        assert!(closure.iter().all(|p| !refused.has(p)));

        // The right key: the whole closure arrives.
        let store = TempStore::new();
        nix::run(&mut store.copy_from(&url, &key.public_key().to_string(), &[&top]));
        assert!(closure.iter().all(|p| store.has(p)), "closure substituted with {}", key.name());
        let run = store.real_path(&top).join("bin/run");
        assert!(fs::symlink_metadata(run).unwrap().file_type().is_symlink());
    }
}

#[test]
fn a_tampered_narinfo_is_refused_by_nix() {
    let top = nix::build_closure("tampered", 1, 0);
    let key = SecretKey::generate("k-1").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let url = copy_to_file_cache(&top, cache.path(), "zstd");
    resign(cache.path(), &key);
    // Drop a reference after signing: the fingerprint no longer matches the signature.
    let file = cache.path().join(format!("{}.narinfo", top.hash_part()));
    let mut n = NarInfo::parse(&fs::read_to_string(&file).unwrap()).unwrap();
    n.references.pop();
    fs::write(&file, n.to_string()).unwrap();
    let store = TempStore::new();
    let err = nix::run_expecting_failure(&mut store.copy_from(&url, &key.public_key().to_string(), &[&top]));
    assert!(nix::refused_for_signature(&err), "{err}");
}
