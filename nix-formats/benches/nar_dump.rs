//! NAR serialisation + SHA-256 throughput, against `nix-store --dump <dir> | sha256sum` on the
//! same tree in the same run. Prints medians and the ratio; set `FLEETCACHE_BENCH_MIB` to change
//! the tree size (default 512), `FLEETCACHE_BENCH_RUNS` the number of timed runs (default 5).

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix_formats::hash::HashingWriter;
use nix_formats::nar::dump_path;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Fills `buf` with bytes that compress about as well as binaries do (half random, half text).
fn fill(buf: &mut [u8], seed: &mut u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let v = if i % 2 == 0 { seed.to_le_bytes() } else { *b"llama.cp" };
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A tree like a package output: one large library, many small files in nested directories.
fn make_tree(root: &Path, mib: usize) -> io::Result<()> {
    let mut seed = 0x9e3779b97f4a7c15u64;
    let big = mib / 2;
    fs::create_dir_all(root.join("lib"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut f = fs::File::create(root.join("lib/libggml-cpu.so"))?;
    for _ in 0..big {
        fill(&mut buf, &mut seed);
        f.write_all(&buf)?;
    }
    let small_total = (mib - big) << 20;
    let mut written = 0;
    let mut n = 0;
    while written < small_total {
        let dir = root.join(format!("share/d{}/e{}", n % 17, n % 5));
        fs::create_dir_all(&dir)?;
        let size = 512 + (n * 7919) % (96 * 1024);
        fill(&mut buf[..size], &mut seed);
        let p = dir.join(format!("file-{n}.dat"));
        fs::write(&p, &buf[..size])?;
        if n % 10 == 0 {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
        }
        if n % 50 == 0 {
            symlink(format!("file-{n}.dat"), dir.join(format!("link-{n}")))?;
        }
        written += size;
        n += 1;
    }
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ours(root: &Path) -> (String, u64) {
    let w = dump_path(root, HashingWriter::new(io::sink())).expect("dump");
    let (hash, size, _) = w.finish();
    (hash.to_base16(), size)
}

fn nix(root: &Path) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg("set -o pipefail; nix-store --dump \"$1\" | sha256sum")
        .arg("sh")
        .arg(root)
        .output()
        .expect("run nix-store (is nix installed? scripts/test installs it)");
    assert!(out.status.success(), "nix-store --dump failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

/// `nix-store --dump` alone, output discarded: how much of the baseline is Nix, not sha256sum.
fn nix_dump_only(root: &Path) {
    let status = Command::new("nix-store")
        .arg("--dump")
        .arg(root)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run nix-store");
    assert!(status.success());
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib = env_num("FLEETCACHE_BENCH_MIB", 512);
    let runs = env_num("FLEETCACHE_BENCH_RUNS", 5);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    make_tree(&root, mib).unwrap();

    // Warm the page cache and check both agree before timing anything.
    let (our_hash, nar_size) = ours(&root);
    assert_eq!(our_hash, nix(&root), "our NAR hash differs from nix-store --dump's");

    let mut t_ours = Vec::new();
    let mut t_nix = Vec::new();
    let mut t_dump = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        ours(&root);
        t_ours.push(t.elapsed());
        let t = Instant::now();
        nix(&root);
        t_nix.push(t.elapsed());
        let t = Instant::now();
        nix_dump_only(&root);
        t_dump.push(t.elapsed());
    }
    let (m_ours, m_nix, m_dump) = (median(t_ours), median(t_nix), median(t_dump));
    let mbps = |d: Duration| nar_size as f64 / 1e6 / d.as_secs_f64();
    println!("NAR of a {mib} MiB tree ({nar_size} bytes), median of {runs} runs, page cache warm:");
    println!("  nix-formats dump_path + sha256      {:>8.1} MB/s  ({:?})", mbps(m_ours), m_ours);
    println!("  nix-store --dump | sha256sum        {:>8.1} MB/s  ({:?})", mbps(m_nix), m_nix);
    println!("  nix-store --dump > /dev/null (no hash) {:>8.1} MB/s  ({:?})", mbps(m_dump), m_dump);
    println!("  ratio (ours / nix)                  {:>8.2}x", m_nix.as_secs_f64() / m_ours.as_secs_f64());
}
