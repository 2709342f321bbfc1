//! Tokens: files of `name:token` lines, presented as `Authorization: Bearer <token>` or as the
//! password of HTTP Basic auth (what `nix copy --netrc-file` sends). Comparison is constant time.

use std::path::{Path, PathBuf};

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use subtle::ConstantTimeEq as _;
use thiserror::Error;

/// Why a tokens file is unusable.
#[derive(Debug, Error)]
pub enum TokenFileError {
    /// It could not be read.
    #[error("reading tokens file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `name:token` with both parts non-empty.
    #[error("{path} line {line}: expected \"name:token\"")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Line number, from 1.
        line: usize,
    },
}

/// A set of named tokens.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<(String, Vec<u8>)>,
}

impl Tokens {
    /// Reads a file of `name:token` lines; blank lines and `#` comments are skipped. Removing a
    /// line and restarting the server revokes that token.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenFileError::Read { path: path.to_owned(), source })?;
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(':') {
                Some((name, token)) if !name.is_empty() && !token.is_empty() => {
                    entries.push((name.to_owned(), token.as_bytes().to_vec()))
                }
                _ => {
                    return Err(TokenFileError::Malformed { path: path.to_owned(), line: i + 1 });
                }
            }
        }
        Ok(Tokens { entries })
    }

    /// One token, held in memory: the embedded cache-server of `orchestrator build`.
    pub fn single(name: &str, token: &str) -> Self {
        Tokens { entries: vec![(name.to_owned(), token.as_bytes().to_vec())] }
    }

    /// The name of the token `presented`, if it is one of these.
    pub fn check(&self, presented: &[u8]) -> Option<&str> {
        // Compare against every entry so the time taken does not depend on which one matched.
        let mut found = None;
        for (name, token) in &self.entries {
            if bool::from(token.as_slice().ct_eq(presented)) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// The token a request presents: the Bearer token, or the Basic-auth password.
pub fn presented_token(headers: &HeaderMap) -> Option<Vec<u8>> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(rest.trim().as_bytes().to_vec())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = BASE64.decode(rest.trim()).ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        Some(decoded[colon + 1..].to_vec())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_and_headers() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "# builders\nbuilder-a:s3cret\n\nci:other\n").unwrap();
        let t = Tokens::load(&f).unwrap();
        assert_eq!(t.check(b"s3cret"), Some("builder-a"));
        assert_eq!(t.check(b"other"), Some("ci"));
        assert_eq!(t.check(b"s3cre"), None);
        assert_eq!(t.check(b""), None);

        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert_eq!(presented_token(&h).unwrap(), b"s3cret");
        h.insert(AUTHORIZATION, format!("Basic {}", BASE64.encode("anyone:s3cret")).parse().unwrap());
        assert_eq!(presented_token(&h).unwrap(), b"s3cret");
        h.insert(AUTHORIZATION, "Digest x".parse().unwrap());
        assert_eq!(presented_token(&h), None);

        std::fs::write(&f, "ok:1\nnocolon\n").unwrap();
        assert!(matches!(Tokens::load(&f).unwrap_err(), TokenFileError::Malformed { line: 2, .. }));
    }
}
