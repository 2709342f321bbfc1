//! The status pages of `orchestrator serve`: what the CLI and the JSON API show, for a browser.
//! Server-rendered HTML (maud) from the same state: the overview of the newest revisions with
//! each variant's live phase, a revision with its attempts, a build log (following the build
//! while it runs), the builders and the webhook deliveries. Every page links its JSON twin.
//!
//! Read access is `server.status-page`: `public`, or `token` (the default): an API token, by
//! `Authorization` or by the login form, which keeps a random session id in an `HttpOnly`
//! cookie (sessions live in memory: a restart asks for the token again). No token, secret or
//! key is shown on any page.

use std::sync::Arc;

use axum::extract::{Form, Path, Query, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use builder::api::{JobKind, VerifyStatus};
use cache_server::auth::presented_token;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use super::record::{BUILDER_ALIVE, describe_job, find_log};
use super::server::Server;
use super::sessions::{COOKIE, SESSION_LIFETIME, session_id};
use crate::config::StatusPage;
use crate::state::{BuilderInfo, JobStatus, RevisionReport, StateError, VariantReport, now};

/// Revisions on the overview.
const OVERVIEW_REVISIONS: u32 = 10;

/// Why a page is not shown.
pub(super) enum Refusal {
    /// Not logged in: to the login form.
    Login,
    /// The state database failed.
    State,
    /// No such thing.
    NotFound(String),
}

impl From<StateError> for Refusal {
    fn from(e: StateError) -> Self {
        tracing::error!(error = %e, "state");
        Refusal::State
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Login => Redirect::to("/login").into_response(),
            Refusal::State => {
                let body = page("Unavailable", "", html! { p { "The state database failed; retry later." } });
                (StatusCode::SERVICE_UNAVAILABLE, html_response(body)).into_response()
            }
            Refusal::NotFound(what) => {
                (StatusCode::NOT_FOUND, html_response(page("Not found", "", html! { p { (what) } })))
                    .into_response()
            }
        }
    }
}

pub(super) type PageResult = Result<Response, Refusal>;

impl Server {
    /// Whether the visitor may read the pages.
    fn reader(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.config.server.status_page == StatusPage::Public {
            return Ok(());
        }
        let by_token = presented_token(headers).and_then(|t| self.api_tokens.check(&t));
        let by_session = session_id(headers).and_then(|id| self.sessions.user(id));
        by_token.or(by_session).map(drop).ok_or(Refusal::Login)
    }
}

fn html_response(markup: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
        markup.into_string(),
    )
        .into_response()
}

const EXTRA_STYLE: &str = "
body { max-width: 72rem; }
nav { display: flex; gap: 1rem; flex-wrap: wrap; margin-bottom: 1rem; } nav a { text-decoration: none; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0 1rem; } th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid var(--code); vertical-align: top; }
th { color: var(--muted); font-weight: 600; } .wrap { overflow-x: auto; }
.st { font-weight: 600; white-space: nowrap; } .cached, .built, .verified { color: #2f8f4f; } .failed, .push-failed, .verify-failed { color: #c0392b; }
.building, .pushing, .queued, .waiting, .running { color: #b7791f; } .muted { color: var(--muted); }
pre.log { max-height: 75vh; overflow: auto; white-space: pre-wrap; }
form.login { display: grid; gap: .6rem; max-width: 22rem; } input { font: inherit; padding: .4rem; }
";

impl Server {
    /// [`page`] as this server shows it: with a log-out button when the pages need a login.
    fn page(&self, title: &str, json_twin: &str, body: Markup) -> Markup {
        chrome(title, json_twin, self.config.server.status_page == StatusPage::Token, body)
    }
}

/// A page without a log-out button (the login form, errors).
fn page(title: &str, json_twin: &str, body: Markup) -> Markup {
    chrome(title, json_twin, false, body)
}

/// A whole page: the navigation, `title`, `body`, a link to the JSON twin, and a log-out button
/// when `logout`.
fn chrome(title: &str, json_twin: &str, logout: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (cache_server::http::page_head(&format!("{title} — fleetcache"), EXTRA_STYLE))
            body {
                nav {
                    a href="/" { "Overview" }
                    a href="/builders" { "Builders" }
                    a href="/webhooks" { "Webhook deliveries" }
                }
                h1 { (title) }
                (body)
                footer {
                    @if !json_twin.is_empty() { a.json href=(json_twin) { "this page as JSON" } " · " }
                    a href="/metrics" { "metrics" }
                    @if logout {
                        " · "
                        form method="post" action="/logout" style="display:inline" { button type="submit" { "log out" } }
                    }
                }
            }
        }
    }
}

