//! `.narinfo` files: the metadata of one store path in a binary cache.
//!
//! Serialisation follows the field order of Nix's own writer, so a narinfo written by
//! `nix copy --to` parses and serialises back to the same bytes. Quirks of narinfos found in
//! the wild are accepted by name:
//!
//! - `Deriver: unknown-deriver` (written by old tools) means "no deriver".
//! - Unknown keys are kept, in order, and written after the known ones (but never published:
//!   see [`NarInfo::into_published`]).
//! - A missing `Compression:` means `bzip2`, as in Nix; it stays missing when serialised.
//! - Blank lines are skipped; the last line may lack its newline.
//!
//! Lines are split as Nix splits them: the key is everything before the first `:`, the value
//! everything after the `": "` that must follow it. A line Nix would read differently (no
//! space after the colon) is refused rather than read another way.

use std::fmt::{self, Write as _};

use thiserror::Error;

use crate::content_address::{ContentAddress, ContentAddressError};
use crate::hash::{Hash, HashError};
use crate::signing::{KeyError, PublicKey, SecretKey, Signature};
use crate::store_path::{StorePath, StorePathError};

/// The compression of a NAR file in a cache, as named in `Compression:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// `none`: the file is the NAR.
    None,
    /// `xz`, Nix's default for `nix copy --to`.
    Xz,
    /// `zstd`, what fleetcache writes.
    Zstd,
    /// `bzip2`, what Nix assumes when the field is missing.
    Bzip2,
    /// `br` (brotli).
    Brotli,
}

impl Compression {
    /// Parses a `Compression:` value.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "none" => Compression::None,
            "xz" => Compression::Xz,
            "zstd" => Compression::Zstd,
            "bzip2" => Compression::Bzip2,
            "br" => Compression::Brotli,
            _ => return None,
        })
    }

    /// The `Compression:` value.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Brotli => "br",
        }
    }

    /// The file name extension Nix gives NARs with this compression (after `.nar`).
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
            Compression::Bzip2 => ".bz2",
            Compression::Brotli => ".br",
        }
    }

    /// The compression a NAR file name says, from its extension (`x.nar.zst` is zstd).
    pub fn from_file_name(name: &str) -> Option<Self> {
        let ext = &name[name.find(".nar")? + 4..];
        [Compression::None, Compression::Xz, Compression::Zstd, Compression::Bzip2, Compression::Brotli]
            .into_iter()
            .find(|c| c.extension() == ext)
    }
}

/// A problem with one line of a narinfo.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LineError {
    /// The line is not `Key: value`.
    #[error("expected \"Key: value\"")]
    NotKeyValue,
    /// A key that may appear once appears again.
    #[error("duplicate {0} field")]
    Duplicate(String),
    /// A store path (StorePath, References, Deriver) is invalid.
    #[error(transparent)]
    StorePath(#[from] StorePathError),
    /// A hash (NarHash, FileHash) is invalid.
    #[error(transparent)]
    Hash(#[from] HashError),
    /// A size (NarSize, FileSize) is not a number.
    #[error("{0:?} is not a size in bytes")]
    BadNumber(String),
    /// A `Sig:` value is not `name:base64(64 bytes)`.
    #[error(transparent)]
    Signature(#[from] KeyError),
    /// A field that must not be empty is empty.
    #[error("empty value")]
    Empty,
    /// `CA:` is not a content address.
    #[error(transparent)]
    ContentAddress(#[from] ContentAddressError),
    /// A control character, which no field may hold.
    #[error("control character in the value")]
    Control,
}

/// Why a narinfo could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NarInfoError {
    /// The text is not UTF-8.
    #[error("narinfo is not valid UTF-8")]
    NotUtf8,
    /// A malformed line; `line` counts from 1.
    #[error("narinfo line {line} ({text:?}): {error}")]
    Line {
        /// The line number, from 1.
        line: usize,
        /// The line, shortened.
        text: String,
        /// What is wrong with it.
        error: LineError,
    },
    /// A required field (StorePath, URL, NarHash, NarSize) is missing.
    #[error("narinfo has no {0} field")]
    Missing(&'static str),
    /// `NarSize: 0`: no NAR is empty, and Nix refuses it too.
    #[error("narinfo has NarSize 0")]
    ZeroNarSize,
}

/// The parsed contents of a `.narinfo` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// The store path described.
    pub store_path: StorePath,
    /// Where the (compressed) NAR is, relative to the cache root (`nar/<filehash>.nar.zst`).
    pub url: String,
    /// `zstd`, `xz`, `bzip2`, `br`, `none`, …; `None` when the field is absent (Nix reads bzip2).
    pub compression: Option<String>,
    /// SHA-256 of the compressed file.
    pub file_hash: Option<Hash>,
    /// Size of the compressed file.
    pub file_size: Option<u64>,
    /// SHA-256 of the uncompressed NAR.
    pub nar_hash: Hash,
    /// Size of the uncompressed NAR.
    pub nar_size: u64,
    /// Store paths this path refers to (may include itself).
    pub references: Vec<StorePath>,
    /// The derivation that built it.
    pub deriver: Option<StorePath>,
    /// The deprecated `System:` field, kept when present.
    pub system: Option<String>,
    /// Signatures over [`NarInfo::fingerprint`].
    pub signatures: Vec<Signature>,
    /// Content address (`fixed:r:sha256:…`, `text:sha256:…`) for content-addressed paths.
    pub ca: Option<ContentAddress>,
    /// Keys this parser does not know, with their values, in file order.
    pub unknown: Vec<(String, String)>,
}

fn shorten(line: &str) -> String {
    match line.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_owned(),
    }
}

fn set_once<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), LineError> {
    if slot.is_some() {
        return Err(LineError::Duplicate(key.to_owned()));
    }
    *slot = Some(value);
    Ok(())
}

