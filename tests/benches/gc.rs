//! Garbage collection at scale: `cargo bench -p fleetcache-tests --bench gc`.
//!
//! A synthetic cache of `FLEETCACHE_BENCH_NARINFOS` narinfos (default 100 000), each with its
//! NAR, written straight into a directory and into a real Garage bucket: ten "revisions" of
//! equal size, each path referring to the one before it in its revision and to two random
//! earlier ones, so a revision's last path reaches the whole revision. The real `cache-server
//! gc` binary collects with three revisions' tops as roots, first as a dry run, then for real;
//! printed per backend: wall time, peak RSS (GNU time's maximum resident set size), storage
//! requests and what was deleted. Seven tenths of the objects go.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use bytes::Bytes;
use cache_server::config::StoreUrl;
use cache_server::storage::{Key, LocalStorage, S3Options, S3Storage, Storage, put_bytes};
use fleetcache_tests::bin;
use fleetcache_tests::garage::Garage;
use futures_util::StreamExt as _;
use nix_formats::{NarInfo, StorePath, nixbase32};
use serde_json::Value;

const REVISIONS: usize = 10;
const KEPT_REVISIONS: [usize; 3] = [2, 6, 9];

/// splitmix64: the same cache every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes()[..chunk.len()]);
        }
        out
    }
}

/// The narinfos and the roots (each kept revision's last path).
fn synthetic(count: usize) -> (Vec<NarInfo>, Vec<StorePath>) {
    let mut rng = Rng(0x5eed);
    let per = count / REVISIONS;
    let mut infos: Vec<NarInfo> = Vec::with_capacity(count);
    for i in 0..per * REVISIONS {
        let hash = nixbase32::encode(&rng.bytes::<20>());
        let path = StorePath::from_absolute(&format!("/nix/store/{hash}-synthetic-{i}")).expect("valid");
        let start = i - i % per;
        let mut references = vec![path.clone()];
        if i > start {
            references.push(infos[i - 1].store_path.clone());
            for _ in 0..2 {
                let j = start + (rng.next() as usize) % (i - start);
                references.push(infos[j].store_path.clone());
            }
        }
        references.sort();
        references.dedup();
        let nar_hash = rng.bytes::<32>();
        let text = format!(
            "StorePath: {}\nURL: nar/{}.nar.zst\nCompression: zstd\nFileSize: 64\nNarHash: sha256:{}\nNarSize: 1000\nReferences: {}\n",
            path.to_absolute(),
            nixbase32::encode(&rng.bytes::<32>()),
            nixbase32::encode(&nar_hash),
            references.iter().map(|r| r.base_name()).collect::<Vec<_>>().join(" "),
        );
        infos.push(NarInfo::parse(&text).expect("a valid synthetic narinfo"));
    }
    let roots = KEPT_REVISIONS.iter().map(|r| infos[(r + 1) * per - 1].store_path.clone()).collect();
    (infos, roots)
}

async fn fill(storage: &dyn Storage, infos: &[NarInfo]) {
    let start = Instant::now();
    let writes = infos.iter().flat_map(|info| {
        let narinfo = Key::narinfo(info.store_path.hash_part()).expect("key");
        let nar = Key::nar_url(&info.url).expect("key");
        [(narinfo, Bytes::from(info.to_string())), (nar, Bytes::from_static(&[0u8; 64]))]
    });
    let mut stream = futures_util::stream::iter(writes)
        .map(|(key, body)| async move { put_bytes(storage, &key, body).await })
        .buffer_unordered(64);
    let mut done = 0usize;
    while let Some(r) = stream.next().await {
        r.expect("write");
        done += 1;
        if done.is_multiple_of(50_000) {
            eprintln!("  {done} objects written ({:.0}/s)", done as f64 / start.elapsed().as_secs_f64());
        }
    }
    eprintln!("  filled: {done} objects in {:.1}s", start.elapsed().as_secs_f64());
}

struct Run {
    seconds: f64,
    peak_rss_mib: f64,
    report: Value,
}

