//! The status pages of `orchestrator serve`: what the CLI and the JSON API show, for a browser.
//! Server-rendered HTML (maud) from the same state: the overview of the newest revisions with
//! each variant's live phase, a revision with its attempts, the builders and the webhook
//! deliveries (build logs are in [`super::logs`], the frame and the login in [`super::frame`]).
//! Every page links its JSON twin.

use std::sync::Arc;

use axum::extract::{Path, State as AxState};
use axum::http::HeaderMap;
use builder::api::{JobKind, VerifyStatus};
use maud::{Markup, html};

use super::frame::{PageResult, Refusal, html_response};
use super::logs::{log_link, strip_ansi};
use super::record::{BUILDER_ALIVE, describe_job};
use super::server::Server;
use crate::state::{BuilderInfo, JobStatus, RevisionReport, StateError, VariantReport, now};

/// Revisions on the overview.
const OVERVIEW_REVISIONS: u32 = 10;

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

/// The first 12 characters (a commit's short form; whatever a forge sent, cut at a character).
fn short(rev: &str) -> &str {
    rev.char_indices().nth(12).map_or(rev, |(i, _)| &rev[..i])
}

fn ago(unix: i64) -> String {
    crate::report::ago((now() - unix).max(0).unsigned_abs())
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

pub(super) async fn builders(AxState(s): AxState<Arc<Server>>, headers: HeaderMap) -> PageResult {
    s.reader(&headers)?;
    let builders = s.state.builders().await?;
    Ok(html_response(s.page(
        "Builders",
        "/api/v1/builders",
        html! {
            @if builders.is_empty() { p { "No builder has registered." } }
            @else { div.wrap { table {
                thead { tr { th { "name" } th { "systems" } th { "features" } th { "jobs held" } th { "done" } th { "last heard" } th { "version" } } }
                tbody { @for b in &builders {
                    tr.builder data-name=(b.name) {
                        td { (b.name) }
                        td { (b.systems.join(", ")) }
                        td {
                            @for f in &b.features { (f) " " }
                            @for f in &b.mandatory_features { strong title="mandatory: it takes only jobs that require it" { (f) "*" } " " }
                        }
                        td { (b.running) " of " (b.max_jobs) }
                        td.done { (b.built) " built" @if b.failed > 0 { ", " (b.failed) " failed" } }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_revisions_cut_at_a_character() {
        assert_eq!(short("3a5ffa7d8c2e3edda944"), "3a5ffa7d8c2e");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short("ééééééééééééé"), "éééééééééééé");
    }
}
