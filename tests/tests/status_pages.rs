//! The status pages of `orchestrator serve`, driven with builders working on the stand-in fleet
//! and read both as HTML over HTTP and in headless Chromium (over the DevTools protocol): a
//! building variant turns built, a failed one shows its log, a cuda job with no cuda builder
//! says it waits for `cuda`, a running build's log gains lines as server-sent events (colours
//! rendered as text) and ends with the log Nix kept, from the cache, and with
//! `status-page = "token"` the pages need a login, typed into the form, that a wrong token does
//! not pass. A screenshot of each page, at a laptop's and a phone's size, is saved under
//! target/test-artifacts/.

use std::time::{Duration, Instant};

use fleetcache_tests::browser::{Browser, LAPTOP, PHONE};
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

/// Reads the server-sent events of `url` until `enough` holds for those so far (or 30 s
/// passed): each as its `event` and `data` fields.
async fn events_until(url: &str, enough: impl Fn(&[(String, String)]) -> bool) -> Vec<(String, String)> {
    let mut resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{url}");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (mut text, mut events) = (String::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !enough(&events) && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Ok(Some(chunk))) = tokio::time::timeout(left, resp.chunk()).await else { break };
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let field = |name: &str| {
                frame
                    .lines()
                    .filter_map(|l| l.strip_prefix(name))
                    .map(str::trim_start)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            if !field("event:").is_empty() {
                events.push((field("event:"), field("data:")));
            }
        }
    }
    events
}

