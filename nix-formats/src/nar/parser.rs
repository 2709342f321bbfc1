//! A validating, push-style NAR parser.
//!
//! Feed it bytes in chunks of any size as they arrive (from a socket, a decompressor, a file);
//! it reports the archive's structure to a [`NarVisitor`] and rejects everything the real Nix
//! rejects, plus every non-canonical encoding, so that an accepted NAR is exactly the one
//! `nix-store --dump` would write for the tree it describes, and that Linux can unpack: names,
//! symlink targets and paths within [`MAX_NAME_LEN`], [`MAX_TARGET_LEN`] and [`MAX_PATH_LEN`].
//! Memory is bounded by those, whatever the size of the files and however deep the tree.

use std::io::{self, Read};

use super::error::NarError;
use super::{MAGIC, MAX_NAME_LEN, MAX_PATH_LEN, MAX_TARGET_LEN, MAX_TOKEN_LEN, padding, read_some};

/// What the parser reports, in archive order. Paths are relative to the root, `/`-joined;
/// the root itself is the empty path.
#[derive(Debug, PartialEq, Eq)]
pub enum NarEvent<'a> {
    /// A directory starts; its entries follow until the matching `DirectoryEnd`.
    DirectoryStart {
        /// The directory's path.
        path: &'a [u8],
    },
    /// The innermost open directory ends.
    DirectoryEnd,
    /// A regular file starts; `FileData` events with exactly `size` bytes and `FileEnd` follow.
    FileStart {
        /// The file's path.
        path: &'a [u8],
        /// Whether Nix will make it executable.
        executable: bool,
        /// Its size in bytes.
        size: u64,
        /// Where its contents start in the NAR (the `narOffset` of `.ls` listings).
        offset: u64,
    },
    /// A piece of the current file's contents.
    FileData(&'a [u8]),
    /// The current file ends.
    FileEnd,
    /// A symlink.
    Symlink {
        /// The symlink's path.
        path: &'a [u8],
        /// Where it points.
        target: &'a [u8],
    },
}

