//! cache-server configuration: a TOML file, overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// Why the configuration is unusable.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct (unknown keys included).
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error, with the line.
        #[source]
        source: toml::de::Error,
    },
    /// The NAR download settings do not fit together or with the store.
    #[error("NAR downloads: {why}")]
    NarDownloads {
        /// What is wrong.
        why: &'static str,
    },
    /// The store URL is not one this server knows.
    #[error("invalid store URL {url:?}: {why}")]
    StoreUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        why: &'static str,
    },
}

/// The settings. Every field has a default, stated on it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the cache is: `file:///dir` or `s3://bucket?endpoint=…&region=…`.
    /// Default `file:///var/lib/fleetcache/cache`.
    #[serde(default = "default_store")]
    pub store: String,
    /// Secret key files in Nix's format; every key signs every narinfo (several during a key
    /// rotation). Default none: the server is read-only.
    #[serde(default)]
    pub signing_key_files: Vec<PathBuf>,
    /// File of `name:token` lines allowed to upload. Default none: the server is read-only.
    #[serde(default)]
    pub upload_tokens_file: Option<PathBuf>,
    /// File of `name:token` lines allowed to read. Default none: reads are public.
    #[serde(default)]
    pub read_tokens_file: Option<PathBuf>,
    /// File of `name:token` lines allowed to collect garbage (`POST /api/v1/gc`, what
    /// `orchestrator gc` does). Default none: collection only by `cache-server gc` on the
    /// store itself.
    #[serde(default)]
    pub admin_tokens_file: Option<PathBuf>,
    /// File of `AWS_ACCESS_KEY_ID=…` and `AWS_SECRET_ACCESS_KEY=…` lines (the format of a
    /// systemd `EnvironmentFile`) for an s3:// store. Default none: the credentials come from
    /// those environment variables.
    #[serde(default)]
    pub s3_credentials_file: Option<PathBuf>,
    /// Seconds an S3 request may wait for the first byte of the service's answer (each of three
    /// attempts) before it fails (a 503, or a retried upload): a service that accepts
    /// connections and then stalls would otherwise hold every request, and every machine asking
    /// for a narinfo, until Nix gives up (300 s, five times). NAR uploads wait without limit (on
    /// a slow link sending a part takes long). 0: no limit. Default 30.
    #[serde(default = "default_s3_timeout")]
    pub s3_timeout_seconds: u64,
    /// Substituter priority advertised in `nix-cache-info` (lower is asked first;
    /// cache.nixos.org is 40). Default 41: machines ask cache.nixos.org first for what it has and
    /// this cache for the rest; 30 puts this cache first.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Seconds a narinfo that exists is kept in memory (0 turns this off; misses are never
    /// kept). Default 30.
    #[serde(default = "default_narinfo_cache_seconds")]
    pub narinfo_cache_seconds: u64,
    /// Largest narinfo upload accepted, in bytes. Default 1 MiB.
    #[serde(default = "default_max_narinfo_bytes")]
    pub max_narinfo_bytes: usize,
    /// Connections served at once (more wait; never more than the open-files limit allows,
    /// raised to its hard limit at start). Default 4096.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers, counted from when it is
    /// ready for the next request (so also how long an idle keep-alive connection stays).
    /// Default 10.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_seconds: u64,
    /// Seconds an upload's body may send nothing before it is cut. Default 60.
    #[serde(default = "default_body_idle_timeout")]
    pub body_idle_timeout_seconds: u64,
    /// Seconds between two listings of the store for the in-memory narinfo index, which
    /// answers misses without a storage request (0: no index, every miss asks storage).
    /// Uploads through this server are in it at once; replicas on one store see each other's
    /// within this bound, as do writers beside the server (`nix copy --to file://…`, an
    /// orchestrator's embedded cache). Each listing reads every key of the store (on S3, one
    /// request per 1000 objects: raise it for a bucket of millions). Default 60, the negative
    /// TTL the client module gives Nix.
    #[serde(default = "default_index_refresh")]
    pub index_refresh_seconds: u64,
    /// How `GET /nar/…` is answered: `"proxy"` (this server reads the store and sends the
    /// bytes), `"presigned"` (a redirect to a presigned URL of the object, valid for
    /// `nar-presigned-seconds`; s3:// stores only, and machines must reach the store's
    /// endpoint or `nar-presigned-endpoint`) or `"base-url"` (a redirect to `nar-base-url`
    /// followed by `/nar/…`: a public bucket's own HTTPS endpoint, or a CDN in front of it). A
    /// redirect is sent only to a client the read tokens admit; narinfos are always served
    /// here, so what a machine trusts is still signed by this cache and the NAR's hash is
    /// checked by Nix. HEAD and range requests are redirected too, except HEAD with
    /// "presigned" (a presigned URL is for one method). Default `"proxy"`.
    #[serde(default)]
    pub nar_downloads: NarDownloads,
    /// Seconds a presigned NAR URL stays valid. Default 600.
    #[serde(default = "default_nar_presigned_seconds")]
    pub nar_presigned_seconds: u64,
    /// The S3 endpoint that presigned NAR URLs name, when machines reach the bucket by another
    /// address than this server does (`https://s3.example.org` for machines, `http://garage:3900`
    /// inside); a presigned URL is signed for its host, so it is made for this one. Only with
    /// `nar-downloads = "presigned"`. Default: the store's endpoint.
    #[serde(default)]
    pub nar_presigned_endpoint: Option<String>,
    /// Where `nar-downloads = "base-url"` sends NAR requests (`https://cache-bucket.example.org`;
    /// the bucket's `nar/` objects must be readable there). Default none.
    #[serde(default)]
    pub nar_base_url: Option<String>,
    /// Binary caches whose paths this cache need not hold (`[[upstream]]` tables of `url` and
    /// `public-keys`): a reference is satisfied by a narinfo an upstream serves signed by one
    /// of its keys, and pushes skip such paths. Default none: every reference must be here.
    #[serde(default)]
    pub upstream: Vec<crate::upstream::UpstreamConfig>,
}

