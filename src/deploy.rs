//! Part of stage 6, forward: the deployments of one provider and how one request
//! reaches them.
//!
//! - The first attempt goes to a deployment picked by weight; failover goes to the
//!   others in list order, backups (weight 0) last, round again while attempts remain.
//! - Connect errors, 429 and 5xx are retried; no other 4xx ever is. A request that was
//!   sent and got no answer within the first-byte timeout is NOT retried (unless
//!   `retry_timeouts`): the provider may be running it, and would bill it twice. Such
//!   attempts are counted in `tollgate_upstream_timeouts_total{provider,retried}`.
//! - [`Pool::send`] returns at the provider's 2xx headers. From then on the provider is
//!   doing the work and the request is charged, so nothing after a 2xx is retried: the
//!   caller reads the body and, if reading it fails, charges an estimate. Nothing has
//!   reached the client while [`Pool::send`] runs.
//! - A deployment tried again in the same request is waited for: its `retry-after`
//!   (when at most `retry_after_max`; a longer one ends its attempts), else exponential
//!   backoff with jitter. Failover to a deployment not yet tried does not wait.
//! - A circuit breaker per deployment: `breaker_failures` consecutive failures open it
//!   for `breaker_open`; then one request probes it; success closes it.
//!
//! Nothing here charges: the caller holds once before and settles once after, however
//! many attempts ran, and releases the hold if the last one failed.
//!
//! Providers plug in with [`Pool::send`]'s `build` closure, which turns a deployment
//! (base URL, key) into the request for that deployment in the provider's own format.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use crate::config::ProviderConfig;
use crate::error::ApiError;
use crate::translate::Kind;

pub type Https = hyper_rustls::HttpsConnector<HttpConnector>;
pub type HttpClient = Client<Https, Full<Bytes>>;

/// Milliseconds on a monotonic clock, never 0 (0 marks a closed breaker).
pub fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    /// The open interval has passed: the next request is the probe.
    HalfOpen,
}

/// A lock-free circuit breaker. `open_until` is 0 while closed; while open, the time
/// the next probe may go. Letting the probe through moves `open_until` one interval
/// on (compare-and-swap, so exactly one caller probes); the probe's success closes
/// the circuit, its failure opens it again.
pub struct Breaker {
    failures: AtomicU32,
    open_until: AtomicU64,
    threshold: u32,
    open_ms: u64,
}

impl Breaker {
    pub fn new(threshold: u32, open: Duration) -> Breaker {
        Breaker {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            threshold: threshold.max(1),
            open_ms: u64::try_from(open.as_millis()).unwrap_or(u64::MAX).max(1),
        }
    }

    /// Whether a request may go to this deployment now.
    pub fn allow(&self, now: u64) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if now < until {
            return false;
        }
        self.open_until
            .compare_exchange(
                until,
                now.saturating_add(self.open_ms),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// An answer came (the hot path: no write unless something was recorded).
    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Release);
        }
        if self.open_until.load(Ordering::Relaxed) != 0 {
            self.open_until.store(0, Ordering::Release);
        }
    }

    pub fn failure(&self, now: u64) {
        let before = self
            .failures
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                Some(f.saturating_add(1))
            })
            .unwrap_or(u32::MAX);
        if before.saturating_add(1) >= self.threshold {
            self.open_until
                .store(now.saturating_add(self.open_ms).max(1), Ordering::Release);
        }
    }

    pub fn state(&self, now: u64) -> BreakerState {
        match self.open_until.load(Ordering::Acquire) {
            0 => BreakerState::Closed,
            until if now < until => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }
}

/// Exponential backoff with jitter before the `repeat`-th (0-based) retry of a
/// deployment: the step is `base × 2^repeat` capped at `max`; the wait is uniformly
/// in [step/2, step] (`r` is a random number).
pub fn backoff(base: Duration, max: Duration, repeat: u32, r: u64) -> Duration {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let step = ms(base).saturating_mul(1u64 << repeat.min(32)).min(ms(max));
    let half = step / 2;
    Duration::from_millis(step - half + r % (half + 1))
}

/// The wait an upstream asked for: `retry-after-ms`, else `retry-after` in seconds
/// or as an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Duration::try_from_secs_f64(ms / 1000.0).ok();
    }
    let v = get("retry-after")?;
    if let Ok(secs) = v.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}

/// One deployment: where, with which key, how much traffic, and its breaker.
pub struct Deployment {
    pub index: usize,
    /// Base URL without a trailing slash.
    pub base_url: String,
    /// The headers that carry the key from the environment variable named in config,
    /// as the provider takes them ([`crate::translate::Wire::auth_headers`]; the key's
    /// values sensitive).
    pub auth: Vec<(HeaderName, HeaderValue)>,
    pub weight: u32,
    pub breaker: Breaker,
}

