//! One reader per followed build log, however many pages follow it: the first follower of a
//! derivation starts a task that reads its log from the state database every
//! [`FOLLOW_EVERY`] and hands each new text to every follower; the task ends with the build or
//! when the last follower leaves. With a reader per open page, as before, every page cost the
//! database a read of the whole log (up to `build.max-log-bytes`, 4 MiB by default) a second.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// How often a followed log is read again from the state database.
pub(super) const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// One read of a followed log.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct LogRead {
    /// The log so far, as text (escapes stripped).
    pub text: String,
    /// Whether the build still runs.
    pub running: bool,
}

type Feed = watch::Sender<Option<Arc<LogRead>>>;

/// The logs followed now, each with the channel its reader feeds.
pub struct LogFeeds {
    feeds: Arc<Mutex<HashMap<String, Arc<Feed>>>>,
    every: Duration,
}

impl Default for LogFeeds {
    fn default() -> Self {
        LogFeeds { feeds: Arc::default(), every: FOLLOW_EVERY }
    }
}

/// A follower's view of one log: the newest read, and a signal when another arrives. The
/// channel closes after the read that says the build ended, or when the log cannot be read.
pub(super) type Following = watch::Receiver<Option<Arc<LogRead>>>;

impl LogFeeds {
    /// Follows `drv`'s log, starting its reader if no one follows it yet; `read` is how that
    /// reader gets the log (an error ends the feed: the browser reconnects after a while).
    /// The newest read, if there is one yet, counts as unseen for the new follower.
    pub(super) fn follow<F, Fut>(&self, drv: &str, read: F) -> Following
    where
        F: Fn(String) -> Fut + Send + 'static,
        Fut: Future<Output = Result<LogRead, String>> + Send + 'static,
    {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        let mut following = match feeds.get(drv) {
            Some(feed) => feed.subscribe(),
            None => {
                let (tx, rx) = watch::channel(None);
                let feed = Arc::new(tx);
                feeds.insert(drv.to_owned(), feed.clone());
                tokio::spawn(feed_log(self.feeds.clone(), drv.to_owned(), feed, self.every, read));
                rx
            }
        };
        if following.borrow().is_some() {
            following.mark_changed();
        }
        following
    }

    /// How many logs have a reader now.
    #[cfg(test)]
    fn readers(&self) -> usize {
        self.feeds.lock().unwrap().len()
    }
}

