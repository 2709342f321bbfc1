//! The flake's overlay and NixOS modules, evaluated by the real `nix` against the stand-in
//! fleet (see `fleetcache_tests::nixos`), and the configuration files the modules render checked
//! by the real binaries at build time, as on a NixOS machine.

use std::process::Command;

use fleetcache_tests::nix::command;
use fleetcache_tests::nixos::{Bench, config_file_of, repo_root};
use serde_json::{Value, json};

/// A client machine with `client` (a Nix attribute set body) as its client settings and
/// `extra` as further configuration; the expression evaluates to the machine.
fn client_machine(client: &str, extra: &str) -> String {
    format!(
        "t.machine [ t.modules.client {{ services.fleetcache.client = {{ enable = true; \
         url = t.lib.mkDefault \"https://cache.example.org\"; publicKeys = t.lib.mkDefault [ \"cache.example.org-1:AAAA\" ]; }}; }} \
         {{ services.fleetcache.client = {{ {client} }}; {extra} }} ]"
    )
}

fn failed(bench: &Bench, client: &str, extra: &str) -> Vec<String> {
    let v = bench.eval(&format!("({}).failedAssertions", client_machine(client, extra)));
    serde_json::from_value(v).expect("a list of messages")
}

#[test]
fn every_nix_file_parses() {
    let root = repo_root();
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() && !matches!(name.as_str(), "target" | ".git") {
                dirs.push(path);
            } else if name.ends_with(".nix") {
                files.push(path);
            }
        }
    }
    // The flake, the overlay, the package, the VM test, the modules, deploy/ and the fixtures.
    assert!(files.len() >= 18, "found only {files:?}");
    for file in &files {
        let out = command("nix-instantiate").arg("--parse").arg(file).output().unwrap();
        assert!(out.status.success(), "{}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn the_overlay_gives_each_variant_and_runtime_cpu_dispatch() {
    let bench = Bench::new();
    let v = bench.eval(
        "let up = t.llama.packages.x86_64-linux; p = t.pkgs; in {
           flags = { cpu = p.llama-cpp.cmakeFlags; cuda = p.llama-cpp-cuda.cmakeFlags; vulkan = p.llama-cpp-vulkan.cmakeFlags; };
           upstream = { cpu = up.default.cmakeFlags; cuda = up.cuda.cmakeFlags; vulkan = up.vulkan.cmakeFlags; };
           same = {
             baseline = p.llama-cpp-baseline.drvPath == up.default.drvPath;
             rocm = p.llama-cpp-rocm.drvPath == up.rocm.drvPath;
             cpu = p.llama-cpp.drvPath == up.default.drvPath;
             cuda = p.llama-cpp-cuda.drvPath == up.cuda.drvPath;
             vulkan = p.llama-cpp-vulkan.drvPath == up.vulkan.drvPath;
           };
           cpuDrv = p.llama-cpp.drvPath;
         }",
    );
    let dispatch = ["-DGGML_BACKEND_DL:BOOL=TRUE", "-DGGML_CPU_ALL_VARIANTS:BOOL=TRUE"];
    for variant in ["cpu", "cuda", "vulkan"] {
        // The GPU builds run what they do not offload on the CPU backend: it is chosen at run
        // time there too.
        let mut expected: Vec<String> = serde_json::from_value(v["upstream"][variant].clone()).unwrap();
        expected.extend(dispatch.map(str::to_owned));
        assert_eq!(v["flags"][variant], json!(expected), "{variant}: upstream's flags, then the two");
    }
    assert_eq!(
        v["same"],
        json!({"baseline": true, "rocm": true, "cpu": false, "cuda": false, "vulkan": false})
    );

    // Built, the CPU variant was configured with those flags.
    let out = bench.realise(v["cpuDrv"].as_str().unwrap()).unwrap();
    let flags = std::fs::read_to_string(format!("{out}/share/cmake-flags")).unwrap();
    assert!(flags.contains("-DGGML_BACKEND_DL:BOOL=TRUE -DGGML_CPU_ALL_VARIANTS:BOOL=TRUE"), "{flags}");

    // On aarch64-linux the llama.cpp flake has no rocm: the overlay leaves it out instead of
    // failing. This pin's ggml (no source here) is taken to lack ARM CPU variants.
    let v = bench
        .try_eval_on(
            "aarch64-linux",
            "let up = t.llama.packages.aarch64-linux; p = t.pkgs; in {
               rocm = p ? llama-cpp-rocm; cuda = p.llama-cpp-cuda.drvPath == up.cuda.drvPath;
               cpu = p.llama-cpp.drvPath == up.default.drvPath; }",
        )
        .unwrap();
    assert_eq!(v, json!({"rocm": false, "cuda": true, "cpu": true}));
}

