//! The Redis ledger scripts against real Redis and PostgreSQL: a balance rebuilt from
//! PostgreSQL never forgets settled-but-unflushed charges nor counts a flushed one
//! twice; settle is idempotent; expired holds come back; grants apply once.

use crate::harness::*;
use chrono::Utc;
use tollgate::config::DatabaseConfig;
use tollgate::db::Db;
use tollgate::ledger::{HoldRequest, Ledger, Reserve};
use tollgate::settle::UsageEvent;
use uuid::Uuid;

pub(crate) async fn setup(env: &TestEnv, credits: i32) -> (Ledger, Db, Uuid) {
    let ledger = Ledger::connect(REDIS, &env.prefix, env.layout.buckets())
        .await
        .unwrap();
    let db = Db::new(&DatabaseConfig {
        url: env.db_url.clone(),
        pool_size: 4,
        idle_timeout: std::time::Duration::from_secs(30),
        connect_timeout: std::time::Duration::from_secs(5),
        partitions_ahead_months: 1,
    })
    .unwrap();
    let c = env.db().await;
    let user: Uuid = c
        .query_one(
            "INSERT INTO users (email) VALUES ($1) RETURNING id",
            &[&format!("{}@l.test", Uuid::new_v4())],
        )
        .await
        .unwrap()
        .get(0);
    c.execute(
        "INSERT INTO credits (user_id, total_credits, billing_period_start, billing_period_end)
         VALUES ($1, $2, now(), now() + interval '30 days')",
        &[&user, &credits],
    )
    .await
    .unwrap();
    (ledger, db, user)
}

pub(crate) fn hold(max_tokens: i64, ttl_ms: u64) -> HoldRequest {
    HoldRequest {
        price_per_1k: 1000,
        prompt_tokens: 0,
        max_tokens,
        min_tokens: 1,
        ttl_ms,
    }
}

pub(crate) fn event(user: Uuid, rid: Uuid, credits: i64) -> UsageEvent {
    UsageEvent {
        id: rid,
        created_at: Utc::now(),
        user_id: user,
        model_id: "gpt-5".into(),
        operation: "chat",
        credits_used: credits,
        input_tokens: credits,
        output_tokens: 0,
        total_tokens: credits,
        duration_ms: 1,
        priced: None,
        metadata: None,
    }
}

/// Reserve (1 credit per token at price 1000/1k) and settle `cost`.
pub(crate) async fn charge(ledger: &Ledger, user: Uuid, cost: i64) -> UsageEvent {
    let rid = Uuid::now_v7();
    let r = ledger
        .reserve(&user, &rid, &hold(cost + 5, 60_000))
        .await
        .unwrap();
    assert!(
        matches!(r, Reserve::Admitted { hold: h, .. } if h == cost + 5),
        "{r:?}"
    );
    let e = event(user, rid, cost);
    assert!(ledger.settle(&user, &rid, cost, &e.encode()).await.unwrap());
    e
}

pub(crate) async fn forget_balance(env: &TestEnv, ledger: &Ledger, user: &Uuid) {
    let k = ledger.keys(user);
    let mut r = env.redis().await;
    let _: () = redis::cmd("DEL")
        .arg(&k.acct)
        .arg(&k.cred)
        .query_async(&mut r)
        .await
        .unwrap();
}

#[tokio::test]
async fn rebuilt_balance_counts_unflushed_charges_once() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 100).await;
    assert_eq!(
        ledger
            .reserve(&user, &Uuid::now_v7(), &hold(1, 1000))
            .await
            .unwrap(),
        Reserve::NeedsLoad
    );
    assert_eq!(ledger.load(&db, &user).await.unwrap(), 100);
    let e1 = charge(&ledger, user, 5).await;
    let e2 = charge(&ledger, user, 7).await;
    let _e3 = charge(&ledger, user, 11).await;
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(77));

    // Lose the balance while three charges are settled but not flushed.
    forget_balance(&env, &ledger, &user).await;
    assert_eq!(
        ledger.load(&db, &user).await.unwrap(),
        77,
        "unflushed charges must not be forgotten"
    );

    // Two are written to PostgreSQL but the writer dies before acknowledging them.
    let inserted = tollgate::flush::write_batch(&db, &[e1.clone(), e2.clone()])
        .await
        .unwrap();
    assert_eq!(inserted.len(), 2);
    forget_balance(&env, &ledger, &user).await;
    assert_eq!(
        ledger.load(&db, &user).await.unwrap(),
        77,
        "flushed charges must not count twice"
    );

    // The replayed batch inserts nothing and moves no credits.
    assert!(tollgate::flush::write_batch(&db, &[e1, e2])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(used_credits(&env, &user).await, 12);
}