/// The reader of one log: reads it until the build ends, the log cannot be read, or no one
/// follows it any more, then leaves the map (under its lock, so a follower that arrives then
/// starts a new reader rather than join one that has stopped).
async fn feed_log<F, Fut>(
    feeds: Arc<Mutex<HashMap<String, Arc<Feed>>>>,
    drv: String,
    feed: Arc<Feed>,
    every: Duration,
    read: F,
) where
    F: Fn(String) -> Fut + Send + 'static,
    Fut: Future<Output = Result<LogRead, String>> + Send + 'static,
{
    loop {
        let ended = match read(drv.clone()).await {
            Ok(now) => {
                let ended = !now.running;
                feed.send_if_modified(|shown| {
                    let changed = shown.as_deref() != Some(&now);
                    if changed {
                        *shown = Some(Arc::new(now));
                    }
                    changed
                });
                ended
            }
            Err(e) => {
                tracing::warn!(drv, error = %e, "following a build log");
                true
            }
        };
        if !ended {
            tokio::time::sleep(every).await;
        }
        let mut map = feeds.lock().unwrap_or_else(|e| e.into_inner());
        if ended || feed.receiver_count() == 0 {
            if map.get(&drv).is_some_and(|f| Arc::ptr_eq(f, &feed)) {
                map.remove(&drv);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const EVERY: Duration = Duration::from_millis(10);

    fn feeds() -> LogFeeds {
        LogFeeds { every: EVERY, ..LogFeeds::default() }
    }

    /// Reads of one log, and which follower's reader made each.
    #[derive(Default)]
    struct Reads {
        count: AtomicUsize,
        by: Mutex<Vec<usize>>,
    }

    /// Follower `who`'s reader of a log that grows by a line a read and ends after `lines`.
    fn growing(
        reads: &Arc<Reads>,
        who: usize,
        lines: usize,
    ) -> impl Fn(String) -> std::future::Ready<Result<LogRead, String>> + use<> {
        let reads = reads.clone();
        move |drv| {
            let n = reads.count.fetch_add(1, Ordering::SeqCst) + 1;
            reads.by.lock().unwrap().push(who);
            let text = (1..=n.min(lines)).map(|i| format!("{drv} line {i}\n")).collect();
            std::future::ready(Ok(LogRead { text, running: n < lines }))
        }
    }

    async fn next(following: &mut Following) -> Option<Arc<LogRead>> {
        let changed = tokio::time::timeout(Duration::from_secs(10), following.changed());
        changed.await.expect("a read within 10 s").ok()?;
        Some(following.borrow_and_update().clone().expect("no empty read is sent"))
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        for _ in 0..1000 {
            if done() {
                return;
            }
            tokio::time::sleep(EVERY).await;
        }
        panic!("{what}: not within 10 s");
    }

    #[tokio::test]
    async fn followers_of_one_log_share_its_reader() {
        let feeds = feeds();
        let reads = Arc::new(Reads::default());
        let mut first = feeds.follow("/a.drv", growing(&reads, 0, usize::MAX));
        let seen = next(&mut first).await.expect("a first read");
        assert!(seen.text.starts_with("/a.drv line 1\n"), "{}", seen.text);
        let mut followers: Vec<_> =
            (1..=50).map(|who| feeds.follow("/a.drv", growing(&reads, who, usize::MAX))).collect();
        // A new follower is given the newest read at once, then each new one.
        for f in &mut followers {
            assert!(next(f).await.expect("the newest read").text.starts_with(&seen.text));
        }
        let now = reads.count.load(Ordering::SeqCst);
        until("five more reads", || reads.count.load(Ordering::SeqCst) >= now + 5).await;
        for f in &mut followers {
            assert!(next(f).await.expect("a later read").text.len() > seen.text.len());
        }
        assert!(
            reads.by.lock().unwrap().iter().all(|&who| who == 0),
            "only the first follower's reader reads"
        );
        assert_eq!(feeds.readers(), 1);
        // Another log has a reader of its own.
        let other_reads = Arc::new(Reads::default());
        let mut other = feeds.follow("/b.drv", growing(&other_reads, 0, usize::MAX));
        assert_eq!(next(&mut other).await.unwrap().text, "/b.drv line 1\n");
        assert_eq!(feeds.readers(), 2);
        // When every follower has left, the reader stops and leaves.
        drop((first, followers));
        until("the reader gone", || feeds.readers() == 1).await;
        let stopped = reads.count.load(Ordering::SeqCst);
        tokio::time::sleep(EVERY * 10).await;
        assert_eq!(reads.count.load(Ordering::SeqCst), stopped, "a log no one follows is not read");
        assert!(other_reads.count.load(Ordering::SeqCst) > 1, "the other log is still read");
    }

    #[tokio::test]
    async fn a_new_follower_is_shown_a_quiet_log_at_once() {
        let feeds = feeds();
        let quiet =
            |_| std::future::ready(Ok(LogRead { text: "waiting for a lock\n".into(), running: true }));
        let mut first = feeds.follow("d", quiet);
        assert_eq!(next(&mut first).await.unwrap().text, "waiting for a lock\n");
        tokio::time::sleep(EVERY * 3).await;
        let mut second = feeds.follow("d", quiet);
        let shown = tokio::time::timeout(EVERY * 50, next(&mut second)).await;
        assert_eq!(shown.expect("the log at once").unwrap().text, "waiting for a lock\n");
    }

    #[tokio::test]
    async fn followers_see_the_end_then_the_feed_closes() {
        let feeds = feeds();
        let reads = Arc::new(Reads::default());
        let mut a = feeds.follow("d", growing(&reads, 0, 3));
        let mut b = feeds.follow("d", growing(&reads, 1, 3));
        let mut last = (None, None);
        while let Some(read) = next(&mut a).await {
            last.0 = Some(read);
        }
        while let Some(read) = next(&mut b).await {
            last.1 = Some(read);
        }
        let (a_last, b_last) = (last.0.expect("a read"), last.1.expect("a read"));
        assert_eq!(a_last.text, "d line 1\nd line 2\nd line 3\n");
        assert!(!a_last.running && a_last == b_last);
        assert_eq!(reads.count.load(Ordering::SeqCst), 3);
        assert_eq!(feeds.readers(), 0);
        // A page that comes later reads the ended log once more.
        let mut late = feeds.follow("d", growing(&reads, 2, 3));
        assert!(!next(&mut late).await.expect("the ended log").running);
        assert_eq!(next(&mut late).await, None);
        assert_eq!(*reads.by.lock().unwrap(), [0, 0, 0, 2]);
    }

    #[tokio::test]
    async fn a_log_that_cannot_be_read_closes_the_feed() {
        let feeds = feeds();
        let mut f = feeds.follow("d", |_| std::future::ready(Err::<LogRead, _>("database down".to_owned())));
        assert_eq!(next(&mut f).await, None);
        assert_eq!(feeds.readers(), 0);
    }
}
