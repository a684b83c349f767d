//! PostgreSQL: the pool, migrations, seeds and `usage_history` partitions.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::NoTls;

use crate::config::DatabaseConfig;

pub type Manager = PostgresConnectionManager<NoTls>;
pub type Conn<'a> = bb8::PooledConnection<'a, Manager>;

/// Schema migrations, applied in order by `tollgate migrate`.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "schema", include_str!("../migrations/0001_schema.sql")),
    (2, "oauth", include_str!("../migrations/0002_oauth.sql")),
    (
        3,
        "model_image_tokens",
        include_str!("../migrations/0003_model_image_tokens.sql"),
    ),
    (
        4,
        "partition_upkeep",
        include_str!("../migrations/0004_partition_upkeep.sql"),
    ),
    (
        5,
        "prices_per_token_kind",
        include_str!("../migrations/0005_prices_per_token_kind.sql"),
    ),
    (
        6,
        "lifecycle",
        include_str!("../migrations/0006_lifecycle.sql"),
    ),
    (
        7,
        "scheduled_tier",
        include_str!("../migrations/0007_scheduled_tier.sql"),
    ),
];

/// Seeds, applied by `tollgate seed` (idempotent upserts).
pub const SEEDS: &[(&str, &str)] = &[
    (
        "0001_oauth_clients",
        include_str!("../seeds/0001_oauth_clients.sql"),
    ),
    ("0002_models", include_str!("../seeds/0002_models.sql")),
];

/// Advisory lock key that serialises concurrent `migrate` runs.
const MIGRATE_LOCK: i64 = 0x746f_6c6c_6761_7465;

#[derive(Clone)]
pub struct Db {
    pool: bb8::Pool<Manager>,
    waiting: Arc<AtomicUsize>,
    size: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database pool: {0}")]
    Pool(String),
    #[error("database: {}", pg_detail(.0))]
    Pg(#[from] tokio_postgres::Error),
}

/// A PostgreSQL error with the server's message and SQLSTATE when it sent one
/// (`tokio_postgres::Error` alone displays as "db error").
fn pg_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

/// PostgreSQL failed while answering (pool or query): 503, "database is temporarily
/// unavailable", the cause logged. (The OAuth endpoints answer in RFC 6749's shape
/// instead and map their database errors themselves.)
impl From<DbError> for crate::error::ApiError {
    fn from(e: DbError) -> Self {
        crate::error::ApiError::unavailable("database", e)
    }
}

/// As for [`DbError`]: a query on a connection already held.
impl From<tokio_postgres::Error> for crate::error::ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        crate::error::ApiError::unavailable("database", e)
    }
}

pub struct PoolStats {
    pub total: u32,
    pub idle: u32,
    pub waiting: usize,
}

impl Db {
    /// Builds the pool. Connections are opened lazily, so this succeeds while
    /// PostgreSQL is down; requests that need it then fail with 503.
    pub fn new(cfg: &DatabaseConfig) -> Result<Db, DbError> {
        let mut pg: tokio_postgres::Config = cfg.url.parse()?;
        pg.connect_timeout(cfg.connect_timeout);
        pg.application_name("tollgate");
        let pool = bb8::Pool::builder()
            .max_size(cfg.pool_size)
            .min_idle(Some(0))
            .idle_timeout(Some(cfg.idle_timeout))
            .connection_timeout(cfg.connect_timeout)
            .retry_connection(false)
            .build_unchecked(PostgresConnectionManager::new(pg, NoTls));
        Ok(Db {
            pool,
            waiting: Arc::new(AtomicUsize::new(0)),
            size: cfg.pool_size,
        })
    }

    pub async fn get(&self) -> Result<Conn<'_>, DbError> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let r = self.pool.get().await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        r.map_err(|e| DbError::Pool(e.to_string()))
    }

    /// Gets a connection, waiting at most `timeout` (health checks must not hang).
    pub async fn get_within(&self, timeout: Duration) -> Result<Conn<'_>, DbError> {
        match tokio::time::timeout(timeout, self.get()).await {
            Ok(r) => r,
            Err(_) => Err(DbError::Pool("timed out waiting for a connection".into())),
        }
    }

    pub fn stats(&self) -> PoolStats {
        let s = self.pool.state();
        PoolStats {
            total: self.size,
            idle: s.idle_connections,
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }

    pub fn in_use(&self) -> u32 {
        let s = self.pool.state();
        s.connections.saturating_sub(s.idle_connections)
    }
}

