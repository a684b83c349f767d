//! Password hashing: Argon2id with the configured parameters (`[passwords]`, OWASP's
//! by default). A stored hash made with other (weaker) parameters verifies and is
//! replaced on the next successful sign-in.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, PasswordVerifier, Version};

fn hasher(params: &Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
}

/// A PHC-format Argon2id hash of `password`.
pub fn hash(password: &str, params: &Params) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    hasher(params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
}

/// Whether `password` matches the PHC hash `stored` (any Argon2 variant/parameters).
pub fn verify(password: &str, stored: &str) -> bool {
    match PasswordHash::new(stored) {
        Ok(h) => Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// Whether `stored` should be rehashed: another algorithm or version, or any parameter
/// below the configured one.
pub fn needs_rehash(stored: &str, params: &Params) -> bool {
    let Ok(h) = PasswordHash::new(stored) else {
        return true;
    };
    if h.algorithm.as_str() != "argon2id" || h.version != Some(0x13) {
        return true;
    }
    let Ok(p) = Params::try_from(&h) else {
        return true;
    };
    p.m_cost() < params.m_cost() || p.t_cost() < params.t_cost() || p.p_cost() < params.p_cost()
}

/// Argon2 runs on the blocking pool with at most this many hashes at once per core:
/// each holds `argon2_memory_kib` of memory, so a burst of sign-ins must queue rather
/// than allocate without bound.
const HASHES_PER_CORE: usize = 2;

/// What a hash is run for: the label of `tollgate_password_hashes_total` and
/// `tollgate_password_queue_full_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A user's password on the sign-in form.
    SignIn,
    /// A confidential client's secret at `/oauth/token`.
    ClientSecret,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Purpose::SignIn => "signin",
            Purpose::ClientSecret => "client_secret",
        }
    }
}

/// Why [`Hashers::run`] did not run the hash.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// Every hasher is busy and `passwords.max_queued` callers already wait: retry
    /// shortly (503).
    #[error("every password hasher is busy and the queue is full")]
    Busy,
    /// The blocking task failed.
    #[error("password hashing failed: {0}")]
    Failed(String),
}

/// The process's Argon2 capacity: at most `running` hashes at once, at most
/// `max_queued` more callers waiting for one; a caller past that is refused at once
/// ([`HashError::Busy`]) instead of waiting without bound.
pub struct Hashers {
    running: std::sync::Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    max_queued: usize,
}

/// A place in the queue, given back when dropped (the hash started, or the caller
/// went away).
struct QueueSlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Hashers {
    /// `HASHES_PER_CORE` running per core, `max_queued` waiting.
    pub fn new(max_queued: usize) -> Hashers {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        Hashers::with_limits(cores.saturating_mul(HASHES_PER_CORE), max_queued)
    }

    pub fn with_limits(running: usize, max_queued: usize) -> Hashers {
        Hashers {
            running: std::sync::Arc::new(tokio::sync::Semaphore::new(running.max(1))),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            max_queued,
        }
    }

    /// Callers waiting for a hasher now.
    pub fn queued(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Acquire)
    }

    fn queue_slot(&self) -> Option<QueueSlot<'_>> {
        use std::sync::atomic::Ordering;
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queued).then_some(n + 1)
            })
            .ok()
            .map(|_| QueueSlot(&self.waiting))
    }

    /// Runs `f` (password hashing or verification) on the blocking pool, bounded. The
    /// permit travels with the blocking task, so a caller that goes away mid-hash does
    /// not free its place before the hash has finished.
    pub async fn run<T: Send + 'static>(
        &self,
        purpose: Purpose,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        use tokio::sync::TryAcquireError;
        let permit = match self.running.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return Err(HashError::Failed("closed".into())),
            Err(TryAcquireError::NoPermits) => {
                let Some(_slot) = self.queue_slot() else {
                    metrics::counter!(
                        "tollgate_password_queue_full_total",
                        "purpose" => purpose.label()
                    )
                    .increment(1);
                    return Err(HashError::Busy);
                };
                self.running
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| HashError::Failed(e.to_string()))?
            }
        };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            metrics::counter!("tollgate_password_hashes_total", "purpose" => purpose.label())
                .increment(1);
            f()
        })
        .await
        .map_err(|e| HashError::Failed(e.to_string()))
    }
}

/// A hash of a random password: verified against when the account does not exist, so
/// that a missing account takes as long to refuse as a wrong password.
pub fn dummy_hash(params: &Params) -> String {
    let mut pw = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut pw);
    hash(&String::from_utf8_lossy(&pw), params).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_rehash_when_parameters_rise() {
        let low = Params::new(8 * 1024, 1, 1, None).unwrap();
        let owasp = Params::new(19_456, 2, 1, None).unwrap();
        let h = hash("correct horse", &low).unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=8192,t=1,p=1$"), "{h}");
        assert!(verify("correct horse", &h));
        assert!(!verify("wrong horse", &h));
        assert!(needs_rehash(&h, &owasp));
        assert!(!needs_rehash(&h, &low));
        let h2 = hash("correct horse", &owasp).unwrap();
        assert!(!needs_rehash(&h2, &owasp));
        assert!(needs_rehash("not a hash", &owasp));
        assert!(!verify("x", "not a hash"));
    }

    type Busy = (
        std::sync::Arc<Hashers>,
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<i32, HashError>>,
    );

    /// One hasher and a queue of one, the hasher busy with a job that returns 1 once
    /// the sender is used.
    async fn busy_hasher() -> Busy {
        let h = std::sync::Arc::new(Hashers::with_limits(1, 1));
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn({
            let h = h.clone();
            async move {
                h.run(Purpose::SignIn, move || {
                    let _ = started.send(());
                    hold.recv().ok();
                    1
                })
                .await
            }
        });
        running.await.unwrap();
        (h, release, first)
    }

    /// Spawns a sign-in job returning `v` and waits until it is queued.
    async fn queued_job(
        h: &std::sync::Arc<Hashers>,
        v: i32,
    ) -> tokio::task::JoinHandle<Result<i32, HashError>> {
        let job = tokio::spawn({
            let h = h.clone();
            async move { h.run(Purpose::SignIn, move || v).await }
        });
        while h.queued() < 1 {
            tokio::task::yield_now().await;
        }
        job
    }

    #[tokio::test]
    async fn the_queue_is_bounded_and_a_full_one_refuses_at_once() {
        let (h, release, first) = busy_hasher().await;
        // The one hasher is busy: the next caller waits, the one after is refused.
        let second = queued_job(&h, 2).await;
        assert!(matches!(
            h.run(Purpose::ClientSecret, || 3).await,
            Err(HashError::Busy)
        ));
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(second.await.unwrap().unwrap(), 2);
        assert_eq!(h.queued(), 0);
        assert_eq!(h.run(Purpose::SignIn, || 4).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_gives_its_place_back() {
        let (h, release, first) = busy_hasher().await;
        let waiter = queued_job(&h, 0).await;
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        assert_eq!(h.queued(), 0, "the aborted caller's place is free again");
        let again = queued_job(&h, 5).await;
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(again.await.unwrap().unwrap(), 5);
    }
}
