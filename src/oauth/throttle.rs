//! Sign-in throttling per account and per client IP, in Redis (shared by every
//! replica), decided BEFORE the password is hashed so that parallel guesses cannot
//! outrun it.
//!
//! Each subject (the account's email, the client IP: IPv4 by address, IPv6 by its /64,
//! see [`ip_subject`]) has an attempt count (kept `oauth.signin_failure_window_secs`
//! from its first attempt) and a lock key. One Lua script per subject (`ATTEMPT`)
//! checks the lock and counts the attempt in one atomic step: while the lock is set the
//! attempt is refused (not counted, the lock not extended); otherwise it is counted,
//! and the attempt that brings the count to `oauth.signin_max_failures` (and each one
//! admitted after it within the window, once a lock has expired) arms the lock for
//! `oauth.signin_lockout_initial_secs`, doubling per such attempt up to
//! `oauth.signin_lockout_max_secs`. So at most `signin_max_failures` wrong passwords
//! are checked per window before the lock, and one more each time it expires, however
//! many guesses arrive at once. When such an attempt's password proves wrong, `FAILED`
//! re-arms its lock so that it lasts its full time from the failure (as the lock did
//! when it was armed after the hash).
//!
//! The IP is asked first, then the account; an attempt one of them refuses is given
//! back to the other. A wrong password keeps its count; an attempt whose password was
//! never checked (refused, hasher queue full, an error) is given back to both; a
//! successful sign-in clears the account's count and gives the IP its attempt back
//! (users behind one NAT do not lock each other out by signing in). A given-back
//! attempt also lifts the lock it armed itself (the lock holds the count that armed
//! it), never one another attempt armed.
//!
//! Every script touches one subject's keys, which share a hash tag
//! (`{signin:acct:…}`, `{signin:ip:…}`), so each runs in one slot of a Redis Cluster.

use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::config::OAuthConfig;

// The scripts, one file each under src/lua/; each file's header says what it does, its
// KEYS, ARGV and answer.

/// Counts an attempt unless the subject is locked; arms the lock at the maximum.
const ATTEMPT: &str = include_str!("../lua/signin_attempt.lua");

/// Re-arms the lock a wrong password's attempt armed.
const FAILED: &str = include_str!("../lua/signin_failed.lua");

/// Gives an attempt back (or clears the count).
const GIVE_BACK: &str = include_str!("../lua/signin_give_back.lua");

/// The throttle subject of a client IP: an IPv4 address as is (IPv4-mapped IPv6
/// included), an IPv6 address by its /64 (one host commonly holds a whole /64).
pub fn ip_subject(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Account,
    Ip,
}

impl Subject {
    fn kind(self) -> &'static str {
        match self {
            Subject::Account => "acct",
            Subject::Ip => "ip",
        }
    }

    /// The label of `tollgate_signin_locked_total`.
    pub fn label(self) -> &'static str {
        match self {
            Subject::Account => "account",
            Subject::Ip => "ip",
        }
    }
}

/// An admitted attempt: its number in each subject's count (to give it back).
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    account: i64,
    ip: i64,
}

#[derive(Debug)]
pub enum Verdict {
    /// Check the password, then report [`Throttle::succeeded`] or
    /// [`Throttle::unchecked`] (nothing for a wrong password).
    Admitted(Ticket),
    /// Refused without checking the password.
    Locked { by: Subject, retry_after: Duration },
}

pub struct Throttle {
    conn: ConnectionManager,
    prefix: String,
}

static ATTEMPT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ATTEMPT));
static GIVE_BACK_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(GIVE_BACK));
static FAILED_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(FAILED));

