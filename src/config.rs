//! Configuration in two stages: raw serde structs (`deny_unknown_fields`, defaults)
//! merged from `config/tollgate.toml` and the environment, then [`RawConfig::validate`]
//! into the typed [`Config`] the server runs with.
//!
//! Sources, later ones winning: built-in defaults, the TOML file, `TOLLGATE__SECTION__KEY`
//! environment variables, and the conventional `DATABASE_URL`, `DATABASE_POOL_SIZE`,
//! `DATABASE_POOL_TIMEOUT` (ms) and `REDIS_URL`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The providers a `models.provider` value may name.
pub const PROVIDERS: [&str; 3] = ["openai", "anthropic", "google"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub database: RawDatabase,
    pub redis: RawRedis,
    pub auth: RawAuth,
    pub oauth: RawOAuth,
    pub passwords: RawPasswords,
    pub external_issuer: RawExternalIssuer,
    pub metering: RawMetering,
    pub flush: RawFlush,
    pub models: RawModels,
    pub rate_limits: RawRateLimits,
    pub tiers: RawTiers,
    pub billing: RawBilling,
    pub preferences: RawPreferences,
    pub providers: BTreeMap<String, RawProvider>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub max_body_bytes: u64,
    pub max_response_bytes: u64,
    pub shutdown_grace_ms: u64,
    pub shutdown_delay_ms: u64,
    pub disconnect_drain_ms: u64,
    pub disconnect_drains: u32,
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDatabase {
    pub url: String,
    pub pool_size: u32,
    pub idle_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub partitions_ahead_months: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    pub url: String,
    pub key_prefix: String,
    pub buckets: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    pub issuer: String,
    pub audience: String,
    pub signing_key_path: String,
    pub access_token_ttl_secs: u64,
    pub leeway_secs: u64,
    pub previous_key_paths: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOAuth {
    pub authorization_code_ttl_secs: u64,
    pub refresh_token_idle_ttl_secs: u64,
    pub refresh_token_absolute_ttl_secs: u64,
    pub revocation_refresh_ms: u64,
    pub signin_max_failures: u32,
    pub signin_failure_window_secs: u64,
    pub signin_lockout_initial_secs: u64,
    pub signin_lockout_max_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawExternalIssuer {
    pub issuer: String,
    pub jwks_url: String,
    pub audience: String,
    pub user_claim: String,
    pub jwks_refetch_min_interval_ms: u64,
    pub jwks_fetch_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPasswords {
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    pub max_queued: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetering {
    pub hold_ttl_ms: u64,
    pub min_output_tokens: u32,
    pub image_tokens: u32,
    pub settle_retries: u32,
    pub speculative_send: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawFlush {
    pub batch_rows: usize,
    pub writers: usize,
    pub interval_ms: u64,
    pub claim_idle_ms: u64,
    pub consumer_group: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawModels {
    pub refresh_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimits {
    pub tier_cache_ms: u64,
    pub free: RawTierLimit,
    pub pro: RawTierLimit,
    pub enterprise: RawTierLimit,
}

/// The old place of a tier's per-minute limits (`rate_limits.<tier>`), still honoured;
/// `tiers.<tier>` is the new one. Unset (`None`) is told apart from 0 so that setting
/// both places to different values can be refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTierLimit {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u32>,
}

impl Default for RawRateLimits {
    fn default() -> Self {
        RawRateLimits {
            tier_cache_ms: 60_000,
            free: RawTierLimit::default(),
            pro: RawTierLimit::default(),
            enterprise: RawTierLimit::default(),
        }
    }
}

/// The subscription tiers (`[tiers]`): which one a new user gets, and each one's plan.
/// The tiers are the schema's `subscription_tier` values, so the set is fixed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTiers {
    pub default: String,
    pub free: RawTier,
    pub pro: RawTier,
    pub enterprise: RawTier,
}

/// One tier's plan (`[tiers.<tier>]`) and its per-minute rate limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTier {
    pub credits_per_month: i64,
    pub price_cents: i64,
    pub billing_interval: String,
    pub rollover_cap: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u32>,
}

impl RawTier {
    fn monthly(credits_per_month: i64, price_cents: i64) -> RawTier {
        RawTier {
            credits_per_month,
            price_cents,
            billing_interval: "monthly".into(),
            rollover_cap: 0,
            requests_per_minute: None,
            tokens_per_minute: None,
        }
    }
}

impl Default for RawTier {
    fn default() -> Self {
        RawTier::monthly(0, 0)
    }
}

impl Default for RawTiers {
    fn default() -> Self {
        RawTiers {
            default: "free".into(),
            free: RawTier::monthly(1_000, 0),
            pro: RawTier::monthly(100_000, 1_999),
            enterprise: RawTier::monthly(1_000_000, 9_999),
        }
    }
}

/// The billing run (`[billing]`): renewals, expiries, past-due grace.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBilling {
    pub enabled: bool,
    pub interval_ms: u64,
    pub past_due_grace_hours: u64,
    pub reconcile_interval_ms: u64,
}

impl Default for RawBilling {
    fn default() -> Self {
        RawBilling {
            enabled: true,
            interval_ms: 60_000,
            past_due_grace_hours: 72,
            reconcile_interval_ms: 300_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPreferences {
    pub cache_ttl_ms: u64,
    pub cache_entries: usize,
    pub load_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProvider {
    pub base_url: String,
    pub api_key_env: String,
    pub deployments: Vec<RawDeployment>,
    pub connect_timeout_ms: u64,
    pub first_byte_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub retry_after_max_ms: u64,
    pub breaker_failures: u32,
    pub breaker_open_ms: u64,
    pub retry_timeouts: bool,
}

/// One deployment of a provider: `api_key_env` empty means the provider's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployment {
    pub base_url: String,
    #[serde(default)]
    pub api_key_env: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl Default for RawConfig {
    fn default() -> Self {
        let provider = |base_url: &str, key: &str| RawProvider {
            base_url: base_url.to_owned(),
            api_key_env: key.to_owned(),
            ..RawProvider::default()
        };
        let mut providers = BTreeMap::new();
        providers.insert(
            "openai".to_owned(),
            provider("https://api.openai.com/v1", "OPENAI_API_KEY"),
        );
        providers.insert(
            "anthropic".to_owned(),
            provider("https://api.anthropic.com", "ANTHROPIC_API_KEY"),
        );
        providers.insert(
            "google".to_owned(),
            provider(
                "https://generativelanguage.googleapis.com",
                "GEMINI_API_KEY",
            ),
        );
        RawConfig {
            server: RawServer::default(),
            database: RawDatabase::default(),
            redis: RawRedis::default(),
            auth: RawAuth::default(),
            oauth: RawOAuth::default(),
            passwords: RawPasswords::default(),
            external_issuer: RawExternalIssuer::default(),
            metering: RawMetering::default(),
            flush: RawFlush::default(),
            models: RawModels::default(),
            rate_limits: RawRateLimits::default(),
            tiers: RawTiers::default(),
            billing: RawBilling::default(),
            preferences: RawPreferences::default(),
            providers,
        }
    }
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 4 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            shutdown_grace_ms: 10_000,
            shutdown_delay_ms: 0,
            disconnect_drain_ms: 30_000,
            disconnect_drains: 256,
            worker_threads: 0,
        }
    }
}

impl Default for RawDatabase {
    fn default() -> Self {
        RawDatabase {
            url: "postgres://postgres@127.0.0.1:5432/tollgate".into(),
            pool_size: 20,
            idle_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            partitions_ahead_months: 2,
        }
    }
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "tollgate:".into(),
            buckets: 16,
        }
    }
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            issuer: "http://127.0.0.1:8080".into(),
            audience: "tollgate".into(),
            signing_key_path: ".tollgate/keys/signing-ed25519.pem".into(),
            access_token_ttl_secs: 900,
            leeway_secs: 30,
            previous_key_paths: Vec::new(),
        }
    }
}

impl Default for RawOAuth {
    fn default() -> Self {
        RawOAuth {
            authorization_code_ttl_secs: 60,
            refresh_token_idle_ttl_secs: 30 * 86_400,
            refresh_token_absolute_ttl_secs: 90 * 86_400,
            revocation_refresh_ms: 5_000,
            signin_max_failures: 5,
            signin_failure_window_secs: 900,
            signin_lockout_initial_secs: 1,
            signin_lockout_max_secs: 300,
        }
    }
}

impl Default for RawExternalIssuer {
    fn default() -> Self {
        RawExternalIssuer {
            issuer: String::new(),
            jwks_url: String::new(),
            audience: String::new(),
            user_claim: "sub".into(),
            jwks_refetch_min_interval_ms: 60_000,
            jwks_fetch_timeout_ms: 5_000,
        }
    }
}

impl Default for RawPasswords {
    fn default() -> Self {
        // OWASP's first Argon2id choice: 19 MiB, 2 iterations, 1 lane.
        RawPasswords {
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            max_queued: 64,
        }
    }
}

impl Default for RawMetering {
    fn default() -> Self {
        RawMetering {
            hold_ttl_ms: 600_000,
            min_output_tokens: 16,
            image_tokens: 0,
            settle_retries: 3,
            speculative_send: false,
        }
    }
}

impl Default for RawFlush {
    fn default() -> Self {
        RawFlush {
            batch_rows: 1_000,
            writers: 4,
            interval_ms: 50,
            claim_idle_ms: 30_000,
            consumer_group: "tollgate-flush".into(),
        }
    }
}

impl Default for RawModels {
    fn default() -> Self {
        RawModels { refresh_ms: 30_000 }
    }
}

impl Default for RawPreferences {
    fn default() -> Self {
        RawPreferences {
            cache_ttl_ms: 10_000,
            cache_entries: 100_000,
            load_timeout_ms: 250,
        }
    }
}

impl Default for RawProvider {
    fn default() -> Self {
        RawProvider {
            base_url: String::new(),
            api_key_env: String::new(),
            deployments: Vec::new(),
            connect_timeout_ms: 5_000,
            first_byte_timeout_ms: 120_000,
            idle_timeout_ms: 120_000,
            max_attempts: 0,
            backoff_base_ms: 100,
            backoff_max_ms: 2_000,
            retry_after_max_ms: 10_000,
            breaker_failures: 5,
            breaker_open_ms: 30_000,
            retry_timeouts: false,
        }
    }
}

/// A configuration error: names the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

fn bad(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("`{key}`: {why}"))
}

/// Builds the merged figment for `path` (a missing file is an error only when it was
/// named explicitly, i.e. `required`).
pub fn figment(path: &Path, required: bool) -> Result<Figment, ConfigError> {
    if required && !path.exists() {
        return Err(ConfigError(format!(
            "config file {} does not exist",
            path.display()
        )));
    }
    let db_env =
        |var: &'static str, key: &'static str| Env::raw().only(&[var]).map(move |_| key.into());
    Ok(Figment::from(Serialized::defaults(RawConfig::default()))
        .merge(Toml::file(path))
        .merge(Env::prefixed("TOLLGATE__").split("__"))
        .merge(db_env("DATABASE_URL", "database.url"))
        .merge(db_env("DATABASE_POOL_SIZE", "database.pool_size"))
        .merge(db_env(
            "DATABASE_POOL_TIMEOUT",
            "database.connect_timeout_ms",
        ))
        .merge(db_env("REDIS_URL", "redis.url")))
}

/// Loads and validates the configuration.
pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
    let raw: RawConfig = figment(path, required)?.extract().map_err(|e| {
        let msgs: Vec<String> = e
            .into_iter()
            .map(|e| {
                let key = e.path.join(".");
                if key.is_empty() {
                    e.kind.to_string()
                } else {
                    format!("`{key}`: {}", e.kind)
                }
            })
            .collect();
        ConfigError(msgs.join("; "))
    })?;
    raw.validate()
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub max_response_bytes: usize,
    pub shutdown_grace: Duration,
    pub shutdown_delay: Duration,
    pub disconnect_drain: Duration,
    /// Disconnected streams read on at once; beyond that they stop at once (estimated).
    pub disconnect_drains: u32,
    /// Runtime worker threads; 0 = one per core.
    pub worker_threads: usize,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub auth: AuthConfig,
    pub oauth: OAuthConfig,
    pub passwords: PasswordsConfig,
    pub metering: MeteringConfig,
    pub flush: FlushConfig,
    pub models_refresh: Duration,
    pub rate_limits: RateLimitConfig,
    pub tiers: TiersConfig,
    pub billing: BillingConfig,
    pub preferences: PreferencesConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
}

