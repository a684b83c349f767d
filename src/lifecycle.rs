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
