//! Tokens: files of `name:token` lines, presented as `Authorization: Bearer <token>` or as the
//! password of HTTP Basic auth (what `nix copy --netrc-file` sends). Comparison is constant time.
//! A [`TokenFile`] is read again whenever it changes, so removing a line revokes that token
//! within a second, without a restart.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime};

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

/// Tokens shorter than this are warned about when a file is read: the README's
/// `head -c 16 /dev/urandom | base64` makes 24 characters.
pub const MIN_TOKEN_LEN: usize = 16;

/// A set of named tokens.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<(String, Vec<u8>)>,
}

impl Tokens {
    /// Reads a file of `name:token` lines; blank lines and `#` comments are skipped, and space
    /// around the name and the token is not part of them (so `name: token` works for every
    /// scheme).
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenFileError::Read { path: path.to_owned(), source })?;
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(':').map(|(n, t)| (n.trim(), t.trim())) {
                Some((name, token)) if !name.is_empty() && !token.is_empty() => {
                    entries.push((name.to_owned(), token.as_bytes().to_vec()))
                }
                _ => {
                    return Err(TokenFileError::Malformed { path: path.to_owned(), line: i + 1 });
                }
            }
        }
        let tokens = Tokens { entries };
        for name in tokens.short() {
            tracing::warn!(
                file = %path.display(),
                name,
                "a token under {MIN_TOKEN_LEN} characters can be guessed: head -c 16 /dev/urandom | base64"
            );
        }
        Ok(tokens)
    }

    /// The names of the tokens shorter than [`MIN_TOKEN_LEN`].
    pub fn short(&self) -> Vec<&str> {
        self.entries.iter().filter(|(_, t)| t.len() < MIN_TOKEN_LEN).map(|(n, _)| n.as_str()).collect()
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

/// How long a token file is trusted before it is looked at again: a removed line revokes its
/// token within this long. Looking at it on every request cost a private cache a quarter of its
/// narinfo requests a second (a `stat` per token file per request, under one lock).
pub const RECHECK_AFTER: Duration = Duration::from_secs(1);

/// A `name:token` file, read again whenever it changes (or a fixed set held in memory).
pub struct TokenFile {
    path: Option<PathBuf>,
    recheck_after: Duration,
    cached: RwLock<Cached>,
}

/// What a [`TokenFile`] last read, and when it last looked.
struct Cached {
    mtime: Option<SystemTime>,
    looked: Instant,
    tokens: Tokens,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl TokenFile {
    /// Reads `path`; an unreadable or malformed file is an error here.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        Self::load_rechecking(path, RECHECK_AFTER)
    }

    fn load_rechecking(path: &Path, recheck_after: Duration) -> Result<Self, TokenFileError> {
        let mtime = modified(path);
        let tokens = Tokens::load(path)?;
        let cached = RwLock::new(Cached { mtime, looked: Instant::now(), tokens });
        Ok(TokenFile { path: Some(path.to_owned()), recheck_after, cached })
    }

    /// Tokens that never change (the embedded cache-server of `orchestrator build`).
    pub fn fixed(tokens: Tokens) -> Self {
        let cached = RwLock::new(Cached { mtime: None, looked: Instant::now(), tokens });
        TokenFile { path: None, recheck_after: Duration::MAX, cached }
    }

    /// The name of the token `presented`, reading the file again if it changed (looked at no
    /// more than once per [`RECHECK_AFTER`]). A file that has become unreadable or malformed
    /// revokes every token until it is fixed (failing closed).
    pub fn check(&self, presented: &[u8]) -> Option<String> {
        {
            let cached = self.cached.read().expect("token cache");
            if self.path.is_none() || cached.looked.elapsed() < self.recheck_after {
                return cached.tokens.check(presented).map(str::to_owned);
            }
        }
        let mut cached = self.cached.write().expect("token cache");
        if let Some(path) = &self.path
            // Another request may have looked while this one waited for the lock.
            && cached.looked.elapsed() >= self.recheck_after
        {
            let mtime = modified(path);
            if mtime != cached.mtime || mtime.is_none() {
                cached.tokens = Tokens::load(path).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "token file unusable: refusing every token until it is fixed");
                    Tokens::default()
                });
                cached.mtime = mtime;
            }
            cached.looked = Instant::now();
        }
        cached.tokens.check(presented).map(str::to_owned)
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

        // `name: token` means the token without the space, whichever way it is presented.
        std::fs::write(&f, "spaced: s3cret \n").unwrap();
        let t = Tokens::load(&f).unwrap();
        h.insert(AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert_eq!(t.check(&presented_token(&h).unwrap()), Some("spaced"));
        h.insert(AUTHORIZATION, format!("Basic {}", BASE64.encode("u:s3cret")).parse().unwrap());
        assert_eq!(t.check(&presented_token(&h).unwrap()), Some("spaced"));
    }

    #[test]
    fn short_tokens_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        let random = "q8Jd0Zr1c2Vn7mYtLx4wKg==";
        let edge = &random[..MIN_TOKEN_LEN];
        std::fs::write(&f, format!("ci:hunter2\nbuilder-1:{random}\nedge:{edge}\n")).unwrap();
        assert_eq!(Tokens::load(&f).unwrap().short(), ["ci"]);
    }

    #[test]
    fn a_removed_line_revokes_and_a_broken_file_revokes_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "a:one\nb:two\n").unwrap();
        let file = TokenFile::load_rechecking(&path, Duration::ZERO).unwrap();
        assert_eq!(file.check(b"two").as_deref(), Some("b"));
        std::fs::write(&path, "a:one\n").unwrap();
        // The modification time moves on every write on any file system we run on, but make
        // sure the test does not depend on its resolution.
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        assert_eq!(file.check(b"two"), None);
        assert_eq!(file.check(b"one").as_deref(), Some("a"));
        std::fs::write(&path, "no colon here\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + Duration::from_secs(5))
            .unwrap();
        assert_eq!(file.check(b"one"), None);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(file.check(b"one"), None);
        assert_eq!(TokenFile::fixed(Tokens::single("x", "t")).check(b"t").as_deref(), Some("x"));
    }

    #[test]
    fn a_file_is_looked_at_again_only_after_the_recheck_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "a:one\n").unwrap();
        let mut file = TokenFile::load_rechecking(&path, Duration::from_secs(3600)).unwrap();
        std::fs::write(&path, "b:two\n").unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        // Within the interval the file is not looked at: what was read holds.
        assert_eq!(file.check(b"one").as_deref(), Some("a"));
        assert_eq!(file.check(b"two"), None);
        // Once it has passed (here: once there is none), the next request sees the change.
        file.recheck_after = Duration::ZERO;
        assert_eq!(file.check(b"one"), None);
        assert_eq!(file.check(b"two").as_deref(), Some("b"));
    }
}