/// A variant's state in one word (its CSS class) and in words, live from its jobs.
struct Shown {
    class: &'static str,
    words: String,
}

/// `builders`: the registered builders, read once for the whole page.
async fn shown(
    server: &Server,
    variant: &VariantReport,
    builders: &[BuilderInfo],
) -> Result<Shown, StateError> {
    let done = matches!(variant.status.as_str(), "cached" | "built" | "failed" | "interrupted");
    let drvs: Vec<String> = variant.drv_path.iter().cloned().collect();
    if done {
        // Only an ended variant shows its verification.
        let checks = server.state.jobs_for(&drvs, JobKind::Verify).await?;
        let verification =
            variant.drv_path.as_ref().and_then(|d| checks.get(d)).and_then(|j| j.verification.clone());
        let (class, mut words) = match variant.status.as_str() {
            "cached" => ("cached", "cached".to_owned()),
            "built" => ("built", "built".to_owned()),
            "failed" => {
                ("failed", format!("failed: {}", strip_ansi(variant.error.as_deref().unwrap_or("?"))))
            }
            _ => ("failed", "interrupted".to_owned()),
        };
        let mut class = class;
        if let Some(v) = verification {
            match v.status {
                VerifyStatus::Verified => {
                    class = "verified";
                    words += &format!("; verified on hardware by {}", v.by);
                }
                VerifyStatus::VerifyFailed => {
                    class = "verify-failed";
                    words += &format!("; verification failed on {}", v.by);
                }
                VerifyStatus::Unverified => words += "; not verified (no builder with the features)",
            }
        }
        return Ok(Shown { class, words });
    }
    let jobs = server.state.jobs_for(&drvs, JobKind::Build).await?;
    let Some(job) = variant.drv_path.as_ref().and_then(|d| jobs.get(d)) else {
        return Ok(Shown { class: "queued", words: variant.status.clone() });
    };
    let words = match (job.status, &job.error) {
        (JobStatus::Failed, Some(error)) => format!("failed: {}", strip_ansi(error)),
        _ => describe_job(job, builders),
    };
    let class = match job.status {
        JobStatus::Claimed if job.phase.as_deref() == Some("pushing") => "pushing",
        JobStatus::Claimed => "building",
        JobStatus::Queued if words.starts_with("waiting") => "waiting",
        JobStatus::Queued => "queued",
        JobStatus::Built => "built",
        _ => "failed",
    };
    Ok(Shown { class, words })
}

/// `/logs?drv=…` for a derivation (its characters need only `+`, `=` and `?` escaped).
fn log_link(drv: &str) -> String {
    let escaped: String = drv
        .chars()
        .map(|c| match c {
            '+' => "%2B".to_owned(),
            '=' => "%3D".to_owned(),
            '?' => "%3F".to_owned(),
            '&' => "%26".to_owned(),
            '#' => "%23".to_owned(),
            ' ' => "%20".to_owned(),
            c => c.to_string(),
        })
        .collect();
    format!("/logs?drv={escaped}")
}

/// The first 12 characters (a commit's short form; whatever a forge sent, cut at a character).
fn short(rev: &str) -> &str {
    rev.char_indices().nth(12).map_or(rev, |(i, _)| &rev[..i])
}

fn ago(unix: i64) -> String {
    let s = (now() - unix).max(0);
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86400),
    }
}

async fn revision_table(
    server: &Server,
    r: &RevisionReport,
    builders: &[BuilderInfo],
) -> Result<Markup, StateError> {
    let mut rows = Vec::new();
    for v in &r.variants {
        rows.push((v, shown(server, v, builders).await?));
    }
    Ok(html! {
        p.muted {
            "locked: "
            @for (i, input) in r.inputs.iter().enumerate() {
                @if i > 0 { ", " }
                (input.name) " " code { (input.rev.as_deref().map(short).unwrap_or("(no rev)")) }
            }
            " · last run " (ago(r.last_run))
        }
        div.wrap { table {
            thead { tr { th { "variant" } th { "system" } th { "state" } th { "machines" } th { "log" } } }
            tbody {
                @for (v, s) in &rows {
                    tr.variant data-variant=(v.variant) data-system=(v.system) {
                        td { (v.variant) }
                        td { (v.system) }
                        td { span class={ "st " (s.class) } { (s.words) } }
                        td { @if v.machines.is_empty() { span.muted { "—" } } @else { (v.machines.join(", ")) } }
                        td { @if let Some(d) = &v.drv_path { a href=(log_link(d)) { "log" } } }
                    }
                }
            }
        } }
    })
}

