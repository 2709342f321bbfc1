//! NAR round trips and rejections, without Nix (the comparison with `nix-store --dump` is in
//! the `fleetcache-tests` crate).

use std::fs;
use std::io;
use std::path::Path;

use super::*;

/// Collects events as owned, comparable values.
#[derive(Default)]
struct Events(Vec<String>);

impl NarVisitor for Events {
    fn event(&mut self, e: NarEvent<'_>) -> io::Result<()> {
        let s = match e {
            NarEvent::DirectoryStart { path } => format!("dir {}", String::from_utf8_lossy(path)),
            NarEvent::DirectoryEnd => "end".into(),
            NarEvent::FileStart { path, executable, size, offset } => {
                format!("file {} x={executable} {size}@{offset}", String::from_utf8_lossy(path))
            }
            NarEvent::FileData(d) => format!("data {}", d.len()),
            NarEvent::FileEnd => "fend".into(),
            NarEvent::Symlink { path, target } => {
                format!("link {} -> {}", String::from_utf8_lossy(path), String::from_utf8_lossy(target))
            }
        };
        // Data chunking depends on how the input was split; merge adjacent data events.
        match (self.0.last_mut(), s.strip_prefix("data ")) {
            (Some(last), Some(n)) if last.starts_with("data ") => {
                let total: usize = last[5..].parse::<usize>().unwrap() + n.parse::<usize>().unwrap();
                *last = format!("data {total}");
            }
            _ => self.0.push(s),
        }
        Ok(())
    }
}

fn sample() -> Vec<u8> {
    let mut e = NarEncoder::new(Vec::new()).unwrap();
    e.directory_start().unwrap();
    e.entry_start(b"bin").unwrap();
    e.directory_start().unwrap();
    e.entry_start(b"llama-cli").unwrap();
    e.regular(true, b"#!/bin/sh\necho hi\n").unwrap();
    e.entry_end().unwrap();
    e.directory_end().unwrap();
    e.entry_end().unwrap();
    e.entry_start(b"empty").unwrap();
    e.regular(false, b"").unwrap();
    e.entry_end().unwrap();
    e.entry_start(b"link").unwrap();
    e.symlink(b"bin/llama-cli").unwrap();
    e.entry_end().unwrap();
    e.directory_end().unwrap();
    e.finish().unwrap()
}

fn parse_all(nar: &[u8]) -> Result<Vec<String>, NarError> {
    let mut p = NarParser::new();
    let mut ev = Events::default();
    p.feed(nar, &mut ev)?;
    p.finish()?;
    Ok(ev.0)
}

#[test]
fn events_describe_the_tree() {
    let nar = sample();
    let ev = parse_all(&nar).unwrap();
    assert_eq!(
        ev,
        [
            "dir ",
            "dir bin",
            "file bin/llama-cli x=true 18@408",
            "data 18",
            "fend",
            "end",
            "file empty x=false 0@648",
            "fend",
            "link link -> bin/llama-cli",
            "end"
        ]
    );
    // The offset really is where the contents are.
    assert_eq!(&nar[408..408 + 18], b"#!/bin/sh\necho hi\n");
}

#[test]
fn any_split_of_the_input_gives_the_same_events() {
    let nar = sample();
    let whole = parse_all(&nar).unwrap();
    for chunk in [1, 3, 7, 8, 9, 64] {
        let mut p = NarParser::new();
        let mut ev = Events::default();
        for c in nar.chunks(chunk) {
            p.feed(c, &mut ev).unwrap();
        }
        p.finish().unwrap();
        assert_eq!(ev.0, whole, "chunk size {chunk}");
    }
}

#[test]
fn every_truncation_is_rejected() {
    let nar = sample();
    for len in 0..nar.len() {
        let err = parse_all(&nar[..len]).unwrap_err();
        assert!(
            matches!(err, NarError::Truncated { offset } if offset == len as u64),
            "prefix of {len} bytes: {err}"
        );
    }
}

#[test]
fn trailing_data_is_rejected() {
    let mut nar = sample();
    let end = nar.len() as u64;
    nar.extend_from_slice(&[0; 8]);
    assert!(matches!(parse_all(&nar).unwrap_err(), NarError::TrailingData { offset } if offset == end));
}

fn dir_with(names: &[&[u8]]) -> Vec<u8> {
    let mut e = NarEncoder::new(Vec::new()).unwrap();
    e.directory_start().unwrap();
    for n in names {
        e.entry_start(n).unwrap();
        e.regular(false, b"x").unwrap();
        e.entry_end().unwrap();
    }
    e.directory_end().unwrap();
    e.finish().unwrap()
}

