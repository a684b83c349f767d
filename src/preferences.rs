//! User preferences on the request path (between parse and route): the default model
//! when a request names none, `max_tokens` and `temperature` when it sets none.
//!
//! Read from `user_preferences` through a per-user cache in memory, never with a
//! PostgreSQL query per request: a user's row is loaded on their first request (that
//! request waits at most `preferences.load_timeout_ms`, then goes on without), used
//! for `preferences.cache_ttl_ms`, then reloaded in the background while the cached
//! copy keeps serving. A change therefore shows within the TTL plus one load; while
//! PostgreSQL is down the last copy keeps serving.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use uuid::Uuid;

use crate::config::PreferencesConfig;
use crate::db::Db;

/// What the cache needs from the running gateway to reload an entry in the background:
/// the database, the tracker of the tasks shutdown waits for, and the cache itself
/// (reached again from that task). The gateway's `AppState` is one; this module sits
/// below it, so it names only this.
pub trait Host: Clone + Send + Sync + 'static {
    fn db(&self) -> &Db;
    fn tasks(&self) -> &tokio_util::task::TaskTracker;
    fn preferences(&self) -> &PreferenceCache;
}

/// What a user's `user_preferences` row says.
#[derive(Debug, Clone, PartialEq)]
pub struct Preferences {
    pub default_model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
}

struct Entry {
    /// `None`: the user has no row (or it could not be loaded).
    prefs: Option<Arc<Preferences>>,
    fresh_until: Instant,
    refreshing: bool,
}

const SHARDS: usize = 16;

pub struct PreferenceCache {
    shards: Vec<RwLock<HashMap<Uuid, Entry>>>,
    cfg: PreferencesConfig,
}

impl PreferenceCache {
    pub fn new(cfg: &PreferencesConfig) -> PreferenceCache {
        PreferenceCache {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            cfg: cfg.clone(),
        }
    }

    fn shard(&self, user: &Uuid) -> &RwLock<HashMap<Uuid, Entry>> {
        &self.shards[(user.as_u128() % SHARDS as u128) as usize]
    }

    /// The user's preferences. Fresh: from memory. Stale: from memory, and one
    /// background reload starts. Unknown: loaded now (bounded by the load timeout).
    pub async fn get(&self, state: &impl Host, user: Uuid) -> Option<Arc<Preferences>> {
        let now = Instant::now();
        let shard = self.shard(&user);
        let stale = {
            let map = shard.read().unwrap_or_else(|p| p.into_inner());
            match map.get(&user) {
                Some(e) if now < e.fresh_until => return e.prefs.clone(),
                Some(e) => Some((e.prefs.clone(), e.refreshing)),
                None => None,
            }
        };
        match stale {
            Some((prefs, true)) => prefs,
            Some((prefs, false)) => {
                let claimed = {
                    let mut map = shard.write().unwrap_or_else(|p| p.into_inner());
                    match map.get_mut(&user) {
                        Some(e) if !e.refreshing && now >= e.fresh_until => {
                            e.refreshing = true;
                            true
                        }
                        _ => false,
                    }
                };
                if claimed {
                    let st = state.clone();
                    state.tasks().spawn(async move {
                        st.preferences().load_and_store(st.db(), user).await;
                    });
                }
                prefs
            }
            None => self.load_and_store(state.db(), user).await,
        }
    }

    /// Loads the user's row and caches it. A failed load keeps what was cached (or
    /// caches "none"), to be tried again after a TTL.
    async fn load_and_store(&self, db: &Db, user: Uuid) -> Option<Arc<Preferences>> {
        let loaded = tokio::time::timeout(self.cfg.load_timeout, load(db, user)).await;
        let shard = self.shard(&user);
        let mut map = shard.write().unwrap_or_else(|p| p.into_inner());
        let prefs = match loaded {
            Ok(Ok(p)) => p.map(Arc::new),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "user preferences not loaded; going on without");
                map.get(&user).and_then(|e| e.prefs.clone())
            }
            Err(_) => {
                tracing::warn!("user preferences not loaded in time; going on without");
                map.get(&user).and_then(|e| e.prefs.clone())
            }
        };
        let per_shard = (self.cfg.cache_entries / SHARDS).max(1);
        if map.len() >= per_shard && !map.contains_key(&user) {
            let now = Instant::now();
            map.retain(|_, e| now < e.fresh_until || e.refreshing);
            if map.len() >= per_shard {
                map.clear();
            }
        }
        map.insert(
            user,
            Entry {
                prefs: prefs.clone(),
                fresh_until: Instant::now() + self.cfg.cache_ttl,
                refreshing: false,
            },
        );
        prefs
    }

    /// Forgets a user's cached row (after this gateway changed it).
    pub fn invalidate(&self, user: &Uuid) {
        self.shard(user)
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user);
    }
}

/// Why a user's preferences were not read (logged; the request goes on without them).
#[derive(Debug, thiserror::Error)]
enum LoadError {
    /// No connection.
    #[error(transparent)]
    Pool(#[from] crate::db::DbError),
    /// The query failed.
    #[error(transparent)]
    Query(#[from] tokio_postgres::Error),
}

async fn load(db: &Db, user: Uuid) -> Result<Option<Preferences>, LoadError> {
    let conn = db.get().await?;
    let row = conn
        .query_opt(
            "SELECT default_model_id, max_tokens::bigint, temperature::float8
               FROM user_preferences WHERE user_id = $1",
            &[&user],
        )
        .await?;
    Ok(row.map(|r| Preferences {
        default_model: r.get(0),
        max_tokens: r.get(1),
        temperature: r.get(2),
    }))
}
