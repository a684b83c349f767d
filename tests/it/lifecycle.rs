//! The credit lifecycle against real Redis and PostgreSQL: a change of a user's credits
//! rows or subscription status made in PostgreSQL reaches the live balance exactly
//! (holds in flight kept, unflushed charges counted once, a stale snapshot refused),
//! and charges settled after a user's last row was retired still land somewhere.

use crate::harness::*;
use crate::ledger::{charge, flush_until, hold, setup};
use tollgate::db::Db;
use tollgate::ledger::{Ledger, Reserve};
use uuid::Uuid;

/// Σ (total − used) over the user's current rows: what PostgreSQL says is left.
async fn pg_available(env: &TestEnv, user: &Uuid) -> i64 {
    env.db()
        .await
        .query_one(
            "SELECT coalesce(sum(total_credits - used_credits), 0)::bigint FROM credits
              WHERE user_id = $1 AND is_current",
            &[user],
        )
        .await
        .unwrap()
        .get(0)
}

/// Retires the user's current rows and adds one of `total`, queued for a rebase, as a
/// renewal does.
async fn renew(env: &TestEnv, db: &Db, ledger: &Ledger, user: &Uuid, total: i32) {
    let mut c = env.db().await;
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "UPDATE credits SET is_current = false WHERE user_id = $1 AND is_current",
        &[user],
    )
    .await
    .unwrap();
    tx.execute(
        "INSERT INTO credits (user_id, total_credits, billing_period_start, billing_period_end)
         VALUES ($1, $2, now(), now() + interval '30 days')",
        &[user, &total],
    )
    .await
    .unwrap();
    tollgate::lifecycle::queue_rebase(&tx, user).await.unwrap();
    tx.commit().await.unwrap();
    let applied = tollgate::lifecycle::apply_queued(db, ledger, Some(*user))
        .await
        .unwrap();
    assert_eq!(applied.rebased, 1, "{applied:?}");
}

/// Runs `sql` (with the user as $1) in a transaction that queues the user's rebase,
/// then applies the queue, as every lifecycle change does.
async fn change(env: &TestEnv, db: &Db, ledger: &Ledger, user: &Uuid, sql: &str) {
    let mut c = env.db().await;
    let tx = c.transaction().await.unwrap();
    tx.execute(sql, &[user]).await.unwrap();
    tollgate::lifecycle::queue_rebase(&tx, user).await.unwrap();
    tx.commit().await.unwrap();
    tollgate::lifecycle::apply_queued(db, ledger, None)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_new_period_reaches_the_live_balance_keeping_holds_and_unflushed_charges() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 100).await;
    ledger.load(&db, &user).await.unwrap();
    charge(&ledger, user, 20).await; // settled, not flushed
    let rid = Uuid::now_v7();
    let r = ledger
        .reserve(&user, &rid, &hold(30, 60_000))
        .await
        .unwrap();
    assert!(matches!(r, Reserve::Admitted { hold: 30, .. }), "{r:?}");
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(50));

    // The period turns: 80 unspent leave, 500 arrive. The 20 settled in the old period
    // are flushed against the row current when they reach PostgreSQL (the new one).
    renew(&env, &db, &ledger, &user, 500).await;
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(500 - 20 - 30));
    let queued: i64 = env
        .db()
        .await
        .query_one("SELECT count(*) FROM ledger_rebase_queue", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 0, "an applied change leaves the queue");

    // The request in flight settles against its hold, as before the rebase.
    let e = crate::ledger::event(user, rid, 12);
    assert!(ledger.settle(&user, &rid, 12, &e.encode()).await.unwrap());
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(500 - 20 - 12));

    flush_until(&env, &ledger, &db, 100, 1, 2).await;
    assert_eq!(
        pg_available(&env, &user).await,
        ledger.balance(&user).await.unwrap().unwrap(),
        "PostgreSQL and the live balance agree once everything is flushed"
    );
}

#[tokio::test]
async fn a_snapshot_older_than_a_retirement_is_refused() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 100).await;
    ledger.load(&db, &user).await.unwrap();
    let row: Uuid = env
        .db()
        .await
        .query_one("SELECT id FROM credits WHERE user_id = $1", &[&user])
        .await
        .unwrap()
        .get(0);
    // Redis already knows the row is retired (a newer rebase ran) while PostgreSQL,
    // as this rebase reads it, still calls it current: the rebase must not install it.
    let mut r = env.redis().await;
    let _: () = redis::cmd("HSET")
        .arg(ledger.keys(&user).cred)
        .arg(row.to_string())
        .arg(tollgate::ledger::TOMBSTONE)
        .query_async(&mut r)
        .await
        .unwrap();
    let e = ledger.rebase(&db, &user).await.unwrap_err();
    assert!(matches!(e, tollgate::ledger::LedgerError::Contended), "{e}");
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(100));
}

