//! The live credit ledger in Redis: balances, holds, settled-but-unflushed charges and
//! the usage streams, changed only by the Lua scripts in `src/lua/ledger_*.lua` (one
//! round trip each, atomic; never GET-then-SET).
//!
//! Keys for user `u` in bucket `b = fnv1a(u) mod buckets` (all share the hash tag
//! `{bN}`, so every script touches one Redis Cluster slot), named by [`KeyLayout`]:
//!
//! | key                        | type   | holds                                                  |
//! |----------------------------|--------|--------------------------------------------------------|
//! | `P{bN}:acct:u`             | hash   | `bal`: spendable credits (granted − charged − held);   |
//! |                            |        | `h:<request id>` → `amount:expires_at_ms` (holds);     |
//! |                            |        | `exp`: no hold expires before this (ms)                |
//! | `P{bN}:pend:u`             | hash   | request id → cost, settled and not yet in PostgreSQL   |
//! | `P{bN}:cred:u`             | hash   | credits row id → total, the rows `bal` reflects        |
//! | `P{bN}:usage`              | stream | usage events of the bucket, read by the flushers       |
//!
//! `acct` and `cred` are created together by [`Ledger::load`] and never expire
//! (Redis must run with `maxmemory-policy noeviction`). `pend` outlives them, so a
//! balance rebuilt from PostgreSQL never forgets a charge that is settled but not flushed.

use redis::aio::ConnectionManager;
use redis::Script;
use uuid::Uuid;

use crate::db::Db;

// The scripts, one file each under src/lua/; each file's header says what it does, its
// KEYS, ARGV and answer.

/// The hot-path operations (reserve, settle) as Lua functions, run by the batch.
const HOT_FUNCTIONS: &str = include_str!("lua/ledger_functions.lua");
/// Many reserves and settles of one bucket in one call (group commit), after
/// [`HOT_FUNCTIONS`].
const BATCH_CALL: &str = include_str!("lua/ledger_batch.lua");
const RELEASE: &str = include_str!("lua/ledger_release.lua");
const EXTEND: &str = include_str!("lua/ledger_extend.lua");
const LOAD: &str = include_str!("lua/ledger_load.lua");
const GRANT: &str = include_str!("lua/ledger_grant.lua");
const ACK: &str = include_str!("lua/ledger_ack.lua");

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Db(#[from] crate::db::DbError),
    /// The balance could not be rebuilt consistently (flushes kept racing the load).
    #[error("balance load kept racing the usage flush")]
    Contended,
}

impl From<tokio_postgres::Error> for LedgerError {
    fn from(e: tokio_postgres::Error) -> Self {
        LedgerError::Db(e.into())
    }
}

/// A balance could not be loaded into the credit ledger: 503, "credit ledger is
/// temporarily unavailable", the cause logged.
impl From<LedgerError> for crate::error::ApiError {
    fn from(e: LedgerError) -> Self {
        crate::error::ApiError::unavailable("credit ledger", e)
    }
}

/// The outcome of a reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Held `hold` credits; the request may produce at most `max_tokens` tokens.
    Admitted {
        hold: i64,
        max_tokens: i64,
        balance: i64,
    },
    Insufficient {
        balance: i64,
    },
    /// The balance is not in Redis yet: load it, then reserve again.
    NeedsLoad,
    /// The user's subscription is expired or suspended: nothing is admitted.
    Inactive,
}

/// What a reserve asks to hold: `ceil((prompt_tokens + max_tokens) × price_per_1k / 1000)`.
#[derive(Debug, Clone, Copy)]
pub struct HoldRequest {
    /// The model's highest rate of any token kind, so the hold covers any mix.
    pub price_per_1k: i64,
    pub prompt_tokens: i64,
    pub max_tokens: i64,
    /// Lower `max_tokens` to what the balance affords, but not below this.
    pub min_tokens: i64,
    pub ttl_ms: u64,
}

/// A user's live account (see [`Ledger::account`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    /// Spendable now: granted − charged − held.
    pub balance: i64,
    /// Held by requests in flight.
    pub held: i64,
    /// Total of the credit rows the balance reflects.
    pub granted: i64,
}

/// A user's live account with its unflushed charges (see [`Ledger::live`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// Spendable now.
    pub balance: i64,
    /// Held by requests in flight.
    pub held: i64,
    /// Settled and not yet acknowledged as flushed: request id → cost.
    pub pending: Vec<(Uuid, i64)>,
}

/// The balance (`None`: not loaded) and the sum of the holds in an account hash's fields.
fn balance_and_held(acct: &[(String, String)]) -> (Option<i64>, i64) {
    let mut balance = None;
    let mut held = 0i64;
    for (f, v) in acct {
        if f == "bal" {
            balance = v.parse::<i64>().ok();
        } else if let Some(amount) = f
            .strip_prefix("h:")
            .and_then(|_| v.split(':').next())
            .and_then(|a| a.parse::<i64>().ok())
        {
            held = held.saturating_add(amount);
        }
    }
    (balance, held)
}

/// `s` with Redis glob characters escaped, for a SCAN pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The outcome of a settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Charged and recorded; the spendable balance right after, `None` when the
    /// balance is not loaded.
    Charged { balance: Option<i64> },
    /// This request was already settled: nothing changed.
    Already,
}

/// Redis keys of one user.
pub struct UserKeys {
    pub acct: String,
    pub pend: String,
    pub cred: String,
    pub stream: String,
}

/// The key layout of the module doc for one key prefix (`P`) and bucket count: the
/// bucket of a user and the names of its keys. It needs no connection, so code that
/// must name the ledger's keys outside a [`Ledger`] (the integration tests' harness)
/// asks it instead of writing the layout again.
#[derive(Debug, Clone)]
pub struct KeyLayout {
    prefix: String,
    buckets: u32,
}

impl KeyLayout {
    pub fn new(prefix: &str, buckets: u32) -> KeyLayout {
        KeyLayout {
            prefix: prefix.to_owned(),
            buckets,
        }
    }

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    pub fn bucket_of(&self, user: &Uuid) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        for b in user.as_bytes() {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
        h % self.buckets
    }