fn number(v: &str) -> Result<u64, LineError> {
    v.parse().map_err(|_| LineError::BadNumber(v.to_owned()))
}

fn non_empty(v: &str) -> Result<String, LineError> {
    if v.is_empty() { Err(LineError::Empty) } else { Ok(v.to_owned()) }
}

#[derive(Default)]
struct Fields {
    store_path: Option<StorePath>,
    url: Option<String>,
    compression: Option<String>,
    file_hash: Option<Hash>,
    file_size: Option<u64>,
    nar_hash: Option<Hash>,
    nar_size: Option<u64>,
    references: Option<Vec<StorePath>>,
    deriver: Option<Option<StorePath>>,
    system: Option<String>,
    signatures: Vec<Signature>,
    ca: Option<ContentAddress>,
    unknown: Vec<(String, String)>,
}

impl Fields {
    fn line(&mut self, key: &str, v: &str) -> Result<(), LineError> {
        match key {
            "StorePath" => set_once(&mut self.store_path, key, StorePath::from_absolute(v)?),
            "URL" => set_once(&mut self.url, key, non_empty(v)?),
            "Compression" => set_once(&mut self.compression, key, non_empty(v)?),
            "FileHash" => set_once(&mut self.file_hash, key, Hash::parse_sha256(v)?),
            "FileSize" => set_once(&mut self.file_size, key, number(v)?),
            "NarHash" => set_once(&mut self.nar_hash, key, Hash::parse_sha256(v)?),
            "NarSize" => set_once(&mut self.nar_size, key, number(v)?),
            "References" => {
                let refs = v.split_whitespace().map(StorePath::from_base_name).collect::<Result<_, _>>()?;
                set_once(&mut self.references, key, refs)
            }
            "Deriver" => {
                let d = if v == "unknown-deriver" { None } else { Some(StorePath::from_base_name(v)?) };
                set_once(&mut self.deriver, key, d)
            }
            "System" => set_once(&mut self.system, key, non_empty(v)?),
            "Sig" => {
                self.signatures.push(Signature::parse(v)?);
                Ok(())
            }
            "CA" => set_once(&mut self.ca, key, ContentAddress::parse(v)?),
            _ => {
                self.unknown.push((key.to_owned(), v.to_owned()));
                Ok(())
            }
        }
    }
}

