//! Black-box test harness: real PostgreSQL, real Redis, the real `tollgate` binary on
//! port 0. Each test gets a fresh database cloned from a migrated and seeded template,
//! its own Redis key prefix and its own signing key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tollgate::ledger::KeyLayout;
use uuid::Uuid;

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const REDIS: &str = "redis://127.0.0.1:6379";
pub const PROVIDER_KEY: &str = "sk-test-provider-key";
/// How long a test waits for usage to reach PostgreSQL.
pub const FLUSH_WAIT: Duration = Duration::from_secs(15);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

pub fn config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml")
}

pub fn db_url(name: &str) -> String {
    format!("postgres://postgres@127.0.0.1:5432/{name}")
}

pub async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    client
}

/// Name of the template database for the current migrations and seeds, and month.
fn template_name() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for dir in ["migrations", "seeds"] {
        let mut files: Vec<_> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            for b in std::fs::read(&f).unwrap() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    // Partitions are created for the months around the day the template is built:
    // a new month gets a new template.
    format!(
        "tollgate_tpl_{h:016x}_{}",
        chrono::Utc::now().format("%Y%m")
    )
}

/// Creates the template once (across test processes, under an advisory lock) by
/// running the real `tollgate migrate` and `tollgate seed` against it.
async fn ensure_template() -> String {
    let name = template_name();
    let admin = pg(PG_ADMIN).await;
    admin
        .execute("SELECT pg_advisory_lock(7415)", &[])
        .await
        .unwrap();
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some();
    if !exists {
        let building = format!("{name}_building");
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {building}"))
            .await
            .unwrap();
        for cmd in [["migrate"], ["seed"]] {
            let out = std::process::Command::new(bin())
                .args(cmd)
                .arg("--config")
                .arg(config_path())
                .env("DATABASE_URL", db_url(&building))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        admin
            .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {name}"))
            .await
            .unwrap();
    }
    admin
        .execute("SELECT pg_advisory_unlock(7415)", &[])
        .await
        .unwrap();
    name
}

/// A running process that printed `listening on http://ADDR`.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> i32 {
        // Never 0: `kill -SIG 0` would signal the test runner's whole process group.
        self.child.id().expect("the process is still running") as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let st = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }
}

async fn spawn_listening(mut cmd: Command, log: PathBuf) -> Proc {
    let logf = std::fs::File::create(&log).unwrap();
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::from(logf))
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn tollgate");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(a) = line.strip_prefix("listening on http://") {
                return a.trim().to_owned();
            }
        }
        panic!(
            "exited before listening: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "not listening within 30 s: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Proc { child, addr, log }
}