    /// `P{bN}`: the prefix and hash tag every key of bucket `N` starts with.
    fn tag(&self, bucket: u32) -> String {
        format!("{}{{b{bucket}}}", self.prefix)
    }

    pub fn stream_key(&self, bucket: u32) -> String {
        format!("{}{{b{bucket}}}:usage", self.prefix)
    }

    pub fn pend_key(&self, bucket: u32, user: &str) -> String {
        format!("{}{{b{bucket}}}:pend:{user}", self.prefix)
    }

    /// The account hash of a user (balance and holds): all the hot path's reserve needs.
    pub fn acct_key(&self, user: &Uuid) -> String {
        format!("{}{{b{}}}:acct:{user}", self.prefix, self.bucket_of(user))
    }

    pub fn keys(&self, user: &Uuid) -> UserKeys {
        let tag = self.tag(self.bucket_of(user));
        UserKeys {
            acct: format!("{tag}:acct:{user}"),
            pend: format!("{tag}:pend:{user}"),
            cred: format!("{tag}:cred:{user}"),
            stream: format!("{tag}:usage"),
        }
    }
}

#[derive(Clone)]
pub struct Ledger {
    client: redis::Client,
    conn: ConnectionManager,
    /// Reserves and settles go through the group-commit task...
    ops: tokio::sync::mpsc::Sender<Op>,
    /// ...unless no call is in flight: then the caller runs its op itself.
    group: std::sync::Arc<GroupCommit>,
    layout: KeyLayout,
    load: Script,
    grant: Script,
    ack: Script,
    /// The balance each user had in the last answer this gateway got (a hint for
    /// speculation, never for admission).
    known: std::sync::Arc<KnownBalances>,
}

