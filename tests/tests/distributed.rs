//! `orchestrator serve` with real `builder` agents and a real cache-server, all on loopback,
//! building the stand-in fleet with the real nix.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use fleetcache_tests::cache_server::{CacheServer, Options};
use fleetcache_tests::garage::Garage;
use fleetcache_tests::nix::{TempStore, run};
use fleetcache_tests::orchestrator::{
    Setup, collect, out_path, parse_build, spawn_build, status_of, wait_for_file,
};
use fleetcache_tests::postgres::Postgres;
use fleetcache_tests::process::ChildGuard;
use fleetcache_tests::serve::{
    attempts_by_builder, configure, start_builder, start_builder_with, start_orchestrator,
};
use nix_formats::StorePath;
use serde_json::Value;

const VARIANTS: &str = r#"
[[variant]]
name = "default"
attr = "inputs.llama-cpp.packages.{system}.default"

[[variant]]
name = "cuda"
attr = "inputs.llama-cpp.packages.{system}.cuda"
features = ["cuda"]
files = ["lib/libggml-cuda.so"]
verify = { features = ["cuda"], command = "llama-cli", expect = "llama-cli cuda" }

[[variant]]
name = "vulkan"
attr = "inputs.llama-cpp.packages.{system}.vulkan"
"#;

const ROCM: &str = r#"
[[variant]]
name = "rocm"
attr = "inputs.llama-cpp.packages.{system}.default"
features = ["rocm"]
"#;