pub struct TestEnv {
    pub db_name: String,
    pub db_url: String,
    pub prefix: String,
    /// Where this test's gateways keep a user's ledger keys: `prefix` and the bucket
    /// count of the configuration they read (the library's layout, not a copy).
    pub layout: KeyLayout,
    pub dir: tempfile::TempDir,
    pub http: Client<HttpConnector, Full<Bytes>>,
    pub extra_env: Vec<(String, String)>,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        let template = ensure_template().await;
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("tg_test_{id}");
        let admin = pg(PG_ADMIN).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name} TEMPLATE {template}"))
            .await
            .unwrap();
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let prefix = format!("t{}:", &id[..12]);
        // The gateways read this file and inherit this process's environment; no test
        // overrides `redis.buckets`.
        let config = tollgate::config::load(&config_path(), true).expect("the test config loads");
        TestEnv {
            db_url: db_url(&db_name),
            db_name,
            layout: KeyLayout::new(&prefix, config.redis.buckets),
            prefix,
            dir: tempfile::tempdir().unwrap(),
            http: Client::builder(TokioExecutor::new()).build(http),
            extra_env: Vec::new(),
        }
    }

    /// Sets an extra environment variable for every process started afterwards.
    pub fn env(&mut self, k: &str, v: &str) {
        self.extra_env.push((k.to_owned(), v.to_owned()));
    }

    fn command(&self, args: &[&str]) -> Command {
        self.command_with_config(args, &config_path())
    }

    /// A `tollgate` command with this test's databases, Redis prefix and key, reading
    /// `config`.
    pub fn command_with_config(&self, args: &[&str], config: &Path) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .arg("--config")
            .arg(config)
            .env("DATABASE_URL", &self.db_url)
            .env("REDIS_URL", REDIS)
            .env("TOLLGATE__REDIS__KEY_PREFIX", &self.prefix)
            .env(
                "TOLLGATE__AUTH__SIGNING_KEY_PATH",
                self.dir.path().join("signing.pem"),
            )
            .env("TOLLGATE__FLUSH__INTERVAL_MS", "20")
            .env("TOLLGATE__FLUSH__CLAIM_IDLE_MS", "1000")
            .env("OPENAI_API_KEY", PROVIDER_KEY)
            .env("RUST_LOG", "info");
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        c
    }

    /// Runs a CLI command; returns trimmed stdout, panicking on failure.
    pub async fn cli(&self, args: &[&str]) -> String {
        let out = self.command(args).output().await.unwrap();
        assert!(
            out.status.success(),
            "tollgate {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Runs a CLI command; returns (success, stdout, stderr).
    pub async fn cli_raw(&self, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().await.unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub async fn mock(&self, opts: &[&str]) -> Proc {
        let mut c = Command::new(bin());
        c.args(["mock-provider", "--listen", "127.0.0.1:0"])
            .args(opts);
        spawn_listening(
            c,
            self.dir
                .path()
                .join(format!("mock-{}.log", Uuid::new_v4().simple())),
        )
        .await
    }

    pub async fn gateway(&self, mock: &Proc) -> Proc {
        self.gateway_with(mock, &[]).await
    }

    pub async fn gateway_with(&self, mock: &Proc, env: &[(&str, &str)]) -> Proc {
        let mut c = self.command(&["serve"]);
        c.env("TOLLGATE__SERVER__LISTEN", "127.0.0.1:0").env(
            "TOLLGATE__PROVIDERS__OPENAI__BASE_URL",
            format!("http://{}/v1", mock.addr),
        );
        for (k, v) in env {
            c.env(k, v);
        }
        spawn_listening(
            c,
            self.dir
                .path()
                .join(format!("gw-{}.log", Uuid::new_v4().simple())),
        )
        .await
    }

    /// A gateway whose three providers (OpenAI, Anthropic, Gemini) all point at `mock`,
    /// each with the test provider key.
    pub async fn gateway_all_providers(&self, mock: &Proc) -> Proc {
        let base = format!("http://{}", mock.addr);
        self.gateway_with(
            mock,
            &[
                ("TOLLGATE__PROVIDERS__ANTHROPIC__BASE_URL", &base),
                ("TOLLGATE__PROVIDERS__GOOGLE__BASE_URL", &base),
                ("ANTHROPIC_API_KEY", PROVIDER_KEY),
                ("GEMINI_API_KEY", PROVIDER_KEY),
            ],
        )
        .await
    }

    /// Creates a user without a subscription, with exactly `credits` granted; returns
    /// (user id, access token).
    pub async fn user(&self, credits: i32) -> (Uuid, String) {
        let email = format!(
            "u{}@example.com",
            &Uuid::new_v4().simple().to_string()[..10]
        );
        let id = Uuid::parse_str(
            &self
                .cli(&["user", "create", "--email", &email, "--no-subscription"])
                .await,
        )
        .unwrap();
        self.grant(&email, credits).await;
        let token = self.cli(&["token", "issue", "--email", &email]).await;
        (id, token)
    }

    /// Grants `credits` to the user with `email` (nothing when not positive).
    pub async fn grant(&self, email: &str, credits: i32) {
        if credits > 0 {
            self.cli(&[
                "credits",
                "grant",
                "--email",
                email,
                "--amount",
                &credits.to_string(),
            ])
            .await;
        }
    }

    pub async fn db(&self) -> tokio_postgres::Client {
        pg(&self.db_url).await
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(REDIS)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Credits held for the user's requests in flight (`h:` fields of the user's
    /// account hash).
    pub async fn redis_held(&self, user: &Uuid) -> i64 {
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(self.layout.acct_key(user))
            .query_async(&mut self.redis().await)
            .await
            .unwrap();
        let mut held = 0;
        for (f, v) in all {
            if f.starts_with("h:") {
                held += v.split(':').next().unwrap().parse::<i64>().unwrap();
            }
        }
        held
    }

    /// The user's charges settled in Redis and not yet acknowledged as flushed to
    /// PostgreSQL (entries of the user's `pend` hash).
    pub async fn redis_unflushed(&self, user: &Uuid) -> i64 {
        redis::cmd("HLEN")
            .arg(self.layout.keys(user).pend)
            .query_async(&mut self.redis().await)
            .await
            .unwrap()
    }

    /// The user's live balance in Redis (None if not loaded).
    pub async fn redis_balance(&self, user: &Uuid) -> Option<i64> {
        redis::cmd("HGET")
            .arg(self.layout.acct_key(user))
            .arg("bal")
            .query_async(&mut self.redis().await)
            .await
            .unwrap()
    }

    pub async fn request(
        &self,
        method: &str,
        url: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, HashMap<String, String>, Bytes) {
        let mut b = http::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let resp = self.http.request(req).await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        (status, headers, body)
    }

    pub async fn chat(
        &self,
        gw: &Proc,
        token: &str,
        body: serde_json::Value,
    ) -> (u16, HashMap<String, String>, Bytes) {
        self.request(
            "POST",
            &gw.url("/v1/chat/completions"),
            Some(token),
            Some(serde_json::to_vec(&body).unwrap()),
        )
        .await
    }

    /// POSTs `body` as JSON with a bearer token; the answer's body as JSON (or, when it
    /// is not JSON, as a JSON string of its text).
    pub async fn post_json(
        &self,
        gw: &Proc,
        token: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, HashMap<String, String>, serde_json::Value) {
        let (s, h, b) = self
            .request(
                "POST",
                &gw.url(path),
                Some(token),
                Some(serde_json::to_vec(&body).unwrap()),
            )
            .await;
        let v = serde_json::from_slice(&b).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&b).into_owned())
        });
        (s, h, v)
    }

    /// Waits until the usage row of request `rid` is flushed (panics after `timeout`).
    pub async fn flushed(&self, rid: &str, timeout: Duration) {
        let n = self
            .wait_for_count(
                &format!("SELECT count(*) FROM usage_history WHERE id = '{rid}'"),
                1,
                timeout,
            )
            .await;
        assert_eq!(n, 1, "the usage row of {rid} must be flushed");
    }

    /// `credits.used_credits` summed over every row (0 without rows).
    pub async fn used_credits_total(&self) -> i64 {
        self.db()
            .await
            .query_one(
                "SELECT coalesce(sum(used_credits), 0)::bigint FROM credits",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Makes PostgreSQL refuse this test's database (superusers too, unlike a
    /// connection limit), cutting the connections it has; or accept it again.
    pub async fn allow_connections(&self, allow: bool) {
        let admin = pg(PG_ADMIN).await;
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS {allow}",
                self.db_name
            ))
            .await
            .unwrap();
        if !allow {
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    &[&self.db_name],
                )
                .await
                .unwrap();
        }
    }

    /// A JSON page that must answer 200.
    pub async fn get_json(&self, url: &str) -> serde_json::Value {
        let (s, _, b) = self.request("GET", url, None, None).await;
        assert_eq!(s, 200, "GET {url}: {}", String::from_utf8_lossy(&b));
        json(&b)
    }

    /// The mock provider's counters (`requests`, `served`, the last `authorization`).
    pub async fn mock_stats(&self, mock: &Proc) -> serde_json::Value {
        self.get_json(&mock.url("/_mock/stats")).await
    }

    /// The headers and body of the last request `mock` received, in any wire format.
    pub async fn mock_last(&self, mock: &Proc) -> serde_json::Value {
        self.get_json(&mock.url("/_mock/last")).await
    }

    /// The gateway's `/metrics` page.
    pub async fn metrics(&self, gw: &Proc) -> String {
        let (s, _, b) = self.request("GET", &gw.url("/metrics"), None, None).await;
        assert_eq!(s, 200);
        String::from_utf8_lossy(&b).into_owned()
    }

    /// Waits until `sql` (returning one bigint) yields `want`; returns the last value.
    pub async fn wait_for_count(&self, sql: &str, want: i64, timeout: Duration) -> i64 {
        let db = self.db().await;
        let deadline = Instant::now() + timeout;
        loop {
            let n: i64 = db.query_one(sql, &[]).await.unwrap().get(0);
            if n == want || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn usage_rows(&self) -> i64 {
        self.db()
            .await
            .query_one("SELECT count(*) FROM usage_history", &[])
            .await
            .unwrap()
            .get(0)
    }
}

/// Starts a stream, reads its first frame and hangs up; returns the request id.
pub async fn read_first_then_disconnect(gw: &Proc, token: &str) -> Uuid {
    let body = serde_json::json!({"model": "gpt-5", "stream": true, "max_tokens": 500,
                                  "messages": [{"role": "user", "content": "tell me a long story"}]});
    let req = chat_request(&gw.url("/v1/chat/completions"), token, &body);
    // A client of its own, so dropping the body closes the connection.
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Full<Bytes>>();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let rid = Uuid::parse_str(resp.headers()["x-request-id"].to_str().unwrap()).unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    drop(client);
    rid
}

/// Runs `f` to completion on a runtime of its own, on another thread: cleanup code
/// called from `Drop`, which may itself run inside a runtime.
pub fn block_on_side<F: std::future::Future<Output = ()> + Send + 'static>(f: F) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(f);
        }
    })
    .join();
}

