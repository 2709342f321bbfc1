//! The status pages of `orchestrator serve`, driven with builders working on the stand-in fleet
//! and read both as HTML over HTTP and as the DOM headless Chromium builds: a building variant
//! turns built, a failed one shows its log, a cuda job with no cuda builder says it waits for
//! `cuda`, a running build's log gains lines (colours rendered as text), and with
//! `status-page = "token"` the pages need a login that a wrong token does not pass. A
//! screenshot of each page is saved under target/test-artifacts/.

use std::time::{Duration, Instant};

use fleetcache_tests::browser;
use fleetcache_tests::cache_server::CacheServer;
use fleetcache_tests::orchestrator::{Setup, spawn_build};
use fleetcache_tests::serve::{DEFAULT_AND_CUDA, configure, start_builder_with, start_orchestrator};
use reqwest::StatusCode;

/// Public pages (a line of `[server]`, where `configure` puts it), the stand-in fleet's
/// `default` and `cuda` variants, and its `broken` one.
fn public_variants() -> String {
    format!(
        "status-page = \"public\"\n{DEFAULT_AND_CUDA}\n[[variant]]\nname = \"broken\"\n\
         attr = \"inputs.llama-cpp.packages.{{system}}.broken\"\n"
    )
}

async fn get(url: &str) -> String {
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{url}");
    resp.text().await.unwrap()
}

/// The row of `variant` on a page: its state's CSS class and words, and its log link.
fn row(html: &str, variant: &str) -> Option<(String, String, Option<String>)> {
    let start = html.find(&format!("data-variant=\"{variant}\""))?;
    let row = &html[start..start + html[start..].find("</tr>")?];
    let st = row.find("class=\"st ")? + "class=\"st ".len();
    let class = row[st..].split('"').next()?.to_owned();
    let words_at = st + row[st..].find('>')? + 1;
    let words = row[words_at..].split('<').next()?.to_owned();
    let log =
        row.find("href=\"/logs?").map(|i| row[i + 6..].split('"').next().unwrap().replace("&amp;", "&"));
    Some((class, words, log))
}

