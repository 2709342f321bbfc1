//! Token files that take effect without a restart: removing a builder's line revokes it on its
//! next request.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use cache_server::auth::{TokenFileError, Tokens};

/// A `name:token` file, read again whenever it changes.
pub struct TokenFile {
    path: PathBuf,
    cached: Mutex<(Option<SystemTime>, Tokens)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl TokenFile {
    /// Reads `path`; an unreadable or malformed file is an error here.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let mtime = modified(path);
        let tokens = Tokens::load(path)?;
        Ok(TokenFile { path: path.to_owned(), cached: Mutex::new((mtime, tokens)) })
    }

    /// The name of the token `presented`, reading the file again if it changed. A file that has
    /// become unreadable or malformed revokes every token until it is fixed (failing closed).
    pub fn check(&self, presented: &[u8]) -> Option<String> {
        let mtime = modified(&self.path);
        let mut cached = self.cached.lock().expect("token cache");
        if mtime != cached.0 || mtime.is_none() {
            let tokens = Tokens::load(&self.path).unwrap_or_else(|e| {
                tracing::error!(error = %e, "token file unusable: refusing every token until it is fixed");
                Tokens::default()
            });
            *cached = (mtime, tokens);
        }
        cached.1.check(presented).map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_line_revokes_at_once_and_a_broken_file_revokes_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "a:one\nb:two\n").unwrap();
        let file = TokenFile::load(&path).unwrap();
        assert_eq!(file.check(b"two").as_deref(), Some("b"));
        std::fs::write(&path, "a:one\n").unwrap();
        // The modification time moves on every write on any file system we run on, but make
        // sure the test does not depend on its resolution.
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        assert_eq!(file.check(b"two"), None);
        assert_eq!(file.check(b"one").as_deref(), Some("a"));
        std::fs::write(&path, "no colon here\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(file.check(b"one"), None);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(file.check(b"one"), None);
    }
}
