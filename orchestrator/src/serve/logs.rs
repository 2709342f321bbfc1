//! Build logs for a browser: `/logs?drv=…` (or `?rev=&variant=`) shows a derivation's log as
//! text (ANSI escapes stripped); while the build runs the page follows it through
//! `/logs/events`, a stream of server-sent events, and once the build ended it shows the log
//! Nix kept, from the cache (its last [`CACHE_LOG_SHOWN`] bytes), or the orchestrator's own
//! copy when the cache has none.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State as AxState};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use maud::{PreEscaped, html};
use nix_formats::StorePath;
use serde::Deserialize;

use super::follow::{Following, LogRead};
use super::frame::{PageResult, Refusal, html_response};
use super::server::Server;

/// Most of the cache's log a page shows (its end).
pub const CACHE_LOG_SHOWN: usize = 4 << 20;

/// How long the page waits for the cache's log before it shows the orchestrator's.
const CACHE_LOG_WAIT: Duration = Duration::from_secs(5);

/// How much of the end of what a follower was sent is looked for in the next read, when the
/// log's beginning was cut in between (the state keeps its last `build.max-log-bytes`).
const ANCHOR_BYTES: usize = 1024;

#[derive(Deserialize)]
pub(super) struct LogQuery {
    drv: Option<String>,
    rev: Option<String>,
    variant: Option<String>,
    /// `orchestrator`: the log as the builder streamed it, even when the cache has Nix's.
    source: Option<String>,
}

