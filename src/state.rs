//! Shared state of a running gateway: `AppState(Arc<Inner>)`.

use std::ops::Deref;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::authenticate::Authenticator;
use crate::config::Config;
use crate::db::Db;
use crate::ledger::Ledger;
use crate::preferences::PreferenceCache;
use crate::route::Models;
use crate::upstream::Upstream;

pub struct Inner {
    pub cfg: Config,
    pub db: Db,
    pub ledger: Ledger,
    /// Each worker thread's own connection to the ledger (set when the worker starts).
    pub hot: crate::worker::PerWorker<std::sync::OnceLock<Ledger>>,
    pub auth: Authenticator,
    pub models: Models,
    pub upstream: Upstream,
    pub rate_limits: crate::rate_limit::RateLimits,
    pub preferences: PreferenceCache,
    /// Permits for reading on after a streaming client left (`server.disconnect_drains`).
    pub drains: tokio::sync::Semaphore,
    /// Argon2 capacity: hashes running and waiting (`passwords.max_queued`).
    pub hashers: crate::password::Hashers,
    /// Set on SIGTERM: `/readyz` answers 503 while in-flight requests finish.
    pub draining: AtomicBool,
    /// Request tails (streams draining, settles) that shutdown must wait for.
    pub tasks: TaskTracker,
    /// Cancelled when the shutdown grace period ends: every request still in flight
    /// settles what it received (or releases its hold) and stops.
    pub cut: tokio_util::sync::CancellationToken,
    /// Where a request's ticket goes when it is dropped unsettled (see
    /// [`crate::settle::Ticket`]).
    pub orphans: crate::usage::Orphans,
    /// The other end of `orphans`: the server's orphan task reads it, and shutdown
    /// drains what is left once the workers have stopped.
    pub orphans_rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<crate::usage::Orphan>>,
}

#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl Inner {
    /// The ledger for the request path: this worker thread's connection, or the shared
    /// one on any other thread.
    pub fn hot_ledger(&self) -> &Ledger {
        self.hot.get().get().unwrap_or(&self.ledger)
    }
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The shutdown cut (the end of the grace period) as one future for a whole loop of
/// reads: it registers its waiter once, not once per read.
pub struct Cut(std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>);

impl Cut {
    pub fn new(state: &AppState) -> Cut {
        Cut(Box::pin(state.cut.clone().cancelled_owned()))
    }

    /// Runs `f` unless the cut comes first.
    pub async fn or<F: std::future::Future>(&mut self, f: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            r = f => Some(r),
            _ = self.0.as_mut() => None,
        }
    }
}

/// Runs `f` unless the shutdown cut comes first.
pub async fn unless_cut<F: std::future::Future>(state: &AppState, f: F) -> Option<F::Output> {
    Cut::new(state).or(f).await
}

/// What a request cut by shutdown answers.
pub fn shutting_down() -> crate::error::ApiError {
    crate::error::ApiError::Unavailable {
        message: "the gateway is shutting down; retry".into(),
    }
}

/// The request id (UUIDv7, assigned as a request comes in): the key of the hold, the
/// settle and the `usage_history` row, returned as `x-request-id`.
#[derive(Debug, Clone, Copy)]
pub struct RequestId(pub uuid::Uuid);

/// The preference cache's view of the gateway (it sits below this module).
impl crate::preferences::Host for AppState {
    fn db(&self) -> &Db {
        &self.db
    }
    fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }
    fn preferences(&self) -> &PreferenceCache {
        &self.preferences
    }
}
