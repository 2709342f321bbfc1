//! Serialising a file system tree into a NAR, streaming, with bounded memory.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{MAGIC, padding, read_some};

/// Why a path could not be serialised.
#[derive(Debug, Error)]
pub enum DumpError {
    /// Reading the file system or writing the output failed.
    #[error("{path}: {source}")]
    Io {
        /// The file being read when it failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A socket, FIFO or device: NAR has no way to say it.
    #[error("{0}: unsupported file type (NAR holds only regular files, symlinks and directories)")]
    UnsupportedType(PathBuf),
    /// A file's size changed while it was being read, so the archive would be wrong.
    #[error("{path}: file changed while being archived (expected {expected} bytes, read {actual})")]
    FileChanged {
        /// The file.
        path: PathBuf,
        /// Size when the entry was started.
        expected: u64,
        /// Bytes actually read.
        actual: u64,
    },
}

/// A low-level NAR token writer; [`dump_path`] drives it from the file system. Use it directly
/// to produce NARs from other sources (tests, synthetic fixtures).
pub struct NarEncoder<W: Write> {
    out: W,
}

const ZEROS: [u8; 8] = [0; 8];

impl<W: Write> NarEncoder<W> {
    /// Starts a NAR on `out` by writing the magic.
    pub fn new(out: W) -> io::Result<Self> {
        let mut e = NarEncoder { out };
        e.str(MAGIC.as_bytes())?;
        Ok(e)
    }

    /// Writes one string token.
    pub fn str(&mut self, s: &[u8]) -> io::Result<()> {
        self.out.write_all(&(s.len() as u64).to_le_bytes())?;
        self.out.write_all(s)?;
        self.out.write_all(&ZEROS[..padding(s.len() as u64) as usize])
    }

    fn strs(&mut self, tokens: &[&str]) -> io::Result<()> {
        tokens.iter().try_for_each(|t| self.str(t.as_bytes()))
    }

    /// Writes a whole regular file node whose contents are in memory.
    pub fn regular(&mut self, executable: bool, contents: &[u8]) -> io::Result<()> {
        self.regular_start(executable, contents.len() as u64)?;
        self.out.write_all(contents)?;
        self.regular_end(contents.len() as u64)
    }

    /// Starts a regular file of `size` bytes; the caller then writes exactly `size` bytes with
    /// [`NarEncoder::contents`] and calls [`NarEncoder::regular_end`].
    pub fn regular_start(&mut self, executable: bool, size: u64) -> io::Result<()> {
        self.strs(&["(", "type", "regular"])?;
        if executable {
            self.strs(&["executable", ""])?;
        }
        self.str(b"contents")?;
        self.out.write_all(&size.to_le_bytes())
    }

    /// Writes part of a regular file's contents.
    pub fn contents(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)
    }

    /// Ends a regular file of `size` bytes.
    pub fn regular_end(&mut self, size: u64) -> io::Result<()> {
        self.out.write_all(&ZEROS[..padding(size) as usize])?;
        self.str(b")")
    }

    /// Writes a symlink node.
    pub fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        self.strs(&["(", "type", "symlink", "target"])?;
        self.str(target)?;
        self.str(b")")
    }

    /// Starts a directory node; follow with entries and [`NarEncoder::directory_end`].
    pub fn directory_start(&mut self) -> io::Result<()> {
        self.strs(&["(", "type", "directory"])
    }

    /// Starts an entry named `name`; follow with one node and [`NarEncoder::entry_end`].
    /// Entries must come in byte order of their names.
    pub fn entry_start(&mut self, name: &[u8]) -> io::Result<()> {
        self.strs(&["entry", "(", "name"])?;
        self.str(name)?;
        self.str(b"node")
    }

    /// Ends an entry.
    pub fn entry_end(&mut self) -> io::Result<()> {
        self.str(b")")
    }

    /// Ends a directory node.
    pub fn directory_end(&mut self) -> io::Result<()> {
        self.str(b")")
    }

    /// Flushes and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Writes the NAR of `path` (a file, symlink or directory, not followed if a symlink) to `out`.
///
/// Memory stays bounded by one read buffer plus one directory listing per level of depth,
/// whatever the size of the files. Returns `out`.
pub fn dump_path<W: Write>(path: &Path, out: W) -> Result<W, DumpError> {
    let io_err = |source| DumpError::Io { path: path.to_owned(), source };
    let mut enc = NarEncoder::new(BufWriter::with_capacity(64 * 1024, out)).map_err(io_err)?;
    let mut buf = vec![0u8; 256 * 1024];
    dump_node(&mut enc, path, &mut buf)?;
    let buffered = enc.finish().map_err(io_err)?;
    buffered.into_inner().map_err(|e| io_err(e.into_error()))
}

fn dump_node<W: Write>(enc: &mut NarEncoder<W>, path: &Path, buf: &mut [u8]) -> Result<(), DumpError> {
    let io_err = |source| DumpError::Io { path: path.to_owned(), source };
    let meta = fs::symlink_metadata(path).map_err(io_err)?;
    let ft = meta.file_type();
    if ft.is_file() {
        let executable = meta.permissions().mode() & 0o100 != 0;
        let size = meta.len();
        let mut file = File::open(path).map_err(io_err)?;
        enc.regular_start(executable, size).map_err(io_err)?;
        let mut done = 0u64;
        loop {
            let n = match read_some(&mut file, buf).map_err(io_err)? {
                0 => break,
                n => n,
            };
            done += n as u64;
            if done > size {
                break;
            }
            enc.contents(&buf[..n]).map_err(io_err)?;
        }
        if done != size {
            return Err(DumpError::FileChanged { path: path.to_owned(), expected: size, actual: done });
        }
        enc.regular_end(size).map_err(io_err)
    } else if ft.is_symlink() {
        let target = fs::read_link(path).map_err(io_err)?;
        enc.symlink(target.as_os_str().as_bytes()).map_err(io_err)
    } else if ft.is_dir() {
        let mut names = fs::read_dir(path)
            .map_err(io_err)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<Vec<_>>>()
            .map_err(io_err)?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        enc.directory_start().map_err(io_err)?;
        for name in names {
            enc.entry_start(name.as_bytes()).map_err(io_err)?;
            dump_node(enc, &path.join(&name), buf)?;
            enc.entry_end().map_err(io_err)?;
        }
        enc.directory_end().map_err(io_err)
    } else {
        Err(DumpError::UnsupportedType(path.to_owned()))
    }
}
