//! The ledger's lifecycle as a state machine (issue 13, item 8): proptest generates a
//! user's starting point and a list of operations — grants, reserves, settles,
//! releases, flushes, a simulated clock and the billing run at its `now`, tier changes
//! and cancel (`subscriptions::set_tier`, `cancel`) at its `now`, past due, a lost
//! Redis — runs them against real Redis and PostgreSQL through the library
//! (`Ledger`, `lifecycle`, the `Flusher`), and after every operation compares what the
//! system says with a **pure reference model** of the ledger (no I/O) that states the
//! rules of ARCHITECTURE.md ("The ledger in Redis", "The credit lifecycle") directly:
//! balance = Σ (total − used) of the current rows − unflushed − held, spend order,
//! carry rows, renewal with capped rollover, statuses, and "Subscriptions and tier
//! changes": an upgrade now with prorated credits, a downgrade at the renewal, the same
//! tier withdrawing a scheduled downgrade, resume, a subscription started.
//!
//! Sized for two cores: 24 cases of up to 30 operations (a few seconds) unless
//! `PROPTEST_CASES` / `TOLLGATE_MODEL_OPS` say otherwise; shrinking stops after
//! `PROPTEST_MAX_SHRINK_ITERS` (128 by default). Each case is a fresh user in the test's
//! one database; the users of earlier cases are deleted first, so a billing run sees
//! this case's user alone. A failure shrinks to a short `Debug` list of operations and
//! prints the trace of what each did; `--nocapture` shows a tally of what the run
//! exercised (renewals, capped rollovers, carry rows, lost holds, ...).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};
use tollgate::config::{BillingConfig, BillingInterval, DatabaseConfig, Plan, TiersConfig};
use tollgate::db::Db;
use tollgate::ledger::{HoldRequest, Ledger, Reserve};
use tollgate::lifecycle::{Applied, BillingReport};
use tollgate::subscriptions::{Change, SubscriptionError};
use uuid::Uuid;

use crate::harness::*;
use crate::ledger::{event, forget_balance, start_flusher, stop_flusher};

// ---------------------------------------------------------------------------------
// The plans, the clock and the operations.

/// The plans of this test: small figures, a rollover cap that binds, a yearly plan.
fn tiers() -> TiersConfig {
    let plan = |credits_per_month, interval, rollover_cap| Plan {
        credits_per_month,
        price_cents: 1000,
        interval,
        rollover_cap,
    };
    TiersConfig {
        default: "free".into(),
        plans: BTreeMap::from([
            ("free".into(), plan(60, BillingInterval::Monthly, 0)),
            ("pro".into(), plan(300, BillingInterval::Monthly, 50)),
            ("enterprise".into(), plan(20, BillingInterval::Yearly, 500)),
        ]),
    }
}

const GRACE_HOURS: i64 = 72;

fn billing() -> BillingConfig {
    BillingConfig {
        enabled: false,
        interval: Duration::from_secs(3600),
        past_due_grace: Duration::from_secs(GRACE_HOURS as u64 * 3600),
        reconcile_interval: None,
    }
}

/// How long a hold lives (real time: no case comes near it).
const HOLD_TTL_MS: u64 = 600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Free,
    Pro,
    Enterprise,
}

impl Tier {
    fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Pro => "pro",
            Tier::Enterprise => "enterprise",
        }
    }

    fn name(self) -> String {
        self.as_str().to_owned()
    }
}

/// Where a case starts: a subscription or none, and maybe a grant. The subscription's
/// current period (its credits from the plan, nothing spent yet) ends `period_left`
/// days after the simulated clock starts: users are met mid-period.
#[derive(Debug, Clone)]
struct Start {
    tier: Option<Tier>,
    period_left: i64,
    grant: Option<(i32, i64)>,
}

#[derive(Debug, Clone)]
enum Op {
    /// `credits grant --amount amount --expires-at (now + days)`.
    Grant { amount: i32, days: i64 },
    /// A request's hold: `ceil((prompt + tokens) × price / 1000)`, lowered to what the
    /// balance affords but not below `min_tokens`.
    Reserve {
        prompt: i64,
        tokens: i64,
        min_tokens: i64,
        price: i64,
    },
    /// Settles the open hold `which` (modulo the open holds; none: nothing) at
    /// `percent` of what it holds.
    Settle { which: u8, percent: u8 },
    /// Releases the open hold `which` (a failed upstream call).
    Release { which: u8 },
    /// Settles again the charge `which` (modulo those not yet flushed; none: nothing):
    /// a retry whose first call ran. Charges nothing, records nothing.
    Resettle { which: u8 },
    /// Drains every settled charge to PostgreSQL (a flusher started and stopped).
    Flush,
    /// Moves the simulated clock.
    Advance { hours: i64 },
    /// `tollgate billing run --now <the simulated clock>`.
    BillingRun,
    /// `tollgate subscriptions cancel` (served to the period's end).
    Cancel,
    /// `tollgate subscriptions set --tier tier`.
    SetTier { tier: Tier },
    /// The payment failed: `past_due_since` = the simulated clock.
    PastDue,
    /// Redis forgets the user's `acct` and `cred` keys (a Redis loss within the AOF
    /// window); `reload`: load at once, else at the next reserve (first use).
    LoseRedis { reload: bool },
}

fn tier() -> impl Strategy<Value = Tier> {
    prop_oneof![Just(Tier::Free), Just(Tier::Pro), Just(Tier::Enterprise)]
}

