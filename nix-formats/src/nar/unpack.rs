//! Unpacking a NAR into a directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::error::NarError;
use super::parser::{NarEvent, NarVisitor, parse_from};

/// Why a NAR could not be unpacked.
#[derive(Debug, Error)]
pub enum UnpackError {
    /// The destination exists already; unpacking never overwrites.
    #[error("{0}: destination already exists")]
    Exists(PathBuf),
    /// The NAR is invalid, or writing a file failed (the error names the file).
    #[error(transparent)]
    Nar(#[from] NarError),
}

struct Unpacker<'a> {
    root: &'a Path,
    file: Option<(File, PathBuf)>,
}

impl Unpacker<'_> {
    fn target(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() { self.root.to_owned() } else { self.root.join(std::ffi::OsStr::from_bytes(rel)) }
    }
}

fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl NarVisitor for Unpacker<'_> {
    fn event(&mut self, event: NarEvent<'_>) -> io::Result<()> {
        match event {
            NarEvent::DirectoryStart { path } => {
                let p = self.target(path);
                fs::create_dir(&p).map_err(|e| named(&p, e))
            }
            NarEvent::DirectoryEnd => Ok(()),
            NarEvent::FileStart { path, executable, .. } => {
                let p = self.target(path);
                let mode = if executable { 0o755 } else { 0o644 };
                let f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&p);
                self.file = Some((f.map_err(|e| named(&p, e))?, p));
                Ok(())
            }
            NarEvent::FileData(data) => {
                let (f, p) = self.file.as_mut().expect("FileData comes between FileStart and FileEnd");
                f.write_all(data).map_err(|e| named(p, e))
            }
            NarEvent::FileEnd => {
                self.file = None;
                Ok(())
            }
            NarEvent::Symlink { path, target } => {
                let p = self.target(path);
                symlink(std::ffi::OsStr::from_bytes(target), &p).map_err(|e| named(&p, e))
            }
        }
    }
}

/// Unpacks the NAR read from `reader` to `dest`, which must not exist yet.
///
/// The parser validates every name before it is used (no `..`, no `/`), and every path is
/// created fresh under `dest`, so a hostile NAR cannot write outside it. On error the partial
/// tree is left for the caller to remove. Returns the NAR's size.
pub fn unpack(reader: impl Read, dest: &Path) -> Result<u64, UnpackError> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(UnpackError::Exists(dest.to_owned()));
    }
    let mut unpacker = Unpacker { root: dest, file: None };
    Ok(parse_from(reader, &mut unpacker)?)
}