#[tokio::test]
async fn settle_is_idempotent_and_release_returns_the_hold() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 50).await;
    ledger.load(&db, &user).await.unwrap();
    let rid = Uuid::now_v7();
    ledger
        .reserve(&user, &rid, &hold(20, 60_000))
        .await
        .unwrap();
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(30));
    let e = event(user, rid, 8);
    assert!(ledger.settle(&user, &rid, 8, &e.encode()).await.unwrap());
    assert!(
        !ledger.settle(&user, &rid, 8, &e.encode()).await.unwrap(),
        "second settle is a no-op"
    );
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(42));
    let mut r = env.redis().await;
    let len = stream_len(&mut r, &ledger.keys(&user).stream).await;
    assert_eq!(len, 1, "one usage event");

    let rid2 = Uuid::now_v7();
    ledger
        .reserve(&user, &rid2, &hold(40, 60_000))
        .await
        .unwrap();
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(2));
    assert!(ledger.release(&user, &rid2).await.unwrap());
    assert!(!ledger.release(&user, &rid2).await.unwrap());
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(42));
}

#[tokio::test]
async fn reserve_refuses_lowers_and_reclaims_expired_holds() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 10).await;
    ledger.load(&db, &user).await.unwrap();
    // 25 tokens at 1 credit each cannot be held: lowered to the 10 the balance affords.
    match ledger
        .reserve(&user, &Uuid::now_v7(), &hold(25, 50))
        .await
        .unwrap()
    {
        Reserve::Admitted {
            hold,
            max_tokens,
            balance,
        } => assert_eq!((hold, max_tokens, balance), (10, 10, 0)),
        other => panic!("{other:?}"),
    }
    // Nothing left, and no lowering below min_tokens.
    assert_eq!(
        ledger
            .reserve(&user, &Uuid::now_v7(), &hold(5, 50))
            .await
            .unwrap(),
        Reserve::Insufficient { balance: 0 }
    );
    // The first hold is never settled (a crash); after its expiry it comes back.
    tokio::time::sleep(std::time::Duration::from_millis(80)).await;
    match ledger
        .reserve(&user, &Uuid::now_v7(), &hold(4, 60_000))
        .await
        .unwrap()
    {
        Reserve::Admitted { balance, .. } => assert_eq!(balance, 6),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn grants_apply_exactly_once_whether_or_not_the_balance_is_loaded() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 10).await;
    let c = env.db().await;
    let grant = |amount: i32| {
        let c = &c;
        async move {
            let id: Uuid = c
                .query_one(
                    "INSERT INTO credits (user_id, total_credits, billing_period_start, billing_period_end)
                     VALUES ($1, $2, now(), now() + interval '1 year') RETURNING id",
                    &[&user, &amount],
                )
                .await
                .unwrap()
                .get(0);
            id
        }
    };
    // Granted before the balance is loaded: the load reads the row; the late grant
    // script must not add it again.
    let g1 = grant(5).await;
    assert!(!ledger.grant(&user, &g1, 5).await.unwrap());
    assert_eq!(ledger.load(&db, &user).await.unwrap(), 15);
    assert!(!ledger.grant(&user, &g1, 5).await.unwrap());
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(15));
    // Granted after: applied at once, once.
    let g2 = grant(7).await;
    assert!(ledger.grant(&user, &g2, 7).await.unwrap());
    assert!(!ledger.grant(&user, &g2, 7).await.unwrap());
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(22));
    // Rebuilt from PostgreSQL, the same.
    forget_balance(&env, &ledger, &user).await;
    assert_eq!(ledger.load(&db, &user).await.unwrap(), 22);
    // A row that stopped being current is not counted again when only the balance is
    // rebuilt (its id is still in `cred`).
    c.execute(
        "UPDATE credits SET is_current = false WHERE id = $1",
        &[&g2],
    )
    .await
    .unwrap();
    let mut r = env.redis().await;
    let _: () = redis::cmd("DEL")
        .arg(ledger.keys(&user).acct)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(ledger.load(&db, &user).await.unwrap(), 15);
}