/// Removes ANSI escape sequences (colours, cursor moves) and other control characters but
/// newlines and tabs, so a log shows as text.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.peek() {
                // CSI: parameters and intermediates, then one final byte in @..~.
                Some('[') => {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \.
                Some(']') => {
                    chars.next();
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                // Others: intermediate bytes (` ` to `/`), then one final byte.
                _ => {
                    while chars.next_if(|c| (' '..='/').contains(c)).is_some() {}
                    chars.next();
                }
            },
            '\n' | '\t' => out.push(c),
            '\r' => {}
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Escapes what a query would misread in a derivation path (its characters need no more).
fn query_value(drv: &str) -> String {
    drv.chars()
        .map(|c| match c {
            '+' => "%2B".to_owned(),
            '=' => "%3D".to_owned(),
            '?' => "%3F".to_owned(),
            '&' => "%26".to_owned(),
            '#' => "%23".to_owned(),
            ' ' => "%20".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// The log page of a derivation.
pub fn log_link(drv: &str) -> String {
    format!("/logs?drv={}", query_value(drv))
}

/// What a reader who was shown `shown` needs to see `now`.
#[derive(Debug, PartialEq, Eq)]
enum LogChange<'a> {
    Same,
    /// `now` is `shown` and then this.
    Append(&'a str),
    /// Start again with all of `now`.
    Replace(&'a str),
}

/// Compares two reads of a growing log whose beginning may have been cut in between: the new
/// part follows the end of `shown` when that end occurs in `now` exactly once; else the
/// reader starts again.
fn log_change<'a>(shown: &str, now: &'a str) -> LogChange<'a> {
    if let Some(rest) = now.strip_prefix(shown) {
        return if rest.is_empty() { LogChange::Same } else { LogChange::Append(rest) };
    }
    let mut from = shown.len().saturating_sub(ANCHOR_BYTES);
    while !shown.is_char_boundary(from) {
        from += 1;
    }
    let anchor = &shown[from..];
    let mut found = now.match_indices(anchor);
    match (found.next(), found.next()) {
        (Some((at, _)), None) if !anchor.is_empty() => {
            let rest = &now[at + anchor.len()..];
            if rest.is_empty() { LogChange::Same } else { LogChange::Append(rest) }
        }
        _ => LogChange::Replace(now),
    }
}

/// The derivation a query names.
async fn named(s: &Server, q: &LogQuery) -> Result<String, Refusal> {
    match (&q.drv, &q.rev, &q.variant) {
        (Some(drv), _, _) => Ok(drv.clone()),
        (None, Some(rev), Some(variant)) => s
            .state
            .variant_drv(rev, variant)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("no build of {variant} at {rev}"))),
        _ => Err(Refusal::NotFound("name a derivation (?drv=) or a revision and a variant".into())),
    }
}

/// Where an ended build's log came from.
enum Kept {
    /// Nix's log in the cache: its end, and the whole size.
    Cache(u64),
    /// The orchestrator's copy; why not the cache's, when it was asked.
    Orchestrator(Option<String>),
}

/// The log Nix kept for `drv`, from the cache, if it has one.
async fn cache_log(s: &Server, drv: &str) -> Result<Option<(String, u64)>, String> {
    let path = StorePath::from_absolute(drv).map_err(|e| e.to_string())?;
    let asked = tokio::time::timeout(CACHE_LOG_WAIT, s.cache.client.log_tail(&path, CACHE_LOG_SHOWN));
    match asked.await {
        Err(_) => Err(format!("the cache did not answer within {} s", CACHE_LOG_WAIT.as_secs())),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(tail)) => Ok(tail.map(|t| (t.text, t.total_bytes))),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

pub(super) async fn log(
    AxState(s): AxState<Arc<Server>>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> PageResult {
    s.reader(&headers)?;
    let drv = named(&s, &q).await?;
    let (mut text, running) = s.state.job_log(&drv).await?.unwrap_or_default();
    let mut kept = Kept::Orchestrator(None);
    if !running && q.source.as_deref() != Some("orchestrator") {
        match cache_log(&s, &drv).await {
            Ok(Some((log, total))) => {
                text = log;
                kept = Kept::Cache(total);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(drv, error = %e, "reading the build log from the cache");
                kept = Kept::Orchestrator(Some(e));
            }
        }
    }
    let name = drv.rsplit('/').next().unwrap_or(&drv).to_owned();
    let builder_copy = format!("{}&source=orchestrator", log_link(&drv));
    Ok(html_response(s.page(
        &format!("Log of {name}"),
        "",
        html! {
            p #log-state {
                @if running {
                    span #log-live .st.running { "running" } " — this page follows the build."
                } @else {
                    @match &kept {
                        Kept::Cache(total) => {
                            span #log-source data-source="cache" { "ended — the log Nix kept, from the cache" }
                            @if *total > CACHE_LOG_SHOWN as u64 {
                                " (its last " (mib(CACHE_LOG_SHOWN as u64)) " of " (mib(*total)) ")"
                            }
                            " · " a href=(builder_copy) { "as the builder streamed it" }
                        }
                        Kept::Orchestrator(why) => {
                            span #log-source data-source="orchestrator" {
                                @if text.is_empty() { span.muted { "No log was recorded (yet)." } } @else { "ended" }
                            }
                            @if let Some(why) = why { " " span.muted { "(the cache's log could not be read: " (why) ")" } }
                        }
                    }
                }
            }
            pre.log #log data-events="0" data-follow={ "/logs/events?drv=" (query_value(&drv)) } { (strip_ansi(&text)) }
            @if running { script { (PreEscaped(FOLLOW_LOG)) } }
        },
    )))
}

/// What a followed log has sent so far.
struct Follow {
    following: Following,
    /// The read last sent; none before the first event.
    shown: Option<Arc<LogRead>>,
    ended: bool,
}

impl Follow {
    /// The events of the next read: the log's change (all of it first: a reconnecting browser
    /// starts again), then `end` once the build ended. The stream ends when the feed closes
    /// without saying so (the log could not be read: the browser reconnects after `retry`).
    async fn next(mut self) -> Option<(Vec<Event>, Follow)> {
        if self.ended {
            return None;
        }
        self.following.changed().await.ok()?;
        // The feed starts empty and is never emptied: a change is a read.
        let read = self.following.borrow_and_update().clone()?;
        let change = match &self.shown {
            Some(shown) => log_change(&shown.text, &read.text),
            None => LogChange::Replace(&read.text),
        };
        let mut events = Vec::new();
        let data =
            |kind: &str, text: &str| Event::default().event(kind).json_data(text).expect("a string is JSON");
        match change {
            LogChange::Same => {}
            LogChange::Append(rest) => events.push(data("append", rest)),
            LogChange::Replace(all) => events.push(data("replace", all)),
        }
        if !read.running {
            events.push(Event::default().event("end").data("ended"));
            self.ended = true;
        }
        self.shown = Some(read);
        Some((events, self))
    }
}

/// `/logs/events`: the log of a derivation as server-sent events while it is built —
/// `replace` (the log so far, JSON text), `append` (what came since, JSON text), and `end`.
pub(super) async fn events(
    AxState(s): AxState<Arc<Server>>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    s.reader(&headers)?;
    let drv = named(&s, &q).await?;
    let state = s.state.clone();
    let following = s.log_feeds.follow(&drv, move |drv| {
        let state = state.clone();
        async move {
            let (log, running) = state.job_log(&drv).await.map_err(|e| e.to_string())?.unwrap_or_default();
            Ok(LogRead { text: strip_ansi(&log), running })
        }
    });
    let follow = Follow { following, shown: None, ended: false };
    let stream = futures_util::stream::unfold(follow, Follow::next)
        .flat_map(futures_util::stream::iter)
        .map(Ok::<_, Infallible>);
    let mut resp = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    // A proxy must pass each event on as it comes (nginx buffers otherwise).
    resp.headers_mut().insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// While the build runs, the page takes the log's events, staying at the end if the reader was
/// there; when the build ended it takes the final log (the cache's) from the page once more.
const FOLLOW_LOG: &str = "
(() => {
  const log = document.getElementById('log'), state = document.getElementById('log-state');
  const follow = (change) => {
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    change();
    log.dataset.events = Number(log.dataset.events) + 1;
    if (atEnd) log.scrollTop = log.scrollHeight;
  };
  log.scrollTop = log.scrollHeight;
  const events = new EventSource(log.dataset.follow);
  events.addEventListener('replace', e => follow(() => { log.textContent = JSON.parse(e.data); }));
  events.addEventListener('append', e => follow(() => { log.append(JSON.parse(e.data)); }));
  events.addEventListener('end', async () => {
    events.close();
    try {
      const page = new DOMParser().parseFromString(await (await fetch(location.href)).text(), 'text/html');
      const final = page.getElementById('log'), newState = page.getElementById('log-state');
      if (final) follow(() => { log.textContent = final.textContent; });
      if (newState) state.innerHTML = newState.innerHTML;
    } catch (e) { state.textContent = 'ended (reload the page for the final log)'; }
  });
})();
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_show_as_text() {
        assert_eq!(strip_ansi("\u{1b}[1;31merror:\u{1b}[0m build failed\r\n"), "error: build failed\n");
        assert_eq!(strip_ansi("a\u{1b}]0;title\u{7}b\u{1b}]8;;http://x\u{1b}\\c\td"), "abc\td");
        assert_eq!(strip_ansi("bell\u{7} and \u{1b}(B charset"), "bell and  charset");
        assert_eq!(strip_ansi("é ✓ <b>"), "é ✓ <b>");
    }

    #[test]
    fn log_links_escape_what_a_query_would_misread() {
        assert_eq!(log_link("/nix/store/abc-a+b=c?.drv"), "/logs?drv=/nix/store/abc-a%2Bb%3Dc%3F.drv");
    }

    #[test]
    fn a_followed_log_sends_what_is_new() {
        assert_eq!(log_change("", ""), LogChange::Same);
        assert_eq!(log_change("a\nb\n", "a\nb\n"), LogChange::Same);
        assert_eq!(log_change("a\n", "a\nb\n"), LogChange::Append("b\n"));
        // The beginning was cut (the state keeps the log's end): what follows the old end.
        assert_eq!(log_change("line 1\nline 2\n", "ne 2\nline 3\n"), LogChange::Replace("ne 2\nline 3\n"));
        let long: String = (0..400).map(|i| format!("line {i}\n")).collect();
        let cut = format!("{}line 400\n", &long[100..]);
        assert_eq!(log_change(&long, &cut), LogChange::Append("line 400\n"));
        assert_eq!(log_change(&long, &long[100..]), LogChange::Same);
        // The old end twice in the new text: no telling which; start again.
        let (shown, now) = (format!("y{}", "x".repeat(2000)), "x".repeat(2500));
        assert_eq!(log_change(&shown, &now), LogChange::Replace(&now));
        // The anchor starts at a character (here byte 977 is inside an `é`).
        let accents = format!("{}a", "é".repeat(1000));
        assert_eq!(log_change(&accents, &format!("{}!", &accents[2..])), LogChange::Append("!"));
    }
}
