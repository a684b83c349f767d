//! Subscriptions off the request path: starting one (`tollgate user create`), changing
//! its tier and cancelling it (`tollgate subscriptions set|cancel`).
//!
//! A user's subscription is their latest row of `subscriptions` (the one the ledger's
//! status check reads too). The rules:
//!
//! - **Upgrade** (the new tier's `credits_per_month` is higher): at once. The
//!   subscription takes the new tier's plan (tier, `credits_per_month`, price, billing
//!   interval, rollover), and the current period's credits row gets
//!   `floor((new − old) × remaining_seconds / period_seconds)` more credits, where
//!   `new` and `old` are the two plans' credits for a period as long as the current one
//!   (`credits_per_month ×` its whole months, [`period_months`]: a yearly period
//!   upgraded to a monthly plan is still a year long), `period_seconds` its length
//!   and `remaining_seconds` what is left of it (checked `i64`; [`prorated`]).
//! - **Downgrade** (not higher): at the end of the period. It is stored in
//!   `subscriptions.scheduled_tier`; the billing run's renewal applies it.
//! - **Same tier**: nothing changes (a scheduled downgrade is withdrawn).
//! - `set` on a cancelled subscription that is still running resumes it; on a user
//!   without a subscription (or whose latest one expired) it starts one, as `user
//!   create` does. A suspended subscription is refused.
//! - **Cancel**: status `cancelled`, `cancelled_at = now`; the subscription is served
//!   until `current_period_end`, and the billing run expires it then instead of renewing.
//!
//! Each change is one PostgreSQL transaction (the user's row locked first, so two
//! changes of one user serialise) that also queues the user's live balance for a
//! rebase (`lifecycle::queue_rebase`); after the commit `lifecycle::apply_queued` brings
//! Redis in line. Bad input (unknown email, deactivated user, unknown tier) is refused
//! before anything is written.

use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::config::{Plan, TiersConfig};
use crate::db::{Db, DbError};
use crate::ledger::Ledger;
use crate::lifecycle;

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// Bad input, or a state that forbids the change: nothing was written.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Db(#[from] DbError),
    /// The change is committed, but Redis has not got it yet; it stays queued.
    #[error(
        "the change is committed, but the live balance was not updated ({0}); \
         it stays queued (ledger_rebase_queue) and the next billing run applies it"
    )]
    NotApplied(String),
}

impl From<tokio_postgres::Error> for SubscriptionError {
    fn from(e: tokio_postgres::Error) -> Self {
        SubscriptionError::Db(e.into())
    }
}

fn refused(msg: impl Into<String>) -> SubscriptionError {
    SubscriptionError::Refused(msg.into())
}