pub(super) async fn overview(AxState(s): AxState<Arc<Server>>, headers: HeaderMap) -> PageResult {
    s.reader(&headers)?;
    let revisions = s.state.report(OVERVIEW_REVISIONS).await?;
    let builders = s.state.builders().await?;
    let mut sections = Vec::new();
    for r in &revisions {
        sections.push((r, revision_table(&s, r, &builders).await?));
    }
    Ok(html_response(s.page(
        "Fleet revisions",
        "/api/v1/status",
        html! {
            @if sections.is_empty() {
                p { "No revision was built yet: " code { "orchestrator build --server … --rev main" } " or a webhook starts one." }
            }
            @for (r, table) in &sections {
                section.revision data-rev=(r.rev) {
                    h2 { a href={ "/revisions/" (r.rev) } { code { (short(&r.rev)) } } " " span.muted { (r.requested) } }
                    (table)
                }
            }
        },
    )))
}

pub(super) async fn revision(
    AxState(s): AxState<Arc<Server>>,
    Path(rev): Path<String>,
    headers: HeaderMap,
) -> PageResult {
    s.reader(&headers)?;
    let revisions = s.state.report(100).await?;
    let r = revisions
        .iter()
        .find(|r| r.rev == rev || (rev.len() >= 7 && r.rev.starts_with(&rev)))
        .ok_or_else(|| Refusal::NotFound(format!("no revision {rev} among the last 100")))?;
    let table = revision_table(&s, r, &s.state.builders().await?).await?;
    Ok(html_response(s.page(
        &format!("Revision {}", short(&r.rev)),
        "/api/v1/status?limit=100",
        html! {
            p { code { (r.rev) } " of " code { (r.flake) } ", asked as " code { (r.requested) } }
            (table)
            @for v in &r.variants {
                h2 { (v.variant) " " span.muted { (v.system) } }
                @if let Some(d) = &v.drv_path { p.muted { code { (d) } } }
                @if v.attempts.is_empty() { p.muted { "No build attempt (cached, or not started)." } }
                @else {
                    div.wrap { table.attempts {
                        thead { tr { th { "#" } th { "by" } th { "started" } th { "state" } th { "took" } th { "error" } } }
                        tbody { @for a in &v.attempts {
                            tr {
                                td { (a.id) }
                                td { (a.owner) }
                                td { (ago(a.started_at)) }
                                td { span class={ "st " (a.status) } { (a.status) } }
                                td { @if let Some(t) = a.seconds { (format!("{t:.0} s")) } }
                                td { (strip_ansi(a.error.as_deref().unwrap_or(""))) }
                            }
                        } }
                    } }
                }
            }
        },
    )))
}

