//! What every status page shares: the frame (navigation, title, the JSON twin's link, log-out),
//! the answer when a page is not shown, and the way in.
//!
//! Read access is `server.status-page`: `public`, or `token` (the default): an API token, by
//! `Authorization` or by the login form, which keeps a random session id in an `HttpOnly`
//! cookie (sessions live in memory: a restart asks for the token again). No token, secret or
//! key is shown on any page.

use std::sync::Arc;

use axum::extract::{Form, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use cache_server::auth::presented_token;
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use super::server::Server;
use super::sessions::{COOKIE, SESSION_LIFETIME, session_id};
use crate::config::StatusPage;
use crate::state::StateError;

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
    pub(super) fn reader(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.config.server.status_page == StatusPage::Public {
            return Ok(());
        }
        let by_token = presented_token(headers).and_then(|t| self.api_tokens.check(&t));
        let by_session = session_id(headers).and_then(|id| self.sessions.user(id));
        by_token.or(by_session).map(drop).ok_or(Refusal::Login)
    }
}

pub(super) fn html_response(markup: Markup) -> Response {
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
@media (max-width: 40rem) {
  thead { display: none; } table, tbody { display: block; } tr { display: block; padding: .4rem 0; border-bottom: 1px solid var(--code); }
  td { display: block; border: 0; padding: .1rem .3rem; overflow-wrap: anywhere; } td:first-child { font-weight: 600; } .st { white-space: normal; }
}
";

impl Server {
    /// [`page`] as this server shows it: with a log-out button when the pages need a login.
    pub(super) fn page(&self, title: &str, json_twin: &str, body: Markup) -> Markup {
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
