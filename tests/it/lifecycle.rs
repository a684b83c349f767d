//! The credit lifecycle against real Redis and PostgreSQL: a change of a user's credits
//! rows or subscription status made in PostgreSQL reaches the live balance exactly
//! (holds in flight kept, unflushed charges counted once, a stale snapshot refused),
//! and charges settled after a user's last row was retired still land somewhere.

use crate::harness::*;
use crate::ledger::{charge, hold, setup, start_flusher, stop_flusher};
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

    let flusher = start_flusher(&ledger, &db, 100, 1, 20);
    env.wait_for_count(
        "SELECT count(*) FROM usage_history",
        2,
        std::time::Duration::from_secs(20),
    )
    .await;
    stop_flusher(flusher).await;
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

    let mut c = env.db().await;
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "UPDATE subscriptions SET status = 'active' WHERE user_id = $1",
        &[&user],
    )
    .await
    .unwrap();
    tollgate::lifecycle::queue_rebase(&tx, &user).await.unwrap();
    tx.commit().await.unwrap();
    tollgate::lifecycle::apply_queued(&db, &ledger, None)
        .await
        .unwrap();
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
    let mut c = env.db().await;
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "UPDATE credits SET is_current = false WHERE user_id = $1",
        &[&user],
    )
    .await
    .unwrap();
    tollgate::lifecycle::queue_rebase(&tx, &user).await.unwrap();
    tx.commit().await.unwrap();
    tollgate::lifecycle::apply_queued(&db, &ledger, None)
        .await
        .unwrap();
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(-30));

    let flusher = start_flusher(&ledger, &db, 100, 1, 20);
    env.wait_for_count(
        "SELECT count(*) FROM usage_history",
        1,
        std::time::Duration::from_secs(20),
    )
    .await;
    stop_flusher(flusher).await;
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
