//! Disabled users and revoked sign-ins, in memory: what lets an already-issued access
//! token stop working without a database call per request. A background task
//! ([`crate::oauth::revocation::run`]) reloads both sets from PostgreSQL every
//! `oauth.revocation_refresh_ms`; the request path does one lookup in each (after the
//! token verified, or came from the cache).

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use uuid::Uuid;

use crate::authenticate::Principal;
use crate::db::{Db, DbError};

#[derive(Default)]
struct Sets {
    users: HashSet<Uuid>,
    sessions: HashSet<Uuid>,
}

#[derive(Default)]
pub struct Revocations {
    sets: ArcSwap<Sets>,
}

impl Revocations {
    /// Whether the principal's user is disabled or its sign-in revoked.
    pub fn is_revoked(&self, p: &Principal) -> bool {
        let sets = self.sets.load();
        if sets.users.is_empty() && sets.sessions.is_empty() {
            return false;
        }
        sets.users.contains(&p.user_id) || p.session.is_some_and(|s| sets.sessions.contains(&s))
    }

    /// Marks a sign-in revoked here at once (other replicas see it at their next reload).
    pub fn revoke_session(&self, session: Uuid) {
        self.sets.rcu(|cur| {
            let mut sessions = cur.sessions.clone();
            sessions.insert(session);
            Arc::new(Sets {
                users: cur.users.clone(),
                sessions,
            })
        });
    }

    /// Reloads both sets. Sign-ins revoked longer ago than `window_secs` (the access
    /// token lifetime plus leeway) can have no live access token left and are dropped.
    pub async fn refresh(&self, db: &Db, window_secs: u64) -> Result<(usize, usize), DbError> {
        let conn = db.get().await?;
        let users: HashSet<Uuid> = conn
            .query(
                "SELECT id FROM users WHERE NOT is_active OR deleted_at IS NOT NULL",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let window = i64::try_from(window_secs).unwrap_or(i64::MAX);
        let sessions: HashSet<Uuid> = conn
            .query(
                "SELECT DISTINCT family_id FROM oauth_refresh_tokens
                  WHERE revoked_at > now() - make_interval(secs => $1::bigint::double precision)",
                &[&window],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let counts = (users.len(), sessions.len());
        self.sets.store(Arc::new(Sets { users, sessions }));
        Ok(counts)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn revoked_sessions_are_refused_others_not() {
        let r = Revocations::default();
        let s = Uuid::new_v4();
        let p = |session| Principal {
            user_id: Uuid::new_v4(),
            client_id: "c".into(),
            scope: "".into(),
            session,
        };
        assert!(!r.is_revoked(&p(Some(s))));
        r.revoke_session(s);
        assert!(r.is_revoked(&p(Some(s))));
        assert!(!r.is_revoked(&p(Some(Uuid::new_v4()))));
        assert!(!r.is_revoked(&p(None)));
    }
}
