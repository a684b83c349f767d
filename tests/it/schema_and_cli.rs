//! The schema, the seeds, the admin CLI, configuration errors and the ops endpoints,
//! black-box: the real binary against real PostgreSQL and Redis.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::harness::*;
use base64::Engine;
use chrono::{Datelike, Utc};
use tokio_postgres::error::SqlState;
use uuid::Uuid;

/// A database created by a test; dropped WITH (FORCE) even if the test panics.
struct TempDb {
    name: String,
}

impl TempDb {
    async fn create() -> TempDb {
        let name = format!("tg_test_{}", Uuid::new_v4().simple());
        pg(PG_ADMIN)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        TempDb { name }
    }

    fn url(&self) -> String {
        db_url(&self.name)
    }

    async fn drop_now(&self) {
        pg(PG_ADMIN)
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .unwrap();
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        block_on_side(async move { drop_database(&name).await });
    }
}

/// FNV-1a 64, as `tollgate migrate` records for each migration.
fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The migrations shipped in `migrations/`: (version, name, checksum), in order.
fn shipped_migrations() -> Vec<(i32, String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let stem = f.file_stem().unwrap().to_str().unwrap();
            let (v, name) = stem.split_once('_').unwrap();
            (
                v.parse().unwrap(),
                name.to_owned(),
                fnv1a(&std::fs::read(f).unwrap()),
            )
        })
        .collect()
}

/// The rows of `tollgate_schema_migrations`: (version, name, checksum, applied_at).
async fn migration_ledger(db: &tokio_postgres::Client) -> Vec<(i32, String, String, String)> {
    db.query(
        "SELECT version, name, checksum, applied_at::text FROM tollgate_schema_migrations ORDER BY version",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// The SQLSTATE of a statement that must fail.
async fn sql_error(db: &tokio_postgres::Client, sql: &str) -> SqlState {
    match db.batch_execute(sql).await {
        Ok(()) => panic!("statement should have failed: {sql}"),
        Err(e) => e
            .code()
            .cloned()
            .unwrap_or_else(|| panic!("no SQLSTATE for {sql}: {e}")),
    }
}

// ---------------------------------------------------------------------------------
// 1. migrate
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn migrate_on_an_empty_database_then_again_is_a_no_op() {
    let env = TestEnv::new().await;
    let tmp = TempDb::create().await;
    let url = tmp.url();

    let (ok, out, err) = env.cli_raw(&["migrate"], &[("DATABASE_URL", &url)]).await;
    assert!(ok, "first migrate failed: {err}");
    assert!(
        out.contains("applied 0001_schema"),
        "first migrate must report what it applied: {out}"
    );
    assert!(!out.contains("up to date"), "{out}");

    let db = pg(&url).await;
    let after_first = migration_ledger(&db).await;

    let (ok, out, err) = env.cli_raw(&["migrate"], &[("DATABASE_URL", &url)]).await;
    assert!(ok, "second migrate failed: {err}");
    assert!(
        out.contains("up to date"),
        "second migrate must say up to date: {out}"
    );
    assert!(
        !out.contains("applied"),
        "second migrate applied something: {out}"
    );
    assert!(
        !out.contains("partition"),
        "second migrate created partitions: {out}"
    );

    // Exactly the shipped migrations, each recorded once with its checksum.
    let after_second = migration_ledger(&db).await;
    assert_eq!(
        after_first, after_second,
        "the second run must not touch the ledger"
    );
    let recorded: Vec<(i32, String, String)> = after_second
        .into_iter()
        .map(|(v, n, c, _)| (v, n, c))
        .collect();
    let shipped = shipped_migrations();
    assert!(!shipped.is_empty());
    assert_eq!(recorded, shipped);

    // Monthly partitions for this month and the next.
    let now = Utc::now();
    let (ny, nm) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    for part in [
        format!("usage_history_{:04}_{:02}", now.year(), now.month()),
        format!("usage_history_{ny:04}_{nm:02}"),
    ] {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_inherits i
                   JOIN pg_class c ON c.oid = i.inhrelid
                  WHERE i.inhparent = 'usage_history'::regclass AND c.relname = $1",
                &[&part],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "partition {part} of usage_history must exist");
    }
    drop(db);
    tmp.drop_now().await;
    let gone: i64 = pg(PG_ADMIN)
        .await
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&tmp.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gone, 0);
}

// ---------------------------------------------------------------------------------
// 2. the schema matches the data model
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn every_table_of_the_data_model_exists() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    for table in [
        "users",
        "oauth_clients",
        "subscriptions",
        "credits",
        "usage_history",
        "models",
        "user_preferences",
        "downloads",
        "feedbacks",
        "diagnostics",
        "app_versions",
    ] {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM information_schema.tables
                  WHERE table_schema = 'public' AND table_name = $1",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "table {table} must exist");
    }
}

#[tokio::test]
async fn every_named_secondary_index_exists_on_its_table() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let expected = [
        ("users", "users_email_idx", "(email)"),
        ("users", "users_created_at_idx", "(created_at)"),
        ("subscriptions", "subscriptions_user_id_idx", "(user_id)"),
        ("subscriptions", "subscriptions_status_idx", "(status)"),
        (
            "subscriptions",
            "subscriptions_current_period_end_idx",
            "(current_period_end)",
        ),
        ("credits", "credits_user_id_idx", "(user_id)"),
        (
            "credits",
            "credits_user_id_is_current_idx",
            "(user_id, is_current)",
        ),
        ("credits", "credits_billing_period_idx", "(billing_period_"),
        ("usage_history", "usage_history_user_id_idx", "(user_id)"),
        (
            "usage_history",
            "usage_history_created_at_idx",
            "(created_at)",
        ),
        ("usage_history", "usage_history_model_id_idx", "(model_id)"),
        (
            "usage_history",
            "usage_history_user_id_created_at_idx",
            "(user_id, created_at DESC)",
        ),
        ("models", "models_is_available_idx", "(is_available)"),
        ("models", "models_provider_idx", "(provider)"),
    ];
    for (table, index, columns) in expected {
        let rows = db
            .query(
                "SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'public' AND indexname = $1",
                &[&index],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "index {index} must exist");
        assert_eq!(
            rows[0].get::<_, String>(0),
            table,
            "index {index} is on the wrong table"
        );
        let def: String = rows[0].get(1);
        assert!(
            def.contains(columns),
            "index {index} should cover {columns}: {def}"
        );
    }
}

