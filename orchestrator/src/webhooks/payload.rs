//! What a forge sends: its signature, the push it describes, and whether the repository it
//! names is the configured one.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use serde_json::Value;

pub use crate::config::Forge;

/// What a push delivery says.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    /// `refs/heads/main`.
    pub ref_name: String,
    /// The branch's head before the push (all zeros for a new branch).
    pub before: String,
    /// The new head (all zeros when the branch was deleted).
    pub after: String,
    /// Names the repository goes by in the payload: full name and URLs.
    pub repository: Vec<String>,
}

pub(super) fn header<'a>(headers: &'a HeaderMap, names: &[&str]) -> Option<&'a str> {
    names.iter().find_map(|n| headers.get(*n).and_then(|v| v.to_str().ok()))
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Whether `signature_hex` is the HMAC-SHA256 of `body` with `secret` (constant time).
pub fn hmac_matches(secret: &[u8], body: &[u8], signature_hex: &str) -> bool {
    let Some(signature) = hex_decode(signature_hex.trim()) else { return false };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&signature).is_ok()
}

/// Reads the push out of a forge's payload.
pub fn parse_push(forge: Forge, v: &Value) -> Option<Push> {
    let s = |v: &Value| v.as_str().map(str::to_owned);
    let mut repository = Vec::new();
    let (names, repo) = match forge {
        Forge::GitLab => (["path_with_namespace", "git_http_url", "git_ssh_url", "web_url"], &v["project"]),
        Forge::GitHub | Forge::Gitea => (["full_name", "clone_url", "ssh_url", "html_url"], &v["repository"]),
    };
    for n in names {
        if let Some(x) = s(&repo[n]) {
            repository.push(x);
        }
    }
    Some(Push { ref_name: s(&v["ref"])?, before: s(&v["before"])?, after: s(&v["after"])?, repository })
}

/// A repository name or URL without the parts that vary between spellings.
fn normalise(name: &str) -> String {
    let n = name.trim().trim_end_matches('/').trim_end_matches(".git").to_ascii_lowercase();
    let n = n.split_once("://").map_or(n.as_str(), |(_, rest)| rest).to_owned();
    n.split_once('@').map_or(n.clone(), |(_, rest)| rest.replacen(':', "/", 1))
}

/// Whether a repository name's first part is a host (`github.com`, `git.lan:3000`), not an
/// owner.
fn is_host(part: &str) -> bool {
    part.contains('.') || part.contains(':') || part == "localhost"
}

/// Whether the payload's repository is the configured one: the same name or URL, or, for a
/// configured name without a host (`ops/fleet`), that name on whatever host the payload's URLs
/// name — exactly, never as a suffix of a longer path.
pub fn same_repository(configured: &str, payload_names: &[String]) -> bool {
    let want = normalise(configured);
    let want_has_host = want.split('/').next().is_some_and(is_host);
    payload_names.iter().any(|n| {
        let n = normalise(n);
        n == want
            || (!want_has_host && n.split_once('/').is_some_and(|(host, path)| is_host(host) && path == want))
    })
}

pub(super) fn zeros(rev: &str) -> bool {
    !rev.is_empty() && rev.bytes().all(|b| b == b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        // RFC 4231 test case 2.
        let sig = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert!(hmac_matches(b"Jefe", b"what do ya want for nothing?", sig));
        assert!(!hmac_matches(b"Jefe", b"what do ya want for nothing!", sig));
        assert!(!hmac_matches(b"jefe", b"what do ya want for nothing?", sig));
        assert!(!hmac_matches(b"Jefe", b"what do ya want for nothing?", "zz"));
        assert!(!hmac_matches(b"Jefe", b"what do ya want for nothing?", ""));
    }

    #[test]
    fn repositories_match_by_name_or_url() {
        let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let gh = names(&["ops/fleet", "https://github.com/ops/fleet.git", "git@github.com:ops/fleet.git"]);
        assert!(same_repository("ops/fleet", &gh));
        assert!(same_repository("https://github.com/Ops/fleet", &gh));
        assert!(same_repository("git@github.com:ops/fleet.git", &gh));
        assert!(!same_repository("ops/fleet-old", &gh));
        assert!(!same_repository("evil/ops/fleet2", &gh));
        assert!(!same_repository("other/fleet", &gh));
        // Another repository whose path merely ends in the configured name.
        let evil = names(&["x/ops/fleet", "https://evil.org/x/ops/fleet", "git@evil.org:x/ops/fleet.git"]);
        assert!(!same_repository("ops/fleet", &evil));
        // GitLab's nested groups are names like any other.
        let lab = names(&["infra/ops/fleet", "https://gitlab.example.org/infra/ops/fleet.git"]);
        assert!(same_repository("infra/ops/fleet", &lab));
        assert!(!same_repository("ops/fleet", &lab));
    }
}
