//! Password hashing: Argon2id with the configured parameters (`[passwords]`, OWASP's
//! by default). A stored hash made with other (weaker) parameters verifies and is
//! replaced on the next successful sign-in.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, PasswordVerifier, Version};

fn hasher(params: &Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
}

/// A PHC-format Argon2id hash of `password`.
pub fn hash(password: &str, params: &Params) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    hasher(params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
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

fn permits() -> &'static tokio::sync::Semaphore {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        tokio::sync::Semaphore::new(cores.saturating_mul(HASHES_PER_CORE))
    })
}

/// Runs `f` (password hashing or verification) on the blocking pool, bounded.
pub async fn run_bounded<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let _permit = permits().acquire().await.map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())
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
}
