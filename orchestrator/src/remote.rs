//! The CLI's side of `orchestrator serve`: submit a revision and follow it with the same
//! progress display and results as the embedded build; read the status and the builders.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::outcome::BuildReport;
use crate::report::{Phase, Reporter};
use crate::serve::{RequestView, Submit};
use crate::state::RevisionReport;
use crate::state::{BuilderInfo, RequestStatus};

/// Why talking to the orchestrator failed.
#[derive(Debug, Error)]
pub enum RemoteError {
    /// It could not be reached for too long, or its certificate is not trusted.
    #[error("orchestrator {url}: {}", builder::http::describe(.source))]
    Transport {
        /// The URL.
        url: String,
        /// The error.
        #[source]
        source: reqwest::Error,
    },
    /// It refused.
    #[error("orchestrator {url}: {status}: {message}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: reqwest::StatusCode,
        /// Its message.
        message: String,
    },
    /// It answered something too large or not the JSON expected.
    #[error("orchestrator {url}: {message}")]
    Answer {
        /// The URL.
        url: String,
        /// What is wrong with the answer.
        message: String,
    },
    /// The request could not be planned (bad revision, no lock, …).
    #[error("{0}")]
    Request(String),
}

/// Largest answer read from an orchestrator (`status --limit 100` with every attempt, a log of
/// `build.max-log-bytes`).
const MAX_ANSWER: usize = 256 << 20;

/// A client for one orchestrator.
pub struct Remote {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// How long a follow keeps retrying an orchestrator that does not answer (a restart).
const UNREACHABLE_FOR: Duration = Duration::from_secs(120);

impl Remote {
    /// A client for `base` (`https://…`) with an API token.
    pub fn new(base: &str, token: &str) -> Result<Self, builder::http::HttpError> {
        Ok(Remote {
            http: builder::http::client()?,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        path: &str,
    ) -> Result<T, RemoteError> {
        let url = format!("{}{path}", self.base);
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| RemoteError::Transport { url: url.clone(), source })?;
        let status = resp.status();
        if !status.is_success() {
            let message = builder::http::error_text(resp).await;
            return Err(RemoteError::Status { url, status, message });
        }
        builder::http::read_json(resp, MAX_ANSWER)
            .await
            .map_err(|message| RemoteError::Answer { url, message })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, RemoteError> {
        self.send(self.http.get(format!("{}{path}", self.base)), path).await
    }

    /// Submits a build; returns its request id.
    pub async fn submit(&self, submit: &Submit) -> Result<i64, RemoteError> {
        let path = "/api/v1/builds";
        let v: serde_json::Value =
            self.send(self.http.post(format!("{}{path}", self.base)).json(submit), path).await?;
        Ok(v["id"].as_i64().unwrap_or_default())
    }

    /// Follows request `id` until it ends, reporting phases as they change.
    pub async fn follow(&self, id: i64, reporter: &dyn Reporter) -> Result<BuildReport, RemoteError> {
        let path = format!("/api/v1/builds/{id}");
        let mut shown_revision = false;
        let mut phases: BTreeMap<String, String> = BTreeMap::new();
        let mut unreachable_since: Option<Instant> = None;
        loop {
            let view: RequestView = match self.get(&path).await {
                Ok(v) => {
                    unreachable_since = None;
                    v
                }
                // A body cut short (the server restarting) reads as a bad answer: asked again
                // for as long as an unreachable server is.
                Err(e @ RemoteError::Answer { .. }) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > UNREACHABLE_FOR {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(RemoteError::Transport { url, source })
                    if !builder::http::is_certificate_error(&source) =>
                {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > UNREACHABLE_FOR {
                        return Err(RemoteError::Transport { url, source });
                    }
                    if since.elapsed() < Duration::from_millis(600) {
                        let why = builder::http::describe(&source);
                        reporter.note(&format!("the orchestrator does not answer ({why}); still trying"));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if view.status == RequestStatus::Error {
                return Err(RemoteError::Request(
                    view.error.unwrap_or_else(|| "the request failed".to_owned()),
                ));
            }
            if let (false, Some(commit)) = (shown_revision, &view.commit) {
                reporter.revision(view.flake.as_deref().unwrap_or(""), &view.requested, commit, &view.inputs);
                shown_revision = true;
            }
            for v in &view.variants {
                if phases.get(&v.label) != Some(&v.phase) {
                    phases.insert(v.label.clone(), v.phase.clone());
                    let phase =
                        if v.done { Phase::Done(v.result.status) } else { Phase::Remote(v.phase.clone()) };
                    reporter.phase(&v.label, phase);
                }
            }
            if view.status == RequestStatus::Done {
                return Ok(BuildReport {
                    commit: view.commit.unwrap_or_default(),
                    inputs: view.inputs,
                    results: view.variants.into_iter().map(|v| v.result).collect(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The recorded revisions.
    pub async fn status(&self, limit: u32) -> Result<Vec<RevisionReport>, RemoteError> {
        self.get(&format!("/api/v1/status?limit={limit}")).await
    }

    /// A variant's build log.
    pub async fn log(&self, rev: &str, variant: &str) -> Result<crate::serve::LogView, RemoteError> {
        let q = crate::forge_status::encode;
        self.get(&format!("/api/v1/logs?rev={}&variant={}", q(rev), q(variant))).await
    }

    /// The registered builders.
    pub async fn builders(&self) -> Result<Vec<BuilderInfo>, RemoteError> {
        self.get("/api/v1/builders").await
    }
}
