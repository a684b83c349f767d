//! `tollgate subscriptions set|cancel`, black-box: the real binary against real
//! PostgreSQL and Redis. An upgrade now (prorated credits, reaching the live balance),
//! a downgrade at the period's end, a cancellation served until then, and bad input
//! that changes nothing.

use crate::harness::*;
use chrono::{DateTime, Utc};
use uuid::Uuid;

fn email() -> String {
    format!(
        "s{}@example.com",
        &Uuid::new_v4().simple().to_string()[..10]
    )
}

/// Creates a user with `--tier` (or `--no-subscription` for `None`); returns the id.
async fn user_with(env: &TestEnv, email: &str, tier: Option<&str>) -> Uuid {
    let mut args = vec!["user", "create", "--email", email];
    match tier {
        Some(t) => args.extend(["--tier", t]),
        None => args.push("--no-subscription"),
    }
    Uuid::parse_str(&env.cli(&args).await).unwrap()
}

/// (tier, status, credits_per_month, price_cents, scheduled_tier, cancelled_at is set,
/// current_period_end) of the user's only subscription.
async fn subscription(
    env: &TestEnv,
    user: &Uuid,
) -> (
    String,
    String,
    i32,
    i32,
    Option<String>,
    bool,
    DateTime<Utc>,
) {
    let rows = env
        .db()
        .await
        .query(
            "SELECT tier::text, status::text, credits_per_month, price_cents, scheduled_tier::text,
                    cancelled_at IS NOT NULL, current_period_end
               FROM subscriptions WHERE user_id = $1",
            &[user],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    (
        r.get(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get(6),
    )
}

/// The total of the user's current credits rows.
async fn current_total(env: &TestEnv, user: &Uuid) -> i64 {
    env.db()
        .await
        .query_one(
            "SELECT coalesce(sum(total_credits), 0)::bigint FROM credits WHERE user_id = $1 AND is_current",
            &[user],
        )
        .await
        .unwrap()
        .get(0)
}

/// Every row of the tables a subscription command may touch, as text.
async fn snapshot(env: &TestEnv) -> Vec<String> {
    let db = env.db().await;
    let mut out = Vec::new();
    for (table, order) in [
        ("users", "id"),
        ("subscriptions", "id"),
        ("credits", "id"),
        ("ledger_rebase_queue", "user_id"),
    ] {
        out.push(
            db.query_one(
                &format!("SELECT coalesce(json_agg(t ORDER BY {order})::text, '') FROM {table} t"),
                &[],
            )
            .await
            .unwrap()
            .get(0),
        );
    }
    out
}

async fn queued(env: &TestEnv) -> i64 {
    env.db()
        .await
        .query_one("SELECT count(*) FROM ledger_rebase_queue", &[])
        .await
        .unwrap()
        .get(0)
}

async fn db_now(env: &TestEnv) -> DateTime<Utc> {
    env.db()
        .await
        .query_one("SELECT now()", &[])
        .await
        .unwrap()
        .get(0)
}

/// The proration rule: floor((new − old) × remaining / period), whole seconds.
fn rule(old: i64, new: i64, start: DateTime<Utc>, end: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    let period = (end - start).num_seconds();
    let remaining = (end - now).num_seconds().clamp(0, period);
    (new - old) * remaining / period
}

#[tokio::test]
async fn an_upgrade_takes_effect_now_with_prorated_credits_in_the_live_balance() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let email = email();
    let user = user_with(&env, &email, Some("free")).await;
    // A third of the period gone.
    let db = env.db().await;
    let (start, end): (DateTime<Utc>, DateTime<Utc>) = {
        let r = db
            .query_one(
                "WITH s AS (UPDATE subscriptions SET current_period_start = now() - interval '10 days',
                                                     current_period_end = now() + interval '20 days'
                             WHERE user_id = $1 RETURNING current_period_start, current_period_end)
                 UPDATE credits c SET billing_period_start = s.current_period_start,
                                      billing_period_end = s.current_period_end
                   FROM s WHERE c.user_id = $1
                 RETURNING c.billing_period_start, c.billing_period_end",
                &[&user],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    // Spend a little, so the balance is loaded in Redis and below the period's total.
    let token = env.cli(&["token", "issue", "--email", &email]).await;
    let (s, _, _) = env.chat(&gw, &token, hello(20)).await;
    assert_eq!(s, 200);
    let live = env.redis_balance(&user).await.unwrap();
    assert!(live < 1_000, "{live}");

    let before = db_now(&env).await;
    let out = env
        .cli(&["subscriptions", "set", "--email", &email, "--tier", "pro"])
        .await;
    let after = db_now(&env).await;
    assert!(out.contains("upgraded from free to pro"), "{out}");

    let added = current_total(&env, &user).await - 1_000;
    let (most, least) = (
        rule(1_000, 100_000, start, end, before),
        rule(1_000, 100_000, start, end, after),
    );
    assert!(
        (least..=most).contains(&added),
        "{added} credits added, the rule gives {least}..={most}"
    );
    assert!(
        (65_000..=66_000).contains(&added),
        "two thirds of 99000: {added}"
    );
    assert!(out.contains(&format!("{added} credits added")), "{out}");
    let (tier, status, per_month, price, scheduled, cancelled, period_end) =
        subscription(&env, &user).await;
    assert_eq!(
        (
            tier.as_str(),
            status.as_str(),
            per_month,
            price,
            scheduled,
            cancelled
        ),
        ("pro", "active", 100_000, 1_999, None, false)
    );
    assert_eq!(period_end, end, "the period does not move");
    // In the live balance at once, and applied.
    assert_eq!(env.redis_balance(&user).await, Some(live + added));
    assert_eq!(queued(&env).await, 0);
    // Spendable: a request passes and is charged against the larger balance.
    let (s, _, _) = env.chat(&gw, &token, hello(20)).await;
    assert_eq!(s, 200);
    assert!(env.redis_balance(&user).await.unwrap() < live + added);
}

#[tokio::test]
async fn a_downgrade_waits_for_the_period_end_and_the_same_tier_changes_nothing() {
    let env = TestEnv::new().await;
    let email = email();
    let user = user_with(&env, &email, Some("pro")).await;
    let (.., end) = subscription(&env, &user).await;

    let out = env
        .cli(&["subscriptions", "set", "--email", &email, "--tier", "free"])
        .await;
    assert!(out.contains("then free"), "{out}");
    let s = subscription(&env, &user).await;
    assert_eq!(
        (s.0.as_str(), s.1.as_str(), s.2, s.3, s.4.as_deref(), s.6),
        ("pro", "active", 100_000, 1_999, Some("free"), end),
        "still pro until the period ends"
    );
    assert_eq!(
        current_total(&env, &user).await,
        100_000,
        "no credits taken"
    );

    // Asking again changes nothing.
    let snap = snapshot(&env).await;
    let out = env
        .cli(&["subscriptions", "set", "--email", &email, "--tier", "free"])
        .await;
    assert!(out.contains("nothing changed"), "{out}");
    assert_eq!(snapshot(&env).await, snap);

    // Back to the current tier: the downgrade is withdrawn.
    let out = env
        .cli(&["subscriptions", "set", "--email", &email, "--tier", "pro"])
        .await;
    assert!(out.contains("withdrawn"), "{out}");
    assert_eq!(subscription(&env, &user).await.4, None);

    // The same tier again: a no-op, and says so.
    let snap = snapshot(&env).await;
    let out = env
        .cli(&["subscriptions", "set", "--email", &email, "--tier", "pro"])
        .await;
    assert!(out.contains("already on pro; nothing changed"), "{out}");
    assert_eq!(snapshot(&env).await, snap);

    // An upgrade withdraws a scheduled downgrade too.
    env.cli(&["subscriptions", "set", "--email", &email, "--tier", "free"])
        .await;
    env.cli(&[
        "subscriptions",
        "set",
        "--email",
        &email,
        "--tier",
        "enterprise",
    ])
    .await;
    let s = subscription(&env, &user).await;
    assert_eq!((s.0.as_str(), s.4), ("enterprise", None));
    assert!(current_total(&env, &user).await > 100_000);
}

#[tokio::test]
async fn a_cancelled_subscription_is_served_until_its_period_ends() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let email = email();
    let user = user_with(&env, &email, Some("pro")).await;
    env.cli(&["subscriptions", "set", "--email", &email, "--tier", "free"])
        .await;
    let (.., end) = subscription(&env, &user).await;

    let before = db_now(&env).await;
    let out = env
        .cli(&["subscriptions", "cancel", "--email", &email])
        .await;
    assert!(out.contains("cancelled the pro subscription"), "{out}");
    let (tier, status, _, _, scheduled, _, period_end) = subscription(&env, &user).await;
    assert_eq!(
        (tier.as_str(), status.as_str(), scheduled, period_end),
        ("pro", "cancelled", None, end),
        "cancelled at period end; the scheduled downgrade is moot"
    );
    let cancelled_at: DateTime<Utc> = env
        .db()
        .await
        .query_one(
            "SELECT cancelled_at FROM subscriptions WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert!(cancelled_at >= before && cancelled_at <= db_now(&env).await);
    assert_eq!(current_total(&env, &user).await, 100_000);
    assert_eq!(queued(&env).await, 0);

    // Still served, with its tier's rate limits.
    let gw = env
        .gateway_with(
            &mock,
            &[
                ("TOLLGATE__TIERS__PRO__REQUESTS_PER_MINUTE", "5"),
                ("TOLLGATE__TIERS__FREE__REQUESTS_PER_MINUTE", "1"),
            ],
        )
        .await;
    let token = env.cli(&["token", "issue", "--email", &email]).await;
    let (s, h, b) = env.chat(&gw, &token, hello(20)).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h["x-ratelimit-limit-requests"], "5");
    // Its usage flushed, so that the database stands still.
    assert_eq!(
        env.wait_for_count("SELECT count(*) FROM usage_history", 1, FLUSH_WAIT)
            .await,
        1
    );

    // Cancelling again changes nothing.
    let snap = snapshot(&env).await;
    let out = env
        .cli(&["subscriptions", "cancel", "--email", &email])
        .await;
    assert!(out.contains("already cancelled"), "{out}");
    assert_eq!(snapshot(&env).await, snap);

    // `set` resumes it.
    let out = env
        .cli(&["subscriptions", "set", "--email", &email, "--tier", "pro"])
        .await;
    assert!(out.contains("cancellation withdrawn"), "{out}");
    let (_, status, _, _, _, cancelled, _) = subscription(&env, &user).await;
    assert_eq!((status.as_str(), cancelled), ("active", false));
}

#[tokio::test]
async fn set_starts_a_subscription_for_a_user_without_one() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    let email = email();
    let user = user_with(&env, &email, None).await;
    env.grant(&email, 500).await;
    let token = env.cli(&["token", "issue", "--email", &email]).await;
    assert_eq!(env.chat(&gw, &token, hello(20)).await.0, 200);
    let live = env.redis_balance(&user).await.unwrap();

    let out = env
        .cli(&[
            "subscriptions",
            "set",
            "--email",
            &email,
            "--tier",
            "enterprise",
        ])
        .await;
    assert!(
        out.contains("started a subscription to enterprise"),
        "{out}"
    );
    let (tier, status, per_month, price, ..) = subscription(&env, &user).await;
    assert_eq!(
        (tier.as_str(), status.as_str(), per_month, price),
        ("enterprise", "active", 1_000_000, 9_999)
    );
    assert_eq!(current_total(&env, &user).await, 500 + 1_000_000);
    assert_eq!(env.redis_balance(&user).await, Some(live + 1_000_000));
    assert_eq!(queued(&env).await, 0);

    // A user whose latest subscription expired gets a new one.
    env.db()
        .await
        .execute(
            "UPDATE subscriptions SET status = 'expired' WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap();
    let out = env
        .cli(&["subscriptions", "set", "--email", &email, "--tier", "pro"])
        .await;
    assert!(out.contains("started a subscription to pro"), "{out}");
    let n: i64 = env
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM subscriptions WHERE user_id = $1 AND status = 'active' AND tier = 'pro'",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let env = TestEnv::new().await;
    let ok = email();
    user_with(&env, &ok, Some("free")).await;
    let nosub = email();
    user_with(&env, &nosub, None).await;
    let gone = email();
    let gone_id = user_with(&env, &gone, Some("free")).await;
    let suspended = email();
    let suspended_id = user_with(&env, &suspended, Some("pro")).await;
    let expired = email();
    let expired_id = user_with(&env, &expired, Some("pro")).await;
    let full = email();
    let full_id = user_with(&env, &full, Some("free")).await;
    let db = env.db().await;
    db.execute(
        "UPDATE users SET is_active = false WHERE id = $1",
        &[&gone_id],
    )
    .await
    .unwrap();
    for (id, status) in [(suspended_id, "suspended"), (expired_id, "expired")] {
        db.execute(
            "UPDATE subscriptions SET status = $2::text::subscription_status WHERE user_id = $1",
            &[&id, &status],
        )
        .await
        .unwrap();
    }
    // The upgrade's prorated credits would not fit the credits row.
    db.execute(
        "UPDATE credits SET total_credits = 2147483000 WHERE user_id = $1",
        &[&full_id],
    )
    .await
    .unwrap();

    let snap = snapshot(&env).await;
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (
            vec!["set", "--email", "nobody@example.com", "--tier", "pro"],
            &["nobody@example.com"],
        ),
        (
            vec!["set", "--email", &ok, "--tier", "gold"],
            &["gold", "--tier"],
        ),
        (vec!["set", "--email", &ok, "--tier", ""], &["--tier"]),
        (vec!["set", "--email", &ok], &["--tier"]),
        (vec!["set", "--tier", "pro"], &["--email"]),
        (
            vec!["set", "--email", &gone, "--tier", "pro"],
            &["deactivated"],
        ),
        (
            vec!["set", "--email", &suspended, "--tier", "enterprise"],
            &["suspended"],
        ),
        (
            vec!["set", "--email", &full, "--tier", "enterprise"],
            &["overflow"],
        ),
        (
            vec!["cancel", "--email", "nobody@example.com"],
            &["nobody@example.com"],
        ),
        (vec!["cancel", "--email", &gone], &["deactivated"]),
        (vec!["cancel", "--email", &nosub], &["no subscription"]),
        (vec!["cancel", "--email", &suspended], &["suspended"]),
        (vec!["cancel", "--email", &expired], &["expired"]),
    ];
    for (args, expect) in &cases {
        let mut cmd = vec!["subscriptions"];
        cmd.extend(args.iter().copied());
        let (success, out, err) = env.cli_raw(&cmd, &[]).await;
        assert!(!success, "{cmd:?} was accepted: {out}");
        assert!(out.trim().is_empty(), "{cmd:?}: {out}");
        for e in *expect {
            assert!(err.contains(e), "{cmd:?}: `{e}` not in {err}");
        }
        assert_eq!(snapshot(&env).await, snap, "{cmd:?} changed the database");
    }
}