#[tokio::test]
async fn only_expired_holds_come_back() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 10).await;
    ledger.load(&db, &user).await.unwrap();
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    ledger.reserve(&user, &a, &hold(3, 40)).await.unwrap();
    ledger.reserve(&user, &b, &hold(2, 60_000)).await.unwrap();
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(5));
    tokio::time::sleep(std::time::Duration::from_millis(70)).await;
    // `a` expired and returns; `b` is still held.
    match ledger.reserve(&user, &c, &hold(1, 40)).await.unwrap() {
        Reserve::Admitted { balance, .. } => assert_eq!(balance, 7),
        other => panic!("{other:?}"),
    }
    // `a` settles late: it is charged in full (its hold is gone).
    let e = event(user, a, 3);
    assert!(ledger.settle(&user, &a, 3, &e.encode()).await.unwrap());
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(4));
    assert!(ledger.release(&user, &b).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(70)).await;
    // `c` expired too: 4 + 2 (b released) + 1 (c back) = 7, less the new hold of 1.
    match ledger
        .reserve(&user, &Uuid::now_v7(), &hold(1, 60_000))
        .await
        .unwrap()
    {
        Reserve::Admitted { balance, .. } => assert_eq!(balance, 6),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn concurrent_reserves_commit_in_groups_without_overspending() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 50).await;
    ledger.load(&db, &user).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let rid = Uuid::now_v7();
            match ledger.reserve(&user, &rid, &hold(1, 60_000)).await.unwrap() {
                Reserve::Admitted { .. } => {
                    let e = event(user, rid, 1);
                    assert!(ledger.settle(&user, &rid, 1, &e.encode()).await.unwrap());
                    1
                }
                Reserve::Insufficient { .. } => 0,
                Reserve::NeedsLoad | Reserve::Inactive => panic!("loaded and active above"),
            }
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    assert_eq!(admitted, 50, "exactly the balance's worth is admitted");
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(0));
    let mut r = env.redis().await;
    let len = stream_len(&mut r, &ledger.keys(&user).stream).await;
    assert_eq!(len, 50, "one usage event per settled request");
}

/// A ledger on a Redis of the test's own (killed when the child is dropped), a user
/// with 10 credits loaded into it, and an admin connection to that Redis.
async fn on_private_redis(
    env: &TestEnv,
) -> (
    tokio::process::Child,
    Ledger,
    Uuid,
    redis::aio::MultiplexedConnection,
) {
    let port = free_port();
    let redis = private_redis(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let ledger = Ledger::connect(&url, &env.prefix, env.layout.buckets())
        .await
        .unwrap();
    let (_, db, user) = setup(env, 10).await;
    ledger.load(&db, &user).await.unwrap();
    let admin = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    (redis, ledger, user, admin)
}

#[tokio::test]
async fn survives_redis_losing_its_script_cache() {
    // A Redis of the test's own: a SCRIPT FLUSH on the shared one would pull the
    // scripts from under every test running beside this one.
    let env = TestEnv::new().await;
    let (_redis, ledger, user, mut r) = on_private_redis(&env).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut r)
        .await
        .unwrap();
    let rid = Uuid::now_v7();
    assert!(matches!(
        ledger.reserve(&user, &rid, &hold(3, 60_000)).await.unwrap(),
        Reserve::Admitted { .. }
    ));
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(ledger
        .settle(&user, &rid, 2, &event(user, rid, 2).encode())
        .await
        .unwrap());
    assert_eq!(ledger.balance(&user).await.unwrap(), Some(8));
}