#[test]
fn unsorted_duplicate_and_invalid_names_are_rejected() {
    assert!(parse_all(&dir_with(&[b"a", b"b", b"c"])).is_ok());
    assert!(matches!(parse_all(&dir_with(&[b"b", b"a"])).unwrap_err(), NarError::NotSorted { .. }));
    assert!(matches!(parse_all(&dir_with(&[b"a", b"a"])).unwrap_err(), NarError::DuplicateEntry { .. }));
    // Byte order, not locale order: "B" (0x42) sorts before "a" (0x61).
    assert!(parse_all(&dir_with(&[b"B", b"a"])).is_ok());
    for bad in [&b""[..], b".", b"..", b"a/b", b"../etc", b"a\0b"] {
        let err = parse_all(&dir_with(&[bad])).unwrap_err();
        assert!(matches!(err, NarError::InvalidName { .. }), "{bad:?}: {err}");
    }
}

/// A NAR of directories nested `depth` deep, each named `name`, with a file at the bottom.
fn nested(depth: usize, name: &[u8]) -> Vec<u8> {
    let mut e = NarEncoder::new(Vec::new()).unwrap();
    e.directory_start().unwrap();
    for _ in 0..depth {
        e.entry_start(name).unwrap();
        e.directory_start().unwrap();
    }
    e.entry_start(b"f").unwrap();
    e.regular(false, b"x").unwrap();
    e.entry_end().unwrap();
    for _ in 0..depth {
        e.directory_end().unwrap();
        e.entry_end().unwrap();
    }
    e.directory_end().unwrap();
    e.finish().unwrap()
}

#[test]
fn what_linux_cannot_unpack_is_rejected() {
    let long = |n| vec![b'n'; n];
    assert!(parse_all(&dir_with(&[&long(MAX_NAME_LEN)])).is_ok());
    let err = parse_all(&dir_with(&[&long(MAX_NAME_LEN + 1)])).unwrap_err();
    assert!(matches!(err, NarError::TooLong { what: "entry name", .. }), "{err}");

    // A path within PATH_MAX passes; one deeper than that is refused however short its names.
    let fits = MAX_PATH_LEN / (2 + 1) - 1;
    assert!(parse_all(&nested(fits, b"ab")).is_ok());
    let err = parse_all(&nested(MAX_PATH_LEN, b"a")).unwrap_err();
    assert!(matches!(err, NarError::TooLong { what: "path", .. }), "{err}");

    let mut e = NarEncoder::new(Vec::new()).unwrap();
    e.symlink(&long(MAX_TARGET_LEN + 1)).unwrap();
    let err = parse_all(&e.finish().unwrap()).unwrap_err();
    assert!(matches!(err, NarError::TooLong { what: "symlink target", .. }), "{err}");
}

#[test]
fn structural_errors_are_rejected() {
    let mut bad_magic = sample();
    bad_magic[8] = b'N';
    assert!(matches!(parse_all(&bad_magic).unwrap_err(), NarError::BadMagic));
    assert!(matches!(parse_all(&[0xff; 64]).unwrap_err(), NarError::BadMagic));

    let mut padding = sample();
    // The magic is 13 bytes: bytes 21..24 are its padding.
    padding[22] = 1;
    assert!(matches!(parse_all(&padding).unwrap_err(), NarError::NonZeroPadding { offset: 21 }));

    let mut e = NarEncoder::new(Vec::new()).unwrap();
    for t in ["(", "type", "regular", "executable", "yes"] {
        e.str(t.as_bytes()).unwrap();
    }
    assert!(matches!(parse_all(&e.finish().unwrap()).unwrap_err(), NarError::Unexpected { .. }));

    let mut e = NarEncoder::new(Vec::new()).unwrap();
    for t in ["(", "type", "fifo"] {
        e.str(t.as_bytes()).unwrap();
    }
    let err = parse_all(&e.finish().unwrap()).unwrap_err();
    assert!(err.to_string().contains("expected a node type"), "{err}");

    let mut e = NarEncoder::new(Vec::new()).unwrap();
    e.symlink(b"").unwrap();
    assert!(matches!(parse_all(&e.finish().unwrap()).unwrap_err(), NarError::InvalidSymlinkTarget { .. }));

    let mut huge = NarEncoder::new(Vec::new()).unwrap().finish().unwrap();
    huge.extend_from_slice(&(MAX_TOKEN_LEN + 1).to_le_bytes());
    assert!(matches!(parse_all(&huge).unwrap_err(), NarError::TokenTooLong { .. }));
}

#[test]
fn a_file_padding_must_be_zero() {
    let mut e = NarEncoder::new(Vec::new()).unwrap();
    e.regular(false, b"abc").unwrap();
    let mut nar = e.finish().unwrap();
    let contents_at = nar.windows(3).position(|w| w == b"abc").unwrap();
    nar[contents_at + 4] = 7;
    assert!(matches!(parse_all(&nar).unwrap_err(), NarError::NonZeroPadding { .. }));
}

#[test]
fn unpack_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let err = unpack(&sample()[..], dir.path()).unwrap_err();
    assert!(matches!(err, UnpackError::Exists(_)));
}

#[test]
fn dump_rejects_special_files() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert!(matches!(dump_path(&sock, Vec::new()).unwrap_err(), DumpError::UnsupportedType(_)));
    assert!(matches!(dump_path(&dir.path().join("missing"), Vec::new()).unwrap_err(), DumpError::Io { .. }));
}