/// Weighted so that a case of 15 operations often sees a period turn: cancel and past
/// due, which stop renewals, are rare.
fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..=300i32, 1..=60i64).prop_map(|(amount, days)| Op::Grant { amount, days }),
        10 => (0..=3i64, 1..=200i64, prop_oneof![Just(1000i64), Just(2500)])
            .prop_flat_map(|(prompt, tokens, price)| {
                (1..=tokens).prop_map(move |min_tokens| Op::Reserve {
                    prompt,
                    tokens,
                    min_tokens,
                    price,
                })
            }),
        10 => (0..8u8, 0..=100u8).prop_map(|(which, percent)| Op::Settle { which, percent }),
        4 => (0..8u8).prop_map(|which| Op::Release { which }),
        2 => (0..8u8).prop_map(|which| Op::Resettle { which }),
        5 => Just(Op::Flush),
        8 => prop_oneof![1..=48i64, (1..=40i64).prop_map(|d| d * 24)]
            .prop_map(|hours| Op::Advance { hours }),
        8 => Just(Op::BillingRun),
        1 => Just(Op::Cancel),
        1 => Just(Op::PastDue),
        2 => any::<bool>().prop_map(|reload| Op::LoseRedis { reload }),
        3 => tier().prop_map(|tier| Op::SetTier { tier }),
    ]
}

fn start() -> impl Strategy<Value = Start> {
    let tier = prop_oneof![
        1 => Just(None),
        1 => Just(Some(Tier::Free)),
        2 => Just(Some(Tier::Pro)),
        1 => Just(Some(Tier::Enterprise)),
    ];
    let grant = proptest::option::of((1..=300i32, 1..=60i64));
    (tier, 1..=30i64, grant).prop_map(|(tier, period_left, grant)| Start {
        tier,
        period_left,
        grant,
    })
}

// ---------------------------------------------------------------------------------
// The reference model: no I/O, only the rules of ARCHITECTURE.md.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Active,
    Cancelled,
    Expired,
    Suspended,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Cancelled => "cancelled",
            Status::Expired => "expired",
            Status::Suspended => "suspended",
        }
    }

    /// Turns at its period's end (into a new period, or `expired`).
    fn renews(self) -> bool {
        matches!(self, Status::Active | Status::Cancelled)
    }
}

#[derive(Debug, Clone)]
struct Sub {
    tier: Tier,
    status: Status,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    /// The current period's length in months (the interval of the plan it was
    /// allocated by; an upgrade does not change it).
    months: i32,
    past_due_since: Option<DateTime<Utc>>,
    /// A downgrade waiting for the period's end.
    scheduled: Option<Tier>,
    cancelled_at: Option<DateTime<Utc>>,
}

/// A credits row as PostgreSQL holds it (`used`: flushed charges only).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    total: i64,
    used: i64,
    end: DateTime<Utc>,
    current: bool,
    /// A subscription's period (else a grant or a carry row).
    sub: bool,
}

#[derive(Debug, Clone)]
struct Hold {
    rid: Uuid,
    amount: i64,
    /// Still in Redis: a Redis loss forgets it, and its settle then charges in full.
    live: bool,
}

#[derive(Debug, Clone)]
struct Model {
    now: DateTime<Utc>,
    sub: Option<Sub>,
    /// In creation order (PostgreSQL's `created_at`).
    rows: Vec<Row>,
    holds: Vec<Hold>,
    /// Settled and not yet flushed, in settle order (the stream's).
    unflushed: Vec<(Uuid, i64)>,
    /// Whether Redis holds the user's balance.
    loaded: bool,
    /// Usage rows flushed, and the credits they record.
    usage_rows: i64,
    usage_credits: i64,
    /// Why the balance may be below zero, once something the rules allow let it.
    overdraft: Option<&'static str>,
    /// What the last operation did of note, for the run's tally (not compared).
    notes: Vec<&'static str>,
}

/// `billing_period_end` of a carry row: spent from last.
fn carry_end() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 12, 31, 0, 0, 0)
        .single()
        .expect("a valid date")
}

fn add_months(t: DateTime<Utc>, months: i32) -> DateTime<Utc> {
    t.checked_add_months(chrono::Months::new(months as u32))
        .expect("in range")
}

fn sub_months(t: DateTime<Utc>, months: i32) -> DateTime<Utc> {
    t.checked_sub_months(chrono::Months::new(months as u32))
        .expect("in range")
}

impl Model {
    fn new(now: DateTime<Utc>, start: &Start, plans: &TiersConfig) -> Model {
        let mut m = Model {
            now,
            sub: None,
            rows: Vec::new(),
            holds: Vec::new(),
            unflushed: Vec::new(),
            loaded: false,
            usage_rows: 0,
            usage_credits: 0,
            overdraft: None,
            notes: Vec::new(),
        };
        if let Some(tier) = start.tier {
            let plan = plans.plan(tier.as_str()).expect("a plan");
            let end = now + chrono::Duration::days(start.period_left);
            m.sub = Some(Sub {
                tier,
                status: Status::Active,
                start: sub_months(end, plan.interval.months()),
                end,
                months: plan.interval.months(),
                past_due_since: None,
                scheduled: None,
                cancelled_at: None,
            });
            m.rows.push(Row {
                total: plan.period_credits().expect("fits"),
                used: 0,
                end,
                current: true,
                sub: true,
            });
        }
        if let Some((amount, days)) = start.grant {
            m.grant(i64::from(amount), days);
        }
        m
    }

    fn held(&self) -> i64 {
        self.holds.iter().filter(|h| h.live).map(|h| h.amount).sum()
    }