#[tokio::test]
async fn enums_have_exactly_the_data_model_labels_in_order() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let expected: [(&str, &[&str]); 4] = [
        ("subscription_tier", &["free", "pro", "enterprise"]),
        (
            "subscription_status",
            &["active", "cancelled", "expired", "suspended"],
        ),
        (
            "usage_operation",
            &["completion", "chat", "embedding", "function_call"],
        ),
        (
            "model_capability",
            &["text", "vision", "function_calling", "code", "long_context"],
        ),
    ];
    for (ty, labels) in expected {
        let rows = db
            .query(
                "SELECT e.enumlabel::text FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
                  WHERE t.typname = $1 ORDER BY e.enumsortorder",
                &[&ty],
            )
            .await
            .unwrap();
        let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(got, labels, "labels of enum {ty}");
    }
    // The columns use them.
    for (table, column, ty) in [
        ("subscriptions", "tier", "subscription_tier"),
        ("subscriptions", "status", "subscription_status"),
        ("usage_history", "operation", "usage_operation"),
        ("models", "capabilities", "_model_capability"),
    ] {
        let udt: String = db
            .query_one(
                "SELECT udt_name::text FROM information_schema.columns
                  WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2",
                &[&table, &column],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(udt, ty, "{table}.{column}");
    }
}

#[tokio::test]
async fn foreign_keys_have_the_data_model_delete_rules() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    // (table, column, referenced table, confdeltype, information_schema delete_rule)
    let expected = [
        ("subscriptions", "user_id", "users", "c", "CASCADE"),
        ("credits", "user_id", "users", "c", "CASCADE"),
        ("usage_history", "user_id", "users", "c", "CASCADE"),
        ("user_preferences", "user_id", "users", "c", "CASCADE"),
        (
            "credits",
            "subscription_id",
            "subscriptions",
            "n",
            "SET NULL",
        ),
        ("usage_history", "credit_id", "credits", "n", "SET NULL"),
        (
            "user_preferences",
            "default_model_id",
            "models",
            "n",
            "SET NULL",
        ),
        ("usage_history", "model_id", "models", "r", "RESTRICT"),
    ];
    for (table, column, target, deltype, rule) in expected {
        let rows = db
            .query(
                "SELECT c.confrelid::regclass::text, c.confdeltype::text, rc.delete_rule::text
                   FROM pg_constraint c
                   JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
                   JOIN information_schema.referential_constraints rc
                     ON rc.constraint_schema = 'public' AND rc.constraint_name = c.conname
                  WHERE c.contype = 'f' AND c.conrelid = $1::text::regclass AND a.attname = $2
                    AND array_length(c.conkey, 1) = 1",
                &[&table, &column],
            )
            .await
            .unwrap();
        assert!(!rows.is_empty(), "no foreign key on {table}.{column}");
        for r in rows {
            assert_eq!(r.get::<_, String>(0), target, "{table}.{column} references");
            assert_eq!(
                r.get::<_, String>(1),
                deltype,
                "{table}.{column} ON DELETE (confdeltype)"
            );
            assert_eq!(
                r.get::<_, String>(2),
                rule,
                "{table}.{column} ON DELETE (delete_rule)"
            );
        }
    }
}

#[tokio::test]
async fn usage_history_is_range_partitioned_with_a_composite_primary_key() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let row = db
        .query_opt(
            "SELECT partstrat::text, pg_get_partkeydef(partrelid) FROM pg_partitioned_table
              WHERE partrelid = 'usage_history'::regclass",
            &[],
        )
        .await
        .unwrap()
        .expect("usage_history must be a partitioned table");
    assert_eq!(row.get::<_, String>(0), "r");
    assert_eq!(row.get::<_, String>(1), "RANGE (created_at)");
    let pk: String = db
        .query_one(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint
              WHERE conrelid = 'usage_history'::regclass AND contype = 'p'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pk, "PRIMARY KEY (id, created_at)");

    // A row written now lands in this month's partition, not the default one.
    let (user, _, _, usage) = user_with_everything(&db, "partition@example.com").await;
    let part: String = db
        .query_one(
            "SELECT tableoid::regclass::text FROM usage_history WHERE id = $1 AND user_id = $2",
            &[&usage, &user],
        )
        .await
        .unwrap()
        .get(0);
    let now = Utc::now();
    assert_eq!(
        part,
        format!("usage_history_{:04}_{:02}", now.year(), now.month())
    );
}

// ---------------------------------------------------------------------------------
// 3. constraints in action
// ---------------------------------------------------------------------------------

/// A user with a subscription, a credits row, a usage row and preferences.
async fn user_with_everything(
    db: &tokio_postgres::Client,
    email: &str,
) -> (Uuid, Uuid, Uuid, Uuid) {
    let user: Uuid = db
        .query_one(
            "INSERT INTO users (email) VALUES ($1) RETURNING id",
            &[&email],
        )
        .await
        .unwrap()
        .get(0);
    let sub: Uuid = db
        .query_one(
            "INSERT INTO subscriptions (user_id, tier, credits_per_month, price_cents, billing_interval,
                                        current_period_start, current_period_end)
             VALUES ($1, 'pro', 100, 0, 'monthly', now(), now() + interval '1 month') RETURNING id",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    let credit: Uuid = db
        .query_one(
            "INSERT INTO credits (user_id, subscription_id, total_credits, billing_period_start, billing_period_end)
             VALUES ($1, $2, 100, now(), now() + interval '1 month') RETURNING id",
            &[&user, &sub],
        )
        .await
        .unwrap()
        .get(0);
    let usage = Uuid::new_v4();
    db.execute(
        "INSERT INTO usage_history (id, user_id, credit_id, model_id, operation, credits_used,
                                    input_tokens, output_tokens, total_tokens)
         VALUES ($1, $2, $3, 'gpt-5', 'chat', 3, 10, 20, 30)",
        &[&usage, &user, &credit],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO user_preferences (user_id, default_model_id) VALUES ($1, 'gemini-2.0-pro')",
        &[&user],
    )
    .await
    .unwrap();
    (user, sub, credit, usage)
}

async fn count(db: &tokio_postgres::Client, sql: &str, id: &Uuid) -> i64 {
    db.query_one(sql, &[id]).await.unwrap().get(0)
}

#[tokio::test]
async fn a_model_with_usage_cannot_be_deleted() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let (_, _, _, usage) = user_with_everything(&db, "restrict@example.com").await;
    let code = sql_error(&db, "DELETE FROM models WHERE id = 'gpt-5'").await;
    assert_eq!(code, SqlState::FOREIGN_KEY_VIOLATION);
    let n: i64 = db
        .query_one("SELECT count(*) FROM models WHERE id = 'gpt-5'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM usage_history WHERE id = $1",
            &usage
        )
        .await,
        1
    );
    // A model without usage can go.
    db.execute("DELETE FROM models WHERE id = 'claude-3.5-sonnet'", &[])
        .await
        .unwrap();
}

#[tokio::test]
async fn deleting_a_user_cascades_to_everything_it_owns() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let (user, _, _, _) = user_with_everything(&db, "cascade@example.com").await;
    let (other, _, _, _) = user_with_everything(&db, "bystander@example.com").await;
    let tables = [
        "SELECT count(*) FROM subscriptions WHERE user_id = $1",
        "SELECT count(*) FROM credits WHERE user_id = $1",
        "SELECT count(*) FROM usage_history WHERE user_id = $1",
        "SELECT count(*) FROM user_preferences WHERE user_id = $1",
    ];
    for sql in tables {
        assert_eq!(count(&db, sql, &user).await, 1, "{sql}");
    }
    assert_eq!(
        db.execute("DELETE FROM users WHERE id = $1", &[&user])
            .await
            .unwrap(),
        1
    );
    for sql in tables {
        assert_eq!(count(&db, sql, &user).await, 0, "not cascaded: {sql}");
        assert_eq!(
            count(&db, sql, &other).await,
            1,
            "another user's row went: {sql}"
        );
    }
}

