//! Object keys: only names that belong to Nix's binary cache layout can be built, so no request
//! path can name anything else (no traversal, whatever the URL encoding).

use std::fmt;

use nix_formats::nixbase32;
use nix_formats::store_path::{StorePath, is_hash_part};
use thiserror::Error;

/// A name that is not part of the cache layout.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0:?} is not a valid binary cache file name")]
pub struct KeyError(pub String);

/// A validated object key, relative to the cache root.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

/// Extensions of compressed NARs that Nix writes.
const NAR_EXTENSIONS: [&str; 5] = ["", ".xz", ".zst", ".bz2", ".br"];

impl Key {
    /// `nix-cache-info`.
    pub fn cache_info() -> Key {
        Key("nix-cache-info".to_owned())
    }

    /// `<hash>.narinfo`.
    pub fn narinfo(hash_part: &str) -> Result<Key, KeyError> {
        if is_hash_part(hash_part) {
            Ok(Key(format!("{hash_part}.narinfo")))
        } else {
            Err(KeyError(format!("{hash_part}.narinfo")))
        }
    }

    /// `<hash>.ls`, a NAR listing.
    pub fn listing(hash_part: &str) -> Result<Key, KeyError> {
        if is_hash_part(hash_part) {
            Ok(Key(format!("{hash_part}.ls")))
        } else {
            Err(KeyError(format!("{hash_part}.ls")))
        }
    }

    /// `nar/<name>` where name is `<nix32 file hash>.nar[.xz|.zst|.bz2|.br]`.
    pub fn nar(file_name: &str) -> Result<Key, KeyError> {
        let bad = || KeyError(format!("nar/{file_name}"));
        let (hash, ext) = file_name.split_once(".nar").ok_or_else(bad)?;
        let hash_ok = hash.len() == nixbase32::encoded_len(32) && nixbase32::is_nix32(hash);
        if hash_ok && NAR_EXTENSIONS.contains(&ext) {
            Ok(Key(format!("nar/{file_name}")))
        } else {
            Err(bad())
        }
    }

    /// `nar/…` from a narinfo's `URL:` field.
    pub fn nar_url(url: &str) -> Result<Key, KeyError> {
        Key::nar(url.strip_prefix("nar/").ok_or_else(|| KeyError(url.to_owned()))?)
    }

    /// `log/<drv base name>`, a build log.
    pub fn log(drv: &str) -> Result<Key, KeyError> {
        match StorePath::from_base_name(drv) {
            Ok(p) if p.is_derivation() => Ok(Key(format!("log/{drv}"))),
            _ => Err(KeyError(format!("log/{drv}"))),
        }
    }

    /// The key as a relative path.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The nix32 file hash a `nar/` key is named after.
    pub fn nar_file_hash(&self) -> Option<&str> {
        self.0.strip_prefix("nar/").and_then(|n| n.split_once(".nar")).map(|(h, _)| h)
    }
}

/// What a key names, with the name's variable part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind<'a> {
    /// `nix-cache-info`.
    CacheInfo,
    /// `<hash>.narinfo`.
    Narinfo(&'a str),
    /// `<hash>.ls`.
    Listing(&'a str),
    /// `nar/<file>`: the file name.
    Nar(&'a str),
    /// `log/<drv>`: the derivation's base name.
    Log(&'a str),
}

impl Key {
    /// A key as a storage listing names it; anything outside the cache layout (uploads in
    /// progress, files put there by hand) is refused, so nothing acts on it.
    pub fn parse(name: &str) -> Result<Key, KeyError> {
        if name == "nix-cache-info" {
            Ok(Key::cache_info())
        } else if let Some(file) = name.strip_prefix("nar/") {
            Key::nar(file)
        } else if let Some(drv) = name.strip_prefix("log/") {
            Key::log(drv)
        } else if let Some(hash) = name.strip_suffix(".narinfo") {
            Key::narinfo(hash)
        } else if let Some(hash) = name.strip_suffix(".ls") {
            Key::listing(hash)
        } else {
            Err(KeyError(name.to_owned()))
        }
    }

    /// What the key names.
    pub fn kind(&self) -> KeyKind<'_> {
        let s = self.0.as_str();
        if s == "nix-cache-info" {
            KeyKind::CacheInfo
        } else if let Some(file) = s.strip_prefix("nar/") {
            KeyKind::Nar(file)
        } else if let Some(drv) = s.strip_prefix("log/") {
            KeyKind::Log(drv)
        } else if let Some(hash) = s.strip_suffix(".narinfo") {
            KeyKind::Narinfo(hash)
        } else {
            KeyKind::Listing(s.strip_suffix(".ls").expect("every key is one of the layout's names"))
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "xn8dpmm67grflgfcrf021vfc6gln5s1h";
    const F: &str = "0r2p2nhw2q1anv2lgkzgax4qq2xchnibgn67cnark67s0jm1dm7m";

    #[test]
    fn layout_names_are_accepted() {
        assert_eq!(Key::narinfo(H).unwrap().as_str(), format!("{H}.narinfo"));
        assert_eq!(Key::listing(H).unwrap().as_str(), format!("{H}.ls"));
        for ext in NAR_EXTENSIONS {
            let k = Key::nar(&format!("{F}.nar{ext}")).unwrap();
            assert_eq!(k.nar_file_hash(), Some(F));
        }
        assert!(Key::nar_url(&format!("nar/{F}.nar.zst")).is_ok());
        assert!(Key::log(&format!("{H}-llama-cpp.drv")).is_ok());
    }

    #[test]
    fn listed_names_parse_back_to_their_kind() {
        let drv = format!("{H}-llama-cpp.drv");
        let nar = format!("{F}.nar.zst");
        let cases = [
            ("nix-cache-info".to_owned(), KeyKind::CacheInfo),
            (format!("{H}.narinfo"), KeyKind::Narinfo(H)),
            (format!("{H}.ls"), KeyKind::Listing(H)),
            (format!("nar/{nar}"), KeyKind::Nar(&nar)),
            (format!("log/{drv}"), KeyKind::Log(&drv)),
        ];
        for (name, kind) in cases {
            let key = Key::parse(&name).unwrap();
            assert_eq!((key.as_str(), key.kind()), (name.as_str(), kind));
        }
        for bad in [".fleetcache-tmp/0000000000000001", "nar/x", "realisations/x.doi", "index.html", "log/x"]
        {
            assert!(Key::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn everything_else_is_refused() {
        for bad in ["", "..", "../etc/passwd", "/etc/passwd", "ABC", &format!("{H}x"), &format!("{H}/..")] {
            assert!(Key::narinfo(bad).is_err(), "{bad}");
        }
        for bad in [
            format!("../{F}.nar"),
            format!("{F}.nar/../../x"),
            format!("{F}.nar.gz"),
            format!("{F}.tar"),
            format!("{F}e.nar"),
            "x.nar".to_owned(),
        ] {
            assert!(Key::nar(&bad).is_err(), "{bad}");
        }
        assert!(Key::nar_url(&format!("../nar/{F}.nar")).is_err());
        assert!(Key::log(&format!("{H}-not-a-drv")).is_err());
        assert!(Key::log("../../etc/passwd").is_err());
    }
}