#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// How long a user's subscription tier is remembered.
    pub tier_cache: Duration,
    /// Tier name → its per-minute limits (0 = none), from `tiers.<tier>` or the old
    /// `rate_limits.<tier>`.
    pub tiers: BTreeMap<String, TierLimit>,
}

/// Per-minute limits of one subscription tier; 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierLimit {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
}

/// The tiers a subscription may have (the schema's `subscription_tier`).
pub const TIERS: [&str; 3] = ["free", "pro", "enterprise"];

/// How often a subscription is billed, and how long its period is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingInterval {
    Monthly,
    Yearly,
}

impl BillingInterval {
    /// As stored in `subscriptions.billing_interval`.
    pub fn as_str(self) -> &'static str {
        match self {
            BillingInterval::Monthly => "monthly",
            BillingInterval::Yearly => "yearly",
        }
    }

    /// The length of one period in months.
    pub fn months(self) -> i32 {
        match self {
            BillingInterval::Monthly => 1,
            BillingInterval::Yearly => 12,
        }
    }

    pub fn parse(s: &str) -> Option<BillingInterval> {
        match s {
            "monthly" => Some(BillingInterval::Monthly),
            "yearly" => Some(BillingInterval::Yearly),
            _ => None,
        }
    }
}

/// One tier's plan. Validated: every figure is non-negative, and a period's
/// allocation plus the rollover cap fits a credits row (`integer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub credits_per_month: i64,
    /// The price of one billing period.
    pub price_cents: i64,
    pub interval: BillingInterval,
    /// Credits carried into the next period at most (0 = none).
    pub rollover_cap: i64,
}

