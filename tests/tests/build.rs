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

/// Every machine of the stand-in fleet and the store paths it installs, as Nix evaluates them
/// (not as the orchestrator reports them).
/// A machine whose configuration does not evaluate installs `None`.
fn installed_by_machine(s: &Setup, rev: &str) -> BTreeMap<String, Option<Vec<String>>> {
    let flake = format!("git+file://{}?rev={rev}", s.fleet.fleet.display());
    let out = run(command("nix").args(["eval", "--json", "--impure", "--expr"]).arg(format!(
        "builtins.mapAttrs (_: m: let v = map (p: p.outPath) m.config.environment.systemPackages; \
           r = builtins.tryEval (builtins.deepSeq v v); in if r.success then v else null) \
         (builtins.getFlake {flake:?}).nixosConfigurations"
    )));
    serde_json::from_str(&out).unwrap()
}

/// Asserts that the cache in `s`'s cache directory has every path `machine` installs.
fn assert_cached(s: &Setup, machine: &str, paths: &[String]) {
    assert!(!paths.is_empty(), "{machine} installs nothing");
    for p in paths {
        let out = StorePath::from_absolute(p).unwrap();
        let narinfo = s.cache_dir().join(format!("{}.narinfo", out.hash_part()));
        assert!(narinfo.is_file(), "{machine} installs {out}, which the cache lacks");
    }
}

#[test]
fn the_embedded_default_builds_publishes_and_a_fresh_machine_substitutes() {
    let s = Setup::new();
    let head = s.fleet.head();
    let (code, results, stderr) = s.build(&["--rev", "main"]);
    assert_eq!(code, 0, "{stderr}");
    // With no [[variant]] configured, the variants are what the fleet's machines install: one per
    // derivation, named after the client's variant, with the machines it serves.
    assert_eq!(
        status_of(&results),
        BTreeMap::from([("cpu", "built"), ("cuda", "built"), ("vulkan", "built")])
    );
    assert_eq!(results["cpu"]["machines"], serde_json::json!(["beryllium", "boron"]));
    assert_eq!(results["cuda"]["machines"], serde_json::json!(["carbon"]));
    assert_eq!(results["vulkan"]["machines"], serde_json::json!(["nitrogen"]));
    assert!(stderr.contains("4 of 5 machines use the fleetcache client: 3 derivations"), "{stderr}");
    // It said which commit, which inputs, and the key it generated.
    assert!(stderr.contains(&format!("main is {head}")), "{stderr}");
    let nixpkgs_rev = s.fleet.locked_rev(&head, "nixpkgs");
    assert!(stderr.contains(&format!("nixpkgs {}", &nixpkgs_rev[..12])), "{stderr}");
    let key = s.public_key();
    assert!(stderr.contains("generated the cache's signing key") && stderr.contains(&key), "{stderr}");
    for r in results.values() {
        assert_eq!(r["system"], "x86_64-linux");
        let first = r["machines"][0].as_str().unwrap();
        assert_eq!(
            r["attr"],
            format!("nixosConfigurations.{first}.config.services.fleetcache.client.package")
        );
        assert!(r["drv_path"].as_str().unwrap().ends_with(".drv"));
        assert_eq!(r["error"], Value::Null);
    }
    // Every machine's installed llama.cpp is in the cache; the machine without the client
    // installs none.
    let installed = installed_by_machine(&s, &head);
    assert_eq!(installed["gateway"], Some(Vec::new()));
    for (machine, paths) in installed.iter().filter(|(m, _)| *m != "gateway") {
        assert_cached(&s, machine, paths.as_deref().unwrap());
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
        assert!(cli.contains(&format!("llama-cli {variant}")), "{cli}");
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
        BTreeMap::from([("cpu", "cached"), ("cuda", "cached"), ("vulkan", "cached")])
    );
    eprintln!("no-op rebuild took {took:?}");
    let status = s.status();
    for v in ["cpu", "cuda", "vulkan"] {
        assert_eq!(attempts(&status, v), ["built"], "one attempt for {v}");
    }
    let recorded = status[0]["variants"].as_array().unwrap();
    let cpu = recorded.iter().find(|v| v["variant"] == "cpu").unwrap();
    assert_eq!(cpu["machines"], serde_json::json!(["beryllium", "boron"]), "status names the machines");
    assert_eq!(status[0]["rev"], head);
    assert_eq!(
        status[0]["inputs"].as_array().unwrap().iter().find(|i| i["name"] == "nixpkgs").unwrap()["rev"],
        nixpkgs_rev
    );
}

