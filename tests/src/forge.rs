//! A forge as far as fleetcache talks to one: push events shaped and signed as GitHub sends
//! them, and a recording stand-in for the commit-status API (the forges cannot run here).

use hmac::{Hmac, Mac};
use serde_json::{Value, json};

/// HMAC-SHA256 of `body` with `secret`, in hex, as GitHub and Gitea sign deliveries.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// A push event as GitHub sends it.
pub fn github_push(reference: &str, before: &str, after: &str, repo: &str) -> Value {
    json!({
        "ref": reference,
        "before": before,
        "after": after,
        "created": false,
        "deleted": false,
        "forced": false,
        "base_ref": null,
        "compare": format!("https://github.com/{repo}/compare/{}...{}", &before[..12], &after[..12]),
        "commits": [{
            "id": after,
            "tree_id": "0000000000000000000000000000000000000000",
            "distinct": true,
            "message": "flake.lock: update nixpkgs",
            "timestamp": "2026-11-27T06:00:00+00:00",
            "url": format!("https://github.com/{repo}/commit/{after}"),
            "author": { "name": "Alice", "email": "alice@example.org", "username": "alice" },
            "committer": { "name": "Alice", "email": "alice@example.org", "username": "alice" },
            "added": [], "removed": [], "modified": ["flake.lock"]
        }],
        "head_commit": { "id": after, "message": "flake.lock: update nixpkgs" },
        "repository": {
            "id": 4242, "node_id": "R_x", "name": repo.split('/').next_back().unwrap(), "full_name": repo,
            "private": true, "owner": { "login": repo.split('/').next().unwrap() },
            "html_url": format!("https://github.com/{repo}"),
            "clone_url": format!("https://github.com/{repo}.git"),
            "ssh_url": format!("git@github.com:{repo}.git"),
            "default_branch": "main"
        },
        "pusher": { "name": "alice", "email": "alice@example.org" },
        "sender": { "login": "alice", "id": 1 }
    })
}

/// The forge's commit-status API as far as we use it: records each request, answers 201. (The
/// forges themselves cannot run here; the payload shapes are checked by the assertions.)
pub struct FakeForge {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>,
}

impl FakeForge {
    /// Starts it on a free port.
    pub fn start() -> Self {
        use std::io::{BufRead as _, BufReader, Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap_or(0);
                let (mut length, mut auth) = (0usize, String::new());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap_or((&line, ""));
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap_or(0),
                        "authorization" => auth = value.trim().to_owned(),
                        _ => {}
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap_or(());
                let path = request_line.split_whitespace().nth(1).unwrap_or("").to_owned();
                record.lock().unwrap().push((path, auth, String::from_utf8_lossy(&body).into_owned()));
                let mut conn = conn;
                let _ = conn
                    .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
            }
        });
        FakeForge { url, seen }
    }

    /// The statuses set on `sha` so far.
    pub fn states(&self, sha: &str) -> Vec<(String, Value)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(path, _, _)| path.ends_with(&format!("/statuses/{sha}")))
            .map(|(_, auth, body)| (auth.clone(), serde_json::from_str(body).unwrap_or(Value::Null)))
            .collect()
    }
}