    /// The live balance: Σ (total − used) of the current rows − unflushed − held.
    fn balance(&self) -> i64 {
        let rows: i64 = self
            .rows
            .iter()
            .filter(|r| r.current)
            .map(|r| r.total - r.used)
            .sum();
        rows - self.unflushed.iter().map(|c| c.1).sum::<i64>() - self.held()
    }

    fn granted(&self) -> i64 {
        self.rows
            .iter()
            .filter(|r| r.current)
            .map(|r| r.total)
            .sum()
    }

    /// `expired` and `suspended` admit nothing; no subscription is served from grants.
    fn active(&self) -> bool {
        self.sub
            .as_ref()
            .is_none_or(|s| !matches!(s.status, Status::Expired | Status::Suspended))
    }

    fn grant(&mut self, amount: i64, days: i64) {
        self.rows.push(Row {
            total: amount,
            used: 0,
            end: self.now + chrono::Duration::days(days),
            current: true,
            sub: false,
        });
    }

    /// The hold of `ceil((prompt + m) × price / 1000)` for the largest `m` in
    /// `min_tokens..=tokens` the balance covers.
    fn reserve(
        &mut self,
        rid: Uuid,
        prompt: i64,
        tokens: i64,
        min_tokens: i64,
        price: i64,
    ) -> Reserve {
        if !self.active() {
            return Reserve::Inactive;
        }
        let bal = self.balance();
        let cost = |m: i64| ((prompt + m) * price + 999) / 1000;
        match (min_tokens..=tokens).rev().find(|m| cost(*m) <= bal) {
            Some(m) => {
                let hold = cost(m);
                self.holds.push(Hold {
                    rid,
                    amount: hold,
                    live: true,
                });
                Reserve::Admitted {
                    hold,
                    max_tokens: m,
                    balance: bal - hold,
                }
            }
            None => Reserve::Insufficient { balance: bal },
        }
    }

    fn pick(&self, which: u8) -> Option<usize> {
        (!self.holds.is_empty()).then(|| usize::from(which) % self.holds.len())
    }

    /// Charges `percent` of the hold: the hold leaves, the charge waits for the flush.
    fn settle(&mut self, i: usize, percent: u8) -> (Hold, i64) {
        let h = self.holds.remove(i);
        let cost = h.amount * i64::from(percent) / 100;
        if !h.live && cost > 0 {
            self.overdraft
                .get_or_insert("a hold lost with Redis settles in full");
        }
        self.unflushed.push((h.rid, cost));
        (h, cost)
    }

    /// A settle of a charge still pending is refused and changes nothing.
    fn resettle(&self, which: u8) -> Option<(Uuid, i64)> {
        (!self.unflushed.is_empty())
            .then(|| self.unflushed[usize::from(which) % self.unflushed.len()])
    }

    fn release(&mut self, i: usize) -> Hold {
        self.holds.remove(i)
    }

    /// Each charge, in settle order, on the current rows earliest-ending first; what no
    /// row has left stays on the last; no current row: a zero-credit carry row.
    fn flush(&mut self) {
        for (_, cost) in std::mem::take(&mut self.unflushed) {
            self.usage_rows += 1;
            self.usage_credits += cost;
            if cost <= 0 {
                continue;
            }
            let mut order: Vec<usize> = (0..self.rows.len())
                .filter(|&i| self.rows[i].current)
                .collect();
            if order.is_empty() {
                self.rows.push(Row {
                    total: 0,
                    used: 0,
                    end: carry_end(),
                    current: true,
                    sub: false,
                });
                order.push(self.rows.len() - 1);
            }
            // Stable: equal ends keep creation order.
            order.sort_by_key(|&i| self.rows[i].end);
            let mut left = cost;
            for (k, &i) in order.iter().enumerate() {
                let r = &mut self.rows[i];
                let take = if k + 1 == order.len() {
                    left
                } else {
                    left.min((r.total - r.used).max(0))
                };
                r.used += take;
                left -= take;
                if left == 0 {
                    break;
                }
            }
        }
    }

    /// Retires a row; what the rules let the balance do then.
    fn retire(&mut self, i: usize) {
        self.rows[i].current = false;
        if !self.unflushed.is_empty() || self.held() > 0 {
            self.overdraft
                .get_or_insert("a row retired under unflushed charges or holds");
        }
    }

