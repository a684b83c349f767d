//! The credit lifecycle off the request path: changes of a user's credits rows or
//! subscription status made in PostgreSQL (a new period, an expired grant, a grant, a
//! tier change, a suspension) and carried to the live balance in Redis.
//!
//! Every such change is one PostgreSQL transaction that also calls [`queue_rebase`]
//! for the user; after the commit, [`apply_queued`] rebases the user's live balance
//! from PostgreSQL ([`Ledger::rebase`]: current rows, minus charges settled but not
//! flushed, minus the holds of requests in flight) and only then deletes the queue row.
//! A crash between the commit and the Redis step leaves the row queued; the next
//! billing run (or `serve`'s periodic job) applies it. The rebase is idempotent, so
//! applying a change twice is harmless.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::db::{Db, DbError};
use crate::ledger::{Ledger, LedgerError};

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
}

impl From<tokio_postgres::Error> for LifecycleError {
    fn from(e: tokio_postgres::Error) -> Self {
        LifecycleError::Db(e.into())
    }
}

/// Queues `user`'s live balance for a rebase; call it in the transaction that changes
/// the user's credits rows or subscription status.
pub async fn queue_rebase(
    tx: &tokio_postgres::Transaction<'_>,
    user: &Uuid,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO ledger_rebase_queue (user_id, queued_at) VALUES ($1, clock_timestamp())
         ON CONFLICT (user_id) DO UPDATE SET queued_at = clock_timestamp()",
        &[user],
    )
    .await?;
    Ok(())
}

/// What [`apply_queued`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Users whose loaded balance was rebased.
    pub rebased: usize,
    /// Users whose balance was not loaded (it reads PostgreSQL when it is).
    pub not_loaded: usize,
    /// Users left queued (the rebase failed; logged).
    pub failed: usize,
}

/// Rebases the queued users (only `user`, when given) and removes their queue rows,
/// unless a newer change queued them again meanwhile.
pub async fn apply_queued(
    db: &Db,
    ledger: &Ledger,
    user: Option<Uuid>,
) -> Result<Applied, LifecycleError> {
    let mut out = Applied::default();
    let mut failed: Vec<Uuid> = Vec::new();
    loop {
        let queued: Vec<(Uuid, DateTime<Utc>)> = {
            let client = db.get().await?;
            client
                .query(
                    "SELECT user_id, queued_at FROM ledger_rebase_queue
                      WHERE ($1::uuid IS NULL OR user_id = $1) AND user_id <> ALL($2)
                      ORDER BY queued_at LIMIT 500",
                    &[&user, &failed],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()
        };
        if queued.is_empty() {
            return Ok(out);
        }
        for (u, at) in &queued {
            match ledger.rebase(db, u).await {
                Ok(r) => {
                    if r.is_some() {
                        out.rebased += 1;
                    } else {
                        out.not_loaded += 1;
                    }
                    let client = db.get().await?;
                    client
                        .execute(
                            "DELETE FROM ledger_rebase_queue WHERE user_id = $1 AND queued_at = $2",
                            &[u, at],
                        )
                        .await?;
                }
                Err(e) => {
                    tracing::warn!(user = %u, error = %e, "live balance not rebased; left queued");
                    out.failed += 1;
                    failed.push(*u);
                }
            }
        }
        if queued.len() < 500 {
            return Ok(out);
        }
    }
}

/// What one billing run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BillingReport {
    /// Subscriptions that entered a new period.
    pub renewed: usize,
    /// Cancelled subscriptions whose last period ended (now `expired`).
    pub expired_subscriptions: usize,
    /// Past-due subscriptions whose grace ended (now `suspended`).
    pub suspended: usize,
    /// Credits rows retired because their period ended without a renewal (grants,
    /// rows of subscriptions that no longer renew).
    pub expired_rows: usize,
    pub applied: Applied,
}

/// The advisory lock of the billing run: one at a time across every replica and CLI.
const BILLING_LOCK: i64 = 0x7467_6269_6c6c; // "tgbill"

/// Statuses whose subscription turns when its period ends (into a new period, or
/// `expired` for a cancelled one). Past due is `active` with `past_due_since` set.
const RENEWABLE: &str = "('active', 'cancelled')";