#[test]
fn builders_take_only_what_they_can_and_a_fresh_machine_substitutes_every_variant() {
    let s = Setup::new();
    let garage = Garage::start();
    let cache = CacheServer::start_with(
        &garage.store_url(),
        Options { env: garage.credential_env().to_vec(), ..Options::default() },
    );
    let (config, api_token) = configure(&s, &cache, "", VARIANTS);
    let o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    // A can hold every job at once, so cuda reaches it whatever the others do.
    let (_a, a_log) = start_builder_with(&s, &o, "builder-a", "token-a", "cuda", &["--max-jobs", "3"]);
    let (_b, b_log) = start_builder(&s, &o, "builder-b", "token-b", "");

    s.fleet.hold_builds();
    let mut args = vec!["--rev", "main"];
    let client = o.client_args();
    args.extend(client.iter().map(String::as_str));
    let (cli, out, err) = spawn_build(&s, "cli", &args);
    wait_for_file(&err, Duration::from_secs(60), "cuda building on builder-a", |t| {
        t.contains("cuda: building on builder-a")
    });
    // The log streams to the orchestrator while the build runs; --follow keeps printing until
    // it ends.
    let mut logs = vec!["logs", "cuda", "--rev", "main"];
    logs.extend(client.iter().map(String::as_str));
    let so_far = std::time::Instant::now();
    let text = loop {
        let text = run(&mut s.orchestrator(&logs));
        if text.contains("configuring llama.cpp cuda") || so_far.elapsed() > Duration::from_secs(30) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(text.contains("configuring llama.cpp cuda"), "{text}");
    logs.push("--follow");
    let mut follow = s.orchestrator(&logs);
    let mut follow = ChildGuard::spawn("logs --follow", follow.stdout(Stdio::piped()));
    s.fleet.release_builds();
    let (code, results, stderr) = collect(cli, out, err);
    let followed = follow.wait_with_output();
    let followed = String::from_utf8_lossy(&followed.stdout);
    assert!(
        followed.contains("configuring llama.cpp cuda") && followed.contains("built llama.cpp cuda"),
        "{followed}"
    );
    let logs = || {
        format!(
            "{stderr}\nserver:\n{}\nA:\n{}\nB:\n{}",
            o.log(),
            std::fs::read_to_string(&a_log).unwrap(),
            std::fs::read_to_string(&b_log).unwrap()
        )
    };
    assert_eq!(code, 0, "{}", logs());
    assert_eq!(
        status_of(&results),
        BTreeMap::from([("cuda", "built"), ("default", "built"), ("vulkan", "built")])
    );

    // Builder A, which has the feature, built it and ran the verification.
    assert_eq!(results["cuda"]["verification"]["status"], "verified", "{}", logs());
    assert!(results["default"].get("verification").is_none());

    // Only builder A has the cuda feature.
    let status = o.status(&s);
    assert_eq!(
        attempts_by_builder(&status, "cuda"),
        [("builder-a".to_owned(), "built".to_owned())],
        "{}",
        logs()
    );

    // The builders as the CLI shows them.
    let mut args = vec!["builders", "--json"];
    args.extend(client.iter().map(String::as_str));
    let builders: Value = serde_json::from_str(&run(&mut s.orchestrator(&args))).unwrap();
    let features: BTreeMap<&str, &Value> =
        builders.as_array().unwrap().iter().map(|b| (b["name"].as_str().unwrap(), &b["features"])).collect();
    assert_eq!(features["builder-a"], &serde_json::json!(["cuda"]));
    assert_eq!(features["builder-b"], &serde_json::json!([]));

    // A machine trusting only the cache's key substitutes all three from the bucket.
    let machine = TempStore::new();
    let outs: Vec<StorePath> = results.values().map(out_path).collect();
    run(&mut machine.copy_from(&cache.url, &cache.public_key, &outs.iter().collect::<Vec<_>>()));
    assert!(machine.real_path(&out_path(&results["cuda"])).join("lib/libggml-cuda.so").is_file());

    // Submitting the same revision again is a no-op.
    let mut args = vec!["build", "--json", "--rev", "main"];
    args.extend(client.iter().map(String::as_str));
    let (code, again, _) = parse_build(s.orchestrator(&args).output().unwrap());
    assert_eq!(code, 0);
    assert_eq!(
        status_of(&again),
        BTreeMap::from([("cuda", "cached"), ("default", "cached"), ("vulkan", "cached")])
    );
}

#[test]
fn a_killed_builder_loses_its_job_to_another_when_the_lease_expires() {
    let s = Setup::new();
    let (_dir, cache) = CacheServer::start_local();
    let (config, api_token) = configure(&s, &cache, "", VARIANTS);
    let o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    s.fleet.hold_builds();
    let (mut a, a_log) = start_builder(&s, &o, "builder-a", "token-a", "cuda");

    let mut args = vec!["--rev", "main", "--variant", "cuda"];
    let client = o.client_args();
    args.extend(client.iter().map(String::as_str));
    let (cli, out, err) = spawn_build(&s, "cli", &args);
    wait_for_file(&err, Duration::from_secs(60), "building on builder-a", |t| {
        t.contains("building on builder-a")
    });
    a.kill();
    let (_b, b_log) = start_builder(&s, &o, "builder-b", "token-b", "cuda");
    wait_for_file(&err, Duration::from_secs(60), "building on builder-b", |t| {
        t.contains("building on builder-b")
    });
    s.fleet.release_builds();
    let (code, results, stderr) = collect(cli, out, err);
    let b = std::fs::read_to_string(&b_log).unwrap();
    assert_eq!(code, 0, "{stderr}\n{}\nA:{}\nB:{b}", o.log(), std::fs::read_to_string(&a_log).unwrap());
    assert_eq!(results["cuda"]["status"], "built");
    let attempts = attempts_by_builder(&o.status(&s), "cuda");
    assert_eq!(
        attempts,
        [("builder-a".to_owned(), "interrupted".to_owned()), ("builder-b".to_owned(), "built".to_owned())]
    );
}

#[test]
fn restarting_the_orchestrator_loses_no_queued_job() {
    let s = Setup::new();
    let (_dir, cache) = CacheServer::start_local();
    let (config, api_token) = configure(&s, &cache, "", VARIANTS);
    let mut o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    let mut args = vec!["--rev", "main"];
    let client = o.client_args();
    args.extend(client.iter().map(String::as_str));
    let (cli, out, err) = spawn_build(&s, "cli", &args);
    // No builder yet: the jobs wait, and say why.
    wait_for_file(&err, Duration::from_secs(60), "waiting", |t| t.contains("none registered can take it"));
    // The queue shows in the status while it waits.
    let queued = o.status(&s);
    let statuses: Vec<&str> =
        queued[0]["variants"].as_array().unwrap().iter().map(|v| v["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["queued", "queued", "queued"]);
    let addr = o.url.trim_start_matches("http://").to_owned();
    assert!(o.child.stop().is_some_and(|s| s.success()), "SIGTERM stops the server cleanly");
    let o2 = start_orchestrator(&s, &o.config, &o.api_token, &addr);
    let (_a, _) = start_builder(&s, &o2, "builder-a", "token-a", "cuda");
    let (code, results, stderr) = collect(cli, out, err);
    assert_eq!(code, 0, "{stderr}\n{}", o2.log());
    assert_eq!(
        status_of(&results),
        BTreeMap::from([("cuda", "built"), ("default", "built"), ("vulkan", "built")])
    );
}

#[test]
fn a_job_no_builder_can_take_is_reported_and_bad_tokens_are_refused() {
    let s = Setup::new();
    let (_dir, cache) = CacheServer::start_local();
    let (config, api_token) = configure(&s, &cache, "", &format!("{VARIANTS}{ROCM}"));
    let o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    let (_a, _) = start_builder(&s, &o, "builder-a", "token-a", "cuda");
    let mut args = vec!["--rev", "main", "--variant", "rocm"];
    let client = o.client_args();
    args.extend(client.iter().map(String::as_str));
    let (mut cli, _, err) = spawn_build(&s, "cli", &args);
    wait_for_file(&err, Duration::from_secs(60), "the capability report", |t| {
        t.contains("rocm: waiting for a builder of x86_64-linux with rocm (none registered can take it)")
    });
    cli.kill();

    // A builder with a token the orchestrator does not know stops at once, saying why.
    let (mut intruder, log) = start_builder(&s, &o, "intruder", "not-a-token", "cuda");
    let status = intruder.wait_with_output().status;
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("refused this builder's token"), "{text}");

    // Removing a builder's line revokes it at once, without restarting the orchestrator.
    let (mut b, b_log) = start_builder(&s, &o, "builder-b", "token-b", "");
    wait_for_file(&b_log, Duration::from_secs(30), "builder-b registered", |t| t.contains("registered"));
    let tokens = s.home.join("orchestrator/builder-tokens");
    let kept: String = std::fs::read_to_string(&tokens)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("builder-b:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&tokens, kept).unwrap();
    let status = b.wait_with_output().status;
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&b_log).unwrap();
    assert!(text.contains("refused this builder's token"), "{text}");

    // So does the CLI with a bad API token.
    let bad = s.home.join("bad-token");
    std::fs::write(&bad, "nope").unwrap();
    let out = s
        .orchestrator(&["build", "--rev", "main", "--server", &o.url, "--token-file", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("unknown API token"), "{err}");
}

#[test]
fn two_orchestrator_replicas_share_one_postgresql_queue() {
    let s = Setup::new();
    let pg = Postgres::start();
    let (_dir, cache) = CacheServer::start_local();
    let (config, api_token) = configure(&s, &cache, &format!("database = \"{}\"", pg.url()), VARIANTS);
    let one = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    let two = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    // Each builder talks to its own replica; the jobs are in one queue.
    let (_a, _) = start_builder_with(&s, &one, "builder-a", "token-a", "cuda", &["--max-jobs", "2"]);
    let (_b, _) = start_builder_with(&s, &two, "builder-b", "token-b", "cuda", &["--max-jobs", "2"]);
    let mut args = vec!["build", "--json", "--rev", "main"];
    let client = one.client_args();
    args.extend(client.iter().map(String::as_str));
    let (code, results, stderr) = parse_build(s.orchestrator(&args).output().unwrap());
    assert_eq!(code, 0, "{stderr}\none:\n{}\ntwo:\n{}", one.log(), two.log());
    assert_eq!(
        status_of(&results),
        BTreeMap::from([("cuda", "built"), ("default", "built"), ("vulkan", "built")])
    );
    // The other replica sees the same record, and every job was claimed once.
    let status = two.status(&s);
    for v in ["default", "cuda", "vulkan"] {
        let attempts = attempts_by_builder(&status, v);
        assert_eq!(attempts.len(), 1, "{v}: {attempts:?}");
        assert_eq!(attempts[0].1, "built");
    }
}

#[test]
fn a_variant_built_without_its_hardware_is_verified_by_a_builder_that_has_it() {
    let s = Setup::new();
    let (_dir, cache) = CacheServer::start_local();
    let variants = r#"
[[variant]]
name = "vulkan"
attr = "inputs.llama-cpp.packages.{system}.vulkan"
verify = { features = ["vulkan"], command = "llama-cli", expect = "llama-cli vulkan" }

[[variant]]
name = "rocm"
attr = "inputs.llama-cpp.packages.{system}.default"
verify = { features = ["rocm"], command = "llama-cli", expect = "rocm" }
"#;
    let (config, api_token) = configure(&s, &cache, "", variants);
    let o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    // A builds anything; the GPU box takes only jobs that need vulkan: the verification.
    let (_a, a_log) = start_builder(&s, &o, "builder-a", "token-a", "");
    let (_gpu, gpu_log) =
        start_builder_with(&s, &o, "builder-b", "token-b", "", &["--mandatory-features", "vulkan"]);
    // The verify job is queued only if a capable builder is registered when the build ends.
    o.wait_for_builders(&s, &["builder-a", "builder-b"]);
    let mut args = vec!["build", "--json", "--rev", "main"];
    let client = o.client_args();
    args.extend(client.iter().map(String::as_str));
    let (code, results, stderr) = parse_build(s.orchestrator(&args).output().unwrap());
    let logs = || {
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
        format!("{stderr}\nserver:\n{}\nA:\n{}\nB:\n{}", o.log(), read(&a_log), read(&gpu_log))
    };
    assert_eq!(code, 0, "{}", logs());
    assert_eq!(status_of(&results), BTreeMap::from([("rocm", "built"), ("vulkan", "built")]));
    let vulkan = &results["vulkan"]["verification"];
    assert_eq!(vulkan["status"], "verified", "{}", logs());
    assert_eq!(vulkan["by"], "builder-b");
    let rocm = &results["rocm"]["verification"];
    assert_eq!(rocm["status"], "unverified");
    assert!(rocm["detail"].as_str().unwrap().contains("no registered builder has rocm"), "{rocm}");
    // Builder A built both; the verification is not a build attempt.
    let status = o.status(&s);
    assert_eq!(attempts_by_builder(&status, "vulkan"), [("builder-a".to_owned(), "built".to_owned())]);
}

#[test]
fn with_no_variant_configured_the_builders_build_what_the_machines_install() {
    let s = Setup::new();
    let (_dir, cache) = CacheServer::start_local();
    let (config, api_token) = configure(&s, &cache, "", "");
    let o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    // A GPU builder (cuda and vulkan) and a CPU one: each derivation goes where its machines'
    // builderFeatures say, the builder evaluating the machine's package itself.
    let (_gpu, gpu_log) = start_builder(&s, &o, "builder-a", "token-a", "cuda,vulkan");
    let (_cpu, cpu_log) = start_builder(&s, &o, "builder-b", "token-b", "");
    o.wait_for_builders(&s, &["builder-a", "builder-b"]);
    let mut args = vec!["build", "--json", "--rev", "main"];
    let client = o.client_args();
    args.extend(client.iter().map(String::as_str));
    let (code, results, stderr) = parse_build(s.orchestrator(&args).output().unwrap());
    let logs = || {
        format!(
            "{}\n{}\n{}",
            o.log(),
            std::fs::read_to_string(&gpu_log).unwrap_or_default(),
            std::fs::read_to_string(&cpu_log).unwrap_or_default()
        )
    };
    assert_eq!(code, 0, "{stderr}\n{}", logs());
    assert_eq!(
        status_of(&results),
        BTreeMap::from([("cpu", "built"), ("cuda", "built"), ("vulkan", "built")])
    );
    assert_eq!(results["cpu"]["machines"], serde_json::json!(["beryllium", "boron"]));
    assert_eq!(results["cuda"]["machines"], serde_json::json!(["carbon"]));
    let status = o.status(&s);
    let by = |v: &str| attempts_by_builder(&status, v);
    assert!(by("cuda").iter().all(|(owner, _)| owner == "builder-a"), "{:?}", by("cuda"));
    assert!(by("vulkan").iter().all(|(owner, _)| owner == "builder-a"), "{:?}", by("vulkan"));
    // Every machine's package substitutes from the cache.
    let machine = TempStore::new();
    let outs: Vec<StorePath> = results.values().map(out_path).collect();
    run(&mut machine.copy_from(&cache.url, &cache.public_key, &outs.iter().collect::<Vec<_>>()));
}
