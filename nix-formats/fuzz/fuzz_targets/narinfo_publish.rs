//! What a cache publishes for any narinfo it accepts holds only fields Nix reads, each once,
//! and parses back to exactly itself: no input yields a line we did not set, and no line Nix
//! would read differently. Run with `scripts/fuzz narinfo_publish 60`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nix_formats::NarInfo;

/// The keys Nix's narinfo reader knows and a published narinfo may hold.
const PUBLISHED: [&str; 10] =
    ["StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize", "References", "Deriver", "CA"];

fuzz_target!(|data: &[u8]| {
    let Ok(n) = NarInfo::parse_bytes(data) else { return };
    let published = n.clone().into_published();
    let text = published.to_string();
    let back = NarInfo::parse(&text).expect("what we publish parses");
    assert_eq!(back, published);
    assert_eq!(back.to_string(), text);
    assert_eq!(published.fingerprint(), n.fingerprint(), "the fingerprint Nix computes is unchanged");
    let mut seen = Vec::new();
    for line in text.lines() {
        // Split as Nix does: up to the first ':', then ": ".
        let (key, rest) = line.split_once(':').expect("a key");
        assert!(rest.is_empty() || rest.starts_with(' '), "{line:?}");
        assert!(PUBLISHED.contains(&key), "{key:?} was published");
        assert!(!seen.contains(&key), "{key} twice");
        seen.push(key);
        assert!(!line.chars().any(char::is_control), "{line:?}");
    }
});