    /// The billing run at `now`: the period turns (renewal with the plan's credits plus
    /// `min(rollover_cap, max(0, remainder))`, late runs skipping the periods nobody
    /// could use; cancelled → expired; past due beyond the grace → suspended), past-due
    /// subscriptions beyond the grace are suspended, then every other current row whose
    /// period ended is retired. Returns the report's (renewed, expired subscriptions,
    /// suspended, expired rows).
    fn billing_run(&mut self, plans: &TiersConfig) -> (usize, usize, usize, usize) {
        let (mut renewed, mut expired, mut suspended, mut rows) = (0, 0, 0, 0);
        let now = self.now;
        let grace = chrono::Duration::hours(GRACE_HOURS);
        if let Some(s) = self
            .sub
            .clone()
            .filter(|s| s.end <= now && s.status.renews())
        {
            let mut left = 0;
            for i in 0..self.rows.len() {
                let r = &self.rows[i];
                if r.sub && r.current && r.end <= now {
                    left += r.total - r.used;
                    self.retire(i);
                }
            }
            let mut s2 = s.clone();
            if s.status == Status::Cancelled {
                s2.status = Status::Expired;
                expired += 1;
            } else if s.past_due_since.is_some_and(|t| t + grace <= now) {
                s2.status = Status::Suspended;
                suspended += 1;
            } else {
                // A scheduled downgrade starts with the new period: its plan's credits,
                // rollover cap and interval.
                let tier = s.scheduled.unwrap_or(s.tier);
                if s.scheduled.is_some() {
                    self.notes.push("downgrade applied at the renewal");
                }
                s2.tier = tier;
                s2.scheduled = None;
                let plan = plans.plan(tier.as_str()).expect("a plan");
                let months = plan.interval.months();
                s2.months = months;
                let (mut from, mut to) = (s.end, add_months(s.end, months));
                while to <= now {
                    from = to;
                    to = add_months(to, months);
                    self.notes.push("renewal skipping a period");
                }
                if left > plan.rollover_cap {
                    self.notes.push("rollover capped");
                } else if left > 0 {
                    self.notes.push("rollover in full");
                } else if left < 0 {
                    self.notes.push("overspent period (no rollover)");
                }
                s2.start = from;
                s2.end = to;
                self.rows.push(Row {
                    total: plan.period_credits().expect("fits")
                        + left.max(0).min(plan.rollover_cap),
                    used: 0,
                    end: to,
                    current: true,
                    sub: true,
                });
                renewed += 1;
            }
            self.sub = Some(s2);
        }
        if let Some(s) = self.sub.as_mut() {
            if s.status == Status::Active && s.past_due_since.is_some_and(|t| t + grace <= now) {
                s.status = Status::Suspended;
                suspended += 1;
            }
        }
        let sub_renews = self.sub.as_ref().is_some_and(|s| s.status.renews());
        for i in 0..self.rows.len() {
            let r = &self.rows[i];
            if r.current && r.end <= now && !(r.sub && sub_renews) {
                self.retire(i);
                rows += 1;
            }
        }
        (renewed, expired, suspended, rows)
    }

    /// `subscriptions cancel`: an active subscription is served to its period's end,
    /// then expires (a scheduled downgrade goes with it); a cancelled one stays as it
    /// is; none, expired or suspended: refused (`None`).
    fn cancel(&mut self) -> Option<Change> {
        let now = self.now;
        let s = self.sub.as_mut()?;
        match s.status {
            Status::Active => {
                s.status = Status::Cancelled;
                s.cancelled_at = Some(now);
                s.scheduled = None;
                Some(Change::Cancelled {
                    tier: s.tier.name(),
                    until: s.end,
                })
            }
            Status::Cancelled => Some(Change::AlreadyCancelled {
                tier: s.tier.name(),
                until: s.end,
            }),
            Status::Expired | Status::Suspended => None,
        }
    }

    /// `subscriptions set --tier tier` at `now` ("Subscriptions and tier changes"):
    /// none or expired: a subscription started now, as `user create` does; suspended:
    /// refused (`None`); else a cancelled one is resumed, and the same tier withdraws a
    /// scheduled downgrade, a higher `credits_per_month` is an upgrade now (the plan
    /// changes; the current period's row gets `floor((new − old) × remaining / period)`
    /// with `new`, `old` the plans' credits for a period as long as the current one),
    /// anything else a downgrade scheduled for the renewal.
    fn set_tier(&mut self, tier: Tier, plans: &TiersConfig) -> Option<Change> {
        let now = self.now;
        let plan = plans.plan(tier.as_str()).expect("a plan");
        let Some(s) = self.sub.clone().filter(|s| s.status != Status::Expired) else {
            let months = plan.interval.months();
            let end = add_months(now, months);
            self.sub = Some(Sub {
                tier,
                status: Status::Active,
                start: now,
                end,
                months,
                past_due_since: None,
                scheduled: None,
                cancelled_at: None,
            });
            let credits = plan.period_credits().expect("fits");
            self.rows.push(Row {
                total: credits,
                used: 0,
                end,
                current: true,
                sub: true,
            });
            self.notes.push("tier: subscription started");
            return Some(Change::Started {
                tier: tier.name(),
                credits,
                until: end,
            });
        };
        if s.status == Status::Suspended {
            self.notes.push("tier: refused (suspended)");
            return None;
        }
        let resumed = s.status == Status::Cancelled;
        if resumed {
            self.notes.push("tier: cancellation withdrawn");
        }
        let old_plan = plans.plan(s.tier.as_str()).expect("a plan");
        let mut s2 = s.clone();
        s2.status = Status::Active;
        s2.cancelled_at = None;
        let change = if s.tier == tier {
            s2.scheduled = None;
            self.notes.push(if s.scheduled.is_some() {
                "tier: scheduled downgrade withdrawn"
            } else {
                "tier: same tier"
            });
            Change::Kept {
                tier: tier.name(),
                withdrawn: s.scheduled.map(Tier::name),
                resumed,
            }
        } else if plan.credits_per_month > old_plan.credits_per_month {
            let months = i64::from(s.months);
            let (old, new) = (
                old_plan.credits_per_month * months,
                plan.credits_per_month * months,
            );
            let period = (s.end - s.start).num_seconds();
            let remaining = (s.end - now).num_seconds().clamp(0, period);
            let added = (new - old) * remaining / period;
            let row = (0..self.rows.len())
                .filter(|&i| self.rows[i].sub && self.rows[i].current)
                .max_by_key(|&i| self.rows[i].end);
            let added = match row {
                Some(i) => {
                    self.rows[i].total += added;
                    added
                }
                None => 0,
            };
            self.notes.push(if added > 0 {
                "tier: upgrade with credits"
            } else {
                "tier: upgrade with nothing left to prorate"
            });
            if s.months != plan.interval.months() {
                self.notes.push("tier: upgrade across billing intervals");
            }
            s2.tier = tier;
            s2.scheduled = None;
            Change::Upgraded {
                from: s.tier.name(),
                to: tier.name(),
                added,
                until: s.end,
                resumed,
            }
        } else {
            s2.scheduled = Some(tier);
            self.notes.push("tier: downgrade scheduled");
            Change::DowngradeScheduled {
                from: s.tier.name(),
                to: tier.name(),
                at: s.end,
                resumed,
                already: s.scheduled == Some(tier),
            }
        };
        self.sub = Some(s2);
        Some(change)
    }

