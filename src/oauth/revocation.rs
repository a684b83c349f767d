//! The background task that keeps the in-memory [`Revocations`] (held by the
//! authenticator) up to date, and deletes expired codes and refresh tokens.

pub use crate::authenticate::revocation::Revocations;
use crate::db::{Db, DbError};

/// The background task: reloads the sets every `oauth.revocation_refresh_ms`, and
/// hourly deletes codes and refresh tokens that expired more than a day ago.
pub async fn run(state: crate::state::AppState, mut stop: tokio::sync::watch::Receiver<bool>) {
    let window = state
        .auth
        .ttl_secs()
        .saturating_add(state.auth.leeway_secs())
        .saturating_add(60);
    let mut tick = tokio::time::interval(state.cfg.oauth.revocation_refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cleanup_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let revocations = state.auth.revocations();
        if let Err(e) = revocations.refresh(&state.db, window).await {
            tracing::warn!(error = %e, "reloading disabled users and revoked sign-ins failed");
        }
        if tokio::time::Instant::now() >= cleanup_at {
            if let Err(e) = cleanup(&state.db).await {
                tracing::warn!(error = %e, "deleting expired OAuth codes and tokens failed");
            }
            cleanup_at = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
        }
    }
}

async fn cleanup(db: &Db) -> Result<(), DbError> {
    let conn = db.get().await?;
    conn.batch_execute(
        "DELETE FROM oauth_authorization_codes WHERE expires_at < now() - interval '1 day';
         DELETE FROM oauth_refresh_tokens WHERE family_expires_at < now() - interval '1 day'",
    )
    .await?;
    Ok(())
}