/// A 2xx answer (its body still to read), and how it was reached.
pub struct Sent {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Incoming,
    /// Upstream attempts made (1 when the first one answered).
    pub attempts: u32,
    /// Index of the deployment that answered.
    pub deployment: usize,
    /// Earlier attempts that were sent and timed out (retried under `retry_timeouts`).
    pub timed_out: u32,
    /// When the answer's first byte is due (the first-byte timeout of this attempt):
    /// a stream's first chunk must come by then.
    pub first_byte_due: tokio::time::Instant,
}

impl Sent {
    /// What the usage row records of the attempts: how many and which deployment
    /// answered, when more than one was made, and how many timed out.
    pub fn attempts_meta(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut extra = serde_json::Map::new();
        if self.attempts > 1 {
            extra.insert("attempts".into(), self.attempts.into());
            extra.insert("deployment".into(), self.deployment.into());
        }
        if self.timed_out > 0 {
            // Sent earlier and not answered in time: the provider may have run those too.
            extra.insert("timed_out_attempts".into(), self.timed_out.into());
        }
        extra
    }
}

enum Outcome {
    /// Worth another attempt; the error is what the client gets if none is left.
    Retry {
        error: ApiError,
        retry_after: Option<Duration>,
    },
    /// Sent, and no answer within the first-byte timeout: the provider may be running
    /// it. Retried only under `retry_timeouts`.
    TimedOut,
    /// The final answer (not the deployment's fault, or not safe to repeat).
    Fatal(ApiError),
}

/// The deployments of one provider and its retry policy.
pub struct Pool {
    pub provider: String,
    /// The provider's wire format (for reading its error answers).
    pub kind: Kind,
    deployments: Vec<Deployment>,
    total_weight: u64,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    retry_after_max: Duration,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    retry_timeouts: bool,
}

impl Pool {
    /// Reads each deployment's key from its environment variable (unset: no key sent).
    pub fn new(cfg: &ProviderConfig) -> Pool {
        let kind = crate::translate::for_name(&cfg.name);
        let deployments: Vec<Deployment> = cfg
            .deployments
            .iter()
            .enumerate()
            .map(|(index, d)| {
                let key = std::env::var(&d.api_key_env).ok().filter(|k| !k.is_empty());
                Deployment {
                    index,
                    base_url: d.base_url.clone(),
                    auth: kind.auth_headers(key.as_deref()),
                    weight: d.weight,
                    breaker: Breaker::new(cfg.breaker_failures, cfg.breaker_open),
                }
            })
            .collect();
        Pool {
            provider: cfg.name.clone(),
            kind,
            total_weight: deployments.iter().map(|d| u64::from(d.weight)).sum(),
            deployments,
            max_attempts: cfg.max_attempts.max(1),
            backoff_base: cfg.backoff_base,
            backoff_max: cfg.backoff_max,
            retry_after_max: cfg.retry_after_max,
            first_byte_timeout: cfg.first_byte_timeout,
            idle_timeout: cfg.idle_timeout,
            retry_timeouts: cfg.retry_timeouts,
        }
    }

    pub fn deployments(&self) -> &[Deployment] {
        &self.deployments
    }

    /// Longest silence between two frames of an answer.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Longest wait for an answer to start.
    pub fn first_byte_timeout(&self) -> Duration {
        self.first_byte_timeout
    }

    /// The deployment of a first attempt, picked by weight with the random `r`
    /// (the first one when every weight is 0).
    pub fn pick(&self, r: u64) -> usize {
        if self.total_weight == 0 {
            return 0;
        }
        let mut x = r % self.total_weight;
        for d in &self.deployments {
            let w = u64::from(d.weight);
            if x < w {
                return d.index;
            }
            x -= w;
        }
        0
    }