#[test]
fn arm_gets_cpu_variants_where_the_pinned_ggml_has_them() {
    let bench = Bench::new();
    // A llama.cpp flake whose `default` carries its source, as the real one does: ggml's CMake
    // lists the armv8.x CPU modules from mid-2025 on; before, GGML_CPU_ALL_VARIANTS stops the
    // build on ARM.
    let dir = tempfile::tempdir().unwrap();
    let with = |name: &str, cmake: &str| {
        let src = dir.path().join(name).join("ggml/src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("CMakeLists.txt"), cmake).unwrap();
        dir.path().join(name).display().to_string()
    };
    let new = with(
        "new",
        "ggml_add_cpu_backend_variant(armv8.0_1)\nggml_add_cpu_backend_variant(armv8.2_1 DOTPROD)\n",
    );
    let old = with("old", "message(FATAL_ERROR \"GGML_CPU_ALL_VARIANTS not yet supported\")\n");
    let flags = |src: &str| {
        bench
            .try_eval_on(
                "aarch64-linux",
                &format!(
                    "let
                       up = t.llama.packages.aarch64-linux;
                       flake = {{ packages.aarch64-linux = up // {{ default = up.default // {{ src = builtins.path {{ path = {src:?}; }}; }}; }}; }};
                       p = t.lib.packageSet \"aarch64-linux\" [ (import {overlay:?} flake) ];
                     in p.llama-cpp.cmakeFlags",
                    overlay = repo_root().join("nix/overlay.nix").display().to_string(),
                ),
            )
            .unwrap()
    };
    let has_dispatch =
        |v: &Value| v.as_array().unwrap().contains(&json!("-DGGML_CPU_ALL_VARIANTS:BOOL=TRUE"));
    assert!(has_dispatch(&flags(&new)), "{}", flags(&new));
    assert!(!has_dispatch(&flags(&old)), "{}", flags(&old));
}

#[test]
fn the_fleet_sets_its_cuda_capabilities_and_the_overlay_replaces_nixpkgs_llama_cpp() {
    let bench = Bench::new();
    let v = bench.eval(
        "let
           m = t.machine [ t.modules.client { nixpkgs.config.cudaCapabilities = [ \"8.6\" \"8.9\" ]; } ];
         in {
           fleet = m.pkgs.llama-cpp-cuda.cmakeFlags;
           default = t.pkgs.llama-cpp-cuda.cmakeFlags;
           usesDrv = t.pkgs.uses-llama-cpp.drvPath;
           ours = t.pkgs.llama-cpp.outPath;
           nixpkgs = t.prev.llama-cpp.outPath;
         }",
    );
    let arch = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|f| {
                f.as_str().filter(|f| f.starts_with("-DCMAKE_CUDA_ARCHITECTURES")).map(str::to_owned)
            })
            .collect()
    };
    assert_eq!(arch(&v["fleet"]), ["-DCMAKE_CUDA_ARCHITECTURES:STRING=86;89"], "only the fleet's GPUs");
    assert_eq!(arch(&v["default"]), ["-DCMAKE_CUDA_ARCHITECTURES:STRING=75;80;86;89;90"], "upstream's");

    // A nixpkgs package built on `llama-cpp` gets the fleet's llama.cpp (deliberately: one
    // llama.cpp per machine, the one the cache holds), not nixpkgs' own.
    assert_ne!(v["ours"], v["nixpkgs"]);
    let out = bench.realise(v["usesDrv"].as_str().unwrap()).unwrap();
    assert_eq!(std::fs::read_to_string(out).unwrap().trim(), v["ours"].as_str().unwrap());
}

#[test]
fn the_client_module_adds_the_cache_and_installs_the_chosen_variant() {
    let bench = Bench::new();
    let v = bench.eval(&format!(
        "let m = {}; s = m.config.nix.settings; in {{
           inherit (s) substituters trusted-public-keys narinfo-cache-negative-ttl connect-timeout;
           packages = map (p: p.drvPath) m.config.environment.systemPackages;
           cuda = t.pkgs.llama-cpp-cuda.drvPath;
           overlays = builtins.length m.config.nixpkgs.overlays;
           failed = m.failedAssertions;
         }}",
        client_machine(
            "variant = \"cuda\";",
            "services.xserver.videoDrivers = [ \"nvidia\" ]; hardware.graphics.enable = true;"
        )
    ));
    assert_eq!(v["failed"], json!([]));
    // Added beside cache.nixos.org, which stays.
    assert_eq!(v["substituters"], json!(["https://cache.example.org", "https://cache.nixos.org/"]));
    assert_eq!(
        v["trusted-public-keys"],
        json!(["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=", "cache.example.org-1:AAAA"])
    );
    assert_eq!(v["narinfo-cache-negative-ttl"], json!(60));
    assert_eq!(v["connect-timeout"], json!(5));
    assert_eq!(v["packages"], json!([v["cuda"]]));
    assert_eq!(v["overlays"], json!(1), "the flake's client module applies the overlay");

    let v = bench.eval(&format!(
        "({}).config.environment.systemPackages",
        client_machine("variant = \"vulkan\"; installPackage = false;", "hardware.graphics.enable = true;")
    ));
    assert_eq!(v, json!([]));
    let v = bench.eval(&format!(
        "let m = {}; in [ (map (p: p.drvPath) m.config.environment.systemPackages) t.pkgs.llama-cpp.drvPath ]",
        client_machine("", "")
    ));
    assert_eq!(v[0], json!([v[1]]), "the default variant is cpu: the overlay's llama-cpp");
}

#[test]
fn the_client_module_says_what_a_machine_lacks() {
    let bench = Bench::new();
    let one = |client: &str, extra: &str, needle: &str| {
        let messages = failed(&bench, client, extra);
        assert!(
            messages.len() == 1 && messages[0].contains(needle),
            "{client} {extra}: expected one failed assertion about {needle:?}, got {messages:?}"
        );
    };
    one("variant = \"vulkan\";", "", "hardware.graphics.enable = true");
    // CUDA needs the driver (the desktop one, or the datacenter one on a headless GPU) and
    // /run/opengl-driver, where libcuda is.
    one("variant = \"cuda\";", "hardware.graphics.enable = true;", "services.xserver.videoDrivers");
    one(
        "variant = \"cuda\";",
        "services.xserver.videoDrivers = [ \"nvidia\" ];",
        "libcuda from /run/opengl-driver",
    );
    assert_eq!(failed(&bench, "variant = \"cuda\";", "").len(), 2);
    for driver in
        ["services.xserver.videoDrivers = [ \"nvidia\" ];", "hardware.nvidia.datacenter.enable = true;"]
    {
        let extra = format!("{driver} hardware.graphics.enable = true;");
        assert_eq!(failed(&bench, "variant = \"cuda\";", &extra), Vec::<String>::new(), "{driver}");
    }
    one("publicKeys = [ ];", "", "publicKeys is empty");
    one("url = \"cache.example.org\";", "", "not an http:// or https:// URL");
    assert_eq!(
        failed(&bench, "variant = \"vulkan\";", "hardware.graphics.enable = true;"),
        Vec::<String>::new()
    );

    // rocm exists on x86_64-linux only.
    let v = bench
        .try_eval_on(
            "aarch64-linux",
            &format!(
                "({}).failedAssertions",
                client_machine("variant = \"rocm\"; installPackage = false;", "")
            ),
        )
        .unwrap();
    let messages: Vec<String> = serde_json::from_value(v).unwrap();
    assert!(messages.len() == 1 && messages[0].contains("no such build for aarch64-linux"), "{messages:?}");

    // Values outside an option's type, and options that do not exist, are errors.
    let err = bench.eval_error(&format!(
        "({}).config.environment.systemPackages",
        client_machine("variant = \"tpu\";", "")
    ));
    assert!(err.contains("services.fleetcache.client.variant") && err.contains("not of type"), "{err}");
    let err = bench.eval_error(&format!("({}).config.nix.settings", client_machine("urls = [ ];", "")));
    assert!(err.contains("services.fleetcache.client.urls' does not exist"), "{err}");
}

/// A cache host: cache-server, orchestrator and builder, with the given extra settings.
fn cache_host(cache_server: &str, orchestrator: &str, builder: &str) -> String {
    format!(
        "t.machine [ t.modules.cache-server t.modules.orchestrator t.modules.builder {{
           services.fleetcache.cache-server = with t.lib; {{ enable = true; signingKeyFiles = mkDefault [ \"/run/secrets/signing-key\" ];
             uploadTokensFile = mkDefault \"/run/secrets/upload-tokens\"; openFirewall = true; }};
           services.fleetcache.orchestrator = with t.lib; {{ enable = true; fleet = \"git+https://git.example.org/ops/fleet\";
             cacheUrl = \"http://cache:8080\"; cacheTokenFile = mkDefault \"/run/secrets/cache-token\";
             builderTokensFile = \"/run/secrets/builder-tokens\"; apiTokensFile = \"/run/secrets/api-tokens\"; }};
           services.fleetcache.builder = {{ enable = true; orchestrator = \"http://cache:8090\";
             tokenFile = \"/run/secrets/builder-token\"; cacheTokenFile = \"/run/secrets/upload-token\"; }};
         }} {{
           services.fleetcache.cache-server = {{ {cache_server} }};
           services.fleetcache.orchestrator = {{ {orchestrator} }};
           services.fleetcache.builder = {{ {builder} }};
         }} ]"
    )
}

const UNITS: [&str; 3] = ["fleetcache-cache-server", "fleetcache-orchestrator", "fleetcache-builder"];

/// Evaluates a cache host; returns its failed assertions, each unit's ExecStart and the .drv
/// that builds it.
fn evaluate_host(bench: &Bench, host: &str) -> Value {
    bench.eval(&format!(
        "let m = {host}; in {{
           failed = m.failedAssertions;
           units = builtins.listToAttrs (map (u: {{ name = u; value = {{
             exec = m.config.systemd.services.${{u}}.serviceConfig.ExecStart;
             drv = (m.execStart u).drvPath; }}; }}) [ {} ]);
           firewall = m.config.networking.firewall.allowedTCPPorts;
           credentials = m.config.systemd.services.fleetcache-cache-server.serviceConfig.LoadCredential;
           orchestratorCredentials = m.config.systemd.services.fleetcache-orchestrator.serviceConfig.LoadCredential;
           gitSsh = m.config.systemd.services.fleetcache-orchestrator.environment.GIT_SSH_COMMAND or null;
           trusted = m.config.nix.settings.trusted-users;
           waitsFor = {{
             condition = m.config.systemd.services.fleetcache-cache-server.unitConfig.ConditionPathExists or null;
             path = m.config.systemd.paths.fleetcache-cache-server.pathConfig.PathExists or null;
           }};
           nixConf = m.nixConf;
           hardening = builtins.mapAttrs (u: s: {{ user = s.serviceConfig.User or \"dynamic\";
             wxDenied = s.serviceConfig.MemoryDenyWriteExecute or false;
             privateDevices = s.serviceConfig.PrivateDevices or false;
             strict = s.serviceConfig.ProtectSystem; openFiles = s.serviceConfig.LimitNOFILE or null; }}) m.config.systemd.services;
         }}",
        UNITS.map(|u| format!("{u:?}")).join(" ")
    ))
}

#[test]
fn service_configurations_pass_the_binaries_check_config_at_build_time() {
    let bench = Bench::new();
    let host = cache_host(
        "store = \"s3://fleet-cache?endpoint=http://garage:3900&region=garage\"; \
         s3CredentialsFile = \"/run/secrets/s3\"; settings.priority = 20;",
        "variants = [ { name = \"cuda\"; attr = \"nixosConfigurations.carbon.pkgs.llama-cpp-cuda\"; \
           features = [ \"cuda\" ]; files = [ \"lib/libggml-cuda.so\" ]; \
           verify = { features = [ \"cuda\" ]; command = \"bin/llama-cli --list-devices\"; expect = \"CUDA0\"; }; } ]; \
         webhooks = { repository = \"ops/fleet\"; githubSecretFile = \"/run/secrets/github\"; }; \
         sshKeyFile = \"/run/secrets/deploy-key\"; settings.server.lease-seconds = 120;",
        "features = [ \"cuda\" ]; maxJobs = 2;",
    );
    let v = evaluate_host(&bench, &host);
    assert_eq!(v["failed"], json!([]));
    assert_eq!(v["firewall"], json!([8080]));
    assert_eq!(
        v["credentials"],
        json!([
            "s3-credentials:/run/secrets/s3",
            "signing-key-0:/run/secrets/signing-key",
            "upload-tokens:/run/secrets/upload-tokens"
        ])
    );
    assert_eq!(v["trusted"], json!(["root", "fleetcache-builder"]));
    // The S3 key may be made after the first deployment: the unit waits for it, then starts.
    assert_eq!(v["waitsFor"], json!({"condition": "/run/secrets/s3", "path": "/run/secrets/s3"}));
    // A private fleet repository: git and nix's fetcher use the deploy key.
    assert!(
        v["orchestratorCredentials"].as_array().unwrap().contains(&json!("ssh-key:/run/secrets/deploy-key"))
    );
    assert_eq!(
        v["gitSsh"],
        json!(
            "ssh -i /run/credentials/fleetcache-orchestrator.service/ssh-key -o IdentitiesOnly=yes \
             -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=/var/lib/fleetcache-orchestrator/known_hosts"
        )
    );
    // The servers run as throw-away users with the full hardening; the builder, which needs the
    // Nix daemon's trust and runs GPU programs, as its own user without W^X or private devices.
    // The two servers may hold many connections: more open files than systemd's default 1024.
    let strict = |user: &str, on: bool, files: Value| json!({"user": user, "wxDenied": on, "privateDevices": on, "strict": "strict", "openFiles": files});
    assert_eq!(
        v["hardening"],
        json!({
            "fleetcache-cache-server": strict("dynamic", true, json!(65536)),
            "fleetcache-orchestrator": strict("dynamic", true, json!(65536)),
            "fleetcache-builder": strict("fleetcache-builder", false, Value::Null),
        })
    );

    for unit in UNITS {
        // Building ExecStart builds the configuration file, which runs the real check-config.
        bench.realise(v["units"][unit]["drv"].as_str().unwrap()).unwrap_or_else(|e| panic!("{unit}: {e}"));
    }
    let read = |unit: &str| -> toml::Value {
        let file = config_file_of(v["units"][unit]["exec"].as_str().unwrap());
        toml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap()
    };
    let cache = read("fleetcache-cache-server");
    assert_eq!(cache["listen"].as_str(), Some("127.0.0.1:8080"));
    assert_eq!(cache["priority"].as_integer(), Some(20));
    assert_eq!(
        cache["signing-key-files"][0].as_str(),
        Some("/run/credentials/fleetcache-cache-server.service/signing-key-0")
    );
    assert_eq!(
        cache["s3-credentials-file"].as_str(),
        Some("/run/credentials/fleetcache-cache-server.service/s3-credentials")
    );
    let orchestrator = read("fleetcache-orchestrator");
    assert_eq!(orchestrator["server"]["lease-seconds"].as_integer(), Some(120));
    assert_eq!(orchestrator["variant"][0]["verify"]["expect"].as_str(), Some("CUDA0"));
    assert_eq!(
        orchestrator["webhooks"]["github-secret-file"].as_str(),
        Some("/run/credentials/fleetcache-orchestrator.service/github-secret")
    );
    let builder = read("fleetcache-builder");
    assert_eq!(builder["max-jobs"].as_integer(), Some(2));

    // The files are the binaries' own: each accepts its file (without the secrets, which exist
    // only on the machine), and refuses it when the secrets are missing.
    for (unit, program, args) in [
        ("fleetcache-cache-server", "cache-server", &["--check-config", "--config"][..]),
        ("fleetcache-builder", "builder", &["--check-config", "--config"][..]),
    ] {
        let file = config_file_of(v["units"][unit]["exec"].as_str().unwrap());
        let out = Command::new(fleetcache_tests::bin(program)).args(args).arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("/run/credentials/"), "{program}: {err}");
    }
}

#[test]
fn settings_the_binaries_refuse_fail_the_build_with_their_message() {
    let bench = Bench::new();
    for (host, unit, needle) in [
        (cache_host("settings.priority = \"high\";", "", ""), "fleetcache-cache-server", "priority"),
        (
            cache_host("", "settings.server.lease-seconds = 1;", ""),
            "fleetcache-orchestrator",
            "lease-seconds",
        ),
        (cache_host("", "", "settings.max-job = 3;"), "fleetcache-builder", "max-job"),
        (cache_host("store = \"ftp://nope\";", "", ""), "fleetcache-cache-server", "ftp://nope"),
    ] {
        let v = evaluate_host(&bench, &host);
        let err = bench.realise(v["units"][unit]["drv"].as_str().unwrap()).unwrap_err();
        assert!(err.contains(needle), "{unit}: expected the build to fail naming {needle:?}:\n{err}");
    }
}

#[test]
fn secrets_in_the_nix_store_are_refused() {
    let bench = Bench::new();
    let host = cache_host(
        "signingKeyFiles = [ \"/nix/store/00000000000000000000000000000000-key\" ];",
        "cacheTokenFile = \"/nix/store/00000000000000000000000000000000-token\";",
        "",
    );
    let v = evaluate_host(&bench, &host);
    let messages: Vec<String> = serde_json::from_value(v["failed"].clone()).unwrap();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(
        messages.iter().all(|m| m.contains("is in the Nix store, where every user can read it")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("services.fleetcache.cache-server.signingKeyFiles")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("services.fleetcache.orchestrator.cacheTokenFile")),
        "{messages:?}"
    );
}

#[test]
fn builder_features_extend_nix_system_features() {
    let bench = Bench::new();
    let conf_of = |builder: &str| -> String {
        let v = evaluate_host(&bench, &cache_host("", "", builder));
        v["nixConf"].as_str().unwrap().to_owned()
    };
    // Nix 2.8 applies nix.conf lines in order; NixOS writes extra-* last, so the real nix sees
    // the defaults and the builder's features.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nix.conf"), conf_of("features = [ \"cuda\" \"big-gpu\" ];")).unwrap();
    let out = Command::new("nix")
        .args(["show-config"])
        .env("NIX_CONF_DIR", dir.path())
        .env_remove("NIX_CONFIG")
        .env("NIX_CONFIG", "experimental-features = nix-command")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    let line = shown.lines().find(|l| l.starts_with("system-features = ")).expect("system-features");
    let mut features: Vec<&str> = line["system-features = ".len()..].split_whitespace().collect();
    features.sort();
    assert_eq!(features, ["benchmark", "big-gpu", "big-parallel", "cuda", "kvm", "nixos-test"]);

    // Detected features leave Nix's settings alone.
    assert!(!conf_of("").contains("extra-system-features"));
}

#[test]
fn the_flake_exports_what_a_fleet_uses() {
    let bench = Bench::new();
    let v = bench.eval(
        "{ modules = builtins.attrNames t.flake.nixosModules;
           packages = builtins.attrNames t.flake.packages.x86_64-linux;
           systems = builtins.attrNames t.flake.packages;
           overlay = builtins.isFunction t.flake.overlays.default; }",
    );
    assert_eq!(
        v,
        json!({
            "modules": ["builder", "cache-server", "client", "default", "orchestrator"],
            "packages": ["builder", "cache-server", "default", "garage-setup", "orchestrator"],
            "systems": ["aarch64-linux", "x86_64-linux"],
            "overlay": true,
        })
    );
    // `default` imports every module once, even beside one of them imported again.
    let v = bench.eval(
        "let m = t.machine [ t.flake.nixosModules.default t.flake.nixosModules.client {
             services.fleetcache.client = { enable = true; url = \"https://c.example.org\"; publicKeys = [ \"c-1:AAAA\" ]; }; } ];
         in { subs = m.config.nix.settings.substituters; overlays = builtins.length m.config.nixpkgs.overlays; }",
    );
    assert_eq!(v, json!({"subs": ["https://c.example.org", "https://cache.nixos.org/"], "overlays": 1}));

    // One package per program, each running its binary (here the ones under test stand in for
    // rustPlatform's build).
    let drv = bench.eval("t.flake.packages.x86_64-linux.cache-server.drvPath");
    let out = bench.realise(drv.as_str().unwrap()).unwrap();
    let version = Command::new(format!("{out}/bin/cache-server")).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("cache-server "), "{version:?}");
    // garage-setup, packaged for `nix run .#garage-setup`: the script in deploy/s3, runnable.
    let drv = bench.eval("t.flake.packages.x86_64-linux.garage-setup.drvPath");
    let out = bench.realise(drv.as_str().unwrap()).unwrap();
    let packaged = format!("{out}/bin/garage-setup");
    assert_eq!(
        std::fs::read(&packaged).unwrap(),
        std::fs::read(repo_root().join("deploy/s3/garage-setup")).unwrap()
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_ne!(std::fs::metadata(&packaged).unwrap().permissions().mode() & 0o111, 0);

    // checks.modules: every service of a host enabled, its assertions held, each configuration
    // file built (so checked by its binary) and nix.conf checked for what the modules add.
    let drv = bench.eval("t.flake.checks.x86_64-linux.modules.drvPath");
    bench.realise(drv.as_str().unwrap()).unwrap();
}

#[test]
fn every_option_has_a_type_and_a_description() {
    let bench = Bench::new();
    let v = bench.eval(
        "let
           walk = path: o:
             if o._type or null == \"option\" then [ {
               name = builtins.concatStringsSep \".\" path;
               typed = o ? type;
               described = builtins.isString (o.description or null) && o.description != \"\";
             } ]
             else builtins.concatLists (map (n: walk (path ++ [ n ]) o.${n}) (builtins.attrNames o));
         in walk [ \"services\" \"fleetcache\" ] (t.machine [ t.flake.nixosModules.default ]).options.services.fleetcache",
    );
    let options = v.as_array().unwrap();
    assert!(options.len() >= 40, "{options:?}");
    let lacking: Vec<&Value> =
        options.iter().filter(|o| o["typed"] != json!(true) || o["described"] != json!(true)).collect();
    assert!(lacking.is_empty(), "options without a type or description: {lacking:?}");
}

/// A private cache (read tokens) used through `services.fleetcache.client.netrcFile`: the
/// nix.conf the module renders, and nothing else, lets the real `nix copy --from` read it.
#[test]
fn a_private_cache_is_read_through_the_client_modules_netrc_file() {
    use fleetcache_tests::cache_server::{CacheServer, Options, push_json};
    use fleetcache_tests::nix::{self, TempStore};

    let (_cache_dir, server) = CacheServer::start_local_with(Options {
        read_token: Some("reader-secret".to_owned()),
        ..Options::default()
    });
    let top = nix::build_closure(&format!("netrc-{}", std::process::id()), 1, 0);
    push_json(&server, &[&top]);

    let secrets = tempfile::tempdir().unwrap();
    let netrc = secrets.path().join("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login reader password reader-secret\n").unwrap();
    let bench = Bench::new();
    let conf_of = |client: &str| -> String {
        let v = bench.eval(&format!(
            "let m = t.machine [ t.modules.client {{ services.fleetcache.client = {{ enable = true; \
             url = {url:?}; publicKeys = [ {key:?} ]; installPackage = false; {client} }}; }} ]; in \
             {{ failed = m.failedAssertions; conf = m.nixConf; }}",
            url = server.url,
            key = server.public_key,
        ));
        assert_eq!(v["failed"], json!([]), "{v}");
        v["conf"].as_str().unwrap().to_owned()
    };
    let copy_with = |conf: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nix.conf"), conf).unwrap();
        let store = TempStore::new();
        let out = store.copy_with_nix_conf(dir.path(), &server.url, &top).output().unwrap();
        (out.status.success() && store.has(&top), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    let with = conf_of(&format!("netrcFile = {:?};", netrc.display().to_string()));
    assert!(with.contains(&format!("netrc-file = {}\n", netrc.display())), "{with}");
    let (copied, stderr) = copy_with(&with);
    assert!(copied, "with the module's netrc-file the private cache is readable: {stderr}");
    let (copied, stderr) = copy_with(&conf_of(""));
    assert!(!copied, "without it the cache refuses: {stderr}");

    let v = bench.eval(&format!(
        "({}).failedAssertions",
        client_machine("netrcFile = \"/nix/store/00000000000000000000000000000000-netrc\";", "")
    ));
    let messages: Vec<String> = serde_json::from_value(v).unwrap();
    assert!(
        messages.len() == 1
            && messages[0].contains("netrcFile")
            && messages[0].contains("is in the Nix store"),
        "{messages:?}"
    );
}

/// `push.enable`: nix.conf gets a post-build-hook that only queues, and a service uploads the
/// queue with the upload token as a credential.
#[test]
fn the_client_module_pushes_what_the_machine_builds() {
    let bench = Bench::new();
    let v = bench.eval(&format!(
        "let m = {}; hook = m.config.nix.settings.post-build-hook; s = m.config.systemd.services.fleetcache-push; in {{
           failed = m.failedAssertions;
           inherit hook;
           hookText = builtins.readFile hook;
           exec = s.serviceConfig.ExecStart;
           credentials = s.serviceConfig.LoadCredential;
           conf = m.nixConf;
         }}",
        client_machine(
            "push = { enable = true; tokenFile = \"/run/secrets/upload-token\"; };",
            ""
        )
    ));
    assert_eq!(v["failed"], json!([]), "{v}");
    let hook = v["hook"].as_str().unwrap();
    assert!(v["conf"].as_str().unwrap().contains(&format!("post-build-hook = {hook}\n")), "{v}");
    let text = v["hookText"].as_str().unwrap();
    assert!(text.contains("/bin/orchestrator hook --queue /var/lib/fleetcache-push/queue"), "{text}");
    let exec = v["exec"].as_str().unwrap();
    for needle in [
        "/bin/orchestrator push --cache https://cache.example.org",
        "--token-file /run/credentials/fleetcache-push.service/upload-token",
        "--from-queue /var/lib/fleetcache-push/queue --watch",
    ] {
        assert!(exec.contains(needle), "{needle} in {exec}");
    }
    assert_eq!(v["credentials"], json!(["upload-token:/run/secrets/upload-token"]));

    let failed = |client: &str| -> Vec<String> { failed(&bench, client, "") };
    let missing = failed("push.enable = true;");
    assert!(missing.iter().any(|m| m.contains("push.tokenFile")), "{missing:?}");
    let in_store =
        failed("push = { enable = true; tokenFile = \"/nix/store/00000000000000000000000000000000-t\"; };");
    assert!(
        in_store
            .iter()
            .any(|m| m.contains("services.fleetcache.client.push.tokenFile") && m.contains("Nix store")),
        "{in_store:?}"
    );
    // Off by default: no hook, no service.
    let v = bench.eval(&format!(
        "let m = {}; in [ (m.config.nix.settings ? post-build-hook) (m.config.systemd.services ? fleetcache-push) ]",
        client_machine("", "")
    ));
    assert_eq!(v, json!([false, false]));
}

/// A listener on `addr` (port 0: any) whose accept queue is full, so the kernel drops the SYNs
/// that come after, as a firewall does: a host that cannot be reached. Keep both while it is
/// needed.
fn unreachable_host(addr: std::net::SocketAddr) -> (tokio::net::TcpListener, Vec<std::net::TcpStream>) {
    use std::net::TcpStream;
    use std::time::Duration;

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let listener = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        socket.listen(0).unwrap()
    });
    let addr = listener.local_addr().unwrap();
    let held: Vec<TcpStream> =
        (0..4).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()).collect();
    let probe = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    assert!(
        probe.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
        "the listener does not drop connections ({} held): {probe:?}",
        held.len()
    );
    (listener, held)
}

