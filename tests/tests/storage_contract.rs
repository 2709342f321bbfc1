//! One contract, every backend: the local directory and S3 on a real Garage behave the same.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cache_server::storage::{
    ByteRange, Key, LocalStorage, S3Options, S3Storage, Storage, get_bytes, put_bytes,
};
use fleetcache_tests::garage::{Garage, REGION};

const H: &str = "xn8dpmm67grflgfcrf021vfc6gln5s1h";
const F: &str = "0r2p2nhw2q1anv2lgkzgax4qq2xchnibgn67cnark67s0jm1dm7m";

/// With one upload left by a killed server (begun before this is called, and nothing of this
/// process open): kept while it may be in flight, dropped once begun before the time given,
/// and only once.
async fn abandoned_uploads_are_dropped(s: &dyn Storage) {
    let hour = Duration::from_secs(3600);
    assert_eq!(
        s.drop_abandoned(SystemTime::now() - hour).await.unwrap(),
        0,
        "an upload in flight was dropped"
    );
    assert_eq!(s.drop_abandoned(SystemTime::now() + hour).await.unwrap(), 1);
    assert_eq!(s.drop_abandoned(SystemTime::now() + hour).await.unwrap(), 0, "dropped twice");
}

async fn contract(s: &dyn Storage) {
    let narinfo = Key::narinfo(H).unwrap();
    let nar = Key::nar(&format!("{F}.nar.zst")).unwrap();

    // Missing objects are None, not errors; deleting them is fine.
    assert!(s.head(&narinfo).await.unwrap().is_none());
    assert!(s.get(&narinfo, None).await.unwrap().is_none());
    s.delete(&narinfo).await.unwrap();

    // Put, head, get, range.
    put_bytes(s, &narinfo, Bytes::from_static(b"StorePath: x\n")).await.unwrap();
    assert_eq!(s.head(&narinfo).await.unwrap(), Some(13));
    assert_eq!(get_bytes(s, &narinfo).await.unwrap().unwrap(), &b"StorePath: x\n"[..]);
    let obj = s.get(&narinfo, Some(ByteRange { start: 5, end: 8 })).await.unwrap().unwrap();
    assert_eq!(obj.size, 13, "size is the whole object's");
    let part: Vec<Bytes> = futures_util::TryStreamExt::try_collect(obj.body).await.unwrap();
    assert_eq!(part.concat(), b"Path");

    // Overwrite replaces.
    put_bytes(s, &narinfo, Bytes::from_static(b"second")).await.unwrap();
    assert_eq!(get_bytes(s, &narinfo).await.unwrap().unwrap(), &b"second"[..]);

    // Nothing is visible before commit; abort and drop leave nothing.
    let mut up = s.begin_put(&nar).await.unwrap();
    up.write(Bytes::from(vec![1u8; 1000])).await.unwrap();
    assert!(s.head(&nar).await.unwrap().is_none(), "visible before commit");
    up.abort().await.unwrap();
    assert!(s.head(&nar).await.unwrap().is_none(), "visible after abort");
    let mut up = s.begin_put(&nar).await.unwrap();
    up.write(Bytes::from(vec![1u8; 9 << 20])).await.unwrap();
    drop(up);
    assert!(s.head(&nar).await.unwrap().is_none(), "visible after drop");

    // A large object in many chunks (multipart on S3; on a directory, flushed to disk in the
    // background every 32 MiB while later chunks are written) arrives whole.
    let data: Vec<u8> = (0..(41u32 << 20)).map(|i| (i * 7 + i / 1000) as u8).collect();
    let mut up = s.begin_put(&nar).await.unwrap();
    for chunk in data.chunks(1 << 20) {
        up.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert_eq!(up.commit().await.unwrap(), data.len() as u64);
    assert_eq!(s.head(&nar).await.unwrap(), Some(data.len() as u64));
    assert!(get_bytes(s, &nar).await.unwrap().unwrap() == data[..], "large object differs");
    // The last bytes, and ranges of many megabytes across the upload's 8 MiB multipart boundaries.
    let last = data.len() as u64 - 1;
    for (start, end) in [(last - 4, last), ((3 << 20) + 1, (19 << 20) + 7), (9 << 20, last)] {
        let obj = s.get(&nar, Some(ByteRange { start, end })).await.unwrap().unwrap();
        assert_eq!(obj.size, data.len() as u64);
        let got: Vec<Bytes> = futures_util::TryStreamExt::try_collect(obj.body).await.unwrap();
        assert!(got.concat() == data[start as usize..=end as usize], "bytes {start}-{end} differ");
    }

    // Two writers of one key at once: both succeed, and the result is one of them, whole.
    let (a, b) = (Bytes::from(vec![b'a'; 100_000]), Bytes::from(vec![b'b'; 100_000]));
    let mut ua = s.begin_put(&narinfo).await.unwrap();
    let mut ub = s.begin_put(&narinfo).await.unwrap();
    ua.write(a.clone()).await.unwrap();
    ub.write(b.clone()).await.unwrap();
    let (ra, rb) = tokio::join!(ua.commit(), ub.commit());
    ra.unwrap();
    rb.unwrap();
    let got = get_bytes(s, &narinfo).await.unwrap().unwrap();
    assert!(got == a || got == b);

    // A write that must not replace: the first lands, a later one (small or multipart) keeps
    // what is there and says so.
    s.delete(&nar).await.unwrap();
    let mut first = s.begin_put(&nar).await.unwrap();
    first.write(Bytes::from_static(b"first")).await.unwrap();
    assert_eq!(first.commit_new().await.unwrap(), Some(5));
    for size in [6usize, 9 << 20] {
        let mut later = s.begin_put(&nar).await.unwrap();
        later.write(Bytes::from(vec![b'x'; size])).await.unwrap();
        assert_eq!(later.commit_new().await.unwrap(), None, "{size} bytes replaced the object");
        assert_eq!(get_bytes(s, &nar).await.unwrap().unwrap(), &b"first"[..]);
    }

    // An empty object reads as empty.
    s.delete(&nar).await.unwrap();
    put_bytes(s, &nar, Bytes::new()).await.unwrap();
    assert_eq!(get_bytes(s, &nar).await.unwrap().unwrap(), &b""[..]);

    s.delete(&nar).await.unwrap();
    assert!(s.head(&nar).await.unwrap().is_none());

    // A listing names every object of the layout once, with its size and a recent time; a
    // batch delete removes exactly what it is given (missing keys included).
    let log = Key::log(&format!("{H}-x.drv")).unwrap();
    put_bytes(s, &nar, Bytes::from_static(b"nar bytes")).await.unwrap();
    put_bytes(s, &log, Bytes::from_static(b"a log")).await.unwrap();
    let listed: Vec<cache_server::storage::Listed> =
        futures_util::TryStreamExt::try_collect(s.list()).await.unwrap();
    let mut found: Vec<(String, u64)> = listed.iter().map(|l| (l.key.to_string(), l.size)).collect();
    found.sort();
    assert_eq!(
        found,
        [(log.to_string(), 5), (nar.to_string(), 9), (narinfo.to_string(), 100_000)],
        "what a listing names"
    );
    let now = std::time::SystemTime::now();
    for l in &listed {
        let age = now.duration_since(l.modified).unwrap_or_default();
        assert!(age < std::time::Duration::from_secs(300), "{} was written {age:?} ago", l.key);
    }
    let gone = Key::listing(H).unwrap();
    s.delete_many(&[narinfo.clone(), log.clone(), gone]).await.unwrap();
    let left: Vec<cache_server::storage::Listed> =
        futures_util::TryStreamExt::try_collect(s.list()).await.unwrap();
    assert_eq!(left.iter().map(|l| l.key.to_string()).collect::<Vec<_>>(), [nar.to_string()]);
    s.delete_many(std::slice::from_ref(&nar)).await.unwrap();
    assert!(s.head(&nar).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn local_directory_backend() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStorage::open(dir.path()).await.unwrap();
    // What a killed server leaves: a file in the upload area.
    std::fs::write(dir.path().join(".fleetcache-tmp/00000000000000ff"), b"half a NAR").unwrap();
    abandoned_uploads_are_dropped(&s).await;
    contract(&s).await;
    // Layout is Nix's: the key is the relative path.
    put_bytes(&s, &Key::narinfo(H).unwrap(), Bytes::from_static(b"x")).await.unwrap();
    assert!(dir.path().join(format!("{H}.narinfo")).is_file());
    let leftovers = std::fs::read_dir(dir.path().join(".fleetcache-tmp")).unwrap().count();
    assert_eq!(leftovers, 0, "no temporary files left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_backend_on_garage() {
    let g = Garage::start();
    let s = S3Storage::new(&S3Options {
        bucket: g.bucket.clone(),
        endpoint: Some(g.endpoint()),
        region: REGION.to_owned(),
        credentials: Some((g.access_key_id.clone(), g.secret_access_key.clone())),
        checksums_when_required: true,
        // As cache-server's default sets it: the large uploads below wait without it.
        timeout: Some(Duration::from_secs(30)),
    })
    .unwrap();
    // What a killed server leaves: a multipart upload with a part, never completed nor
    // aborted; and one of a key outside the cache's layout, which is not the cache's business.
    let client = g.client();
    for key in [format!("nar/{F}.nar.zst"), "elsewhere/upload".to_owned()] {
        let up = client.create_multipart_upload().bucket(&g.bucket).key(&key).send().await.unwrap();
        let part = client.upload_part().bucket(&g.bucket).key(&key).upload_id(up.upload_id().unwrap());
        part.part_number(1).body(vec![2u8; 5 << 20].into()).send().await.unwrap();
    }
    abandoned_uploads_are_dropped(&s).await;
    let open = client.list_multipart_uploads().bucket(&g.bucket).send().await.unwrap();
    let keys: Vec<_> = open.uploads().iter().filter_map(|u| u.key()).collect();
    assert_eq!(keys, ["elsewhere/upload"]);
    client
        .abort_multipart_upload()
        .bucket(&g.bucket)
        .key("elsewhere/upload")
        .upload_id(open.uploads()[0].upload_id().unwrap())
        .send()
        .await
        .unwrap();
    contract(&s).await;
    // No multipart upload is left open by the aborted and dropped uploads (a dropped one is
    // aborted in the background: poll for it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let open = g.client().list_multipart_uploads().bucket(&g.bucket).send().await.unwrap();
        if open.uploads().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "open multipart uploads: {:?}", open.uploads());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