/// Receives [`NarEvent`]s. `()` is the visitor that only validates.
pub trait NarVisitor {
    /// Handles one event; an error stops parsing with [`NarError::Visitor`].
    fn event(&mut self, event: NarEvent<'_>) -> io::Result<()>;
}

impl NarVisitor for () {
    fn event(&mut self, _: NarEvent<'_>) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Magic,
    NodeOpen,
    TypeKw,
    TypeVal,
    RegularNext,
    ExecMarker,
    ContentsKw,
    Contents,
    NodeClose,
    TargetKw,
    TargetVal,
    DirNext,
    EntryOpen,
    NameKw,
    NameVal,
    NodeKw,
    EntryClose,
    End,
}

impl Expect {
    fn describe(self) -> &'static str {
        match self {
            Expect::Magic => "the NAR magic",
            Expect::NodeOpen | Expect::EntryOpen => "\"(\"",
            Expect::TypeKw => "\"type\"",
            Expect::TypeVal => "a node type (regular, symlink, directory)",
            Expect::RegularNext => "\"executable\" or \"contents\"",
            Expect::ExecMarker => "an empty executable marker",
            Expect::ContentsKw => "\"contents\"",
            Expect::NodeClose | Expect::EntryClose => "\")\"",
            Expect::TargetKw => "\"target\"",
            Expect::DirNext => "\"entry\" or \")\"",
            Expect::NameKw => "\"name\"",
            Expect::NodeKw => "\"node\"",
            Expect::Contents | Expect::TargetVal | Expect::NameVal | Expect::End => "nothing",
        }
    }
}

enum Tok {
    /// Collecting the 8-byte length of the next token.
    Len { buf: [u8; 8], have: usize },
    /// Collecting a small token's bytes and padding.
    Str { buf: Vec<u8>, len: usize, total: usize },
    /// Streaming file contents.
    Contents { remaining: u64, size: u64 },
    /// Checking the padding after file contents.
    ContentsPad { remaining: usize },
}

/// The push parser. Call [`NarParser::feed`] with each chunk, then [`NarParser::finish`].
pub struct NarParser {
    offset: u64,
    token_start: u64,
    tok: Tok,
    expect: Expect,
    /// For each open directory, the previous entry's name.
    dirs: Vec<Option<Vec<u8>>>,
    path: Vec<u8>,
    path_lens: Vec<usize>,
    executable: bool,
}

impl Default for NarParser {
    fn default() -> Self {
        Self::new()
    }
}

impl NarParser {
    /// A parser at the start of a NAR.
    pub fn new() -> Self {
        NarParser {
            offset: 0,
            token_start: 0,
            tok: Tok::Len { buf: [0; 8], have: 0 },
            expect: Expect::Magic,
            dirs: Vec::new(),
            path: Vec::new(),
            path_lens: Vec::new(),
            executable: false,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// True once the root node has been closed.
    pub fn is_complete(&self) -> bool {
        self.expect == Expect::End
    }

    /// Parses the next chunk of the NAR.
    pub fn feed(&mut self, mut input: &[u8], visitor: &mut impl NarVisitor) -> Result<(), NarError> {
        while !input.is_empty() {
            if self.expect == Expect::End {
                return Err(NarError::TrailingData { offset: self.offset });
            }
            let used = self.step(input, visitor)?;
            input = &input[used..];
        }
        Ok(())
    }

    /// Checks that the NAR is complete; call after the last [`NarParser::feed`].
    pub fn finish(&self) -> Result<(), NarError> {
        if self.is_complete() { Ok(()) } else { Err(NarError::Truncated { offset: self.offset }) }
    }

    /// Consumes some bytes of `input` (at least one) and returns how many.
    fn step(&mut self, input: &[u8], visitor: &mut impl NarVisitor) -> Result<usize, NarError> {
        match &mut self.tok {
            Tok::Len { buf, have } => {
                if *have == 0 {
                    self.token_start = self.offset;
                }
                let n = (8 - *have).min(input.len());
                buf[*have..*have + n].copy_from_slice(&input[..n]);
                *have += n;
                self.offset += n as u64;
                if *have == 8 {
                    let len = u64::from_le_bytes(*buf);
                    self.start_token(len, visitor)?;
                }
                Ok(n)
            }
            Tok::Str { buf, len, total } => {
                let n = (*total - buf.len()).min(input.len());
                buf.extend_from_slice(&input[..n]);
                self.offset += n as u64;
                if buf.len() == *total {
                    let len = *len;
                    let mut token = std::mem::take(buf);
                    if token[len..].iter().any(|&b| b != 0) {
                        return Err(NarError::NonZeroPadding { offset: self.token_start + 8 + len as u64 });
                    }
                    token.truncate(len);
                    self.tok = Tok::Len { buf: [0; 8], have: 0 };
                    self.token(&token, visitor)?;
                }
                Ok(n)
            }
            Tok::Contents { remaining, size } => {
                let n = (*remaining).min(input.len() as u64) as usize;
                *remaining -= n as u64;
                let (remaining, size) = (*remaining, *size);
                self.offset += n as u64;
                if n > 0 {
                    visitor.event(NarEvent::FileData(&input[..n])).map_err(NarError::Visitor)?;
                }
                if remaining == 0 {
                    self.tok = Tok::ContentsPad { remaining: padding(size) as usize };
                    self.end_contents_if_padded(visitor)?;
                }
                Ok(n)
            }
            Tok::ContentsPad { remaining } => {
                let n = (*remaining).min(input.len());
                if input[..n].iter().any(|&b| b != 0) {
                    return Err(NarError::NonZeroPadding { offset: self.offset });
                }
                *remaining -= n;
                self.offset += n as u64;
                self.end_contents_if_padded(visitor)?;
                Ok(n)
            }
        }
    }

    fn start_token(&mut self, len: u64, visitor: &mut impl NarVisitor) -> Result<(), NarError> {
        if self.expect == Expect::Contents {
            visitor
                .event(NarEvent::FileStart {
                    path: &self.path,
                    executable: self.executable,
                    size: len,
                    offset: self.offset,
                })
                .map_err(NarError::Visitor)?;
            self.tok = Tok::Contents { remaining: len, size: len };
            if len == 0 {
                self.tok = Tok::ContentsPad { remaining: 0 };
                self.end_contents_if_padded(visitor)?;
            }
            return Ok(());
        }
        if len > MAX_TOKEN_LEN {
            if self.expect == Expect::Magic {
                return Err(NarError::BadMagic);
            }
            return Err(NarError::TokenTooLong { offset: self.token_start, len });
        }
        let total = (len + padding(len)) as usize;
        self.tok = Tok::Str { buf: Vec::with_capacity(total), len: len as usize, total };
        if total == 0 {
            self.tok = Tok::Len { buf: [0; 8], have: 0 };
            self.token(&[], visitor)?;
        }
        Ok(())
    }

    fn end_contents_if_padded(&mut self, visitor: &mut impl NarVisitor) -> Result<(), NarError> {
        if let Tok::ContentsPad { remaining: 0 } = self.tok {
            visitor.event(NarEvent::FileEnd).map_err(NarError::Visitor)?;
            self.tok = Tok::Len { buf: [0; 8], have: 0 };
            self.expect = Expect::NodeClose;
        }
        Ok(())
    }

    fn unexpected(&self, token: &[u8]) -> NarError {
        if self.expect == Expect::Magic {
            return NarError::BadMagic;
        }
        let mut found = String::from_utf8_lossy(&token[..token.len().min(64)]).into_owned();
        if token.len() > 64 {
            found.push('…');
        }
        NarError::Unexpected { offset: self.token_start, expected: self.expect.describe(), found }
    }

    fn token(&mut self, t: &[u8], visitor: &mut impl NarVisitor) -> Result<(), NarError> {
        let offset = self.token_start;
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        self.expect = match (self.expect, t) {
            (Expect::Magic, t) if t == MAGIC.as_bytes() => Expect::NodeOpen,
            (Expect::NodeOpen, b"(") => Expect::TypeKw,
            (Expect::TypeKw, b"type") => Expect::TypeVal,
            (Expect::TypeVal, b"regular") => {
                self.executable = false;
                Expect::RegularNext
            }
            (Expect::TypeVal, b"symlink") => Expect::TargetKw,
            (Expect::TypeVal, b"directory") => {
                visitor.event(NarEvent::DirectoryStart { path: &self.path }).map_err(NarError::Visitor)?;
                self.dirs.push(None);
                Expect::DirNext
            }
            (Expect::RegularNext, b"executable") => Expect::ExecMarker,
            (Expect::RegularNext | Expect::ContentsKw, b"contents") => Expect::Contents,
            (Expect::ExecMarker, b"") => {
                self.executable = true;
                Expect::ContentsKw
            }
            (Expect::NodeClose, b")") => self.node_closed(),
            (Expect::TargetKw, b"target") => Expect::TargetVal,
            (Expect::TargetVal, target) => {
                if target.is_empty() || target.contains(&0) {
                    return Err(NarError::InvalidSymlinkTarget { offset, target: lossy(target) });
                }
                if target.len() > MAX_TARGET_LEN {
                    let (what, len, max) = ("symlink target", target.len(), MAX_TARGET_LEN);
                    return Err(NarError::TooLong { offset, what, len, max });
                }
                visitor.event(NarEvent::Symlink { path: &self.path, target }).map_err(NarError::Visitor)?;
                Expect::NodeClose
            }
            (Expect::DirNext, b"entry") => Expect::EntryOpen,
            (Expect::DirNext, b")") => {
                self.dirs.pop();
                visitor.event(NarEvent::DirectoryEnd).map_err(NarError::Visitor)?;
                self.node_closed()
            }
            (Expect::EntryOpen, b"(") => Expect::NameKw,
            (Expect::NameKw, b"name") => Expect::NameVal,
            (Expect::NameVal, name) => {
                if name.is_empty()
                    || name == b"."
                    || name == b".."
                    || name.contains(&b'/')
                    || name.contains(&0)
                {
                    return Err(NarError::InvalidName { offset, name: lossy(name) });
                }
                if name.len() > MAX_NAME_LEN {
                    return Err(NarError::TooLong {
                        offset,
                        what: "entry name",
                        len: name.len(),
                        max: MAX_NAME_LEN,
                    });
                }
                let path_len = self.path.len() + usize::from(!self.path.is_empty()) + name.len();
                if path_len > MAX_PATH_LEN {
                    return Err(NarError::TooLong { offset, what: "path", len: path_len, max: MAX_PATH_LEN });
                }
                let prev = self.dirs.last_mut().expect("an entry is always inside a directory");
                match prev.as_deref() {
                    Some(p) if p == name => {
                        return Err(NarError::DuplicateEntry { offset, name: lossy(name) });
                    }
                    Some(p) if p > name => {
                        return Err(NarError::NotSorted { offset, prev: lossy(p), name: lossy(name) });
                    }
                    _ => {}
                }
                *prev = Some(name.to_vec());
                self.path_lens.push(self.path.len());
                if !self.path.is_empty() {
                    self.path.push(b'/');
                }
                self.path.extend_from_slice(name);
                Expect::NodeKw
            }
            (Expect::NodeKw, b"node") => Expect::NodeOpen,
            (Expect::EntryClose, b")") => {
                let len = self.path_lens.pop().expect("entry path pushed at its name");
                self.path.truncate(len);
                Expect::DirNext
            }
            (_, t) => return Err(self.unexpected(t)),
        };
        Ok(())
    }

    fn node_closed(&self) -> Expect {
        if self.dirs.is_empty() { Expect::End } else { Expect::EntryClose }
    }
}

/// Reads a whole NAR from `reader` and checks it; returns its size in bytes.
pub fn validate(reader: impl Read) -> Result<u64, NarError> {
    parse_from(reader, &mut ())
}

/// Reads a whole NAR from `reader`, reporting it to `visitor`; returns its size in bytes.
pub(crate) fn parse_from(reader: impl Read, visitor: &mut impl NarVisitor) -> Result<u64, NarError> {
    let mut parser = NarParser::new();
    read_chunks(reader, |chunk| parser.feed(chunk, visitor))?;
    parser.finish()?;
    Ok(parser.offset())
}

/// Reads `reader` to its end in large chunks, passing each to `f`; read errors become
/// [`NarError::Io`].
pub(crate) fn read_chunks(
    mut reader: impl Read,
    mut f: impl FnMut(&[u8]) -> Result<(), NarError>,
) -> Result<(), NarError> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match read_some(&mut reader, &mut buf).map_err(NarError::Io)? {
            0 => return Ok(()),
            n => f(&buf[..n])?,
        }
    }
}
