//! Reconciliation: per loaded user, the live ledger in Redis (balance + holds +
//! charges settled but not flushed) against PostgreSQL (Σ total − used of the current
//! credits rows). The two agree by construction; a difference ("drift") means a step
//! was lost or Redis was changed by hand. `tollgate ledger reconcile [--fix]` and
//! `serve` (every `billing.reconcile_interval_ms`, one replica at a time) run it; the
//! drift is logged per user and exported as `tollgate_ledger_drift_credits`. `--fix`
//! rebuilds a drifting user from PostgreSQL the way a Redis loss does (the balance is
//! forgotten and loaded; unflushed charges are kept and counted).

use uuid::Uuid;

use crate::db::{Db, DbError};
use crate::ledger::{Ledger, LedgerError};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
}

impl From<tokio_postgres::Error> for ReconcileError {
    fn from(e: tokio_postgres::Error) -> Self {
        ReconcileError::Db(e.into())
    }
}

impl From<redis::RedisError> for ReconcileError {
    fn from(e: redis::RedisError) -> Self {
        ReconcileError::Ledger(e.into())
    }
}

/// One user whose live ledger and PostgreSQL disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drift {
    pub user: Uuid,
    /// Redis: balance + held + unflushed charges.
    pub live: i64,
    /// PostgreSQL: Σ (total − used) of the current credits rows.
    pub recorded: i64,
}

impl Drift {
    /// Credits Redis has more than PostgreSQL (negative: fewer).
    pub fn credits(&self) -> i64 {
        self.live.saturating_sub(self.recorded)
    }
}

/// What a reconciliation found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Loaded users compared.
    pub users: usize,
    /// Users skipped because a change of theirs is queued (on its way to Redis).
    pub queued: usize,
    pub drifting: Vec<Drift>,
    /// Drifting users rebuilt from PostgreSQL (`fix`).
    pub fixed: usize,
}

impl Report {
    /// Σ |drift| over the drifting users.
    pub fn drift_credits(&self) -> i64 {
        self.drifting
            .iter()
            .fold(0i64, |t, d| t.saturating_add(d.credits().saturating_abs()))
    }
}

/// One comparison of a user; `None` when the balance is not loaded or a change of the
/// user is queued.
async fn measure(db: &Db, ledger: &Ledger, user: &Uuid) -> Result<Option<Drift>, ReconcileError> {
    let Some(live) = ledger.live(user).await? else {
        return Ok(None);
    };
    let ids: Vec<Uuid> = live.pending.iter().map(|(id, _)| *id).collect();
    // After the Redis read, one PostgreSQL statement: a charge flushed in between is in
    // `used` and listed as flushed, so it is counted once either way.
    let row = db
        .get()
        .await?
        .query_one(
            "SELECT
               (SELECT coalesce(sum(total_credits - used_credits), 0)::bigint FROM credits
                 WHERE user_id = $1 AND is_current),
               (SELECT coalesce(array_agg(id), '{}') FROM usage_history WHERE user_id = $1 AND id = ANY($2)),
               EXISTS (SELECT 1 FROM ledger_rebase_queue WHERE user_id = $1)",
            &[user, &ids],
        )
        .await?;
    if row.get::<_, bool>(2) {
        return Ok(None);
    }
    let flushed: Vec<Uuid> = row.get(1);
    let unflushed = live
        .pending
        .iter()
        .filter(|(id, _)| !flushed.contains(id))
        .fold(0i64, |t, (_, c)| t.saturating_add(*c));
    Ok(Some(Drift {
        user: *user,
        live: live
            .balance
            .saturating_add(live.held)
            .saturating_add(unflushed),
        recorded: row.get(0),
    }))
}

/// Compares every loaded user (or only `only`); with `fix`, rebuilds each drifting one.
/// A difference counts only if a second measurement finds the same one (a change
/// applied between the Redis read and the PostgreSQL read is not drift).
pub async fn reconcile(
    db: &Db,
    ledger: &Ledger,
    only: Option<Uuid>,
    fix: bool,
) -> Result<Report, ReconcileError> {
    let users = match only {
        Some(u) => vec![u],
        None => ledger.loaded_users().await?,
    };
    let mut report = Report::default();
    for u in users {
        let Some(first) = measure(db, ledger, &u).await? else {
            report.queued += usize::from(ledger.live(&u).await?.is_some());
            continue;
        };
        report.users += 1;
        if first.live == first.recorded {
            continue;
        }
        let Some(again) = measure(db, ledger, &u).await? else {
            continue;
        };
        if again.credits() != first.credits() {
            continue;
        }
        tracing::warn!(
            user = %u,
            live = again.live,
            recorded = again.recorded,
            drift = again.credits(),
            "live balance drifts from PostgreSQL"
        );
        report.drifting.push(again);
        if fix {
            ledger.forget(&u).await?;
            ledger.load(db, &u).await?;
            report.fixed += 1;
        }
    }
    Ok(report)
}