fn digest_hex(s: &str) -> String {
    let d = crate::oauth::sha256(&s.to_lowercase());
    d.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

enum Taken {
    Admitted(i64),
    Locked(Duration),
}

impl Throttle {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Throttle {
        Throttle {
            conn,
            prefix: prefix.to_owned(),
        }
    }

    /// (count key, lock key) of a subject; one hash tag so both live in one slot.
    fn keys(&self, subject: Subject, value: &str) -> (String, String) {
        let base = format!(
            "{}{{signin:{}:{}}}",
            self.prefix,
            subject.kind(),
            digest_hex(value)
        );
        (format!("{base}:n"), format!("{base}:lock"))
    }

    async fn take(
        &self,
        subject: Subject,
        value: &str,
        cfg: &OAuthConfig,
    ) -> Result<Taken, redis::RedisError> {
        let (n, lock) = self.keys(subject, value);
        let mut c = self.conn.clone();
        let (n, ttl): (i64, i64) = ATTEMPT_SCRIPT
            .key(n)
            .key(lock)
            .arg(millis(cfg.signin_failure_window))
            .arg(cfg.signin_max_failures)
            .arg(millis(cfg.signin_lockout_max))
            .arg(millis(cfg.signin_lockout_initial))
            .invoke_async(&mut c)
            .await?;
        Ok(if n > 0 {
            Taken::Admitted(n)
        } else {
            Taken::Locked(Duration::from_millis(u64::try_from(ttl).unwrap_or(1000)))
        })
    }

    async fn give_back(
        &self,
        subject: Subject,
        value: &str,
        n: i64,
        clear: bool,
    ) -> Result<(), redis::RedisError> {
        let (count, lock) = self.keys(subject, value);
        let mut c = self.conn.clone();
        GIVE_BACK_SCRIPT
            .key(count)
            .key(lock)
            .arg(n)
            .arg(if clear { "1" } else { "0" })
            .invoke_async::<i64>(&mut c)
            .await
            .map(|_| ())
    }

    async fn give_back_logged(&self, subject: Subject, value: &str, n: i64, clear: bool) {
        if let Err(e) = self.give_back(subject, value, n, clear).await {
            tracing::warn!(error = %e, subject = subject.label(), "could not give a sign-in attempt back");
        }
    }

    /// Counts an attempt on `ip` (from [`ip_subject`]) and `email`, or refuses it
    /// while either is locked. One script call per subject.
    pub async fn attempt(
        &self,
        email: &str,
        ip: &str,
        cfg: &OAuthConfig,
    ) -> Result<Verdict, redis::RedisError> {
        let ip_n = match self.take(Subject::Ip, ip, cfg).await? {
            Taken::Admitted(n) => n,
            Taken::Locked(retry_after) => {
                return Ok(Verdict::Locked {
                    by: Subject::Ip,
                    retry_after,
                })
            }
        };
        match self.take(Subject::Account, email, cfg).await {
            Ok(Taken::Admitted(n)) => Ok(Verdict::Admitted(Ticket {
                account: n,
                ip: ip_n,
            })),
            Ok(Taken::Locked(retry_after)) => {
                self.give_back_logged(Subject::Ip, ip, ip_n, false).await;
                Ok(Verdict::Locked {
                    by: Subject::Account,
                    retry_after,
                })
            }
            Err(e) => {
                self.give_back_logged(Subject::Ip, ip, ip_n, false).await;
                Err(e)
            }
        }
    }

    /// The password was wrong: the attempt stays counted, and a lock it armed is
    /// re-armed to last its full time from now.
    pub async fn failed(&self, email: &str, ip: &str, t: Ticket, cfg: &OAuthConfig) {
        for (subject, value, n) in [
            (Subject::Account, email, t.account),
            (Subject::Ip, ip, t.ip),
        ] {
            let (count, lock) = self.keys(subject, value);
            let mut c = self.conn.clone();
            let r = FAILED_SCRIPT
                .key(count)
                .key(lock)
                .arg(n)
                .arg(cfg.signin_max_failures)
                .arg(millis(cfg.signin_lockout_max))
                .arg(millis(cfg.signin_lockout_initial))
                .invoke_async::<i64>(&mut c)
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, subject = subject.label(), "could not re-arm a sign-in lock");
            }
        }
    }

    /// The password was right: the account's count is cleared, the IP's attempt given
    /// back.
    pub async fn succeeded(&self, email: &str, ip: &str, t: Ticket) {
        self.give_back_logged(Subject::Account, email, t.account, true)
            .await;
        self.give_back_logged(Subject::Ip, ip, t.ip, false).await;
    }

    /// The password was not checked (no hasher free, an error): the attempt is given
    /// back to both subjects.
    pub async fn unchecked(&self, email: &str, ip: &str, t: Ticket) {
        self.give_back_logged(Subject::Account, email, t.account, false)
            .await;
        self.give_back_logged(Subject::Ip, ip, t.ip, false).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_peers_are_keyed_by_their_64_and_ipv4_by_address() {
        let s = |a: &str| ip_subject(a.parse().unwrap());
        assert_eq!(s("192.0.2.7"), "192.0.2.7");
        assert_ne!(s("192.0.2.7"), s("192.0.2.8"));
        // IPv4-mapped IPv6 is the IPv4 address.
        assert_eq!(s("::ffff:192.0.2.7"), "192.0.2.7");
        // One /64: every interface identifier is the same subject.
        assert_eq!(s("2001:db8:1:2::1"), "2001:db8:1:2::/64");
        assert_eq!(
            s("2001:db8:1:2:aaaa:bbbb:cccc:dddd"),
            s("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        // The next /64 is another subject.
        assert_ne!(s("2001:db8:1:2::1"), s("2001:db8:1:3::1"));
        assert_eq!(s("::1"), "0:0:0:0::/64");
    }
}