fn collect(store: &str, env: &[(&'static str, String)], roots: &Path, dry_run: bool) -> Run {
    let timing = tempfile::NamedTempFile::new().expect("temp");
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "%M", "-o"]).arg(timing.path()).arg(bin("cache-server"));
    cmd.args(["--store", store, "gc", "--grace-seconds", "0", "--json", "--roots-file"]).arg(roots);
    if dry_run {
        cmd.arg("--dry-run");
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let start = Instant::now();
    let out = cmd.output().expect("run cache-server gc under /usr/bin/time");
    let seconds = start.elapsed().as_secs_f64();
    assert!(out.status.success(), "gc failed: {}", String::from_utf8_lossy(&out.stderr));
    let kib: f64 = std::fs::read_to_string(timing.path())
        .expect("time output")
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("maximum resident set size");
    Run { seconds, peak_rss_mib: kib / 1024.0, report: serde_json::from_slice(&out.stdout).expect("JSON") }
}

fn objects(tally: &Value) -> u64 {
    ["narinfos", "nars", "listings", "logs"].iter().map(|k| tally[k].as_u64().unwrap_or(0)).sum()
}

fn bench(
    name: &str,
    store: &str,
    env: &[(&'static str, String)],
    storage: &dyn Storage,
    infos: &[NarInfo],
    roots: &Path,
) -> Vec<String> {
    eprintln!("{name}: filling");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(fill(storage, infos));
    let mut rows = Vec::new();
    for dry_run in [true, false] {
        let run = collect(store, env, roots, dry_run);
        let r = &run.report;
        let expected = (infos.len() * (REVISIONS - KEPT_REVISIONS.len()) / REVISIONS * 2) as u64;
        assert_eq!(objects(&r["deleted"]), expected, "{r}");
        rows.push(format!(
            "| {name} | {} | {:.2} | {:.0} | {} | {} | {} |",
            if dry_run { "dry run" } else { "collect" },
            run.seconds,
            run.peak_rss_mib,
            r["requests"],
            objects(&r["kept"]),
            objects(&r["deleted"]),
        ));
    }
    rows
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists; nothing to list here.
    }
    if !Path::new("/usr/bin/time").exists() {
        eprintln!("GNU time (/usr/bin/time, Debian's `time` package) measures peak RSS: install it");
        std::process::exit(1);
    }
    let count: usize =
        std::env::var("FLEETCACHE_BENCH_NARINFOS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let (infos, roots) = synthetic(count);
    let work = tempfile::tempdir().expect("tempdir");
    let roots_file = work.path().join("roots");
    let lines: Vec<String> = roots.iter().map(StorePath::to_absolute).collect();
    std::fs::write(&roots_file, lines.join("\n") + "\n").expect("roots");

    let mut rows = Vec::new();
    let dir = work.path().join("cache");
    std::fs::create_dir(&dir).expect("dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let local = rt.block_on(LocalStorage::open(&dir)).expect("open");
    rows.extend(bench("directory", &format!("file://{}", dir.display()), &[], &local, &infos, &roots_file));

    let garage = Garage::start();
    let env = garage.credential_env().to_vec();
    let StoreUrl::S3 { bucket, endpoint, region, checksums_when_required } =
        StoreUrl::parse(&garage.store_url()).expect("store URL")
    else {
        unreachable!("an s3:// URL")
    };
    let credentials = Some((env[0].1.clone(), env[1].1.clone()));
    let timeout = Some(std::time::Duration::from_secs(30));
    let s3 = S3Storage::new(&S3Options {
        bucket,
        endpoint,
        region,
        credentials,
        checksums_when_required,
        timeout,
    })
    .expect("S3 storage");
    rows.extend(bench("Garage", &garage.store_url(), &env, &s3, &infos, &roots_file));

    println!(
        "\ngarbage collection of {} narinfos (+ as many NARs), {} of {REVISIONS} revisions kept\n",
        infos.len(),
        KEPT_REVISIONS.len()
    );
    println!("| store | run | wall s | peak RSS MiB | storage requests | objects kept | objects deleted |");
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
