//! The `[webhooks]` table: which forge endpoints are on, which repository and branch count,
//! and where commit statuses go.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Forge webhooks. An endpoint whose secret is not configured is off (404), never open.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WebhooksConfig {
    /// The fleet repository as the forge names it: its full name (`ops/fleet`) or a clone or web
    /// URL. Pushes from any other repository are acknowledged and ignored. Required for hooks.
    #[serde(default)]
    pub repository: Option<String>,
    /// The branch whose pushes build. Default `main`.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// File with the GitHub webhook secret (`POST /hooks/github`, `X-Hub-Signature-256`).
    #[serde(default)]
    pub github_secret_file: Option<PathBuf>,
    /// File with the Gitea/Forgejo webhook secret (`POST /hooks/gitea`).
    #[serde(default)]
    pub gitea_secret_file: Option<PathBuf>,
    /// File with the GitLab secret token (`POST /hooks/gitlab`, `X-Gitlab-Token`).
    #[serde(default)]
    pub gitlab_token_file: Option<PathBuf>,
    /// Largest body accepted, in bytes (GitHub's own maximum). Default 25 MiB.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Seconds a push waits before it is looked at, so a burst of pushes builds only the newest
    /// head (the older ones are recorded as superseded). Default 5.
    #[serde(default = "default_debounce")]
    pub debounce_seconds: u64,
    /// Report builds started by a push back to the forge as a commit status. Default off.
    #[serde(default)]
    pub status: Option<CommitStatusConfig>,
}

/// A forge: where webhooks come from and commit statuses go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forge {
    /// github.com or GitHub Enterprise.
    #[serde(rename = "github")]
    GitHub,
    /// Gitea or Forgejo.
    #[serde(alias = "forgejo")]
    Gitea,
    /// GitLab.
    #[serde(rename = "gitlab")]
    GitLab,
}

impl Forge {
    /// Its name in the configuration, URLs, metrics and the state.
    pub fn name(self) -> &'static str {
        match self {
            Forge::GitHub => "github",
            Forge::Gitea => "gitea",
            Forge::GitLab => "gitlab",
        }
    }
}

/// Where commit statuses go.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CommitStatusConfig {
    /// `github`, `gitea` (Gitea and Forgejo; `forgejo` is read as `gitea`) or `gitlab`.
    pub forge: Forge,
    /// The API's base URL: `https://api.github.com`, or the instance (`https://git.example.org`).
    pub api_url: String,
    /// `owner/name` (the project path on GitLab). Default: `webhooks.repository`.
    #[serde(default)]
    pub repository: Option<String>,
    /// File with a token allowed to set commit statuses.
    pub token_file: PathBuf,
    /// The status's name on the commit. Default `fleetcache`.
    #[serde(default = "default_status_context")]
    pub context: String,
}

fn default_status_context() -> String {
    "fleetcache".to_owned()
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            repository: None,
            branch: default_branch(),
            github_secret_file: None,
            gitea_secret_file: None,
            gitlab_token_file: None,
            max_body_bytes: default_max_body(),
            debounce_seconds: default_debounce(),
            status: None,
        }
    }
}

fn default_branch() -> String {
    "main".to_owned()
}
fn default_max_body() -> usize {
    25 << 20
}
fn default_debounce() -> u64 {
    5
}