#[tokio::test]
async fn an_inactive_subscription_admits_nothing_until_it_is_active_again() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 100).await;
    let c = env.db().await;
    c.execute(
        "INSERT INTO subscriptions (user_id, tier, status, credits_per_month, price_cents, billing_interval,
                                    current_period_start, current_period_end)
         VALUES ($1, 'pro', 'suspended', 100, 0, 'monthly', now(), now() + interval '1 month')",
        &[&user],
    )
    .await
    .unwrap();
    ledger.load(&db, &user).await.unwrap();
    let r = ledger
        .reserve(&user, &Uuid::now_v7(), &hold(1, 60_000))
        .await
        .unwrap();
    assert_eq!(r, Reserve::Inactive);
    assert_eq!(
        ledger.balance(&user).await.unwrap(),
        Some(100),
        "nothing held"
    );

    change(
        &env,
        &db,
        &ledger,
        &user,
        "UPDATE subscriptions SET status = 'active' WHERE user_id = $1",
    )
    .await;
    let r = ledger
        .reserve(&user, &Uuid::now_v7(), &hold(1, 60_000))
        .await
        .unwrap();
    assert!(matches!(r, Reserve::Admitted { .. }), "{r:?}");
}

#[tokio::test]
async fn a_charge_settled_after_the_last_row_expired_lands_on_a_carry_row() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 100).await;
    ledger.load(&db, &user).await.unwrap();
    charge(&ledger, user, 30).await; // settled, not flushed
                                     // The user's only row (a grant) expires before the charge reaches PostgreSQL.
    change(
        &env,
        &db,
        &ledger,
        &user,
        "UPDATE credits SET is_current = false WHERE user_id = $1",
    )
    .await;
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(-30));

    flush_until(&env, &ledger, &db, 100, 1, 1).await;
    let row = env
        .db()
        .await
        .query_one(
            "SELECT total_credits, used_credits, subscription_id IS NULL,
                    (SELECT credit_id FROM usage_history WHERE user_id = $1) = credits.id
               FROM credits WHERE user_id = $1 AND is_current",
            &[&user],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 0, "a zero-credit carry row");
    assert_eq!(row.get::<_, i32>(1), 30, "which took the charge");
    assert!(row.get::<_, bool>(3), "and which the usage row names");
    assert_eq!(pg_available(&env, &user).await, -30);
    // A balance rebuilt from PostgreSQL says the same as the live one.
    crate::ledger::forget_balance(&env, &ledger, &user).await;
    assert_eq!(ledger.load(&db, &user).await.unwrap(), -30);
}

// ---------------------------------------------------------------------------------
// The billing run through the real binary.

/// A test environment whose `pro` plan is small and rolls over at most 100 credits;
/// the gateways' own billing job is off, so `billing run --now` alone moves time.
async fn billing_env() -> TestEnv {
    let mut env = TestEnv::new().await;
    env.env("TOLLGATE__TIERS__PRO__CREDITS_PER_MONTH", "1000");
    env.env("TOLLGATE__TIERS__PRO__ROLLOVER_CAP", "100");
    env.env("TOLLGATE__BILLING__ENABLED", "false");
    env
}

/// A `pro` user (first period's credits from the plan); returns (id, email, token).
async fn pro_user(env: &TestEnv) -> (Uuid, String, String) {
    let email = format!(
        "p{}@example.com",
        &Uuid::new_v4().simple().to_string()[..10]
    );
    let id = Uuid::parse_str(
        &env.cli(&["user", "create", "--email", &email, "--tier", "pro"])
            .await,
    )
    .unwrap();
    let token = env.cli(&["token", "issue", "--email", &email]).await;
    (id, email, token)
}

/// The end of the user's current subscription period.
async fn period_end(env: &TestEnv, user: &Uuid) -> chrono::DateTime<chrono::Utc> {
    env.db()
        .await
        .query_one(
            "SELECT current_period_end FROM subscriptions WHERE user_id = $1",
            &[user],
        )
        .await
        .unwrap()
        .get(0)
}

