//! Scheduler overhead: `cargo bench -p fleetcache-tests --bench scheduler`.
//!
//! 1. End to end: N trivial derivations of the stand-in fleet (`FLEETCACHE_BENCH_JOBS`, default
//!    200) submitted to a real `orchestrator serve` with 4 real `builder` agents on loopback.
//!    From the server's log (first claim, last result) and the builders' own timings (each
//!    attempt's seconds), the agents' idle time between jobs — claiming, reporting, waiting for
//!    the scheduler — per job. Goal: under 5 ms.
//! 2. The queue alone: 1000 jobs claimed by 4 concurrent claimers straight from the state
//!    (SQLite, and PostgreSQL when Debian's package is installed): claims per second.

use std::time::{Duration, Instant};

use builder::api::Register;
use fleetcache_tests::cache_server::CacheServer;
use fleetcache_tests::orchestrator::{Setup, parse_build};
use fleetcache_tests::serve::{configure, start_builder, start_orchestrator};
use orchestrator::state::NewJob;
use orchestrator::state::State;

const AGENTS: usize = 4;

/// `line` without terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Seconds since midnight of a tracing timestamp at the start of `line`.
fn timestamp(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?;
    let time = t.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

fn end_to_end(jobs: usize) {
    let s = Setup::new();
    let (_dir, cache) = CacheServer::start_local();
    let variants: String = (0..jobs)
        .map(|i| format!("[[variant]]\nname = \"t{i}\"\nattr = \"inputs.llama-cpp.legacyPackages.{{system}}.bench.t{i}\"\n"))
        .collect();
    let (config, api_token) = configure(&s, &cache, "", &variants);
    let o = start_orchestrator(&s, &config, &api_token, "127.0.0.1:0");
    let _agents: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|x| start_builder(&s, &o, &format!("builder-{x}"), &format!("token-{x}"), ""))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut args = vec!["build", "--json", "--rev", "main"];
    let client = o.client_args();
    args.extend(client.iter().map(String::as_str));
    let started = Instant::now();
    let (code, results, stderr) = parse_build(s.orchestrator(&args).output().expect("run build"));
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(results.len(), jobs);
    let log: String = o.log().lines().map(|l| strip_ansi(l) + "\n").collect();
    let claims: Vec<f64> = log.lines().filter(|l| l.contains("claimed")).filter_map(timestamp).collect();
    let ends: Vec<f64> = log.lines().filter(|l| l.contains("job ended")).filter_map(timestamp).collect();
    assert_eq!(claims.len(), jobs, "one claim per job");
    let first_claim = claims.iter().cloned().fold(f64::INFINITY, f64::min);
    let last_end = ends.iter().cloned().fold(0.0, f64::max);
    let busy: f64 = o.status(&s)[0]["variants"]
        .as_array()
        .expect("variants")
        .iter()
        .flat_map(|v| v["attempts"].as_array().cloned().unwrap_or_default())
        .map(|a| a["seconds"].as_f64().unwrap_or(0.0))
        .sum();
    let span = last_end - first_claim;
    let idle = AGENTS as f64 * span - busy;
    // Per agent: from the server recording a result to it handing that agent its next job.
    let mut events: Vec<(String, f64, bool)> = log
        .lines()
        .filter_map(|l| {
            let claimed = l.contains("claimed");
            if !claimed && !l.contains("job ended") {
                return None;
            }
            let who = l.split_whitespace().find_map(|w| w.strip_prefix("builder="))?.to_owned();
            Some((who, timestamp(l)?, claimed))
        })
        .collect();
    events.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let gaps: Vec<f64> = events
        .windows(2)
        .filter(|w| w[0].0 == w[1].0 && !w[0].2 && w[1].2)
        .map(|w| w[1].1 - w[0].1)
        .collect();
    let mut sorted = gaps.clone();
    sorted.sort_by(f64::total_cmp);
    let median_gap = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let mean_gap = gaps.iter().sum::<f64>() / gaps.len().max(1) as f64;
    println!("end to end: {jobs} jobs, {AGENTS} agents (1 job each)");
    println!("  submit to done           {wall:8.2} s");
    println!("  planning (eval {jobs})     {:8.2} s", (wall - span).max(0.0));
    println!("  first claim to last end  {span:8.2} s");
    println!(
        "  builders busy (sum)      {busy:8.2} s  ({:.1} ms per job: evaluate, nix build, push)",
        busy * 1000.0 / jobs as f64
    );
    println!(
        "  result to next claim     {:8.2} ms median, {:.2} ms mean over {} hand-overs (the scheduler's part; goal < 5 ms)",
        median_gap * 1000.0,
        mean_gap * 1000.0,
        gaps.len()
    );
    println!(
        "  all agent idle time      {:8.2} ms per job (4 x span - busy, with start-up and the last round's tail)",
        idle * 1000.0 / jobs as f64
    );
    println!("  throughput               {:8.1} jobs/s", jobs as f64 / span);
}

async fn claims_per_second(label: &str, state: State) {
    let n = 1000;
    for i in 0..n {
        let drv = format!("/nix/store/{i:032}-bench-{i}.drv");
        let job = NewJob {
            drv_path: &drv,
            system: "x86_64-linux",
            features: &[],
            flake_url: "f",
            attr_path: &[],
            out_paths: &[],
            required_files: &[],
            verify: None,
        };
        state.enqueue(&job).await.expect("enqueue");
    }
    let register = Register {
        systems: vec!["x86_64-linux".into()],
        features: vec![],
        mandatory_features: vec![],
        max_jobs: 100_000,
        version: "bench".into(),
    };
    for c in 0..AGENTS {
        state.register_builder(&format!("c{c}"), &register).await.expect("register");
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..AGENTS)
        .map(|c| {
            let state = state.clone();
            tokio::spawn(async move {
                let mut n = 0;
                while state.claim(&format!("c{c}"), 60).await.expect("claim").is_some() {
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut claimed = 0;
    for t in tasks {
        claimed += t.await.expect("claimer");
    }
    let took = started.elapsed().as_secs_f64();
    assert_eq!(claimed, n);
    println!(
        "queue alone ({label}): {n} claims by {AGENTS} claimers in {took:.2} s = {:.0} claims/s",
        n as f64 / took
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let jobs =
        std::env::var("FLEETCACHE_BENCH_JOBS").ok().and_then(|j| j.parse().ok()).unwrap_or(200).min(200);
    end_to_end(jobs);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    rt.block_on(async { claims_per_second("SQLite", State::open(dir.path()).await.expect("sqlite")).await });
    if std::path::Path::new("/usr/lib/postgresql").exists() {
        let pg = fleetcache_tests::postgres::Postgres::start();
        rt.block_on(async {
            claims_per_second("PostgreSQL", State::connect(&pg.url()).await.expect("pg")).await
        });
    }
}