impl NarInfo {
    /// Parses a narinfo from bytes.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, NarInfoError> {
        Self::parse(std::str::from_utf8(bytes).map_err(|_| NarInfoError::NotUtf8)?)
    }

    /// Parses a narinfo.
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        let mut f = Fields::default();
        for (i, line) in text.split('\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let bad = |error| NarInfoError::Line { line: i + 1, text: shorten(line), error };
            // Nix: the key is what precedes the first ':', the value what follows the two
            // characters after it. Anything but ": " there would be read differently by us.
            let (key, rest) = line.split_once(':').ok_or_else(|| bad(LineError::NotKeyValue))?;
            let value = match rest.strip_prefix(' ') {
                Some(v) => v,
                // `References:` with nothing after it, as some writers trim the space.
                None if rest.is_empty() => "",
                None => return Err(bad(LineError::NotKeyValue)),
            };
            if key.is_empty() || key.contains(|c: char| c.is_whitespace() || c.is_control()) {
                return Err(bad(LineError::NotKeyValue));
            }
            if value.contains(|c: char| c.is_control()) {
                return Err(bad(LineError::Control));
            }
            f.line(key, value).map_err(bad)?;
        }
        let nar_size = f.nar_size.ok_or(NarInfoError::Missing("NarSize"))?;
        if nar_size == 0 {
            return Err(NarInfoError::ZeroNarSize);
        }
        Ok(NarInfo {
            store_path: f.store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url: f.url.ok_or(NarInfoError::Missing("URL"))?,
            compression: f.compression,
            file_hash: f.file_hash,
            file_size: f.file_size,
            nar_hash: f.nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size,
            references: f.references.unwrap_or_default(),
            deriver: f.deriver.flatten(),
            system: f.system,
            signatures: f.signatures,
            ca: f.ca,
            unknown: f.unknown,
        })
    }

    /// The string signatures cover:
    /// `1;<store path>;<NarHash as sha256:nix32>;<NarSize>;<sorted, comma-joined full references>`.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.store_path, &self.nar_hash, self.nar_size, &self.references)
    }

    /// Adds a signature by `key`, replacing an earlier one by a key of the same name.
    pub fn sign(&mut self, key: &SecretKey) {
        let sig = key.sign(self.fingerprint().as_bytes());
        self.signatures.retain(|s| s.key_name() != key.name());
        self.signatures.push(sig);
    }

    /// True if some signature verifies with one of `keys`.
    pub fn is_signed_by_any(&self, keys: &[PublicKey]) -> bool {
        let fp = self.fingerprint();
        self.signatures.iter().any(|s| keys.iter().any(|k| k.verify(fp.as_bytes(), s)))
    }

    /// The compression named, with Nix's default (bzip2) when the field is missing; `None` for a
    /// name Nix does not know.
    pub fn compression(&self) -> Option<Compression> {
        Compression::from_name(self.compression.as_deref().unwrap_or("bzip2"))
    }

    /// The file name of this path's narinfo in a cache: `<hash>.narinfo`.
    pub fn file_name(&self) -> String {
        format!("{}.narinfo", self.store_path.hash_part())
    }

    /// The narinfo a cache publishes for these fields, before it signs it: only the fields
    /// Nix reads and the cache has checked or set. References are deduplicated and sorted (Nix
    /// keeps them as a set, so its fingerprint has each once); `System:`, signatures and keys
    /// this parser does not know are dropped, so nothing a client sent unchecked is echoed.
    pub fn into_published(mut self) -> NarInfo {
        self.references.sort();
        self.references.dedup();
        self.system = None;
        self.signatures.clear();
        self.unknown.clear();
        self
    }
}

/// The fingerprint of a store path's metadata (see [`NarInfo::fingerprint`]): references as
/// the set Nix keeps them in, sorted, each once.
pub fn fingerprint(path: &StorePath, nar_hash: &Hash, nar_size: u64, references: &[StorePath]) -> String {
    let mut refs: Vec<String> = references.iter().map(StorePath::to_absolute).collect();
    refs.sort();
    refs.dedup();
    format!("1;{path};{};{nar_size};{}", nar_hash.to_nix32_prefixed(), refs.join(","))
}