/// Turns every period that has ended by `now`: renews the subscriptions that renew
/// (a new current credits row with the tier's allocation plus the capped rollover;
/// the old row retired), expires cancelled ones, suspends past-due ones whose grace
/// has ended, retires every other current row whose period has ended (grants), then
/// carries the changes to the live balances. Idempotent; concurrent runs are
/// serialised by an advisory lock — with `wait` false, a run that finds it taken
/// returns `None` at once.
pub async fn billing_run(
    db: &Db,
    ledger: &Ledger,
    tiers: &crate::config::TiersConfig,
    billing: &crate::config::BillingConfig,
    now: DateTime<Utc>,
    wait: bool,
) -> Result<Option<BillingReport>, LifecycleError> {
    // The lock lives in a transaction of its own, so it is released however the run
    // ends (a dropped transaction rolls back).
    let mut lock_conn = db.get().await?;
    let lock = lock_conn.transaction().await?;
    if wait {
        lock.execute("SELECT pg_advisory_xact_lock($1)", &[&BILLING_LOCK])
            .await?;
    } else {
        let got: bool = lock
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&BILLING_LOCK])
            .await?
            .get(0);
        if !got {
            return Ok(None);
        }
    }
    let mut report = BillingReport::default();
    let grace = chrono::Duration::from_std(billing.past_due_grace).unwrap_or(chrono::Duration::MAX);
    let mut failed: Vec<Uuid> = Vec::new();
    loop {
        let due: Vec<Uuid> = {
            let c = db.get().await?;
            c.query(
                &format!(
                    "SELECT id FROM subscriptions
                      WHERE current_period_end <= $1 AND status::text IN {RENEWABLE} AND id <> ALL($2)
                      ORDER BY current_period_end LIMIT 200"
                ),
                &[&now, &failed],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
        };
        if due.is_empty() {
            break;
        }
        for id in due {
            match turn_period(db, tiers, grace, &id, now).await {
                Ok(Turned::Renewed) => report.renewed += 1,
                Ok(Turned::Expired) => report.expired_subscriptions += 1,
                Ok(Turned::Suspended) => report.suspended += 1,
                Ok(Turned::NotDue) => {}
                Err(e) => {
                    tracing::warn!(subscription = %id, error = %e, "period not turned");
                    failed.push(id);
                }
            }
        }
    }
    report.suspended += suspend_overdue(db, grace, now).await?;
    report.expired_rows = expire_rows(db, now).await?;
    lock.commit().await?;
    drop(lock_conn);
    report.applied = apply_queued(db, ledger, None).await?;
    Ok(Some(report))
}

enum Turned {
    Renewed,
    Expired,
    Suspended,
    NotDue,
}