impl Ledger {
    pub async fn connect(
        url: &str,
        prefix: &str,
        buckets: u32,
    ) -> Result<Ledger, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let (conn, ops, group) = Self::hot_connection(&client).await?;
        Ok(Ledger {
            client,
            conn,
            ops,
            group,
            layout: KeyLayout::new(prefix, buckets),
            load: Script::new(LOAD),
            grant: Script::new(GRANT),
            ack: Script::new(ACK),
            known: std::sync::Arc::new(KnownBalances::default()),
        })
    }

    /// A connection and its group-commit task, on the current runtime.
    async fn hot_connection(
        client: &redis::Client,
    ) -> Result<
        (
            ConnectionManager,
            tokio::sync::mpsc::Sender<Op>,
            std::sync::Arc<GroupCommit>,
        ),
        redis::RedisError,
    > {
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(5)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), cfg).await?;
        let (ops, rx) = tokio::sync::mpsc::channel(4096);
        let group = std::sync::Arc::new(GroupCommit::new(conn.clone()));
        tokio::spawn(group.clone().run(rx));
        Ok((conn, ops, group))
    }

    /// The same ledger over a connection of its own, driven by the current runtime (a
    /// worker thread's): its reserves and settles never wake another thread.
    pub async fn for_this_thread(&self) -> Result<Ledger, redis::RedisError> {
        let (conn, ops, group) = Self::hot_connection(&self.client).await?;
        Ok(Ledger {
            conn,
            ops,
            group,
            ..self.clone()
        })
    }

    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub fn buckets(&self) -> u32 {
        self.layout.buckets()
    }

    pub fn bucket_of(&self, user: &Uuid) -> u32 {
        self.layout.bucket_of(user)
    }

    pub fn stream_key(&self, bucket: u32) -> String {
        self.layout.stream_key(bucket)
    }

    pub fn pend_key(&self, bucket: u32, user: &str) -> String {
        self.layout.pend_key(bucket, user)
    }

    /// The account hash of a user (balance and holds): all the hot path's reserve needs.
    pub fn acct_key(&self, user: &Uuid) -> String {
        self.layout.acct_key(user)
    }

    pub fn keys(&self, user: &Uuid) -> UserKeys {
        self.layout.keys(user)
    }

    /// Admits the request only if the balance covers `ceil((prompt + max_tokens) ×
    /// price / 1000)`; if not, lowers `max_tokens` to what the balance affords when that
    /// is at least `min_tokens`. Holds the amount under `rid` until settle, release or
    /// `ttl_ms`.
    pub async fn reserve(
        &self,
        user: &Uuid,
        rid: &Uuid,
        h: &HoldRequest,
    ) -> Result<Reserve, redis::RedisError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let acct = self.acct_key(user);
        let op = Op::Reserve {
            bucket: self.bucket_of(user),
            acct: acct.clone(),
            rid: rid.to_string(),
            h: *h,
            reply,
        };
        // If this future is dropped before it has read the answer (the request was
        // cancelled), the guard releases a hold that may have been taken for nobody.
        let mut guard = CancelledReserve {
            rx: Some(rx),
            conn: self.conn.clone(),
            acct,
            rid: *rid,
        };
        self.submit(op).await?;
        let r = match guard.rx.as_mut() {
            Some(rx) => rx.await,
            None => return Err(gone()),
        };
        guard.rx = None;
        let r = r.map_err(|_| gone())??;
        let outcome = match r.first().copied().unwrap_or(-1) {
            1 => Reserve::Admitted {
                hold: r.get(1).copied().unwrap_or(0),
                max_tokens: r.get(2).copied().unwrap_or(0),
                balance: r.get(3).copied().unwrap_or(0),
            },
            0 => Reserve::Insufficient {
                balance: r.get(3).copied().unwrap_or(0),
            },
            -2 => Reserve::Inactive,
            _ => Reserve::NeedsLoad,
        };
        match outcome {
            Reserve::Admitted { balance, .. } | Reserve::Insufficient { balance } => {
                self.known.note(user, balance)
            }
            Reserve::NeedsLoad | Reserve::Inactive => self.known.forget(user),
        }
        Ok(outcome)
    }

    /// Whether a request holding about `hold` may be sent upstream before its hold is
    /// taken: only if the last balance this gateway saw for the user covers
    /// [`SPECULATION_MARGIN`] times it. Counts the hold against that figure, so
    /// concurrent requests of one user do not all speculate on the same credits. A
    /// hint only: the hold itself is what admits the request.
    pub fn may_speculate(&self, user: &Uuid, hold: i64) -> bool {
        self.known.take(user, hold)
    }

    /// Runs `op` at once when the ledger is idle (no queue hop at low load), or queues
    /// it for the next group commit. The answer arrives on the op's reply channel.
    async fn submit(&self, op: Op) -> Result<(), redis::RedisError> {
        if self
            .group
            .in_flight
            .load(std::sync::atomic::Ordering::Acquire)
            == 0
        {
            self.group.commit(vec![op]).await;
            return Ok(());
        }
        self.ops.send(op).await.map_err(|_| gone())
    }

    /// Charges `cost`, releases the rest of the hold and appends `event` (the encoded
    /// usage event) to the bucket's stream, atomically. Returns false if this request
    /// was already settled.
    pub async fn settle(
        &self,
        user: &Uuid,
        rid: &Uuid,
        cost: i64,
        event: &str,
    ) -> Result<bool, redis::RedisError> {
        Ok(matches!(
            self.settle_balance(user, rid, cost, event).await?,
            Settled::Charged { .. }
        ))
    }

    /// [`Ledger::settle`], returning what it did: charged (with the spendable balance
    /// right after, from the same script call) or nothing, the request being settled
    /// already.
    pub async fn settle_balance(
        &self,
        user: &Uuid,
        rid: &Uuid,
        cost: i64,
        event: &str,
    ) -> Result<Settled, redis::RedisError> {
        let b = self.bucket_of(user);
        let tag = self.layout.tag(b);
        let (reply, rx) = tokio::sync::oneshot::channel();
        let op = Op::Settle {
            bucket: b,
            acct: format!("{tag}:acct:{user}"),
            pend: format!("{tag}:pend:{user}"),
            stream: format!("{tag}:usage"),
            rid: rid.to_string(),
            cost,
            event: event.to_owned(),
            reply,
        };
        self.submit(op).await?;
        let r = rx.await.map_err(|_| gone())??;
        Ok(match r.first().copied() {
            Some(1) => {
                let balance = r.get(1).copied().unwrap_or(0);
                self.known.note(user, balance);
                Settled::Charged {
                    balance: Some(balance),
                }
            }
            Some(2) => Settled::Charged { balance: None },
            _ => Settled::Already,
        })
    }

    /// Returns a hold to the balance (a failed request charges nothing).
    pub async fn release(&self, user: &Uuid, rid: &Uuid) -> Result<bool, redis::RedisError> {
        let n: i64 = RELEASE_SCRIPT
            .key(self.acct_key(user))
            .arg(rid.to_string())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n == 1)
    }

    /// Keeps a running request's hold from expiring for another `ttl_ms` (holds expire
    /// only so that a crashed gateway's come back). Returns whether the hold exists.
    pub async fn extend(
        &self,
        user: &Uuid,
        rid: &Uuid,
        ttl_ms: u64,
    ) -> Result<bool, redis::RedisError> {
        let n: i64 = EXTEND_SCRIPT
            .key(self.acct_key(user))
            .arg(rid.to_string())
            .arg(ttl_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n == 1)
    }

    /// Applies a credits row committed in PostgreSQL to a balance already in Redis
    /// (a no-op for a balance not loaded yet, which will read the row itself).
    pub async fn grant(
        &self,
        user: &Uuid,
        credit_id: &Uuid,
        amount: i64,
    ) -> Result<bool, redis::RedisError> {
        let k = self.keys(user);
        let (applied, _): (i64, i64) = self
            .grant
            .key(&k.acct)
            .key(&k.cred)
            .arg(credit_id.to_string())
            .arg(amount)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(applied == 1)
    }

    /// Whether `rid` is settled and not yet flushed.
    pub async fn is_pending(&self, user: &Uuid, rid: &Uuid) -> Result<bool, redis::RedisError> {
        let k = self.pend_key(self.bucket_of(user), &user.to_string());
        redis::cmd("HEXISTS")
            .arg(k)
            .arg(rid.to_string())
            .query_async(&mut self.conn.clone())
            .await
    }

    /// The user's spendable balance, if it is loaded.
    pub async fn balance(&self, user: &Uuid) -> Result<Option<i64>, redis::RedisError> {
        redis::cmd("HGET")
            .arg(self.acct_key(user))
            .arg("bal")
            .query_async(&mut self.conn.clone())
            .await
    }

    /// The live account of a user, read atomically: (spendable balance, credits held
    /// by requests in flight, granted credits the balance reflects), or `None` when the
    /// balance is not loaded.
    pub async fn account(&self, user: &Uuid) -> Result<Option<Account>, redis::RedisError> {
        let k = self.keys(user);
        type Fields = Vec<(String, String)>;
        let (acct, cred): (Fields, Fields) = redis::pipe()
            .atomic()
            .cmd("HGETALL")
            .arg(&k.acct)
            .cmd("HGETALL")
            .arg(&k.cred)
            .query_async(&mut self.conn.clone())
            .await?;
        let (balance, held) = balance_and_held(&acct);
        Ok(balance.map(|balance| Account {
            balance,
            held,
            granted: cred.iter().fold(0i64, |t, (_, v)| {
                t.saturating_add(v.parse::<i64>().unwrap_or(0))
            }),
        }))
    }

    /// Loads the balance from PostgreSQL (current credit rows: total − used) minus the
    /// charges settled in Redis but not yet flushed, unless it is already loaded.
    pub async fn load(&self, db: &Db, user: &Uuid) -> Result<i64, LedgerError> {
        match self.set_from_snapshot(db, user, Snapshot::Load).await? {
            Some(bal) => Ok(bal),
            None => Err(LedgerError::Contended),
        }
    }

    /// Brings a loaded balance in line with PostgreSQL after a change of the user's
    /// credits rows (a new period, an expiry, a grant, a correction) or subscription
    /// status, keeping the holds of requests in flight. Returns the new balance, or
    /// `None` when the balance is not loaded (it will read PostgreSQL when it is).
    pub async fn rebase(&self, db: &Db, user: &Uuid) -> Result<Option<i64>, LedgerError> {
        self.set_from_snapshot(db, user, Snapshot::Rebase).await
    }

    async fn set_from_snapshot(
        &self,
        db: &Db,
        user: &Uuid,
        mode: Snapshot,
    ) -> Result<Option<i64>, LedgerError> {
        let k = self.keys(user);
        let mut conn = self.conn.clone();
        for _ in 0..16 {
            let pend: Vec<(String, i64)> = redis::cmd("HGETALL")
                .arg(&k.pend)
                .query_async(&mut conn)
                .await?;
            let ids: Vec<Uuid> = pend
                .iter()
                .filter_map(|(id, _)| Uuid::parse_str(id).ok())
                .collect();
            let cred: Vec<(String, String)> = redis::cmd("HGETALL")
                .arg(&k.cred)
                .query_async(&mut conn)
                .await?;
            // Retired rows (tombstones) are settled for good: not asked about again.
            let cred_ids: Vec<Uuid> = cred
                .iter()
                .filter(|(_, v)| v != TOMBSTONE)
                .filter_map(|(id, _)| Uuid::parse_str(id).ok())
                .collect();
            let client = db.get().await?;
            // One statement, one snapshot: the current credit rows, which pending
            // charges are already flushed, which rows `cred` knows that are no longer
            // current (they must not be counted as new grants), and whether the
            // user's latest subscription admits requests.
            let row = client
                .query_one(
                    "SELECT
                       (SELECT coalesce(json_agg(json_build_array(id, total_credits, used_credits)), '[]'::json)
                          FROM credits WHERE user_id = $1 AND is_current),
                       (SELECT coalesce(array_agg(id), '{}') FROM usage_history WHERE user_id = $1 AND id = ANY($2)),
                       (SELECT coalesce(array_agg(id::text), '{}') FROM credits
                         WHERE user_id = $1 AND id = ANY($3) AND NOT is_current),
                       coalesce((SELECT status::text IN ('expired', 'suspended') FROM subscriptions
                                  WHERE user_id = $1 ORDER BY created_at DESC, id DESC LIMIT 1), false)",
                    &[user, &ids, &cred_ids],
                )
                .await?;
            drop(client);
            let credits: serde_json::Value = row.get(0);
            let flushed: Vec<Uuid> = row.get(1);
            let stale: Vec<String> = row.get(2);
            let inactive: bool = row.get(3);
            let mut available: i64 = 0;
            let mut inv = self.load.prepare_invoke();
            inv.key(&k.acct).key(&k.pend).key(&k.cred);
            let rows = credits.as_array().cloned().unwrap_or_default();
            let mut pairs = Vec::with_capacity(rows.len());
            for r in &rows {
                let id = r
                    .get(0)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned();
                let total = r.get(1).and_then(|v| v.as_i64()).unwrap_or(0);
                let used = r.get(2).and_then(|v| v.as_i64()).unwrap_or(0);
                available = available.saturating_add(total - used);
                pairs.push((id, total));
            }
            inv.arg(mode.as_arg())
                .arg(if inactive { 1 } else { 0 })
                .arg(available)
                .arg(pairs.len());
            for (id, total) in &pairs {
                inv.arg(id.as_str()).arg(*total);
            }
            inv.arg(pend.len());
            for (id, _) in &pend {
                let is_flushed = Uuid::parse_str(id)
                    .map(|u| flushed.contains(&u))
                    .unwrap_or(false);
                inv.arg(id.as_str()).arg(if is_flushed { 1 } else { 0 });
            }
            inv.arg(stale.len());
            for id in &stale {
                inv.arg(id.as_str());
            }
            let (status, bal): (i64, i64) = inv.invoke_async(&mut conn).await?;
            match status {
                1 => {
                    self.known.forget(user);
                    return Ok(Some(bal));
                }
                2 => return Ok(None),
                _ => tokio::task::yield_now().await,
            }
        }
        Err(LedgerError::Contended)
    }

    /// The users whose balance is loaded (a SCAN of the account keys).
    pub async fn loaded_users(&self) -> Result<Vec<Uuid>, redis::RedisError> {
        let pattern = format!("{}{{b*}}:acct:*", glob_escape(&self.layout.prefix));
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut users = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            users.extend(
                keys.iter()
                    .filter_map(|k| k.rsplit_once(":acct:"))
                    .filter_map(|(_, u)| Uuid::parse_str(u).ok()),
            );
            if next == 0 {
                break;
            }
            cursor = next;
        }
        users.sort_unstable();
        users.dedup();
        Ok(users)
    }

    /// A user's live account and unflushed charges, read atomically: `None` when the
    /// balance is not loaded.
    pub async fn live(&self, user: &Uuid) -> Result<Option<Live>, redis::RedisError> {
        let k = self.keys(user);
        type Fields = Vec<(String, String)>;
        let (acct, pend): (Fields, Fields) = redis::pipe()
            .atomic()
            .cmd("HGETALL")
            .arg(&k.acct)
            .cmd("HGETALL")
            .arg(&k.pend)
            .query_async(&mut self.conn.clone())
            .await?;
        let (balance, held) = balance_and_held(&acct);
        Ok(balance.map(|balance| Live {
            balance,
            held,
            pending: pend
                .iter()
                .filter_map(|(id, cost)| Some((Uuid::parse_str(id).ok()?, cost.parse().ok()?)))
                .collect(),
        }))
    }

    /// Forgets a user's live balance (as a Redis loss does): the next use loads it from
    /// PostgreSQL. Unflushed charges (`pend`) are kept, so the load counts them.
    pub async fn forget(&self, user: &Uuid) -> Result<(), redis::RedisError> {
        let k = self.keys(user);
        redis::cmd("DEL")
            .arg(&k.acct)
            .arg(&k.cred)
            .query_async(&mut self.conn.clone())
            .await
    }

    /// Acknowledges and deletes flushed stream entries of one bucket and forgets their
    /// pending charges (PostgreSQL holds them now). `entries` are (entry id, request
    /// id, user id); an entry without a readable event has an empty request id.
    pub async fn ack(
        &self,
        bucket: u32,
        group: &str,
        entries: &[(String, String, String)],
    ) -> Result<i64, redis::RedisError> {
        // In slices, one call after the other: Redis runs one script at a time, and a
        // thousand entries in one call (~0.5 ms) would hold up every reserve and settle
        // behind it. Each slice is whole (its entries and their pending ids).
        let mut acked = 0;
        for slice in entries.chunks(STREAM_SLICE) {
            acked += self.ack_slice(bucket, group, slice).await?;
        }
        Ok(acked)
    }

    async fn ack_slice(
        &self,
        bucket: u32,
        group: &str,
        entries: &[(String, String, String)],
    ) -> Result<i64, redis::RedisError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let (keys, args) = ack_args(
            self.stream_key(bucket),
            |user| self.pend_key(bucket, user),
            group,
            entries,
        );
        let mut inv = self.ack.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        for a in &args {
            inv.arg(a);
        }
        inv.invoke_async(&mut self.conn.clone()).await
    }

    /// Usage events waiting in the streams (all buckets), for `/metrics`.
    pub async fn backlog(&self) -> Result<i64, redis::RedisError> {
        let mut pipe = redis::pipe();
        for b in 0..self.buckets() {
            pipe.cmd("XLEN").arg(self.stream_key(b));
        }
        let lens: Vec<i64> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(lens.iter().sum())
    }

    pub async fn ping(&self) -> Result<(), redis::RedisError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}

