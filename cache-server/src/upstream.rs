//! Upstream caches: binary caches (cache.nixos.org, the NixOS CUDA cache) whose paths this cache
//! need not hold.
//!
//! A reference of an upload is satisfied if this cache has it **or** an upstream serves a
//! narinfo for it that is signed by one of that upstream's keys; "which are missing?" says which
//! paths an upstream serves, so a push skips them. A machine then substitutes those paths from
//! the upstream and the rest from here. What was found is remembered for [`FOUND_FOR`], what
//! no upstream has for [`ABSENT_FOR`]; an upstream that cannot be asked is never trusted: an
//! upload that needs it is refused with the upstream's name, and "which are missing?" counts
//! the path as missing (it is uploaded here instead). After a failed request an upstream is
//! not asked for [`DOWN_FOR`], so a large batch fails fast instead of timing out path by path.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use nix_formats::{NarInfo, PublicKey, StorePath};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How long a narinfo an upstream served is taken as there.
pub const FOUND_FOR: Duration = Duration::from_secs(3600);

/// How long "no upstream has it" is remembered (an upload soon after a miss asks again).
pub const ABSENT_FOR: Duration = Duration::from_secs(60);

/// Most paths remembered; the memory is cleared when it is full (a few hundred bytes each).
const MEMORY: usize = 1 << 20;

/// Upstream requests in flight for one batch.
const IN_FLIGHT: usize = 32;

/// Largest narinfo read from an upstream (real ones are a few hundred bytes; cache-server
/// accepts uploads of at most 1 MiB by default).
const MAX_NARINFO_BYTES: usize = 1 << 20;

/// How long one narinfo request to an upstream may take, and its connection.
const TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One upstream cache, as configured.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UpstreamConfig {
    /// Its base URL (`https://cache.nixos.org`).
    pub url: String,
    /// Keys in Nix's `name:base64` form; a narinfo signed by none of them does not count.
    pub public_keys: Vec<String>,
}

