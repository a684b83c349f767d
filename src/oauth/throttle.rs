//! Slows repeated sign-in failures, per account and per client IP, in Redis (shared by
//! every replica). After `oauth.signin_max_failures` failures within
//! `oauth.signin_failure_window_secs`, each further failure locks the account (or IP)
//! for `oauth.signin_lockout_initial_secs`, doubling per failure up to `oauth.signin_lockout_max_secs`; while locked,
//! sign-in attempts are refused without checking the password. A successful sign-in
//! clears the account's count (not the IP's).

use redis::aio::ConnectionManager;

use crate::config::OAuthConfig;

const FAIL: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local max = tonumber(ARGV[2])
if n >= max then
  local ms = tonumber(ARGV[4]) * 2 ^ math.min(n - max, 30)
  ms = math.min(ms, tonumber(ARGV[3]))
  redis.call('SET', KEYS[2], '1', 'PX', math.floor(ms))
end
return n
";

pub struct Throttle {
    conn: ConnectionManager,
    prefix: String,
    script: redis::Script,
}

fn digest_hex(s: &str) -> String {
    let d = crate::oauth::sha256(&s.to_lowercase());
    d.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

impl Throttle {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Throttle {
        Throttle {
            conn,
            prefix: prefix.to_owned(),
            script: redis::Script::new(FAIL),
        }
    }

    /// (count key, lock key) of a subject; one hash tag so both live on one node.
    fn keys(&self, kind: &str, subject: &str) -> (String, String) {
        let base = format!("{}{{signin:{kind}:{}}}", self.prefix, digest_hex(subject));
        (format!("{base}:n"), format!("{base}:lock"))
    }

    /// Whether the account or the IP is locked out now.
    pub async fn locked(&self, email: &str, ip: &str) -> Result<bool, redis::RedisError> {
        let (_, a) = self.keys("acct", email);
        let (_, i) = self.keys("ip", ip);
        let mut c = self.conn.clone();
        let n: i64 = redis::cmd("EXISTS")
            .arg(&a)
            .query_async::<i64>(&mut c)
            .await?
            + redis::cmd("EXISTS")
                .arg(&i)
                .query_async::<i64>(&mut c)
                .await?;
        Ok(n > 0)
    }

    pub async fn failed(
        &self,
        email: &str,
        ip: &str,
        cfg: &OAuthConfig,
    ) -> Result<(), redis::RedisError> {
        let window = u64::try_from(cfg.signin_failure_window.as_millis()).unwrap_or(u64::MAX);
        let max_ms = u64::try_from(cfg.signin_lockout_max.as_millis()).unwrap_or(u64::MAX);
        let first_ms = u64::try_from(cfg.signin_lockout_initial.as_millis()).unwrap_or(u64::MAX);
        let mut c = self.conn.clone();
        for (kind, subject) in [("acct", email), ("ip", ip)] {
            let (n, lock) = self.keys(kind, subject);
            let _: i64 = self
                .script
                .key(n)
                .key(lock)
                .arg(window)
                .arg(cfg.signin_max_failures)
                .arg(max_ms)
                .arg(first_ms)
                .invoke_async(&mut c)
                .await?;
        }
        Ok(())
    }

    pub async fn succeeded(&self, email: &str) -> Result<(), redis::RedisError> {
        let (n, _) = self.keys("acct", email);
        let mut c = self.conn.clone();
        redis::cmd("DEL").arg(n).query_async::<()>(&mut c).await
    }
}
