//! `GET /`: what a person who opens the cache's URL sees — how to use it (the `nix.conf`
//! lines, the NixOS block, `orchestrator use`), its public keys and priority, and how much it
//! holds. HTML when the client asks for it (a browser), the same lines as plain text otherwise
//! (curl). Behind read tokens an anonymous visitor learns how to use the cache, not what it
//! holds.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::app::{AppState, check_read};
use crate::index::IndexStatus;

/// What the page says, gathered from the request and the state.
struct Page {
    url: String,
    host: String,
    keys: Vec<String>,
    priority: u32,
    private: bool,
    /// `None` when the visitor may not know; `Some(None)` when the index is off or not listed.
    held: Option<Option<IndexStatus>>,
}

pub(super) async fn landing(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let (url, host) = base_url(&headers);
    let page = Page {
        url,
        host,
        keys: state.signing_keys.iter().map(|k| k.public_key().to_string()).collect(),
        priority: priority(&state.cache_info),
        private: state.read_tokens.is_some(),
        held: check_read(&state, &headers).is_ok().then(|| state.index.status()),
    };
    let html_wanted =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"));
    if html_wanted {
        ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], render(&page).into_string()).into_response()
    } else {
        ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text(&page)).into_response()
    }
}

/// The URL the visitor used (`Host`, and `X-Forwarded-Proto` from a TLS proxy in front), and
/// its host name. Only characters a host may have are taken; anything else gives a placeholder.
fn base_url(headers: &HeaderMap) -> (String, String) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let scheme = match header("x-forwarded-proto").and_then(|p| p.split(',').next()).map(str::trim) {
        Some("https") => "https",
        _ => "http",
    };
    let host = header("host")
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b)))
        .unwrap_or("cache.example.org");
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    (format!("{scheme}://{host}"), name.to_owned())
}

/// The priority line of the served `nix-cache-info`.
fn priority(cache_info: &str) -> u32 {
    cache_info.lines().find_map(|l| l.strip_prefix("Priority: ")?.trim().parse().ok()).unwrap_or(50)
}

fn nix_conf(p: &Page) -> String {
    let mut s = format!("extra-substituters = {}\n", p.url);
    if !p.keys.is_empty() {
        s += &format!("extra-trusted-public-keys = {}\n", p.keys.join(" "));
    }
    if p.private {
        s += "netrc-file = /etc/nix/netrc\n";
    }
    // An unreachable cache that drops packets then costs seconds, not curl's 300 s an attempt.
    s + "connect-timeout = 5\n"
}

fn netrc(p: &Page) -> String {
    format!("machine {} login fleetcache password YOUR-READ-TOKEN\n", p.host)
}

fn nixos(p: &Page) -> String {
    let keys: Vec<String> = p.keys.iter().map(|k| format!("\"{k}\"")).collect();
    let mut s = format!(
        "services.fleetcache.client = {{\n  enable = true;\n  url = \"{}\";\n  publicKeys = [ {} ];\n",
        p.url,
        keys.join(" ")
    );
    if p.private {
        s += "  netrcFile = \"/run/secrets/fleetcache-netrc\"; # the netrc line above\n";
    }
    s + "};\n"
}

fn use_command(p: &Page) -> String {
    let mut s = format!("orchestrator use {}", p.url);
    for k in &p.keys {
        s += &format!(" --public-key {k}");
    }
    if p.private {
        s += " --token-file ./read-token";
    }
    s + "\n"
}

/// "12 345 paths, 6.1 GiB", or why it is not said.
fn holding(held: Option<IndexStatus>) -> String {
    let Some(h) = held else {
        return "not counted yet (the index lists the store shortly after start; it is off with index-refresh-seconds = 0)".into();
    };
    let gib = h.bytes as f64 / (1u64 << 30) as f64;
    format!("{} paths, {gib:.1} GiB (listed {:.0} s ago)", h.paths, h.age_seconds)
}

fn text(p: &Page) -> String {
    let mut s = format!("fleetcache binary cache at {}\n\n", p.url);
    if p.keys.is_empty() {
        s += "This server signs nothing (read-only): trust the keys of whoever filled the store.\n";
    } else {
        s += &format!("Public keys: {}\n", p.keys.join(" "));
    }
    s += &format!("Priority: {} (lower is asked first; cache.nixos.org is 40)\n", p.priority);
    if let Some(held) = p.held {
        s += &format!("Holds: {}\n", holding(held));
    }
    s += &format!("\nnix.conf:\n{}", nix_conf(p));
    if p.private {
        s += &format!("\n/etc/nix/netrc (reads need a token):\n{}", netrc(p));
    }
    s += &format!("\nNixOS:\n{}\nOr on any machine:\n{}", nixos(p), use_command(p));
    s
}