/// A free loopback port (free when this returns; the caller binds it soon after).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A Redis of the test's own on `port` (so it can be stopped or paused without
/// touching the others), once it answers. Killed when dropped.
pub async fn private_redis(port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is installed (scripts/services.sh)");
    let mut child = child;
    let url = format!("redis://127.0.0.1:{port}");
    for _ in 0..100 {
        if redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .is_ok()
        {
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("redis-server on port {port} exited ({status}): port taken?");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("redis-server on port {port} did not answer in 5 s");
}

/// A counter's value in a Prometheus text page (0 when absent).
pub fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Drops a database (best effort, connections forced out).
pub async fn drop_database(name: &str) {
    if let Ok((c, conn)) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls).await {
        tokio::spawn(conn);
        let _ = c
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let db = self.db_name.clone();
        let prefix = self.prefix.clone();
        block_on_side(async move {
            drop_database(&db).await;
            if let Ok(client) = redis::Client::open(REDIS) {
                if let Ok(mut r) = client.get_multiplexed_async_connection().await {
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("{prefix}*"))
                        .query_async(&mut r)
                        .await
                        .unwrap_or_default();
                    for k in keys {
                        let _: Result<(), _> = redis::cmd("DEL").arg(k).query_async(&mut r).await;
                    }
                }
            }
        });
    }
}

/// A chat-completions POST with a bearer token.
pub fn chat_request(
    url: &str,
    token: &str,
    body: &serde_json::Value,
) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method("POST")
        .uri(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap()
}

/// A short chat-completions body for the seeded `gpt-5`.
pub fn hello(max_tokens: i64) -> serde_json::Value {
    serde_json::json!({"model": "gpt-5", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens})
}

pub fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

/// Asserts an OpenAI-shaped error body and returns its `error` object.
pub fn openai_error(b: &[u8]) -> serde_json::Value {
    let v = json(b);
    let e = v
        .get("error")
        .cloned()
        .unwrap_or_else(|| panic!("no `error` in {v}"));
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error body lacks `{k}`: {v}");
    }
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    e
}