#[tokio::test]
async fn set_null_rules_keep_the_child_rows() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let (user, sub, credit, usage) = user_with_everything(&db, "setnull@example.com").await;

    db.execute("DELETE FROM subscriptions WHERE id = $1", &[&sub])
        .await
        .unwrap();
    let r = db
        .query_one(
            "SELECT subscription_id FROM credits WHERE id = $1",
            &[&credit],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, Option<Uuid>>(0), None);

    db.execute("DELETE FROM credits WHERE id = $1", &[&credit])
        .await
        .unwrap();
    let r = db
        .query_one(
            "SELECT credit_id FROM usage_history WHERE id = $1",
            &[&usage],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, Option<Uuid>>(0), None);

    db.execute("DELETE FROM models WHERE id = 'gemini-2.0-pro'", &[])
        .await
        .unwrap();
    let r = db
        .query_one(
            "SELECT default_model_id FROM user_preferences WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, Option<String>>(0), None);
}

#[tokio::test]
async fn checks_reject_negative_credits_and_token_counts() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let (user, _, credit, usage) = user_with_everything(&db, "checks@example.com").await;
    let statements = [
        format!("UPDATE credits SET used_credits = -1 WHERE id = '{credit}'"),
        format!("UPDATE credits SET total_credits = -1 WHERE id = '{credit}'"),
        format!(
            "INSERT INTO credits (user_id, total_credits, billing_period_start, billing_period_end)
             VALUES ('{user}', -5, now(), now() + interval '1 day')"
        ),
        format!("UPDATE usage_history SET input_tokens = -1 WHERE id = '{usage}'"),
        format!("UPDATE usage_history SET output_tokens = -1 WHERE id = '{usage}'"),
        format!("UPDATE usage_history SET total_tokens = -1 WHERE id = '{usage}'"),
        format!("UPDATE usage_history SET credits_used = -1 WHERE id = '{usage}'"),
        format!(
            "INSERT INTO usage_history (id, user_id, model_id, operation, credits_used, input_tokens)
             VALUES ('{}', '{user}', 'gpt-5', 'chat', 1, -10)",
            Uuid::new_v4()
        ),
    ];
    for sql in &statements {
        assert_eq!(
            sql_error(&db, sql).await,
            SqlState::CHECK_VIOLATION,
            "{sql}"
        );
    }
    let r = db
        .query_one(
            "SELECT total_credits, used_credits FROM credits WHERE id = $1",
            &[&credit],
        )
        .await
        .unwrap();
    assert_eq!((r.get::<_, i32>(0), r.get::<_, i32>(1)), (100, 0));
}

#[tokio::test]
async fn users_updated_at_is_kept_current_by_the_database() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let r = db
        .query_one(
            "INSERT INTO users (email) VALUES ('touch@example.com') RETURNING id, created_at, updated_at",
            &[],
        )
        .await
        .unwrap();
    let id: Uuid = r.get(0);
    let created: chrono::DateTime<Utc> = r.get(1);
    let before: chrono::DateTime<Utc> = r.get(2);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Even a caller that tries to set updated_at itself gets the time of the update.
    let r = db
        .query_one(
            "UPDATE users SET first_name = 'Ada', updated_at = '2000-01-01T00:00:00Z'
              WHERE id = $1 RETURNING created_at, updated_at",
            &[&id],
        )
        .await
        .unwrap();
    let after: chrono::DateTime<Utc> = r.get(1);
    assert_eq!(r.get::<_, chrono::DateTime<Utc>>(0), created);
    assert!(
        after > before,
        "updated_at must advance on UPDATE: {before} -> {after}"
    );
    let db_now: chrono::DateTime<Utc> = db.query_one("SELECT now()", &[]).await.unwrap().get(0);
    assert!(after <= db_now);
}

#[tokio::test]
async fn email_uniqueness_ignores_case() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    db.execute("INSERT INTO users (email) VALUES ('a@x.co')", &[])
        .await
        .unwrap();
    assert_eq!(
        sql_error(&db, "INSERT INTO users (email) VALUES ('A@x.co')").await,
        SqlState::UNIQUE_VIOLATION
    );
    assert_eq!(
        sql_error(&db, "INSERT INTO users (email) VALUES ('a@x.co')").await,
        SqlState::UNIQUE_VIOLATION
    );
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM users WHERE lower(email) = 'a@x.co'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

// ---------------------------------------------------------------------------------
// 4. seed
// ---------------------------------------------------------------------------------

async fn seeded_rows(
    db: &tokio_postgres::Client,
) -> (Vec<(String, String)>, Vec<(String, String)>) {
    let q = |sql: &'static str| async move {
        db.query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
    };
    (
        q("SELECT xmin::text, row_to_json(m)::text FROM models m ORDER BY id").await,
        q("SELECT xmin::text, row_to_json(c)::text FROM oauth_clients c ORDER BY client_id").await,
    )
}

#[tokio::test]
async fn seed_again_changes_nothing() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let before = seeded_rows(&db).await;
    assert_eq!(before.0.len(), 3, "three seeded models");
    assert_eq!(before.1.len(), 1, "one seeded OAuth client");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let out = env.cli(&["seed"]).await;
    assert!(out.contains("0002_models"), "{out}");
    let after = seeded_rows(&db).await;
    assert_eq!(
        before.0, after.0,
        "seeding again rewrote models rows (xmin / updated_at changed)"
    );
    assert_eq!(
        before.1, after.1,
        "seeding again rewrote oauth_clients rows"
    );
}

#[tokio::test]
async fn seed_restores_a_changed_model() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    db.execute(
        "UPDATE models SET credits_per_1k_tokens = 99 WHERE id = 'gpt-5'",
        &[],
    )
    .await
    .unwrap();
    env.cli(&["seed"]).await;
    let n: i32 = db
        .query_one(
            "SELECT credits_per_1k_tokens FROM models WHERE id = 'gpt-5'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test]
async fn seeded_values_are_those_of_the_data_model() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let c = db
        .query_one(
            "SELECT redirect_uris, grant_types, client_secret_hash, is_active
               FROM oauth_clients WHERE client_id = 'textassistant-desktop'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        c.get::<_, Vec<String>>(0),
        [
            "http://127.0.0.1/callback",
            "textassistant://oauth/callback"
        ]
    );
    assert_eq!(
        c.get::<_, Vec<String>>(1),
        ["authorization_code", "refresh_token"]
    );
    assert_eq!(
        c.get::<_, Option<String>>(2),
        None,
        "a public client has no secret"
    );
    assert!(c.get::<_, bool>(3));

    let rows = db
        .query(
            "SELECT id, provider, credits_per_1k_tokens, is_available FROM models ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, i32, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "claude-3.5-sonnet".to_owned(),
                "anthropic".to_owned(),
                2,
                true
            ),
            ("gemini-2.0-pro".to_owned(), "google".to_owned(), 1, true),
            ("gpt-5".to_owned(), "openai".to_owned(), 2, true),
        ]
    );
}

