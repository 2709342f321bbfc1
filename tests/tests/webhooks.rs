//! Forge webhooks on `orchestrator serve`: payloads shaped as GitHub, Gitea/Forgejo and GitLab
//! send them, signed as they sign them, against the stand-in fleet.

use std::time::{Duration, Instant};

use fleetcache_tests::cache_server::CacheServer;
use fleetcache_tests::forge::{FakeForge, github_push, sign};
use fleetcache_tests::nix::{TempStore, run};
use fleetcache_tests::orchestrator::Setup;
use fleetcache_tests::serve::{DEFAULT_AND_CUDA, Orchestrator, configure, start_builder, start_orchestrator};
use nix_formats::StorePath;
use serde_json::{Value, json};

const VARIANTS: &str = DEFAULT_AND_CUDA;

fn gitea_push(before: &str, after: &str) -> Value {
    json!({
        "ref": "refs/heads/main",
        "before": before,
        "after": after,
        "compare_url": format!("https://git.example.org/ops/fleet/compare/{before}...{after}"),
        "commits": [{ "id": after, "message": "nixpkgs bump\n", "url": "https://git.example.org/ops/fleet/commit/x",
                      "author": { "name": "Alice", "email": "alice@example.org", "username": "alice" },
                      "added": [], "removed": [], "modified": ["flake.lock"] }],
        "total_commits": 1,
        "head_commit": { "id": after },
        "repository": {
            "id": 7, "owner": { "id": 1, "login": "ops", "username": "ops" }, "name": "fleet", "full_name": "ops/fleet",
            "private": true, "html_url": "https://git.example.org/ops/fleet",
            "ssh_url": "git@git.example.org:ops/fleet.git", "clone_url": "https://git.example.org/ops/fleet.git",
            "default_branch": "main"
        },
        "pusher": { "id": 1, "login": "alice" },
        "sender": { "id": 1, "login": "alice" }
    })
}

fn gitlab_push(before: &str, after: &str) -> Value {
    json!({
        "object_kind": "push",
        "event_name": "push",
        "before": before,
        "after": after,
        "ref": "refs/heads/main",
        "ref_protected": true,
        "checkout_sha": after,
        "user_id": 4, "user_name": "Alice", "user_username": "alice",
        "project_id": 15,
        "project": {
            "id": 15, "name": "fleet", "web_url": "https://gitlab.example.org/ops/fleet",
            "git_ssh_url": "git@gitlab.example.org:ops/fleet.git",
            "git_http_url": "https://gitlab.example.org/ops/fleet.git",
            "namespace": "ops", "path_with_namespace": "ops/fleet", "default_branch": "main"
        },
        "commits": [{ "id": after, "message": "update flake.lock", "added": [], "modified": ["flake.lock"], "removed": [] }],
        "total_commits_count": 1,
        "repository": { "name": "fleet", "url": "git@gitlab.example.org:ops/fleet.git",
                        "homepage": "https://gitlab.example.org/ops/fleet" }
    })
}

struct Hooks {
    http: reqwest::Client,
    url: String,
}

impl Hooks {
    async fn post(&self, path: &str, headers: &[(&str, String)], body: Vec<u8>) -> (u16, Value) {
        let mut req =
            self.http.post(format!("{}{path}", self.url)).header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = req.body(body).send().await.expect("post");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Sends only the head of a POST declaring `length` bytes of body and returns the status
    /// the server answers with before any of the body arrives.
    async fn declare(&self, path: &str, headers: &[(&str, &str)], length: u64) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.url.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        conn.write_all(head.as_bytes()).await.expect("write head");
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while !answer.windows(2).any(|w| w == b"\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
                .await
                .expect("the server answered without waiting for the body")
                .expect("read");
            assert!(n > 0, "connection closed without an answer");
            answer.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&answer);
        line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("status line: {line}"))
    }

    async fn github(&self, delivery: &str, event: &str, body: &Value, secret: &str) -> (u16, Value) {
        let body = serde_json::to_vec(body).unwrap();
        let sig = format!("sha256={}", sign(secret, &body));
        let headers = [
            ("x-github-event", event.to_owned()),
            ("x-github-delivery", delivery.to_owned()),
            ("x-hub-signature-256", sig),
            ("user-agent", "GitHub-Hookshot/abc123".to_owned()),
        ];
        self.post("/hooks/github", &headers, body).await
    }
}