impl fmt::Display for NarInfo {
    /// The narinfo text, fields in the order Nix writes them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(512);
        writeln!(s, "StorePath: {}", self.store_path)?;
        writeln!(s, "URL: {}", self.url)?;
        if let Some(c) = &self.compression {
            writeln!(s, "Compression: {c}")?;
        }
        if let Some(h) = &self.file_hash {
            writeln!(s, "FileHash: {}", h.to_nix32_prefixed())?;
        }
        if let Some(n) = self.file_size {
            writeln!(s, "FileSize: {n}")?;
        }
        writeln!(s, "NarHash: {}", self.nar_hash.to_nix32_prefixed())?;
        writeln!(s, "NarSize: {}", self.nar_size)?;
        let refs: Vec<String> = self.references.iter().map(StorePath::base_name).collect();
        writeln!(s, "References: {}", refs.join(" "))?;
        if let Some(d) = &self.deriver {
            writeln!(s, "Deriver: {}", d.base_name())?;
        }
        if let Some(sys) = &self.system {
            writeln!(s, "System: {sys}")?;
        }
        for sig in &self.signatures {
            writeln!(s, "Sig: {sig}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(s, "CA: {ca}")?;
        }
        for (k, v) in &self.unknown {
            writeln!(s, "{k}: {v}")?;
        }
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Written by `nix copy --to file://…` (Nix 2.8) for a path with a reference and a deriver.
    const FROM_NIX: &str = include_str!("../tests/fixtures/with-refs.narinfo");
    const FROM_NIX_CA: &str = include_str!("../tests/fixtures/content-addressed.narinfo");

    #[test]
    fn nix_written_narinfos_round_trip_byte_for_byte() {
        for text in [FROM_NIX, FROM_NIX_CA] {
            let n = NarInfo::parse(text).unwrap();
            assert_eq!(n.to_string(), text);
        }
    }

    #[test]
    fn fields_are_read() {
        let n = NarInfo::parse(FROM_NIX).unwrap();
        assert_eq!(n.compression.as_deref(), Some("xz"));
        assert!(!n.references.is_empty());
        assert!(n.deriver.as_ref().unwrap().is_derivation());
        assert!(n.fingerprint().starts_with(&format!("1;{};sha256:", n.store_path)));
    }

    #[test]
    fn compression_names_and_extensions() {
        let n = NarInfo::parse(FROM_NIX).unwrap();
        assert_eq!(n.compression(), Some(Compression::Xz));
        assert_eq!(Compression::from_file_name(&n.url), Some(Compression::Xz));
        assert_eq!(Compression::from_file_name("nar/abc.nar"), Some(Compression::None));
        assert_eq!(Compression::from_file_name("nar/abc.nar.zst"), Some(Compression::Zstd));
        assert_eq!(Compression::from_file_name("nar/abc.nar.gz"), None);
        assert_eq!(Compression::from_file_name("nar/abc"), None);
        let mut missing = n.clone();
        missing.compression = None;
        assert_eq!(missing.compression(), Some(Compression::Bzip2));
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let text = FROM_NIX.replacen("NarSize: ", "NarSize: x", 1);
        let err = NarInfo::parse(&text).unwrap_err();
        assert!(matches!(err, NarInfoError::Line { line: 7, error: LineError::BadNumber(_), .. }), "{err}");
        let text = format!("{FROM_NIX}garbage\n");
        assert!(matches!(
            NarInfo::parse(&text).unwrap_err(),
            NarInfoError::Line { error: LineError::NotKeyValue, .. }
        ));
        let text = format!("{FROM_NIX}StorePath: {}\n", NarInfo::parse(FROM_NIX).unwrap().store_path);
        assert!(matches!(
            NarInfo::parse(&text).unwrap_err(),
            NarInfoError::Line { error: LineError::Duplicate(_), .. }
        ));
        let text = FROM_NIX.replacen("References: ", "References: ../../etc/passwd ", 1);
        assert!(matches!(
            NarInfo::parse(&text).unwrap_err(),
            NarInfoError::Line { error: LineError::StorePath(_), .. }
        ));
        let text: String =
            FROM_NIX.lines().filter(|l| !l.starts_with("NarHash")).map(|l| format!("{l}\n")).collect();
        assert_eq!(NarInfo::parse(&text).unwrap_err(), NarInfoError::Missing("NarHash"));
        assert_eq!(NarInfo::parse_bytes(b"\xff").unwrap_err(), NarInfoError::NotUtf8);
    }

    #[test]
    fn named_quirks_are_accepted() {
        let n = NarInfo::parse(FROM_NIX).unwrap();
        let d = n.deriver.as_ref().unwrap().base_name();
        let text = FROM_NIX.replacen(&d, "unknown-deriver", 1).replacen("References: ", "References:", 1);
        let text = text.replacen("References:", "References: ", 1).replacen("Compression: xz\n", "", 1);
        let q = NarInfo::parse(&format!("{text}\nX-Custom: kept\n")).unwrap();
        assert_eq!(q.deriver, None);
        assert_eq!(q.compression, None);
        assert_eq!(q.unknown, vec![("X-Custom".to_owned(), "kept".to_owned())]);
        assert!(q.to_string().ends_with("X-Custom: kept\n"));
        let no_refs = "StorePath: /nix/store/xn8dpmm67grflgfcrf021vfc6gln5s1h-t1\nURL: nar/a.nar\nNarHash: sha256:153ik7fml6aryb3vabgpswh6cj2ckq1339gwyw6xc1yawm62zq6z\nNarSize: 648\nReferences:";
        assert!(NarInfo::parse(no_refs).unwrap().references.is_empty());
    }

    #[test]
    fn lines_nix_would_read_differently_are_refused() {
        let n = NarInfo::parse(FROM_NIX).unwrap();
        let nar_hash = n.nar_hash.to_nix32_prefixed();
        // Nix takes the key up to the first ':' and skips the next character whatever it is:
        // it would read these as NarHash, StorePath and URL lines.
        for line in [
            format!("NarHash:X{nar_hash}"),
            format!("StorePath:/{}", n.store_path),
            "URL:Xnar/elsewhere.nar".to_owned(),
            "X-Key:value".to_owned(),
        ] {
            let err = NarInfo::parse(&format!("{FROM_NIX}{line}\n")).unwrap_err();
            assert!(matches!(err, NarInfoError::Line { error: LineError::NotKeyValue, .. }), "{line}: {err}");
        }
        // No field holds a control character (a `\r` would end a line for some readers).
        let err = NarInfo::parse(&FROM_NIX.replacen("Compression: xz", "Compression: xz\r", 1)).unwrap_err();
        assert!(matches!(err, NarInfoError::Line { error: LineError::Control, .. }), "{err}");
        let err = NarInfo::parse(&format!("{FROM_NIX}CA: garbage\n")).unwrap_err();
        assert!(matches!(err, NarInfoError::Line { error: LineError::ContentAddress(_), .. }), "{err}");
    }

    #[test]
    fn published_narinfos_hold_only_what_was_checked() {
        let n = NarInfo::parse(FROM_NIX).unwrap();
        let dup = n.references[0].base_name();
        let text = FROM_NIX.replacen("References: ", &format!("References: {dup} "), 1);
        let mut wild = NarInfo::parse(&format!("{text}System: x86_64-linux\nX-Custom: echo me\n")).unwrap();
        wild.sign(&SecretKey::generate("client").unwrap());
        // A duplicate reference does not change the fingerprint: Nix keeps references as a set.
        assert_eq!(wild.fingerprint(), n.fingerprint());
        let published = wild.into_published();
        assert_eq!(published.references, n.references);
        assert_eq!((published.system.as_deref(), published.signatures.len()), (None, 0));
        assert!(published.unknown.is_empty());
        assert!(!published.to_string().contains("X-Custom"));
    }

    #[test]
    fn signing_replaces_own_signature_and_keeps_others() {
        let mut n = NarInfo::parse(FROM_NIX).unwrap();
        let a = SecretKey::generate("a").unwrap();
        let b = SecretKey::generate("b").unwrap();
        n.sign(&a);
        n.sign(&b);
        n.sign(&a);
        assert_eq!(n.signatures.len(), 2);
        assert!(n.is_signed_by_any(&[a.public_key()]));
        assert!(n.is_signed_by_any(&[b.public_key()]));
        let reparsed = NarInfo::parse(&n.to_string()).unwrap();
        assert!(reparsed.is_signed_by_any(&[a.public_key()]));
        let mut tampered = reparsed.clone();
        tampered.nar_size += 1;
        assert!(!tampered.is_signed_by_any(&[a.public_key(), b.public_key()]));
    }

    fn arb_path() -> impl Strategy<Value = StorePath> {
        ("[0-9a-df-np-sv-z]{32}", "[a-z0-9][a-zA-Z0-9+._-]{0,30}")
            .prop_map(|(h, n)| StorePath::from_base_name(&format!("{h}-{n}")).unwrap())
    }

    proptest! {
        #[test]
        fn any_narinfo_round_trips(
            path in arb_path(),
            refs in proptest::collection::btree_set(arb_path(), 0..6),
            deriver in proptest::option::of(arb_path()),
            nar in any::<[u8; 32]>(),
            file in proptest::option::of(any::<[u8; 32]>()),
            nar_size in 1u64..u64::MAX,
            ca in proptest::option::of(any::<[u8; 32]>().prop_map(|h| ContentAddress {
                method: crate::content_address::Method::Recursive,
                hash: Hash::sha256(h),
            })),
        ) {
            let mut n = NarInfo {
                url: format!("nar/{}.nar.zst", path.hash_part()),
                store_path: path,
                compression: Some("zstd".into()),
                file_hash: file.map(Hash::sha256),
                file_size: file.map(|_| 7),
                nar_hash: Hash::sha256(nar),
                nar_size,
                references: refs.into_iter().collect(),
                deriver,
                system: None,
                signatures: vec![],
                ca,
                unknown: vec![],
            };
            n.sign(&SecretKey::generate("k").unwrap());
            let text = n.to_string();
            let back = NarInfo::parse(&text).unwrap();
            prop_assert_eq!(&back, &n);
            prop_assert_eq!(back.to_string(), text);
        }
    }
}
