//! `orchestrator build --rev`: the offline stand-in fleet built, published and substituted with
//! the real nix, through the embedded default and through a remote cache-server.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use fleetcache_tests::cache_server::{CacheServer, Options};
use fleetcache_tests::nix::{TempStore, command, run};
use fleetcache_tests::orchestrator::{
    Setup, attempts, collect, out_path, parse_build, spawn_build, status_of, wait_for_file,
};
use nix_formats::StorePath;
use serde_json::Value;

#[test]
fn the_embedded_default_builds_publishes_and_a_fresh_machine_substitutes() {
    let s = Setup::new();
    let head = s.fleet.head();
    let (code, results, stderr) = s.build(&["--rev", "main"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        status_of(&results),
        BTreeMap::from([("cuda", "built"), ("default", "built"), ("vulkan", "built")])
    );
    // It said which commit, which inputs, and the key it generated.
    assert!(stderr.contains(&format!("main is {head}")), "{stderr}");
    let nixpkgs_rev = s.fleet.locked_rev(&head, "nixpkgs");
    assert!(stderr.contains(&format!("nixpkgs {}", &nixpkgs_rev[..12])), "{stderr}");
    let key = s.public_key();
    assert!(stderr.contains("generated the cache's signing key") && stderr.contains(&key), "{stderr}");
    for (variant, r) in &results {
        assert_eq!(r["system"], "x86_64-linux");
        assert_eq!(r["attr"], format!("inputs.llama-cpp.packages.x86_64-linux.{variant}"));
        assert!(r["drv_path"].as_str().unwrap().ends_with(".drv"));
        assert_eq!(r["error"], Value::Null);
    }

    // The directory is a cache: cache-server serves it as it is, and a machine that trusts only
    // the generated key substitutes all three variants and their shared dependency.
    let server = CacheServer::start_with(
        &format!("file://{}", s.cache_dir().display()),
        Options { read_only: true, ..Options::default() },
    );
    let machine = TempStore::new();
    let outs: Vec<StorePath> = results.values().map(out_path).collect();
    run(&mut machine.copy_from(&server.url, &key, &outs.iter().collect::<Vec<_>>()));
    for (variant, r) in &results {
        let out = out_path(r);
        assert!(machine.has(&out));
        let cli = std::fs::read_to_string(machine.real_path(&out).join("bin/llama-cli")).unwrap();
        let shown = if variant == "default" { "cpu" } else { variant.as_str() };
        assert!(cli.contains(&format!("llama-cli {shown}")), "{cli}");
    }
    let cuda = machine.real_path(&out_path(&results["cuda"]));
    assert!(cuda.join("lib/libggml-cuda.so").is_file());
    assert!(machine.real_path(&out_path(&results["vulkan"])).join("lib/libggml-vulkan.so").is_file());

    // The machine's `nix log` finds the build log in the cache (through the output's deriver).
    let log = run(command("nix")
        .args(["log", "--store", &machine.url(), "--option", "substituters", &server.url])
        .arg(out_path(&results["cuda"]).to_absolute()));
    assert!(log.contains("built llama.cpp cuda"), "{log}");

    // The second run of the same revision evaluates, finds everything cached and builds nothing.
    let started = Instant::now();
    let (code, again, stderr) = s.build(&["--rev", &head]);
    let took = started.elapsed();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        status_of(&again),
        BTreeMap::from([("cuda", "cached"), ("default", "cached"), ("vulkan", "cached")])
    );
    eprintln!("no-op rebuild took {took:?}");
    let status = s.status();
    for v in ["default", "cuda", "vulkan"] {
        assert_eq!(attempts(&status, v), ["built"], "one attempt for {v}");
    }
    assert_eq!(status[0]["rev"], head);
    assert_eq!(
        status[0]["inputs"].as_array().unwrap().iter().find(|i| i["name"] == "nixpkgs").unwrap()["rev"],
        nixpkgs_rev
    );
}

