//! Showing push progress: bars on a terminal, one line per path elsewhere.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nix_formats::StorePath;

use crate::push::Progress;

/// Paths at least this large get a bar of their own on a terminal.
const OWN_BAR_ABOVE: u64 = 64 * 1024 * 1024;

/// Progress bars: the whole push (NAR bytes, paths done), plus one per large path.
pub struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    per_path: Mutex<HashMap<StorePath, ProgressBar>>,
    done: AtomicUsize,
    to_upload: AtomicUsize,
    cached: AtomicUsize,
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl Bars {
    /// Bars on standard error.
    pub fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let total = multi.add(ProgressBar::new(0));
        total.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        total.set_prefix("push");
        Bars {
            multi,
            total,
            per_path: Mutex::new(HashMap::new()),
            done: AtomicUsize::new(0),
            to_upload: AtomicUsize::new(0),
            cached: AtomicUsize::new(0),
        }
    }

    fn show_counts(&self) {
        self.total.set_message(format!(
            "{}/{} paths ({} already cached)",
            self.done.load(Ordering::Relaxed),
            self.to_upload.load(Ordering::Relaxed),
            self.cached.load(Ordering::Relaxed)
        ));
    }
}

impl Progress for Bars {
    fn planned(&self, closure: usize, to_upload: usize, nar_bytes: u64) {
        self.total.set_length(nar_bytes);
        self.to_upload.store(to_upload, Ordering::Relaxed);
        self.cached.store(closure - to_upload, Ordering::Relaxed);
        self.show_counts();
    }

    fn started(&self, path: &StorePath, nar_size: u64) {
        if nar_size >= OWN_BAR_ABOVE {
            let bar = self.multi.add(ProgressBar::new(nar_size));
            bar.set_style(
                ProgressStyle::with_template("  {prefix:40} [{bar:20}] {bytes}/{total_bytes}")
                    .expect("valid template"),
            );
            bar.set_prefix(path.name().to_owned());
            self.per_path.lock().expect("bars").insert(path.clone(), bar);
        }
    }

    fn advanced(&self, path: &StorePath, n: u64) {
        self.total.inc(n);
        if let Some(bar) = self.per_path.lock().expect("bars").get(path) {
            bar.inc(n);
        }
    }

    fn finished(&self, path: &StorePath, outcome: &Result<u64, String>, will_retry: bool) {
        if let Some(bar) = self.per_path.lock().expect("bars").remove(path) {
            bar.finish_and_clear();
        }
        match outcome {
            Ok(_) => {
                self.done.fetch_add(1, Ordering::Relaxed);
                self.show_counts();
            }
            Err(e) if will_retry => self.multi.suspend(|| eprintln!("retrying {path}: {e}")),
            Err(e) => self.multi.suspend(|| eprintln!("failed {path}: {e}")),
        }
    }

    fn note(&self, message: &str) {
        self.multi.suspend(|| eprintln!("{message}"));
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.total.finish_and_clear();
    }
}

/// One log line per finished path, for logs and pipes.
pub struct Lines {
    start: Instant,
    state: Mutex<(usize, usize)>,
}

impl Default for Lines {
    fn default() -> Self {
        Lines { start: Instant::now(), state: Mutex::new((0, 0)) }
    }
}

impl Progress for Lines {
    fn planned(&self, closure: usize, to_upload: usize, nar_bytes: u64) {
        self.state.lock().expect("lines").1 = to_upload;
        eprintln!(
            "closure of {closure} paths: {} already cached here or upstream, {to_upload} to upload ({:.1} MiB of NAR)",
            closure - to_upload,
            nar_bytes as f64 / 1048576.0
        );
    }

    fn started(&self, _: &StorePath, _: u64) {}

    fn advanced(&self, _: &StorePath, _: u64) {}

    fn finished(&self, path: &StorePath, outcome: &Result<u64, String>, will_retry: bool) {
        let t = self.start.elapsed().as_secs_f64();
        match outcome {
            Ok(bytes) => {
                let mut s = self.state.lock().expect("lines");
                s.0 += 1;
                eprintln!("[{t:7.1}s] uploaded {}/{}: {path} ({bytes} bytes compressed)", s.0, s.1);
            }
            Err(e) if will_retry => eprintln!("[{t:7.1}s] retrying {path}: {e}"),
            Err(e) => eprintln!("[{t:7.1}s] FAILED {path}: {e}"),
        }
    }

    fn note(&self, message: &str) {
        eprintln!("[{:7.1}s] {message}", self.start.elapsed().as_secs_f64());
    }
}