/// What `cred` holds for a credits row that is no longer current (see
/// `lua/ledger_load.lua`).
pub const TOMBSTONE: &str = "x";

/// What [`Ledger::set_from_snapshot`] does with a balance.
#[derive(Debug, Clone, Copy)]
enum Snapshot {
    /// Load it unless it is loaded.
    Load,
    /// Rebase it if it is loaded.
    Rebase,
}

impl Snapshot {
    fn as_arg(self) -> &'static str {
        match self {
            Snapshot::Load => "load",
            Snapshot::Rebase => "rebase",
        }
    }
}

/// Stream entries read or acknowledged per Redis call by the flusher (see
/// [`Ledger::ack`] and `flush::Flusher::read`): Redis runs one command at a time, so a
/// bounded slice bounds how long a reserve or settle can wait behind the flusher.
pub const STREAM_SLICE: usize = 64;

/// Speculate only when the last known balance is at least this many times the hold.
pub const SPECULATION_MARGIN: i64 = 4;
/// Users remembered at most; past it the map starts over (it is only a hint).
const KNOWN_CAPACITY: usize = 100_000;

/// The last balance seen per user (see [`Ledger::may_speculate`]).
#[derive(Default)]
struct KnownBalances(std::sync::Mutex<std::collections::HashMap<Uuid, i64>>);