/// A cache that cannot be reached and drops packets (as behind a firewall, or a laptop off the
/// VPN) costs the real Nix, reading the client module's nix.conf, `connectTimeout` per attempt
/// — seconds, not curl's 300 s. A machine that never reached the cache then builds without
/// it; one whose Nix remembers the cache gets an error naming it (Nix fails a substitution it
/// cannot ask about unless `fallback` is set, which the module leaves to the fleet).
#[test]
fn an_unreachable_cache_costs_a_build_seconds_not_minutes() {
    use fleetcache_tests::cache_server::CacheServer;

    let (listener, held) = unreachable_host(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let url = format!("http://{}", listener.local_addr().unwrap());
    let bench = Bench::new();
    let v = bench.eval(&format!(
        "({}).nixConf",
        client_machine(&format!("url = {url:?}; connectTimeout = 1; installPackage = false;"), "")
    ));
    let conf = v.as_str().unwrap();
    assert!(conf.contains("connect-timeout = 1\n"), "{conf}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nix.conf"), conf).unwrap();
    // Nix remembers caches under XDG_CACHE_HOME: one of this test's own.
    let nix_cache = tempfile::tempdir().unwrap();
    let build = |substituter: &str, name: &str| {
        let drv = dir.path().join(format!("{name}.nix"));
        let nonce = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
        std::fs::write(
            &drv,
            format!(
                "derivation {{ name = \"{name}\"; nonce = \"{nonce}\"; system = builtins.currentSystem; \
                 builder = \"/bin/sh\"; args = [ \"-c\" \"echo built > $out\" ]; }}"
            ),
        )
        .unwrap();
        // This machine's single-user Nix: no build users, no sandbox; and only the fleet cache
        // (cache.nixos.org is not reachable from here either). Five attempts of a second each
        // and Nix's pauses between them take ~10 s; with no limit they would take 25 minutes,
        // so the build is stopped after two (exit 124) rather than let it end that late.
        let out = Command::new("timeout")
            .args(["120", "nix-build"])
            .arg(&drv)
            .arg("--no-out-link")
            .env("NIX_CONF_DIR", dir.path())
            .env("XDG_CACHE_HOME", nix_cache.path())
            .env(
                "NIX_CONFIG",
                format!("build-users-group =\nsandbox = false\nsubstituters = {substituter}\n"),
            )
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_ne!(out.status.code(), Some(124), "Nix still waited after 120 s: {stderr}");
        (out, stderr)
    };

    // Never reached: after its attempts at nix-cache-info, Nix builds without the cache.
    let (out, stderr) = build(&url, "offline");
    assert!(out.status.success(), "{:?} {stderr}", out.status.code());
    let built = String::from_utf8_lossy(&out.stdout);
    assert_eq!(std::fs::read_to_string(built.trim()).unwrap(), "built\n");
    assert!(stderr.contains(&format!("{url}/nix-cache-info")) && stderr.contains("Timeout"), "{stderr}");
    drop((held, listener));

    // Reached once (a real cache-server), then gone behind a firewall on the same address.
    let (_store, mut server) = CacheServer::start_local();
    let (out, stderr) = build(&server.url, "online");
    assert!(out.status.success(), "{stderr}");
    let addr: std::net::SocketAddr = server.url.trim_start_matches("http://").parse().unwrap();
    server.stop();
    let (_listener, _held) = unreachable_host(addr);
    let (out, stderr) = build(&server.url, "remembered");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&server.url) && stderr.contains("Timeout"), "{stderr}");
}