/// (total, used, is_current) of each of the user's rows, oldest first.
async fn rows_of(env: &TestEnv, user: &Uuid) -> Vec<(i32, i32, bool)> {
    env.db()
        .await
        .query(
            "SELECT total_credits, used_credits, is_current FROM credits WHERE user_id = $1
              ORDER BY created_at, billing_period_end",
            &[user],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn billing_run(env: &TestEnv, now: chrono::DateTime<chrono::Utc>) -> String {
    env.cli(&["billing", "run", "--now", &now.to_rfc3339()])
        .await
}

/// Waits until every usage event is in PostgreSQL (nothing pending in Redis).
async fn drained(env: &TestEnv, user: &Uuid) {
    for _ in 0..500 {
        if env.redis_unflushed(user).await == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("usage of {user} not flushed");
}

#[tokio::test]
async fn a_period_turns_once_with_its_capped_rollover_and_the_rest_leaves_the_live_balance() {
    let env = billing_env().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, _, token) = pro_user(&env).await;
    let (s, _, _) = env.chat(&gw, &token, hello(16)).await;
    assert_eq!(s, 200);
    drained(&env, &user).await;
    let spent = rows_of(&env, &user).await[0].1;
    assert!(spent > 0);
    let before = env.redis_balance(&user).await.unwrap();
    assert_eq!(before, 1000 - i64::from(spent));

    // Not yet: a run before the period's end changes nothing.
    let end = period_end(&env, &user).await;
    let out = billing_run(&env, end - chrono::Duration::seconds(1)).await;
    assert!(out.contains("0 renewed"), "{out}");
    assert_eq!(rows_of(&env, &user).await.len(), 1);

    // Two runs at once, just past the end: exactly one new period.
    let at = end + chrono::Duration::seconds(1);
    let (a, b) = tokio::join!(billing_run(&env, at), billing_run(&env, at));
    let renewed: usize = [a.as_str(), b.as_str()]
        .iter()
        .filter(|o| o.contains(" 1 renewed"))
        .count();
    assert_eq!(renewed, 1, "{a}\n{b}");
    let rows = rows_of(&env, &user).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        rows[0],
        (1000, spent, false),
        "the old period is retired as it was"
    );
    assert_eq!(
        rows[1],
        (1000 + 100, 0, true),
        "the plan's credits + the capped rollover"
    );
    let sub = env
        .db()
        .await
        .query_one(
            "SELECT current_period_start, current_period_end FROM subscriptions WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap();
    assert_eq!(sub.get::<_, chrono::DateTime<chrono::Utc>>(0), end);
    assert!(sub.get::<_, chrono::DateTime<chrono::Utc>>(1) > end + chrono::Duration::days(27));
    // The live balance: the old remainder left, the new period arrived.
    assert_eq!(env.redis_balance(&user).await, Some(1100));
    // And a third run finds nothing to do.
    let out = billing_run(&env, at).await;
    assert!(out.contains("0 renewed"), "{out}");
    assert_eq!(rows_of(&env, &user).await.len(), 2);
    let (s, _, _) = env.chat(&gw, &token, hello(16)).await;
    assert_eq!(s, 200);
    drained(&env, &user).await;
    let rows = rows_of(&env, &user).await;
    assert_eq!(
        env.redis_balance(&user).await.unwrap(),
        i64::from(rows[1].0 - rows[1].1),
        "the live balance and PostgreSQL agree: {rows:?}"
    );
}

#[tokio::test]
async fn grants_are_spent_soonest_expiring_first_split_exactly_and_expire() {
    let env = billing_env().await;
    let mock = env.mock(&["--completion-tokens", "4000"]).await;
    let gw = env.gateway(&mock).await;
    let (user, email, token) = pro_user(&env).await;
    let soon = chrono::Utc::now() + chrono::Duration::days(3);
    let later = chrono::Utc::now() + chrono::Duration::days(10);
    env.cli(&[
        "credits",
        "grant",
        "--email",
        &email,
        "--amount",
        "5",
        "--expires-at",
        &soon.to_rfc3339(),
    ])
    .await;
    env.cli(&[
        "credits",
        "grant",
        "--email",
        &email,
        "--amount",
        "40",
        "--expires-at",
        &later.to_rfc3339(),
    ])
    .await;
    let (s, _, _) = env.chat(&gw, &token, hello(4000)).await;
    assert_eq!(s, 200);
    drained(&env, &user).await;
    let charged: i64 = env
        .db()
        .await
        .query_one("SELECT sum(credits_used)::bigint FROM usage_history", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        charged > 5,
        "the charge must be larger than the first grant: {charged}"
    );
    // Soonest first: the 5 of the grant ending in 3 days, the rest from the one ending in
    // 10 days, nothing from the period (ending in a month).
    let c = env.db().await;
    let used = |end: chrono::DateTime<chrono::Utc>| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT used_credits FROM credits WHERE user_id = $1
                  ORDER BY abs(extract(epoch FROM billing_period_end - $2::timestamptz)) LIMIT 1",
                &[&user, &end],
            )
            .await
            .unwrap()
            .get::<_, i32>(0)
        }
    };
    assert_eq!(used(soon).await, 5);
    assert_eq!(i64::from(used(later).await), charged - 5);
    assert_eq!(used(period_end(&env, &user).await).await, 0);
    let before = env.redis_balance(&user).await.unwrap();
    assert_eq!(before, 1000 + 45 - charged);

    // The first grant has nothing left; the second expires with 45 − charged left.
    let out = billing_run(&env, later + chrono::Duration::seconds(1)).await;
    assert!(out.contains("2 credits rows expired"), "{out}");
    assert_eq!(env.redis_balance(&user).await, Some(1000));
    let current: i64 = c
        .query_one(
            "SELECT count(*) FROM credits WHERE user_id = $1 AND is_current",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(current, 1, "only the period is left");
}