#[test]
fn every_machine_gets_what_it_installs_however_it_picks_it() {
    let s = Setup::new();
    // boron overrides its package; oxygen is a headless datacenter GPU on carbon's derivation;
    // argon's configuration does not evaluate.
    let head = s.fleet.set_machines(
        r#"{
          boron = [ ({ pkgs, ... }: { services.fleetcache.client.package = pkgs.llama-cpp-baseline; }) ];
          oxygen = [ { services.fleetcache.client.variant = "cuda"; hardware.nvidia.datacenter.enable = true;
                       hardware.graphics.enable = true; } ];
          argon = [ { services.fleetcache.client.package = throw "argon's package does not evaluate"; } ];
        }"#,
    );
    let (code, results, stderr) = s.build(&["--rev", "main", "--max-jobs", "2"]);
    assert_eq!(code, 1, "a machine that does not evaluate fails the build: {stderr}");
    assert_eq!(
        status_of(&results),
        BTreeMap::from([
            ("argon", "failed"),
            ("cpu", "built"),
            ("cpu-boron", "built"),
            ("cuda", "built"),
            ("vulkan", "built")
        ])
    );
    let machines = |v: &str| results[v]["machines"].clone();
    assert_eq!(machines("cpu"), serde_json::json!(["beryllium"]));
    assert_eq!(machines("cpu-boron"), serde_json::json!(["boron"]));
    assert_eq!(machines("cuda"), serde_json::json!(["carbon", "oxygen"]));
    assert_eq!(machines("argon"), serde_json::json!(["argon"]));
    let argon = results["argon"]["error"].as_str().unwrap();
    assert!(argon.contains("evaluating machine argon") && argon.contains("does not evaluate"), "{argon}");
    let installed = installed_by_machine(&s, &head);
    assert_eq!(installed["argon"], None);
    for m in ["beryllium", "boron", "carbon", "nitrogen", "oxygen"] {
        assert_cached(&s, m, installed[m].as_deref().unwrap());
    }

    // A configured variant that is a machine's derivation lends it its name and checks; one no
    // machine installs is built beside them when the machines are asked too.
    let config = s.write_config(
        r#"
[fleet]
machines = true

[[variant]]
name = "gpu"
attr = "nixosConfigurations.oxygen.config.services.fleetcache.client.package"
files = ["lib/libggml-cuda.so"]

[[variant]]
name = "rocm"
attr = "inputs.llama-cpp.packages.{system}.rocm"
"#,
    );
    let config = config.to_str().unwrap();
    let (_, results, stderr) = s.build(&["--rev", "main", "--config", config]);
    assert_eq!(
        status_of(&results),
        BTreeMap::from([
            ("argon", "failed"),
            ("cpu", "cached"),
            ("cpu-boron", "cached"),
            ("gpu", "cached"),
            ("rocm", "built"),
            ("vulkan", "cached")
        ]),
        "{stderr}"
    );
    assert_eq!(results["gpu"]["machines"], serde_json::json!(["carbon", "oxygen"]));
    assert_eq!(results["rocm"]["machines"], serde_json::json!([]));
    // Machines name what to build too.
    let (code, results, stderr) = s.build(&["--rev", "main", "--variant", "carbon", "--config", config]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status_of(&results), BTreeMap::from([("gpu", "cached")]));
    // The table shows the machines.
    let out = s.orchestrator(&["build", "--rev", "main", "--variant", "cpu"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().next().unwrap().contains("MACHINES"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("cpu ") && l.contains(" beryllium ")), "{table}");
}

