//! The harness's S3 server works the way the cache-server will use it.

use aws_sdk_s3::primitives::ByteStream;
use fleetcache_tests::garage::Garage;

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_bucket_stores_streams_and_survives_a_restart() {
    let mut g = Garage::start();
    let s3 = g.client();
    let bucket = g.bucket.clone();

    // Empty at first, and a missing key is NotFound, not an error of another kind.
    let list = s3.list_objects_v2().bucket(&bucket).send().await.unwrap();
    assert_eq!(list.key_count(), Some(0));
    let missing = s3.head_object().bucket(&bucket).key("nope.narinfo").send().await.unwrap_err();
    assert!(missing.into_service_error().is_not_found());

    // A streamed body from a file (what large NAR uploads do) is accepted.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let body = ByteStream::from_path(&file).await.unwrap();
    s3.put_object().bucket(&bucket).key("nar/x.nar.zst").body(body).send().await.unwrap_or_else(|e| {
        panic!("streamed PUT refused: {e:?}\n{}", g.log());
    });
    let got = s3.get_object().bucket(&bucket).key("nar/x.nar.zst").send().await.unwrap();
    assert_eq!(got.body.collect().await.unwrap().into_bytes().as_ref(), &data[..]);

    // Down, then back with the same data.
    g.stop();
    assert!(s3.head_object().bucket(&bucket).key("nar/x.nar.zst").send().await.is_err());
    g.restart();
    let head = s3.head_object().bucket(&bucket).key("nar/x.nar.zst").send().await.unwrap();
    assert_eq!(head.content_length(), Some(data.len() as i64));
}

/// Parallel test processes can draw the same port. Garage keeps running when its S3 port is
/// taken, so the harness must notice that the port answers as someone else (seen in CI: every
/// request to "Garage" was reset by another Garage's RPC listener).
#[test]
fn a_port_held_by_another_server_is_noticed() {
    use fleetcache_tests::process::free_port;
    use std::net::TcpListener;

    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    std::thread::spawn(move || {
        // Accept and drop at once, like a server speaking another protocol.
        for conn in squatter.incoming() {
            drop(conn);
        }
    });
    let err = match Garage::try_start_on(port, free_port()) {
        Ok(_) => panic!("Garage claimed a port another server holds"),
        Err(e) => e,
    };
    assert!(err.contains("does not answer as this Garage"), "{err}");
}
