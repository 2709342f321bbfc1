//! Content addresses (`CA:` in a narinfo, `ca` in `nix path-info --json`): how a
//! content-addressed store path's name was computed from its contents.
//!
//! - `text:sha256:<hash>` — a text file added with `builtins.toFile` (always SHA-256);
//! - `fixed:<hash algo>:<hash>` — a flat file (fixed-output derivations with `outputHashMode =
//!   "flat"`);
//! - `fixed:r:<hash algo>:<hash>` — the NAR of a tree (`recursive`, `nix-store --add`);
//! - `fixed:git:<hash algo>:<hash>` — a git tree hash.
//!
//! The hash may be in base16, nix32 or base64, as Nix accepts; it is written back as Nix
//! writes it, in nix32.

use std::fmt;

use thiserror::Error;

use crate::hash::{Hash, HashAlgo, HashError};

/// How the contents were hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `text:`, a text file (its references are part of the name).
    Text,
    /// `fixed:`, a single flat file.
    Flat,
    /// `fixed:r:`, a NAR serialisation.
    Recursive,
    /// `fixed:git:`, a git tree.
    Git,
}

impl Method {
    fn prefix(self) -> &'static str {
        match self {
            Method::Text => "text:",
            Method::Flat => "fixed:",
            Method::Recursive => "fixed:r:",
            Method::Git => "fixed:git:",
        }
    }
}

/// Why a content address could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ContentAddressError {
    /// Not `text:…` or `fixed:…`.
    #[error("{0:?} is not a content address (expected text:… or fixed:…)")]
    Method(String),
    /// The hash after the method is not `algo:digest`.
    #[error("content address {text:?}: {error}")]
    Hash {
        /// The whole value.
        text: String,
        /// What is wrong with the hash.
        error: HashError,
    },
    /// A `text:` address with another hash than SHA-256, which Nix never makes.
    #[error("content address {0:?}: text: addresses are SHA-256")]
    TextNotSha256(String),
}

/// A parsed content address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContentAddress {
    /// How the contents were hashed.
    pub method: Method,
    /// The hash.
    pub hash: Hash,
}

impl ContentAddress {
    /// Parses a content address as Nix writes it (see the module's documentation).
    pub fn parse(text: &str) -> Result<Self, ContentAddressError> {
        let method = [Method::Text, Method::Recursive, Method::Git, Method::Flat]
            .into_iter()
            .find(|m| text.starts_with(m.prefix()))
            .ok_or_else(|| ContentAddressError::Method(text.to_owned()))?;
        let rest = &text[method.prefix().len()..];
        let hash_error = |error| ContentAddressError::Hash { text: text.to_owned(), error };
        // `algo:digest`, never SRI: Nix parses the digest after an explicit algorithm name.
        if !rest.contains(':') {
            return Err(hash_error(HashError::MissingAlgo(rest.to_owned())));
        }
        let hash = Hash::parse(rest).map_err(hash_error)?;
        if method == Method::Text && hash.algo() != HashAlgo::Sha256 {
            return Err(ContentAddressError::TextNotSha256(text.to_owned()));
        }
        Ok(ContentAddress { method, hash })
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.method.prefix(), self.hash.to_nix32_prefixed())
    }
}

impl std::str::FromStr for ContentAddress {
    type Err = ContentAddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ContentAddress::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_nix_writes_round_trips() {
        // From `nix path-info --json` (Nix 2.8 and 2.34) of a path made by `nix-store --add`.
        let nix = "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw";
        let ca = ContentAddress::parse(nix).unwrap();
        assert_eq!(ca.method, Method::Recursive);
        assert_eq!(ca.to_string(), nix);
        let text = "text:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
        assert_eq!(ContentAddress::parse(text).unwrap().to_string(), text);
        let flat = "fixed:sha1:0000000000000000000000000000000000000000";
        let parsed = ContentAddress::parse(flat).unwrap();
        assert_eq!(parsed.method, Method::Flat);
        // Base16 in, nix32 out, as Nix writes it.
        assert_eq!(parsed.to_string(), "fixed:sha1:00000000000000000000000000000000");
        assert_eq!(
            ContentAddress::parse("fixed:git:sha1:0000000000000000000000000000000000000000").unwrap().method,
            Method::Git
        );
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "garbage",
            "",
            "fixed:",
            "fixed:r:",
            "fixed:r:sha256",
            "fixed:r:sha256-BDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=",
            "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dq",
            "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw\nURL: x",
            "fixed:r:crc32:0000",
            "text:sha1:0000000000000000000000000000000000000000",
            "FIXED:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw",
        ] {
            assert!(ContentAddress::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