/// `nix-store --dump` (Nix 2.8) of a tree with a subdirectory, an executable, a symlink and a
/// UTF-8 name with a space in its directory.
const SAMPLE_FROM_NIX: &[u8] = include_bytes!("../../tests/fixtures/sample.nar");

#[test]
fn a_nar_written_by_nix_unpacks_and_dumps_back_identically() {
    let events = parse_all(SAMPLE_FROM_NIX).unwrap();
    assert!(events.iter().any(|e| e.starts_with("file run x=true 10@")), "{events:?}");
    assert!(events.iter().any(|e| e.starts_with("file sub/a x=false 3@")), "{events:?}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    assert_eq!(unpack(SAMPLE_FROM_NIX, &out).unwrap(), SAMPLE_FROM_NIX.len() as u64);
    assert_eq!(fs::read_link(out.join("link")).unwrap(), Path::new("sub/a"));
    assert_eq!(fs::read(out.join("sub/a")).unwrap(), b"hi\n");
    assert!(fs::metadata(out.join("with space/é")).unwrap().len() == 0);
    assert_eq!(dump_path(&out, Vec::new()).unwrap(), SAMPLE_FROM_NIX);
}

#[test]
fn the_verifier_hashes_what_it_validates() {
    let (hash, size) = NarVerifier::verify_reader(SAMPLE_FROM_NIX).unwrap();
    assert_eq!((hash, size), (crate::Hash::sha256_of(SAMPLE_FROM_NIX), SAMPLE_FROM_NIX.len() as u64));
    let short = &SAMPLE_FROM_NIX[..SAMPLE_FROM_NIX.len() - 8];
    assert!(matches!(NarVerifier::verify_reader(short).unwrap_err(), NarError::Truncated { .. }));
}

/// A NAR of one file of `len` bytes, none zero (so a flipped padding byte is found).
fn big_file_nar(len: usize) -> Vec<u8> {
    let contents: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
    let mut e = NarEncoder::new(Vec::new()).unwrap();
    e.regular(false, &contents).unwrap();
    e.finish().unwrap()
}

/// A reader that fails after `ok` bytes.
struct FailingAfter<'a> {
    data: &'a [u8],
    ok: usize,
}

impl io::Read for FailingAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ok == 0 {
            return Err(io::Error::other("the disk went away"));
        }
        let n = buf.len().min(self.ok).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.ok -= n;
        Ok(n)
    }
}

#[test]
fn the_two_thread_verifier_agrees_with_the_one_thread_one() {
    // Smaller and larger than the chunks checked on the reading thread and handed between the
    // threads after them, and more of those than the queue holds.
    let len = verifier::PIPELINE_CHUNK * (verifier::INLINE_CHUNKS + verifier::PIPELINE_CHUNKS + 3) + 12_345;
    for nar in [SAMPLE_FROM_NIX.to_vec(), big_file_nar(len)] {
        let expected = (crate::Hash::sha256_of(&nar), nar.len() as u64);
        assert_eq!(NarVerifier::verify_reader_on_two_threads(&nar[..]).unwrap(), expected);
        assert_eq!(NarVerifier::verify_reader(&nar[..]).unwrap(), expected);
        let short = &nar[..nar.len() - 8];
        assert!(matches!(
            NarVerifier::verify_reader_on_two_threads(short).unwrap_err(),
            NarError::Truncated { .. }
        ));
    }
    // A bad byte far into a long NAR (the checker stops; the reader is told) and a reader
    // that fails midway each give their own error.
    let mut nar = big_file_nar(len);
    let padding = nar.len() - 16 - 1;
    nar[padding] = 1;
    let err = NarVerifier::verify_reader_on_two_threads(&nar[..]).unwrap_err();
    assert!(matches!(err, NarError::NonZeroPadding { .. }), "{err}");
    for ok in [1000, len / 2, len - 1000] {
        let failing = FailingAfter { data: &nar, ok };
        let err = NarVerifier::verify_reader_on_two_threads(failing).unwrap_err();
        assert!(err.to_string().contains("the disk went away"), "{err}");
    }
}

#[test]
fn the_two_thread_verifier_agrees_around_the_end_of_the_chunks_checked_inline() {
    // A NAR shorter than the chunks checked on the reading thread is checked without the
    // second thread; one that fills them exactly, or passes them, with it.
    let overhead = big_file_nar(0).len();
    let inline = verifier::INLINE_CHUNKS * verifier::PIPELINE_CHUNK;
    for nar_len in [8 * 1024, verifier::PIPELINE_CHUNK, inline - 8, inline, inline + 8] {
        let nar = big_file_nar(nar_len - overhead);
        assert_eq!(nar.len(), nar_len);
        let expected = (crate::Hash::sha256_of(&nar), nar.len() as u64);
        assert_eq!(NarVerifier::verify_reader_on_two_threads(&nar[..]).unwrap(), expected);
        let short = &nar[..nar.len() - 8];
        assert!(matches!(
            NarVerifier::verify_reader_on_two_threads(short).unwrap_err(),
            NarError::Truncated { .. }
        ));
    }
}
