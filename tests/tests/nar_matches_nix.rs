//! Our NAR writer and reader against the real `nix-store --dump` and `--restore`, byte for byte.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Stdio;

use fleetcache_tests::nix;
use nix_formats::hash::HashingWriter;
use nix_formats::nar::{self, NarParser, dump_path, unpack};
use proptest::prelude::*;

fn nix_dump(path: &Path) -> Vec<u8> {
    let out = nix::command("nix-store").arg("--dump").arg(path).output().expect("run nix-store");
    assert!(out.status.success(), "nix-store --dump failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn nix_restore(nar: &[u8], dest: &Path) {
    use std::io::Write as _;
    let mut child = nix::command("nix-store")
        .arg("--restore")
        .arg(dest)
        .stdin(Stdio::piped())
        .spawn()
        .expect("run nix-store --restore");
    child.stdin.take().unwrap().write_all(nar).unwrap();
    assert!(child.wait().unwrap().success(), "nix-store --restore failed");
}

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Every kind of entry the issue lists, in one tree.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c/d")).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    write(&root.join("empty-file"), b"", 0o644);
    write(&root.join("a/b/c/d/deep"), b"deep\n", 0o644);
    write(&root.join("run.sh"), b"#!/bin/sh\necho ok\n", 0o755);
    write(&root.join("only-owner-exec"), b"x", 0o700);
    write(&root.join("seven"), b"1234567", 0o644);
    write(&root.join("eight"), b"12345678", 0o644);
    write(&root.join("name with spaces"), b"s", 0o644);
    write(&root.join("ünïcødé-名前"), b"u", 0o644);
    write(&root.join("B-upper-sorts-first"), b"B", 0o644);
    symlink("a/b/c/d/deep", root.join("link")).unwrap();
    symlink("/nonexistent/dangling", root.join("dangling")).unwrap();
    symlink("name with spaces", root.join("link to spaces")).unwrap();
}

#[test]
fn every_kind_of_entry_matches_nix_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    make_tree(&root);
    let ours = dump_path(&root, Vec::new()).unwrap();
    assert_eq!(ours, nix_dump(&root));
    // A single file and a single symlink as the root node, too.
    assert_eq!(dump_path(&root.join("run.sh"), Vec::new()).unwrap(), nix_dump(&root.join("run.sh")));
    assert_eq!(dump_path(&root.join("dangling"), Vec::new()).unwrap(), nix_dump(&root.join("dangling")));
}

#[test]
fn nix_and_we_unpack_each_others_archives_identically() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    make_tree(&root);
    let nar = nix_dump(&root);

    let ours = dir.path().join("ours");
    unpack(&nar[..], &ours).unwrap();
    assert_eq!(nix_dump(&ours), nar, "tree unpacked by us, dumped by nix");

    let theirs = dir.path().join("theirs");
    nix_restore(&dump_path(&root, Vec::new()).unwrap(), &theirs);
    assert_eq!(dump_path(&theirs, Vec::new()).unwrap(), nar, "tree restored by nix, dumped by us");
}

/// Streams `nix-store --dump` into a hasher and our parser, without holding it in memory.
fn nix_dump_hash_and_validate(path: &Path) -> (String, u64) {
    let mut child = nix::command("nix-store").arg("--dump").arg(path).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut parser = NarParser::new();
    let mut hasher = HashingWriter::new(io::sink());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        parser.feed(&buf[..n], &mut ()).unwrap();
        io::Write::write_all(&mut hasher, &buf[..n]).unwrap();
    }
    parser.finish().unwrap();
    assert!(child.wait().unwrap().success());
    let (hash, size, _) = hasher.finish();
    (hash.to_nix32_prefixed(), size)
}

#[test]
fn a_file_over_64_mib_matches_nix() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("big");
    fs::create_dir(&root).unwrap();
    let mut f = fs::File::create(root.join("libbig.so")).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for i in 0..65u32 {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (i as usize * 31 + j * 7 + j / 4096) as u8;
        }
        io::Write::write_all(&mut f, &block).unwrap();
    }
    io::Write::write_all(&mut f, b"odd tail").unwrap();
    drop(f);
    let (hash, size, _) = dump_path(&root, HashingWriter::new(io::sink())).unwrap().finish();
    assert!(size > 65 << 20);
    assert_eq!((hash.to_nix32_prefixed(), size), nix_dump_hash_and_validate(&root));
}

#[derive(Debug, Clone)]
enum Node {
    File { exec: bool, data: Vec<u8> },
    Link(String),
    Dir(Vec<(String, Node)>),
}

