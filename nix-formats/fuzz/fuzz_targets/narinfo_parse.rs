//! The narinfo parser never panics, and what it accepts serialises to text that parses back to
//! the same value. Run with `cargo fuzz run narinfo_parse` (nightly).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nix_formats::NarInfo;

fuzz_target!(|data: &[u8]| {
    if let Ok(n) = NarInfo::parse_bytes(data) {
        let text = n.to_string();
        let back = NarInfo::parse(&text).expect("our own output parses");
        assert_eq!(back, n);
        assert_eq!(back.to_string(), text);
    }
});
