//! ed25519 keys and signatures in Nix's text format.
//!
//! A secret key is `name:base64(64 bytes)` (the 32-byte seed followed by the public key, as
//! libsodium stores it), a public key is `name:base64(32 bytes)`, and a signature is
//! `name:base64(64 bytes)`. The name ties a signature to the key that can check it.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use thiserror::Error;

/// Why a key or signature could not be parsed or made.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    /// No `name:` prefix, or an empty name.
    #[error("{what} has no \"name:\" prefix")]
    MissingName {
        /// "secret key", "public key" or "signature".
        what: &'static str,
    },
    /// The part after the name is not base64.
    #[error("{what} {name:?} is not valid base64")]
    BadBase64 {
        /// "secret key", "public key" or "signature".
        what: &'static str,
        /// The key name.
        name: String,
    },
    /// The decoded bytes have the wrong length.
    #[error("{what} {name:?} has {found} bytes, expected {expected}")]
    WrongLength {
        /// "secret key", "public key" or "signature".
        what: &'static str,
        /// The key name.
        name: String,
        /// The length found.
        found: usize,
        /// The length required.
        expected: usize,
    },
    /// The public half stored in a secret key does not belong to its seed.
    #[error("secret key {0:?} is corrupt: its public half does not match its seed")]
    Inconsistent(String),
    /// The bytes are not a valid ed25519 public key.
    #[error("public key {0:?} is not a valid ed25519 point")]
    InvalidPoint(String),
    /// The system random number generator failed.
    #[error("no randomness available to generate a key: {0}")]
    Random(String),
}

fn split<'a, const N: usize>(what: &'static str, s: &'a str) -> Result<(&'a str, [u8; N]), KeyError> {
    let s = s.trim();
    let (name, b64) = s.split_once(':').ok_or(KeyError::MissingName { what })?;
    if name.is_empty() {
        return Err(KeyError::MissingName { what });
    }
    let bytes = BASE64.decode(b64).map_err(|_| KeyError::BadBase64 { what, name: name.to_owned() })?;
    let found = bytes.len();
    let arr = bytes.try_into().map_err(|_| KeyError::WrongLength {
        what,
        name: name.to_owned(),
        found,
        expected: N,
    })?;
    Ok((name, arr))
}

/// A secret signing key.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Parses `name:base64(seed || public)`, as written by `nix-store --generate-binary-cache-key`.
    /// Surrounding white space (a trailing newline) is ignored.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split::<64>("secret key", s)?;
        let seed: [u8; 32] = bytes[..32].try_into().expect("64 = 32 + 32");
        let key = SigningKey::from_bytes(&seed);
        if key.verifying_key().as_bytes()[..] != bytes[32..] {
            return Err(KeyError::Inconsistent(name.to_owned()));
        }
        Ok(SecretKey { name: name.to_owned(), key })
    }

    /// Generates a new key named `name` from the system's random number generator.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        if name.is_empty() || name.contains(':') {
            return Err(KeyError::MissingName { what: "secret key" });
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SecretKey { name: name.to_owned(), key: SigningKey::from_bytes(&seed) })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey { name: self.name.clone(), key: self.key.verifying_key() }
    }

    /// Signs `message` (for narinfos, the fingerprint).
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature { key_name: self.name.clone(), bytes: self.key.sign(message).to_bytes() }
    }

    /// The key in Nix's text format, with no trailing newline (as Nix writes it).
    pub fn to_nix_string(&self) -> String {
        let mut bytes = [0u8; 64];
        bytes[..32].copy_from_slice(self.key.as_bytes());
        bytes[32..].copy_from_slice(self.key.verifying_key().as_bytes());
        format!("{}:{}", self.name, BASE64.encode(bytes))
    }
}

impl fmt::Debug for SecretKey {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({:?})", self.name)
    }
}