impl Plan {
    /// The credits of one period: `credits_per_month × interval.months()` (a yearly
    /// plan's period holds twelve months' credits). Validation keeps it within `i32`.
    pub fn period_credits(&self) -> Option<i64> {
        self.credits_per_month
            .checked_mul(i64::from(self.interval.months()))
    }
}

#[derive(Debug, Clone)]
pub struct TiersConfig {
    /// The tier of a user created without `--tier`; always a key of `plans`.
    pub default: String,
    /// Every tier of [`TIERS`] → its plan.
    pub plans: BTreeMap<String, Plan>,
}

impl TiersConfig {
    pub fn plan(&self, tier: &str) -> Option<&Plan> {
        self.plans.get(tier)
    }
}

#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// Whether `serve` runs the billing job.
    pub enabled: bool,
    /// How often it runs.
    pub interval: Duration,
    /// How long a past-due subscription keeps being served.
    pub past_due_grace: Duration,
    /// How often `serve` compares the live balances with PostgreSQL (`None`: never).
    pub reconcile_interval: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct PreferencesConfig {
    /// A cached row is used this long before it is reloaded (in the background).
    pub cache_ttl: Duration,
    pub cache_entries: usize,
    /// Longest wait for a user's first load; past it the request goes on without.
    pub load_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: String,
    pub pool_size: u32,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub partitions_ahead_months: i32,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub key_prefix: String,
    pub buckets: u32,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub issuer: String,
    pub audience: String,
    pub signing_key_path: PathBuf,
    pub access_token_ttl: Duration,
    pub leeway_secs: u64,
    /// Retired-soon keys: they verify tokens (and are published) but never sign.
    pub previous_key_paths: Vec<PathBuf>,
    /// Tokens of another issuer that are accepted too.
    pub external: Option<ExternalIssuerConfig>,
}

