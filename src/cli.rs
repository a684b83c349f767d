//! The `tollgate` command line: `serve`, `migrate`, `seed`, admin commands and the
//! bundled mock provider.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::config::{self, Config};
use crate::db;
use crate::server::BoxError;
use crate::subscriptions;

#[derive(Parser, Debug)]
#[command(name = "tollgate", version, about = "A metering gateway for LLM APIs")]
pub struct Cli {
    /// Configuration file (keys can be overridden with TOLLGATE__SECTION__KEY).
    #[arg(long, global = true, default_value = "config/tollgate.toml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Apply pending database migrations (a no-op when up to date).
    Migrate,
    /// Upsert the seed data (OAuth clients, models). Idempotent.
    Seed,
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage credits.
    #[command(subcommand)]
    Credits(CreditsCommand),
    /// Manage subscriptions: change a user's tier, cancel.
    #[command(subcommand)]
    Subscriptions(SubscriptionsCommand),
    /// Issue access tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The credit lifecycle: periods that turn, grants that expire.
    #[command(subcommand)]
    Billing(BillingCommand),
    /// The live ledger in Redis.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Run the bundled mock provider (OpenAI wire format).
    MockProvider {
        /// host:port to bind (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
        #[command(flatten)]
        options: tollgate_mock_provider::MockOptions,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create a user; prints its id.
    Create {
        #[arg(long)]
        email: String,
        /// Hashed with Argon2id; omit for an account without a password.
        #[arg(long)]
        password: Option<String>,
        /// Start a subscription of this tier: its plan from `[tiers.<tier>]` (credits,
        /// price, billing interval) and its first period's credits. Default:
        /// `tiers.default`.
        #[arg(long, value_enum, conflicts_with = "no_subscription")]
        tier: Option<Tier>,
        /// Create the user without a subscription (no credits until granted).
        #[arg(long)]
        no_subscription: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CreditsCommand {
    /// Apply the user's current credits rows, and any change queued for the user, to
    /// the live balance (after a grant whose Redis step failed). Idempotent.
    Sync {
        #[arg(long)]
        email: String,
    },
    /// A one-time credit allocation (no subscription); effective at once. Charges are
    /// taken from the row that expires soonest; at its expiry (the next billing run
    /// after it) what is left of it leaves the balance.
    Grant {
        #[arg(long)]
        email: String,
        #[arg(long, allow_hyphen_values = true)]
        amount: i32,
        /// When these credits expire (RFC 3339, e.g. 2027-01-31T00:00:00Z; in the future).
        #[arg(long, value_parser = parse_time, conflicts_with = "expires_days")]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        /// Days until these credits expire (default 3650, when --expires-at is not given).
        #[arg(long, allow_hyphen_values = true)]
        expires_days: Option<i64>,
    },
}

#[derive(Subcommand, Debug)]
pub enum BillingCommand {
    /// Turn every period that has ended: renew subscriptions (the tier's credits plus
    /// the capped rollover), expire cancelled ones and ended grants, suspend past-due
    /// ones past their grace; then carry the changes to the live balances. Idempotent;
    /// concurrent runs wait for each other. `serve` runs the same job periodically.
    Run {
        /// The time to run as of (RFC 3339); default now.
        #[arg(long, value_parser = parse_time)]
        now: Option<chrono::DateTime<chrono::Utc>>,
    },
}

#[derive(Subcommand, Debug)]
pub enum SubscriptionsCommand {
    /// Change a user's tier (its plan from `[tiers.<tier>]`).
    ///
    /// An upgrade (a higher credits_per_month) takes effect now: the subscription takes
    /// the new plan, and the current period's credits row gets
    /// floor((new - old) x remaining_seconds / period_seconds) more credits, where new
    /// and old are the two plans' credits for a period as long as the current one. A
    /// downgrade (not higher) takes effect when the current period ends. The same tier
    /// changes nothing (a scheduled downgrade is withdrawn). A cancelled subscription
    /// still running is resumed; a user without a subscription (or whose latest one
    /// expired) gets one, as `user create` would.
    Set {
        #[arg(long)]
        email: String,
        #[arg(long, value_enum)]
        tier: Tier,
    },
    /// Cancel a user's active subscription at the end of its current period: it is
    /// served until then, and not renewed.
    Cancel {
        #[arg(long)]
        email: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum LedgerCommand {
    /// Compare, per loaded user, Redis (balance + holds + unflushed charges) with
    /// PostgreSQL (Σ total − used of the current credits rows); print each drifting
    /// user. Exits with an error while drift remains.
    Reconcile {
        /// Rebuild each drifting user from PostgreSQL, as after a Redis loss.
        #[arg(long)]
        fix: bool,
        /// Only this user.
        #[arg(long)]
        email: Option<String>,
    },
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("`{s}` is not an RFC 3339 time ({e}), e.g. 2027-01-31T00:00:00Z"))
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print an access token for a user.
    Issue {
        #[arg(long)]
        email: String,
        /// Lifetime in seconds (default: auth.access_token_ttl_secs).
        #[arg(long)]
        ttl: Option<u64>,
        /// Space-separated scopes, e.g. "llm.inference models.read" (default: the
        /// seeded `textassistant-desktop` client's registered scopes).
        #[arg(long, default_value = DEFAULT_TOKEN_SCOPE)]
        scope: String,
    },
}

/// The scope of `tollgate token issue` without `--scope`: what the seeded desktop
/// client (`seeds/0001_oauth_clients.sql`) is registered for, so a CLI token reaches
/// every route a signed-in user of the app can.
pub const DEFAULT_TOKEN_SCOPE: &str =
    "openid email profile llm.inference models.read user.info credits.read";

/// `--scope` normalised: values separated by single spaces, duplicates dropped; each
/// value a scope-token of RFC 6749 §3.3.
fn token_scope(arg: &str) -> Result<String, BoxError> {
    let mut out: Vec<&str> = Vec::new();
    for s in arg.split_ascii_whitespace() {
        let ok = s
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
        if !ok {
            return Err(format!("--scope: `{s}` is not a valid scope value").into());
        }
        if !out.contains(&s) {
            out.push(s);
        }
    }
    if out.is_empty() {
        return Err("--scope must name at least one scope".into());
    }
    Ok(out.join(" "))
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Tier {
    Free,
    Pro,
    Enterprise,
}

impl Tier {
    fn name(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Pro => "pro",
            Tier::Enterprise => "enterprise",
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn main(cli: Cli) -> ExitCode {
    let serving = matches!(cli.command, Command::Serve | Command::MockProvider { .. });
    init_tracing(if serving { "info" } else { "warn" });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if matches!(cli.command, Command::Serve) {
        // Requests are served by the worker threads (`server.worker_threads`, started by
        // `server::run`); this runtime only accepts and runs the background tasks.
        builder.worker_threads(1);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config, BoxError> {
    let explicit = cli.config != std::path::Path::new("config/tollgate.toml");
    Ok(config::load(&cli.config, explicit)?)
}

async fn dispatch(cli: Cli) -> Result<(), BoxError> {
    if let Command::MockProvider { listen, options } = &cli.command {
        let listener = TcpListener::bind(listen).await?;
        println!("listening on http://{}", listener.local_addr()?);
        tollgate_mock_provider::serve(listener, options.clone(), crate::server::shutdown_signal())
            .await?;
        return Ok(());
    }
    let cfg = load_config(&cli)?;
    match &cli.command {
        Command::Serve => {
            let listener = TcpListener::bind(cfg.listen).await?;
            let addr = listener.local_addr()?;
            let state = crate::server::build_state(cfg).await?;
            println!("listening on http://{addr}");
            crate::server::run(listener, state, crate::server::shutdown_signal()).await
        }
        Command::Migrate => {
            let mut client = db::connect(&cfg.database).await?;
            let applied = db::migrate(&mut client).await?;
            let parts =
                db::ensure_partitions(&client, cfg.database.partitions_ahead_months).await?;
            if applied.is_empty() {
                println!("migrations: up to date");
            } else {
                for m in applied {
                    println!("applied {m}");
                }
            }
            if parts > 0 {
                println!("created {parts} usage_history partition(s)");
            }
            Ok(())
        }
        Command::Seed => {
            let mut client = db::connect(&cfg.database).await?;
            for s in db::seed(&mut client).await? {
                println!("seeded {s}");
            }
            Ok(())
        }
        Command::User(UserCommand::Create {
            email,
            password,
            tier,
            no_subscription,
        }) => {
            let tier = match (tier, no_subscription) {
                (_, true) => None,
                (Some(t), false) => Some(t.name()),
                (None, false) => Some(cfg.tiers.default.as_str()),
            };
            let id = create_user(&cfg, email, password.as_deref(), tier).await?;
            println!("{id}");
            Ok(())
        }
        Command::Credits(CreditsCommand::Sync { email }) => {
            let client = db::connect(&cfg.database).await?;
            let user = active_user(&client, email).await?;
            match sync_credits(&cfg, &client, &user).await? {
                Some(b) => println!("credits of {email} in sync; balance {b}"),
                None => println!("credits of {email} in sync (balance not loaded yet)"),
            }
            Ok(())
        }
        Command::Credits(CreditsCommand::Grant {
            email,
            amount,
            expires_at,
            expires_days,
        }) => {
            let now = chrono::Utc::now();
            let expires = match (expires_at, expires_days) {
                (Some(t), _) if *t <= now => {
                    return Err(format!("--expires-at {t} is not in the future").into())
                }
                (Some(t), _) => *t,
                (None, Some(d)) if *d <= 0 => return Err("--expires-days must be positive".into()),
                (None, d) => d
                    .unwrap_or(3650)
                    .checked_mul(86_400)
                    .and_then(chrono::TimeDelta::try_seconds)
                    .and_then(|d| now.checked_add_signed(d))
                    .ok_or("--expires-days is out of range")?,
            };
            let (credit, balance) = grant(&cfg, email, *amount, expires).await?;
            match balance {
                Some(b) => {
                    println!("granted {amount} credits to {email} (credit {credit}); balance {b}")
                }
                None => println!("granted {amount} credits to {email} (credit {credit})"),
            }
            Ok(())
        }
        Command::Subscriptions(cmd) => {
            let db = db::Db::new(&cfg.database)?;
            let ledger = connect_ledger(&cfg).await?;
            let (email, change) = match cmd {
                SubscriptionsCommand::Set { email, tier } => (
                    email,
                    subscriptions::set_tier(
                        &db,
                        &ledger,
                        &cfg.tiers,
                        email,
                        tier.name(),
                        chrono::Utc::now(),
                    )
                    .await?,
                ),
                SubscriptionsCommand::Cancel { email } => (
                    email,
                    subscriptions::cancel(&db, &ledger, email, chrono::Utc::now()).await?,
                ),
            };
            println!("{email}: {change}");
            Ok(())
        }
        Command::Token(TokenCommand::Issue { email, ttl, scope }) => {
            let scope = token_scope(scope)?;
            let client = db::connect(&cfg.database).await?;
            let user = active_user(&client, email).await?;
            let auth = crate::authenticate::Authenticator::from_config(&cfg.auth)?;
            println!("{}", auth.issue(&user, "tollgate-cli", &scope, *ttl)?);
            Ok(())
        }
        Command::Billing(BillingCommand::Run { now }) => {
            let db = db::Db::new(&cfg.database)?;
            let ledger = connect_ledger(&cfg).await?;
            let now = now.unwrap_or_else(chrono::Utc::now);
            let r =
                crate::lifecycle::billing_run(&db, &ledger, &cfg.tiers, &cfg.billing, now, true)
                    .await?
                    .ok_or("the billing lock was not taken")?;
            println!(
                "billing run as of {}: {} renewed, {} expired, {} suspended, {} credits rows expired; \
                 {} live balances rebased, {} not loaded, {} left queued",
                now.to_rfc3339(),
                r.renewed,
                r.expired_subscriptions,
                r.suspended,
                r.expired_rows,
                r.applied.rebased,
                r.applied.not_loaded,
                r.applied.failed
            );
            if r.applied.failed > 0 {
                return Err("some live balances were not rebased (Redis unreachable?); \
                            they stay queued for the next run"
                    .into());
            }
            Ok(())
        }
        Command::Ledger(LedgerCommand::Reconcile { fix, email }) => {
            let db = db::Db::new(&cfg.database)?;
            let only = match email {
                Some(e) => Some(active_user(&*db.get().await?, e).await?),
                None => None,
            };
            let ledger = connect_ledger(&cfg).await?;
            let r = crate::reconcile::reconcile(&db, &ledger, only, *fix).await?;
            for d in &r.drifting {
                println!(
                    "drift {:+} user {}: redis {} (balance + holds + unflushed), postgresql {}{}",
                    d.credits(),
                    d.user,
                    d.live,
                    d.recorded,
                    if *fix {
                        "; rebuilt from postgresql"
                    } else {
                        ""
                    }
                );
            }
            println!(
                "reconciled {} loaded users ({} with a change queued, skipped): {} drifting by {} credits in all{}",
                r.users,
                r.queued,
                r.drifting.len(),
                r.drift_credits(),
                if *fix { format!(", {} rebuilt", r.fixed) } else { String::new() }
            );
            if !r.drifting.is_empty() && !*fix {
                return Err("the live ledger drifts from PostgreSQL (rerun with --fix to rebuild those users)".into());
            }
            Ok(())
        }
        Command::MockProvider { .. } => Ok(()),
    }
}

fn validate_email(email: &str) -> Result<(), BoxError> {
    let ok = email.len() <= 255
        && email
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.starts_with('.'))
        && !email.chars().any(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(format!("`{email}` is not a valid email address").into())
    }
}

async fn active_user(client: &tokio_postgres::Client, email: &str) -> Result<Uuid, BoxError> {
    let row = client
        .query_opt(
            "SELECT id, is_active AND deleted_at IS NULL FROM users WHERE lower(email) = lower($1)",
            &[&email],
        )
        .await?
        .ok_or_else(|| format!("no user with email {email}"))?;
    if !row.get::<_, bool>(1) {
        return Err(format!("user {email} is deactivated").into());
    }
    Ok(row.get(0))
}

/// The live ledger in Redis, as `serve` reaches it.
async fn connect_ledger(cfg: &Config) -> Result<crate::ledger::Ledger, redis::RedisError> {
    crate::ledger::Ledger::connect(&cfg.redis.url, &cfg.redis.key_prefix, cfg.redis.buckets).await
}

/// Argon2id with the configured parameters (`[passwords]`).
pub fn hash_password(password: &str, cfg: &Config) -> Result<String, BoxError> {
    Ok(crate::oauth::password::hash(
        password,
        &cfg.passwords.argon2,
    )?)
}

async fn create_user(
    cfg: &Config,
    email: &str,
    password: Option<&str>,
    tier: Option<&str>,
) -> Result<Uuid, BoxError> {
    validate_email(email)?;
    let plan = tier
        .map(|t| subscriptions::plan_of(&cfg.tiers, t).map(|p| (t, p)))
        .transpose()?;
    let hash = match password {
        Some(p) if p.len() < 8 => return Err("passwords must be at least 8 characters".into()),
        Some(p) => Some(hash_password(p, cfg)?),
        None => None,
    };
    let mut client = db::connect(&cfg.database).await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "INSERT INTO users (email, password_hash) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING id",
            &[&email, &hash],
        )
        .await?;
    let Some(row) = row else {
        return Err(format!("a user with email {email} already exists").into());
    };
    let id: Uuid = row.get(0);
    if let Some((tier, plan)) = plan {
        subscriptions::start(&tx, &id, tier, plan, chrono::Utc::now()).await?;
    }
    tx.commit().await?;
    Ok(id)
}

/// Commits a credits row, then applies it to the live balance in Redis (if loaded).
async fn grant(
    cfg: &Config,
    email: &str,
    amount: i32,
    expires: chrono::DateTime<chrono::Utc>,
) -> Result<(Uuid, Option<i64>), BoxError> {
    if amount <= 0 {
        return Err("--amount must be a positive number of credits".into());
    }
    let db = db::Db::new(&cfg.database)?;
    let mut client = db.get().await?;
    let user = active_user(&client, email).await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "INSERT INTO credits (user_id, total_credits, billing_period_start, billing_period_end)
             VALUES ($1, $2, now(), $3) RETURNING id",
            &[&user, &amount, &expires],
        )
        .await?;
    crate::lifecycle::queue_rebase(&tx, &user).await?;
    tx.commit().await?;
    drop(client);
    let credit: Uuid = row.get(0);
    let applied = async {
        let ledger = connect_ledger(cfg).await?;
        let a = crate::lifecycle::apply_queued(&db, &ledger, Some(user)).await?;
        if a.failed > 0 {
            return Err::<_, BoxError>("the live balance could not be rebased".into());
        }
        Ok(ledger.balance(&user).await?)
    }
    .await;
    let balance = applied.map_err(|e| {
        format!(
            "credits row {credit} is committed, but the live balance was not updated ({e}); \
             run `tollgate credits sync --email {email}` once Redis is reachable (the next \
             billing run applies it too)"
        )
    })?;
    Ok((credit, balance))
}

/// Applies every current credits row of the user to the live balance in Redis, once
/// each (rows already applied are skipped). Returns the balance, if it is loaded.
async fn sync_credits(
    cfg: &Config,
    client: &tokio_postgres::Client,
    user: &Uuid,
) -> Result<Option<i64>, BoxError> {
    let rows = client
        .query(
            "SELECT id, total_credits::bigint FROM credits WHERE user_id = $1 AND is_current",
            &[user],
        )
        .await?;
    let ledger = connect_ledger(cfg).await?;
    for r in rows {
        ledger.grant(user, &r.get(0), r.get(1)).await?;
    }
    // And any change queued for the user's live balance (a grant whose Redis step failed).
    let db = db::Db::new(&cfg.database)?;
    let applied = crate::lifecycle::apply_queued(&db, &ledger, Some(*user)).await?;
    if applied.failed > 0 {
        return Err("the live balance could not be rebased; try again".into());
    }
    Ok(ledger.balance(user).await?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::scope::{grants, Scope};

    #[test]
    fn the_default_token_scope_is_the_seeded_clients_and_reaches_every_route() {
        let seed = include_str!("../seeds/0001_oauth_clients.sql");
        assert!(
            seed.contains(&format!("'{DEFAULT_TOKEN_SCOPE}'")),
            "DEFAULT_TOKEN_SCOPE must match textassistant-desktop's registration"
        );
        for s in [
            Scope::LlmInference,
            Scope::ModelsRead,
            Scope::CreditsRead,
            Scope::UserInfo,
        ] {
            assert!(grants(DEFAULT_TOKEN_SCOPE, s), "{s:?}");
        }
    }

    #[test]
    fn scope_arguments_are_normalised_or_refused() {
        assert_eq!(
            token_scope("  llm.inference   models.read llm.inference ").unwrap(),
            "llm.inference models.read"
        );
        assert_eq!(token_scope("openid").unwrap(), "openid");
        assert!(token_scope("").is_err());
        assert!(token_scope("   ").is_err());
        assert!(token_scope("a\"b").is_err());
        assert!(token_scope("a\\b").is_err());
        assert!(token_scope("caf\u{e9}").is_err());
    }
}