#[test]
fn build_and_push_work_with_a_nix_conf_that_enables_no_experimental_feature() {
    let s = Setup::new();
    // What a stock nix.conf has (NixOS's enables no experimental feature), plus what Debian's
    // single-user Nix needs here.
    let conf = s.fleet.scratch("etc-nix");
    std::fs::write(conf.join("nix.conf"), "sandbox = false\nbuild-users-group =\nsubstituters =\n").unwrap();
    let stock = |c: &mut Command| {
        c.env("NIX_CONF_DIR", &conf).env("NIX_CONFIG", "").env("NIX_USER_CONF_FILES", "");
    };
    // The new CLI is refused as such, so this configuration is what the binaries get.
    let mut probe = Command::new("nix");
    probe.args(["path-info", "/nix/store/00000000000000000000000000000000-x"]);
    stock(&mut probe);
    let refused = String::from_utf8_lossy(&probe.output().unwrap().stderr).into_owned();
    assert!(refused.contains("experimental Nix feature 'nix-command' is disabled"), "{refused}");

    let mut build = s.orchestrator(&["build", "--json", "--rev", "main", "--variant", "cuda"]);
    stock(&mut build);
    let (code, results, stderr) = parse_build(build.output().unwrap());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(results["cuda"]["status"], "built");

    let (_dir, server) = CacheServer::start_local();
    let token = s.home.join("token");
    std::fs::write(&token, &server.token).unwrap();
    let mut push = s.orchestrator(&["push", "--json", "--cache", &server.url, "--token-file"]);
    push.arg(&token).arg(out_path(&results["cuda"]).to_absolute());
    stock(&mut push);
    let out = push.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["uploaded"], 2, "the variant and ggml-common: {summary}");
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
        BTreeMap::from([("cpu", "built"), ("cuda", "built"), ("vulkan", "built")])
    );
    for v in ["cpu", "cuda", "vulkan"] {
        assert_ne!(first[v]["drv_path"], second[v]["drv_path"], "{v} has a new derivation");
    }

    let docs = s.fleet.commit_unrelated("# the fleet\n");
    let (code, third, stderr) = s.build(&["--rev", &docs]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        status_of(&third),
        BTreeMap::from([("cpu", "cached"), ("cuda", "cached"), ("vulkan", "cached")])
    );
    for v in ["cpu", "cuda", "vulkan"] {
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
    assert!(
        err.contains(
            "no variant or machine \"rocm\" (known: beryllium, boron, carbon, cpu, cuda, nitrogen, vulkan)"
        ),
        "{err}"
    );
    // With only configured variants, the name is checked before anything runs.
    let config = s.write_config(
        "[[variant]]\nname = \"default\"\nattr = \"inputs.llama-cpp.packages.{system}.default\"\n",
    );
    let out = s
        .orchestrator(&["build", "--rev", "main", "--variant", "cpu", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no variant \"cpu\" is configured (known: default)"), "{err}");

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
    assert_eq!(status_of(&ra), BTreeMap::from([("cpu", "built"), ("cuda", "built"), ("vulkan", "built")]));
    assert_eq!(status_of(&rb), BTreeMap::from([("cpu", "cached"), ("cuda", "cached"), ("vulkan", "cached")]));
    let status = s.status();
    for v in ["cpu", "cuda", "vulkan"] {
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
        BTreeMap::from([("cpu", "built"), ("cuda", "built"), ("vulkan", "built")])
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

    // With credentials S3 refuses, the command says what S3 said.
    let out = s
        .orchestrator(&[
            "build",
            "--rev",
            "main",
            "--variant",
            "cpu",
            "--retry-failed",
            "--config",
            config.to_str().unwrap(),
        ])
        .envs(garage.credential_env())
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .env("RUST_LOG", "")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("AccessDenied") && err.contains("HTTP 403"), "what S3 said: {err}");
    assert!(!err.contains("SdkBody"), "in a line, not a dump: {err}");
}

#[test]
fn a_git_url_is_mirrored_and_fetched_on_every_build() {
    let s = Setup::new();
    let url = format!("git+file://{}", s.fleet.fleet.display());
    let (code, first, stderr) = s.build(&["--rev", "main", "--flake", &url, "--variant", "cpu"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(first["cpu"]["status"], "built");
    // A new commit on the remote's branch is seen by the next build of `main`.
    let bumped = s.fleet.bump_nixpkgs("2");
    let (code, second, stderr) = s.build(&["--rev", "main", "--flake", &url, "--variant", "cpu"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains(&format!("main is {bumped}")), "{stderr}");
    assert_eq!(second["cpu"]["status"], "built");
    assert_ne!(first["cpu"]["drv_path"], second["cpu"]["drv_path"]);
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