// ---------------------------------------------------------------------------------
// 5. the admin CLI
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn user_create_hashes_the_password_with_argon2id() {
    let env = TestEnv::new().await;
    let password = "correct horse battery staple";
    let out = env
        .cli(&[
            "user",
            "create",
            "--email",
            "hash@example.com",
            "--password",
            password,
        ])
        .await;
    let id = Uuid::parse_str(&out).unwrap_or_else(|e| panic!("not a UUID ({e}): {out}"));
    let db = env.db().await;
    let r = db
        .query_one(
            "SELECT email, password_hash, is_active FROM users WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "hash@example.com");
    let hash: String = r.get::<_, Option<String>>(1).expect("a password hash");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert_ne!(hash, password);
    assert!(!hash.contains(password));
    assert!(r.get::<_, bool>(2));

    // Without --password: no hash. Without --tier: the default tier's (`tiers.default`,
    // free) subscription and its first period's credits.
    let out = env
        .cli(&["user", "create", "--email", "nopass@example.com"])
        .await;
    let id = Uuid::parse_str(&out).unwrap();
    let r = db
        .query_one("SELECT password_hash FROM users WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(r.get::<_, Option<String>>(0), None);
    assert_eq!(
        subscription_and_credits(&db, &id).await,
        vec![(
            "free".to_owned(),
            1_000,
            0,
            "monthly".to_owned(),
            false,
            1,
            1_000
        )]
    );

    // --no-subscription: none, and no credits.
    let out = env
        .cli(&[
            "user",
            "create",
            "--email",
            "nosub@example.com",
            "--no-subscription",
        ])
        .await;
    let id = Uuid::parse_str(&out).unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM subscriptions WHERE user_id = $1",
            &id
        )
        .await,
        0
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM credits WHERE user_id = $1", &id).await,
        0
    );
}

/// The user's subscriptions, each with its current credits row: (tier,
/// credits_per_month, price_cents, billing_interval, credits_rollover, the period in
/// months (1 or 12, else NULL: a panic), the credits row's total_credits). Checks that the credits row
/// is current, unused and spans the subscription's period.
async fn subscription_and_credits(
    db: &tokio_postgres::Client,
    user: &Uuid,
) -> Vec<(String, i32, i32, String, bool, i32, i32)> {
    let rows = db
        .query(
            "SELECT s.tier::text, s.credits_per_month, s.price_cents, s.billing_interval,
                    s.credits_rollover, s.status::text,
                    CASE s.current_period_end
                      WHEN s.current_period_start + interval '1 month' THEN 1
                      WHEN s.current_period_start + interval '12 months' THEN 12 END,
                    s.current_period_end > s.current_period_start,
                    s.current_period_start <= now() AND s.current_period_end > now(),
                    c.total_credits, c.used_credits, c.is_current,
                    c.billing_period_start = s.current_period_start
                      AND c.billing_period_end = s.current_period_end
               FROM subscriptions s JOIN credits c ON c.subscription_id = s.id
              WHERE s.user_id = $1",
            &[user],
        )
        .await
        .unwrap();
    let n: i64 = db
        .query_one("SELECT count(*) FROM credits WHERE user_id = $1", &[user])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n,
        rows.len() as i64,
        "a credits row per subscription, no other"
    );
    rows.iter()
        .map(|r| {
            assert_eq!(r.get::<_, String>(5), "active");
            assert!(r.get::<_, bool>(7));
            assert!(r.get::<_, bool>(8), "the period is under way");
            assert_eq!(r.get::<_, i32>(10), 0, "nothing used yet");
            assert!(r.get::<_, bool>(11), "the credits row is current");
            assert!(r.get::<_, bool>(12), "the credits row spans the period");
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(6),
                r.get(9),
            )
        })
        .collect()
}

#[tokio::test]
async fn user_create_takes_the_plan_from_the_tiers_config_and_its_env_overrides() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let create = |email: &'static str,
                  extra: &'static [&'static str],
                  vars: Vec<(&'static str, &'static str)>| {
        let env = &env;
        async move {
            let mut args = vec!["user", "create", "--email", email];
            args.extend_from_slice(extra);
            let (ok, out, err) = env.cli_raw(&args, &vars).await;
            assert!(ok, "{args:?} {vars:?}: {err}");
            Uuid::parse_str(out.trim()).unwrap()
        }
    };
    // The shipped plans.
    let id = create("pro@example.com", &["--tier", "pro"], vec![]).await;
    assert_eq!(
        subscription_and_credits(&db, &id).await,
        vec![(
            "pro".into(),
            100_000,
            1_999,
            "monthly".into(),
            false,
            1,
            100_000
        )]
    );
    let id = create("ent@example.com", &["--tier", "enterprise"], vec![]).await;
    assert_eq!(
        subscription_and_credits(&db, &id).await,
        vec![(
            "enterprise".into(),
            1_000_000,
            9_999,
            "monthly".into(),
            false,
            1,
            1_000_000
        )]
    );
    // Every figure from the environment; a yearly period lasts 12 months and holds
    // 12 months' credits.
    let pro_env = vec![
        ("TOLLGATE__TIERS__PRO__CREDITS_PER_MONTH", "4321"),
        ("TOLLGATE__TIERS__PRO__PRICE_CENTS", "555"),
        ("TOLLGATE__TIERS__PRO__BILLING_INTERVAL", "yearly"),
        ("TOLLGATE__TIERS__PRO__ROLLOVER_CAP", "10"),
    ];
    let id = create("pro-env@example.com", &["--tier", "pro"], pro_env.clone()).await;
    assert_eq!(
        subscription_and_credits(&db, &id).await,
        vec![(
            "pro".into(),
            4321,
            555,
            "yearly".into(),
            true,
            12,
            4321 * 12
        )]
    );
    // The default tier comes from the environment too.
    let mut default_env = pro_env;
    default_env.push(("TOLLGATE__TIERS__DEFAULT", "pro"));
    let id = create("default-env@example.com", &[], default_env.clone()).await;
    assert_eq!(
        subscription_and_credits(&db, &id).await,
        vec![(
            "pro".into(),
            4321,
            555,
            "yearly".into(),
            true,
            12,
            4321 * 12
        )]
    );
    // --tier wins over the default.
    let id = create("free-env@example.com", &["--tier", "free"], default_env).await;
    assert_eq!(
        subscription_and_credits(&db, &id).await,
        vec![("free".into(), 1_000, 0, "monthly".into(), false, 1, 1_000)]
    );
}