#[tokio::test]
async fn inactive_subscriptions_get_403_subscription_inactive() {
    let env = billing_env().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, _, token) = pro_user(&env).await;
    let (s, _, _) = env.chat(&gw, &token, hello(16)).await;
    assert_eq!(s, 200, "loaded and active");
    let c = env.db().await;
    // Past due: served through the grace (72 hours by default)...
    c.execute(
        "UPDATE subscriptions SET past_due_since = now() WHERE user_id = $1",
        &[&user],
    )
    .await
    .unwrap();
    let out = billing_run(&env, chrono::Utc::now() + chrono::Duration::hours(71)).await;
    assert!(out.contains("0 suspended"), "{out}");
    let (s, _, _) = env.chat(&gw, &token, hello(16)).await;
    assert_eq!(s, 200);
    // ...then suspended, and refused at once, before any hold or upstream call.
    let calls = env.mock_stats(&mock).await;
    let out = billing_run(&env, chrono::Utc::now() + chrono::Duration::hours(73)).await;
    assert!(out.contains("1 suspended"), "{out}");
    let before = env.redis_balance(&user).await;
    let (s, h, b) = env.chat(&gw, &token, hello(16)).await;
    assert_eq!(s, 403, "{}", String::from_utf8_lossy(&b));
    let e = openai_error(&b);
    assert_eq!(e["code"], "subscription_inactive");
    assert_eq!(h.get("x-should-retry").map(String::as_str), Some("false"));
    assert_eq!(
        env.redis_balance(&user).await,
        before,
        "nothing held or charged"
    );
    assert_eq!(env.mock_stats(&mock).await, calls, "nothing sent upstream");
}

