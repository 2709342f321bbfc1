//! Logins to the status pages: random session ids kept in memory, each with its user's name
//! and when it ends, carried by an `HttpOnly` cookie.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};

/// The cookie that carries a session.
pub(super) const COOKIE: &str = "fleetcache_session";
/// How long a login lasts.
pub(super) const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most (the oldest go first).
const MAX_SESSIONS: usize = 10_000;

/// Logins: random ids, each with its user's name and when it ends.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<String, (String, Instant)>>,
}

impl Sessions {
    pub(super) fn start(&self, user: &str) -> String {
        let mut id = [0u8; 32];
        getrandom::fill(&mut id).expect("the system's random source");
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let mut inner = self.inner.lock().expect("sessions lock");
        let now = Instant::now();
        inner.retain(|_, (_, until)| *until > now);
        if inner.len() >= MAX_SESSIONS
            && let Some(oldest) = inner.iter().min_by_key(|(_, (_, until))| *until).map(|(k, _)| k.clone())
        {
            inner.remove(&oldest);
        }
        inner.insert(id.clone(), (user.to_owned(), now + SESSION_LIFETIME));
        id
    }

    pub(super) fn user(&self, id: &str) -> Option<String> {
        let inner = self.inner.lock().expect("sessions lock");
        inner.get(id).filter(|(_, until)| *until > Instant::now()).map(|(name, _)| name.clone())
    }

    pub(super) fn end(&self, id: &str) {
        self.inner.lock().expect("sessions lock").remove(id);
    }
}

pub(super) fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_and_are_random() {
        let s = Sessions::default();
        let (a, b) = (s.start("alice"), s.start("bob"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(s.user(&a).as_deref(), Some("alice"));
        s.end(&a);
        assert_eq!(s.user(&a), None);
        assert_eq!(s.user("forged"), None);
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, format!("x=1; {COOKIE}={b}").parse().unwrap());
        assert_eq!(session_id(&h), Some(b.as_str()));
    }
}