fn api_get(o: &Orchestrator, path: &str) -> Value {
    let token = std::fs::read_to_string(&o.api_token).unwrap();
    let out = run(std::process::Command::new("curl").args([
        "-sf",
        "-H",
        &format!("Authorization: Bearer {}", token.trim()),
        &format!("{}{path}", o.url),
    ]));
    serde_json::from_str(&out).unwrap()
}

/// Waits until the push of `delivery` has a decision other than pending.
fn decision(o: &Orchestrator, delivery: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pushes = api_get(o, "/api/v1/pushes");
        if let Some(p) = pushes.as_array().unwrap().iter().find(|p| p["delivery"] == delivery)
            && !matches!(p["decision"].as_str(), Some("pending" | "deciding"))
        {
            return p.clone();
        }
        assert!(Instant::now() < deadline, "no decision for {delivery}: {pushes}\n{}", o.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until build request `id` is done; returns its variants.
fn finished(o: &Orchestrator, id: i64) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let view = api_get(o, &format!("/api/v1/builds/{id}"));
        if view["status"] == "done" || view["status"] == "error" {
            assert_eq!(view["status"], "done", "{view}");
            return view["variants"].as_array().unwrap().clone();
        }
        assert!(Instant::now() < deadline, "request {id} did not finish: {view}\n{}", o.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pushes_that_change_the_lock_build_and_everything_else_is_refused_or_ignored() {
    let s = Setup::new();
    let (_dir, cache) = CacheServer::start_local();
    let secrets = s.home.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    for (f, v) in [("github", "gh-secret"), ("gitea", "gt-secret"), ("gitlab", "gl-token")] {
        std::fs::write(secrets.join(f), format!("{v}\n")).unwrap();
    }
    let forge = FakeForge::start();
    std::fs::write(secrets.join("status-token"), "status-token\n").unwrap();
    let webhooks = format!(
        "\n[webhooks]\nrepository = \"ops/fleet\"\nbranch = \"main\"\ndebounce-seconds = 1\n\
         github-secret-file = \"{0}/github\"\ngitea-secret-file = \"{0}/gitea\"\ngitlab-token-file = \"{0}/gitlab\"\n\
         [webhooks.status]\nforge = \"github\"\napi-url = \"{1}\"\ntoken-file = \"{0}/status-token\"\n",
        secrets.display(),
        forge.url
    );
    let (config, api_token) = configure(&s, &cache, "", &format!("{VARIANTS}{webhooks}"));
    let o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    let (_a, _) = start_builder(&s, &o, "builder-a", "token-a", "cuda");
    let hooks = Hooks { http: reqwest::Client::new(), url: o.url.clone() };

    // GitHub's ping, then a push that changes flake.lock: answered at once, built after.
    let (code, _) =
        hooks.github("ping-1", "ping", &json!({ "zen": "Keep it logically awesome." }), "gh-secret").await;
    assert_eq!(code, 200);
    let before = s.fleet.head();
    let after = s.fleet.bump_nixpkgs("2");
    let push = github_push("refs/heads/main", &before, &after, "ops/fleet");
    let (code, answer) = hooks.github("d-1", "push", &push, "gh-secret").await;
    assert_eq!((code, answer["revision"].as_str()), (202, Some(after.as_str())), "{answer}");
    let p = decision(&o, "d-1");
    assert_eq!(p["decision"], "queued", "{p}");
    let variants = finished(&o, p["request_id"].as_i64().unwrap());
    let outs: Vec<StorePath> = variants
        .iter()
        .map(|v| {
            assert_eq!(v["result"]["status"], "built", "{v}");
            StorePath::from_absolute(v["result"]["out_paths"][0].as_str().unwrap()).unwrap()
        })
        .collect();
    let machine = TempStore::new();
    run(&mut machine.copy_from(&cache.url, &cache.public_key, &outs.iter().collect::<Vec<_>>()));
    assert!(outs.iter().all(|o| machine.has(o)));

    // The commit shows the build: pending, then success, with the configured token.
    let deadline = Instant::now() + Duration::from_secs(30);
    while forge.states(&after).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let states = forge.states(&after);
    let words: Vec<&str> = states.iter().map(|(_, b)| b["state"].as_str().unwrap_or("?")).collect();
    assert_eq!(words, ["pending", "success"], "{states:?}");
    assert!(states.iter().all(|(auth, b)| auth == "Bearer status-token" && b["context"] == "fleetcache"));

    // The same delivery again queues nothing new.
    let (code, answer) = hooks.github("d-1", "push", &push, "gh-secret").await;
    assert_eq!((code, answer["outcome"].as_str()), (200, Some("already received")));

    // A push that leaves flake.lock alone builds nothing.
    let docs = s.fleet.commit_unrelated("# fleet docs");
    let (code, _) = hooks
        .github("d-2", "push", &github_push("refs/heads/main", &after, &docs, "ops/fleet"), "gh-secret")
        .await;
    assert_eq!(code, 202);
    let p = decision(&o, "d-2");
    assert_eq!((p["decision"].as_str(), &p["request_id"]), (Some("unchanged"), &Value::Null));

    // Refused: no signature, a wrong one, a body over the limit, invalid JSON.
    let body = serde_json::to_vec(&github_push("refs/heads/main", &docs, &docs, "ops/fleet")).unwrap();
    let (code, _) = hooks
        .post(
            "/hooks/github",
            &[("x-github-event", "push".into()), ("x-github-delivery", "x-1".into())],
            body.clone(),
        )
        .await;
    assert_eq!(code, 401, "missing signature");
    let (code, _) = hooks
        .github("x-2", "push", &github_push("refs/heads/main", &docs, &docs, "ops/fleet"), "not-the-secret")
        .await;
    assert_eq!(code, 401, "wrong signature");
    // The refusal comes from the declared length, before any of the body is read: the
    // request's head goes out alone and the answer must come without the body.
    let well_formed = format!("sha256={}", "0".repeat(64));
    let head =
        [("x-github-event", "push"), ("x-github-delivery", "x-3"), ("x-hub-signature-256", &well_formed)];
    assert_eq!(hooks.declare("/hooks/github", &head, 30 << 20).await, 413, "30 MiB body");
    let broken = b"{\"ref\": \"refs/heads/main\", ".to_vec();
    let sig = format!("sha256={}", sign("gh-secret", &broken));
    let (code, _) = hooks
        .post(
            "/hooks/github",
            &[
                ("x-github-event", "push".into()),
                ("x-github-delivery", "x-4".into()),
                ("x-hub-signature-256", sig),
            ],
            broken,
        )
        .await;
    assert_eq!(code, 400, "invalid JSON");

    // Acknowledged and ignored: another repository, another branch, a tag, another event.
    for (delivery, push, why) in [
        ("i-1", github_push("refs/heads/main", &before, &after, "intruder/fleet"), "another repository"),
        ("i-2", github_push("refs/heads/staging", &before, &after, "ops/fleet"), "another branch"),
        ("i-3", github_push("refs/tags/v1.0", &before, &after, "ops/fleet"), "a tag"),
    ] {
        let (code, answer) = hooks.github(delivery, "push", &push, "gh-secret").await;
        assert_eq!(code, 202, "{why}");
        assert!(answer["outcome"].as_str().unwrap().starts_with("ignored"), "{why}: {answer}");
    }
    let (code, answer) = hooks.github("i-4", "issues", &json!({"action": "opened"}), "gh-secret").await;
    assert_eq!((code, answer["outcome"].as_str()), (202, Some("ignored: not a push")));

    // A burst of three pushes: only the newest head builds; the others are recorded superseded.
    let mut heads = vec![docs.clone()];
    for version in ["3", "4", "5"] {
        heads.push(s.fleet.bump_nixpkgs(version));
    }
    for i in 0..3 {
        let push = github_push("refs/heads/main", &heads[i], &heads[i + 1], "ops/fleet");
        let (code, _) = hooks.github(&format!("b-{i}"), "push", &push, "gh-secret").await;
        assert_eq!(code, 202);
    }
    let newest = decision(&o, "b-2");
    assert_eq!(newest["decision"], "queued");
    assert_eq!(decision(&o, "b-0")["decision"], "superseded");
    assert_eq!(decision(&o, "b-1")["decision"], "superseded");
    finished(&o, newest["request_id"].as_i64().unwrap());

    // Gitea (and Forgejo's header names), and GitLab.
    let head = s.fleet.bump_nixpkgs("6");
    let body = serde_json::to_vec(&gitea_push(heads.last().unwrap(), &head)).unwrap();
    let sig = sign("gt-secret", &body);
    let (code, answer) = hooks
        .post(
            "/hooks/gitea",
            &[
                ("x-forgejo-event", "push".into()),
                ("x-forgejo-delivery", "g-1".into()),
                ("x-forgejo-signature", sig),
            ],
            body,
        )
        .await;
    assert_eq!(code, 202, "{answer}");
    assert_eq!(decision(&o, "g-1")["decision"], "queued");
    let bad = serde_json::to_vec(&gitea_push(&head, &head)).unwrap();
    let (code, _) = hooks
        .post(
            "/hooks/gitea",
            &[
                ("x-gitea-event", "push".into()),
                ("x-gitea-delivery", "g-2".into()),
                ("x-gitea-signature", sign("nope", &bad)),
            ],
            bad,
        )
        .await;
    assert_eq!(code, 401);

    let last = s.fleet.bump_nixpkgs("7");
    let body = serde_json::to_vec(&gitlab_push(&head, &last)).unwrap();
    let gl = |token: &str, uuid: &str| {
        vec![
            ("x-gitlab-event", "Push Hook".to_owned()),
            ("x-gitlab-token", token.to_owned()),
            ("x-gitlab-event-uuid", uuid.to_owned()),
            ("idempotency-key", uuid.to_owned()),
        ]
    };
    let (code, _) = hooks.post("/hooks/gitlab", &gl("wrong-token", "l-0"), body.clone()).await;
    assert_eq!(code, 401);
    let (code, answer) = hooks.post("/hooks/gitlab", &gl("gl-token", "l-1"), body).await;
    assert_eq!((code, answer["revision"].as_str()), (202, Some(last.as_str())));
    let p = decision(&o, "l-1");
    assert_eq!(p["decision"], "queued");
    finished(&o, p["request_id"].as_i64().unwrap());

    // A new branch (before is all zeros) and a force-push (before is gone from history) cannot
    // be compared: they build, which here finds everything cached.
    for (delivery, before) in [("z-1", "0".repeat(40)), ("f-1", "deadbeef".repeat(5))] {
        let (code, _) = hooks
            .github(
                delivery,
                "push",
                &github_push("refs/heads/main", &before, &last, "ops/fleet"),
                "gh-secret",
            )
            .await;
        assert_eq!(code, 202);
        let p = decision(&o, delivery);
        assert_eq!(p["decision"], "queued", "{delivery}: {p}");
        let variants = finished(&o, p["request_id"].as_i64().unwrap());
        assert!(variants.iter().all(|v| v["result"]["status"] == "cached"), "{variants:?}");
    }

    // Every rejection is counted.
    let metrics = reqwest::get(format!("{}/metrics", o.url)).await.unwrap().text().await.unwrap();
    for line in [
        "fleetcache_webhook_deliveries_total{forge=\"github\",outcome=\"bad signature\"} 2",
        "fleetcache_webhook_deliveries_total{forge=\"github\",outcome=\"body too large\"} 1",
        "fleetcache_webhook_deliveries_total{forge=\"github\",outcome=\"malformed JSON\"} 1",
        "fleetcache_webhook_deliveries_total{forge=\"gitlab\",outcome=\"bad signature\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_without_a_secret_is_off() {
    let s = Setup::new();
    let (_dir, cache) = CacheServer::start_local();
    let (config, api_token) = configure(&s, &cache, "", VARIANTS);
    let o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    let hooks = Hooks { http: reqwest::Client::new(), url: o.url.clone() };
    let push = github_push("refs/heads/main", &"0".repeat(40), &s.fleet.head(), "ops/fleet");
    for path in ["/hooks/github", "/hooks/gitea", "/hooks/gitlab"] {
        let (code, _) = hooks.post(path, &[], serde_json::to_vec(&push).unwrap()).await;
        assert_eq!(code, 404, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_secret_is_refused_and_unsigned_deliveries_cost_nothing() {
    let s = Setup::new();
    let (_dir, cache) = CacheServer::start_local();
    let secrets = s.home.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("github"), "gh-secret\n").unwrap();
    std::fs::write(secrets.join("empty"), " \n").unwrap();
    let hooks_config = |gitlab: &str| {
        format!(
            "\n[webhooks]\nrepository = \"ops/fleet\"\ndebounce-seconds = 1\n\
             github-secret-file = \"{0}/github\"\ngitlab-token-file = \"{0}/{gitlab}\"\n",
            secrets.display()
        )
    };

    // An empty (or blank) secret would let anyone deliver: check-config and serve refuse it.
    let (config, api_token) = configure(&s, &cache, "", &format!("{VARIANTS}{}", hooks_config("empty")));
    let out = s.orchestrator(&["check-config", "--config", config.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is empty"), "{err}");
    let out = s
        .orchestrator(&["serve", "--config", config.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is empty"), "{err}");

    std::fs::write(secrets.join("gitlab"), "gl-token\n").unwrap();
    let (config, api_token2) = configure(&s, &cache, "", &format!("{VARIANTS}{}", hooks_config("gitlab")));
    assert_eq!(api_token, api_token2);
    let o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    let hooks = Hooks { http: reqwest::Client::new(), url: o.url.clone() };
    let before = s.fleet.head();
    let after = s.fleet.bump_nixpkgs("2");

    // No signature, or an empty GitLab token: 401 without the body being read.
    let push = serde_json::to_vec(&github_push("refs/heads/main", &before, &after, "ops/fleet")).unwrap();
    let (code, _) = hooks.post("/hooks/github", &[("x-github-event", "push".into())], push.clone()).await;
    assert_eq!(code, 401);
    let (code, _) = hooks
        .post("/hooks/gitlab", &[("x-gitlab-event", "Push Hook".into()), ("x-gitlab-token", "".into())], push)
        .await;
    assert_eq!(code, 401);

    // An empty commit is no commit, however well signed.
    let mut empty = github_push("refs/heads/main", &before, &after, "ops/fleet");
    empty["after"] = json!("");
    let body = serde_json::to_vec(&empty).unwrap();
    let sig = format!("sha256={}", sign("gh-secret", &body));
    let headers = [
        ("x-github-event", "push".to_owned()),
        ("x-github-delivery", "e-1".to_owned()),
        ("x-hub-signature-256", sig),
    ];
    assert_eq!(hooks.post("/hooks/github", &headers, body).await.0, 400);

    // Forty deliveries of 24 MiB at once with a well-formed but wrong signature: each is
    // refused, and the bodies held at once stay within the budget.
    let start_rss = o.child.peak_rss_mib();
    let big = vec![b' '; 24 << 20];
    let wrong = format!("sha256={}", "0".repeat(64));
    let posts = (0..40).map(|i| {
        let (http, url, big, wrong) = (hooks.http.clone(), o.url.clone(), big.clone(), wrong.clone());
        async move {
            let sent = http
                .post(format!("{url}/hooks/github"))
                .header("x-github-event", "push")
                .header("x-github-delivery", format!("big-{i}"))
                .header("x-hub-signature-256", wrong)
                .body(big)
                .send()
                .await;
            // A busy server answers 503 before the body is all sent, and closes: also a refusal.
            sent.map(|r| r.status().as_u16()).unwrap_or(0)
        }
    });
    let codes = futures_util::future::join_all(posts).await;
    assert!(codes.iter().all(|c| matches!(c, 0 | 401 | 503)), "{codes:?}");
    assert!(codes.contains(&401), "some were read and checked: {codes:?}");
    let grew = o.child.peak_rss_mib().saturating_sub(start_rss);
    eprintln!(
        "orchestrator serve: peak RSS grew by {grew} MiB over 40 parallel 24 MiB deliveries ({codes:?})"
    );
    assert!(grew < 150, "grew by {grew} MiB");
}