#[tokio::test]
async fn user_create_with_a_default_subscription_can_spend_its_first_period() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;
    env.cli(&["user", "create", "--email", "spend@example.com"])
        .await;
    let token = env
        .cli(&["token", "issue", "--email", "spend@example.com"])
        .await;
    let (status, _, body) = env
        .request("GET", &gw.url("/v1/credits"), Some(&token), None)
        .await;
    assert_eq!(status, 200);
    let c = json(&body);
    assert_eq!(c["total_credits"].as_i64(), Some(1_000), "{c}");
    assert_eq!(c["available_credits"].as_i64(), Some(1_000), "{c}");
    let (s, _, b) = env.chat(&gw, &token, hello(20)).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
}

#[tokio::test]
async fn user_create_bad_tier_input_gets_a_clear_error_and_writes_nothing() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let tables = || async {
        let mut n = Vec::new();
        for t in ["users", "subscriptions", "credits"] {
            n.push(
                db.query_one(&format!("SELECT count(*) FROM {t}"), &[])
                    .await
                    .unwrap()
                    .get::<_, i64>(0),
            );
        }
        n
    };
    let before = tables().await;
    // (arguments after --email, environment, what the error must name)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (&["--tier", "gold"], &[], &["gold", "--tier"]),
        (&["--tier", ""], &[], &["--tier"]),
        (
            &["--tier", "pro", "--no-subscription"],
            &[],
            &["--tier", "--no-subscription"],
        ),
        (
            &[],
            &[("TOLLGATE__TIERS__DEFAULT", "gold")],
            &["tiers.default", "gold"],
        ),
        (
            &["--tier", "free"],
            &[("TOLLGATE__TIERS__DEFAULT", "gold")],
            &["tiers.default"],
        ),
        (
            &[],
            &[("TOLLGATE__TIERS__FREE__CREDITS_PER_MONTH", "-5")],
            &["tiers.free.credits_per_month", "negative"],
        ),
        (
            &["--tier", "pro"],
            &[("TOLLGATE__TIERS__PRO__PRICE_CENTS", "-1")],
            &["tiers.pro.price_cents"],
        ),
        (
            &[],
            &[("TOLLGATE__TIERS__FREE__ROLLOVER_CAP", "-1")],
            &["tiers.free.rollover_cap"],
        ),
        (
            &[],
            &[("TOLLGATE__TIERS__FREE__BILLING_INTERVAL", "weekly")],
            &["tiers.free.billing_interval", "weekly"],
        ),
        (
            &[],
            &[("TOLLGATE__TIERS__GOLD__CREDITS_PER_MONTH", "5")],
            &["gold"],
        ),
        (
            &[],
            &[
                ("TOLLGATE__RATE_LIMITS__PRO__REQUESTS_PER_MINUTE", "4"),
                ("TOLLGATE__TIERS__PRO__REQUESTS_PER_MINUTE", "5"),
            ],
            &[
                "tiers.pro.requests_per_minute",
                "rate_limits.pro.requests_per_minute",
            ],
        ),
        (
            &[],
            &[("TOLLGATE__BILLING__INTERVAL_MS", "0")],
            &["billing.interval_ms"],
        ),
    ];
    for (args, vars, expect) in cases {
        let mut cmd = vec!["user", "create", "--email", "bad@example.com"];
        cmd.extend_from_slice(args);
        let (ok, out, err) = env.cli_raw(&cmd, vars).await;
        assert!(!ok, "{args:?} {vars:?} was accepted: {out}");
        assert!(out.trim().is_empty(), "{args:?} {vars:?}: {out}");
        for e in *expect {
            assert!(err.contains(e), "{args:?} {vars:?}: `{e}` not in {err}");
        }
        assert_eq!(tables().await, before, "{args:?} {vars:?} wrote something");
    }
    // The same limit in both places, agreeing, is fine.
    let (ok, _, err) = env
        .cli_raw(
            &["user", "create", "--email", "good@example.com"],
            &[
                ("TOLLGATE__RATE_LIMITS__PRO__REQUESTS_PER_MINUTE", "4"),
                ("TOLLGATE__TIERS__PRO__REQUESTS_PER_MINUTE", "4"),
            ],
        )
        .await;
    assert!(ok, "{err}");
}

