//! The NAR parser never panics, and whatever it accepts is canonical: re-encoding the events
//! it reports gives back exactly the input. Run with `cargo fuzz run nar_reader` (nightly).
#![no_main]

use std::io;

use libfuzzer_sys::fuzz_target;
use nix_formats::nar::{NarEncoder, NarEvent, NarParser, NarVisitor};

struct Reencode {
    enc: NarEncoder<Vec<u8>>,
    size: u64,
    /// For each open directory: whether it is the root (no entry to close after it).
    entry_depth: Vec<bool>,
    in_entry: bool,
}

impl NarVisitor for Reencode {
    fn event(&mut self, e: NarEvent<'_>) -> io::Result<()> {
        let entered = match &e {
            NarEvent::DirectoryStart { path } | NarEvent::FileStart { path, .. } | NarEvent::Symlink { path, .. } => {
                if !path.is_empty() {
                    let name = path.rsplit(|&b| b == b'/').next().unwrap();
                    self.enc.entry_start(name)?;
                }
                !path.is_empty()
            }
            _ => false,
        };
        match e {
            NarEvent::DirectoryStart { .. } => {
                self.entry_depth.push(entered);
                self.enc.directory_start()
            }
            NarEvent::DirectoryEnd => {
                self.enc.directory_end()?;
                if self.entry_depth.pop().unwrap() {
                    self.enc.entry_end()?;
                }
                Ok(())
            }
            NarEvent::FileStart { executable, size, .. } => {
                self.in_entry = entered;
                self.size = size;
                self.enc.regular_start(executable, size)
            }
            NarEvent::FileData(d) => self.enc.contents(d),
            NarEvent::FileEnd => {
                self.enc.regular_end(self.size)?;
                if self.in_entry {
                    self.enc.entry_end()?;
                }
                Ok(())
            }
            NarEvent::Symlink { target, .. } => {
                self.enc.symlink(target)?;
                if entered {
                    self.enc.entry_end()?;
                }
                Ok(())
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut v = Reencode {
        enc: NarEncoder::new(Vec::new()).unwrap(),
        size: 0,
        entry_depth: Vec::new(),
        in_entry: false,
    };
    let mut p = NarParser::new();
    // Split the input in two to exercise chunk boundaries.
    let cut = data.first().map_or(0, |&b| b as usize).min(data.len());
    let ok = p.feed(&data[..cut], &mut v).and_then(|_| p.feed(&data[cut..], &mut v)).and_then(|_| p.finish());
    if ok.is_ok() {
        assert_eq!(v.enc.finish().unwrap(), data);
    }
});