impl KnownBalances {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Uuid, i64>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note(&self, user: &Uuid, balance: i64) {
        let mut m = self.map();
        if m.len() >= KNOWN_CAPACITY && !m.contains_key(user) {
            m.clear();
        }
        m.insert(*user, balance);
    }

    fn forget(&self, user: &Uuid) {
        self.map().remove(user);
    }

    fn take(&self, user: &Uuid, hold: i64) -> bool {
        let mut m = self.map();
        match m.get_mut(user) {
            Some(b) if *b >= 0 && *b >= hold.saturating_mul(SPECULATION_MARGIN) => {
                *b -= hold;
                true
            }
            _ => false,
        }
    }
}

fn gone() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "the ledger's group-commit task has stopped",
    ))
}

/// A reserve or settle waiting for the next group commit.
enum Op {
    Reserve {
        bucket: u32,
        acct: String,
        rid: String,
        h: HoldRequest,
        reply: tokio::sync::oneshot::Sender<Result<Vec<i64>, redis::RedisError>>,
    },
    Settle {
        bucket: u32,
        acct: String,
        pend: String,
        stream: String,
        rid: String,
        cost: i64,
        event: String,
        reply: tokio::sync::oneshot::Sender<Result<Vec<i64>, redis::RedisError>>,
    },
}

impl Op {
    fn bucket(&self) -> u32 {
        match self {
            Op::Reserve { bucket, .. } | Op::Settle { bucket, .. } => *bucket,
        }
    }

    /// Answers the caller. Returns the (acct key, rid) of a hold that was taken for a
    /// caller that is gone (its request was cancelled): the hold must be released.
    fn reply(self, r: Result<Vec<i64>, redis::RedisError>) -> Option<(String, String)> {
        match self {
            Op::Reserve {
                reply, acct, rid, ..
            } => match reply.send(r) {
                Err(Ok(row)) if row.first() == Some(&1) => Some((acct, rid)),
                _ => None,
            },
            Op::Settle { reply, .. } => {
                let _ = reply.send(r);
                None
            }
        }
    }
}

/// The KEYS and ARGV of one batch call of the hot script: an op record per op, in
/// order — `r, acct#, rid, price, p, m, minm, ttl` or `s, acct#, pend#, stream#, rid,
/// cost, event` (# = 1-based index into KEYS; each key listed once).
fn batch_args(group: &[Op]) -> (Vec<&str>, Vec<String>) {
    fn index<'a>(k: &'a str, keys: &mut Vec<&'a str>) -> usize {
        match keys.iter().position(|x| *x == k) {
            Some(i) => i + 1,
            None => {
                keys.push(k);
                keys.len()
            }
        }
    }
    let mut keys: Vec<&str> = Vec::new();
    let mut args: Vec<String> = Vec::with_capacity(group.len() * 8);
    for op in group {
        match op {
            Op::Reserve { acct, rid, h, .. } => {
                let a = index(acct, &mut keys);
                args.extend([
                    "r".to_owned(),
                    a.to_string(),
                    rid.clone(),
                    h.price_per_1k.to_string(),
                    h.prompt_tokens.to_string(),
                    h.max_tokens.to_string(),
                    h.min_tokens.to_string(),
                    h.ttl_ms.to_string(),
                ]);
            }
            Op::Settle {
                acct,
                pend,
                stream,
                rid,
                cost,
                event,
                ..
            } => {
                let a = index(acct, &mut keys);
                let p = index(pend, &mut keys);
                let s = index(stream, &mut keys);
                args.extend([
                    "s".to_owned(),
                    a.to_string(),
                    p.to_string(),
                    s.to_string(),
                    rid.clone(),
                    cost.to_string(),
                    event.clone(),
                ]);
            }
        }
    }
    (keys, args)
}