#[tokio::test]
async fn user_create_refuses_an_existing_email_in_any_case() {
    let env = TestEnv::new().await;
    env.cli(&["user", "create", "--email", "dup@example.com"])
        .await;
    let (ok, out, err) = env
        .cli_raw(&["user", "create", "--email", "DUP@Example.COM"], &[])
        .await;
    assert!(!ok, "a second user with the same email was created: {out}");
    assert!(
        err.contains("already exists"),
        "the failure must say why: {err}"
    );
    assert!(Uuid::parse_str(out.trim()).is_err(), "{out}");
    let n: i64 = env
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM users WHERE lower(email) = 'dup@example.com'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn user_create_with_a_tier_starts_a_subscription_and_its_credits() {
    let env = TestEnv::new().await;
    let id = Uuid::parse_str(
        &env.cli(&[
            "user",
            "create",
            "--email",
            "pro@example.com",
            "--tier",
            "pro",
        ])
        .await,
    )
    .unwrap();
    let db = env.db().await;
    let subs = db
        .query(
            "SELECT id, tier::text, status::text, credits_per_month, current_period_start, current_period_end
               FROM subscriptions WHERE user_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(subs.len(), 1);
    let s = &subs[0];
    let sub: Uuid = s.get(0);
    assert_eq!(s.get::<_, String>(1), "pro");
    assert_eq!(s.get::<_, String>(2), "active");
    let per_month: i32 = s.get(3);
    assert!(per_month > 0);
    let start: chrono::DateTime<Utc> = s.get(4);
    let end: chrono::DateTime<Utc> = s.get(5);
    assert!(end > Utc::now() && start < end);

    let credits = db
        .query(
            "SELECT subscription_id, total_credits, used_credits, is_current, billing_period_start, billing_period_end
               FROM credits WHERE user_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(credits.len(), 1);
    let c = &credits[0];
    assert_eq!(c.get::<_, Option<Uuid>>(0), Some(sub));
    assert_eq!(c.get::<_, i32>(1), per_month);
    assert_eq!(c.get::<_, i32>(2), 0);
    assert!(c.get::<_, bool>(3), "the credits row must be current");
    assert_eq!(c.get::<_, chrono::DateTime<Utc>>(4), start);
    assert_eq!(c.get::<_, chrono::DateTime<Utc>>(5), end);
}

#[tokio::test]
async fn credits_grant_refuses_non_positive_amounts() {
    let env = TestEnv::new().await;
    let id = Uuid::parse_str(
        &env.cli(&[
            "user",
            "create",
            "--email",
            "grant@example.com",
            "--no-subscription",
        ])
        .await,
    )
    .unwrap();
    for amount in [
        &["--amount", "0"][..],
        &["--amount", "-3"],
        &["--amount=-3"],
    ] {
        let mut args = vec!["credits", "grant", "--email", "grant@example.com"];
        args.extend_from_slice(amount);
        let (ok, out, err) = env.cli_raw(&args, &[]).await;
        assert!(!ok, "{amount:?} was accepted: {out}");
        assert!(!err.trim().is_empty(), "{amount:?}: no message");
    }
    let db = env.db().await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM credits WHERE user_id = $1", &id).await,
        0
    );
    // A positive amount works.
    let out = env
        .cli(&[
            "credits",
            "grant",
            "--email",
            "grant@example.com",
            "--amount",
            "5",
        ])
        .await;
    assert!(out.contains("granted 5"), "{out}");
    let total: i32 = db
        .query_one(
            "SELECT total_credits FROM credits WHERE user_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 5);
}

#[tokio::test]
async fn token_issue_for_an_unknown_email_fails() {
    let env = TestEnv::new().await;
    let (ok, out, err) = env
        .cli_raw(&["token", "issue", "--email", "nobody@example.com"], &[])
        .await;
    assert!(!ok, "a token was issued for nobody: {out}");
    assert!(out.trim().is_empty(), "{out}");
    assert!(err.contains("nobody@example.com"), "{err}");
}

#[tokio::test]
async fn token_issue_prints_an_at_jwt_with_a_kid() {
    let env = TestEnv::new().await;
    let id = Uuid::parse_str(
        &env.cli(&["user", "create", "--email", "jwt@example.com"])
            .await,
    )
    .unwrap();
    // The email is matched regardless of case.
    let token = env
        .cli(&["token", "issue", "--email", "JWT@example.com"])
        .await;
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWS compact serialisation: {token}");
    assert!(parts.iter().all(|p| !p.is_empty()));
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = json(&b64.decode(parts[0]).unwrap());
    assert_eq!(header["typ"], "at+jwt", "{header}");
    assert!(
        header["kid"].as_str().is_some_and(|k| !k.is_empty()),
        "{header}"
    );
    assert!(
        header["alg"].as_str().is_some_and(|a| a != "none"),
        "{header}"
    );
    let claims = json(&b64.decode(parts[1]).unwrap());
    assert_eq!(claims["sub"], id.to_string());
    assert!(b64.decode(parts[2]).is_ok_and(|s| !s.is_empty()));
}

// ---------------------------------------------------------------------------------
// 6. configuration errors
// ---------------------------------------------------------------------------------

/// Runs `tollgate serve --config <config>` with the test's databases and `vars`;
/// it must exit (a configuration error) within 30 s. Returns (success, stdout, stderr).
async fn serve_once(env: &TestEnv, config: &Path, vars: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = env.command_with_config(&["serve"], config);
    c.env("TOLLGATE__SERVER__LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in vars {
        c.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), c.output())
        .await
        .unwrap_or_else(|_| {
            panic!("serve with {vars:?} did not exit: the configuration was accepted")
        })
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn assert_config_error(env: &TestEnv, config: &Path, vars: &[(&str, &str)], key: &str) {
    let (ok, out, err) = serve_once(env, config, vars).await;
    assert!(!ok, "serve with {vars:?} exited successfully");
    assert!(
        !out.contains("listening"),
        "serve with {vars:?} started: {out}"
    );
    assert!(
        err.contains(key),
        "the error for {vars:?} must name `{key}`: {err}"
    );
}

#[tokio::test]
async fn zero_pool_size_stops_startup() {
    let env = TestEnv::new().await;
    assert_config_error(
        &env,
        &config_path(),
        &[("TOLLGATE__DATABASE__POOL_SIZE", "0")],
        "database.pool_size",
    )
    .await;
    assert_config_error(
        &env,
        &config_path(),
        &[("DATABASE_POOL_SIZE", "0")],
        "database.pool_size",
    )
    .await;
}

#[tokio::test]
async fn zero_partitions_ahead_stops_startup() {
    let env = TestEnv::new().await;
    assert_config_error(
        &env,
        &config_path(),
        &[("TOLLGATE__DATABASE__PARTITIONS_AHEAD_MONTHS", "0")],
        "database.partitions_ahead_months",
    )
    .await;
}

#[tokio::test]
async fn bad_provider_url_stops_startup() {
    let env = TestEnv::new().await;
    assert_config_error(
        &env,
        &config_path(),
        &[("TOLLGATE__PROVIDERS__OPENAI__BASE_URL", "not-a-url")],
        "providers.openai.base_url",
    )
    .await;
}

#[tokio::test]
async fn bad_listen_address_stops_startup() {
    let env = TestEnv::new().await;
    assert_config_error(
        &env,
        &config_path(),
        &[("TOLLGATE__SERVER__LISTEN", "nonsense")],
        "server.listen",
    )
    .await;
}

#[tokio::test]
async fn unknown_key_in_the_config_file_stops_startup() {
    let env = TestEnv::new().await;
    let path = env.dir.path().join("bogus.toml");
    std::fs::write(&path, "[server]\nbogus = 1\n").unwrap();
    assert_config_error(&env, &path, &[], "bogus").await;
    // An unknown key through the environment is named too.
    assert_config_error(
        &env,
        &config_path(),
        &[("TOLLGATE__SERVER__BOGUS", "1")],
        "server.bogus",
    )
    .await;
}

#[tokio::test]
async fn conventional_variables_are_validated_like_their_keys() {
    let env = TestEnv::new().await;
    assert_config_error(
        &env,
        &config_path(),
        &[("DATABASE_POOL_TIMEOUT", "0")],
        "database.connect_timeout_ms",
    )
    .await;
    assert_config_error(
        &env,
        &config_path(),
        &[("REDIS_URL", "http://x")],
        "redis.url",
    )
    .await;
}

#[tokio::test]
async fn a_missing_explicit_config_file_stops_startup() {
    let env = TestEnv::new().await;
    let path = env.dir.path().join("does-not-exist.toml");
    let (ok, out, err) = serve_once(&env, &path, &[]).await;
    assert!(!ok, "{out}");
    assert!(err.contains("does-not-exist.toml"), "{err}");
}

// ---------------------------------------------------------------------------------
// 7. ops endpoints
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn gateway_starts_without_postgres_and_reports_unhealthy() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[
                ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x"),
                ("TOLLGATE__DATABASE__CONNECT_TIMEOUT_MS", "1000"),
            ],
        )
        .await;

    let (s, _, b) = env.request("GET", &gw.url("/livez"), None, None).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));

    let (s, h, b) = env.request("GET", &gw.url("/readyz"), None, None).await;
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
    assert!(
        h.get("content-type")
            .is_some_and(|c| c.contains("application/json")),
        "{h:?}"
    );
    let v = json(&b);
    assert!(v.is_object(), "{v}");
    assert_eq!(v["database"], false, "{v}");
    assert_eq!(v["redis"], true, "{v}");
    assert_ne!(v["status"], "ready", "{v}");

    let (s, _, b) = env.request("GET", &gw.url("/health"), None, None).await;
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["status"], "unhealthy", "{v}");
    assert_eq!(v["redis"]["status"], "healthy", "{v}");
}