#[tokio::test]
async fn a_batch_holding_an_event_twice_counts_it_once() {
    let env = TestEnv::new().await;
    let (_ledger, db, user) = setup(&env, 100).await;
    let e = event(user, Uuid::now_v7(), 9);
    let inserted = tollgate::flush::write_batch(&db, &[e.clone(), e.clone()])
        .await
        .unwrap();
    assert_eq!(inserted.len(), 1);
    let c = env.db().await;
    assert_eq!(used_credits(&env, &user).await, 9);
    let rows: i64 = c
        .query_one("SELECT count(*) FROM usage_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn a_cancelled_reserve_leaves_no_hold() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 10).await;
    ledger.load(&db, &user).await.unwrap();
    // Callers that give up at every stage of a reserve (the client disconnected).
    for i in 0..40u64 {
        let l = ledger.clone();
        let rid = Uuid::now_v7();
        let h = tokio::spawn(async move { l.reserve(&user, &rid, &hold(10, 60_000)).await });
        if i % 4 != 0 {
            tokio::time::sleep(std::time::Duration::from_micros(50 * i)).await;
        }
        h.abort();
        // A reserve that completed before the abort was answered: its caller owns the
        // hold and gives it back as a failed request would.
        if let Ok(Ok(Reserve::Admitted { .. })) = h.await {
            assert!(ledger.release(&user, &rid).await.unwrap());
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        ledger.balance(&user).await.unwrap(),
        Some(10),
        "no hold outlives its caller"
    );
}

#[tokio::test]
async fn a_reserve_cancelled_while_redis_has_not_answered_leaves_no_hold() {
    // Deterministic in-flight case: a Redis of the test's own is paused for writes, so
    // every reserve is sent and unanswered when its caller gives up. Once Redis runs
    // them, each admitted hold must be given back by the cancelled reserve itself.
    let env = TestEnv::new().await;
    let (_redis, ledger, user, mut admin) = on_private_redis(&env).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .unwrap();
    // Long enough that the reserves are surely sent and unanswered at the abort, on
    // however slow a machine.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .unwrap();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let l = ledger.clone();
            tokio::spawn(async move { l.reserve(&user, &Uuid::now_v7(), &hold(4, 60_000)).await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    for h in &handles {
        h.abort();
    }
    for h in handles {
        let r = h.await;
        assert!(
            matches!(&r, Err(e) if e.is_cancelled()),
            "the reserve was still waiting for Redis: {r:?}"
        );
    }
    // After the pause the reserves run: holds of 4 are admitted (10 affords two at a
    // time) and every one of them is given back.
    tokio::time::sleep(std::time::Duration::from_millis(1900)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut admin)
            .await
            .unwrap();
        // Each admitted reserve writes its hold with one HSET (inside the script): at
        // least two ran after their callers had left.
        let admitted = stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_hset:calls="))
            .and_then(|v| v.split(',').next()?.parse::<i64>().ok())
            .unwrap_or(0);
        let bal = ledger.balance(&user).await.unwrap();
        if admitted >= 2 && bal == Some(10) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "holds outlived their cancelled callers: {admitted} admitted, balance {bal:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let k = ledger.keys(&user);
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&k.acct)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(
        fields.iter().all(|f| !f.starts_with("h:")),
        "holds left: {fields:?}"
    );
}

#[tokio::test]
async fn the_flusher_drains_many_batches_once_and_leaves_nothing_pending() {
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 1_000_000).await;
    ledger.load(&db, &user).await.unwrap();
    // A few more users so the events spread over several buckets.
    let mut users = vec![user];
    users.extend(more_users(&env, &ledger, &db, 5).await);
    // Batches of 7 (over all buckets): the flusher reads the next batch while writing
    // one, and pages through several buckets per batch.
    let mut want: std::collections::HashMap<Uuid, i64> = Default::default();
    for i in 0..600i64 {
        let u = users[(i as usize) % users.len()];
        let e = charge(&ledger, u, 1 + i % 5).await;
        *want.entry(u).or_default() += e.credits_used;
    }
    flush_until(&env, &ledger, &db, 7, 3, 600).await;
    for (u, total) in &want {
        assert_eq!(used_credits(&env, u).await, *total, "used_credits of {u}");
    }
    // Everything acknowledged: no stream entry, no pending entry, no unflushed charge.
    let mut r = env.redis().await;
    for u in &users {
        let k = ledger.keys(u);
        let pend: i64 = redis::cmd("HLEN")
            .arg(&k.pend)
            .query_async(&mut r)
            .await
            .unwrap();
        assert_eq!(pend, 0, "unflushed charges left for {u}");
    }
    for b in 0..ledger.buckets() {
        let len = stream_len(&mut r, &ledger.stream_key(b)).await;
        assert_eq!(len, 0, "entries left in bucket {b}");
    }
    assert_eq!(
        ledger.balance(&user).await.unwrap().unwrap(),
        1_000_000 - want[&user]
    );
}

#[tokio::test]
async fn a_large_batch_is_acknowledged_in_slices_and_leaves_nothing_behind() {
    // 300 events of one user land in one bucket and are read as one batch: the
    // acknowledgement runs in slices (Redis is not held for the whole batch), and every
    // slice removes its stream entries and their unflushed charges.
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 1_000_000).await;
    ledger.load(&db, &user).await.unwrap();
    let mut total = 0;
    for i in 0..300i64 {
        total += charge(&ledger, user, 1 + i % 3).await.credits_used;
    }
    flush_until(&env, &ledger, &db, 1000, 1, 300).await;
    let mut r = env.redis().await;
    let k = ledger.keys(&user);
    let pend: i64 = redis::cmd("HLEN")
        .arg(&k.pend)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(pend, 0, "unflushed charges left");
    let len = stream_len(&mut r, &k.stream).await;
    assert_eq!(len, 0, "stream entries left");
    assert_eq!(
        pending_in_group(&mut r, &k.stream).await,
        0,
        "entries still pending in the group"
    );
    assert_eq!(used_credits(&env, &user).await, total);
}

#[tokio::test]
async fn a_pending_list_longer_than_one_read_is_written_once_postgres_returns() {
    // The flusher reads 150 events (more than one read's slice) while PostgreSQL
    // refuses the database: the write fails and the entries stay in this consumer's
    // pending list. Once PostgreSQL is back, the same flusher reads that list again
    // (in pages) and writes each event exactly once. This checks the outcome; how many
    // reads the paging takes is not observable here.
    let env = TestEnv::new().await;
    let (ledger, db, user) = setup(&env, 1_000_000).await;
    ledger.load(&db, &user).await.unwrap();
    let mut total = 0;
    for i in 0..150i64 {
        total += charge(&ledger, user, 1 + i % 4).await.credits_used;
    }
    env.allow_connections(false).await;
    let flusher = start_flusher(&ledger, &db, 1000, 2, 20);
    // All 150 read and held in the flusher's pending list, none written.
    let mut r = env.redis().await;
    let k = ledger.keys(&user);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pending_in_group(&mut r, &k.stream).await < 150 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flusher read nothing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // Still all pending and in the stream: nothing was written, so nothing acknowledged.
    assert_eq!(pending_in_group(&mut r, &k.stream).await, 150);
    let len = stream_len(&mut r, &k.stream).await;
    assert_eq!(len, 150);
    env.allow_connections(true).await;
    let n = env
        .wait_for_count(
            "SELECT count(*) FROM usage_history",
            150,
            std::time::Duration::from_secs(30),
        )
        .await;
    assert_eq!(n, 150);
    stop_flusher(flusher).await;
    assert_eq!(used_credits(&env, &user).await, total);
    assert_eq!(pending_in_group(&mut r, &k.stream).await, 0);
    let len = stream_len(&mut r, &k.stream).await;
    assert_eq!(len, 0, "stream entries left");
}

#[tokio::test]
async fn entries_delivered_before_a_failed_read_are_written_without_waiting_for_a_claim() {
    // One bucket's consumer group vanishes (as after a Redis restart) while other
    // buckets hold events: a read pass delivers entries from the buckets it reads
    // before the failing one, then fails. Those entries sit in this consumer's pending
    // list, where `>` never returns them; the flusher must read that list next rather
    // than leave them for the claim of stale entries (30 s here).
    let env = TestEnv::new().await;
    let (ledger, db, first) = setup(&env, 1_000_000).await;
    ledger.load(&db, &first).await.unwrap();
    // Enough users that nearly every bucket holds events.
    let mut users = vec![first];
    users.extend(more_users(&env, &ledger, &db, 47).await);
    // A pass every second: the events below are all settled between two passes, so
    // one pass reads every bucket that has them, in an order that puts the broken
    // bucket after some of the others (about 15 times in 16: the start turns).
    let flusher = start_flusher(&ledger, &db, 1000, 2, 1000);
    // The flusher has created its groups; then the first user's bucket loses its group.
    let mut r = env.redis().await;
    let broken = ledger.keys(&first).stream;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let groups: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&broken)
            .query_async(&mut r)
            .await;
        if matches!(groups, Ok(redis::Value::Array(ref g)) if !g.is_empty()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no consumer group");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Just after a pass (the flusher created the groups in its first one).
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&broken)
        .arg("usage-flush")
        .query_async(&mut r)
        .await
        .unwrap();
    let mut want = 0;
    for u in &users {
        for i in 0..3 {
            want += charge(&ledger, *u, 1 + i).await.credits_used;
        }
    }
    let rows = (users.len() * 3) as i64;
    let n = env
        .wait_for_count(
            "SELECT count(*) FROM usage_history",
            rows,
            std::time::Duration::from_secs(20),
        )
        .await;
    // Stranded entries would wait for a claim: idle 30 s at least.
    assert_eq!(n, rows, "events stranded in the pending list");
    stop_flusher(flusher).await;
    assert_eq!(env.used_credits_total().await, want);
}