fn arb_node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..200))
            .prop_map(|(exec, data)| Node::File { exec, data }),
        "[a-zA-Z0-9/._ -]{1,30}".prop_map(Node::Link),
    ];
    leaf.prop_recursive(5, 60, 8, |inner| {
        proptest::collection::btree_map("[a-zA-Z0-9 ._+=é名-]{1,16}", inner, 0..8)
            .prop_map(|m| Node::Dir(m.into_iter().filter(|(k, _)| k != "." && k != "..").collect()))
    })
}

fn create(path: &Path, node: &Node) {
    match node {
        Node::File { exec, data } => write(path, data, if *exec { 0o755 } else { 0o644 }),
        Node::Link(t) => symlink(t, path).unwrap(),
        Node::Dir(entries) => {
            fs::create_dir(path).unwrap();
            for (name, n) in entries {
                create(&path.join(name), n);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_match_nix(node in arb_node()) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        create(&root, &node);
        let theirs = nix_dump(&root);
        prop_assert_eq!(dump_path(&root, Vec::new()).unwrap(), theirs.clone());
        prop_assert_eq!(nar::validate(&theirs[..]).unwrap(), theirs.len() as u64);
        // And the round trip: unpacking Nix's NAR and dumping it again gives the same bytes.
        let again = dir.path().join("again");
        prop_assert_eq!(unpack(&theirs[..], &again).unwrap(), theirs.len() as u64);
        prop_assert_eq!(dump_path(&again, Vec::new()).unwrap(), theirs);
    }
}

fn dir_nar(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut e = nar::NarEncoder::new(Vec::new()).unwrap();
    e.directory_start().unwrap();
    for (name, data) in entries {
        e.entry_start(name).unwrap();
        e.regular(false, data).unwrap();
        e.entry_end().unwrap();
    }
    e.directory_end().unwrap();
    e.finish().unwrap()
}

/// Runs `nix-store --restore` on `nar`; returns the restored tree's directory, or Nix's error.
fn try_nix_restore(nar: &[u8], dir: &Path) -> Result<std::path::PathBuf, String> {
    use std::io::Write as _;
    let dest = dir.join("restored");
    let mut child = nix::command("nix-store")
        .arg("--restore")
        .arg(&dest)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(nar).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() { Ok(dest) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

#[test]
fn what_nix_rejects_we_reject() {
    // What each Nix says: 2.8 first, then what later ones say where it differs (they check the
    // order of entries before creating them).
    let cases: [(&str, Vec<u8>, &[&str]); 4] = [
        (
            "duplicate",
            dir_nar(&[(b"a", b"x"), (b"a", b"y")]),
            &["File exists", "NAR directory is not sorted"],
        ),
        ("dot-dot", dir_nar(&[(b"..", b"x")]), &["invalid file name"]),
        ("slash", dir_nar(&[(b"a/b", b"x")]), &["invalid file name"]),
        ("not a NAR", b"garbage that is not a NAR at all".to_vec(), &["doesn't look like a Nix archive"]),
    ];
    for (what, bad, nix_says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let err = try_nix_restore(&bad, dir.path()).expect_err(what);
        assert!(nix_says.iter().any(|said| err.contains(said)), "{what}: nix said {err}");
        assert!(nar::validate(&bad[..]).is_err(), "{what}: we accepted it");
    }
}

#[test]
fn what_nix_2_8_lets_through_but_is_not_canonical_we_reject() {
    // `nix-store --restore` (2.8) accepts unsorted entries and trailing bytes (later Nix refuses
    // unsorted ones itself). Neither NAR is what `nix-store --dump` gives for the tree it
    // restores to, so its NarHash would not match the path's contents: a cache must refuse them.
    let unsorted = dir_nar(&[(b"b", b"x"), (b"a", b"x")]);
    let mut trailing = dir_nar(&[(b"a", b"x")]);
    trailing.extend_from_slice(&[0; 8]);
    let version = builder::nix::NixVersion::detect().expect("nix --version");
    for (what, bad) in [("unsorted", unsorted), ("trailing bytes", trailing)] {
        let dir = tempfile::tempdir().unwrap();
        match try_nix_restore(&bad, dir.path()) {
            Ok(restored) => {
                assert_ne!(nix_dump(&restored), bad, "{what}: the NAR is not the canonical one for its tree")
            }
            Err(e) if (version.major, version.minor) > (2, 8) => {
                eprintln!("{what}: this Nix refuses it too: {e}")
            }
            Err(e) => panic!("{what}: Nix {version:?} refused it: {e}"),
        }
        assert!(nar::validate(&bad[..]).is_err(), "{what}: we accepted it");
    }
}
