//! The orchestrator's state on a real PostgreSQL: replicas racing for claims.

use builder::api::Register;
use fleetcache_tests::postgres::Postgres;
use orchestrator::state::NewJob;
use orchestrator::state::{AttemptEnd, State};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_from_several_replicas_never_hand_out_a_job_twice() {
    let pg = Postgres::start();
    // Four "replicas", each with its own connection pool to the same database.
    let mut replicas = Vec::new();
    for _ in 0..4 {
        replicas.push(State::connect(&pg.url()).await.expect("connect"));
    }
    let features = ["cuda".to_owned()];
    let jobs: Vec<String> = (0..60).map(|i| format!("/nix/store/{i:032}-job-{i}.drv")).collect();
    for (i, drv) in jobs.iter().enumerate() {
        let job = NewJob {
            drv_path: drv,
            system: "x86_64-linux",
            features: if i % 3 == 0 { &features } else { &[] },
            flake_url: "git+file:///fleet?rev=1",
            attr_path: &[],
            out_paths: &[],
            required_files: &[],
            verify: None,
        };
        replicas[i % 4].enqueue(&job).await.unwrap();
        // Queued once, whichever replica sees it again.
        replicas[(i + 1) % 4].enqueue(&job).await.unwrap();
    }
    let register = Register {
        systems: vec!["x86_64-linux".into()],
        features: vec!["cuda".into()],
        mandatory_features: vec![],
        max_jobs: 1000,
        version: "test".into(),
    };
    for b in 0..8 {
        replicas[0].register_builder(&format!("b{b}"), &register).await.unwrap();
    }
    // Eight builders claim as fast as they can, each through a different replica.
    let mut tasks = Vec::new();
    for b in 0..8 {
        let state = replicas[b % 4].clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(job) = state.claim(&format!("b{b}"), 60).await.unwrap() {
                got.push(job);
            }
            got
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    let mut drvs: Vec<&str> = claimed.iter().map(|j| j.drv_path.as_str()).collect();
    drvs.sort();
    let mut expected: Vec<&str> = jobs.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(drvs, expected, "every job claimed exactly once");

    // Results land once; a stale lease's result is refused on any replica.
    let first = &claimed[0];
    assert!(
        replicas[1].finish_job(first.id, &first.lease, AttemptEnd::Built, None, None, 1.0, 3).await.unwrap()
    );
    assert!(
        !replicas[2].finish_job(first.id, &first.lease, AttemptEnd::Built, None, None, 1.0, 3).await.unwrap()
    );
    // The log keeps its last bytes.
    let second = &claimed[1];
    assert!(replicas[3].append_log(second.id, &second.lease, "a line\n", 10).await.unwrap());
    assert!(replicas[2].append_log(second.id, &second.lease, "second\n", 10).await.unwrap());
    let (log, running) = replicas[0].job_log(&second.drv_path).await.unwrap().unwrap();
    assert_eq!((log.as_str(), running), ("ne\nsecond\n", true));
    let report = replicas[0].report(5).await.unwrap();
    assert!(report.is_empty(), "no revisions were recorded");
}

/// Pins and the roots of a collection on PostgreSQL: prefixes (LIKE), branch names, the
/// newest revisions and the pinned ones, as the SQLite unit test checks them.
#[tokio::test]
async fn pins_and_collection_roots_work_on_postgresql() {
    use orchestrator::outcome::{Status, VariantResult};
    use orchestrator::state::{KeptFor, PinError};

    let pg = Postgres::start();
    let s = State::connect(&pg.url()).await.expect("connect");
    for (i, rev) in ["aaaaaaaa11", "bbbbbbbb22", "cccccccc33", "dddddddd44"].iter().enumerate() {
        let requested = if i == 3 { "main" } else { rev };
        let id = s.record_revision("/srv/fleet", rev, requested, &[]).await.unwrap();
        let result = VariantResult {
            variant: "cpu".into(),
            system: "x86_64-linux".into(),
            attr: "a".into(),
            drv_path: None,
            out_paths: vec![format!("/nix/store/{i}")],
            machines: vec![],
            status: Status::Built,
            seconds: 1.0,
            error: None,
            verification: None,
        };
        s.record_variant(id, &result, "built").await.unwrap();
    }
    assert_eq!(s.pin("aaaaaaa").await.unwrap(), "aaaaaaaa11");
    assert_eq!(s.pin("aaaaaaa").await.unwrap(), "aaaaaaaa11", "pinning twice is one pin");
    assert!(matches!(s.pin("eeeeeeee").await, Err(PinError::Unknown(_))));
    assert_eq!(s.pin("main").await.unwrap(), "dddddddd44");
    assert_eq!(s.unpin("main").await.unwrap(), ("dddddddd44".to_owned(), true));
    let roots = s.gc_roots(2, 0).await.unwrap();
    let revs: Vec<(&str, &[KeptFor])> =
        roots.revisions.iter().map(|r| (r.rev.as_str(), r.kept_for.as_slice())).collect();
    assert_eq!(
        revs,
        [
            ("dddddddd44", &[KeptFor::Newest][..]),
            ("cccccccc33", &[KeptFor::Newest][..]),
            ("aaaaaaaa11", &[KeptFor::Pinned][..])
        ]
    );
    assert_eq!(roots.paths, ["/nix/store/3", "/nix/store/2", "/nix/store/0"]);
    assert_eq!(roots.dropped, 1);
}