#[tokio::test]
async fn a_cancelled_subscription_is_served_to_its_period_end_then_expires() {
    let env = billing_env().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, _, token) = pro_user(&env).await;
    env.db()
        .await
        .execute(
            "UPDATE subscriptions SET status = 'cancelled', cancelled_at = now() WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap();
    let (s, _, _) = env.chat(&gw, &token, hello(16)).await;
    assert_eq!(s, 200, "still served in its last period");
    let end = period_end(&env, &user).await;
    let out = billing_run(&env, end + chrono::Duration::seconds(1)).await;
    assert!(out.contains("1 expired"), "{out}");
    let status: String = env
        .db()
        .await
        .query_one(
            "SELECT status::text FROM subscriptions WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "expired");
    let (s, _, b) = env.chat(&gw, &token, hello(16)).await;
    assert_eq!(s, 403);
    assert_eq!(openai_error(&b)["code"], "subscription_inactive");
    assert!(
        rows_of(&env, &user).await.iter().all(|r| !r.2),
        "no current row left"
    );
}

/// (credits rows, queued rebases): what a refused command must leave as it was.
async fn credits_and_queue(env: &TestEnv) -> (i64, i64) {
    let c = env.db().await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM credits", &[])
        .await
        .unwrap()
        .get(0);
    let q: i64 = c
        .query_one("SELECT count(*) FROM ledger_rebase_queue", &[])
        .await
        .unwrap()
        .get(0);
    (n, q)
}

#[tokio::test]
async fn bad_grant_and_billing_arguments_are_refused_and_change_nothing() {
    let env = billing_env().await;
    let (user, email, _) = pro_user(&env).await;
    let before = credits_and_queue(&env).await;
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "credits",
                "grant",
                "--email",
                "nobody@example.com",
                "--amount",
                "5",
            ],
            "no user",
        ),
        (
            vec!["credits", "grant", "--email", &email, "--amount", "-5"],
            "positive",
        ),
        (
            vec!["credits", "grant", "--email", &email, "--amount", "0"],
            "positive",
        ),
        (
            vec![
                "credits",
                "grant",
                "--email",
                &email,
                "--amount",
                "5",
                "--expires-at",
                &past,
            ],
            "not in the future",
        ),
        (
            vec![
                "credits",
                "grant",
                "--email",
                &email,
                "--amount",
                "5",
                "--expires-at",
                "tomorrow",
            ],
            "RFC 3339",
        ),
        (
            vec![
                "credits",
                "grant",
                "--email",
                &email,
                "--amount",
                "5",
                "--expires-days",
                "0",
            ],
            "positive",
        ),
        (vec!["billing", "run", "--now", "yesterday"], "RFC 3339"),
    ];
    for (args, says) in cases {
        let (ok, _, err) = env.cli_raw(&args, &[]).await;
        assert!(!ok, "{args:?} must fail");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(
            credits_and_queue(&env).await,
            before,
            "{args:?} changed something"
        );
    }
    assert_eq!(rows_of(&env, &user).await.len(), 1);
}

// ---------------------------------------------------------------------------------
// Reconciliation.

#[tokio::test]
async fn reconciliation_counts_holds_and_unflushed_charges_and_finds_a_hand_made_drift() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 100).await;
    ledger.load(&db, &user).await.unwrap();
    charge(&ledger, user, 20).await; // settled, not flushed
    let r = ledger
        .reserve(&user, &Uuid::now_v7(), &hold(30, 60_000))
        .await
        .unwrap();
    assert!(matches!(r, Reserve::Admitted { .. }));
    let report = tollgate::reconcile::reconcile(&db, &ledger, None, false)
        .await
        .unwrap();
    assert_eq!(report.users, 1);
    assert!(report.drifting.is_empty(), "{report:?}");

    // Someone edits the balance by hand.
    let mut r = env.redis().await;
    let _: i64 = redis::cmd("HINCRBY")
        .arg(ledger.keys(&user).acct)
        .arg("bal")
        .arg(7)
        .query_async(&mut r)
        .await
        .unwrap();
    let report = tollgate::reconcile::reconcile(&db, &ledger, None, false)
        .await
        .unwrap();
    assert_eq!(report.drifting.len(), 1, "{report:?}");
    assert_eq!(report.drifting[0].user, user);
    assert_eq!(report.drifting[0].credits(), 7);
    assert_eq!(report.drifting[0].recorded, 100);
    assert_eq!(report.fixed, 0);
    assert_eq!(
        ledger.balance(&user).await.unwrap(),
        Some(57),
        "no fix without --fix"
    );

    let report = tollgate::reconcile::reconcile(&db, &ledger, Some(user), true)
        .await
        .unwrap();
    assert_eq!(report.fixed, 1);
    // Rebuilt as after a Redis loss: the unflushed 20 counted, the lost hold's request
    // will be charged in full when it settles.
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(80));
    let report = tollgate::reconcile::reconcile(&db, &ledger, None, false)
        .await
        .unwrap();
    assert!(report.drifting.is_empty(), "{report:?}");
}