/// Applies pending migrations in order, each in its own transaction, under an
/// advisory lock. Returns the names of those applied (empty when up to date).
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<Vec<String>, DbError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .await?;
    let result = migrate_locked(client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
        .await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn migrate_locked(client: &mut tokio_postgres::Client) -> Result<Vec<String>, DbError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS tollgate_schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let rows = client
        .query(
            "SELECT version, checksum FROM tollgate_schema_migrations",
            &[],
        )
        .await?;
    let done: std::collections::HashMap<i32, String> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        let sum = checksum(sql);
        if let Some(existing) = done.get(version) {
            if *existing != sum {
                return Err(DbError::Pool(format!(
                    "migration {version:04}_{name} was changed after it was applied (checksum {existing} != {sum})"
                )));
            }
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO tollgate_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[version, name, &sum],
        )
        .await?;
        tx.commit().await?;
        applied.push(format!("{version:04}_{name}"));
    }
    Ok(applied)
}

/// FNV-1a 64 of the migration text: detects edits to applied migrations.
fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Ensures monthly `usage_history` partitions exist from this month through
/// `months_ahead` months ahead. Returns how many were created.
pub async fn ensure_partitions(
    client: &tokio_postgres::Client,
    months_ahead: i32,
) -> Result<i32, DbError> {
    let row = client
        .query_one(
            "SELECT tollgate_ensure_usage_partitions(now(), $1)",
            &[&months_ahead],
        )
        .await?;
    Ok(row.get(0))
}

/// How many months beyond this one have their `usage_history` partition, counting
/// until the first missing month (-1 when this month's is missing).
pub async fn partition_months_ready(client: &tokio_postgres::Client) -> Result<i32, DbError> {
    let row = client
        .query_one(
            "SELECT coalesce(min(i), 121) - 1 FROM generate_series(0, 121) AS i
              WHERE NOT EXISTS (
                    SELECT 1 FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
                     WHERE h.inhparent = 'usage_history'::regclass
                       AND c.relname = 'usage_history_' || to_char(
                           date_trunc('month', now() AT TIME ZONE 'UTC')
                               + make_interval(months => i), 'YYYY_MM'))",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// One round of the server's partition upkeep: ensures the partitions, sets
/// `tollgate_partition_months_ahead` to what is ready, and on failure logs at error
/// level and counts it in `tollgate_partition_upkeep_failures_total`. Returns
/// whether the partitions are in place.
pub async fn partition_upkeep(db: &Db, months_ahead: i32) -> bool {
    let client = match db.get().await {
        Ok(c) => c,
        Err(e) => {
            upkeep_failed(&e);
            return false;
        }
    };
    let ensured = ensure_partitions(&client, months_ahead).await;
    match partition_months_ready(&client).await {
        Ok(n) => metrics::gauge!("tollgate_partition_months_ahead").set(f64::from(n)),
        Err(e) => tracing::warn!(error = %e, "usage_history partitions not readable"),
    }
    match ensured {
        Ok(n) => {
            if n > 0 {
                tracing::info!(created = n, "usage_history partitions created");
            }
            true
        }
        Err(e) => {
            upkeep_failed(&e);
            false
        }
    }
}

fn upkeep_failed(e: &DbError) {
    metrics::counter!("tollgate_partition_upkeep_failures_total").increment(1);
    // PostgreSQL's own message (and hint) says what to fix; on one line.
    let why = match e {
        DbError::Pg(pg) => pg.as_db_error().map_or_else(
            || e.to_string(),
            |d| match d.hint() {
                Some(h) => format!("database: {} (hint: {h})", d.message()),
                None => format!("database: {}", d.message()),
            },
        ),
        DbError::Pool(_) => e.to_string(),
    };
    tracing::error!(error = %why, "usage_history partition upkeep failed; retrying at the next refresh");
}

/// Applies every seed in one transaction.
pub async fn seed(client: &mut tokio_postgres::Client) -> Result<Vec<String>, DbError> {
    let tx = client.transaction().await?;
    let mut names = Vec::new();
    for (name, sql) in SEEDS {
        tx.batch_execute(sql).await?;
        names.push((*name).to_owned());
    }
    tx.commit().await?;
    Ok(names)
}

/// Opens one unpooled connection (CLI commands).
pub async fn connect(cfg: &DatabaseConfig) -> Result<tokio_postgres::Client, DbError> {
    let mut pg: tokio_postgres::Config = cfg.url.parse()?;
    pg.connect_timeout(cfg.connect_timeout);
    pg.application_name("tollgate-cli");
    let (client, conn) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}
