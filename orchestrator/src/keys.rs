//! Writing signing key pairs to disk in Nix's format.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix_formats::signing::{KeyError, PublicKey, SecretKey};
use thiserror::Error;

/// Why a key pair could not be written.
#[derive(Debug, Error)]
pub enum KeygenError {
    /// The key could not be generated (bad name, no randomness).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A key file exists and `--force` was not given.
    #[error(
        "{0} already exists; pass --force to replace it (machines trusting the old key will reject new signatures)"
    )]
    Exists(PathBuf),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Generates a key pair named `name` and writes the secret key (mode 0600) and the public key.
///
/// Without `force` nothing is written if either file exists. With `force` each file is
/// replaced atomically (written beside it, then renamed), so a crash never leaves half a key.
pub fn write_key_pair(
    name: &str,
    secret: &Path,
    public: &Path,
    force: bool,
) -> Result<PublicKey, KeygenError> {
    let key = SecretKey::generate(name)?;
    if !force {
        for p in [secret, public] {
            if fs::symlink_metadata(p).is_ok() {
                return Err(KeygenError::Exists(p.to_owned()));
            }
        }
    }
    write_atomic(secret, key.to_nix_string().as_bytes(), 0o600)?;
    let pk = key.public_key();
    write_atomic(public, pk.to_string().as_bytes(), 0o644)?;
    Ok(pk)
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeygenError> {
    let io_err = |source| KeygenError::Io { path: path.to_owned(), source };
    let file_name = path.file_name().ok_or_else(|| io_err(io::Error::other("not a file path")))?;
    let tmp = path.with_file_name(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_a_pair_nix_can_read_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
        let public = write_key_pair("cache-1", &sk, &pk, false).unwrap();
        let secret_text = fs::read_to_string(&sk).unwrap();
        assert_eq!(SecretKey::parse(&secret_text).unwrap().public_key(), public);
        assert_eq!(PublicKey::parse(&fs::read_to_string(&pk).unwrap()).unwrap(), public);
        assert_eq!(fs::metadata(&sk).unwrap().permissions().mode() & 0o777, 0o600);

        let err = write_key_pair("cache-1", &sk, &dir.path().join("pk2"), false).unwrap_err();
        assert!(matches!(err, KeygenError::Exists(p) if p == sk));
        assert_eq!(fs::read_to_string(&sk).unwrap(), secret_text, "the old key is untouched");
        assert!(!dir.path().join("pk2").exists(), "nothing written when refusing");

        let new = write_key_pair("cache-1", &sk, &pk, true).unwrap();
        assert_ne!(new, public);
        assert_eq!(fs::metadata(&sk).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary files left");
    }
}