#[tokio::test]
async fn health_reports_the_pool_and_redis() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env.gateway(&mock).await;

    let (s, _, b) = env.request("GET", &gw.url("/health"), None, None).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["status"], "healthy", "{v}");
    let rt = v["responseTime"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(
        rt.strip_suffix("ms")
            .is_some_and(|n| n.parse::<u64>().is_ok()),
        "{rt}"
    );
    let pool = &v["pool"];
    assert_eq!(pool["total"], 20, "{v}");
    assert!(pool["idle"].as_u64().is_some_and(|i| i <= 20), "{v}");
    assert!(pool["waiting"].as_u64().is_some(), "{v}");
    let util = pool["utilization"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    assert!(
        util.strip_suffix('%')
            .is_some_and(|n| n.parse::<u64>().is_ok_and(|n| n <= 100)),
        "{util}"
    );
    assert_eq!(v["redis"]["status"], "healthy", "{v}");

    let (s, _, b) = env.request("GET", &gw.url("/readyz"), None, None).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let (s, _, _) = env.request("GET", &gw.url("/livez"), None, None).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn health_reflects_database_pool_size() {
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(&mock, &[("DATABASE_POOL_SIZE", "7")])
        .await;
    let (s, _, b) = env.request("GET", &gw.url("/health"), None, None).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["pool"]["total"], 7, "{v}");
}

#[tokio::test]
async fn readiness_fails_while_redis_is_down_and_recovers() {
    // A Redis of this test's own, so it can be stopped without touching the others.
    let port = free_port();
    let mut redis_server = private_redis(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let env = TestEnv::new().await;
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(&mock, &[("REDIS_URL", url.as_str())])
        .await;
    let (s, _, _) = env.request("GET", &gw.url("/readyz"), None, None).await;
    assert_eq!(s, 200);
    redis_server.kill().await.unwrap();
    let _ = redis_server.wait().await;
    let (s, _, b) = env.request("GET", &gw.url("/readyz"), None, None).await;
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["redis"], false);
    let (s, _, b) = env.request("GET", &gw.url("/health"), None, None).await;
    assert_eq!(s, 503);
    assert_eq!(json(&b)["redis"]["status"], "unhealthy");
    // A request that needs Redis gets a clear 503, not a hang.
    let (_, token) = env.user(0).await;
    let (s, h, b) = env
        .chat(
            &gw,
            &token,
            serde_json::json!({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
    assert!(h.contains_key("x-request-id"));
    assert_eq!(openai_error(&b)["code"], "service_unavailable");
    // Redis returns (empty): readiness follows.
    let mut again = private_redis(port).await;
    let mut ready = false;
    for _ in 0..100 {
        let (s, _, _) = env.request("GET", &gw.url("/readyz"), None, None).await;
        if s == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "ready again once Redis is back");
    again.kill().await.unwrap();
}

#[tokio::test]
async fn the_server_creates_upcoming_partitions() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let now = Utc::now().date_naive();
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    let next = format!("usage_history_{y:04}_{m:02}");
    db.batch_execute(&format!("DROP TABLE {next}"))
        .await
        .unwrap();
    let mock = env.mock(&[]).await;
    let _gw = env.gateway(&mock).await;
    let mut found = false;
    for _ in 0..100 {
        let r: Option<String> = db
            .query_one("SELECT to_regclass($1)::text", &[&next])
            .await
            .unwrap()
            .get(0);
        if r.is_some() {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(found, "{next} recreated by the running server");
}

/// The first instant (UTC) of the month `k` months from this one, and the name of its
/// `usage_history` partition.
fn month(k: i32) -> (chrono::DateTime<Utc>, String) {
    let first = Utc::now().date_naive().with_day(1).unwrap();
    let m = chrono::Months::new(k.unsigned_abs());
    let d = if k >= 0 {
        first.checked_add_months(m)
    } else {
        first.checked_sub_months(m)
    }
    .unwrap();
    (
        d.and_hms_opt(0, 0, 0).unwrap().and_utc(),
        format!("usage_history_{}", d.format("%Y_%m")),
    )
}

/// A new user, for usage rows.
async fn usage_writer(db: &tokio_postgres::Client) -> Uuid {
    db.query_one(
        "INSERT INTO users (email) VALUES ($1) RETURNING id",
        &[&format!(
            "p{}@example.com",
            &Uuid::new_v4().simple().to_string()[..10]
        )],
    )
    .await
    .unwrap()
    .get(0)
}

/// Writes a usage row of `user` created at `at`; returns its id.
async fn usage_at(db: &tokio_postgres::Client, user: &Uuid, at: chrono::DateTime<Utc>) -> Uuid {
    let id = Uuid::new_v4();
    db.execute(
        "INSERT INTO usage_history (id, user_id, model_id, operation, credits_used,
                                    input_tokens, output_tokens, total_tokens, request_metadata, created_at)
         VALUES ($1, $2, 'gpt-5', 'chat', 7, 1, 2, 3, '{\"k\": \"v\"}', $3)",
        &[&id, user, &at],
    )
    .await
    .unwrap();
    id
}

/// The partition a usage row is in.
async fn partition_of(db: &tokio_postgres::Client, id: &Uuid) -> String {
    db.query_one(
        "SELECT tableoid::regclass::text FROM usage_history WHERE id = $1",
        &[id],
    )
    .await
    .unwrap()
    .get(0)
}

/// Whether `part` is a partition of usage_history.
async fn is_partition(db: &tokio_postgres::Client, part: &str) -> bool {
    db.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_inherits
                         WHERE inhparent = 'usage_history'::regclass AND inhrelid = to_regclass($1))",
        &[&part],
    )
    .await
    .unwrap()
    .get(0)
}

/// Every usage row in full, sorted (to compare before and after a move).
async fn all_usage_rows(db: &tokio_postgres::Client) -> Vec<String> {
    db.query("SELECT u::text FROM usage_history u ORDER BY u::text", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A partition's indexes (and the parent index each is attached to) and constraints,
/// with its own name replaced by `P`, so that two partitions can be compared.
async fn partition_shape(db: &tokio_postgres::Client, part: &str) -> Vec<String> {
    let mut shape: Vec<String> = db
        .query(
            "SELECT replace(pg_get_indexdef(i.indexrelid), $1, 'P') || ' of '
                    || coalesce((SELECT inhparent::regclass::text FROM pg_inherits
                                  WHERE inhrelid = i.indexrelid), '-')
               FROM pg_index i WHERE i.indrelid = to_regclass($1)
             UNION ALL
             SELECT contype::text || ' ' || replace(conname, $1, 'P') || ' '
                    || pg_get_constraintdef(oid) || ' local=' || conislocal
                    || ' inherited=' || coninhcount
               FROM pg_constraint WHERE conrelid = to_regclass($1)",
            &[&part],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    shape.sort();
    shape
}

#[tokio::test]
async fn partition_upkeep_moves_rows_out_of_default_into_the_new_months() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    // The template has partitions through two months ahead (the default).
    let (now_start, this_part) = month(0);
    for k in 0..=2 {
        assert!(is_partition(&db, &month(k).1).await, "month {k}");
    }
    for k in 3..=8 {
        assert!(!is_partition(&db, &month(k).1).await, "month {k}");
    }
    let user = usage_writer(&db).await;
    let (m3, p3) = month(3);
    let (m5, p5) = month(5);
    let (m6, p6) = month(6);
    let (m8, _) = month(8);
    let (past, _) = month(-30);
    let micro = chrono::Duration::microseconds(1);
    // Rows in months without partitions (so in DEFAULT), at their edges too.
    let in3 = usage_at(&db, &user, m3 + chrono::Duration::days(3)).await;
    let in5 = [
        usage_at(&db, &user, m5).await,
        usage_at(&db, &user, m5 + chrono::Duration::hours(100)).await,
        usage_at(&db, &user, m6 - micro).await,
    ];
    let in6 = usage_at(&db, &user, m6).await;
    // Beyond the months asked for, and long past: these stay in DEFAULT.
    let in8 = usage_at(&db, &user, m8).await;
    let old = usage_at(&db, &user, past).await;
    for id in in5.iter().chain([&in3, &in6, &in8, &old]) {
        assert_eq!(partition_of(&db, id).await, "usage_history_default");
    }
    let before = all_usage_rows(&db).await;

    let created: i32 = db
        .query_one("SELECT tollgate_ensure_usage_partitions(now(), 6)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(created, 4, "months 3, 4, 5 and 6 are created");
    for k in 0..=6 {
        assert!(is_partition(&db, &month(k).1).await, "month {k}");
    }
    assert!(!is_partition(&db, &month(7).1).await);
    assert_eq!(partition_of(&db, &in3).await, p3);
    for id in &in5 {
        assert_eq!(partition_of(&db, id).await, p5);
    }
    assert_eq!(partition_of(&db, &in6).await, p6);
    assert_eq!(partition_of(&db, &in8).await, "usage_history_default");
    assert_eq!(partition_of(&db, &old).await, "usage_history_default");
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM usage_history_default WHERE created_at >= $1 AND created_at < $2",
            &[
                &now_start,
                &m6.checked_add_months(chrono::Months::new(1)).unwrap(),
            ],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "DEFAULT keeps nothing of the months created");
    // Nothing lost, nothing duplicated, nothing changed.
    assert_eq!(all_usage_rows(&db).await, before);

    // A partition made from rows in DEFAULT is like every other one: same indexes
    // (attached to the parent's), primary key, foreign keys and checks.
    let reference = partition_shape(&db, &this_part).await;
    assert!(
        reference
            .iter()
            .any(|s| s.contains("FOREIGN KEY (model_id)")),
        "{reference:?}"
    );
    assert_eq!(partition_shape(&db, &p5).await, reference);
    // ... and the key works across it: a replay inserts nothing.
    let replayed = db
        .execute(
            "INSERT INTO usage_history SELECT * FROM usage_history WHERE id = $1
             ON CONFLICT (id, created_at) DO NOTHING",
            &[&in5[0]],
        )
        .await
        .unwrap();
    assert_eq!(replayed, 0);

    // Again: nothing to do, nothing moves.
    let created: i32 = db
        .query_one("SELECT tollgate_ensure_usage_partitions(now(), 6)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(created, 0);
    assert_eq!(all_usage_rows(&db).await, before);
    assert_eq!(partition_of(&db, &in8).await, "usage_history_default");
}

#[tokio::test]
async fn a_gateway_started_with_rows_in_default_creates_the_partitions() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    let user = usage_writer(&db).await;
    let (m4, p4) = month(4);
    let ids = [
        usage_at(&db, &user, m4).await,
        usage_at(&db, &user, m4 + chrono::Duration::days(9)).await,
    ];
    for id in &ids {
        assert_eq!(partition_of(&db, id).await, "usage_history_default");
    }
    let mock = env.mock(&[]).await;
    let gw = env
        .gateway_with(
            &mock,
            &[("TOLLGATE__DATABASE__PARTITIONS_AHEAD_MONTHS", "5")],
        )
        .await;
    let mut page = String::new();
    for _ in 0..200 {
        page = env.metrics(&gw).await;
        if page
            .lines()
            .any(|l| l == "tollgate_partition_months_ahead 5")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        page.lines()
            .any(|l| l == "tollgate_partition_months_ahead 5"),
        "{page}\n{}",
        gw.log_text()
    );
    assert!(
        page.lines()
            .any(|l| l == "tollgate_partition_upkeep_failures_total 0"),
        "{page}"
    );
    for k in 0..=5 {
        assert!(is_partition(&db, &month(k).1).await, "month {k}");
    }
    for id in &ids {
        assert_eq!(partition_of(&db, id).await, p4);
    }
    let default_rows: i64 = db
        .query_one("SELECT count(*) FROM usage_history_default", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(default_rows, 0);
    assert!(!gw.log_text().contains("partition upkeep failed"));
}

#[tokio::test]
async fn a_failed_partition_upkeep_is_counted_and_logged_as_an_error() {
    let env = TestEnv::new().await;
    let db = env.db().await;
    // Next month's name is taken by a table that is not a partition: upkeep cannot
    // create the month (the old function skipped it, leaving its rows to DEFAULT).
    let (_, next) = month(1);
    db.batch_execute(&format!(
        "DROP TABLE {next}; CREATE TABLE {next} (note text)"
    ))
    .await
    .unwrap();
    let mock = env.mock(&[]).await;
    // Upkeep retries at each models refresh after a failure.
    let gw = env
        .gateway_with(&mock, &[("TOLLGATE__MODELS__REFRESH_MS", "100")])
        .await;
    let mut page = String::new();
    for _ in 0..300 {
        page = env.metrics(&gw).await;
        if counter(&page, "tollgate_partition_upkeep_failures_total") >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        counter(&page, "tollgate_partition_upkeep_failures_total") >= 2,
        "failures counted, and retried before the hour: {page}\n{}",
        gw.log_text()
    );
    // This month is ready, the next is not.
    assert!(
        page.lines()
            .any(|l| l == "tollgate_partition_months_ahead 0"),
        "{page}"
    );
    let log = gw.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("partition upkeep failed"))
        .unwrap_or_else(|| panic!("no failure logged: {log}"));
    assert!(line.contains("ERROR"), "logged at error level: {line}");
    assert!(line.contains(&next), "the log names the table: {line}");

    // Once the table is out of the way, the next attempt creates the month.
    db.batch_execute(&format!("DROP TABLE {next}"))
        .await
        .unwrap();
    for _ in 0..300 {
        page = env.metrics(&gw).await;
        if page
            .lines()
            .any(|l| l == "tollgate_partition_months_ahead 2")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        page.lines()
            .any(|l| l == "tollgate_partition_months_ahead 2"),
        "{page}"
    );
    assert!(is_partition(&db, &next).await);
}
