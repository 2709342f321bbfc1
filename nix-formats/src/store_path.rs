//! Store paths: `/nix/store/<32 nix32 chars>-<name>`.

use std::fmt;

use thiserror::Error;

use crate::nixbase32;

/// The store directory every path in a fleetcache cache lives in.
pub const STORE_DIR: &str = "/nix/store";

/// Length of the hash part of a store path's base name.
pub const HASH_LEN: usize = 32;

/// Longest name Nix allows after the hash and dash.
pub const MAX_NAME_LEN: usize = 211;

/// Why a string is not a valid store path.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    /// The path does not start with `/nix/store/`.
    #[error("{0:?} is not in the store directory {STORE_DIR}")]
    NotInStore(String),
    /// The base name is shorter than a hash, a dash and one name character.
    #[error("store path base name {0:?} is too short")]
    TooShort(String),
    /// The hash part has characters outside the nix32 alphabet.
    #[error("store path base name {0:?} has an invalid hash part")]
    BadHash(String),
    /// The character after the hash is not `-`.
    #[error("store path base name {0:?} has no '-' after the hash")]
    NoDash(String),
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("store path name is {0} characters long, the limit is {MAX_NAME_LEN}")]
    NameTooLong(usize),
    /// The name starts with a `.`.
    #[error("store path name {0:?} starts with '.'")]
    LeadingDot(String),
    /// The name has a character outside `[A-Za-z0-9+-._?=]`.
    #[error("store path name {name:?} has the invalid character {bad:?}")]
    BadNameChar {
        /// The whole name.
        name: String,
        /// The first invalid character.
        bad: char,
    },
}

/// A valid store path, held as its base name's parts.
///
/// Ordering is that of the base names (hash first), which is also the order Nix sorts
/// references in.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    hash: [u8; HASH_LEN],
    name: String,
}

impl StorePath {
    /// Parses a full path, `/nix/store/<hash>-<name>`, with nothing after the name.
    pub fn from_absolute(path: &str) -> Result<Self, StorePathError> {
        let base = path
            .strip_prefix(STORE_DIR)
            .and_then(|p| p.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_owned()))?;
        Self::from_base_name(base)
    }

    /// Parses a base name, `<hash>-<name>`.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        if base.len() < HASH_LEN + 2 {
            return Err(StorePathError::TooShort(base.to_owned()));
        }
        // Check the bytes before splitting: the split point must not fall inside a UTF-8
        // character (found by the narinfo fuzz target).
        if !base.as_bytes()[..HASH_LEN].iter().all(|&c| nixbase32::ALPHABET.contains(&c)) {
            return Err(StorePathError::BadHash(base.to_owned()));
        }
        let (hash, rest) = base.split_at(HASH_LEN);
        let name = rest.strip_prefix('-').ok_or_else(|| StorePathError::NoDash(base.to_owned()))?;
        validate_name(name)?;
        Ok(StorePath { hash: hash.as_bytes().try_into().expect("split at HASH_LEN"), name: name.to_owned() })
    }

    /// Parses either a full path or a base name.
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        if s.starts_with('/') { Self::from_absolute(s) } else { Self::from_base_name(s) }
    }

    /// The 32-character nix32 hash part, which names the `.narinfo` file.
    pub fn hash_part(&self) -> &str {
        std::str::from_utf8(&self.hash).expect("validated as nix32")
    }

    /// The name after the dash.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash_part(), self.name)
    }

    /// `/nix/store/<hash>-<name>`.
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}-{}", self.hash_part(), self.name)
    }

    /// True for derivation files (`.drv`).
    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(".drv")
    }
}

/// Checks a store path name against Nix's rules.
pub fn validate_name(name: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::TooShort(name.to_owned()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong(name.len()));
    }
    if name.starts_with('.') {
        return Err(StorePathError::LeadingDot(name.to_owned()));
    }
    if let Some(bad) = name.chars().find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c))) {
        return Err(StorePathError::BadNameChar { name: name.to_owned(), bad });
    }
    Ok(())
}

/// True if `s` is a valid 32-character store path hash part (as in `<hash>.narinfo`).
pub fn is_hash_part(s: &str) -> bool {
    s.len() == HASH_LEN && nixbase32::is_nix32(s)
}

impl fmt::Display for StorePath {
    /// The full path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash_part(), self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl std::str::FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StorePath::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: &str = "/nix/store/xn8dpmm67grflgfcrf021vfc6gln5s1h-t1";

    #[test]
    fn parses_full_paths_and_base_names() {
        let p = StorePath::parse(P).unwrap();
        assert_eq!(p.hash_part(), "xn8dpmm67grflgfcrf021vfc6gln5s1h");
        assert_eq!(p.name(), "t1");
        assert_eq!(p.to_string(), P);
        assert_eq!(StorePath::parse(&p.base_name()).unwrap(), p);
    }

    #[test]
    fn rejects_what_nix_rejects() {
        let h = "xn8dpmm67grflgfcrf021vfc6gln5s1h";
        let err = |s: &str| StorePath::parse(s).unwrap_err();
        assert!(matches!(err("/usr/bin/x"), StorePathError::NotInStore(_)));
        assert!(matches!(
            err("/nix/storexn8dpmm67grflgfcrf021vfc6gln5s1h-t1"),
            StorePathError::NotInStore(_)
        ));
        assert!(matches!(err(&format!("{h}-")), StorePathError::TooShort(_)));
        assert!(matches!(err("en8dpmm67grflgfcrf021vfc6gln5s1h-t1"), StorePathError::BadHash(_)));
        assert!(matches!(err(&format!("{h}_t1")), StorePathError::NoDash(_)));
        assert!(matches!(err(&format!("{h}-.hidden")), StorePathError::LeadingDot(_)));
        assert!(matches!(err(&format!("{h}-a/b")), StorePathError::BadNameChar { bad: '/', .. }));
        assert!(matches!(err(&format!("{h}-a b")), StorePathError::BadNameChar { bad: ' ', .. }));
        assert!(matches!(err(&format!("{h}-é")), StorePathError::BadNameChar { bad: 'é', .. }));
        assert!(matches!(err(&format!("{h}-{}", "a".repeat(212))), StorePathError::NameTooLong(212)));
        assert!(StorePath::parse(&format!("{h}-{}", "a".repeat(211))).is_ok());
        assert!(StorePath::parse(&format!("{h}-a+b-c.d_e?f=g")).is_ok());
    }

    #[test]
    fn orders_like_base_names() {
        let a = StorePath::parse("/nix/store/00000000000000000000000000000000-zzz").unwrap();
        let b = StorePath::parse("/nix/store/00000000000000000000000000000001-aaa").unwrap();
        assert!(a < b);
    }

    proptest! {
        #[test]
        fn valid_names_round_trip(hash in "[0-9a-df-np-sv-z]{32}", name in "[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,210}") {
            let p = StorePath::parse(&format!("/nix/store/{hash}-{name}")).unwrap();
            prop_assert_eq!(p.name(), name.as_str());
            prop_assert_eq!(StorePath::parse(&p.to_string()).unwrap(), p);
        }
    }
}