/// A usage row written while `set` runs (the flusher's transaction: the user's credits
/// rows locked first, then the row inserted, whose foreign key needs a share lock on the
/// user) must not deadlock with `set` (which locks the user, then the credits row).
#[tokio::test]
async fn an_upgrade_and_a_usage_flush_of_the_same_user_do_not_deadlock() {
    let env = TestEnv::new().await;
    let email = email();
    let user = user_with(&env, &email, Some("free")).await;
    let mut c = env.db().await;
    let flush = c.transaction().await.unwrap();
    // As the flusher does: lock the user's current rows first.
    let credit: Uuid = flush
        .query_one(
            "SELECT id FROM credits WHERE user_id = $1 AND is_current FOR UPDATE",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    let args = ["subscriptions", "set", "--email", &email, "--tier", "pro"];
    let set = env.cli_raw(&args, &[]);
    let write = async {
        // `set` has locked the user and now waits for the credits row.
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        flush
            .execute(
                "INSERT INTO usage_history (id, user_id, credit_id, model_id, operation, credits_used,
                                            input_tokens, output_tokens, total_tokens, created_at)
                 VALUES ($1, $2, $3, 'gpt-5', 'chat', 1, 1, 0, 1, now())",
                &[&Uuid::now_v7(), &user, &credit],
            )
            .await
            .unwrap();
        flush
            .execute(
                "UPDATE credits SET used_credits = used_credits + 1 WHERE id = $1",
                &[&credit],
            )
            .await
            .unwrap();
        flush.commit().await.unwrap();
    };
    let ((ok, out, err), ()) = tokio::join!(set, write);
    assert!(ok, "set failed: {out}{err}");
    assert!(out.contains("upgraded from free to pro"), "{out}");
    let used: i32 = env
        .db()
        .await
        .query_one("SELECT used_credits FROM credits WHERE id = $1", &[&credit])
        .await
        .unwrap()
        .get(0);
    assert_eq!(used, 1);
}