#[tokio::test]
async fn serve_exports_the_drift_and_the_cli_reports_and_fixes_it() {
    let mut env = TestEnv::new().await;
    env.env("TOLLGATE__BILLING__RECONCILE_INTERVAL_MS", "100");
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, token) = env.user(1000).await;
    let (s, _, _) = env.chat(&gw, &token, hello(16)).await;
    assert_eq!(s, 200);
    drained(&env, &user).await;
    env.cli(&["ledger", "reconcile"]).await;

    let mut r = env.redis().await;
    let _: i64 = redis::cmd("HINCRBY")
        .arg(env.layout.acct_key(&user))
        .arg("bal")
        .arg(-5)
        .query_async(&mut r)
        .await
        .unwrap();
    let mut seen = None;
    for _ in 0..100 {
        let m = env.metrics(&gw).await;
        seen = m
            .lines()
            .find_map(|l| l.strip_prefix("tollgate_ledger_drift_credits "))
            .map(str::to_owned);
        if seen.as_deref() == Some("5") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seen.as_deref(), Some("5"), "the gauge shows the drift");
    assert!(gw
        .log_text()
        .contains("live balance drifts from PostgreSQL"));

    let (ok, out, err) = env.cli_raw(&["ledger", "reconcile"], &[]).await;
    assert!(!ok, "drift is an error: {out}");
    assert!(out.contains(&format!("drift -5 user {user}")), "{out}");
    assert!(err.contains("--fix"), "{err}");
    let out = env.cli(&["ledger", "reconcile", "--fix"]).await;
    assert!(out.contains("1 rebuilt"), "{out}");
    env.cli(&["ledger", "reconcile"]).await;
    let (s, _, _) = env.chat(&gw, &token, hello(16)).await;
    assert_eq!(s, 200, "the rebuilt balance serves");

    let (ok, _, err) = env
        .cli_raw(
            &["ledger", "reconcile", "--email", "nobody@example.com"],
            &[],
        )
        .await;
    assert!(!ok);
    assert!(err.contains("no user with email"), "{err}");
}

#[tokio::test]
async fn periods_turn_under_load_from_two_gateways_and_the_ledger_stays_exact() {
    const USERS: usize = 6;
    const PER_USER: usize = 24;
    let env = billing_env().await;
    let mock = env
        .mock(&["--completion-tokens", "4000", "--latency-ms", "5"])
        .await;
    let gws = [env.gateway(&mock).await, env.gateway(&mock).await];
    let mut users = Vec::new();
    for _ in 0..USERS {
        users.push(pro_user(&env).await);
    }
    let mut end = period_end(&env, &users[0].0).await;
    for (u, _, _) in &users {
        end = end.max(period_end(&env, u).await);
    }
    let at = end + chrono::Duration::seconds(1);

    // Every user's requests through both gateways, spread over about a second and a
    // half; once a third of them are answered, two billing runs race the turn of every
    // period while the rest go on.
    let done = std::sync::atomic::AtomicUsize::new(0);
    let load = futures_util::future::join_all((0..USERS * PER_USER).map(|i| {
        let (_, _, token) = &users[i % USERS];
        let gw = &gws[i % 2];
        let (env, done) = (&env, &done);
        async move {
            tokio::time::sleep(std::time::Duration::from_millis((i / USERS) as u64 * 60)).await;
            let s = env.chat(gw, token, hello(4000)).await.0;
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            s
        }
    }));
    let billing = async {
        while done.load(std::sync::atomic::Ordering::SeqCst) < USERS * PER_USER / 3 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tokio::join!(billing_run(&env, at), billing_run(&env, at))
    };
    let (statuses, (a, b)) = tokio::join!(load, billing);
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, USERS * PER_USER, "every request served: {statuses:?}");
    let renewed: usize = [&a, &b]
        .iter()
        .map(|o| {
            o.split(" renewed")
                .next()
                .and_then(|p| p.rsplit(' ').next())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(renewed, USERS, "each period turned once:\n{a}\n{b}");

    for (u, _, _) in &users {
        drained(&env, u).await;
    }
    let c = env.db().await;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM usage_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, (USERS * PER_USER) as i64, "one row per success");
    let (charged, used): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT (SELECT sum(credits_used)::bigint FROM usage_history),
                        (SELECT sum(used_credits)::bigint FROM credits)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(charged, used, "every charge is on exactly one row");
    for (u, _, _) in &users {
        let rows = rows_of(&env, u).await;
        assert_eq!(rows.len(), 2, "{rows:?}");
        let (old, new) = (rows[0], rows[1]);
        assert!(!old.2 && new.2, "{rows:?}");
        assert!(
            old.1 > 0 && new.1 > 0,
            "the turn fell inside the load: charges on both periods {rows:?}"
        );
        assert_eq!(
            new.0,
            1000 + (old.0 - old.1).clamp(0, 100),
            "rollover from what the old period had left when it was retired: {rows:?}"
        );
        assert_eq!(env.redis_held(u).await, 0);
        let live = env.redis_balance(u).await.unwrap();
        assert!(live >= 0);
        assert_eq!(
            live,
            i64::from(new.0 - new.1),
            "the live balance is PostgreSQL's current row: {rows:?}"
        );
    }
}