/// The `nar-downloads` setting.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum NarDownloads {
    /// This server sends the bytes.
    #[default]
    Proxy,
    /// A redirect to a presigned URL.
    Presigned,
    /// A redirect under `nar-base-url`.
    BaseUrl,
}

/// Where NAR downloads go, checked against the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarRedirect {
    /// Nowhere: this server sends the bytes.
    Proxy,
    /// To a presigned URL valid this long.
    Presigned(std::time::Duration),
    /// To this URL (no trailing slash) followed by `/nar/…`.
    BaseUrl(String),
}

fn default_nar_presigned_seconds() -> u64 {
    600
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_store() -> String {
    "file:///var/lib/fleetcache/cache".to_owned()
}
fn default_priority() -> u32 {
    nix_formats::CacheInfo::FLEETCACHE_PRIORITY
}
fn default_narinfo_cache_seconds() -> u64 {
    30
}
fn default_s3_timeout() -> u64 {
    30
}
fn default_index_refresh() -> u64 {
    60
}
fn default_max_narinfo_bytes() -> usize {
    1024 * 1024
}
fn default_max_connections() -> usize {
    crate::listener::Limits::default().max_connections
}
fn default_header_timeout() -> u64 {
    crate::listener::Limits::default().header_timeout.as_secs()
}
fn default_body_idle_timeout() -> u64 {
    crate::listener::Limits::default().body_idle_timeout.as_secs()
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

impl Config {
    /// The listener limits these settings give.
    pub fn limits(&self) -> crate::listener::Limits {
        crate::listener::Limits {
            max_connections: self.max_connections,
            header_timeout: std::time::Duration::from_secs(self.header_timeout_seconds),
            body_idle_timeout: std::time::Duration::from_secs(self.body_idle_timeout_seconds),
            ..crate::listener::Limits::default()
        }
    }

    /// Where NAR downloads go with this store, or why the settings do not fit together.
    pub fn nar_redirect(&self, store: &StoreUrl) -> Result<NarRedirect, ConfigError> {
        let bad = |why| ConfigError::NarDownloads { why };
        if self.nar_base_url.is_some() && self.nar_downloads != NarDownloads::BaseUrl {
            return Err(bad("nar-base-url is set but nar-downloads is not \"base-url\""));
        }
        if let Some(endpoint) = &self.nar_presigned_endpoint {
            if self.nar_downloads != NarDownloads::Presigned {
                return Err(bad("nar-presigned-endpoint is set but nar-downloads is not \"presigned\""));
            }
            if !printable_url(endpoint) {
                return Err(bad(
                    "nar-presigned-endpoint must be an http:// or https:// URL of printable ASCII, without ? or #",
                ));
            }
        }
        match self.nar_downloads {
            NarDownloads::Proxy => Ok(NarRedirect::Proxy),
            NarDownloads::Presigned => {
                if !matches!(store, StoreUrl::S3 { .. }) {
                    return Err(bad("nar-downloads = \"presigned\" needs an s3:// store"));
                }
                // S3's limit for a presigned URL is a week.
                if !(1..=7 * 24 * 3600).contains(&self.nar_presigned_seconds) {
                    return Err(bad("nar-presigned-seconds must be between 1 and 604800 (a week)"));
                }
                Ok(NarRedirect::Presigned(std::time::Duration::from_secs(self.nar_presigned_seconds)))
            }
            NarDownloads::BaseUrl => {
                let url = self
                    .nar_base_url
                    .as_deref()
                    .ok_or(bad("nar-downloads = \"base-url\" needs nar-base-url"))?;
                if !printable_url(url) {
                    return Err(bad(
                        "nar-base-url must be an http:// or https:// URL of printable ASCII, without ? or #",
                    ));
                }
                Ok(NarRedirect::BaseUrl(url.trim_end_matches('/').to_owned()))
            }
        }
    }

    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
    }
}

/// An `http://` or `https://` URL with a host, of printable ASCII, without a query or fragment.
fn printable_url(url: &str) -> bool {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#'))
}

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local directory.
    File(PathBuf),
    /// An S3 bucket.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Endpoint for non-AWS services.
        endpoint: Option<String>,
        /// Region; default `us-east-1`.
        region: String,
        /// `checksums=when-required` (the default) or `checksums=when-supported` (AWS's default).
        checksums_when_required: bool,
    },
}