/// Entries in a stream (0 for a missing one).
async fn stream_len(r: &mut redis::aio::MultiplexedConnection, stream: &str) -> i64 {
    redis::cmd("XLEN").arg(stream).query_async(r).await.unwrap()
}

/// Entries read by some consumer of the flushers' group and not yet acknowledged (0
/// before the flusher has created the group).
async fn pending_in_group(r: &mut redis::aio::MultiplexedConnection, stream: &str) -> i64 {
    let v: redis::Value = match redis::cmd("XPENDING")
        .arg(stream)
        .arg("usage-flush")
        .query_async(r)
        .await
    {
        Ok(v) => v,
        Err(e) if e.code() == Some("NOGROUP") => return 0,
        Err(e) => panic!("XPENDING: {e}"),
    };
    match v {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    }
}

/// Starts a flusher (`batch_rows`, `writers`, a pass every `interval_ms`; stale
/// entries claimed after 30 s). Stop it with [`stop_flusher`].
pub(crate) fn start_flusher(
    ledger: &Ledger,
    db: &Db,
    batch_rows: usize,
    writers: usize,
    interval_ms: u64,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let cfg = tollgate::config::FlushConfig {
        batch_rows,
        writers,
        interval: std::time::Duration::from_millis(interval_ms),
        claim_idle: std::time::Duration::from_secs(30),
        consumer_group: "usage-flush".into(),
    };
    let (stop, rx) = tokio::sync::watch::channel(false);
    let flusher =
        tokio::spawn(tollgate::flush::Flusher::new(ledger.clone(), db.clone(), cfg).run(rx));
    (stop, flusher)
}