    fn past_due(&mut self) -> bool {
        let now = self.now;
        match self.sub.as_mut() {
            Some(s) if s.status == Status::Active && s.past_due_since.is_none() => {
                s.past_due_since = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Redis forgets the balance and its holds; `pend` (and the streams) survive.
    fn lose_redis(&mut self) {
        self.loaded = false;
        for h in &mut self.holds {
            h.live = false;
        }
    }
}

// ---------------------------------------------------------------------------------
// The system: the library against real Redis and PostgreSQL.

struct System<'a> {
    env: &'a TestEnv,
    ledger: &'a Ledger,
    db: &'a Db,
    pg: &'a tokio_postgres::Client,
    user: Uuid,
    email: String,
    tally: &'a Tally,
}

/// How often each interesting event happened over the run (printed at its end).
#[derive(Default)]
struct Tally(std::sync::Mutex<BTreeMap<&'static str, u64>>);

impl Tally {
    fn note(&self, what: &'static str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(what).or_default() += 1;
        }
    }
}

/// The user's latest subscription as compared.
#[derive(Debug, PartialEq, Eq)]
struct SubRow {
    tier: String,
    status: String,
    credits_per_month: i64,
    billing_interval: String,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    past_due_since: Option<DateTime<Utc>>,
    scheduled_tier: Option<String>,
    cancelled_at: Option<DateTime<Utc>>,
}

/// One case's failure, with what ran before it.
fn fail(trace: &[String], msg: String) -> TestCaseError {
    TestCaseError::fail(format!("{msg}\n  ops run:\n    {}", trace.join("\n    ")))
}

macro_rules! check_eq {
    ($trace:expr, $left:expr, $right:expr, $($what:tt)+) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err(fail($trace, format!("{}: system {:?} != model {:?}", format!($($what)+), l, r)));
        }
    }};
}

