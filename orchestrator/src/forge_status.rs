//! Commit statuses: a build started by a push shows on the commit in the forge (pending while
//! it builds, success or failure when it ends).

use crate::config::{CommitStatusConfig, Forge};

/// A commit status's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitState {
    /// Queued or building.
    Pending,
    /// Every variant cached or built.
    Success,
    /// Some variant failed.
    Failure,
}

/// Sets the status of `sha`. Failures are returned for the caller to log: a forge that is down
/// must not stop builds.
pub async fn report(
    http: &reqwest::Client,
    cfg: &CommitStatusConfig,
    fallback_repository: Option<&str>,
    sha: &str,
    state: CommitState,
    description: &str,
) -> Result<(), String> {
    let repo = cfg.repository.as_deref().or(fallback_repository).ok_or("no repository configured")?;
    let token = std::fs::read_to_string(&cfg.token_file)
        .map_err(|e| format!("reading {}: {e}", cfg.token_file.display()))?;
    let token = token.trim();
    let api = cfg.api_url.trim_end_matches('/');
    let description: String = description.chars().take(140).collect();
    let request = match cfg.forge {
        Forge::GitLab => {
            let state = match state {
                CommitState::Pending => "running",
                CommitState::Success => "success",
                CommitState::Failure => "failed",
            };
            let query =
                format!("state={state}&name={}&description={}", encode(&cfg.context), encode(&description));
            http.post(format!("{api}/api/v4/projects/{}/statuses/{sha}?{query}", encode(repo)))
                .header("PRIVATE-TOKEN", token)
        }
        forge => {
            let state = match state {
                CommitState::Pending => "pending",
                CommitState::Success => "success",
                CommitState::Failure => "failure",
            };
            let body =
                serde_json::json!({ "state": state, "context": cfg.context, "description": description });
            let (url, auth) = if forge == Forge::GitHub {
                (format!("{api}/repos/{repo}/statuses/{sha}"), format!("Bearer {token}"))
            } else {
                (format!("{api}/api/v1/repos/{repo}/statuses/{sha}"), format!("token {token}"))
            };
            http.post(url)
                .header("Authorization", auth)
                .header("Accept", "application/vnd.github+json")
                .json(&body)
        }
    };
    let resp =
        request.header("User-Agent", "fleetcache").send().await.map_err(|e| builder::http::describe(&e))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        let status = resp.status();
        Err(format!("{status}: {}", resp.text().await.unwrap_or_default().trim()))
    }
}

/// Percent-encodes everything but unreserved characters (for paths and query strings).
pub(crate) fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