/// A public key, as listed in `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses `name:base64(32 bytes)`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split::<32>("public key", s)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::InvalidPoint(name.to_owned()))?;
        Ok(PublicKey { name: name.to_owned(), key })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True if `sig` is by this key (same name) and valid for `message`.
    pub fn verify(&self, message: &[u8], sig: &Signature) -> bool {
        sig.key_name == self.name
            && self.key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig.bytes)).is_ok()
    }
}

impl fmt::Display for PublicKey {
    /// Nix's text format.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A detached signature with the name of the key that made it.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    key_name: String,
    bytes: [u8; 64],
}

impl Signature {
    /// Parses `name:base64(64 bytes)`, the value of a narinfo `Sig:` line.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split::<64>("signature", s)?;
        Ok(Signature { key_name: name.to_owned(), bytes })
    }

    /// The name of the key that made it.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }
}

impl fmt::Display for Signature {
    /// Nix's text format.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, BASE64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by `nix-store --generate-binary-cache-key test1 sk pk` (Nix 2.8).
    const NIX_SK: &str = include_str!("../tests/fixtures/test1.secret");
    const NIX_PK: &str = include_str!("../tests/fixtures/test1.public");

    #[test]
    fn keys_from_nix_load_and_match() {
        let sk = SecretKey::parse(NIX_SK).unwrap();
        let pk = PublicKey::parse(NIX_PK).unwrap();
        assert_eq!(sk.public_key(), pk);
        assert_eq!(sk.to_nix_string(), NIX_SK.trim());
        assert_eq!(pk.to_string(), NIX_PK.trim());
    }

    #[test]
    fn sign_and_verify() {
        let sk = SecretKey::generate("cache.example-1").unwrap();
        let sig = sk.sign(b"1;/nix/store/x;sha256:0;1;");
        let pk = sk.public_key();
        assert!(pk.verify(b"1;/nix/store/x;sha256:0;1;", &sig));
        assert!(!pk.verify(b"1;/nix/store/y;sha256:0;1;", &sig));
        let other = SecretKey::generate("cache.example-1").unwrap().public_key();
        assert!(!other.verify(b"1;/nix/store/x;sha256:0;1;", &sig));
        let parsed = Signature::parse(&sig.to_string()).unwrap();
        assert_eq!(parsed, sig);
        assert_eq!(SecretKey::parse(&sk.to_nix_string()).unwrap().public_key(), pk);
    }

    #[test]
    fn a_key_of_another_name_never_verifies() {
        let sk = SecretKey::generate("a").unwrap();
        let sig = sk.sign(b"m");
        let renamed = PublicKey::parse(&sk.public_key().to_string().replacen("a:", "b:", 1)).unwrap();
        assert!(!renamed.verify(b"m", &sig));
    }

    #[test]
    fn malformed_keys_are_clear_errors() {
        assert_eq!(PublicKey::parse("nocolon").unwrap_err(), KeyError::MissingName { what: "public key" });
        assert_eq!(PublicKey::parse(":AAAA").unwrap_err(), KeyError::MissingName { what: "public key" });
        assert!(matches!(PublicKey::parse("k:!!!").unwrap_err(), KeyError::BadBase64 { .. }));
        assert!(matches!(
            PublicKey::parse("k:AAAA").unwrap_err(),
            KeyError::WrongLength { found: 3, expected: 32, .. }
        ));
        // A secret key whose public half was swapped for another key's.
        let a = SecretKey::generate("k").unwrap().to_nix_string();
        let b = SecretKey::generate("k").unwrap().to_nix_string();
        let mut bytes = BASE64.decode(&a[2..]).unwrap();
        bytes[32..].copy_from_slice(&BASE64.decode(&b[2..]).unwrap()[32..]);
        let forged = format!("k:{}", BASE64.encode(bytes));
        assert_eq!(SecretKey::parse(&forged).unwrap_err(), KeyError::Inconsistent("k".into()));
        assert!(format!("{:?}", SecretKey::parse(&a).unwrap()).find(&a[2..]).is_none());
    }
}
