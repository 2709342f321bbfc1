//! Every client over HTTPS, as a real fleet runs it: our servers behind nginx terminating TLS
//! with a private CA, the CA given to the clients as Nix is given it (`SSL_CERT_FILE`,
//! `NIX_SSL_CERT_FILE`), and a certificate no trusted CA signed refused with an error that says
//! so.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use fleetcache_tests::cache_server::CacheServer;
use fleetcache_tests::forge::{FakeForge, github_push, sign};
use fleetcache_tests::nix::{TempStore, build_closure, run};
use fleetcache_tests::orchestrator::Setup;
use fleetcache_tests::serve::{DEFAULT_AND_CUDA, configure_with, start_builder, start_orchestrator};
use fleetcache_tests::tls::{HttpProxy, TestCa, TlsProxy};

fn push(cache: &str, token: &PathBuf, path: &str, env: &[(&str, &PathBuf)]) -> Output {
    let mut c = Command::new(fleetcache_tests::bin("orchestrator"));
    c.args(["push", "--json", "--cache", cache, "--token-file"])
        .arg(token)
        .arg(path)
        .env_remove("SSL_CERT_FILE")
        .env_remove("NIX_SSL_CERT_FILE")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("NIX_CONFIG", fleetcache_tests::nix::NIX_CONFIG);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn push_over_https_trusts_the_ca_nix_is_given_and_refuses_others() {
    let ca = TestCa::new("fleet");
    let (_dir, server) = CacheServer::start_local();
    let mut proxy = TlsProxy::start(&ca, &server.url);
    let token = server.dir().join("token");
    std::fs::write(&token, &server.token).unwrap();
    let top = build_closure("tls-push", 3, 0);

    // No CA given: the system's roots do not know it, and the error says what to do, at once
    // (an untrusted certificate is not retried).
    let started = Instant::now();
    let out = push(&proxy.url, &token, &top.to_absolute(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("certificate is not trusted") && err.contains("SSL_CERT_FILE"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "retried: {err}");
    // Another CA is no better.
    let other = TestCa::new("other");
    let out = push(&proxy.url, &token, &top.to_absolute(), &[("SSL_CERT_FILE", &other.cert())]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not trusted"));

    // The fleet's CA, named the way Nix reads it: the closure goes up through nginx.
    for variable in ["NIX_SSL_CERT_FILE", "SSL_CERT_FILE"] {
        let out = push(&proxy.url, &token, &top.to_absolute(), &[(variable, &ca.cert())]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{variable}: {err}\n{}\n{}", proxy.log(), server.log());
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let uploaded = summary["uploaded"].as_u64().unwrap();
        if variable == "NIX_SSL_CERT_FILE" {
            assert_eq!(uploaded, 4, "{summary}");
        } else {
            assert_eq!((uploaded, summary["already_present"].as_u64()), (0, Some(4)), "{summary}");
        }
    }

    // Through an HTTP proxy (HTTPS_PROXY, a CONNECT tunnel), unless NO_PROXY names the host.
    let mut http_proxy = HttpProxy::start();
    let port = proxy.url.rsplit(':').next().unwrap().to_owned();
    let tunnels = |log: &str| log.matches(&format!("CONNECT 127.0.0.1:{port}")).count();
    let ca_cert = ca.cert();
    let via = |extra: &[(&str, &PathBuf)]| {
        let mut env = vec![("SSL_CERT_FILE", &ca_cert)];
        env.extend_from_slice(extra);
        push(&proxy.url, &token, &top.to_absolute(), &env)
    };
    let proxy_url = PathBuf::from(&http_proxy.url);
    let out = via(&[("HTTPS_PROXY", &proxy_url)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tunnelled = tunnels(&http_proxy.log());
    assert!(tunnelled > 0, "the push did not go through the proxy:\n{}", http_proxy.log());
    let bypass = PathBuf::from("127.0.0.1");
    let out = via(&[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", &bypass)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tunnels(&http_proxy.log()), tunnelled, "NO_PROXY was not honoured");
    http_proxy.stop();

    // And a machine substitutes it over the same HTTPS, trusting the same CA.
    let machine = TempStore::new();
    let out = machine
        .copy_from(&proxy.url, &server.public_key, &[&top])
        .env("NIX_SSL_CERT_FILE", ca.cert())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(machine.has(&top));
    proxy.stop();
}

#[test]
fn a_fleet_behind_tls_builds_reports_and_is_followed_over_https() {
    let ca = TestCa::new("fleet");
    let mut s = Setup::new();
    s.env.push(("SSL_CERT_FILE".to_owned(), ca.cert()));
    let (_dir, cache) = CacheServer::start_local();
    let cache_tls = TlsProxy::start(&ca, &cache.url);
    let forge = FakeForge::start();
    let forge_tls = TlsProxy::start(&ca, &forge.url);

    let secrets = s.home.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("github"), "gh-secret\n").unwrap();
    std::fs::write(secrets.join("status-token"), "status-token\n").unwrap();
    let webhooks = format!(
        "\n[webhooks]\nrepository = \"ops/fleet\"\ndebounce-seconds = 1\ngithub-secret-file = \"{0}/github\"\n\
         [webhooks.status]\nforge = \"github\"\napi-url = \"{1}\"\ntoken-file = \"{0}/status-token\"\n",
        secrets.display(),
        forge_tls.url
    );
    // The orchestrator pushes nothing itself but asks the cache what it has, over HTTPS.
    let (config, api_token) =
        configure_with(&s, &cache_tls.url, &cache.token, "", &format!("{DEFAULT_AND_CUDA}{webhooks}"));
    let mut o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    let orchestrator_tls = TlsProxy::start(&ca, &o.url);
    // From here on every client (the builder, the CLI) uses the HTTPS address.
    o.url = orchestrator_tls.url.clone();
    let (_builder, builder_log) = start_builder(&s, &o, "builder-a", "token-a", "cuda");
    o.wait_for_builders(&s, &["builder-a"]);

    // A push that changes flake.lock, delivered over HTTPS: built by the builder (which pushes
    // to the cache over HTTPS) and reported to the forge's API over HTTPS.
    let before = s.fleet.head();
    let after = s.fleet.bump_nixpkgs("2");
    let body = serde_json::to_vec(&github_push("refs/heads/main", &before, &after, "ops/fleet")).unwrap();
    let body_file = s.home.join("push.json");
    std::fs::write(&body_file, &body).unwrap();
    let answer = run(Command::new("curl").args(["-sf", "--cacert"]).arg(ca.cert()).args([
        "-H",
        "content-type: application/json",
        "-H",
        "x-github-event: push",
        "-H",
        "x-github-delivery: tls-1",
        "-H",
        &format!("x-hub-signature-256: sha256={}", sign("gh-secret", &body)),
        "--data-binary",
        &format!("@{}", body_file.display()),
        &format!("{}/hooks/github", o.url),
    ]));
    assert!(answer.contains(&after), "{answer}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let states: Vec<String> = forge
            .states(&after)
            .iter()
            .map(|(_, body)| body["state"].as_str().unwrap_or("").to_owned())
            .collect();
        if states.last().is_some_and(|s| s == "success") {
            assert_eq!(states.first().map(String::as_str), Some("pending"), "{states:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no success status for {after}: {states:?}\n{}\n{}\n{}",
            o.log(),
            std::fs::read_to_string(&builder_log).unwrap_or_default(),
            forge_tls.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(forge.states(&after)[0].0, "Bearer status-token");

    // The CLI over HTTPS: the same revision is cached now.
    let mut args = vec!["build", "--json", "--rev", "main"];
    let client = o.client_args();
    args.extend(client.iter().map(String::as_str));
    let out = s.orchestrator(&args).output().unwrap();
    let (code, results, stderr) = fleetcache_tests::orchestrator::parse_build(out);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(results["default"]["status"], "cached", "{stderr}");
    assert_eq!(results["cuda"]["status"], "cached", "{stderr}");

    // A CLI that does not trust the fleet's CA is told why, and does not wait for it.
    let other = TestCa::new("other");
    let mut status = vec!["status"];
    status.extend(client.iter().map(String::as_str));
    let started = Instant::now();
    let out = s.orchestrator(&status).env("SSL_CERT_FILE", other.cert()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("certificate is not trusted"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // A builder that does not trust it stops with the reason instead of retrying for ever.
    s.env = vec![("SSL_CERT_FILE".to_owned(), other.cert())];
    let (mut refused, refused_log) = start_builder(&s, &o, "builder-b", "token-b", "");
    let status = refused.wait_with_output().status;
    let log = std::fs::read_to_string(refused_log).unwrap();
    assert!(!status.success() && log.contains("certificate is not trusted"), "{status}: {log}");
}