/// The configured plan of `tier`, or a refusal naming the tiers there are.
pub fn plan_of<'a>(tiers: &'a TiersConfig, tier: &str) -> Result<&'a Plan, SubscriptionError> {
    tiers.plan(tier).ok_or_else(|| {
        refused(format!(
            "unknown tier `{tier}` (tiers: {})",
            tiers
                .plans
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// The plan's figures as the schema stores them (`integer` columns).
struct Stored {
    credits_per_month: i32,
    price_cents: i32,
    period_credits: i32,
}

fn stored(plan: &Plan) -> Result<Stored, SubscriptionError> {
    let int = |v: Option<i64>, what: &str| {
        v.and_then(|v| i32::try_from(v).ok())
            .ok_or_else(|| refused(format!("the plan's {what} does not fit a credits row")))
    };
    Ok(Stored {
        credits_per_month: int(Some(plan.credits_per_month), "credits_per_month")?,
        price_cents: int(Some(plan.price_cents), "price_cents")?,
        period_credits: int(plan.period_credits(), "period credits")?,
    })
}

/// Starts an active subscription of `tier` for `user` in the caller's transaction: its
/// period begins at `now` and lasts the plan's interval (months added in UTC, as the
/// billing run's renewal adds them), and its current credits row holds the period's
/// credits (`Plan::period_credits`). Returns (subscription id, period end).
pub async fn start(
    tx: &tokio_postgres::Transaction<'_>,
    user: &Uuid,
    tier: &str,
    plan: &Plan,
    now: DateTime<Utc>,
) -> Result<(Uuid, DateTime<Utc>), SubscriptionError> {
    let s = stored(plan)?;
    let end = u32::try_from(plan.interval.months())
        .ok()
        .and_then(|m| now.checked_add_months(chrono::Months::new(m)))
        .ok_or_else(|| refused("the billing period is out of range"))?;
    let row = tx
        .query_one(
            "WITH s AS (
                INSERT INTO subscriptions (user_id, tier, status, credits_per_month, credits_rollover, price_cents,
                                           billing_interval, current_period_start, current_period_end)
                VALUES ($1, $2::text::subscription_tier, 'active', $3, $4, $5, $6, $7, $8)
                RETURNING id, current_period_start, current_period_end)
             INSERT INTO credits (user_id, subscription_id, total_credits, billing_period_start, billing_period_end)
             SELECT $1, s.id, $9, s.current_period_start, s.current_period_end FROM s
             RETURNING subscription_id, billing_period_end",
            &[
                user,
                &tier,
                &s.credits_per_month,
                &(plan.rollover_cap > 0),
                &s.price_cents,
                &plan.interval.as_str(),
                &now,
                &end,
                &s.period_credits,
            ],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// What [`set_tier`] or [`cancel`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new subscription (the user had none, or their latest had expired).
    Started {
        tier: String,
        credits: i64,
        until: DateTime<Utc>,
    },
    /// At once, with `added` credits in the current period's row.
    Upgraded {
        from: String,
        to: String,
        added: i64,
        until: DateTime<Utc>,
        resumed: bool,
    },
    /// Stored for the end of the period (`already`: it was, nothing changed).
    DowngradeScheduled {
        from: String,
        to: String,
        at: DateTime<Utc>,
        resumed: bool,
        already: bool,
    },
    /// Already on that tier; a scheduled downgrade withdrawn, a cancellation undone.
    Kept {
        tier: String,
        withdrawn: Option<String>,
        resumed: bool,
    },
    Cancelled {
        tier: String,
        until: DateTime<Utc>,
    },
    AlreadyCancelled {
        tier: String,
        until: DateTime<Utc>,
    },
}

impl Change {
    /// Whether anything was written.
    pub fn changed(&self) -> bool {
        match self {
            Change::Kept {
                withdrawn, resumed, ..
            } => withdrawn.is_some() || *resumed,
            Change::DowngradeScheduled {
                resumed, already, ..
            } => *resumed || !*already,
            Change::AlreadyCancelled { .. } => false,
            _ => true,
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let resumed = |r: bool| if r { " (cancellation withdrawn)" } else { "" };
        match self {
            Change::Started { tier, credits, until } => write!(
                f,
                "started a subscription to {tier}: {credits} credits until {until}"
            ),
            Change::Upgraded {
                from,
                to,
                added,
                until,
                resumed: r,
            } => write!(
                f,
                "upgraded from {from} to {to} now: {added} credits added to the period ending {until}{}",
                resumed(*r)
            ),
            Change::DowngradeScheduled {
                from,
                to,
                at,
                resumed: r,
                already,
            } => write!(
                f,
                "{from} until the period ends at {at}, then {to}{}{}",
                resumed(*r),
                if *already && !*r {
                    " (already scheduled; nothing changed)"
                } else {
                    ""
                }
            ),
            Change::Kept {
                tier,
                withdrawn,
                resumed: r,
            } => match withdrawn {
                Some(w) => write!(
                    f,
                    "stays on {tier}: the downgrade to {w} is withdrawn{}",
                    resumed(*r)
                ),
                None if *r => write!(f, "stays on {tier}{}", resumed(true)),
                None => write!(f, "already on {tier}; nothing changed"),
            },
            Change::Cancelled { tier, until } => {
                write!(f, "cancelled the {tier} subscription: served until {until}")
            }
            Change::AlreadyCancelled { tier, until } => write!(
                f,
                "the {tier} subscription is already cancelled (served until {until}); nothing changed"
            ),
        }
    }
}

/// `floor((new − old) × remaining / period)`, `remaining` clamped to `0..=period`;
/// `None` on overflow or a period that is not positive.
pub fn prorated(old: i64, new: i64, remaining_secs: i64, period_secs: i64) -> Option<i64> {
    if period_secs <= 0 {
        return None;
    }
    let remaining = remaining_secs.clamp(0, period_secs);
    new.checked_sub(old)?
        .checked_mul(remaining)?
        .checked_div_euclid(period_secs)
}

/// The whole months of the period `[start, end)` (at least 1): the largest `m` with
/// `start + m months <= end`, months added in UTC as the renewal adds them.
pub fn period_months(start: DateTime<Utc>, end: DateTime<Utc>) -> i64 {
    use chrono::Datelike;
    let add = |m: i64| {
        u32::try_from(m)
            .ok()
            .and_then(|m| start.checked_add_months(chrono::Months::new(m)))
    };
    let diff = (i64::from(end.year()) - i64::from(start.year())) * 12 + i64::from(end.month())
        - i64::from(start.month());
    let mut m = diff.max(1);
    while m > 1 && add(m).is_none_or(|t| t > end) {
        m -= 1;
    }
    m
}

/// Locks and returns the active user with `email`.
async fn lock_user(
    tx: &tokio_postgres::Transaction<'_>,
    email: &str,
) -> Result<Uuid, SubscriptionError> {
    let row = tx
        .query_opt(
            "SELECT id, is_active AND deleted_at IS NULL FROM users
              WHERE lower(email) = lower($1) FOR NO KEY UPDATE",
            &[&email],
        )
        .await?
        .ok_or_else(|| refused(format!("no user with email {email}")))?;
    if !row.get::<_, bool>(1) {
        return Err(refused(format!("user {email} is deactivated")));
    }
    Ok(row.get(0))
}

/// The user's latest subscription, locked.
struct Current {
    id: Uuid,
    tier: String,
    status: String,
    credits_per_month: i64,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    scheduled: Option<String>,
    now: DateTime<Utc>,
}

async fn latest(
    tx: &tokio_postgres::Transaction<'_>,
    user: &Uuid,
    now: DateTime<Utc>,
) -> Result<Option<Current>, SubscriptionError> {
    let row = tx
        .query_opt(
            "SELECT id, tier::text, status::text, credits_per_month::bigint,
                    current_period_start, current_period_end, scheduled_tier::text
               FROM subscriptions WHERE user_id = $1
              ORDER BY created_at DESC, id DESC LIMIT 1 FOR NO KEY UPDATE",
            &[user],
        )
        .await?;
    Ok(row.map(|r| Current {
        id: r.get(0),
        tier: r.get(1),
        status: r.get(2),
        credits_per_month: r.get(3),
        start: r.get(4),
        end: r.get(5),
        scheduled: r.get(6),
        now,
    }))
}

/// Commits, then carries the change to the live balance.
async fn commit_and_apply(
    tx: tokio_postgres::Transaction<'_>,
    db: &Db,
    ledger: &Ledger,
    user: &Uuid,
) -> Result<(), SubscriptionError> {
    lifecycle::queue_rebase(&tx, user).await?;
    tx.commit().await?;
    match lifecycle::apply_queued(db, ledger, Some(*user)).await {
        Ok(a) if a.failed == 0 => Ok(()),
        Ok(_) => Err(SubscriptionError::NotApplied("the rebase failed".into())),
        Err(e) => Err(SubscriptionError::NotApplied(e.to_string())),
    }
}

/// `tollgate subscriptions set` at `now` (the CLI's clock, as the billing run's): see
/// the module doc for the rules.
pub async fn set_tier(
    db: &Db,
    ledger: &Ledger,
    tiers: &TiersConfig,
    email: &str,
    tier: &str,
    now: DateTime<Utc>,
) -> Result<Change, SubscriptionError> {
    let plan = plan_of(tiers, tier)?;
    let s = stored(plan)?;
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let user = lock_user(&tx, email).await?;
    let cur = match latest(&tx, &user, now).await? {
        Some(c) if c.status != "expired" => c,
        _ => {
            let (_, until) = start(&tx, &user, tier, plan, now).await?;
            commit_and_apply(tx, db, ledger, &user).await?;
            return Ok(Change::Started {
                tier: tier.to_owned(),
                credits: i64::from(s.period_credits),
                until,
            });
        }
    };
    let resumed = match cur.status.as_str() {
        "active" => false,
        "cancelled" => true,
        other => {
            return Err(refused(format!(
                "the subscription of {email} is {other}; its tier cannot be changed"
            )))
        }
    };
    let change = if cur.tier == tier {
        Change::Kept {
            tier: cur.tier.clone(),
            withdrawn: cur.scheduled.clone(),
            resumed,
        }
    } else if plan.credits_per_month > cur.credits_per_month {
        // The current period's own length: an upgrade across intervals (yearly to
        // monthly) keeps the period it is in, so the column's interval may not be it.
        let months = period_months(cur.start, cur.end);
        let (old, new) = (
            cur.credits_per_month.checked_mul(months),
            plan.credits_per_month.checked_mul(months),
        );
        let added = old
            .zip(new)
            .and_then(|(old, new)| {
                prorated(
                    old,
                    new,
                    (cur.end - cur.now).num_seconds(),
                    (cur.end - cur.start).num_seconds(),
                )
            })
            .ok_or_else(|| refused("the prorated credits overflow"))?;
        let row = tx
            .query_opt(
                "SELECT id, total_credits::bigint FROM credits
                  WHERE subscription_id = $1 AND is_current
                  ORDER BY billing_period_end DESC LIMIT 1 FOR NO KEY UPDATE",
                &[&cur.id],
            )
            .await?;
        let mut added_now = 0;
        if let Some(row) = row {
            let credit: Uuid = row.get(0);
            let total = row
                .get::<_, i64>(1)
                .checked_add(added)
                .and_then(|t| i32::try_from(t).ok())
                .ok_or_else(|| refused("the period's credits would overflow"))?;
            tx.execute(
                "UPDATE credits SET total_credits = $2 WHERE id = $1",
                &[&credit, &total],
            )
            .await?;
            added_now = added;
        }
        tx.execute(
            "UPDATE subscriptions
                SET tier = $2::text::subscription_tier, credits_per_month = $3, price_cents = $4,
                    billing_interval = $5, credits_rollover = $6, scheduled_tier = NULL,
                    status = 'active', cancelled_at = NULL
              WHERE id = $1",
            &[
                &cur.id,
                &tier,
                &s.credits_per_month,
                &s.price_cents,
                &plan.interval.as_str(),
                &(plan.rollover_cap > 0),
            ],
        )
        .await?;
        Change::Upgraded {
            from: cur.tier.clone(),
            to: tier.to_owned(),
            added: added_now,
            until: cur.end,
            resumed,
        }
    } else {
        Change::DowngradeScheduled {
            from: cur.tier.clone(),
            to: tier.to_owned(),
            at: cur.end,
            resumed,
            already: cur.scheduled.as_deref() == Some(tier),
        }
    };
    match &change {
        Change::Kept { .. } | Change::DowngradeScheduled { .. } if change.changed() => {
            let scheduled = match &change {
                Change::DowngradeScheduled { to, .. } => Some(to.as_str()),
                _ => None,
            };
            tx.execute(
                "UPDATE subscriptions
                    SET scheduled_tier = $2::text::subscription_tier, status = 'active', cancelled_at = NULL
                  WHERE id = $1",
                &[&cur.id, &scheduled],
            )
            .await?;
        }
        _ => {}
    }
    if change.changed() {
        commit_and_apply(tx, db, ledger, &user).await?;
    }
    Ok(change)
}

/// `tollgate subscriptions cancel` at `now`: the user's active subscription ends with
/// its current period.
pub async fn cancel(
    db: &Db,
    ledger: &Ledger,
    email: &str,
    now: DateTime<Utc>,
) -> Result<Change, SubscriptionError> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    let user = lock_user(&tx, email).await?;
    let cur = latest(&tx, &user, now)
        .await?
        .ok_or_else(|| refused(format!("{email} has no subscription")))?;
    match cur.status.as_str() {
        "active" => {}
        "cancelled" => {
            return Ok(Change::AlreadyCancelled {
                tier: cur.tier,
                until: cur.end,
            })
        }
        other => {
            return Err(refused(format!(
                "the subscription of {email} is {other}; only an active one can be cancelled"
            )))
        }
    }
    tx.execute(
        "UPDATE subscriptions SET status = 'cancelled', cancelled_at = $2, scheduled_tier = NULL
          WHERE id = $1",
        &[&cur.id, &now],
    )
    .await?;
    commit_and_apply(tx, db, ledger, &user).await?;
    Ok(Change::Cancelled {
        tier: cur.tier,
        until: cur.end,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn proration_is_the_stated_rule() {
        // Half the period left: half the difference.
        assert_eq!(prorated(1_000, 100_000, 50, 100), Some(49_500));
        // Floor, never more than the rule gives.
        assert_eq!(prorated(0, 10, 1, 3), Some(3));
        assert_eq!(prorated(0, 10, 2, 3), Some(6));
        // Remaining clamped to the period.
        assert_eq!(prorated(0, 10, 500, 100), Some(10));
        assert_eq!(prorated(0, 10, -5, 100), Some(0));
        assert_eq!(prorated(0, 10, 5, 0), None);
        assert_eq!(prorated(i64::MIN, i64::MAX, 5, 10), None);
        assert_eq!(prorated(0, i64::MAX, 5, 10), None);
    }

    #[test]
    fn a_period_is_as_many_months_as_fit_in_it() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let months = |a: &str, b: &str| period_months(t(a), t(b));
        assert_eq!(months("2026-01-15T10:00:00Z", "2026-02-15T10:00:00Z"), 1);
        assert_eq!(months("2026-01-15T10:00:00Z", "2027-01-15T10:00:00Z"), 12);
        // A second short of a month, and a period shorter than a month: at least 1.
        assert_eq!(months("2026-01-15T10:00:00Z", "2027-01-15T09:59:59Z"), 11);
        assert_eq!(months("2026-01-15T10:00:00Z", "2026-02-14T10:00:00Z"), 1);
        // Clamped month ends, as `checked_add_months` (the renewal) makes them.
        assert_eq!(months("2026-01-31T00:00:00Z", "2026-02-28T00:00:00Z"), 1);
        assert_eq!(months("2027-02-28T00:00:00Z", "2028-02-29T00:00:00Z"), 12);
        assert_eq!(months("2026-03-30T00:00:00Z", "2026-03-01T00:00:00Z"), 1);
    }

    proptest! {
        #[test]
        fn proration_never_exceeds_the_difference_and_is_exact_at_the_ends(
            old in 0i64..=i64::from(i32::MAX),
            up in 0i64..=i64::from(i32::MAX),
            period in 1i64..=366 * 86_400,
            left in 0u32..=1_000,
        ) {
            let new = old + up;
            let remaining = period * i64::from(left) / 1_000;
            let p = prorated(old, new, remaining, period).unwrap();
            prop_assert!((0..=up).contains(&p));
            prop_assert!(i128::from(p) * i128::from(period) <= i128::from(up) * i128::from(remaining));
            prop_assert!(i128::from(p + 1) * i128::from(period) > i128::from(up) * i128::from(remaining));
            prop_assert_eq!(prorated(old, new, period, period), Some(up));
            prop_assert_eq!(prorated(old, new, 0, period), Some(0));
        }
    }
}
