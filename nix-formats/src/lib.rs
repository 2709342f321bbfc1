//! Nix's binary cache formats, byte for byte as the real `nix` writes them.
//!
//! Pure and synchronous: no network, no async runtime. Streaming is done with
//! `std::io::{Read, Write}` and push-style parsers that can be fed from any source.
//!
//! - [`nixbase32`]: Nix's base-32 alphabet and byte order.
//! - [`hash`]: hashes as `sha256:<nix32>`, base16 and SRI, and a hashing writer.
//! - [`store_path`]: `/nix/store/<hash>-<name>` parsing and validation.
//! - [`nar`]: the NAR archive format (streaming writer, validating reader, unpacker).
//! - [`narinfo`]: `.narinfo` files and the fingerprint that signatures cover.
//! - [`content_address`]: the `CA:` of content-addressed paths.
//! - [`cache_info`]: the `nix-cache-info` file.
//! - [`signing`]: ed25519 keys and signatures in Nix's text format.

pub mod cache_info;
pub mod content_address;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod signing;
pub mod store_path;

pub use cache_info::CacheInfo;
pub use content_address::ContentAddress;
pub use hash::{Hash, HashAlgo};
pub use narinfo::NarInfo;
pub use signing::{PublicKey, SecretKey, Signature};
pub use store_path::StorePath;