/// The style of fleetcache's pages (this one and the orchestrator's): readable on a laptop and a
/// phone, light and dark as the system prefers.
const PAGE_STYLE: &str = "
:root { color-scheme: light dark; --fg: #1b1f24; --bg: #fbfbfa; --muted: #5b636e; --code: #eef0f2; --accent: #2f6f4f; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e6e3; --bg: #16181b; --muted: #9aa3ad; --code: #23272c; --accent: #7fc8a0; } }
body { font: 16px/1.5 system-ui, sans-serif; color: var(--fg); background: var(--bg); margin: 0 auto; max-width: 46rem; padding: 1.5rem 1rem 3rem; }
h1 { font-size: 1.6rem; margin: 0 0 .25rem; } h2 { font-size: 1.1rem; margin: 2rem 0 .5rem; color: var(--accent); }
p.lead { color: var(--muted); margin-top: 0; }
pre, code { font: 14px/1.45 ui-monospace, monospace; background: var(--code); border-radius: 6px; }
pre { padding: .75rem 1rem; overflow-x: auto; white-space: pre; } code { padding: .1rem .3rem; overflow-wrap: anywhere; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .35rem 1rem; } dt { color: var(--muted); } dd { margin: 0; }
footer { margin-top: 2.5rem; color: var(--muted); font-size: .9rem; } a { color: var(--accent); }
";

/// The `head` of fleetcache's pages: `title`, sized for phones, [`PAGE_STYLE`] and then
/// `extra_style`.
pub fn page_head(title: &str, extra_style: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) }
            style { (PreEscaped(PAGE_STYLE)) (PreEscaped(extra_style)) }
        }
    }
}

fn render(p: &Page) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (page_head(&format!("fleetcache — {}", p.url), ""))
            body {
                h1 { "fleetcache binary cache" }
                p.lead { "A Nix binary cache for this fleet, at " code #url { (p.url) } "." }
                dl {
                    dt { "Public keys" }
                    dd #keys {
                        @if p.keys.is_empty() {
                            "none: this server signs nothing (read-only)"
                        }
                        @for k in &p.keys { code.key { (k) } " " }
                    }
                    dt { "Priority" }
                    dd #priority { (p.priority) " (lower is asked first; cache.nixos.org is 40)" }
                    dt { "Reads" }
                    dd #reads { @if p.private { "need a read token" } @else { "public" } }
                    @if let Some(held) = p.held {
                        dt { "Holds" }
                        dd #holds { (holding(held)) }
                    }
                }
                h2 { "nix.conf" }
                pre #nix-conf { (nix_conf(p)) }
                @if p.private {
                    h2 { "/etc/nix/netrc" }
                    p { "Reads need a token, which Nix sends from a netrc file (readable by root only):" }
                    pre #netrc { (netrc(p)) }
                }
                h2 { "NixOS" }
                pre #nixos { (nixos(p)) }
                h2 { "Any machine" }
                p { "Adds what is missing to nix.conf (and the netrc), and says whether the daemon must be restarted:" }
                pre #use { (use_command(p)) }
                footer {
                    a href="/nix-cache-info" { "nix-cache-info" } " · "
                    a href="/api/v1/keys" { "keys (JSON)" } " · "
                    a href="/healthz" { "health" } " · "
                    a href="/metrics" { "metrics" }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (header::HeaderName::from_static(k), v.parse().unwrap())).collect()
    }

    #[test]
    fn the_url_is_the_one_the_visitor_used() {
        let u = |h| base_url(&headers(h));
        assert_eq!(u(&[("host", "cache.lan:8080")]), ("http://cache.lan:8080".into(), "cache.lan".into()));
        assert_eq!(
            u(&[("host", "cache.example"), ("x-forwarded-proto", "https")]),
            ("https://cache.example".into(), "cache.example".into())
        );
        assert_eq!(u(&[("host", "[::1]:80")]), ("http://[::1]:80".into(), "::1".into()));
        // Nothing a header carries reaches the page but a host's characters.
        assert_eq!(u(&[("host", "a\"b<script>")]).0, "http://cache.example.org");
        assert_eq!(u(&[("host", "x"), ("x-forwarded-proto", "javascript")]).0, "http://x");
    }

    #[test]
    fn snippets_name_the_keys_and_the_token_only_when_needed() {
        let mut p = Page {
            url: "https://c.example".into(),
            host: "c.example".into(),
            keys: vec!["c-1:AAAA".into(), "c-2:BBBB".into()],
            priority: 41,
            private: false,
            held: Some(None),
        };
        assert_eq!(
            nix_conf(&p),
            "extra-substituters = https://c.example\nextra-trusted-public-keys = c-1:AAAA c-2:BBBB\n\
             connect-timeout = 5\n"
        );
        assert!(
            nixos(&p).contains("publicKeys = [ \"c-1:AAAA\" \"c-2:BBBB\" ];") && !nixos(&p).contains("netrc")
        );
        p.private = true;
        assert!(nix_conf(&p).contains("netrc-file = /etc/nix/netrc\n"));
        assert!(text(&p).contains("machine c.example login fleetcache password YOUR-READ-TOKEN"));
        assert!(use_command(&p).contains("--token-file"));
        assert_eq!(priority("StoreDir: /nix/store\nPriority: 30\n"), 30);
    }
}