/// The KEYS and ARGV of one call of the ack script: KEYS the stream, then the pend key
/// (`pend_key(user)`) of each user with a request id to forget; ARGV the group, the
/// number of entries, their ids, then for each pend key in KEYS order the number of
/// its request ids and the ids. Entries with an empty request id (no readable event)
/// are acknowledged and deleted only.
fn ack_args(
    stream: String,
    pend_key: impl Fn(&str) -> String,
    group: &str,
    entries: &[(String, String, String)],
) -> (Vec<String>, Vec<String>) {
    let mut by_user: std::collections::BTreeMap<&str, Vec<&str>> =
        std::collections::BTreeMap::new();
    for (_, rid, user) in entries {
        if !rid.is_empty() {
            by_user.entry(user.as_str()).or_default().push(rid.as_str());
        }
    }
    let mut keys = vec![stream];
    let mut args = Vec::with_capacity(2 + entries.len() * 2 + by_user.len());
    args.push(group.to_owned());
    args.push(entries.len().to_string());
    args.extend(entries.iter().map(|(entry, _, _)| entry.clone()));
    for (user, rids) in &by_user {
        keys.push(pend_key(user));
        args.push(rids.len().to_string());
        args.extend(rids.iter().map(|r| (*r).to_owned()));
    }
    (keys, args)
}

/// Most ops in one script call.
const MAX_BATCH: usize = 256;

/// Group commit: one task takes every reserve and settle queued while the previous
/// call was in flight and runs them as one script call per bucket (all calls of a
/// round pipelined on the connection). At concurrency 1 a batch is one op; under load
/// Redis parses, dispatches and answers once per batch instead of once per request.
struct GroupCommit {
    conn: ConnectionManager,
    source: String,
    script: Script,
    /// Script calls in flight (batches and direct ops).
    in_flight: std::sync::atomic::AtomicUsize,
}

impl GroupCommit {
    fn new(conn: ConnectionManager) -> GroupCommit {
        let source = format!("{HOT_FUNCTIONS}{BATCH_CALL}");
        let script = Script::new(&source);
        GroupCommit {
            conn,
            source,
            script,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    async fn run(self: std::sync::Arc<Self>, mut rx: tokio::sync::mpsc::Receiver<Op>) {
        let mut ops = Vec::with_capacity(MAX_BATCH);
        while let Some(op) = rx.recv().await {
            ops.push(op);
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            self.commit(std::mem::take(&mut ops)).await;
        }
    }

    async fn commit(&self, ops: Vec<Op>) {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _done = InFlight(&self.in_flight);
        let mut groups: std::collections::BTreeMap<u32, Vec<Op>> =
            std::collections::BTreeMap::new();
        for op in ops {
            groups.entry(op.bucket()).or_default().push(op);
        }
        let calls = groups.into_values().map(|group| self.commit_group(group));
        futures_util::future::join_all(calls).await;
    }

    fn command(&self, group: &[Op]) -> redis::Cmd {
        let (keys, args) = batch_args(group);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash())
            .arg(keys.len())
            .arg(&keys)
            .arg(&args);
        cmd
    }

    async fn commit_group(&self, group: Vec<Op>) {
        let cmd = self.command(&group);
        let mut conn = self.conn.clone();
        let mut result: Result<Vec<Vec<i64>>, redis::RedisError> = cmd.query_async(&mut conn).await;
        if matches!(&result, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            // Redis lost its script cache (restart): load it and run the group again.
            // NOSCRIPT means nothing of the group ran.
            let load: Result<String, _> = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(&self.source)
                .query_async(&mut conn)
                .await;
            result = match load {
                Ok(_) => cmd.query_async(&mut conn).await,
                Err(e) => Err(e),
            };
        }
        match result {
            Ok(rows) if rows.len() == group.len() => {
                for (op, row) in group.into_iter().zip(rows) {
                    if let Some((acct, rid)) = op.reply(Ok(row)) {
                        let r: Result<i64, _> = RELEASE_SCRIPT
                            .key(acct)
                            .arg(&rid)
                            .invoke_async(&mut self.conn.clone())
                            .await;
                        if let Err(e) = r {
                            tracing::warn!(request_id = %rid, error = %e, "releasing the hold of a cancelled request failed");
                        }
                    }
                }
            }
            Ok(rows) => {
                let n = rows.len();
                for op in group {
                    let _ = op.reply(Err(redis::RedisError::from((
                        redis::ErrorKind::Parse,
                        "ledger batch answered the wrong number of results",
                        n.to_string(),
                    ))));
                }
            }
            Err(e) => {
                for op in group {
                    let _ = op.reply(Err(e.clone()));
                }
            }
        }
    }
}

/// Decrements the in-flight count however the commit ends (also when cancelled).
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

static RELEASE_SCRIPT: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(RELEASE));

static EXTEND_SCRIPT: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(EXTEND));

/// Owns the answer of a submitted reserve until its caller has read it.
struct CancelledReserve {
    rx: Option<tokio::sync::oneshot::Receiver<Result<Vec<i64>, redis::RedisError>>>,
    conn: ConnectionManager,
    acct: String,
    rid: Uuid,
}