#[derive(Debug, Clone)]
pub struct ExternalIssuerConfig {
    pub issuer: String,
    pub jwks_url: String,
    pub audience: String,
    /// The claim whose value is the Tollgate user id.
    pub user_claim: String,
    pub refetch_min_interval: Duration,
    pub fetch_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct PasswordsConfig {
    /// Argon2id parameters of new hashes (a stored hash below them is rehashed).
    pub argon2: argon2::Params,
    /// Callers that may wait for a busy hasher; past that they are refused (503).
    pub max_queued: usize,
}

#[derive(Debug, Clone)]
pub struct OAuthConfig {
    pub code_ttl: Duration,
    pub refresh_idle_ttl: Duration,
    pub refresh_absolute_ttl: Duration,
    /// How often the in-memory set of disabled users and revoked sessions is reloaded.
    pub revocation_refresh: Duration,
    pub signin_max_failures: u32,
    pub signin_failure_window: Duration,
    pub signin_lockout_initial: Duration,
    pub signin_lockout_max: Duration,
}

#[derive(Debug, Clone)]
pub struct MeteringConfig {
    pub hold_ttl: Duration,
    pub min_output_tokens: u32,
    pub image_tokens: u32,
    pub settle_retries: u32,
    /// Send upstream while the hold is taken when the user's last known balance is far
    /// above the hold (see `reserve::admit`).
    pub speculative_send: bool,
}

#[derive(Debug, Clone)]
pub struct FlushConfig {
    pub batch_rows: usize,
    /// Concurrent writer transactions, over disjoint users.
    pub writers: usize,
    pub interval: Duration,
    pub claim_idle: Duration,
    pub consumer_group: String,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    /// At least one; `providers.<name>.base_url` and `.api_key_env` when
    /// `deployments` is empty.
    pub deployments: Vec<DeploymentConfig>,
    pub connect_timeout: Duration,
    /// Longest wait for the answer to start (headers, and a stream's first chunk).
    pub first_byte_timeout: Duration,
    /// Longest silence: before the answer starts, and between two of its frames.
    pub idle_timeout: Duration,
    /// Upstream attempts per request, across deployments (at least 1).
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A `retry-after` longer than this is not waited for (that deployment is done).
    pub retry_after_max: Duration,
    /// Consecutive failures that open a deployment's circuit.
    pub breaker_failures: u32,
    /// How long an open circuit refuses requests before one probe is let through.
    pub breaker_open: Duration,
    /// Retry a request that was sent and got no answer in time (the provider may be
    /// running it: a retry can make it bill twice).
    pub retry_timeouts: bool,
}

#[derive(Debug, Clone)]
pub struct DeploymentConfig {
    /// Base URL without a trailing slash.
    pub base_url: String,
    pub base_uri: http::Uri,
    pub api_key_env: String,
    /// Share of first attempts; 0 = a backup, tried only after the weighted ones.
    pub weight: u32,
}

/// Most deployments one provider may have.
pub const MAX_DEPLOYMENTS: usize = 64;

fn parse_base_url(key: &str, url: &str) -> Result<(String, http::Uri), ConfigError> {
    let base_url = url.trim_end_matches('/').to_owned();
    let base_uri: http::Uri = base_url
        .parse()
        .map_err(|e| bad(key, format!("unparsable URL ({e})")))?;
    match (base_uri.scheme_str(), base_uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok((base_url, base_uri)),
        _ => Err(bad(key, "must be an absolute http:// or https:// URL")),
    }
}

impl RawConfig {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen: SocketAddr = self
            .server
            .listen
            .parse()
            .map_err(|e| bad("server.listen", format!("not a host:port address ({e})")))?;
        let positive = |key: &str, v: u64| {
            if v == 0 {
                Err(bad(key, "must be greater than zero"))
            } else {
                Ok(v)
            }
        };
        positive("server.max_body_bytes", self.server.max_body_bytes)?;
        positive("server.max_response_bytes", self.server.max_response_bytes)?;
        positive("database.pool_size", u64::from(self.database.pool_size))?;
        positive(
            "database.connect_timeout_ms",
            self.database.connect_timeout_ms,
        )?;
        // Upkeep must keep next month's partition ready before the month starts.
        positive(
            "database.partitions_ahead_months",
            u64::from(self.database.partitions_ahead_months),
        )?;
        positive("redis.buckets", u64::from(self.redis.buckets))?;
        positive(
            "auth.access_token_ttl_secs",
            self.auth.access_token_ttl_secs,
        )?;
        positive("metering.hold_ttl_ms", self.metering.hold_ttl_ms)?;
        positive("flush.batch_rows", self.flush.batch_rows as u64)?;
        positive("flush.writers", self.flush.writers as u64)?;
        positive("flush.interval_ms", self.flush.interval_ms)?;
        positive("flush.claim_idle_ms", self.flush.claim_idle_ms)?;
        positive("models.refresh_ms", self.models.refresh_ms)?;
        if self.auth.leeway_secs > 60 {
            return Err(bad("auth.leeway_secs", "must be at most 60"));
        }
        let oauth = validate_oauth(&self.oauth)?;
        let (tiers, tier_limits) = validate_tiers(&self.tiers, &self.rate_limits)?;
        let billing = validate_billing(&self.billing)?;
        let external = validate_external(&self.external_issuer)?;
        let argon2 = argon2::Params::new(
            self.passwords.argon2_memory_kib,
            self.passwords.argon2_iterations,
            self.passwords.argon2_parallelism,
            None,
        )
        .map_err(|e| bad("passwords", format!("invalid Argon2 parameters ({e})")))?;
        let passwords = PasswordsConfig {
            argon2,
            max_queued: self.passwords.max_queued as usize,
        };
        if !(self.database.url.starts_with("postgres://")
            || self.database.url.starts_with("postgresql://"))
        {
            return Err(bad("database.url", "must be a postgres:// URL"));
        }
        self.database
            .url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| bad("database.url", format!("unparsable ({e})")))?;
        redis::parse_redis_url(&self.redis.url)
            .ok_or_else(|| bad("redis.url", "unparsable redis:// URL"))?;
        if self.redis.key_prefix.contains(['{', '}']) {
            return Err(bad(
                "redis.key_prefix",
                "must not contain `{` or `}` (reserved for hash tags)",
            ));
        }
        if self.flush.consumer_group.is_empty() {
            return Err(bad("flush.consumer_group", "must not be empty"));
        }
        let mut providers = BTreeMap::new();
        for (name, p) in self.providers {
            if !PROVIDERS.contains(&name.as_str()) {
                return Err(bad(
                    &format!("providers.{name}"),
                    format!("unknown provider (known: {})", PROVIDERS.join(", ")),
                ));
            }
            let k = |field: &str| format!("providers.{name}.{field}");
            if p.api_key_env.is_empty() {
                return Err(bad(&k("api_key_env"), "must name an environment variable"));
            }
            positive(&k("connect_timeout_ms"), p.connect_timeout_ms)?;
            positive(&k("first_byte_timeout_ms"), p.first_byte_timeout_ms)?;
            positive(&k("idle_timeout_ms"), p.idle_timeout_ms)?;
            positive(&k("backoff_base_ms"), p.backoff_base_ms)?;
            positive(&k("breaker_failures"), u64::from(p.breaker_failures))?;
            positive(&k("breaker_open_ms"), p.breaker_open_ms)?;
            if p.backoff_max_ms < p.backoff_base_ms {
                return Err(bad(
                    &k("backoff_max_ms"),
                    "must be at least `backoff_base_ms`",
                ));
            }
            let mut deployments = Vec::new();
            if p.deployments.is_empty() {
                let (base_url, base_uri) = parse_base_url(&k("base_url"), &p.base_url)?;
                deployments.push(DeploymentConfig {
                    base_url,
                    base_uri,
                    api_key_env: p.api_key_env.clone(),
                    weight: 1,
                });
            }
            if p.deployments.len() > MAX_DEPLOYMENTS {
                return Err(bad(
                    &k("deployments"),
                    format!("at most {MAX_DEPLOYMENTS} deployments"),
                ));
            }
            for (i, d) in p.deployments.iter().enumerate() {
                let dk = |field: &str| format!("providers.{name}.deployments[{i}].{field}");
                let (base_url, base_uri) = parse_base_url(&dk("base_url"), &d.base_url)?;
                deployments.push(DeploymentConfig {
                    base_url,
                    base_uri,
                    api_key_env: if d.api_key_env.is_empty() {
                        p.api_key_env.clone()
                    } else {
                        d.api_key_env.clone()
                    },
                    weight: d.weight,
                });
            }
            let max_attempts = if p.max_attempts == 0 {
                u32::try_from(deployments.len()).unwrap_or(u32::MAX)
            } else {
                p.max_attempts
            };
            if max_attempts > 20 {
                return Err(bad(&k("max_attempts"), "must be at most 20"));
            }
            providers.insert(
                name.clone(),
                ProviderConfig {
                    name,
                    deployments,
                    connect_timeout: Duration::from_millis(p.connect_timeout_ms),
                    first_byte_timeout: Duration::from_millis(p.first_byte_timeout_ms),
                    idle_timeout: Duration::from_millis(p.idle_timeout_ms),
                    max_attempts,
                    backoff_base: Duration::from_millis(p.backoff_base_ms),
                    backoff_max: Duration::from_millis(p.backoff_max_ms),
                    retry_after_max: Duration::from_millis(p.retry_after_max_ms),
                    breaker_failures: p.breaker_failures,
                    breaker_open: Duration::from_millis(p.breaker_open_ms),
                    retry_timeouts: p.retry_timeouts,
                },
            );
        }
        positive("preferences.cache_ttl_ms", self.preferences.cache_ttl_ms)?;
        positive(
            "preferences.cache_entries",
            self.preferences.cache_entries as u64,
        )?;
        positive(
            "preferences.load_timeout_ms",
            self.preferences.load_timeout_ms,
        )?;
        Ok(Config {
            listen,
            max_body_bytes: usize::try_from(self.server.max_body_bytes)
                .map_err(|e| bad("server.max_body_bytes", e))?,
            max_response_bytes: usize::try_from(self.server.max_response_bytes)
                .map_err(|e| bad("server.max_response_bytes", e))?,
            shutdown_grace: Duration::from_millis(self.server.shutdown_grace_ms),
            shutdown_delay: Duration::from_millis(self.server.shutdown_delay_ms),
            disconnect_drain: Duration::from_millis(self.server.disconnect_drain_ms),
            disconnect_drains: self.server.disconnect_drains,
            worker_threads: self.server.worker_threads,
            database: DatabaseConfig {
                url: self.database.url,
                pool_size: self.database.pool_size,
                idle_timeout: Duration::from_millis(self.database.idle_timeout_ms),
                connect_timeout: Duration::from_millis(self.database.connect_timeout_ms),
                partitions_ahead_months: i32::try_from(
                    self.database.partitions_ahead_months.min(120),
                )
                .map_err(|e| bad("database.partitions_ahead_months", e))?,
            },
            redis: RedisConfig {
                url: self.redis.url,
                key_prefix: self.redis.key_prefix,
                buckets: self.redis.buckets,
            },
            auth: AuthConfig {
                issuer: self.auth.issuer,
                audience: self.auth.audience,
                signing_key_path: PathBuf::from(self.auth.signing_key_path),
                access_token_ttl: Duration::from_secs(self.auth.access_token_ttl_secs),
                leeway_secs: self.auth.leeway_secs,
                previous_key_paths: self
                    .auth
                    .previous_key_paths
                    .into_iter()
                    .map(PathBuf::from)
                    .collect(),
                external,
            },
            oauth,
            passwords,
            metering: MeteringConfig {
                hold_ttl: Duration::from_millis(self.metering.hold_ttl_ms),
                min_output_tokens: self.metering.min_output_tokens.max(1),
                image_tokens: self.metering.image_tokens,
                settle_retries: self.metering.settle_retries,
                speculative_send: self.metering.speculative_send,
            },
            flush: FlushConfig {
                batch_rows: self.flush.batch_rows,
                writers: self.flush.writers,
                interval: Duration::from_millis(self.flush.interval_ms),
                claim_idle: Duration::from_millis(self.flush.claim_idle_ms),
                consumer_group: self.flush.consumer_group,
            },
            models_refresh: Duration::from_millis(self.models.refresh_ms),
            rate_limits: RateLimitConfig {
                tier_cache: Duration::from_millis(positive(
                    "rate_limits.tier_cache_ms",
                    self.rate_limits.tier_cache_ms,
                )?),
                tiers: tier_limits,
            },
            tiers,
            billing,
            preferences: PreferencesConfig {
                cache_ttl: Duration::from_millis(self.preferences.cache_ttl_ms),
                cache_entries: self.preferences.cache_entries,
                load_timeout: Duration::from_millis(self.preferences.load_timeout_ms),
            },
            providers,
        })
    }
}