#[derive(Deserialize)]
pub(super) struct LogQuery {
    drv: Option<String>,
    rev: Option<String>,
    variant: Option<String>,
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

pub(super) async fn log(
    AxState(s): AxState<Arc<Server>>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> PageResult {
    s.reader(&headers)?;
    let (drv, text, running) = match (&q.drv, &q.rev, &q.variant) {
        (Some(drv), _, _) => {
            let (log, running) = s.state.job_log(drv).await?.unwrap_or_default();
            (drv.clone(), log, running)
        }
        (None, Some(rev), Some(variant)) => {
            let view = find_log(&s.state, rev, variant)
                .await?
                .ok_or_else(|| Refusal::NotFound(format!("no build of {variant} at {rev}")))?;
            (view.drv_path, view.log, view.running)
        }
        _ => return Err(Refusal::NotFound("name a derivation (?drv=) or a revision and a variant".into())),
    };
    let name = drv.rsplit('/').next().unwrap_or(&drv).to_owned();
    Ok(html_response(s.page(
        &format!("Log of {name}"),
        "",
        html! {
            p #log-state {
                @if running {
                    span #log-live .st.running { "running" } " — this page follows the build."
                } @else if text.is_empty() {
                    span.muted { "No log was recorded (yet)." }
                } @else { "ended" }
            }
            pre.log #log data-polls="0" { (strip_ansi(&text)) }
            @if running { script { (PreEscaped(FOLLOW_LOG)) } }
        },
    )))
}

/// While the build runs, the log page fetches itself again every 1.5 s and takes the new log
/// and state from it, staying at the end if the reader was there; it stops once the build ended.
const FOLLOW_LOG: &str = "
(() => {
  const log = document.getElementById('log'), state = document.getElementById('log-state');
  log.scrollTop = log.scrollHeight;
  async function poll() {
    try {
      const page = new DOMParser().parseFromString(await (await fetch(location.href)).text(), 'text/html');
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      const newLog = page.getElementById('log'), newState = page.getElementById('log-state');
      if (newLog) log.textContent = newLog.textContent;
      if (newState) state.innerHTML = newState.innerHTML;
      log.dataset.polls = Number(log.dataset.polls) + 1;
      if (atEnd) log.scrollTop = log.scrollHeight;
      if (page.getElementById('log-live')) setTimeout(poll, 1500);
    } catch (e) { setTimeout(poll, 5000); }
  }
  setTimeout(poll, 1500);
})();
";

pub(super) async fn builders(AxState(s): AxState<Arc<Server>>, headers: HeaderMap) -> PageResult {
    s.reader(&headers)?;
    let builders = s.state.builders().await?;
    Ok(html_response(s.page(
        "Builders",
        "/api/v1/builders",
        html! {
            @if builders.is_empty() { p { "No builder has registered." } }
            @else { div.wrap { table {
                thead { tr { th { "name" } th { "systems" } th { "features" } th { "jobs held" } th { "last heard" } th { "version" } } }
                tbody { @for b in &builders {
                    tr.builder data-name=(b.name) {
                        td { (b.name) }
                        td { (b.systems.join(", ")) }
                        td {
                            @for f in &b.features { (f) " " }
                            @for f in &b.mandatory_features { strong title="mandatory: it takes only jobs that require it" { (f) "*" } " " }
                        }
                        td { (b.running) " of " (b.max_jobs) }
                        td { @if now() - b.last_seen < BUILDER_ALIVE { (ago(b.last_seen)) } @else { span.muted { (ago(b.last_seen)) " (gone)" } } }
                        td { (b.version) }
                    }
                } }
            } }
            p.muted { "* mandatory feature: the builder takes only jobs that require it." } }
        },
    )))
}

pub(super) async fn webhooks(AxState(s): AxState<Arc<Server>>, headers: HeaderMap) -> PageResult {
    s.reader(&headers)?;
    let pushes = s.state.pushes().await?;
    Ok(html_response(s.page(
        "Webhook deliveries",
        "/api/v1/pushes",
        html! {
            @if pushes.is_empty() { p { "No push was delivered." } }
            @else { div.wrap { table {
                thead { tr { th { "forge" } th { "ref" } th { "before → after" } th { "decision" } } }
                tbody { @for p in pushes.iter().rev() {
                    tr.delivery {
                        td { (p.forge) }
                        td { code { (p.ref_name) } }
                        td { code { (short(&p.before)) } " → " code { (short(&p.after)) } }
                        td { span class={ "st " (p.decision.split(':').next().unwrap_or("")) } { (p.decision) }
                             @if let Some(id) = p.request_id { " (request " (id) ")" } }
                    }
                } }
            } } }
        },
    )))
}

pub(super) async fn login_form() -> Response {
    html_response(login_page(None))
}

fn login_page(error: Option<&str>) -> Markup {
    page(
        "Log in",
        "",
        html! {
            @if let Some(e) = error { p #login-error .st.failed { (e) } }
            form.login method="post" action="/login" {
                label for="token" { "API token (a line of server.api-tokens-file)" }
                input #token type="password" name="token" autocomplete="current-password" required;
                button type="submit" { "Log in" }
            }
        },
    )
}

#[derive(Deserialize)]
pub(super) struct Login {
    token: String,
}

pub(super) async fn login(
    AxState(s): AxState<Arc<Server>>,
    headers: HeaderMap,
    Form(form): Form<Login>,
) -> Response {
    let Some(user) = s.api_tokens.check(form.token.trim().as_bytes()) else {
        s.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return (
            StatusCode::UNAUTHORIZED,
            html_response(login_page(Some("That is not an API token of this server."))),
        )
            .into_response();
    };
    let id = s.sessions.start(&user);
    let secure = headers.get("x-forwarded-proto").is_some_and(|p| p.as_bytes().starts_with(b"https"));
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    );
    let mut resp = Redirect::to("/").into_response();
    resp.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("ascii"));
    resp
}

pub(super) async fn logout(AxState(s): AxState<Arc<Server>>, headers: HeaderMap) -> Response {
    if let Some(id) = session_id(&headers) {
        s.sessions.end(id);
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("fleetcache_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    resp
}

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
    fn short_revisions_cut_at_a_character() {
        assert_eq!(short("3a5ffa7d8c2e3edda944"), "3a5ffa7d8c2e");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short("ééééééééééééé"), "éééééééééééé");
    }

    #[test]
    fn log_links_escape_what_a_query_would_misread() {
        assert_eq!(log_link("/nix/store/abc-a+b=c?.drv"), "/logs?drv=/nix/store/abc-a%2Bb%3Dc%3F.drv");
    }
}