#[tokio::test]
async fn the_pages_follow_builds_as_builders_work() {
    let s = Setup::new();
    s.fleet.hold_builds();
    let (_dir, mut cache) = CacheServer::start_local();
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
    // The log as server-sent events: all of it first, then what is new, as JSON text.
    let events_url = log_url.replacen("/logs?", "/logs/events?", 1);
    let events = events_until(&events_url, |e| e.iter().filter(|(k, _)| k == "append").count() >= 2).await;
    let texts: Vec<(&str, String)> =
        events.iter().map(|(k, d)| (k.as_str(), serde_json::from_str::<String>(d).unwrap())).collect();
    assert_eq!(texts.first().map(|t| t.0), Some("replace"), "{events:?}");
    assert!(texts[0].1.contains("configuring llama.cpp cpu"), "{events:?}");
    let appended: Vec<&String> = texts.iter().filter(|t| t.0 == "append").map(|t| &t.1).collect();
    assert!(appended.len() >= 2 && appended.iter().all(|t| t.contains("] compiling ggml-cpu")), "{events:?}");
    assert!(texts.iter().all(|t| !t.1.contains('\u{1b}') && !t.1.contains("[1;34m")), "{events:?}");

    // In a browser the page follows the build by itself.
    let mut b = Browser::start();
    b.open(&format!("{}/", o.url));
    b.screenshot("status-overview-building", LAPTOP);
    b.open(&log_url);
    let compiling = "document.getElementById('log').textContent.split('compiling ggml-cpu').length - 1";
    b.wait_for(&format!("{compiling} >= 1"), "the log's first lines");
    let (events0, lines0) =
        (b.eval("Number(document.getElementById('log').dataset.events)"), b.eval(compiling));
    b.wait_for(&format!("{compiling} > {lines0}"), "the log to gain lines in the browser");
    let events1 = b.eval("Number(document.getElementById('log').dataset.events)");
    assert!(events1.as_u64() > events0.as_u64(), "the lines came as events: {events0} then {events1}");
    assert!(b.dom().contains("id=\"log-live\""));
    b.screenshot("status-log-running", LAPTOP);
    b.screenshot("status-log-running-phone", PHONE);
    b.resize(LAPTOP);

    // Released: default turns built, broken fails and shows why in its log.
    s.fleet.release_builds();
    // The open log page sees the end and shows the log Nix kept, from the cache.
    b.wait_for("document.getElementById('log-source')", "the log page to see the build end");
    let ended = b.dom();
    assert!(ended.contains("data-source=\"cache\"") && !ended.contains("id=\"log-live\""), "{ended}");
    let final_log = b.eval("document.getElementById('log').textContent").as_str().unwrap().to_owned();
    assert!(
        final_log.contains("configuring llama.cpp cpu")
            && final_log.contains("built llama.cpp cpu")
            && !final_log.contains('\u{1b}'),
        "the whole log, to its end: {final_log}"
    );
    b.screenshot("status-log-ended", LAPTOP);
    // The same as the builder streamed it, a link away.
    b.click_to("#log-state a", "location.search.includes('source=orchestrator')");
    assert!(b.dom().contains("data-source=\"orchestrator\""));
    wait_for_row(&o.url, "default", "built", |c, _| c == "built").await;
    let (words, log) = wait_for_row(&o.url, "broken", "failed", |c, _| c == "failed").await;
    assert!(words.starts_with("failed: ") && words.contains("this variant is broken"), "{words}");
    // A failed build's log is not in the cache: the orchestrator's copy.
    let broken_log = get(&format!("{}{}", o.url, log.unwrap())).await;
    assert!(
        broken_log.contains("this variant is broken")
            && broken_log.contains("data-source=\"orchestrator\"")
            && !broken_log.contains("log-live"),
        "{broken_log}"
    );

    // What a browser shows of the overview once it settled, on a laptop and on a phone.
    b.open(&format!("{}/", o.url));
    let dom = b.dom();
    assert_eq!(row(&dom, "default").map(|r| r.0).as_deref(), Some("built"), "{dom}");
    assert_eq!(row(&dom, "broken").map(|r| r.0).as_deref(), Some("failed"));
    assert_eq!(row(&dom, "cuda").map(|r| r.0).as_deref(), Some("waiting"));
    assert!(dom.contains("href=\"/api/v1/status\""), "the JSON twin is linked");
    assert!(!dom.contains("log out"), "public pages have nobody to log out");
    b.screenshot("status-overview", LAPTOP);
    b.screenshot("status-overview-phone", PHONE);
    assert!(!b.wider_than_screen(), "the overview fits a phone's width");
    let cut = "[...document.querySelectorAll('tr.variant td')].filter(td => td.getBoundingClientRect().right > innerWidth).length";
    assert_eq!(b.eval(cut), serde_json::json!(0), "on a phone every cell of the table is within the screen");
    b.resize(LAPTOP);

    // The revision with its attempts, the builders, the webhook deliveries.
    let rev = dom.split("data-rev=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    b.click_to(&format!("a[href='/revisions/{rev}']"), &format!("location.pathname === '/revisions/{rev}'"));
    let revision = b.dom();
    assert!(revision.contains("builder-a") && revision.contains("class=\"attempts\""), "{revision}");
    b.screenshot("status-revision", LAPTOP);
    b.click_to("nav a[href='/builders']", "location.pathname === '/builders'");
    let builders = b.dom();
    assert!(builders.contains("data-name=\"builder-a\"") && builders.contains("x86_64-linux"), "{builders}");
    let done = b.eval("document.querySelector('tr[data-name=\"builder-a\"] td.done').textContent");
    assert_eq!(done, serde_json::json!("1 built, 1 failed"), "default built, broken failed");
    b.screenshot("status-builders", LAPTOP);
    b.click_to("nav a[href='/webhooks']", "location.pathname === '/webhooks'");
    let hooks = b.dom();
    assert!(hooks.contains("No push was delivered."), "{hooks}");
    b.screenshot("status-webhooks", LAPTOP);
    for page in [&dom, &revision, &builders, &hooks, &ended] {
        assert!(!page.contains("token-a") && !page.contains("api-token"), "no token is shown");
    }

    // The cache gone: an ended build's page still shows a log (the orchestrator's) and says why.
    cache.stop();
    let without = get(&log_url).await;
    assert!(
        without.contains("data-source=\"orchestrator\"")
            && without.contains("the cache's log could not be read: cannot reach the cache")
            && without.contains("built llama.cpp cpu"),
        "{without}"
    );
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

    // A browser sent to the overview lands on the login form; a wrong token typed in is
    // refused, the right one opens the overview, and logging out closes it again.
    let mut b = Browser::start();
    b.open(&format!("{}/", o.url));
    assert!(b.location().ends_with("/login"), "{}", b.location());
    let form = b.dom();
    assert!(form.contains("<form class=\"login\"") && form.contains("id=\"token\""), "{form}");
    b.screenshot("status-login", LAPTOP);
    b.screenshot("status-login-phone", PHONE);
    b.resize(LAPTOP);
    b.type_into("#token", "not-the-token");
    b.click("form.login button");
    b.wait_for("document.getElementById('login-error')", "the refusal");
    assert!(b.dom().contains("That is not an API token of this server."));
    b.type_into("#token", "api-token");
    b.click("form.login button");
    b.wait_for(
        "document.querySelector('h1') && document.querySelector('h1').textContent === 'Fleet revisions'",
        "the overview",
    );
    assert_eq!(b.eval("document.cookie"), serde_json::json!(""), "the session cookie is HttpOnly");
    b.click_to("footer form button", "location.pathname === '/login' && document.getElementById('token')");
    b.open(&format!("{}/builders", o.url));
    assert!(b.location().ends_with("/login"), "logged out: {}", b.location());
}

#[tokio::test]
async fn the_cache_gives_the_end_of_a_long_log() {
    let (_dir, cache) = CacheServer::start_local();
    let client = builder::client::CacheClient::new(&cache.url, &cache.token).unwrap();
    let drv =
        nix_formats::StorePath::from_absolute("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-llama-cpp-1.drv")
            .unwrap();
    assert_eq!(client.log_tail(&drv, 1 << 20).await.unwrap(), None, "no log yet");

    // Longer than what a page shows: its end, from the start of a line.
    let log: String = (0..200_000).map(|i| format!("[{i}] compiling ggml-cpu é\n")).collect();
    client.upload_log(&drv, log.clone().into()).await.unwrap();
    let limit = orchestrator::serve::CACHE_LOG_SHOWN;
    assert!(log.len() > limit);
    let tail = client.log_tail(&drv, limit).await.unwrap().expect("the log");
    assert_eq!(tail.total_bytes, log.len() as u64);
    assert!(tail.text.len() <= limit && tail.text.len() > limit - 64, "{}", tail.text.len());
    assert!(log.ends_with(&tail.text) && tail.text.starts_with('['), "{}", &tail.text[..80]);
    // A short one whole.
    let tail = client.log_tail(&drv, log.len() + 10).await.unwrap().expect("the log");
    assert_eq!((tail.text.len(), tail.total_bytes), (log.len(), log.len() as u64));
}