/// One subscription whose period has ended, in one transaction.
async fn turn_period(
    db: &Db,
    tiers: &crate::config::TiersConfig,
    grace: chrono::Duration,
    id: &Uuid,
    now: DateTime<Utc>,
) -> Result<Turned, LifecycleError> {
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let Some(s) = tx
        .query_opt(
            "SELECT user_id, coalesce(scheduled_tier, tier)::text, status::text, past_due_since,
                    current_period_end
               FROM subscriptions WHERE id = $1 FOR NO KEY UPDATE",
            &[id],
        )
        .await?
    else {
        return Ok(Turned::NotDue);
    };
    let user: Uuid = s.get(0);
    // A downgrade scheduled for the period's end (`subscriptions set`) starts here.
    let tier: String = s.get(1);
    let status: String = s.get(2);
    let past_due_since: Option<DateTime<Utc>> = s.get(3);
    let end: DateTime<Utc> = s.get(4);
    if end > now || !matches!(status.as_str(), "active" | "cancelled") {
        // Another run turned it meanwhile.
        return Ok(Turned::NotDue);
    }
    // The period's rows stop being current; what they have left (the flusher's
    // increments included: the UPDATE waits for its row locks) is the rollover's base.
    let left: i64 = tx
        .query(
            "UPDATE credits SET is_current = false
              WHERE subscription_id = $1 AND is_current AND billing_period_end <= $2
             RETURNING (total_credits - used_credits)::bigint",
            &[id, &now],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .fold(0i64, i64::saturating_add);
    let turned = if status == "cancelled" {
        tx.execute(
            "UPDATE subscriptions SET status = 'expired' WHERE id = $1",
            &[id],
        )
        .await?;
        Turned::Expired
    } else if past_due_since
        .and_then(|t| t.checked_add_signed(grace))
        .is_some_and(|t| t <= now)
    {
        tx.execute(
            "UPDATE subscriptions SET status = 'suspended' WHERE id = $1",
            &[id],
        )
        .await?;
        Turned::Suspended
    } else {
        let plan = tiers
            .plan(&tier)
            .ok_or_else(|| LifecycleError::Db(DbError::Pool(format!("no plan for tier {tier}"))))?;
        let months = plan.interval.months();
        let (mut from, mut to) = (end, add_months(end, months)?);
        // A run that comes late does not hand out the periods nobody could use.
        while to <= now {
            from = to;
            to = add_months(to, months)?;
        }
        let carried = left.max(0).min(plan.rollover_cap);
        let total = plan
            .period_credits()
            .and_then(|c| c.checked_add(carried))
            .and_then(|c| i32::try_from(c).ok())
            .ok_or_else(|| {
                LifecycleError::Db(DbError::Pool(format!(
                    "the {tier} plan's credits overflow a credits row"
                )))
            })?;
        let per_month = i32::try_from(plan.credits_per_month).unwrap_or(i32::MAX);
        let price = i32::try_from(plan.price_cents).unwrap_or(i32::MAX);
        tx.execute(
            "UPDATE subscriptions SET current_period_start = $2, current_period_end = $3,
                    credits_per_month = $4, price_cents = $5, billing_interval = $6,
                    credits_rollover = $7, tier = $8::text::subscription_tier, scheduled_tier = NULL
              WHERE id = $1",
            &[
                id,
                &from,
                &to,
                &per_month,
                &price,
                &plan.interval.as_str(),
                &(plan.rollover_cap > 0),
                &tier,
            ],
        )
        .await?;
        tx.execute(
            "INSERT INTO credits (user_id, subscription_id, total_credits, billing_period_start, billing_period_end)
             VALUES ($1, $2, $3, $4, $5)",
            &[&user, id, &total, &from, &to],
        )
        .await?;
        Turned::Renewed
    };
    queue_rebase(&tx, &user).await?;
    tx.commit().await?;
    Ok(turned)
}

fn add_months(t: DateTime<Utc>, months: i32) -> Result<DateTime<Utc>, LifecycleError> {
    u32::try_from(months)
        .ok()
        .and_then(|m| t.checked_add_months(chrono::Months::new(m)))
        .ok_or_else(|| LifecycleError::Db(DbError::Pool("billing period out of range".into())))
}

/// Past-due subscriptions whose grace (from `past_due_since`) has ended become
/// suspended.
async fn suspend_overdue(
    db: &Db,
    grace: chrono::Duration,
    now: DateTime<Utc>,
) -> Result<usize, LifecycleError> {
    let Some(cutoff) = now.checked_sub_signed(grace) else {
        return Ok(0);
    };
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let users = tx
        .query(
            "UPDATE subscriptions SET status = 'suspended'
              WHERE status = 'active' AND past_due_since <= $1
             RETURNING user_id",
            &[&cutoff],
        )
        .await?;
    for r in &users {
        queue_rebase(&tx, &r.get(0)).await?;
    }
    tx.commit().await?;
    Ok(users.len())
}

/// Retires every current row whose period has ended and that no renewal replaces:
/// grants, and the rows of subscriptions that no longer renew.
async fn expire_rows(db: &Db, now: DateTime<Utc>) -> Result<usize, LifecycleError> {
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let rows = tx
        .query(
            &format!(
                // The rows are locked in the flusher's order (user, end, created, id), so
                // the two cannot deadlock over a user's rows.
                "WITH due AS (
                   SELECT c.id FROM credits c
                    WHERE c.is_current AND c.billing_period_end <= $1
                      AND NOT EXISTS (SELECT 1 FROM subscriptions s
                                       WHERE s.id = c.subscription_id AND s.status::text IN {RENEWABLE})
                    ORDER BY c.user_id, c.billing_period_end, c.created_at, c.id
                    FOR NO KEY UPDATE OF c)
                 UPDATE credits SET is_current = false FROM due
                  WHERE credits.id = due.id AND credits.is_current
                 RETURNING credits.user_id"
            ),
            &[&now],
        )
        .await?;
    let mut users: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    users.sort_unstable();
    users.dedup();
    for u in &users {
        queue_rebase(&tx, u).await?;
    }
    tx.commit().await?;
    Ok(rows.len())
}
