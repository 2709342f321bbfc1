//! Showing a build: one live line per variant on a terminal, plain log lines elsewhere, and the
//! final table.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use builder::api::VerifyStatus;

use crate::flake::LockedInput;
use crate::outcome::{Status, VariantResult};

/// Where a variant is.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Waiting for its turn.
    Queued,
    /// `nix eval` is running.
    Evaluating,
    /// Asking the cache whether its outputs exist.
    Checking,
    /// Another run is building the same derivation (its owner).
    Waiting(String),
    /// `nix build` is running.
    Building,
    /// Pushing; NAR bytes read so far.
    Pushing(u64),
    /// What a remote orchestrator says (`building on gpu-1`, `waiting for a builder with …`).
    Remote(String),
    /// Ended.
    Done(Status),
}

/// Receives a build's progress; called from several tasks.
pub trait Reporter: Send + Sync {
    /// The revision was resolved and its lock read.
    fn revision(&self, flake: &str, requested: &str, commit: &str, inputs: &BTreeMap<String, LockedInput>);
    /// A variant moved to `phase`.
    fn phase(&self, label: &str, phase: Phase);
    /// A line of a variant's build log.
    fn log_line(&self, label: &str, line: &str);
    /// Something worth telling.
    fn note(&self, message: &str);
}

/// Which inputs to show in the revision line.
fn describe_inputs(inputs: &BTreeMap<String, LockedInput>, tracked: &[String]) -> String {
    let mut parts = Vec::new();
    for name in tracked {
        match inputs.get(name) {
            Some(i) => {
                let rev = i.rev.as_deref().map(|r| &r[..r.len().min(12)]).unwrap_or("(no rev)");
                parts.push(format!("{name} {rev} ({})", i.source));
            }
            None => parts.push(format!("{name} (not in flake.lock)")),
        }
    }
    parts.join(", ")
}

fn describe_phase(phase: &Phase) -> String {
    match phase {
        Phase::Queued => "queued".to_owned(),
        Phase::Evaluating => "evaluating".to_owned(),
        Phase::Checking => "checking the cache".to_owned(),
        Phase::Waiting(owner) => format!("waiting: another run ({owner}) is building it"),
        Phase::Building => "building".to_owned(),
        Phase::Pushing(bytes) => format!("pushing {}", human_bytes(*bytes)),
        Phase::Remote(text) => text.clone(),
        Phase::Done(status) => status.as_str().to_owned(),
    }
}

/// `12.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", units[u]) }
}

/// `42 s ago`, `5 min ago`, `3 h ago`, `2 d ago`, for that many seconds.
pub fn ago(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86400 => format!("{} h ago", seconds / 3600),
        _ => format!("{} d ago", seconds / 86400),
    }
}

/// Reports nothing (the server plans without an audience).
pub struct Quiet;

impl Reporter for Quiet {
    fn revision(&self, _: &str, _: &str, _: &str, _: &BTreeMap<String, LockedInput>) {}
    fn phase(&self, _: &str, _: Phase) {}
    fn log_line(&self, _: &str, _: &str) {}
    fn note(&self, _: &str) {}
}

/// Plain lines on standard error: one per phase change (and per log line with `log_lines`).
pub struct Lines {
    start: Instant,
    tracked: Vec<String>,
    log_lines: bool,
    last: Mutex<HashMap<String, String>>,
}

impl Lines {
    /// Lines naming the `tracked` lock inputs; build logs too when `log_lines`.
    pub fn new(tracked: Vec<String>, log_lines: bool) -> Self {
        Lines { start: Instant::now(), tracked, log_lines, last: Mutex::new(HashMap::new()) }
    }
    fn say(&self, text: &str) {
        let _ = writeln!(std::io::stderr(), "[{:7.1}s] {text}", self.start.elapsed().as_secs_f64());
    }
}

impl Reporter for Lines {
    fn revision(&self, flake: &str, requested: &str, commit: &str, inputs: &BTreeMap<String, LockedInput>) {
        self.say(&format!("{flake} {requested} is {commit}"));
        self.say(&format!("locked: {}", describe_inputs(inputs, &self.tracked)));
    }
    fn phase(&self, label: &str, phase: Phase) {
        // Pushing reports bytes many times a second: one line when it starts is enough here.
        let text = match &phase {
            Phase::Pushing(_) => "pushing".to_owned(),
            other => describe_phase(other),
        };
        let mut last = self.last.lock().expect("lines lock");
        if last.get(label) != Some(&text) {
            last.insert(label.to_owned(), text.clone());
            drop(last);
            self.say(&format!("{label}: {text}"));
        }
    }
    fn log_line(&self, label: &str, line: &str) {
        if self.log_lines {
            let _ = writeln!(std::io::stderr(), "{label}| {line}");
        }
    }
    fn note(&self, message: &str) {
        self.say(message);
    }
}

/// Live lines on a terminal: a spinner per variant with its phase or last log line.
pub struct Terminal {
    multi: MultiProgress,
    tracked: Vec<String>,
    bars: Mutex<BTreeMap<String, ProgressBar>>,
}

impl Terminal {
    /// A display on standard error naming the `tracked` lock inputs.
    pub fn new(tracked: Vec<String>) -> Self {
        Terminal {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            tracked,
            bars: Mutex::new(BTreeMap::new()),
        }
    }

    fn bar(&self, label: &str) -> ProgressBar {
        let mut bars = self.bars.lock().expect("bars lock");
        bars.entry(label.to_owned())
            .or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix:<16} {elapsed:>4} {wide_msg}")
                        .expect("valid template"),
                );
                bar.set_prefix(label.to_owned());
                bar.enable_steady_tick(std::time::Duration::from_millis(120));
                bar
            })
            .clone()
    }
}

