//! Running `nix build` on a derivation: its log line by line, its last lines on failure, and a
//! clean stop when the run is cancelled.

use std::collections::VecDeque;
use std::process::Stdio;
use std::time::Duration;

use nix_formats::StorePath;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio_util::sync::CancellationToken;

/// How a build ended.
#[derive(Debug)]
pub enum BuildEnd {
    /// Nix built (or already had) every output.
    Built,
    /// Nix failed; the message names the exit status and the last log lines.
    Failed(String),
    /// The run was cancelled and Nix was stopped.
    Cancelled,
}

/// The log of a build, capped to its last `max_bytes` bytes.
pub struct Log {
    text: VecDeque<String>,
    bytes: usize,
    max_bytes: usize,
    dropped: bool,
}

impl Log {
    fn new(max_bytes: usize) -> Self {
        Log { text: VecDeque::new(), bytes: 0, max_bytes, dropped: false }
    }

    fn push(&mut self, line: String) {
        self.bytes += line.len() + 1;
        self.text.push_back(line);
        while self.bytes > self.max_bytes && self.text.len() > 1 {
            let first = self.text.pop_front().expect("not empty");
            self.bytes -= first.len() + 1;
            self.dropped = true;
        }
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<&str> {
        self.text.iter().skip(self.text.len().saturating_sub(n)).map(String::as_str).collect()
    }

    /// The whole kept log, with a first line saying if the head was dropped.
    pub fn text(&self) -> String {
        let mut s = String::with_capacity(self.bytes + 64);
        if self.dropped {
            s.push_str("[fleetcache: the beginning of this log was dropped; the cache has all of it]\n");
        }
        for line in &self.text {
            s.push_str(line);
            s.push('\n');
        }
        s
    }
}

/// Build log bytes kept (the tail) unless told otherwise: for the record and the failure
/// message; the cache keeps the whole log.
pub const DEFAULT_MAX_LOG_BYTES: usize = 4 << 20;

/// Builds `drv` with the real `nix`, calling `on_line` for each line Nix prints (build output
/// is prefixed by the derivation's name, as `nix build -L` does). Nix runs in its own process
/// group so a terminal's Ctrl-C reaches us first; on `cancel` we stop Nix and its builders.
pub async fn build(
    drv: &StorePath,
    max_log_bytes: usize,
    cancel: &CancellationToken,
    mut on_line: impl FnMut(&str),
) -> (BuildEnd, Log) {
    let mut log = Log::new(max_log_bytes);
    let spawned = crate::nix::async_command("nix")
        .args(["build", "--no-link", "--json", "--print-build-logs"])
        // Builds that share a dependency wait on its lock; Nix rechecks every 5 s by default.
        .args(["--option", "build-poll-interval", "1"])
        .arg(crate::nix::build_installable(drv))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return (BuildEnd::Failed(format!("running nix build: {e}")), log),
    };
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let cancelled = loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    on_line(&line);
                    log.push(line);
                }
                Ok(None) | Err(_) => break false,
            },
            _ = cancel.cancelled() => break true,
        }
    };
    if cancelled {
        stop(&mut child).await;
        return (BuildEnd::Cancelled, log);
    }
    let status = match child.wait().await {
        Ok(s) => s,
        Err(e) => return (BuildEnd::Failed(format!("waiting for nix build: {e}")), log),
    };
    if status.success() {
        return (BuildEnd::Built, log);
    }
    if cancel.is_cancelled() {
        return (BuildEnd::Cancelled, log);
    }
    let tail = log.tail(25).join("\n");
    (BuildEnd::Failed(format!("nix build {status}; last log lines:\n{tail}")), log)
}

/// SIGINT to Nix's process group (Nix then stops its builders), SIGKILL if it lingers.
async fn stop(child: &mut tokio::process::Child) {
    use rustix::process::{Pid, Signal, kill_process_group};
    let Some(pid) = child.id().and_then(|p| Pid::from_raw(p as i32)) else { return };
    let _ = kill_process_group(pid, Signal::INT);
    if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
        let _ = kill_process_group(pid, Signal::KILL);
        let _ = child.wait().await;
    }
}

/// The log Nix keeps for `drv` (`nix-store --read-log`, which means the same in every Nix
/// version), the one the cache's `log/` should serve.
pub async fn stored_log(drv: &StorePath) -> Option<Vec<u8>> {
    let out = crate::nix::async_command("nix-store")
        .args(["--read-log", &drv.to_absolute()])
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    out.status.success().then_some(out.stdout)
}

/// Uploads the log Nix keeps for `drv` to the cache's `log/`; nothing to do if Nix kept none.
pub async fn upload_stored_log(
    cache: &crate::client::CacheClient,
    drv: &StorePath,
) -> Result<(), crate::client::ClientError> {
    match stored_log(drv).await {
        Some(text) => cache.upload_log(drv, text.into()).await,
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_its_tail() {
        let mut log = Log::new(10);
        for l in ["aaaa", "bbbb", "cccc"] {
            log.push(l.to_owned());
        }
        assert_eq!(log.tail(5), ["bbbb", "cccc"]);
        assert!(log.text().starts_with("[fleetcache: the beginning"));
        assert!(log.text().ends_with("bbbb\ncccc\n"));
        let mut short = Log::new(100);
        short.push("one".into());
        assert_eq!(short.text(), "one\n");
    }
}