/// Polls the overview until `pred` holds for `variant`'s row; returns that row.
async fn wait_for_row(
    url: &str,
    variant: &str,
    what: &str,
    pred: impl Fn(&str, &str) -> bool,
) -> (String, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let html = get(&format!("{url}/")).await;
        if let Some((class, words, log)) = row(&html, variant)
            && pred(&class, &words)
        {
            return (words, log);
        }
        assert!(Instant::now() < deadline, "{variant} never became {what}:\n{html}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn lines_with(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test]
async fn the_pages_follow_builds_as_builders_work() {
    let s = Setup::new();
    s.fleet.hold_builds();
    let (_dir, cache) = CacheServer::start_local();
    let (config, api_token) = configure(&s, &cache, "", &public_variants());
    let o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    // Two jobs at once, so default and broken build side by side.
    let (_builder, _) = start_builder_with(&s, &o, "builder-a", "token-a", "", &["--max-jobs", "2"]);
    o.wait_for_builders(&s, &["builder-a"]);
    let mut args = vec!["--rev", "main"];
    let client = o.client_args();
    args.extend(client.iter().map(String::as_str));
    let (_cli, _, _) = spawn_build(&s, "cli", &args);

    // Building, and the cuda job waits for a builder with cuda.
    let (_, log) = wait_for_row(&o.url, "default", "building", |c, _| c == "building").await;
    let (words, _) = wait_for_row(&o.url, "cuda", "waiting", |c, _| c == "waiting").await;
    assert!(words.contains("waiting for a builder of x86_64-linux with cuda"), "{words}");
    browser::screenshot(&format!("{}/", o.url), "status-overview-building");

    // The running build's log: its lines so far, more a moment later; colours become text.
    let log_url = format!("{}{}", o.url, log.expect("a log link"));
    // (The builder streams its log in chunks: the first lines may take a moment to arrive.)
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let page = get(&log_url).await;
        if page.contains("configuring llama.cpp cpu") || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(first.contains("configuring llama.cpp cpu") && first.contains("id=\"log-live\""), "{first}");
    let n1 = lines_with(&first, "compiling ggml-cpu");
    let deadline = Instant::now() + Duration::from_secs(30);
    let later = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let page = get(&log_url).await;
        if lines_with(&page, "compiling ggml-cpu") > n1 || Instant::now() > deadline {
            break page;
        }
    };
    let n2 = lines_with(&later, "compiling ggml-cpu");
    assert!(n2 > n1, "the live log gained lines: {n1} then {n2}");
    assert!(
        !later.contains('\u{1b}') && !later.contains("[1;34m") && later.contains("] compiling ggml-cpu"),
        "{later}"
    );
    // In a browser the page follows the build by itself.
    let dom = browser::dom(&log_url);
    let polls: u32 = dom.split("data-polls=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
    assert!(polls >= 1 && dom.contains("compiling ggml-cpu") && dom.contains("id=\"log-live\""), "{dom}");
    browser::screenshot(&log_url, "status-log-running");

    // Released: default turns built, broken fails and shows why in its log.
    s.fleet.release_builds();
    wait_for_row(&o.url, "default", "built", |c, _| c == "built").await;
    let (words, log) = wait_for_row(&o.url, "broken", "failed", |c, _| c == "failed").await;
    assert!(words.starts_with("failed: ") && words.contains("this variant is broken"), "{words}");
    let broken_log = get(&format!("{}{}", o.url, log.unwrap())).await;
    assert!(
        broken_log.contains("this variant is broken") && !broken_log.contains("log-live"),
        "{broken_log}"
    );

    // What a browser shows of the overview once it settled.
    let dom = browser::dom(&format!("{}/", o.url));
    assert_eq!(row(&dom, "default").map(|r| r.0).as_deref(), Some("built"), "{dom}");
    assert_eq!(row(&dom, "broken").map(|r| r.0).as_deref(), Some("failed"));
    assert_eq!(row(&dom, "cuda").map(|r| r.0).as_deref(), Some("waiting"));
    assert!(dom.contains("href=\"/api/v1/status\""), "the JSON twin is linked");
    assert!(!dom.contains("log out"), "public pages have nobody to log out");
    browser::screenshot(&format!("{}/", o.url), "status-overview");

    // The revision with its attempts, the builders, the webhook deliveries.
    let rev = dom.split("data-rev=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let revision = browser::dom(&format!("{}/revisions/{rev}", o.url));
    assert!(revision.contains("builder-a") && revision.contains("class=\"attempts\""), "{revision}");
    browser::screenshot(&format!("{}/revisions/{rev}", o.url), "status-revision");
    let builders = browser::dom(&format!("{}/builders", o.url));
    assert!(builders.contains("data-name=\"builder-a\"") && builders.contains("x86_64-linux"), "{builders}");
    browser::screenshot(&format!("{}/builders", o.url), "status-builders");
    let hooks = browser::dom(&format!("{}/webhooks", o.url));
    assert!(hooks.contains("No push was delivered."), "{hooks}");
    browser::screenshot(&format!("{}/webhooks", o.url), "status-webhooks");
    for page in [&dom, &revision, &builders, &hooks] {
        assert!(!page.contains("token-a") && !page.contains("api-token"), "no token is shown");
    }
}

#[tokio::test]
async fn with_status_page_token_the_pages_need_a_login() {
    let s = Setup::new();
    let (_dir, cache) = CacheServer::start_local();
    let (config, api_token) = configure(&s, &cache, "", "");
    let o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let login = |token: &str| {
        client
            .post(format!("{}/login", o.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}"))
            .send()
    };

    let anonymous = client.get(format!("{}/", o.url)).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::SEE_OTHER);
    assert_eq!(anonymous.headers()["location"], "/login");
    for page in ["/builders", "/webhooks", "/revisions/main", "/logs?rev=main&variant=default"] {
        let r = client.get(format!("{}{page}", o.url)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{page}");
    }
    let by_header = client.get(format!("{}/builders", o.url)).bearer_auth("api-token").send().await.unwrap();
    assert_eq!(by_header.status(), StatusCode::OK);

    let wrong = login("not-the-token").await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get("set-cookie").is_none());
    assert!(wrong.text().await.unwrap().contains("That is not an API token of this server."));
    let forged =
        client.get(format!("{}/", o.url)).header("cookie", "fleetcache_session=00ff").send().await.unwrap();
    assert_eq!(forged.status(), StatusCode::SEE_OTHER);

    let right = login("api-token").await.unwrap();
    assert_eq!(right.status(), StatusCode::SEE_OTHER);
    let cookie = right.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_owned();
    assert!(!session.contains("api-token"), "the cookie is a session id, not the token");
    let overview = client.get(format!("{}/", o.url)).header("cookie", &session).send().await.unwrap();
    assert_eq!(overview.status(), StatusCode::OK);
    let text = overview.text().await.unwrap();
    assert!(
        text.contains("Fleet revisions") && text.contains("log out") && !text.contains("api-token"),
        "{text}"
    );

    let out = client.post(format!("{}/logout", o.url)).header("cookie", &session).send().await.unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let after = client.get(format!("{}/", o.url)).header("cookie", &session).send().await.unwrap();
    assert_eq!(after.status(), StatusCode::SEE_OTHER, "a logged-out session is refused");

    // A browser sent to the overview lands on the login form.
    let dom = browser::dom(&format!("{}/", o.url));
    assert!(dom.contains("<form class=\"login\"") && dom.contains("id=\"token\""), "{dom}");
    browser::screenshot(&format!("{}/", o.url), "status-login");
}