/// Why the upstream settings are unusable.
#[derive(Debug, Error)]
pub enum UpstreamConfigError {
    /// The URL is not http(s).
    #[error("upstream {0:?}: the URL must start with https:// or http://")]
    Url(String),
    /// A key does not parse, or there is none.
    #[error("upstream {url}: {why}")]
    Key {
        /// The upstream.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// No HTTP client could be made.
    #[error(transparent)]
    Http(#[from] cache_protocol::http::HttpError),
}

/// An upstream could not say whether it has a path.
#[derive(Debug, Clone, Error)]
#[error("upstream cache {url} could not be asked: {why}")]
pub struct UpstreamDown {
    /// The upstream.
    pub url: String,
    /// What happened.
    pub why: String,
}

struct Upstream {
    url: String,
    keys: Vec<PublicKey>,
    /// Set when a request failed: until then the upstream is not asked again, every question
    /// for it failing at once with this reason (a batch of thousands of paths does not wait
    /// for thousands of timeouts).
    down: Mutex<Option<(Instant, String)>>,
}

impl Upstream {
    fn down_reason(&self) -> Option<String> {
        let down = self.down.lock().expect("not poisoned");
        down.as_ref().filter(|(until, _)| Instant::now() < *until).map(|(_, why)| why.clone())
    }

    fn mark_down(&self, why: &str) {
        *self.down.lock().expect("not poisoned") = Some((Instant::now() + DOWN_FOR, why.to_owned()));
    }
}

/// How long an upstream that failed a request is taken as down.
pub const DOWN_FOR: Duration = Duration::from_secs(15);

/// Checks upstream settings (URLs and keys) without making a client: `--check-config`.
pub fn check(config: &[UpstreamConfig]) -> Result<(), UpstreamConfigError> {
    parse(config).map(drop)
}

fn parse(config: &[UpstreamConfig]) -> Result<Vec<Upstream>, UpstreamConfigError> {
    let mut list = Vec::new();
    for c in config {
        if !(c.url.starts_with("https://") || c.url.starts_with("http://")) {
            return Err(UpstreamConfigError::Url(c.url.clone()));
        }
        let key_error = |why: String| UpstreamConfigError::Key { url: c.url.clone(), why };
        if c.public_keys.is_empty() {
            return Err(key_error("needs at least one public key".to_owned()));
        }
        let keys = c
            .public_keys
            .iter()
            .map(|k| PublicKey::parse(k).map_err(|e| key_error(format!("public key {k:?}: {e}"))))
            .collect::<Result<_, _>>()?;
        list.push(Upstream { url: c.url.trim_end_matches('/').to_owned(), keys, down: Mutex::default() });
    }
    Ok(list)
}

/// The configured upstreams, and what they were found to hold.
pub struct Upstreams {
    list: Vec<Upstream>,
    http: reqwest::Client,
    /// Hash part → (when asked, the upstream that has it or `None`).
    memory: Mutex<HashMap<String, (Instant, Option<usize>)>>,
    /// Requests made to upstreams, for `/metrics`.
    requests: std::sync::atomic::AtomicU64,
}

impl Upstreams {
    /// No upstream: every reference must be in this cache.
    pub fn none() -> Self {
        Self::new(&[]).expect("no upstream is a valid setting")
    }

    /// Checks the settings and makes the HTTP client.
    pub fn new(config: &[UpstreamConfig]) -> Result<Self, UpstreamConfigError> {
        let list = parse(config)?;
        let http = cache_protocol::http::client_builder()?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(TIMEOUT)
            .build()
            .map_err(cache_protocol::http::HttpError::Build)?;
        Ok(Upstreams { list, http, memory: Mutex::default(), requests: Default::default() })
    }

    /// True if no upstream is configured.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Narinfo requests made to upstreams so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The URL of an upstream that serves `path` with a valid signature, `None` if none does.
    /// An error names an upstream that could not be asked when none of the others has it.
    pub async fn serving(&self, path: &StorePath) -> Result<Option<&str>, UpstreamDown> {
        if self.list.is_empty() {
            return Ok(None);
        }
        if let Some(known) = self.remembered(path.hash_part()) {
            return Ok(known.map(|i| self.list[i].url.as_str()));
        }
        let mut down = None;
        for (i, upstream) in self.list.iter().enumerate() {
            match self.ask(upstream, path).await {
                Ok(true) => {
                    self.remember(path.hash_part(), Some(i));
                    return Ok(Some(&upstream.url));
                }
                Ok(false) => {}
                Err(why) => {
                    down.get_or_insert(UpstreamDown { url: upstream.url.clone(), why });
                }
            }
        }
        match down {
            Some(down) => Err(down),
            None => {
                self.remember(path.hash_part(), None);
                Ok(None)
            }
        }
    }

    /// [`Upstreams::serving`] for each of `paths`, in order, a few at a time.
    pub async fn serving_each(&self, paths: Vec<StorePath>) -> Vec<Result<Option<String>, UpstreamDown>> {
        if self.list.is_empty() {
            return paths.iter().map(|_| Ok(None)).collect();
        }
        let ask = |p: StorePath| async move { self.serving(&p).await.map(|u| u.map(str::to_owned)) };
        futures_util::stream::iter(paths).map(ask).buffered(IN_FLIGHT).collect().await
    }

    fn remembered(&self, hash_part: &str) -> Option<Option<usize>> {
        let memory = self.memory.lock().expect("not poisoned");
        let (when, found) = memory.get(hash_part)?;
        let keep = if found.is_some() { FOUND_FOR } else { ABSENT_FOR };
        (when.elapsed() < keep).then_some(*found)
    }

    fn remember(&self, hash_part: &str, found: Option<usize>) {
        let mut memory = self.memory.lock().expect("not poisoned");
        if memory.len() >= MEMORY {
            memory.clear();
        }
        memory.insert(hash_part.to_owned(), (Instant::now(), found));
    }

    /// Whether `upstream` serves a narinfo for `path` signed by one of its keys. A narinfo that
    /// is unsigned, signed by another key or about another path counts as not served.
    async fn ask(&self, upstream: &Upstream, path: &StorePath) -> Result<bool, String> {
        if let Some(why) = upstream.down_reason() {
            return Err(why);
        }
        let asked = self.ask_now(upstream, path).await;
        if let Err(why) = &asked {
            upstream.mark_down(why);
        }
        asked
    }

    async fn ask_now(&self, upstream: &Upstream, path: &StorePath) -> Result<bool, String> {
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url = format!("{}/{}.narinfo", upstream.url, path.hash_part());
        let response = self.http.get(&url).send().await.map_err(|e| cache_protocol::http::describe(&e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::FORBIDDEN {
            // S3 buckets answer 403 for an absent key when listing is not allowed.
            return Ok(false);
        }
        if !status.is_success() {
            return Err(format!("GET {url} answered {status}"));
        }
        let body = match cache_protocol::http::read_limited(response, MAX_NARINFO_BYTES).await {
            Ok(body) => body,
            Err(why) => {
                tracing::warn!(%url, %why, "an upstream's narinfo is too large or broke off; not counted");
                return Ok(false);
            }
        };
        let Ok(info) = NarInfo::parse_bytes(&body) else {
            tracing::warn!(%url, "an upstream served a narinfo that does not parse; not counted");
            return Ok(false);
        };
        if info.store_path != *path || !info.is_signed_by_any(&upstream.keys) {
            tracing::warn!(%url, "an upstream's narinfo is not signed by its keys or names another path");
            return Ok(false);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(url: &str, keys: &[&str]) -> Vec<UpstreamConfig> {
        vec![UpstreamConfig {
            url: url.to_owned(),
            public_keys: keys.iter().map(|k| k.to_string()).collect(),
        }]
    }

    const NIXOS: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

    #[test]
    fn settings_are_checked() {
        check(&one("https://cache.nixos.org/", &[NIXOS])).unwrap();
        assert!(matches!(check(&one("cache.nixos.org", &[NIXOS])), Err(UpstreamConfigError::Url(_))));
        let err = check(&one("https://cache.nixos.org", &[])).unwrap_err().to_string();
        assert!(err.contains("at least one public key"), "{err}");
        let err =
            check(&one("https://cache.nixos.org", &["cache.nixos.org-1:nope"])).unwrap_err().to_string();
        assert!(err.contains("cache.nixos.org-1:nope"), "{err}");
    }

    #[test]
    fn the_setting_reads_from_toml() {
        let text = format!("[[upstream]]\nurl = \"https://cache.nixos.org\"\npublic-keys = [\"{NIXOS}\"]\n");
        let config: crate::config::Config = toml::from_str(&text).unwrap();
        assert_eq!(config.upstream, one("https://cache.nixos.org", &[NIXOS]));
        assert!(
            toml::from_str::<crate::config::Config>("[[upstream]]\nurl = \"https://x\"\nkeys = []\n")
                .is_err()
        );
    }

    #[test]
    fn an_upstream_that_failed_is_not_asked_again_for_a_while() {
        // Nothing listens on a port just bound and closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let upstreams = Upstreams::new(&one(&format!("http://127.0.0.1:{port}"), &[NIXOS])).unwrap();
        let paths: Vec<StorePath> =
            (0..500).map(|i| StorePath::from_absolute(&format!("/nix/store/{i:032}-p")).unwrap()).collect();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let answers = rt.block_on(upstreams.serving_each(paths));
        assert!(answers.iter().all(|a| a.as_ref().is_err_and(|e| e.url.contains(&port.to_string()))));
        // The first wave of requests finds it down; the rest of the batch is not sent.
        assert!(upstreams.requests() <= IN_FLIGHT as u64, "{} requests", upstreams.requests());
    }

    #[test]
    fn an_oversized_upstream_narinfo_does_not_count() {
        // A valid narinfo signed by the upstream's key; padded with an unknown field past the
        // limit it is the same narinfo, refused for its size alone.
        let key = nix_formats::SecretKey::generate("upstream.example-1").unwrap();
        let path = StorePath::from_absolute(&format!("/nix/store/{:032}-p", 1)).unwrap();
        let text = format!(
            "StorePath: {}\nURL: nar/{}.nar.zst\nCompression: zstd\nNarHash: sha256:{}\nNarSize: 8\nReferences: \n",
            path.to_absolute(),
            "1".repeat(52),
            "1".repeat(52)
        );
        let mut info = NarInfo::parse(&text).unwrap();
        info.sign(&key);
        let signed = info.to_string();
        let padded = format!("{signed}Padding: {}\n", "x".repeat(2 << 20));
        assert!(
            NarInfo::parse(&padded).unwrap().is_signed_by_any(&[key.public_key()]),
            "padding keeps it valid"
        );

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            // The small one; the padded one with its size declared; without (read until the
            // limit is passed).
            let answers = [
                format!("Content-Length: {}\r\n\r\n{signed}", signed.len()),
                format!("Content-Length: {}\r\n\r\n{padded}", padded.len()),
                format!("Connection: close\r\n\r\n{padded}"),
            ];
            tokio::spawn(async move {
                for answer in answers {
                    let (mut conn, _) = listener.accept().await.unwrap();
                    let mut request = [0u8; 4096];
                    let _ = conn.read(&mut request).await;
                    let _ = conn.write_all(format!("HTTP/1.1 200 OK\r\n{answer}").as_bytes()).await;
                }
            });
            let url = format!("http://127.0.0.1:{port}");
            let config = one(&url, &[&key.public_key().to_string()]);
            let mut found = Vec::new();
            for _ in 0..3 {
                // A fresh memory each time, so each answer is asked for.
                let upstreams = Upstreams::new(&config).unwrap();
                found.push(upstreams.serving(&path).await.unwrap().map(str::to_owned));
            }
            assert_eq!(found, [Some(url), None, None]);
        });
    }
}
