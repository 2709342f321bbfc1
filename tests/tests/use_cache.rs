//! `orchestrator use`: a machine outside NixOS adds a private fleetcache cache to its nix.conf
//! in one command, and the real `nix` then reads the cache with nothing else configured.

use std::process::{Command, Output};

use fleetcache_tests::bin;
use fleetcache_tests::cache_server::{CacheServer, Options, push_json};
use fleetcache_tests::nix::{self, TempStore};

fn orchestrator_use(args: &[&str]) -> Output {
    Command::new(bin("orchestrator")).arg("use").args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn use_adds_a_private_cache_once_and_nix_copy_then_works() {
    let (_cache_dir, server) = CacheServer::start_local_with(Options {
        read_token: Some("reader-secret".to_owned()),
        ..Options::default()
    });
    let top = nix::build_closure(&format!("use-{}", std::process::id()), 1, 0);
    push_json(&server, &[&top]);

    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("nix.conf");
    let mine = "# the user's own settings\nmax-jobs = 2\n";
    std::fs::write(&conf, mine).unwrap();
    let read_token = conf_dir.path().join("read-token");
    std::fs::write(&read_token, "reader-secret\n").unwrap();
    let conf_arg = conf.display().to_string();
    let token_arg = read_token.display().to_string();
    let args = ["--nix-conf", conf_arg.as_str(), "--token-file", token_arg.as_str(), server.url.as_str()];

    // A dry run prints the new nix.conf and writes nothing.
    let dry = orchestrator_use(&[&args[..], &["--dry-run"]].concat());
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), mine);
    assert!(!conf_dir.path().join("netrc").exists());
    assert!(String::from_utf8_lossy(&dry.stdout).contains(&server.public_key), "{}", stderr(&dry));

    // Without --public-key the cache is asked, and the command says it trusts what it got.
    let first = orchestrator_use(&args);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("trusting the key"), "{}", stderr(&first));
    let written = std::fs::read_to_string(&conf).unwrap();
    assert!(written.starts_with(mine), "what was there stays first: {written}");
    assert!(written.contains(&format!("extra-substituters = {}\n", server.url)), "{written}");
    assert!(written.contains(&format!("extra-trusted-public-keys = {}\n", server.public_key)), "{written}");
    assert!(written.contains("connect-timeout = 5\n"), "an unreachable cache costs seconds: {written}");
    let netrc = conf_dir.path().join("netrc");
    let netrc_text = std::fs::read_to_string(&netrc).unwrap();
    assert_eq!(netrc_text, "machine 127.0.0.1 login fleetcache password reader-secret\n");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&netrc).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the token file is private");

    // The second run changes nothing.
    let second = orchestrator_use(&[&args[..], &["--public-key", &server.public_key]].concat());
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(stderr(&second).contains("nothing to change"), "{}", stderr(&second));
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), written);
    assert_eq!(std::fs::read_to_string(&netrc).unwrap(), netrc_text);

    // The real nix, with only this nix.conf, substitutes from the private cache.
    let store = TempStore::new();
    let copy = store.copy_with_nix_conf(conf_dir.path(), &server.url, &top).output().unwrap();
    assert!(copy.status.success(), "{}", stderr(&copy));
    assert!(store.has(&top));

    // A wrong key is refused before anything is written.
    let bad = orchestrator_use(&[&args[..], &["--public-key", "nope"]].concat());
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("public key \"nope\""), "{}", stderr(&bad));
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), written);
}
