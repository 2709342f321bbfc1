//! The cache's landing page (`GET /`): it shows the real key, and what it tells a visitor to
//! paste works — its nix.conf lines in a fresh nix.conf, and its NixOS block evaluated by the
//! real client module, each let the real `nix copy --from` read the cache. Behind read tokens an
//! anonymous visitor is told how to use the cache, not what it holds.

use fleetcache_tests::cache_server::{CacheServer, Options, push_json};
use fleetcache_tests::nix::{self, TempStore};
use fleetcache_tests::nixos::Bench;
use nix_formats::StorePath;
use serde_json::json;

const READ_TOKEN: &str = "reader-secret";

async fn page(server: &CacheServer, accept: &str, token: Option<&str>) -> String {
    let mut req = reqwest::Client::new().get(format!("{}/", server.url)).header("accept", accept);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// The text of the element with `id`, HTML entities decoded; `None` if there is none.
fn element(html: &str, id: &str) -> Option<String> {
    let start = html.find(&format!("id=\"{id}\""))?;
    let open_end = start + html[start..].find('>')? + 1;
    let close = open_end + html[open_end..].find("</")?;
    let text = &html[open_end..close];
    Some(
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&amp;", "&"),
    )
}

/// Copies `top` from the cache into a fresh store with `conf` as the whole nix.conf; whether it
/// worked, and Nix's output.
fn copy_with(server: &CacheServer, conf: &str, top: &StorePath) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nix.conf"), conf).unwrap();
    let store = TempStore::new();
    let out = store.copy_with_nix_conf(dir.path(), &server.url, top).output().unwrap();
    (out.status.success() && store.has(top), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn what_the_page_says_to_paste_works() {
    let (_dir, server) = CacheServer::start_local();
    let top = nix::build_closure(&format!("landing-{}", std::process::id()), 2, 0);
    push_json(&server, &[&top]);

    let html = page(&server, "text/html,application/xhtml+xml", None).await;
    assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
    assert_eq!(element(&html, "url").as_deref(), Some(server.url.as_str()));
    assert!(element(&html, "keys").unwrap().contains(&server.public_key), "{html}");
    assert!(element(&html, "priority").unwrap().starts_with("41 "));
    assert_eq!(element(&html, "reads").as_deref(), Some("public"));
    assert!(element(&html, "netrc").is_none(), "a public cache needs no token");

    // The nix.conf lines, pasted as they are into a fresh nix.conf.
    let conf = element(&html, "nix-conf").unwrap();
    assert_eq!(
        conf,
        format!(
            "extra-substituters = {}\nextra-trusted-public-keys = {}\nconnect-timeout = 5\n",
            server.url, server.public_key
        )
    );
    let (copied, stderr) = copy_with(&server, &conf, &top);
    assert!(copied, "the page's nix.conf lines let nix copy --from read the cache: {stderr}");
    let (copied, _) = copy_with(&server, "", &top);
    assert!(!copied, "without them the cache's signatures are not trusted");

    // The NixOS block, through the real client module, gives a nix.conf that works too.
    let block = element(&html, "nixos").unwrap();
    let bench = Bench::new();
    let v = bench.eval(&format!(
        "let m = t.machine [ t.modules.client {{ {block} services.fleetcache.client.installPackage = false; }} ]; in \
         {{ failed = m.failedAssertions; conf = m.nixConf; }}"
    ));
    assert_eq!(v["failed"], json!([]), "{v}");
    let (copied, stderr) = copy_with(&server, v["conf"].as_str().unwrap(), &top);
    assert!(copied, "the page's NixOS block gives a working nix.conf: {stderr}\n{v}");

    // How much it holds: the closure, once the index has listed the store.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let holds = loop {
        let holds = element(&page(&server, "text/html", None).await, "holds").unwrap();
        if !holds.starts_with("not counted") || std::time::Instant::now() > deadline {
            break holds;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let paths: usize = holds.split(' ').next().unwrap().parse().unwrap_or_else(|_| panic!("{holds}"));
    assert_eq!(paths, nix::closure(&top).len(), "{holds}");

    // curl gets the same lines as text.
    let text = page(&server, "*/*", None).await;
    assert!(text.contains(&conf) && text.contains(&block) && !text.contains('<'), "{text}");
}

#[tokio::test]
async fn behind_read_tokens_a_visitor_learns_how_not_what() {
    let (_dir, server) =
        CacheServer::start_local_with(Options { read_token: Some(READ_TOKEN.into()), ..Options::default() });
    let top = nix::build_closure(&format!("landing-private-{}", std::process::id()), 1, 0);
    push_json(&server, &[&top]);

    let anonymous = page(&server, "text/html", None).await;
    assert_eq!(element(&anonymous, "reads").as_deref(), Some("need a read token"));
    assert!(element(&anonymous, "holds").is_none(), "{anonymous}");
    assert!(!anonymous.contains(top.hash_part()));
    let reader = page(&server, "text/html", Some(READ_TOKEN)).await;
    assert!(element(&reader, "holds").is_some(), "{reader}");
    let wrong = page(&server, "text/html", Some("not-the-token")).await;
    assert!(element(&wrong, "holds").is_none());

    // The lines with the visitor's own token and netrc path filled in.
    let dir = tempfile::tempdir().unwrap();
    let netrc_path = dir.path().join("netrc");
    let netrc = element(&anonymous, "netrc").unwrap();
    assert_eq!(netrc, "machine 127.0.0.1 login fleetcache password YOUR-READ-TOKEN\n");
    std::fs::write(&netrc_path, netrc.replace("YOUR-READ-TOKEN", READ_TOKEN)).unwrap();
    let conf = element(&anonymous, "nix-conf").unwrap();
    assert!(conf.contains("netrc-file = /etc/nix/netrc\n"), "{conf}");
    let conf = conf.replace("/etc/nix/netrc", &netrc_path.display().to_string());
    let (copied, stderr) = copy_with(&server, &conf, &top);
    assert!(copied, "{stderr}");
    std::fs::write(&netrc_path, netrc).unwrap();
    let (copied, _) = copy_with(&server, &conf, &top);
    assert!(!copied, "the placeholder is not a token");
}