impl Drop for CancelledReserve {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        // Answered with a refusal: nothing is held.
        if let Ok(Ok(row)) = rx.try_recv() {
            if row.first() != Some(&1) {
                return;
            }
        }
        // Admitted but never read, or not answered yet (a reserve sent on this
        // connection runs before this release; one still queued finds its reply channel
        // closed and is released by the group commit): give the hold back. Releasing a
        // hold that does not exist changes nothing.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (mut conn, acct, rid) =
                (self.conn.clone(), std::mem::take(&mut self.acct), self.rid);
            handle.spawn(async move {
                let r: Result<i64, _> = RELEASE_SCRIPT.key(acct).arg(rid.to_string()).invoke_async(&mut conn).await;
                if let Err(e) = r {
                    tracing::warn!(request_id = %rid, error = %e, "releasing the hold of a cancelled request failed");
                }
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::settle::{UsageEvent, OPERATIONS};
    use chrono::{TimeZone, Utc};

    /// An op record of the batch call, as the hot script's batch loop reads it.
    #[derive(Debug, PartialEq)]
    enum Record {
        Reserve {
            acct: String,
            rid: String,
            price: i64,
            p: i64,
            m: i64,
            minm: i64,
            ttl: u64,
        },
        Settle {
            acct: String,
            pend: String,
            stream: String,
            rid: String,
            cost: i64,
            event: String,
        },
    }

    /// Reads KEYS and ARGV the way the batch loop of the hot script does: `r` starts a
    /// reserve record of 8 values, anything else a settle record of 7; `#` values index
    /// KEYS from 1.
    fn read_batch(keys: &[&str], args: &[String]) -> Vec<Record> {
        let key = |i: &String| keys[i.parse::<usize>().unwrap() - 1].to_owned();
        let num = |i: &String| i.parse::<i64>().unwrap();
        let mut out = Vec::new();
        let mut i = 0;
        while i < args.len() {
            if args[i] == "r" {
                out.push(Record::Reserve {
                    acct: key(&args[i + 1]),
                    rid: args[i + 2].clone(),
                    price: num(&args[i + 3]),
                    p: num(&args[i + 4]),
                    m: num(&args[i + 5]),
                    minm: num(&args[i + 6]),
                    ttl: args[i + 7].parse().unwrap(),
                });
                i += 8;
            } else {
                out.push(Record::Settle {
                    acct: key(&args[i + 1]),
                    pend: key(&args[i + 2]),
                    stream: key(&args[i + 3]),
                    rid: args[i + 4].clone(),
                    cost: num(&args[i + 5]),
                    event: args[i + 6].clone(),
                });
                i += 7;
            }
        }
        out
    }

    type Reply = tokio::sync::oneshot::Receiver<Result<Vec<i64>, redis::RedisError>>;

    fn reserve(user: &str, rid: &str, h: HoldRequest) -> (Op, Reply) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let op = Op::Reserve {
            bucket: 3,
            acct: format!("t{{b3}}:acct:{user}"),
            rid: rid.into(),
            h,
            reply,
        };
        (op, rx)
    }

    fn settle(user: &str, rid: &str, cost: i64, event: &str) -> (Op, Reply) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let op = Op::Settle {
            bucket: 3,
            acct: format!("t{{b3}}:acct:{user}"),
            pend: format!("t{{b3}}:pend:{user}"),
            stream: "t{b3}:usage".into(),
            rid: rid.into(),
            cost,
            event: event.into(),
            reply,
        };
        (op, rx)
    }

    fn usage_event(operation: &'static str) -> UsageEvent {
        UsageEvent {
            id: Uuid::now_v7(),
            created_at: Utc
                .timestamp_micros(1_764_000_000_123_456)
                .single()
                .unwrap(),
            user_id: Uuid::new_v4(),
            model_id: "gpt-5".into(),
            operation,
            credits_used: 12,
            input_tokens: 100,
            output_tokens: 20,
            total_tokens: 120,
            duration_ms: 340,
            priced: None,
            metadata: Some(serde_json::json!({"stream": true, "attempts": 2})),
        }
    }

    const HOLD: HoldRequest = HoldRequest {
        price_per_1k: 30,
        prompt_tokens: 1_200,
        max_tokens: 4_096,
        min_tokens: 16,
        ttl_ms: 600_000,
    };

    #[test]
    fn every_op_of_a_batch_reads_back_as_it_was_queued() {
        let events: Vec<UsageEvent> = OPERATIONS.into_iter().map(usage_event).collect();
        let mut ops = vec![reserve("u1", "r1", HOLD).0];
        for (i, e) in events.iter().enumerate() {
            ops.push(settle("u1", &format!("s{i}"), e.credits_used, &e.encode()).0);
        }
        let negative = HoldRequest {
            prompt_tokens: 0,
            max_tokens: -1,
            ttl_ms: u64::MAX,
            ..HOLD
        };
        ops.push(reserve("u2", "r2", negative).0);
        ops.push(settle("u2", "s9", -5, "").0);
        let (keys, args) = batch_args(&ops);
        // Each key once, in order of first use.
        assert_eq!(
            keys,
            [
                "t{b3}:acct:u1",
                "t{b3}:pend:u1",
                "t{b3}:usage",
                "t{b3}:acct:u2",
                "t{b3}:pend:u2"
            ]
        );
        let records = read_batch(&keys, &args);
        assert_eq!(records.len(), ops.len());
        for (op, record) in ops.iter().zip(&records) {
            let expected = match op {
                Op::Reserve { acct, rid, h, .. } => Record::Reserve {
                    acct: acct.clone(),
                    rid: rid.clone(),
                    price: h.price_per_1k,
                    p: h.prompt_tokens,
                    m: h.max_tokens,
                    minm: h.min_tokens,
                    ttl: h.ttl_ms,
                },
                Op::Settle {
                    acct,
                    pend,
                    stream,
                    rid,
                    cost,
                    event,
                    ..
                } => Record::Settle {
                    acct: acct.clone(),
                    pend: pend.clone(),
                    stream: stream.clone(),
                    rid: rid.clone(),
                    cost: *cost,
                    event: event.clone(),
                },
            };
            assert_eq!(*record, expected);
        }
        // The settle record carries the usage event as the flusher decodes it.
        for (e, record) in events.iter().zip(&records[1..]) {
            let Record::Settle { event, .. } = record else {
                panic!("not a settle: {record:?}")
            };
            assert_eq!(UsageEvent::decode(event).as_ref(), Some(e));
        }
    }

