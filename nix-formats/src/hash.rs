//! Content hashes in the textual forms Nix reads and writes.
//!
//! Nix prints hashes as `sha256:<nix32>` in narinfos, as SRI (`sha256-<base64>`) in
//! `nix path-info --json`, and accepts base16 too. [`Hash::parse`] takes all of them.

use std::{fmt, io};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::Digest as _;
use thiserror::Error;

use crate::nixbase32;

/// A hash algorithm Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    /// MD5 (only ever parsed, e.g. in old fixed-output derivations).
    Md5,
    /// SHA-1 (only ever parsed).
    Sha1,
    /// SHA-256, the one Nix uses for NARs and files in binary caches.
    Sha256,
    /// SHA-512 (only ever parsed).
    Sha512,
}

impl HashAlgo {
    /// The name Nix prints before the `:` or `-`.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// The digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "md5" => HashAlgo::Md5,
            "sha1" => HashAlgo::Sha1,
            "sha256" => HashAlgo::Sha256,
            "sha512" => HashAlgo::Sha512,
            _ => return None,
        })
    }
}

/// Why a hash string could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    /// No `algo:` or `algo-` prefix.
    #[error("hash {0:?} has no algorithm prefix (expected e.g. \"sha256:\")")]
    MissingAlgo(String),
    /// The prefix names an algorithm Nix does not know.
    #[error("unknown hash algorithm {0:?}")]
    UnknownAlgo(String),
    /// The digest is in none of the encodings Nix accepts for this algorithm.
    #[error("{algo} hash {digest:?} is neither base16, nix32 nor base64 of the right length")]
    BadDigest {
        /// The algorithm the prefix named.
        algo: &'static str,
        /// The part after the prefix.
        digest: String,
    },
    /// A hash of another algorithm was given where only one kind is allowed.
    #[error("expected a {expected} hash, found {found}")]
    WrongAlgo {
        /// The algorithm required here.
        expected: &'static str,
        /// The algorithm found.
        found: &'static str,
    },
}

/// A digest together with its algorithm.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    bytes: [u8; 64],
}

impl Hash {
    /// Wraps a digest; panics if `digest` does not have the algorithm's length.
    pub fn new(algo: HashAlgo, digest: &[u8]) -> Self {
        assert_eq!(digest.len(), algo.digest_len(), "digest length does not match {}", algo.name());
        let mut bytes = [0u8; 64];
        bytes[..digest.len()].copy_from_slice(digest);
        Hash { algo, bytes }
    }

    /// A SHA-256 hash from its 32 bytes.
    pub fn sha256(digest: [u8; 32]) -> Self {
        Hash::new(HashAlgo::Sha256, &digest)
    }

    /// The SHA-256 hash of `data`.
    pub fn sha256_of(data: &[u8]) -> Self {
        Hash::sha256(sha2::Sha256::digest(data).into())
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The raw digest.
    pub fn digest(&self) -> &[u8] {
        &self.bytes[..self.algo.digest_len()]
    }

    /// Parses `algo:digest` (digest in base16, nix32 or base64) or SRI `algo-base64`.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        let (algo_name, digest, sri) = if let Some((a, d)) = s.split_once(':') {
            (a, d, false)
        } else if let Some((a, d)) = s.split_once('-') {
            (a, d, true)
        } else {
            return Err(HashError::MissingAlgo(s.to_owned()));
        };
        let algo =
            HashAlgo::from_name(algo_name).ok_or_else(|| HashError::UnknownAlgo(algo_name.to_owned()))?;
        let bad = || HashError::BadDigest { algo: algo.name(), digest: digest.to_owned() };
        let len = algo.digest_len();
        let bytes = if sri {
            BASE64.decode(digest).map_err(|_| bad())?
        } else if digest.len() == len * 2 {
            decode_hex(digest).ok_or_else(bad)?
        } else if digest.len() == nixbase32::encoded_len(len) {
            nixbase32::decode(digest).map_err(|_| bad())?
        } else {
            BASE64.decode(digest).map_err(|_| bad())?
        };
        if bytes.len() != len {
            return Err(bad());
        }
        Ok(Hash::new(algo, &bytes))
    }

    /// Parses like [`Hash::parse`] and requires SHA-256.
    pub fn parse_sha256(s: &str) -> Result<Self, HashError> {
        let h = Hash::parse(s)?;
        if h.algo != HashAlgo::Sha256 {
            return Err(HashError::WrongAlgo { expected: "sha256", found: h.algo.name() });
        }
        Ok(h)
    }

    /// `sha256:<nix32>`, the form in narinfos and fingerprints. Also what `Display` prints.
    pub fn to_nix32_prefixed(&self) -> String {
        format!("{}:{}", self.algo.name(), nixbase32::encode(self.digest()))
    }

    /// The bare nix32 digest, as in `nar/<filehash>.nar.zst`.
    pub fn to_nix32(&self) -> String {
        nixbase32::encode(self.digest())
    }

    /// The bare lowercase base16 digest.
    pub fn to_base16(&self) -> String {
        self.digest().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `sha256-<base64>`, as in `nix path-info --json`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo.name(), BASE64.encode(self.digest()))
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.chunks(2).map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?)).collect()
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32_prefixed())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

impl std::str::FromStr for Hash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Hash::parse(s)
    }
}

/// A `Write` adapter that computes the SHA-256 and size of everything written through it,
/// passing the bytes on to an inner writer.
pub struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    written: u64,
}

impl<W: io::Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: sha2::Sha256::new(), written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Returns the hash and size of what was written, and the inner writer.
    pub fn finish(self) -> (Hash, u64, W) {
        (Hash::sha256(self.hasher.finalize().into()), self.written, self.inner)
    }
}

impl<W: io::Write> io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    const EMPTY_NIX32: &str = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    const EMPTY_SRI: &str = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
    const EMPTY_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn every_form_nix_prints_parses_to_the_same_hash() {
        let h = Hash::sha256_of(b"");
        assert_eq!(Hash::parse(EMPTY_NIX32).unwrap(), h);
        assert_eq!(Hash::parse(EMPTY_SRI).unwrap(), h);
        assert_eq!(Hash::parse(&format!("sha256:{EMPTY_HEX}")).unwrap(), h);
        assert_eq!(h.to_string(), EMPTY_NIX32);
        assert_eq!(h.to_sri(), EMPTY_SRI);
        assert_eq!(h.to_base16(), EMPTY_HEX);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(matches!(Hash::parse("0mdqa9"), Err(HashError::MissingAlgo(_))));
        assert!(matches!(Hash::parse("sha3:00"), Err(HashError::UnknownAlgo(_))));
        assert!(matches!(Hash::parse("sha256:zz"), Err(HashError::BadDigest { .. })));
        assert!(matches!(
            Hash::parse_sha256("sha1:0000000000000000000000000000000000000000"),
            Err(HashError::WrongAlgo { .. })
        ));
    }

    #[test]
    fn hashing_writer_matches_one_shot_hash() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (h, n, inner) = w.finish();
        assert_eq!(n, 11);
        assert_eq!(inner, b"hello world");
        assert_eq!(h, Hash::sha256_of(b"hello world"));
    }
}
