//! The console's sign-in sessions, in memory: a session is lost when the bridge restarts (the
//! operator signs in again), and bounded in number, so that signing in again and again cannot
//! grow the bridge.
//!
//! The cookie holds a random 256-bit id; the table is keyed by its SHA-256, so that neither a
//! lookup's timing nor a dump of the table gives a usable id. Each session has its own CSRF
//! token, which every request that changes something must send back in [`CSRF_HEADER`]: a page
//! of another site can make the browser send the cookie, but cannot read the token.

use std::collections::HashMap;
use std::sync::Mutex;

use schemas::{OpsId, Secret, UnixMillis};

/// The cookie that carries the session id.
pub const COOKIE: &str = "bridge_console";
/// The header a cookie-authenticated change must carry, holding the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts after sign-in (a working night).
pub const SESSION_MS: u64 = 8 * 3600 * 1000;
/// Sessions held at once; past it the one closest to expiry is ended.
pub const MAX_SESSIONS: usize = 1024;

/// Who signed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// With the admin token: may do everything.
    Admin,
    /// With an ops login: sees everything, changes nothing.
    Ops(OpsId),
}

#[derive(Debug, Clone)]
pub struct Session {
    pub viewer: Viewer,
    pub csrf: Secret,
    pub expires_at: UnixMillis,
}

#[derive(Debug, Default)]
pub struct Sessions {
    by_hash: Mutex<HashMap<[u8; 32], Session>>,
}

fn hash(id: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.by_hash.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session for `viewer`: its id (for the cookie) and the session.
    pub fn start(&self, viewer: Viewer, now: UnixMillis) -> (Secret, Session) {
        let id = Secret::from_random(rand::random());
        let session = Session {
            viewer,
            csrf: Secret::from_random(rand::random()),
            expires_at: now.saturating_add_ms(SESSION_MS),
        };
        let mut table = self.lock();
        if table.len() >= MAX_SESSIONS {
            table.retain(|_, s| s.expires_at > now);
        }
        if table.len() >= MAX_SESSIONS
            && let Some(soonest) = table
                .iter()
                .min_by_key(|(_, s)| s.expires_at)
                .map(|(k, _)| *k)
        {
            table.remove(&soonest);
        }
        table.insert(hash(id.expose()), session.clone());
        (id, session)
    }

    /// The session with this id, if it has not expired (an expired one is forgotten).
    pub fn get(&self, id: &str, now: UnixMillis) -> Option<Session> {
        let key = hash(id);
        let mut table = self.lock();
        match table.get(&key) {
            Some(s) if s.expires_at > now => Some(s.clone()),
            Some(_) => {
                table.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn end(&self, id: &str) {
        self.lock().remove(&hash(id));
    }

    /// Ends every session of an ops login (it was revoked).
    pub fn end_ops(&self, ops: &OpsId) {
        self.lock()
            .retain(|_, s| !matches!(&s.viewer, Viewer::Ops(id) if id == ops));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: UnixMillis = UnixMillis(1_000_000);

    #[test]
    fn a_session_lasts_until_it_expires_or_ends() {
        let sessions = Sessions::default();
        let (id, started) = sessions.start(Viewer::Admin, T0);
        let got = sessions.get(id.expose(), T0).unwrap();
        assert_eq!(got.viewer, Viewer::Admin);
        assert_eq!(got.csrf.expose(), started.csrf.expose());
        assert!(sessions.get("another", T0).is_none());
        let late = T0.saturating_add_ms(SESSION_MS);
        assert!(sessions.get(id.expose(), late).is_none());
        assert_eq!(sessions.len(), 0, "an expired session is forgotten");

        let (id, _) = sessions.start(Viewer::Admin, T0);
        sessions.end(id.expose());
        assert!(sessions.get(id.expose(), T0).is_none());
    }

    #[test]
    fn the_table_is_bounded_and_a_revoked_login_loses_its_sessions() {
        let sessions = Sessions::default();
        let ops = OpsId::from_random([7; 8]);
        let (first, _) = sessions.start(Viewer::Ops(ops.clone()), T0);
        for n in 1..=MAX_SESSIONS as u64 {
            sessions.start(Viewer::Admin, T0.saturating_add_ms(n));
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert!(
            sessions.get(first.expose(), T0).is_none(),
            "the session closest to expiry made room"
        );
        let (kept, _) = sessions.start(Viewer::Ops(ops.clone()), T0.saturating_add_ms(5000));
        assert!(sessions.get(kept.expose(), T0).is_some());
        sessions.end_ops(&ops);
        assert!(sessions.get(kept.expose(), T0).is_none());
        assert_eq!(sessions.len(), MAX_SESSIONS - 1);
    }
}