#[test]
fn a_nixpkgs_bump_rebuilds_everything_and_an_unrelated_commit_nothing() {
    let s = Setup::new();
    let (code, first, stderr) = s.build(&["--rev", "main", "--max-jobs", "3"]);
    assert_eq!(code, 0, "{stderr}");

    let bumped = s.fleet.bump_nixpkgs("2");
    let (code, second, stderr) = s.build(&["--rev", &bumped, "--max-jobs", "3"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        status_of(&second),
        BTreeMap::from([("cuda", "built"), ("default", "built"), ("vulkan", "built")])
    );
    for v in ["default", "cuda", "vulkan"] {
        assert_ne!(first[v]["drv_path"], second[v]["drv_path"], "{v} has a new derivation");
    }

    let docs = s.fleet.commit_unrelated("# the fleet\n");
    let (code, third, stderr) = s.build(&["--rev", &docs]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        status_of(&third),
        BTreeMap::from([("cuda", "cached"), ("default", "cached"), ("vulkan", "cached")])
    );
    for v in ["default", "cuda", "vulkan"] {
        assert_eq!(second[v]["drv_path"], third[v]["drv_path"], "{v}: same derivation");
    }

    // Every revision is recorded with the nixpkgs it pins.
    let status = s.status();
    let revs: Vec<(&str, &str)> = status
        .iter()
        .map(|r| {
            let nixpkgs = r["inputs"].as_array().unwrap().iter().find(|i| i["name"] == "nixpkgs").unwrap();
            (r["rev"].as_str().unwrap(), nixpkgs["rev"].as_str().unwrap())
        })
        .collect();
    let expected_nixpkgs = s.fleet.locked_rev(&bumped, "nixpkgs");
    assert_eq!(revs.len(), 3);
    assert_eq!(revs[0], (docs.as_str(), expected_nixpkgs.as_str()));
    assert_eq!(revs[1], (bumped.as_str(), expected_nixpkgs.as_str()));
}

const WITH_BROKEN: &str = r#"
[[variant]]
name = "default"
attr = "inputs.llama-cpp.packages.{system}.default"

[[variant]]
name = "broken"
attr = "inputs.llama-cpp.packages.{system}.broken"

[[variant]]
name = "metal"
attr = "inputs.llama-cpp.packages.{system}.metal"
"#;

#[test]
fn failures_are_recorded_and_the_other_variants_still_publish() {
    let s = Setup::new();
    let config = s.write_config(WITH_BROKEN);
    let config = config.to_str().unwrap();
    let (code, results, stderr) = s.build(&["--rev", "main", "--config", config]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        status_of(&results),
        BTreeMap::from([("broken", "failed"), ("default", "built"), ("metal", "failed")])
    );
    let broken = results["broken"]["error"].as_str().unwrap();
    assert!(broken.contains("this variant is broken"), "the log tail is in the error: {broken}");
    let metal = results["metal"]["error"].as_str().unwrap();
    assert!(
        metal.contains("inputs.llama-cpp.packages.x86_64-linux.metal")
            && metal.contains("attribute 'metal' missing"),
        "{metal}"
    );
    assert!(!metal.contains("FLEETCACHE_EVAL"), "our own expression is not shown: {metal}");

    // A known failure is not rebuilt without --retry-failed.
    let (code, again, _) = s.build(&["--rev", "main", "--config", config, "--variant", "broken"]);
    assert_eq!(code, 1);
    assert!(again["broken"]["error"].as_str().unwrap().contains("--retry-failed"));
    assert_eq!(attempts(&s.status(), "broken"), ["failed"]);
    let (code, _, _) =
        s.build(&["--rev", "main", "--config", config, "--variant", "broken", "--retry-failed"]);
    assert_eq!(code, 1);
    let status = s.status();
    assert_eq!(attempts(&status, "broken"), ["failed", "failed"]);
    assert_eq!(attempts(&status, "default"), ["built"]);

    // Its log is recorded.
    let log = run(&mut s.orchestrator(&["logs", "broken", "--rev", "main", "--config", config]));
    assert!(log.contains("error: this variant is broken"), "{log}");

    // The human output: a table, the error below it.
    let out = s.orchestrator(&["build", "--rev", "main", "--config", config]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("VARIANT"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("default") && l.contains("cached")), "{table}");
    assert!(table.contains("broken (x86_64-linux): "), "{table}");
}

#[test]
fn bad_requests_get_clear_errors() {
    let s = Setup::new();
    let out = s.orchestrator(&["build", "--rev", "no-such-branch"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"no-such-branch\" is not a commit, tag or branch"), "{err}");

    let out = s.orchestrator(&["build", "--rev", "main", "--variant", "rocm"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no variant \"rocm\" is configured (known: default, cuda, vulkan)"), "{err}");

    let not_git = s.fleet.scratch("not-git");
    let out =
        s.orchestrator(&["build", "--rev", "main", "--flake", not_git.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a git repository"), "{err}");

    let config = s.write_config("[cache]\nurl = \"http://127.0.0.1:1\"\n");
    let out = s.orchestrator(&["check-config", "--config", config.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs cache.token-file"));

    // No lock file at a commit: said plainly.
    let fleet = &s.fleet.fleet;
    run(Command::new("git").arg("-C").arg(fleet).args(["rm", "-q", "flake.lock"]));
    run(Command::new("git").arg("-C").arg(fleet).args([
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "-qm",
        "unlock",
    ]));
    let out = s.orchestrator(&["build", "--rev", "main"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no flake.lock is committed"), "{err}");
}

#[test]
fn two_builds_at_once_build_each_derivation_once() {
    let s = Setup::new();
    s.fleet.hold_builds();
    let (a, a_out, a_err) = spawn_build(&s, "a", &["--rev", "main", "--max-jobs", "3"]);
    wait_for_file(&a_err, Duration::from_secs(60), "run a building", |t| {
        t.matches(": building").count() == 3
    });
    let (b, b_out, b_err) = spawn_build(&s, "b", &["--rev", "main", "--max-jobs", "3"]);
    wait_for_file(&b_err, Duration::from_secs(60), "run b waiting", |t| t.matches(": waiting").count() == 3);
    s.fleet.release_builds();
    let (code_a, ra, err_a) = collect(a, a_out, a_err);
    let (code_b, rb, err_b) = collect(b, b_out, b_err);
    assert_eq!((code_a, code_b), (0, 0), "{err_a}\n{err_b}");
    assert_eq!(
        status_of(&ra),
        BTreeMap::from([("cuda", "built"), ("default", "built"), ("vulkan", "built")])
    );
    assert_eq!(
        status_of(&rb),
        BTreeMap::from([("cuda", "cached"), ("default", "cached"), ("vulkan", "cached")])
    );
    let status = s.status();
    for v in ["default", "cuda", "vulkan"] {
        assert_eq!(attempts(&status, v), ["built"], "{v} was built once");
    }
}

#[test]
fn an_interrupted_build_publishes_nothing_and_the_next_run_resumes() {
    let s = Setup::new();
    s.fleet.hold_builds();
    let (child, out, err) = spawn_build(&s, "first", &["--rev", "main", "--variant", "cuda"]);
    wait_for_file(&err, Duration::from_secs(60), "the build", |t| t.contains("cuda: building"));
    child.interrupt();
    let (code, results, stderr) = collect(child, out, err);
    assert_eq!(code, 130, "{stderr}");
    assert_eq!(results["cuda"]["status"], "interrupted");
    let cuda = out_path(&results["cuda"]);
    let narinfo = s.cache_dir().join(format!("{}.narinfo", cuda.hash_part()));
    assert!(!narinfo.exists(), "nothing published for an interrupted build");
    assert_eq!(attempts(&s.status(), "cuda"), ["interrupted"]);
    // No nix build of ours is left running.
    let drv = results["cuda"]["drv_path"].as_str().unwrap();
    let ps = run(Command::new("ps").args(["-eo", "args"]));
    assert!(!ps.lines().any(|l| l.contains("nix build") && l.contains(drv)), "{ps}");

    s.fleet.release_builds();
    let (code, results, stderr) = s.build(&["--rev", "main", "--variant", "cuda"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(results["cuda"]["status"], "built");
    assert!(narinfo.exists());
    assert_eq!(attempts(&s.status(), "cuda"), ["interrupted", "built"]);
}

#[test]
fn a_remote_cache_server_receives_the_results() {
    let s = Setup::new();
    let (_dir, server) = CacheServer::start_local();
    let token = s.home.join("token");
    std::fs::write(&token, &server.token).unwrap();
    let config =
        s.write_config(&format!("[cache]\nurl = \"{}\"\ntoken-file = \"{}\"\n", server.url, token.display()));
    let (code, results, stderr) =
        s.build(&["--rev", "main", "--config", config.to_str().unwrap(), "--variant", "vulkan"]);
    assert_eq!(code, 0, "{stderr}\n{}", server.log());
    assert_eq!(results["vulkan"]["status"], "built");
    let machine = TempStore::new();
    let out = out_path(&results["vulkan"]);
    run(&mut machine.copy_from(&server.url, &server.public_key, &[&out]));
    assert!(machine.real_path(&out).join("lib/libggml-vulkan.so").is_file());
    assert!(!s.home.join("data/fleetcache/signing-key").exists(), "no local key when the server signs");
}

#[test]
fn the_embedded_cache_can_publish_to_s3() {
    let s = Setup::new();
    let garage = fleetcache_tests::garage::Garage::start();
    let key = nix_formats::SecretKey::generate("fleet-s3-1").unwrap();
    let key_file = s.home.join("s3-signing-key");
    std::fs::write(&key_file, key.to_nix_string()).unwrap();
    let config = s.write_config(&format!(
        "[cache]\nstore = \"{}\"\nsigning-key-files = [\"{}\"]\n",
        garage.store_url(),
        key_file.display()
    ));
    let mut cmd = s.orchestrator(&["build", "--json", "--rev", "main", "--config", config.to_str().unwrap()]);
    let (code, results, stderr) = parse_build(cmd.envs(garage.credential_env()).output().unwrap());
    assert_eq!(code, 0, "{stderr}\n{}", garage.log());
    assert_eq!(
        status_of(&results),
        BTreeMap::from([("cuda", "built"), ("default", "built"), ("vulkan", "built")])
    );

    // The bucket alone is the cache: a read-only cache-server over it serves all three.
    let server = CacheServer::start_with(
        &garage.store_url(),
        Options { read_only: true, env: garage.credential_env().to_vec(), ..Options::default() },
    );
    let machine = TempStore::new();
    let outs: Vec<StorePath> = results.values().map(out_path).collect();
    run(&mut machine.copy_from(&server.url, &key.public_key().to_string(), &outs.iter().collect::<Vec<_>>()));
    assert!(outs.iter().all(|o| machine.has(o)));

    // Without credentials the command says what is missing instead of building.
    let out = s
        .orchestrator(&["build", "--rev", "main", "--config", config.to_str().unwrap()])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
}

#[test]
fn a_git_url_is_mirrored_and_fetched_on_every_build() {
    let s = Setup::new();
    let url = format!("git+file://{}", s.fleet.fleet.display());
    let (code, first, stderr) = s.build(&["--rev", "main", "--flake", &url, "--variant", "default"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(first["default"]["status"], "built");
    // A new commit on the remote's branch is seen by the next build of `main`.
    let bumped = s.fleet.bump_nixpkgs("2");
    let (code, second, stderr) = s.build(&["--rev", "main", "--flake", &url, "--variant", "default"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains(&format!("main is {bumped}")), "{stderr}");
    assert_eq!(second["default"]["status"], "built");
    assert_ne!(first["default"]["drv_path"], second["default"]["drv_path"]);
    assert_eq!(s.status()[0]["flake"], url.as_str());
}

#[test]
fn a_cache_that_goes_away_during_the_build_fails_the_push_not_the_derivation() {
    let s = Setup::new();
    let store = s.fleet.scratch("remote-cache");
    let store_url = format!("file://{}", store.display());
    let mut server = CacheServer::start(&store_url);
    let token = s.home.join("token");
    std::fs::write(&token, &server.token).unwrap();
    let config = |url: &str| {
        s.write_config(&format!("[cache]\nurl = \"{url}\"\ntoken-file = \"{}\"\n", token.display()))
    };
    let config_file = config(&server.url);
    s.fleet.hold_builds();
    let (child, out, err) = spawn_build(
        &s,
        "first",
        &["--rev", "main", "--variant", "cuda", "--config", config_file.to_str().unwrap()],
    );
    wait_for_file(&err, Duration::from_secs(60), "the build", |t| t.contains("cuda: building"));
    server.stop();
    s.fleet.release_builds();
    let (code, results, stderr) = collect(child, out, err);
    assert_eq!(code, 1, "{stderr}");
    let error = results["cuda"]["error"].as_str().unwrap();
    assert!(error.starts_with("push: "), "{error}");
    assert_eq!(attempts(&s.status(), "cuda"), ["push-failed"]);

    // Back (on another port, same store, same token): the next run publishes without
    // --retry-failed.
    let server = CacheServer::start(&store_url);
    let config_file = config(&server.url);
    let (code, results, stderr) =
        s.build(&["--rev", "main", "--variant", "cuda", "--config", config_file.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(results["cuda"]["status"], "built");
    assert_eq!(attempts(&s.status(), "cuda"), ["push-failed", "built"]);
}

#[test]
fn outputs_are_checked_for_files_and_verified_where_the_hardware_is() {
    let s = Setup::new();
    let config = s.write_config(
        r#"
[build]
features = ["cuda"]

[[variant]]
name = "cuda"
attr = "inputs.llama-cpp.packages.{system}.cuda"
files = ["lib/libggml-cuda.so", "bin/llama-cli"]
verify = { features = ["cuda"], command = "llama-cli", expect = "llama-cli cuda" }

[[variant]]
name = "vulkan"
attr = "inputs.llama-cpp.packages.{system}.vulkan"
verify = { features = ["vulkan"], command = "llama-cli", expect = "llama-cli vulkan" }

[[variant]]
name = "default"
attr = "inputs.llama-cpp.packages.{system}.default"
files = ["lib/libggml-cuda.so"]
"#,
    );
    let config = config.to_str().unwrap();
    let (code, results, stderr) = s.build(&["--rev", "main", "--config", config, "--max-jobs", "3"]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(results["cuda"]["status"], "built");
    assert_eq!(results["cuda"]["verification"]["status"], "verified", "{:?}", results["cuda"]);
    assert_eq!(results["vulkan"]["status"], "built");
    assert_eq!(results["vulkan"]["verification"]["status"], "unverified");
    assert!(results["vulkan"]["verification"]["detail"].as_str().unwrap().contains("lacks vulkan"));
    // An output without a required file fails and is not published.
    assert_eq!(results["default"]["status"], "failed");
    let error = results["default"]["error"].as_str().unwrap();
    assert!(error.contains("lacks lib/libggml-cuda.so"), "{error}");
    let default = out_path(&results["default"]);
    assert!(!s.cache_dir().join(format!("{}.narinfo", default.hash_part())).exists());

    // A verification that does not see what it expects fails the command.
    let wrong = s.write_config(
        r#"
[build]
features = ["cuda"]

[[variant]]
name = "cuda"
attr = "inputs.llama-cpp.packages.{system}.cuda"
verify = { features = ["cuda"], command = "llama-cli", expect = "CUDA0" }
"#,
    );
    s.fleet.bump_nixpkgs("2");
    let (code, results, stderr) = s.build(&["--rev", "main", "--config", wrong.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(results["cuda"]["status"], "built");
    assert_eq!(results["cuda"]["verification"]["status"], "verify-failed");
    assert!(results["cuda"]["verification"]["detail"].as_str().unwrap().contains("did not print \"CUDA0\""));
}