/// A tier's limit from its new key (`tiers.<tier>.<which>`) or its old one
/// (`rate_limits.<tier>.<which>`); both set to different values is an error naming both.
fn tier_limit(
    tier: &str,
    which: &str,
    new: Option<u32>,
    old: Option<u32>,
) -> Result<u32, ConfigError> {
    match (new, old) {
        (Some(n), Some(o)) if n != o => Err(ConfigError(format!(
            "`tiers.{tier}.{which}` = {n} and `rate_limits.{tier}.{which}` = {o} disagree; \
             set only `tiers.{tier}.{which}` (`rate_limits.{tier}` is its old place)"
        ))),
        (n, o) => Ok(n.or(o).unwrap_or(0)),
    }
}

fn validate_tiers(
    t: &RawTiers,
    old: &RawRateLimits,
) -> Result<(TiersConfig, BTreeMap<String, TierLimit>), ConfigError> {
    let mut plans = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (name, raw, old) in [
        ("free", &t.free, &old.free),
        ("pro", &t.pro, &old.pro),
        ("enterprise", &t.enterprise, &old.enterprise),
    ] {
        let key = |field: &str| format!("tiers.{name}.{field}");
        let int = |field: &str, v: i64| {
            if v < 0 {
                Err(bad(&key(field), format!("must not be negative (got {v})")))
            } else if v > i64::from(i32::MAX) {
                Err(bad(&key(field), format!("must be at most {}", i32::MAX)))
            } else {
                Ok(v)
            }
        };
        let interval = BillingInterval::parse(&raw.billing_interval).ok_or_else(|| {
            bad(
                &key("billing_interval"),
                format!(
                    "unknown interval `{}`, expected `monthly` or `yearly`",
                    raw.billing_interval
                ),
            )
        })?;
        let plan = Plan {
            credits_per_month: int("credits_per_month", raw.credits_per_month)?,
            price_cents: int("price_cents", raw.price_cents)?,
            interval,
            rollover_cap: int("rollover_cap", raw.rollover_cap)?,
        };
        let period = plan
            .period_credits()
            .filter(|c| *c <= i64::from(i32::MAX))
            .ok_or_else(|| {
                bad(
                    &key("credits_per_month"),
                    format!(
                        "a {} period's credits must be at most {}",
                        interval.as_str(),
                        i32::MAX
                    ),
                )
            })?;
        if period
            .checked_add(plan.rollover_cap)
            .is_none_or(|c| c > i64::from(i32::MAX))
        {
            return Err(bad(
                &key("rollover_cap"),
                format!(
                    "a period's credits plus the rollover cap must be at most {}",
                    i32::MAX
                ),
            ));
        }
        plans.insert(name.to_owned(), plan);
        limits.insert(
            name.to_owned(),
            TierLimit {
                requests_per_minute: tier_limit(
                    name,
                    "requests_per_minute",
                    raw.requests_per_minute,
                    old.requests_per_minute,
                )?,
                tokens_per_minute: tier_limit(
                    name,
                    "tokens_per_minute",
                    raw.tokens_per_minute,
                    old.tokens_per_minute,
                )?,
            },
        );
    }
    if !plans.contains_key(&t.default) {
        return Err(bad(
            "tiers.default",
            format!(
                "`{}` is not a tier (one of {})",
                t.default,
                TIERS.join(", ")
            ),
        ));
    }
    Ok((
        TiersConfig {
            default: t.default.clone(),
            plans,
        },
        limits,
    ))
}