/// Stops a flusher and waits for it to finish draining.
pub(crate) async fn stop_flusher(
    (stop, flusher): (
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ),
) {
    stop.send(true).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), flusher)
        .await
        .expect("the flusher stops after draining")
        .unwrap();
}

/// Runs a flusher (`batch_rows`, `writers`) until `usage_history` holds `rows` rows,
/// then stops it and waits for it to finish draining.
pub(crate) async fn flush_until(
    env: &TestEnv,
    ledger: &Ledger,
    db: &Db,
    batch_rows: usize,
    writers: usize,
    rows: i64,
) {
    let flusher = start_flusher(ledger, db, batch_rows, writers, 20);
    let n = env
        .wait_for_count(
            "SELECT count(*) FROM usage_history",
            rows,
            std::time::Duration::from_secs(30),
        )
        .await;
    assert_eq!(n, rows);
    stop_flusher(flusher).await;
}

/// `n` more users with a million credits each, their balances loaded.
async fn more_users(env: &TestEnv, ledger: &Ledger, db: &Db, n: usize) -> Vec<Uuid> {
    let c = env.db().await;
    let mut users = Vec::with_capacity(n);
    for _ in 0..n {
        let u: Uuid = c
            .query_one(
                "INSERT INTO users (email) VALUES ($1) RETURNING id",
                &[&format!("{}@l.test", Uuid::new_v4())],
            )
            .await
            .unwrap()
            .get(0);
        c.execute(
            "INSERT INTO credits (user_id, total_credits, billing_period_start, billing_period_end)
             VALUES ($1, 1000000, now(), now() + interval '30 days')",
            &[&u],
        )
        .await
        .unwrap();
        ledger.load(db, &u).await.unwrap();
        users.push(u);
    }
    users
}

/// `credits.used_credits` of the user's (single) credits row.
async fn used_credits(env: &TestEnv, user: &Uuid) -> i64 {
    let used: i32 = env
        .db()
        .await
        .query_one(
            "SELECT used_credits FROM credits WHERE user_id = $1",
            &[user],
        )
        .await
        .unwrap()
        .get(0);
    i64::from(used)
}