impl System<'_> {
    /// Deletes the users of earlier cases (so a billing run sees this case's user
    /// alone) and makes this case's user where `start` says.
    async fn start(
        pg: &tokio_postgres::Client,
        start: &Start,
        now: DateTime<Utc>,
        plans: &TiersConfig,
    ) -> (Uuid, String) {
        pg.execute("DELETE FROM users", &[]).await.unwrap();
        let email = format!("{}@model.test", Uuid::new_v4());
        let user: Uuid = pg
            .query_one(
                "INSERT INTO users (email) VALUES ($1) RETURNING id",
                &[&email],
            )
            .await
            .unwrap()
            .get(0);
        if let Some(tier) = start.tier {
            let plan = plans.plan(tier.as_str()).unwrap();
            let end = now + chrono::Duration::days(start.period_left);
            let begun = sub_months(end, plan.interval.months());
            let credits = i32::try_from(plan.period_credits().unwrap()).unwrap();
            // As `user create --tier` starts it, `period_left` days before its end.
            pg.execute(
                "WITH s AS (
                    INSERT INTO subscriptions (user_id, tier, status, credits_per_month, credits_rollover,
                                               price_cents, billing_interval, current_period_start, current_period_end)
                    VALUES ($1, $2::text::subscription_tier, 'active', $3, $4, $5, $6, $7, $8)
                    RETURNING id)
                 INSERT INTO credits (user_id, subscription_id, total_credits, billing_period_start, billing_period_end)
                 SELECT $1, s.id, $9, $7, $8 FROM s",
                &[
                    &user,
                    &tier.as_str(),
                    &i32::try_from(plan.credits_per_month).unwrap(),
                    &(plan.rollover_cap > 0),
                    &i32::try_from(plan.price_cents).unwrap(),
                    &plan.interval.as_str(),
                    &begun,
                    &end,
                    &credits,
                ],
            )
            .await
            .unwrap();
        }
        if let Some((amount, days)) = start.grant {
            pg.execute(
                "INSERT INTO credits (user_id, total_credits, billing_period_start, billing_period_end)
                 VALUES ($1, $2, now(), $3)",
                &[&user, &amount, &(now + chrono::Duration::days(days))],
            )
            .await
            .unwrap();
        }
        (user, email)
    }

    /// What a subscription command answered: its change, or `None` for a refusal
    /// (nothing written); and nothing may stay queued for a rebase after it.
    async fn subscription_change(
        &self,
        got: Result<Change, SubscriptionError>,
        trace: &[String],
    ) -> Result<Option<Change>, TestCaseError> {
        let got = match got {
            Ok(c) => Some(c),
            Err(SubscriptionError::Refused(_)) => None,
            Err(e) => return Err(fail(trace, format!("the subscription command failed: {e}"))),
        };
        let queued: i64 = self
            .pg
            .query_one(
                "SELECT count(*) FROM ledger_rebase_queue WHERE user_id = $1",
                &[&self.user],
            )
            .await
            .unwrap()
            .get(0);
        check_eq!(trace, queued, 0, "the user's rebases left queued");
        Ok(got)
    }

    /// A change of the user's rows or subscription in one transaction with its queued
    /// rebase, then applied (as the CLI's commands do).
    async fn change(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> (u64, Applied) {
        let mut c = self.env.db().await;
        let tx = c.transaction().await.unwrap();
        let n = tx.execute(sql, params).await.unwrap();
        if n > 0 {
            tollgate::lifecycle::queue_rebase(&tx, &self.user)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        let applied = tollgate::lifecycle::apply_queued(self.db, self.ledger, Some(self.user))
            .await
            .unwrap();
        (n, applied)
    }

    /// Runs `op` on the system and the model, comparing what each says.
    async fn apply(
        &self,
        model: &mut Model,
        op: &Op,
        plans: &TiersConfig,
        trace: &mut Vec<String>,
    ) -> Result<(), TestCaseError> {
        let user = self.user;
        // What the queue's apply must say of a change to this user.
        let applied_one = |loaded: bool| Applied {
            rebased: usize::from(loaded),
            not_loaded: usize::from(!loaded),
            failed: 0,
        };
        match op {
            Op::Grant { amount, days } => {
                trace.push(format!("{op:?}"));
                let end = model.now + chrono::Duration::days(*days);
                let (_, applied) = self
                    .change(
                        "INSERT INTO credits (user_id, total_credits, billing_period_start, billing_period_end)
                         VALUES ($1, $2, now(), $3)",
                        &[&user, amount, &end],
                    )
                    .await;
                model.grant(i64::from(*amount), *days);
                check_eq!(
                    trace,
                    applied,
                    applied_one(model.loaded),
                    "the grant's rebase"
                );
            }
            Op::Reserve {
                prompt,
                tokens,
                min_tokens,
                price,
            } => {
                let rid = Uuid::now_v7();
                let h = HoldRequest {
                    price_per_1k: *price,
                    prompt_tokens: *prompt,
                    max_tokens: *tokens,
                    min_tokens: *min_tokens,
                    ttl_ms: HOLD_TTL_MS,
                };
                let mut got = self.ledger.reserve(&user, &rid, &h).await.unwrap();
                check_eq!(
                    trace,
                    got == Reserve::NeedsLoad,
                    !model.loaded,
                    "whether the reserve asked for a load"
                );
                if got == Reserve::NeedsLoad {
                    // First use: load, then reserve again (as the gateway does).
                    let bal = self.ledger.load(self.db, &user).await.unwrap();
                    model.loaded = true;
                    trace.push("(load at first use)".into());
                    self.tally.note("load at first use");
                    check_eq!(
                        trace,
                        bal,
                        model.balance(),
                        "the balance loaded at first use"
                    );
                    got = self.ledger.reserve(&user, &rid, &h).await.unwrap();
                }
                let want = model.reserve(rid, *prompt, *tokens, *min_tokens, *price);
                trace.push(format!("{op:?} -> {want:?}"));
                self.tally.note(match want {
                    Reserve::Admitted { max_tokens, .. } if max_tokens < *tokens => {
                        "reserve lowered"
                    }
                    Reserve::Admitted { .. } => "reserve admitted",
                    Reserve::Insufficient { .. } => "reserve refused",
                    Reserve::Inactive => "reserve of an inactive subscription",
                    Reserve::NeedsLoad => "reserve needs a load",
                });
                check_eq!(trace, got, want, "the reserve");
            }
            Op::Settle { which, percent } => {
                let Some(i) = model.pick(*which) else {
                    trace.push(format!("{op:?} (no open hold)"));
                    return Ok(());
                };
                let (h, cost) = model.settle(i, *percent);
                trace.push(format!(
                    "{op:?} -> {cost} of {} (live {})",
                    h.amount, h.live
                ));
                self.tally.note(if h.live {
                    "settle"
                } else {
                    "settle of a hold lost with Redis"
                });
                let e = event(user, h.rid, cost);
                let settled = self
                    .ledger
                    .settle(&user, &h.rid, cost, &e.encode())
                    .await
                    .unwrap();
                check_eq!(trace, settled, true, "the settle");
            }
            Op::Release { which } => {
                let Some(i) = model.pick(*which) else {
                    trace.push(format!("{op:?} (no open hold)"));
                    return Ok(());
                };
                let h = model.release(i);
                trace.push(format!("{op:?} -> {} (live {})", h.amount, h.live));
                let released = self.ledger.release(&user, &h.rid).await.unwrap();
                check_eq!(
                    trace,
                    released,
                    h.live,
                    "whether the release found the hold"
                );
            }
            Op::Resettle { which } => {
                let Some((rid, cost)) = model.resettle(*which) else {
                    trace.push(format!("{op:?} (nothing pending)"));
                    return Ok(());
                };
                trace.push(format!("{op:?} -> {cost}"));
                let e = event(user, rid, cost);
                let settled = self
                    .ledger
                    .settle(&user, &rid, cost, &e.encode())
                    .await
                    .unwrap();
                check_eq!(trace, settled, false, "a second settle of a pending charge");
                self.tally.note("settle repeated");
            }
            Op::Flush => {
                trace.push(format!("{op:?} ({} charges)", model.unflushed.len()));
                let carried = model.rows.len();
                let flusher = start_flusher(self.ledger, self.db, 1000, 1, 10);
                stop_flusher(flusher).await;
                model.flush();
                if model.rows.len() > carried {
                    self.tally.note("carry row");
                }
            }
            Op::Advance { hours } => {
                model.now += chrono::Duration::hours(*hours);
                trace.push(format!("{op:?} -> {}", model.now.to_rfc3339()));
            }
            Op::BillingRun => {
                trace.push(format!("{op:?} at {}", model.now.to_rfc3339()));
                let report = tollgate::lifecycle::billing_run(
                    self.db,
                    self.ledger,
                    plans,
                    &billing(),
                    model.now,
                    true,
                )
                .await
                .unwrap()
                .unwrap();
                let (renewed, expired_subscriptions, suspended, expired_rows) =
                    model.billing_run(plans);
                let changed = renewed + expired_subscriptions + suspended + expired_rows > 0;
                for (n, what) in [
                    (renewed, "renewal"),
                    (expired_subscriptions, "subscription expired"),
                    (suspended, "subscription suspended"),
                    (expired_rows, "row expired"),
                ] {
                    if n > 0 {
                        self.tally.note(what);
                    }
                }
                let want = BillingReport {
                    renewed,
                    expired_subscriptions,
                    suspended,
                    expired_rows,
                    applied: if changed {
                        applied_one(model.loaded)
                    } else {
                        Applied::default()
                    },
                };
                check_eq!(trace, report, want, "the billing run's report");
            }
            Op::Cancel => {
                trace.push(format!("{op:?}"));
                let got =
                    tollgate::subscriptions::cancel(self.db, self.ledger, &self.email, model.now)
                        .await;
                let got = self.subscription_change(got, trace).await?;
                let want = model.cancel();
                check_eq!(trace, got, want, "the cancel's answer");
            }
            Op::SetTier { tier } => {
                trace.push(format!("{op:?} at {}", model.now.to_rfc3339()));
                let got = tollgate::subscriptions::set_tier(
                    self.db,
                    self.ledger,
                    plans,
                    &self.email,
                    tier.as_str(),
                    model.now,
                )
                .await;
                let got = self.subscription_change(got, trace).await?;
                let want = model.set_tier(*tier, plans);
                check_eq!(trace, got, want, "the tier change's answer");
            }
            Op::PastDue => {
                trace.push(format!("{op:?} at {}", model.now.to_rfc3339()));
                let (n, _) = self
                    .change(
                        "UPDATE subscriptions SET past_due_since = $2
                          WHERE user_id = $1 AND status = 'active' AND past_due_since IS NULL",
                        &[&user, &model.now],
                    )
                    .await;
                let done = model.past_due();
                check_eq!(
                    trace,
                    n == 1,
                    done,
                    "whether the subscription went past due"
                );
            }
            Op::LoseRedis { reload } => {
                trace.push(format!("{op:?}"));
                forget_balance(self.env, self.ledger, &user).await;
                model.lose_redis();
                if *reload {
                    let bal = self.ledger.load(self.db, &user).await.unwrap();
                    model.loaded = true;
                    check_eq!(
                        trace,
                        bal,
                        model.balance(),
                        "the balance rebuilt from PostgreSQL"
                    );
                    self.tally.note("load after a Redis loss");
                }
            }
        }
        Ok(())
    }

    /// Compares everything the system holds for the user with the model.
    async fn check(
        &self,
        model: &Model,
        plans: &TiersConfig,
        trace: &[String],
    ) -> Result<(), TestCaseError> {
        let user = self.user;
        // Redis: the live account (balance, holds, rows it reflects) and the unflushed.
        let account = self.ledger.account(&user).await.unwrap();
        if model.loaded {
            let Some(a) = account else {
                return Err(fail(
                    trace,
                    "the balance is not loaded; the model has it loaded".into(),
                ));
            };
            check_eq!(trace, a.balance, model.balance(), "the live balance");
            check_eq!(trace, a.held, model.held(), "the credits held");
            check_eq!(
                trace,
                a.granted,
                model.granted(),
                "the credits rows the balance reflects (Σ total)"
            );
        } else {
            check_eq!(trace, account, None, "a balance Redis has lost");
        }
        check_eq!(
            trace,
            self.env.redis_unflushed(&user).await,
            model.unflushed.len() as i64,
            "the charges settled and not flushed"
        );
        if model.balance() < 0 && model.overdraft.is_none() {
            return Err(fail(
                trace,
                format!(
                    "the balance is {} with nothing that allows it below zero",
                    model.balance()
                ),
            ));
        }
        // PostgreSQL: every credits row, the subscription, the usage rows.
        let rows: Vec<Row> = self
            .pg
            .query(
                "SELECT total_credits::bigint, used_credits::bigint, billing_period_end, is_current,
                        subscription_id IS NOT NULL
                   FROM credits WHERE user_id = $1 ORDER BY created_at, id",
                &[&user],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| Row {
                total: r.get(0),
                used: r.get(1),
                end: r.get(2),
                current: r.get(3),
                sub: r.get(4),
            })
            .collect();
        check_eq!(
            trace,
            rows,
            model.rows,
            "the credits rows (total, used, end, current, subscription)"
        );
        let sub: Option<SubRow> = self
            .pg
            .query_opt(
                "SELECT tier::text, status::text, credits_per_month::bigint, billing_interval,
                        current_period_start, current_period_end, past_due_since,
                        scheduled_tier::text, cancelled_at
                   FROM subscriptions WHERE user_id = $1
                  ORDER BY created_at DESC, id DESC LIMIT 1",
                &[&user],
            )
            .await
            .unwrap()
            .map(|r| SubRow {
                tier: r.get(0),
                status: r.get(1),
                credits_per_month: r.get(2),
                billing_interval: r.get(3),
                start: r.get(4),
                end: r.get(5),
                past_due_since: r.get(6),
                scheduled_tier: r.get(7),
                cancelled_at: r.get(8),
            });
        // A subscription holds its tier's plan (copied when it starts or changes tier).
        let want = model.sub.as_ref().map(|s| {
            let plan = plans.plan(s.tier.as_str()).expect("a plan");
            SubRow {
                tier: s.tier.name(),
                status: s.status.as_str().to_owned(),
                credits_per_month: plan.credits_per_month,
                billing_interval: plan.interval.as_str().to_owned(),
                start: s.start,
                end: s.end,
                past_due_since: s.past_due_since,
                scheduled_tier: s.scheduled.map(Tier::name),
                cancelled_at: s.cancelled_at,
            }
        });
        check_eq!(trace, sub, want, "the user's latest subscription");
        let usage = self
            .pg
            .query_one(
                "SELECT count(*), coalesce(sum(credits_used), 0)::bigint FROM usage_history WHERE user_id = $1",
                &[&user],
            )
            .await
            .unwrap();
        check_eq!(
            trace,
            (usage.get::<_, i64>(0), usage.get::<_, i64>(1)),
            (model.usage_rows, model.usage_credits),
            "the usage rows (count, Σ credits_used)"
        );
        let used: i64 = model.rows.iter().map(|r| r.used).sum();
        check_eq!(
            trace,
            usage.get::<_, i64>(1),
            used,
            "Σ usage_history.credits_used against Σ used"
        );
        Ok(())
    }
}

async fn run_case(
    env: &TestEnv,
    ledger: &Ledger,
    db: &Db,
    pg: &tokio_postgres::Client,
    start: &Start,
    ops: &[Op],
    tally: &Tally,
) -> Result<(), TestCaseError> {
    let plans = tiers();
    // The simulated clock starts at the real one, in whole seconds (as PostgreSQL keeps
    // microseconds and the model compares instants).
    let now = Utc
        .timestamp_opt(Utc::now().timestamp(), 0)
        .single()
        .unwrap();
    let (user, email) = System::start(pg, start, now, &plans).await;
    let sys = System {
        env,
        ledger,
        db,
        pg,
        user,
        email,
        tally,
    };
    let mut model = Model::new(now, start, &plans);
    let mut trace = vec![format!("{start:?}")];
    sys.check(&model, &plans, &trace).await?;
    for op in ops {
        sys.apply(&mut model, op, &plans, &mut trace).await?;
        for n in model.notes.drain(..) {
            tally.note(n);
        }
        sys.check(&model, &plans, &trace).await?;
    }
    if model.overdraft.is_some() {
        tally.note("case with a balance allowed below zero");
    }
    // Finally everything reaches PostgreSQL, and PostgreSQL and Redis agree.
    sys.apply(&mut model, &Op::Flush, &plans, &mut trace)
        .await?;
    sys.check(&model, &plans, &trace).await?;
    Ok(())
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The ledger, the library's connections and the test's database for a run.
fn setup() -> (
    tokio::runtime::Runtime,
    TestEnv,
    Ledger,
    Db,
    tokio_postgres::Client,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = rt.block_on(TestEnv::new());
    let (ledger, db, pg) = rt.block_on(async {
        let ledger = Ledger::connect(REDIS, &env.prefix, env.layout.buckets())
            .await
            .unwrap();
        let db = Db::new(&DatabaseConfig {
            url: env.db_url.clone(),
            pool_size: 4,
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            partitions_ahead_months: 1,
        })
        .unwrap();
        (ledger, db, env.db().await)
    });
    (rt, env, ledger, db, pg)
}

/// Sequences the model found the system disagreeing on, fixed since, run as they were
/// found (each compared with the model after every step).
#[test]
fn the_sequences_found_follow_the_model() {
    let (rt, env, ledger, db, pg) = setup();
    let tally = Tally::default();
    let cases = [(
        // A yearly period upgraded to a monthly plan is still a year long: a second
        // upgrade in it prorates the plans' credits for 12 months (7 credits for the
        // day left), not for one month (0) as the billing_interval column would say.
        Start {
            tier: Some(Tier::Enterprise),
            period_left: 1,
            grant: None,
        },
        vec![
            Op::SetTier { tier: Tier::Free },
            Op::SetTier { tier: Tier::Pro },
        ],
    )];
    for (start, ops) in &cases {
        if let Err(e) = rt.block_on(run_case(&env, &ledger, &db, &pg, start, ops, &tally)) {
            panic!("{e}");
        }
    }
}

#[test]
fn the_ledger_follows_its_reference_model() {
    let (rt, env, ledger, db, pg) = setup();
    let mut config = PtConfig {
        failure_persistence: None,
        ..PtConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 24;
    }
    if std::env::var_os("PROPTEST_MAX_SHRINK_ITERS").is_none() {
        config.max_shrink_iters = 128;
    }
    let max_ops = env_usize("TOLLGATE_MODEL_OPS").unwrap_or(30);
    let mut runner = TestRunner::new(config);
    let strategy = (start(), proptest::collection::vec(op(), 1..=max_ops));
    let tally = Tally::default();
    let result = runner.run(&strategy, |(start, ops)| {
        rt.block_on(run_case(&env, &ledger, &db, &pg, &start, &ops, &tally))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!(
        "lifecycle_model tally: {:?}",
        tally.0.lock().map(|m| m.clone())
    );
}