    #[test]
    fn a_batch_of_one_op_and_an_empty_batch() {
        let one = [reserve("u", "r", HOLD).0];
        let (keys, args) = batch_args(&one);
        assert_eq!(keys, ["t{b3}:acct:u"]);
        assert_eq!(
            args,
            ["r", "1", "r", "30", "1200", "4096", "16", "600000"].map(String::from)
        );
        let one = [settle("u", "r", 7, "ev").0];
        let (keys, args) = batch_args(&one);
        assert_eq!(keys, ["t{b3}:acct:u", "t{b3}:pend:u", "t{b3}:usage"]);
        assert_eq!(args, ["s", "1", "2", "3", "r", "7", "ev"].map(String::from));
        let (keys, args) = batch_args(&[]);
        assert!(keys.is_empty() && args.is_empty());
    }

    #[test]
    fn a_reserve_answered_after_its_caller_left_names_the_hold_to_release() {
        let (op, rx) = reserve("u", "r", HOLD);
        drop(rx);
        assert_eq!(
            op.reply(Ok(vec![1, 40, 4096, 960])),
            Some(("t{b3}:acct:u".to_owned(), "r".to_owned()))
        );
        // Refused, or not loaded: nothing was held.
        for row in [vec![0, 0, 0, 5], vec![-1, 0, 0, 0], vec![]] {
            let (op, rx) = reserve("u", "r", HOLD);
            drop(rx);
            assert_eq!(op.reply(Ok(row)), None);
        }
        let (op, rx) = reserve("u", "r", HOLD);
        drop(rx);
        assert_eq!(op.reply(Err(gone())), None);
        // A caller still waiting gets the answer; a settle never leaves a hold behind.
        let (op, mut rx) = reserve("u", "r", HOLD);
        assert_eq!(op.reply(Ok(vec![1, 40, 4096, 960])), None);
        assert_eq!(rx.try_recv().unwrap().unwrap(), vec![1, 40, 4096, 960]);
        let (op, rx) = settle("u", "r", 1, "ev");
        drop(rx);
        assert_eq!(op.reply(Ok(vec![1, 5])), None);
    }

    /// What the ack script reads from KEYS and ARGV.
    #[derive(Debug, PartialEq)]
    struct AckCall {
        stream: String,
        group: String,
        entries: Vec<String>,
        /// Per pend key, the request ids to forget.
        pend: Vec<(String, Vec<String>)>,
    }

    fn read_ack(keys: &[String], args: &[String]) -> AckCall {
        let n: usize = args[1].parse().unwrap();
        let entries = args[2..2 + n].to_vec();
        let mut i = 2 + n;
        let mut k = 1;
        let mut pend = Vec::new();
        while i < args.len() {
            let c: usize = args[i].parse().unwrap();
            pend.push((keys[k].clone(), args[i + 1..=i + c].to_vec()));
            i += c + 1;
            k += 1;
        }
        assert_eq!(k, keys.len(), "a pend key without its ids");
        AckCall {
            stream: keys[0].clone(),
            group: args[0].clone(),
            entries,
            pend,
        }
    }

    #[test]
    fn an_ack_forgets_the_pending_ids_of_each_user_once_and_skips_unreadable_entries() {
        let t = |e: &str, rid: &str, user: &str| (e.to_owned(), rid.to_owned(), user.to_owned());
        let entries = [
            t("1-0", "ra", "ub"),
            t("1-1", "", ""),
            t("1-2", "rb", "ua"),
            t("2-0", "rc", "ub"),
        ];
        let (keys, args) = ack_args(
            "s".into(),
            |user| format!("pend:{user}"),
            "flushers",
            &entries,
        );
        let pend =
            |k: &str, ids: &[&str]| (k.to_owned(), ids.iter().map(|i| (*i).to_owned()).collect());
        assert_eq!(
            read_ack(&keys, &args),
            AckCall {
                stream: "s".into(),
                group: "flushers".into(),
                entries: ["1-0", "1-1", "1-2", "2-0"].map(String::from).to_vec(),
                pend: vec![pend("pend:ua", &["rb"]), pend("pend:ub", &["ra", "rc"])],
            }
        );
        // Only unreadable entries: acknowledged and deleted, no pend key.
        let (keys, args) = ack_args("s".into(), |u| u.into(), "g", &[t("3-0", "", "")]);
        assert_eq!(keys, ["s"]);
        assert_eq!(args, ["g", "1", "3-0"]);
    }

    #[test]
    fn the_key_layout_names_the_keys_of_the_module_doc() {
        let layout = KeyLayout::new("t1:", 16);
        let user = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let b = layout.bucket_of(&user);
        assert!(b < 16);
        let k = layout.keys(&user);
        assert_eq!(k.acct, format!("t1:{{b{b}}}:acct:{user}"));
        assert_eq!(k.pend, format!("t1:{{b{b}}}:pend:{user}"));
        assert_eq!(k.cred, format!("t1:{{b{b}}}:cred:{user}"));
        assert_eq!(k.stream, format!("t1:{{b{b}}}:usage"));
        // The single-key names agree with the set.
        assert_eq!(layout.acct_key(&user), k.acct);
        assert_eq!(layout.pend_key(b, &user.to_string()), k.pend);
        assert_eq!(layout.stream_key(b), k.stream);
    }

    #[test]
    fn a_user_stays_in_one_bucket_and_users_spread_over_all() {
        let layout = KeyLayout::new("", 4);
        let mut seen = [0u32; 4];
        for i in 0..64u128 {
            let user = Uuid::from_u128(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let b = layout.bucket_of(&user);
            assert_eq!(b, layout.bucket_of(&user));
            seen[b as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 0), "{seen:?}");
    }
}
