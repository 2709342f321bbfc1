//! Headless Chromium (Debian's `chromium`, which `scripts/test` installs): the DOM a real browser
//! builds from a page, after its scripts ran, and screenshots kept as test artifacts under
//! `target/test-artifacts/`.

use std::path::PathBuf;
use std::process::Command;

/// Runs Chromium with `args` (after the common ones) in a profile of its own, removed after.
fn chromium(args: &[String]) -> std::process::Output {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
        .expect("chromium is not installed (scripts/test installs Debian's package)");
    let mut c = Command::new(found);
    // Each run its own profile; no sandbox (tests run as root), no GPU, no first-run chatter.
    let profile = tempfile::Builder::new().prefix("fleetcache-chromium-").tempdir().expect("tempdir");
    c.args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--virtual-time-budget=3000")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // A page that never lets Chromium finish fails the test instead of hanging it.
    let mut child = c.spawn().expect("run chromium");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().expect("wait for chromium").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium {args:?} did not finish within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("chromium's output")
}

/// The DOM Chromium builds from `url` (its scripts given a few seconds of virtual time).
pub fn dom(url: &str) -> String {
    let out = chromium(&["--dump-dom".into(), url.into()]);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("<html"),
        "chromium --dump-dom {url} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// Where test artifacts go.
pub fn artifacts_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// Saves a screenshot of `url` at a laptop's size as `<name>.png` among the artifacts.
pub fn screenshot(url: &str, name: &str) -> PathBuf {
    let path = artifacts_dir().join(format!("{name}.png"));
    let out = chromium(&[
        format!("--screenshot={}", path.display()),
        "--window-size=1280,900".into(),
        "--hide-scrollbars".into(),
        url.into(),
    ]);
    assert!(
        out.status.success() && path.is_file(),
        "chromium --screenshot {url} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}