fn validate_billing(b: &RawBilling) -> Result<BillingConfig, ConfigError> {
    if b.interval_ms == 0 {
        return Err(bad("billing.interval_ms", "must be greater than zero"));
    }
    let grace = b
        .past_due_grace_hours
        .checked_mul(3600)
        .filter(|_| b.past_due_grace_hours <= 100 * 365 * 24)
        .ok_or_else(|| {
            bad(
                "billing.past_due_grace_hours",
                "must be at most 876000 (100 years)",
            )
        })?;
    Ok(BillingConfig {
        enabled: b.enabled,
        interval: Duration::from_millis(b.interval_ms),
        past_due_grace: Duration::from_secs(grace),
        reconcile_interval: (b.reconcile_interval_ms > 0)
            .then(|| Duration::from_millis(b.reconcile_interval_ms)),
    })
}

fn validate_external(e: &RawExternalIssuer) -> Result<Option<ExternalIssuerConfig>, ConfigError> {
    if e.issuer.is_empty() {
        return Ok(None);
    }
    let uri: http::Uri = e.jwks_url.parse().map_err(|err| {
        bad(
            "external_issuer.jwks_url",
            format!("unparsable URL ({err})"),
        )
    })?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(bad(
            "external_issuer.jwks_url",
            "must be an absolute http:// or https:// URL when external_issuer.issuer is set",
        ));
    }
    if e.audience.is_empty() {
        return Err(bad(
            "external_issuer.audience",
            "must be set when external_issuer.issuer is set",
        ));
    }
    if e.user_claim.is_empty() {
        return Err(bad("external_issuer.user_claim", "must name a claim"));
    }
    if e.jwks_fetch_timeout_ms == 0 {
        return Err(bad(
            "external_issuer.jwks_fetch_timeout_ms",
            "must be greater than zero",
        ));
    }
    Ok(Some(ExternalIssuerConfig {
        issuer: e.issuer.clone(),
        jwks_url: e.jwks_url.clone(),
        audience: e.audience.clone(),
        user_claim: e.user_claim.clone(),
        refetch_min_interval: Duration::from_millis(e.jwks_refetch_min_interval_ms),
        fetch_timeout: Duration::from_millis(e.jwks_fetch_timeout_ms),
    }))
}

