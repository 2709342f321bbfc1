//! Checking a built output: files that must be in it, and a command that must print something
//! on a machine with the right hardware (`llama-cli --list-devices` showing `CUDA0`).

use std::time::Duration;

use nix_formats::StorePath;

use crate::api::{Verification, VerifySpec, VerifyStatus};

/// How long a verification command may run.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The files of `required` missing from `out`.
pub fn missing_files(out: &StorePath, required: &[String]) -> Vec<String> {
    let root = std::path::PathBuf::from(out.to_absolute());
    required.iter().filter(|f| std::fs::symlink_metadata(root.join(f)).is_err()).cloned().collect()
}

/// Why `out` fails the file check (`the output … lacks …`), if it does.
pub fn lacking(out: &StorePath, required: &[String]) -> Option<String> {
    let missing = missing_files(out, required);
    (!missing.is_empty()).then(|| format!("the output {} lacks {}", out.to_absolute(), missing.join(", ")))
}

/// Whether a required file is a plain relative path inside the output.
pub fn valid_file(f: &str) -> bool {
    !f.is_empty() && !f.starts_with('/') && !f.split('/').any(|c| c == ".." || c.is_empty())
}

/// Runs `spec` against `out` if `features` include the ones it needs.
pub async fn verify(out: &StorePath, spec: &VerifySpec, features: &[String]) -> Verification {
    let lacking: Vec<&String> = spec.features.iter().filter(|f| !features.contains(f)).collect();
    if !lacking.is_empty() {
        let lacking: Vec<&str> = lacking.iter().map(|f| f.as_str()).collect();
        return Verification {
            status: VerifyStatus::Unverified,
            detail: format!("not run: the machine that built it lacks {}", lacking.join(", ")),
            by: String::new(),
        };
    }
    let dir = out.to_absolute();
    let path = format!("{dir}/bin:{}", std::env::var("PATH").unwrap_or_default());
    let run = tokio::process::Command::new("/bin/sh")
        .args(["-c", &spec.command])
        .current_dir(&dir)
        .env("PATH", path)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(TIMEOUT, run).await {
        Err(_) => return failed(format!("{:?} did not finish within {TIMEOUT:?}", spec.command)),
        Ok(Err(e)) => return failed(format!("running {:?}: {e}", spec.command)),
        Ok(Ok(o)) => o,
    };
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    let tail: Vec<&str> = text.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
    let tail = tail.join("\n");
    if text.contains(&spec.expect) {
        Verification { status: VerifyStatus::Verified, detail: tail, by: String::new() }
    } else {
        failed(format!("{:?} ({}) did not print {:?}:\n{tail}", spec.command, output.status, spec.expect))
    }
}

fn failed(detail: String) -> Verification {
    Verification { status: VerifyStatus::VerifyFailed, detail, by: String::new() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_paths_stay_inside() {
        assert!(valid_file("lib/libggml-cuda.so"));
        for bad in ["", "/etc/passwd", "../x", "lib//x", "lib/../../x"] {
            assert!(!valid_file(bad), "{bad}");
        }
    }
}
