//! What `deploy/` hands an operator: the example fleet's fleetcache.toml, the S3 documents, and
//! the Garage configuration and setup script, run against a real Garage with a real
//! cache-server on top.

use std::process::{Command, Stdio};
use std::time::Duration;

use fleetcache_tests::cache_server::{CacheServer, Options};
use fleetcache_tests::garage::garage_binary;
use fleetcache_tests::nix::{self, TempStore, build_closure};
use fleetcache_tests::nixos::repo_root;
use fleetcache_tests::process::{ChildGuard, free_port, wait_for_port};
use serde_json::Value;

fn deploy(file: &str) -> String {
    std::fs::read_to_string(repo_root().join("deploy").join(file)).unwrap()
}

#[test]
fn the_example_fleets_fleetcache_toml_is_valid() {
    let out = Command::new(fleetcache_tests::bin("orchestrator"))
        .args(["check-config", "--config"])
        .arg(repo_root().join("deploy/fleet/fleetcache.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: toml::Value = toml::from_str(&deploy("fleet/fleetcache.toml")).unwrap();
    let names: Vec<&str> =
        config["variant"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cpu", "cuda"]);
    assert_eq!(config["fleet"]["machines"].as_bool(), Some(true), "the machines say what to build");
}

#[test]
fn the_s3_documents_grant_what_cache_server_does_and_no_more() {
    let policy: Value = serde_json::from_str(&deploy("s3/cache-server-policy.json")).unwrap();
    let mut actions: Vec<&str> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["Action"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()))
        .collect();
    actions.sort();
    // GetObject covers HEAD; PutObject covers multipart uploads; ListBucket makes a missing
    // narinfo a 404 rather than a 403; DeleteObject (which covers DeleteObjects) only for a
    // garbage collection an admin token asks for, which also lists the multipart uploads a
    // killed server left (ListBucketMultipartUploads) to abort them.
    assert_eq!(
        actions,
        [
            "s3:AbortMultipartUpload",
            "s3:DeleteObject",
            "s3:GetObject",
            "s3:ListBucket",
            "s3:ListBucketMultipartUploads",
            "s3:ListMultipartUploadParts",
            "s3:PutObject"
        ]
    );
    let public: Value = serde_json::from_str(&deploy("s3/public-read-policy.json")).unwrap();
    assert_eq!(public["Statement"][0]["Action"], serde_json::json!(["s3:GetObject"]));
    let lifecycle: Value = serde_json::from_str(&deploy("s3/lifecycle.json")).unwrap();
    assert_eq!(lifecycle["Rules"][0]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"], 1);
}

#[test]
fn the_garage_example_and_setup_script_give_a_cache_that_serves_the_fleet() {
    let dir = tempfile::Builder::new().prefix("fleetcache-deploy-garage-").tempdir().unwrap();
    let (s3_port, rpc_port) = (free_port(), free_port());
    let config = deploy("s3/garage.toml")
        .replace("/var/lib/garage", &dir.path().display().to_string())
        .replace("127.0.0.1:3900", &format!("127.0.0.1:{s3_port}"))
        .replace("127.0.0.1:3901", &format!("127.0.0.1:{rpc_port}"));
    let config_file = dir.path().join("garage.toml");
    std::fs::write(&config_file, config).unwrap();
    let secret = "5b1a57e2c0ffee0ddba11c0de5ca1ab1e5eed5a1ad5a1ad5ea5e1e55c0de0042";
    let log = std::fs::File::create(dir.path().join("garage.log")).unwrap();
    let mut garage = ChildGuard::spawn(
        "garage",
        Command::new(garage_binary())
            .arg("-c")
            .arg(&config_file)
            .arg("server")
            .env("GARAGE_RPC_SECRET", secret)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    );
    wait_for_port(&mut garage, ([127, 0, 0, 1], s3_port).into(), Duration::from_secs(60));

    // The operator's step: garage-setup prints the key as cache-server's credentials file.
    let out = Command::new(repo_root().join("deploy/s3/garage-setup"))
        .arg(&config_file)
        .args(["fleet-cache", "1G"])
        .env("GARAGE", garage_binary())
        .env("GARAGE_RPC_SECRET", secret)
        .output()
        .unwrap();
    assert!(out.status.success(), "garage-setup: {}", String::from_utf8_lossy(&out.stderr));
    let credentials = dir.path().join("fleetcache-s3.env");
    std::fs::write(&credentials, &out.stdout).unwrap();

    let store = format!("s3://fleet-cache?endpoint=http://127.0.0.1:{s3_port}&region=garage");
    let server = CacheServer::start_with(
        &store,
        Options {
            env: vec![("AWS_ACCESS_KEY_ID", String::new()), ("AWS_SECRET_ACCESS_KEY", String::new())],
            config: Some(format!("s3-credentials-file = {:?}\n", credentials.display().to_string())),
            ..Default::default()
        },
    );
    // The key can write (a closure uploaded by nix) and read (a fresh store substitutes it).
    let top = build_closure("deploy-garage", 2, 0);
    let out = nix::command("nix")
        .args(["copy", "--to", &server.url, "--netrc-file"])
        .arg(server.netrc())
        .arg(top.to_absolute())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), server.log());
    let fresh = TempStore::new();
    let out = fresh.copy_from(&server.url, &server.public_key, &[&top]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(fresh.has(&top));
}

#[test]
fn the_example_fleet_evaluates_and_its_variants_are_what_its_machines_install() {
    // deploy/fleet with the stand-in nixpkgs and llama.cpp and this repository as its inputs.
    let bench = fleetcache_tests::nixos::Bench::new();
    let v = bench.eval(&format!(
        "let
           machines = t.deployFleet.nixosConfigurations;
           toml = builtins.fromTOML (builtins.readFile {toml:?});
           resolve = attr: builtins.foldl' (a: n: a.${{n}}) t.deployFleet
             (builtins.filter builtins.isString (builtins.split \"\\\\.\" attr));
           services = m: builtins.attrNames (t.lib.filterAttrs (n: _: t.lib.hasPrefix \"fleetcache-\" n) m.config.systemd.services);
         in {{
           failed = builtins.mapAttrs (_: m: map (a: a.message) (builtins.filter (a: !a.assertion) m.config.assertions)) machines;
           installed = builtins.mapAttrs (_: m: map (p: p.drvPath) m.config.environment.systemPackages) machines;
           services = builtins.mapAttrs (_: services) machines;
           variants = builtins.listToAttrs (map (v: {{ inherit (v) name; value = (resolve v.attr).drvPath; }}) toml.variant);
           upstreamCpu = t.llama.packages.x86_64-linux.default.drvPath;
           configs = map (u: (t.needs machines.cache.config.systemd.services.${{u}}.serviceConfig.ExecStart).drvPath)
             [ \"fleetcache-cache-server\" \"fleetcache-orchestrator\" \"fleetcache-builder\" ]
             ++ [ (t.needs machines.forge1.config.systemd.services.fleetcache-builder.serviceConfig.ExecStart).drvPath ];
         }}",
        toml = repo_root().join("deploy/fleet/fleetcache.toml").display().to_string(),
    ));
    let machines = ["beryllium", "boron", "cache", "carbon", "forge1", "nitrogen"];
    for m in machines {
        assert_eq!(v["failed"][m], serde_json::json!([]), "{m}'s assertions");
    }
    // The variants that lend their checks are what their machines install.
    let variants = &v["variants"];
    let one = |drv: &Value| serde_json::json!([drv]);
    assert_eq!(v["installed"]["beryllium"], one(&variants["cpu"]));
    assert_eq!(v["installed"]["boron"], one(&variants["cpu"]));
    assert_eq!(v["installed"]["carbon"], one(&variants["cuda"]));
    assert_ne!(variants["cpu"], v["upstreamCpu"], "the CPU variant is the overlay's, with run-time dispatch");
    assert_eq!(v["installed"]["cache"], serde_json::json!([]));
    assert_eq!(
        v["services"],
        serde_json::json!({
            "beryllium": [], "boron": [], "carbon": [], "nitrogen": [],
            "cache": ["fleetcache-builder", "fleetcache-cache-server", "fleetcache-orchestrator"],
            "forge1": ["fleetcache-builder"],
        })
    );
    // The cache host's and the GPU builder's configuration files pass the binaries' checks.
    for drv in v["configs"].as_array().unwrap() {
        bench.realise(drv.as_str().unwrap()).unwrap();
    }
}