fn validate_oauth(o: &RawOAuth) -> Result<OAuthConfig, ConfigError> {
    let ttl = o.authorization_code_ttl_secs;
    if !(1..=60).contains(&ttl) {
        return Err(bad(
            "oauth.authorization_code_ttl_secs",
            "must be between 1 and 60",
        ));
    }
    if o.refresh_token_idle_ttl_secs == 0
        || o.refresh_token_idle_ttl_secs > o.refresh_token_absolute_ttl_secs
    {
        return Err(bad(
            "oauth.refresh_token_idle_ttl_secs",
            "must be positive and at most oauth.refresh_token_absolute_ttl_secs",
        ));
    }
    if !(1..=30_000).contains(&o.revocation_refresh_ms) {
        return Err(bad(
            "oauth.revocation_refresh_ms",
            "must be between 1 and 30000 (a disabled user must be refused within 60 s)",
        ));
    }
    if o.signin_max_failures == 0 || o.signin_failure_window_secs == 0 {
        return Err(bad(
            "oauth.signin_max_failures",
            "oauth.signin_max_failures and oauth.signin_failure_window_secs must be positive",
        ));
    }
    Ok(OAuthConfig {
        code_ttl: Duration::from_secs(ttl),
        refresh_idle_ttl: Duration::from_secs(o.refresh_token_idle_ttl_secs),
        refresh_absolute_ttl: Duration::from_secs(o.refresh_token_absolute_ttl_secs),
        revocation_refresh: Duration::from_millis(o.revocation_refresh_ms),
        signin_max_failures: o.signin_max_failures,
        signin_failure_window: Duration::from_secs(o.signin_failure_window_secs),
        signin_lockout_initial: Duration::from_secs(o.signin_lockout_initial_secs.max(1)),
        signin_lockout_max: Duration::from_secs(
            o.signin_lockout_max_secs
                .max(o.signin_lockout_initial_secs)
                .max(1),
        ),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn load_str(toml: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, toml).unwrap();
        load(&path, true)
    }

    #[test]
    fn shipped_config_file_is_valid_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml");
        let from_file: RawConfig = Figment::from(Toml::file(&path)).extract().unwrap();
        let defaults = RawConfig::default();
        assert_eq!(
            serde_json::to_value(&from_file).unwrap(),
            serde_json::to_value(&defaults).unwrap(),
            "config/tollgate.toml must list every key with its default"
        );
    }

    #[test]
    fn defaults_follow_the_seed_pool_settings() {
        let c = load_str("").unwrap();
        assert_eq!(c.database.pool_size, 20);
        assert_eq!(c.database.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.database.connect_timeout, Duration::from_secs(10));
        assert_eq!(
            c.providers["anthropic"].deployments[0].base_url,
            "https://api.anthropic.com"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load_str("[server]\nlisten = \"127.0.0.1:1\"\nlissten = 3\n").unwrap_err();
        assert!(e.to_string().contains("lissten"), "{e}");
    }

    #[test]
    fn unparsable_url_is_named() {
        let e = load_str("[providers.openai]\nbase_url = \"not a url\"\n").unwrap_err();
        assert!(e.to_string().contains("providers.openai.base_url"), "{e}");
        let e = load_str("[redis]\nurl = \"http://x\"\n").unwrap_err();
        assert!(e.to_string().contains("redis.url"), "{e}");
    }

    #[test]
    fn zero_partitions_ahead_is_named() {
        let e = load_str("[database]\npartitions_ahead_months = 0\n").unwrap_err();
        assert!(
            e.to_string().contains("database.partitions_ahead_months"),
            "{e}"
        );
        let c = load_str("[database]\npartitions_ahead_months = 1\n").unwrap();
        assert_eq!(c.database.partitions_ahead_months, 1);
    }

    #[test]
    fn zero_pool_size_is_named() {
        let e = load_str("[database]\npool_size = 0\n").unwrap_err();
        assert!(e.to_string().contains("database.pool_size"), "{e}");
    }

    #[test]
    fn unknown_provider_is_named() {
        let e = load_str("[providers.mistral]\nbase_url = \"https://x\"\napi_key_env = \"K\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("providers.mistral"), "{e}");
    }

    #[test]
    fn bad_listen_is_named() {
        let e = load_str("[server]\nlisten = \"localhost\"\n").unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
    }

    #[test]
    fn rate_limit_keys_are_validated_and_named() {
        let e = load_str("[rate_limits]\ntier_cache_ms = 0\n").unwrap_err();
        assert!(e.to_string().contains("rate_limits.tier_cache_ms"), "{e}");
        let e = load_str("[rate_limits.gold]\nrequests_per_minute = 1\n").unwrap_err();
        assert!(e.to_string().contains("gold"), "{e}");
        let e = load_str("[rate_limits.pro]\nrequests_per_minute = -1\n").unwrap_err();
        assert!(e.to_string().contains("requests_per_minute"), "{e}");
        let c = load_str("[rate_limits.pro]\ntokens_per_minute = 90000\n").unwrap();
        assert_eq!(c.rate_limits.tiers["pro"].tokens_per_minute, 90000);
        assert_eq!(c.rate_limits.tiers["free"].tokens_per_minute, 0);
    }

    #[test]
    fn tier_plans_default_to_the_old_hard_coded_plans() {
        let c = load_str("").unwrap();
        assert_eq!(c.tiers.default, "free");
        let plan = |t: &str| c.tiers.plan(t).unwrap().clone();
        for (tier, credits, price) in [
            ("free", 1_000, 0),
            ("pro", 100_000, 1_999),
            ("enterprise", 1_000_000, 9_999),
        ] {
            assert_eq!(
                plan(tier),
                Plan {
                    credits_per_month: credits,
                    price_cents: price,
                    interval: BillingInterval::Monthly,
                    rollover_cap: 0,
                },
                "{tier}"
            );
            assert_eq!(c.rate_limits.tiers[tier], TierLimit::default());
        }
        assert_eq!(c.tiers.plans.len(), 3);
        assert!(c.tiers.plan("gold").is_none());
        assert!(c.billing.enabled);
        assert_eq!(c.billing.interval, Duration::from_secs(60));
        assert_eq!(c.billing.past_due_grace, Duration::from_secs(72 * 3600));
    }

    #[test]
    fn tiers_are_configurable() {
        let c = load_str(
            "[tiers]\ndefault = \"pro\"\n[tiers.pro]\ncredits_per_month = 5000\nprice_cents = 0\nbilling_interval = \"yearly\"\nrollover_cap = 700\nrequests_per_minute = 9\n[billing]\nenabled = false\ninterval_ms = 5\npast_due_grace_hours = 0\n",
        )
        .unwrap();
        assert_eq!(c.tiers.default, "pro");
        let pro = c.tiers.plan("pro").unwrap();
        assert_eq!(pro.credits_per_month, 5000);
        assert_eq!(pro.price_cents, 0);
        assert_eq!(pro.interval, BillingInterval::Yearly);
        assert_eq!(pro.interval.as_str(), "yearly");
        assert_eq!(pro.interval.months(), 12);
        assert_eq!(pro.period_credits(), Some(60_000));
        assert_eq!(pro.rollover_cap, 700);
        assert_eq!(BillingInterval::Monthly.as_str(), "monthly");
        assert_eq!(BillingInterval::Monthly.months(), 1);
        // Keys left out keep their defaults.
        assert_eq!(c.tiers.plan("free").unwrap().credits_per_month, 1_000);
        assert_eq!(c.rate_limits.tiers["pro"].requests_per_minute, 9);
        assert_eq!(c.rate_limits.tiers["pro"].tokens_per_minute, 0);
        assert!(!c.billing.enabled);
        assert_eq!(c.billing.interval, Duration::from_millis(5));
        assert_eq!(c.billing.past_due_grace, Duration::ZERO);
    }

    #[test]
    fn old_rate_limit_keys_keep_working_and_may_not_contradict_the_new_ones() {
        let c = load_str("[rate_limits.pro]\nrequests_per_minute = 4\n").unwrap();
        assert_eq!(c.rate_limits.tiers["pro"].requests_per_minute, 4);
        // The same value in both places is no contradiction; 0 counts as set.
        let c = load_str(
            "[rate_limits.pro]\nrequests_per_minute = 4\n[tiers.pro]\nrequests_per_minute = 4\n",
        )
        .unwrap();
        assert_eq!(c.rate_limits.tiers["pro"].requests_per_minute, 4);
        for toml in [
            "[rate_limits.pro]\nrequests_per_minute = 4\n[tiers.pro]\nrequests_per_minute = 5\n",
            "[rate_limits.pro]\nrequests_per_minute = 4\n[tiers.pro]\nrequests_per_minute = 0\n",
        ] {
            let e = load_str(toml).unwrap_err().to_string();
            assert!(e.contains("tiers.pro.requests_per_minute"), "{e}");
            assert!(e.contains("rate_limits.pro.requests_per_minute"), "{e}");
        }
        let e = load_str(
            "[rate_limits.enterprise]\ntokens_per_minute = 0\n[tiers.enterprise]\ntokens_per_minute = 10\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tiers.enterprise.tokens_per_minute"), "{e}");
        assert!(
            e.contains("rate_limits.enterprise.tokens_per_minute"),
            "{e}"
        );
    }

    #[test]
    fn bad_tier_settings_are_refused_and_named() {
        for (toml, key) in [
            ("[tiers]\ndefault = \"gold\"\n", "tiers.default"),
            ("[tiers]\ndefault = \"\"\n", "tiers.default"),
            ("[tiers.gold]\ncredits_per_month = 1\n", "gold"),
            ("[tiers.pro]\ncredits_per_mnth = 1\n", "credits_per_mnth"),
            (
                "[tiers.pro]\ncredits_per_month = -1\n",
                "tiers.pro.credits_per_month",
            ),
            ("[tiers.free]\nprice_cents = -5\n", "tiers.free.price_cents"),
            (
                "[tiers.enterprise]\nrollover_cap = -1\n",
                "tiers.enterprise.rollover_cap",
            ),
            (
                "[tiers.pro]\nrequests_per_minute = -1\n",
                "requests_per_minute",
            ),
            (
                "[tiers.pro]\nbilling_interval = \"weekly\"\n",
                "tiers.pro.billing_interval",
            ),
            (
                "[tiers.pro]\nbilling_interval = \"Monthly\"\n",
                "tiers.pro.billing_interval",
            ),
            (
                "[tiers.pro]\ncredits_per_month = 2147483648\n",
                "tiers.pro.credits_per_month",
            ),
            (
                "[tiers.pro]\ncredits_per_month = 200000000\nbilling_interval = \"yearly\"\n",
                "tiers.pro.credits_per_month",
            ),
            (
                "[tiers.pro]\ncredits_per_month = 2000000000\nrollover_cap = 200000000\n",
                "tiers.pro.rollover_cap",
            ),
            ("[billing]\ninterval_ms = 0\n", "billing.interval_ms"),
            (
                "[billing]\npast_due_grace_hours = -1\n",
                "past_due_grace_hours",
            ),
            ("[billing]\nintervl_ms = 5\n", "intervl_ms"),
        ] {
            let e = load_str(toml).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn deployments_replace_the_single_form_and_inherit_the_key() {
        let c = load_str(
            "[providers.openai]\nmax_attempts = 0\ndeployments = [\n  { base_url = \"http://a.example/v1/\", api_key_env = \"KEY_A\", weight = 3 },\n  { base_url = \"https://b.example/v1\" },\n  { base_url = \"https://c.example/v1\", weight = 0 },\n]\n",
        )
        .unwrap();
        let p = &c.providers["openai"];
        let d: Vec<_> = p
            .deployments
            .iter()
            .map(|d| (d.base_url.as_str(), d.api_key_env.as_str(), d.weight))
            .collect();
        assert_eq!(
            d,
            [
                ("http://a.example/v1", "KEY_A", 3),
                ("https://b.example/v1", "OPENAI_API_KEY", 1),
                ("https://c.example/v1", "OPENAI_API_KEY", 0),
            ]
        );
        assert_eq!(p.max_attempts, 3, "0 means one attempt per deployment");
        let single = &c.providers["google"];
        assert_eq!(single.deployments.len(), 1);
        assert_eq!(single.max_attempts, 1);
        assert_eq!(single.deployments[0].api_key_env, "GEMINI_API_KEY");
    }

    #[test]
    fn bad_deployments_and_retry_settings_are_named() {
        for (toml, key) in [
            (
                "[providers.openai]\ndeployments = [{ base_url = \"https://ok\" }, { base_url = \"ftp://x\" }]\n",
                "providers.openai.deployments[1].base_url",
            ),
            (
                "[providers.openai]\ndeployments = [{ base_url = \"https://ok\", wieght = 2 }]\n",
                "wieght",
            ),
            (
                "[providers.openai]\ndeployments = [{ api_key_env = \"K\" }]\n",
                "base_url",
            ),
            (
                "[providers.openai]\nbackoff_base_ms = 500\nbackoff_max_ms = 100\n",
                "providers.openai.backoff_max_ms",
            ),
            (
                "[providers.anthropic]\nbreaker_failures = 0\n",
                "providers.anthropic.breaker_failures",
            ),
            (
                "[providers.google]\nfirst_byte_timeout_ms = 0\n",
                "providers.google.first_byte_timeout_ms",
            ),
            (
                "[providers.openai]\nmax_attempts = 50\n",
                "providers.openai.max_attempts",
            ),
            ("[preferences]\ncache_ttl_ms = 0\n", "preferences.cache_ttl_ms"),
            ("[server]\ndisconnect_drains = -1\n", "disconnect_drains"),
        ] {
            let e = load_str(toml).unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn oauth_limits_are_enforced_and_named() {
        for (toml, key) in [
            ("[oauth]\nauthorization_code_ttl_secs = 61\n", "oauth.authorization_code_ttl_secs"),
            ("[oauth]\nrevocation_refresh_ms = 60000\n", "oauth.revocation_refresh_ms"),
            (
                "[oauth]\nrefresh_token_idle_ttl_secs = 100\nrefresh_token_absolute_ttl_secs = 10\n",
                "oauth.refresh_token_idle_ttl_secs",
            ),
            ("[passwords]\nargon2_iterations = 0\n", "passwords"),
            ("[external_issuer]\nissuer = \"https://idp\"\n", "external_issuer.jwks_url"),
            (
                "[external_issuer]\nissuer = \"https://idp\"\njwks_url = \"https://idp/jwks\"\n",
                "external_issuer.audience",
            ),
        ] {
            let e = load_str(toml).unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
        let c = load_str("").unwrap();
        assert!(c.auth.external.is_none());
        assert_eq!(c.oauth.code_ttl, Duration::from_secs(60));
        assert_eq!(c.passwords.argon2.m_cost(), 19_456);
        assert_eq!(c.passwords.max_queued, 64);
    }
}
