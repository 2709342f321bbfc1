//! Headless Chromium (Debian's `chromium`, which `scripts/test` installs), driven over the
//! Chrome DevTools Protocol the way a person would use it: open a page, wait for what its
//! scripts do, click, type, and take screenshots (kept as test artifacts under
//! `target/test-artifacts/`).
//!
//! The protocol runs over a pipe (`--remote-debugging-pipe`: JSON messages ended by a NUL byte,
//! commands in on fd 3, answers and events out on fd 4), so no port is opened and no websocket
//! client is needed; a shell hands our stdin and stdout to Chromium as those two descriptors.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

/// How long one command may take before the test fails instead of hanging.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// A phone's screen, for the screenshots of pages that must read well there too.
pub const PHONE: (u32, u32) = (390, 844);

/// A laptop's screen.
pub const LAPTOP: (u32, u32) = (1280, 900);

/// One headless Chromium with one tab.
pub struct Browser {
    child: Child,
    commands: ChildStdin,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
    profile: tempfile::TempDir,
}

fn chromium_path() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
        .expect("chromium is not installed (scripts/test installs Debian's package)")
}

impl Browser {
    /// Starts Chromium in a profile of its own (removed after) with a blank tab.
    pub fn start() -> Browser {
        let profile = tempfile::Builder::new().prefix("fleetcache-chromium-").tempdir().expect("tempdir");
        let log = std::fs::File::create(profile.path().join("chromium.log")).expect("chromium's log");
        let mut child = Command::new("sh")
            // fd 3 reads our commands (stdin), fd 4 writes to us (stdout); Chromium's own stdin
            // and stdout are not used.
            .args(["-c", "exec \"$0\" \"$@\" 3<&0 4>&1 </dev/null >/dev/null"])
            .arg(chromium_path())
            // No sandbox (tests run as root), no GPU, no first-run chatter.
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
            ])
            .arg("--remote-debugging-pipe")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("run chromium");
        let commands = child.stdin.take().expect("stdin");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let mut message = Vec::new();
            while out.read_until(0, &mut message).is_ok_and(|n| n > 0) {
                message.pop_if(|b| *b == 0);
                if let Ok(v) = serde_json::from_slice::<Value>(&message)
                    && tx.send(v).is_err()
                {
                    break;
                }
                message.clear();
            }
        });
        let mut browser = Browser { child, commands, answers, next_id: 0, session: String::new(), profile };
        let target = browser.call("Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().expect("a target").to_owned();
        let attached =
            browser.call("Target.attachToTarget", json!({ "targetId": target_id, "flatten": true }));
        browser.session = attached["sessionId"].as_str().expect("a session").to_owned();
        browser.page("Page.enable", json!({}));
        browser
    }

    fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            message["sessionId"] = s.into();
        }
        let mut bytes = serde_json::to_vec(&message).expect("json");
        bytes.push(0);
        self.commands.write_all(&bytes).and_then(|()| self.commands.flush()).expect("chromium is running");
        let deadline = Instant::now() + ANSWER_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = self.answers.recv_timeout(left).unwrap_or_else(|_| {
                panic!("chromium did not answer {method} within {} s: {}", ANSWER_WAIT.as_secs(), self.log())
            });
            // Events (no id) are not needed: the tests wait for what the page shows.
            if answer["id"] == id {
                if let Some(error) = answer.get("error") {
                    panic!("chromium refused {method}: {error}");
                }
                return answer["result"].clone();
            }
        }
    }

    /// A browser-wide command.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None)
    }

    /// A command to the tab.
    fn page(&mut self, method: &str, params: Value) -> Value {
        let session = Some(self.session.clone());
        self.send(method, params, session)
    }

    /// What Chromium wrote on its stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default()
    }

    /// Opens `url` and waits until it loaded.
    pub fn open(&mut self, url: &str) {
        let nav = self.page("Page.navigate", json!({ "url": url }));
        if let Some(e) = nav.get("errorText") {
            panic!("chromium could not open {url}: {e}");
        }
        self.wait_for("document.readyState === 'complete'", &format!("{url} to load"));
    }

    /// The value of the JavaScript `expression` in the page (awaited if it is a promise).
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.page(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression} failed in the page: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits (up to 30 s) until `condition` is true in the page; `what` says what for.
    pub fn wait_for(&mut self, condition: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.eval(&format!("Boolean({condition})")) != json!(true) {
            assert!(Instant::now() < deadline, "waited 30 s for {what} ({condition}):\n{}", self.dom());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The page's DOM as HTML now.
    pub fn dom(&mut self) -> String {
        self.eval("document.documentElement.outerHTML").as_str().unwrap_or_default().to_owned()
    }

    /// Where the page is.
    pub fn location(&mut self) -> String {
        self.eval("location.href").as_str().unwrap_or_default().to_owned()
    }

    /// Clicks the middle of the element `selector` names, with the mouse.
    pub fn click(&mut self, selector: &str) {
        let at = self.eval(&format!(
            "(() => {{ const e = document.querySelector({s}); if (!e) return null; e.scrollIntoView();
               const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            s = json!(selector)
        ));
        let (x, y) = (at[0].as_f64(), at[1].as_f64());
        let (Some(x), Some(y)) = (x, y) else { panic!("no {selector} to click:\n{}", self.dom()) };
        for kind in ["mousePressed", "mouseReleased"] {
            self.page(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            );
        }
    }

    /// Clicks `selector` and waits until the page it leads to, where `condition` holds, loaded.
    pub fn click_to(&mut self, selector: &str, condition: &str) {
        self.click(selector);
        self.wait_for(
            &format!("({condition}) && document.readyState === 'complete'"),
            &format!("{selector} to lead on"),
        );
    }

    /// Clicks the field `selector` names and types `text` into it.
    pub fn type_into(&mut self, selector: &str, text: &str) {
        self.click(selector);
        self.page("Input.insertText", json!({ "text": text }));
    }

    /// Lays the page out on a screen of `size`.
    pub fn resize(&mut self, (width, height): (u32, u32)) {
        let mobile = width < 600;
        self.page(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        );
    }

    /// Whether the page is wider than its screen (a reader would scroll sideways).
    pub fn wider_than_screen(&mut self) -> bool {
        self.eval("document.documentElement.scrollWidth > window.innerWidth") == json!(true)
    }

    /// Saves what the tab shows on a screen of `size` as `<name>.png` among the artifacts.
    pub fn screenshot(&mut self, name: &str, size: (u32, u32)) -> PathBuf {
        self.resize(size);
        // Reading the layout makes Chromium lay the page out for the new size first.
        self.eval("document.documentElement.scrollWidth");
        let shot = self.page("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("a screenshot"))
            .expect("base64");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let path = artifacts_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write the screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where test artifacts go.
pub fn artifacts_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}