    /// The order of attempts after `first`: the other weighted deployments in list
    /// order, then the backups.
    pub fn order(&self, first: usize) -> impl Iterator<Item = usize> + Clone + '_ {
        let n = self.deployments.len();
        let weighted = move |want: bool| {
            (0..n).filter(move |&i| i != first && (self.deployments[i].weight > 0) == want)
        };
        std::iter::once(first)
            .chain(weighted(true))
            .chain(weighted(false))
    }

    /// Sends one request, retrying as the module doc says. `build` makes the request
    /// for a deployment; it is called once per attempt.
    pub async fn send<B>(&self, client: &HttpClient, build: B) -> Result<Sent, ApiError>
    where
        B: Fn(&Deployment) -> Result<Request<Full<Bytes>>, ApiError>,
    {
        let n = self.deployments.len();
        let mut order = self.order(self.pick(rand::random())).cycle();
        let bit = |i: usize| 1u64 << (i % 64);
        let (mut tried, mut done) = (0u64, 0u64);
        let mut repeats = 0u32;
        // (deployment, not before): only allocated once an attempt failed.
        let mut not_before: Vec<(usize, Instant)> = Vec::new();
        let mut last: Option<ApiError> = None;
        let mut attempts = 0u32;
        let mut timed_out = 0u32;
        while attempts < self.max_attempts {
            let now = now_ms();
            let pick = (0..n)
                .filter_map(|_| order.next())
                .find(|&i| done & bit(i) == 0 && self.deployments[i].breaker.allow(now));
            let Some(i) = pick else { break };
            let d = &self.deployments[i];
            if tried & bit(i) != 0 {
                let asked = not_before
                    .iter()
                    .find(|(j, _)| *j == i)
                    .map(|(_, t)| t.saturating_duration_since(Instant::now()));
                let wait = asked.unwrap_or_else(|| {
                    backoff(self.backoff_base, self.backoff_max, repeats, rand::random())
                });
                repeats = repeats.saturating_add(1);
                tokio::time::sleep(wait).await;
            }
            tried |= bit(i);
            attempts += 1;
            match self.attempt(client, d, &build).await {
                Ok(mut sent) => {
                    d.breaker.success();
                    sent.attempts = attempts;
                    sent.deployment = i;
                    sent.timed_out = timed_out;
                    return Ok(sent);
                }
                Err(Outcome::Fatal(e)) => return Err(e),
                Err(Outcome::TimedOut) => {
                    d.breaker.failure(now_ms());
                    let retried = self.retry_timeouts && attempts < self.max_attempts;
                    metrics::counter!("tollgate_upstream_timeouts_total",
                        "provider" => self.provider.clone(),
                        "retried" => if retried { "true" } else { "false" })
                    .increment(1);
                    tracing::warn!(provider = %self.provider, deployment = i, attempt = attempts, retried,
                                   "upstream sent no answer within the first-byte timeout; it may still be running the request");
                    let error = ApiError::UpstreamTimeout {
                        message: format!("the upstream provider `{}` timed out", self.provider),
                    };
                    if !self.retry_timeouts {
                        return Err(error);
                    }
                    timed_out = timed_out.saturating_add(1);
                    not_before.retain(|(j, _)| *j != i);
                    last = Some(error);
                }
                Err(Outcome::Retry { error, retry_after }) => {
                    d.breaker.failure(now_ms());
                    tracing::warn!(provider = %self.provider, deployment = i, attempt = attempts,
                                   error = error.label(), "upstream attempt failed");
                    not_before.retain(|(j, _)| *j != i);
                    if let Some(ra) = retry_after {
                        if ra > self.retry_after_max {
                            done |= bit(i);
                        } else {
                            not_before.push((i, Instant::now() + ra));
                        }
                    }
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or_else(|| ApiError::Unavailable {
            message: format!(
                "every deployment of the upstream provider `{}` is failing; retry shortly",
                self.provider
            ),
        }))
    }

    async fn attempt<B>(
        &self,
        client: &HttpClient,
        d: &Deployment,
        build: &B,
    ) -> Result<Sent, Outcome>
    where
        B: Fn(&Deployment) -> Result<Request<Full<Bytes>>, ApiError>,
    {
        let req = build(d).map_err(Outcome::Fatal)?;
        let started = tokio::time::Instant::now();
        let first_deadline = started + self.first_byte_timeout.min(self.idle_timeout);
        let retry = |message: String| Outcome::Retry {
            error: ApiError::BadGateway { message },
            retry_after: None,
        };
        let name = &self.provider;
        let resp = match tokio::time::timeout_at(first_deadline, client.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(provider = %name, deployment = d.index, error = %e, "upstream request failed");
                return Err(retry(format!(
                    "the upstream provider `{name}` could not be reached"
                )));
            }
            Err(_) => return Err(Outcome::TimedOut),
        };
        let status = resp.status();
        if status.is_success() {
            let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
            return Ok(Sent {
                status,
                content_type,
                body: resp.into_body(),
                attempts: 0,
                deployment: d.index,
                timed_out: 0,
                first_byte_due: first_deadline,
            });
        }
        let asked = retry_after(resp.headers());
        let retry_after_header = resp.headers().get(header::RETRY_AFTER).cloned();
        let body = tokio::time::timeout(
            self.idle_timeout,
            Limited::new(resp.into_body(), 64 * 1024).collect(),
        )
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|c| c.to_bytes())
        .unwrap_or_default();
        tracing::info!(provider = %name, deployment = d.index, %status, "upstream answered with an error");
        // A provider may refuse a bad key otherwise than with 401/403 (Gemini: 400
        // API_KEY_INVALID).
        let key_refused = self.kind.key_refused(status, &body);
        match status.as_u16() {
            // The provider refused this deployment's key (Gemini says so with a 400
            // API_KEY_INVALID): not the caller's fault, and the message (which may quote
            // the key) is not passed on. Another deployment, with its own key, may work.
            _ if key_refused || matches!(status.as_u16(), 401 | 403) => {
                tracing::error!(provider = %name, deployment = d.index, %status,
                                "the provider rejected the gateway's credentials");
                Err(Outcome::Retry {
                    error: ApiError::BadGateway {
                        message: "the upstream provider refused the gateway's credentials".into(),
                    },
                    // Longer than any retry_after_max: this deployment is not tried
                    // again within the request (its key will not have changed).
                    retry_after: Some(Duration::MAX),
                })
            }
            // Rate-limited, or overloaded (Anthropic's 529): the caller may retry later.
            429 | 529 => Err(Outcome::Retry {
                error: ApiError::UpstreamBusy {
                    retry_after: retry_after_header,
                },
                retry_after: asked,
            }),
            _ if status.is_server_error() => Err(Outcome::Retry {
                error: ApiError::BadGateway {
                    message: format!("the upstream provider failed ({status})"),
                },
                retry_after: asked,
            }),
            _ => {
                // The deployment is healthy; the request is at fault.
                d.breaker.success();
                let body = self.kind.error(status, body);
                Err(Outcome::Fatal(ApiError::Upstream { status, body }))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::config::DeploymentConfig;
    use proptest::prelude::*;

    fn pool(weights: &[u32]) -> Pool {
        let deployments = weights
            .iter()
            .enumerate()
            .map(|(i, w)| DeploymentConfig {
                base_url: format!("http://d{i}.invalid"),
                base_uri: format!("http://d{i}.invalid").parse().unwrap(),
                api_key_env: "TOLLGATE_TEST_UNSET_KEY".into(),
                weight: *w,
            })
            .collect();
        Pool::new(&ProviderConfig {
            name: "openai".into(),
            deployments,
            connect_timeout: Duration::from_secs(1),
            first_byte_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_attempts: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            retry_after_max: Duration::from_secs(10),
            breaker_failures: 3,
            breaker_open: Duration::from_millis(1000),
            retry_timeouts: false,
        })
    }

    #[test]
    fn breaker_opens_after_the_threshold_and_probes_once() {
        let b = Breaker::new(3, Duration::from_millis(1000));
        assert!(b.allow(10));
        b.failure(10);
        b.failure(11);
        assert_eq!(b.state(12), BreakerState::Closed);
        assert!(b.allow(12));
        b.failure(12);
        assert_eq!(b.state(13), BreakerState::Open);
        assert!(!b.allow(13));
        assert!(!b.allow(1011));
        // The interval passed: one probe, the others still refused.
        assert_eq!(b.state(1012), BreakerState::HalfOpen);
        assert!(b.allow(1012));
        assert!(!b.allow(1012));
        assert!(!b.allow(1500));
        // The probe failed: open for another interval.
        b.failure(1500);
        assert!(!b.allow(2499));
        assert!(b.allow(2500));
        // The probe succeeded: closed.
        b.success();
        assert_eq!(b.state(2501), BreakerState::Closed);
        assert!(b.allow(2501) && b.allow(2501));
        // Failures are counted afresh.
        b.failure(2600);
        b.failure(2601);
        assert!(b.allow(2602));
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_millis(50));
        b.failure(1);
        b.success();
        b.failure(2);
        assert!(b.allow(3));
        b.failure(3);
        assert!(!b.allow(4));
    }

    #[test]
    fn a_probe_that_never_reports_lets_another_through_an_interval_later() {
        let b = Breaker::new(1, Duration::from_millis(100));
        b.failure(1);
        assert!(b.allow(101));
        assert!(!b.allow(150));
        assert!(b.allow(201));
    }

    #[test]
    fn order_puts_the_pick_first_and_backups_last() {
        let p = pool(&[1, 0, 2, 0, 1]);
        assert_eq!(p.order(2).collect::<Vec<_>>(), [2, 0, 4, 1, 3]);
        assert_eq!(p.order(0).collect::<Vec<_>>(), [0, 2, 4, 1, 3]);
        let all_backups = pool(&[0, 0]);
        assert_eq!(all_backups.pick(12345), 0);
        assert_eq!(all_backups.order(0).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn weight_zero_is_never_picked_first() {
        let p = pool(&[0, 3, 0, 1]);
        for r in 0..1000u64 {
            assert!(matches!(p.pick(r), 1 | 3));
        }
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after", HeaderValue::from_static("0.5"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(500)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        let mut h = HeaderMap::new();
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        h.insert("retry-after", HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("-3"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn keys_come_from_the_named_variable_and_are_sensitive() {
        let p = pool(&[1]);
        // No key: no header carries one.
        assert!(p.deployments()[0].auth.is_empty());
        let v = crate::translate::secret("Bearer x").unwrap();
        assert!(v.is_sensitive());
    }

    proptest! {
        /// The wait is within [step/2, step] with step = base × 2^n capped at max.
        #[test]
        fn backoff_is_bounded(base in 1u64..5_000, extra in 0u64..60_000, n in 0u32..80, r in any::<u64>()) {
            let max = base + extra;
            let d = backoff(Duration::from_millis(base), Duration::from_millis(max), n, r);
            let step = base.saturating_mul(1u64 << n.min(32)).min(max);
            let ms = d.as_millis() as u64;
            prop_assert!(ms <= step && ms <= max);
            prop_assert!(ms >= step - step / 2);
            prop_assert!(ms * 2 >= step);
        }

        /// Backoff never shrinks as retries go on (comparing the bounds of the range).
        #[test]
        fn backoff_steps_grow(base in 1u64..1_000, n in 0u32..40) {
            let max = Duration::from_secs(3600);
            // r = 0 gives the bottom of the range; r = step / 2 its top (r is taken
            // modulo step / 2 + 1).
            let step = |n: u32| base.saturating_mul(1u64 << n.min(32)).min(3_600_000);
            let lo = |n| backoff(Duration::from_millis(base), max, n, 0);
            let hi = |n| backoff(Duration::from_millis(base), max, n, step(n) / 2);
            prop_assert_eq!(hi(n).as_millis() as u64, step(n));
            prop_assert!(lo(n + 1) >= lo(n));
            prop_assert!(hi(n + 1) >= hi(n));
        }

        /// Picks follow the weights: over every residue of the total weight, each
        /// deployment is picked exactly `weight` times.
        #[test]
        fn picks_follow_weights(weights in proptest::collection::vec(0u32..6, 1..8)) {
            let p = pool(&weights);
            let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
            let mut counts = vec![0u64; weights.len()];
            for r in 0..total.max(1) {
                counts[p.pick(r)] += 1;
            }
            if total == 0 {
                prop_assert_eq!(counts[0], 1);
            } else {
                for (c, w) in counts.iter().zip(&weights) {
                    prop_assert_eq!(*c, u64::from(*w));
                }
            }
        }

        /// The order visits every deployment exactly once, the pick first.
        #[test]
        fn order_is_a_permutation(weights in proptest::collection::vec(0u32..3, 1..10), r in any::<u64>()) {
            let p = pool(&weights);
            let first = p.pick(r);
            let o: Vec<usize> = p.order(first).collect();
            prop_assert_eq!(o[0], first);
            let mut sorted = o.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..weights.len()).collect::<Vec<_>>());
            // Backups come after every weighted one (the pick aside).
            let first_backup = o.iter().skip(1).position(|&i| weights[i] == 0);
            if let Some(fb) = first_backup {
                prop_assert!(o.iter().skip(1 + fb).all(|&i| weights[i] == 0));
            }
        }

        /// The breaker as a model: allowed while fewer than `t` consecutive failures,
        /// refused while open, one probe per interval after it.
        #[test]
        fn breaker_matches_its_model(t in 1u32..5, ops in proptest::collection::vec((0u8..3, 0u64..400), 1..60)) {
            let open = 300u64;
            let b = Breaker::new(t, Duration::from_millis(open));
            let (mut fails, mut until) = (0u32, 0u64);
            let mut now = 1u64;
            for (op, dt) in ops {
                now += dt;
                match op {
                    0 => {
                        let expect = if until == 0 { true } else if now < until { false } else { until = now + open; true };
                        prop_assert_eq!(b.allow(now), expect);
                    }
                    1 => { b.success(); fails = 0; until = 0; }
                    _ => { b.failure(now); fails += 1; if fails >= t { until = now + open; } }
                }
            }
        }
    }
}