impl Reporter for Terminal {
    fn revision(&self, flake: &str, requested: &str, commit: &str, inputs: &BTreeMap<String, LockedInput>) {
        let _ = self.multi.println(format!("{flake} {requested} is {commit}"));
        let _ = self.multi.println(format!("locked: {}", describe_inputs(inputs, &self.tracked)));
    }
    fn phase(&self, label: &str, phase: Phase) {
        let bar = self.bar(label);
        match phase {
            Phase::Done(status) => {
                let mark = match status {
                    Status::Cached | Status::Built => "✓",
                    Status::Failed => "✗",
                    Status::Interrupted => "-",
                };
                bar.set_style(ProgressStyle::with_template("{msg}").expect("valid template"));
                bar.finish_with_message(format!(
                    "{mark} {label:<16} {:>4.0}s {}",
                    bar.elapsed().as_secs_f64(),
                    status.as_str()
                ));
            }
            other => bar.set_message(describe_phase(&other)),
        }
    }
    fn log_line(&self, label: &str, line: &str) {
        let line: String = line.chars().filter(|c| !c.is_control()).take(200).collect();
        self.bar(label).set_message(format!("building: {line}"));
    }
    fn note(&self, message: &str) {
        let _ = self.multi.println(message);
    }
}

/// The final table: variant, system, status, seconds, the machines it serves (when the
/// machines were asked), output path; errors below it.
pub fn table(results: &[VariantResult]) -> String {
    let width = |f: &dyn Fn(&VariantResult) -> usize, title: &str| {
        results.iter().map(f).max().unwrap_or(0).max(title.len())
    };
    let machines =
        |r: &VariantResult| if r.machines.is_empty() { "-".to_owned() } else { r.machines.join(",") };
    let wv = width(&|r| r.variant.len(), "VARIANT");
    let ws = width(&|r| r.system.len(), "SYSTEM");
    let wm = if results.iter().any(|r| !r.machines.is_empty()) {
        width(&|r| machines(r).len(), "MACHINES") + 2
    } else {
        0
    };
    let column = |text: &str| if wm == 0 { String::new() } else { format!("{text:<0$}", wm) };
    let mut out = format!(
        "{:<wv$}  {:<ws$}  {:<11}  {:>8}  {}OUTPUT\n",
        "VARIANT",
        "SYSTEM",
        "STATUS",
        "SECONDS",
        column("MACHINES")
    );
    for r in results {
        let output = r.out_paths.first().map(String::as_str).unwrap_or("-");
        out.push_str(&format!(
            "{:<wv$}  {:<ws$}  {:<11}  {:>8.1}  {}{output}\n",
            r.variant,
            if r.system.is_empty() { "-" } else { &r.system },
            r.status.as_str(),
            r.seconds,
            column(&machines(r))
        ));
        for extra in r.out_paths.iter().skip(1) {
            out.push_str(&format!(
                "{:<wv$}  {:<ws$}  {:<11}  {:>8}  {}{extra}\n",
                "",
                "",
                "",
                "",
                column("")
            ));
        }
    }
    for r in results.iter().filter(|r| r.error.is_some()) {
        let error = r.error.as_deref().unwrap_or_default();
        out.push_str(&format!("\n{} ({}): {}\n", r.variant, r.system, error.trim_end()));
    }
    for r in results {
        if let Some(v) = &r.verification {
            let word = match v.status {
                VerifyStatus::Verified => "verified",
                VerifyStatus::VerifyFailed => "verify-failed",
                VerifyStatus::Unverified => "unverified",
            };
            let on = if v.by.is_empty() { String::new() } else { format!(" on {}", v.by) };
            out.push_str(&format!("\n{} ({}): {word}{on}: {}\n", r.variant, r.system, v.detail.trim_end()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lines_up_and_shows_errors() {
        let r = |variant: &str, status, error: Option<&str>| VariantResult {
            variant: variant.to_owned(),
            system: "x86_64-linux".to_owned(),
            attr: "a".to_owned(),
            drv_path: None,
            out_paths: vec![format!("/nix/store/{variant}")],
            machines: Vec::new(),
            status,
            seconds: 1.24,
            error: error.map(str::to_owned),
            verification: None,
        };
        let t = table(&[r("default", Status::Cached, None), r("cuda", Status::Failed, Some("boom"))]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "VARIANT  SYSTEM        STATUS        SECONDS  OUTPUT");
        assert_eq!(lines[1], "default  x86_64-linux  cached            1.2  /nix/store/default");
        assert_eq!(lines[2], "cuda     x86_64-linux  failed            1.2  /nix/store/cuda");
        assert_eq!(lines[4], "cuda (x86_64-linux): boom");

        // With the machines asked, each derivation names the machines it serves.
        let mut cpu = r("cpu", Status::Built, None);
        cpu.machines = vec!["beryllium".into(), "boron".into()];
        let t = table(&[cpu, r("extra", Status::Cached, None)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "VARIANT  SYSTEM        STATUS        SECONDS  MACHINES         OUTPUT");
        assert_eq!(lines[1], "cpu      x86_64-linux  built             1.2  beryllium,boron  /nix/store/cpu");
        assert_eq!(
            lines[2],
            "extra    x86_64-linux  cached            1.2  -                /nix/store/extra"
        );
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
    }

    #[test]
    fn ages_read_well() {
        let cases = [
            (59, "59 s ago"),
            (60, "1 min ago"),
            (3599, "59 min ago"),
            (7200, "2 h ago"),
            (172_800, "2 d ago"),
        ];
        for (seconds, text) in cases {
            assert_eq!(ago(seconds), text);
        }
    }
}