impl StoreUrl {
    /// Parses `file:///abs/dir` or `s3://bucket?endpoint=URL&region=R&checksums=when-required`.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |why| ConfigError::StoreUrl { url: url.to_owned(), why };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file:// store needs an absolute path (file:///var/lib/…)"));
            }
            return Ok(StoreUrl::File(PathBuf::from(path)));
        }
        let rest = url.strip_prefix("s3://").ok_or(bad("expected file:// or s3://"))?;
        let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
        if bucket.is_empty() || bucket.contains('/') {
            return Err(bad("an s3:// store needs a bucket name and nothing after it but ?options"));
        }
        let mut endpoint = None;
        let mut region = "us-east-1".to_owned();
        let mut checksums_when_required = true;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or(bad("options must be key=value"))?;
            match k {
                "endpoint" => endpoint = Some(v.to_owned()),
                "region" => region = v.to_owned(),
                "checksums" => {
                    checksums_when_required = match v {
                        "when-required" => true,
                        "when-supported" => false,
                        _ => return Err(bad("checksums is when-required or when-supported")),
                    }
                }
                _ => return Err(bad("unknown option (known: endpoint, region, checksums)")),
            }
        }
        Ok(StoreUrl::S3 { bucket: bucket.to_owned(), endpoint, region, checksums_when_required })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_stated_once() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.store, "file:///var/lib/fleetcache/cache");
        assert!(c.signing_key_files.is_empty() && c.upload_tokens_file.is_none());
        assert_eq!(c.priority, 41);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<Config>("listen = \"127.0.0.1:1\"\nlisten-port = 3\n").unwrap_err();
        assert!(err.to_string().contains("listen-port"), "{err}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../cache-server.example.toml");
        let c: Config = toml::from_str(text).unwrap();
        assert_ne!(c, Config::default(), "the example sets something");
        StoreUrl::parse(&c.store).unwrap();
        // What it says of the limits is the default.
        let d = Config::default();
        assert_eq!(
            (c.priority, c.narinfo_cache_seconds, c.max_narinfo_bytes, c.limits(), c.s3_timeout_seconds),
            (d.priority, d.narinfo_cache_seconds, d.max_narinfo_bytes, d.limits(), d.s3_timeout_seconds)
        );
    }

    #[test]
    fn nar_redirects() {
        let s3 = StoreUrl::parse("s3://b").unwrap();
        let dir = StoreUrl::parse("file:///c").unwrap();
        let c = |t: &str| toml::from_str::<Config>(t).unwrap();
        assert_eq!(c("").nar_redirect(&s3).unwrap(), NarRedirect::Proxy);
        assert_eq!(
            c("nar-downloads = \"presigned\"\nnar-presigned-seconds = 60").nar_redirect(&s3).unwrap(),
            NarRedirect::Presigned(std::time::Duration::from_secs(60))
        );
        assert_eq!(
            c("nar-downloads = \"base-url\"\nnar-base-url = \"https://cdn.example/cache/\"")
                .nar_redirect(&dir)
                .unwrap(),
            NarRedirect::BaseUrl("https://cdn.example/cache".into())
        );
        for (t, store, why) in [
            ("nar-downloads = \"presigned\"", &dir, "needs an s3:// store"),
            ("nar-downloads = \"presigned\"\nnar-presigned-seconds = 0", &s3, "between 1 and"),
            ("nar-downloads = \"base-url\"", &s3, "needs nar-base-url"),
            ("nar-base-url = \"https://x\"", &s3, "not \"base-url\""),
            ("nar-downloads = \"base-url\"\nnar-base-url = \"ftp://x\"", &s3, "http:// or https://"),
            ("nar-downloads = \"base-url\"\nnar-base-url = \"https://x/?a=b\"", &s3, "without ?"),
            ("nar-presigned-endpoint = \"https://x\"", &s3, "not \"presigned\""),
            ("nar-downloads = \"presigned\"\nnar-presigned-endpoint = \"s3.example\"", &s3, "http:// or"),
        ] {
            let e = c(t).nar_redirect(store).unwrap_err().to_string();
            assert!(e.contains(why), "{t}: {e}");
        }
        assert!(toml::from_str::<Config>("nar-downloads = \"sideways\"").is_err());
    }

    #[test]
    fn store_urls() {
        assert_eq!(StoreUrl::parse("file:///var/cache").unwrap(), StoreUrl::File("/var/cache".into()));
        assert_eq!(
            StoreUrl::parse("s3://b?endpoint=http://127.0.0.1:3900&region=garage").unwrap(),
            StoreUrl::S3 {
                bucket: "b".into(),
                endpoint: Some("http://127.0.0.1:3900".into()),
                region: "garage".into(),
                checksums_when_required: true
            }
        );
        assert!(StoreUrl::parse("file://relative").is_err());
        assert!(StoreUrl::parse("http://x").is_err());
        assert!(StoreUrl::parse("s3://").is_err());
        assert!(StoreUrl::parse("s3://b?bogus=1").is_err());
    }
}