#[tokio::test]
async fn a_scheduled_downgrade_starts_with_the_next_period_and_its_plan() {
    let mut env = billing_env().await;
    env.env("TOLLGATE__TIERS__FREE__CREDITS_PER_MONTH", "300");
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let (user, email, token) = pro_user(&env).await;
    env.cli(&["subscriptions", "set", "--email", &email, "--tier", "free"])
        .await;
    let (s, _, b) = env
        .request("GET", &gw.url("/v1/users/me"), Some(&token), None)
        .await;
    assert_eq!(s, 200);
    let me = json(&b);
    assert_eq!(me["subscription"]["tier"], "pro", "{me}");
    assert_eq!(me["subscription"]["scheduled_tier"], "free", "{me}");
    assert!(me["subscription"]["past_due_since"].is_null(), "{me}");
    let end = period_end(&env, &user).await;
    let out = billing_run(&env, end + chrono::Duration::seconds(1)).await;
    assert!(out.contains("1 renewed"), "{out}");
    let s = env
        .db()
        .await
        .query_one(
            "SELECT tier::text, scheduled_tier IS NULL, credits_per_month, price_cents
               FROM subscriptions WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap();
    assert_eq!(s.get::<_, String>(0), "free");
    assert!(s.get::<_, bool>(1), "the schedule is used up");
    assert_eq!(s.get::<_, i32>(2), 300);
    assert_eq!(s.get::<_, i32>(3), 0);
    let rows = rows_of(&env, &user).await;
    // The free plan's credits; its rollover cap (0) applies, not pro's.
    assert_eq!(rows[1], (300, 0, true), "{rows:?}");
    assert_eq!(
        env.redis_balance(&user).await,
        None,
        "never loaded: reads PostgreSQL"
    );
    let (s, _, _) = env.chat(&gw, &token, hello(16)).await;
    assert_eq!(s, 200);
    drained(&env, &user).await;
    let rows = rows_of(&env, &user).await;
    assert_eq!(
        env.redis_balance(&user).await,
        Some(i64::from(rows[1].0 - rows[1].1))
    );
}

#[tokio::test]
async fn serve_turns_ended_periods_by_itself_once_across_two_replicas() {
    let mut env = TestEnv::new().await;
    env.env("TOLLGATE__BILLING__INTERVAL_MS", "100");
    let mock = env.mock(&[]).await;
    let (user, _, token) = pro_user(&env).await;
    // The period ended a minute ago (as if the gateways had been down over its end).
    env.db()
        .await
        .execute(
            "WITH s AS (UPDATE subscriptions SET current_period_start = now() - interval '1 month',
                                               current_period_end = now() - interval '1 minute'
                         WHERE user_id = $1 RETURNING id)
             UPDATE credits SET billing_period_start = now() - interval '1 month',
                                billing_period_end = now() - interval '1 minute'
              WHERE subscription_id = (SELECT id FROM s)",
            &[&user],
        )
        .await
        .unwrap();
    let gws = [env.gateway(&mock).await, env.gateway(&mock).await];
    let n = env
        .wait_for_count(
            &format!("SELECT count(*) FROM credits WHERE user_id = '{user}' AND is_current AND billing_period_end > now()"),
            1,
            std::time::Duration::from_secs(20),
        )
        .await;
    assert_eq!(n, 1, "a replica turned the period");
    // Several more turns of both jobs change nothing.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let rows = rows_of(&env, &user).await;
    assert_eq!(rows.len(), 2, "exactly one new period: {rows:?}");
    assert!(!rows[0].2 && rows[1].2, "{rows:?}");
    for g in &gws {
        let m = env.metrics(g).await;
        assert!(
            counter(&m, "tollgate_billing_runs_total{outcome=\"ran\"}")
                + counter(&m, "tollgate_billing_runs_total{outcome=\"skipped\"}")
                > 1,
            "each replica's job keeps turning"
        );
    }
    let (s, _, _) = env.chat(&gws[0], &token, hello(16)).await;
    assert_eq!(s, 200, "served from the new period");
}
