//! Load harness: the gateway's cost over a bare proxy and over the mock provider alone.
//!
//! `cargo bench --bench load` (about two minutes) or `cargo bench --bench load -- --smoke`
//! (a few seconds, for CI: asserts only that it runs and that every successful metered
//! request left exactly one `usage_history` row). Uses the release binary
//! `target/release/tollgate` (or `$TOLLGATE_BIN`); build it first with
//! `cargo build --release`.
//!
//! Three targets, measured in the same run with the same client (hyper-util legacy
//! client, TCP_NODELAY, keep-alive, one pool per target):
//! - direct: client → mock provider;
//! - bare:   client → a minimal forwarding proxy (this binary re-executed with
//!   `--bare-proxy ADDR`, same HTTP stack as the gateway) → mock provider;
//! - full:   client → `tollgate serve` (JWT, Redis reserve/settle, usage flush) → mock.
//!
//! Everything runs on 127.0.0.1 against a fresh database `tollgate_bench_<random>`
//! and a random Redis key prefix, both removed at the end. Writes the report to
//! `target/load-report.md` as well as stdout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const REDIS_URL: &str = "redis://127.0.0.1:6379";
const PROVIDER_KEY: &str = "sk-bench-provider-key";
const EMAIL: &str = "bench@x.test";
const GRANT: i32 = 1_000_000_000;
const CHAT_BODY: &str = r#"{"model":"gpt-5","max_tokens":64,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}"#;
/// Streams ask for usage themselves so the three targets see the same events (the
/// gateway would otherwise ask upstream on the client's behalf and strip that chunk).
const STREAM_BODY: &str = r#"{"model":"gpt-5","max_tokens":64,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello to the benchmark."}]}"#;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Open loop: requests in flight above this are shed (counted) instead of queued.
const OPEN_LOOP_MAX_IN_FLIGHT: usize = 256;
const OPEN_LOOP_MAX_RATE: f64 = 20_000.0;
/// Raw keep-alive connections held open for the RSS probe.
const PROBE_CONNS: usize = 256;

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--bare-proxy") {
        let Some(upstream) = args.get(i + 1) else {
            eprintln!("load: --bare-proxy needs the upstream host:port");
            return ExitCode::FAILURE;
        };
        return bare_proxy_main(upstream);
    }
    // `cargo bench` appends `--bench`; other arguments are ignored too.
    let smoke = args.iter().any(|a| a == "--smoke");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(harness(smoke)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("load: error: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// The bare proxy (a separate process: this binary with `--bare-proxy ADDR`)
// ---------------------------------------------------------------------------

type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove(header::UPGRADE);
}

fn bare_proxy_main(upstream: &str) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bare proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(bare_proxy(upstream.to_owned())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn bare_proxy(upstream: String) -> Res<()> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on http://{addr}");
    // Exit with the harness: it holds our stdin open for as long as it runs.
    std::thread::spawn(|| {
        use std::io::Read;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(http);
    let upstream: Arc<str> = Arc::from(upstream.as_str());
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("bare proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let upstream = Arc::clone(&upstream);
        let service = service_fn(move |req: Request<Incoming>| {
            let client = client.clone();
            let upstream = Arc::clone(&upstream);
            async move { Ok::<_, Infallible>(forward(&client, &upstream, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn proxy_error(status: StatusCode, msg: String) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    upstream: &str,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = match format!("http://{upstream}{pq}").parse::<Uri>() {
        Ok(u) => u,
        Err(e) => return proxy_error(StatusCode::BAD_REQUEST, format!("bad path: {e}")),
    };
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed_unsync())
        }
        Err(e) => proxy_error(StatusCode::BAD_GATEWAY, format!("upstream: {e}")),
    }
}

// ---------------------------------------------------------------------------
// Environment: database, Redis prefix, processes
// ---------------------------------------------------------------------------

struct BenchEnv {
    bin: PathBuf,
    config: PathBuf,
    db_name: String,
    prefix: String,
    dir: tempfile::TempDir,
}

impl BenchEnv {
    fn db_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.db_name)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .arg("--config")
            .arg(&self.config)
            .env("DATABASE_URL", self.db_url())
            .env("REDIS_URL", REDIS_URL)
            .env("TOLLGATE__REDIS__KEY_PREFIX", &self.prefix)
            .env(
                "TOLLGATE__AUTH__SIGNING_KEY_PATH",
                self.dir.path().join("signing.pem"),
            )
            .env("OPENAI_API_KEY", PROVIDER_KEY)
            .env("RUST_LOG", "warn");
        c
    }

    async fn cli(&self, args: &[&str]) -> Res<String> {
        let mut c = self.command(args);
        c.stdin(Stdio::null()).kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), c.output())
            .await
            .map_err(|_| format!("`tollgate {}` did not finish in 60 s", args.join(" ")))?
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "`tollgate {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

fn tollgate_bin(root: &Path) -> Res<PathBuf> {
    let bin = match std::env::var_os("TOLLGATE_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| root.join("target"), PathBuf::from)
            .join("release/tollgate"),
    };
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "no gateway binary at {}: run `cargo build --release` first (or set TOLLGATE_BIN)",
            bin.display()
        ))
    }
}

/// A child process that printed `listening on http://ADDR`.
struct Proc {
    name: &'static str,
    child: Child,
    pid: u32,
    addr: String,
    log: PathBuf,
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

async fn spawn_listening(name: &'static str, mut cmd: Command, dir: &Path) -> Res<Proc> {
    let log = dir.join(format!("{name}.log"));
    let logf = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    // stdin stays open while the harness lives (the bare proxy exits on its EOF).
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(logf))
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let pid = child.id().ok_or_else(|| format!("{name} exited at once"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| format!("{name}: no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.strip_prefix("listening on http://") {
                return Some(a.trim().to_owned());
            }
        }
        None
    })
    .await;
    let addr = match found {
        Ok(Some(a)) => a,
        Ok(None) => {
            let _ = child.kill().await;
            return Err(format!(
                "{name} exited before listening:\n{}",
                log_tail(&log)
            ));
        }
        Err(_) => {
            let _ = child.kill().await;
            return Err(format!(
                "{name} not listening within 30 s:\n{}",
                log_tail(&log)
            ));
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Proc {
        name,
        child,
        pid,
        addr,
        log,
    })
}

async fn pg(url: &str) -> Res<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("PostgreSQL at {url}: {e}"))?;
    tokio::spawn(conn);
    Ok(client)
}

async fn redis_conn() -> Res<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(REDIS_URL).map_err(|e| format!("redis: {e}"))?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("Redis at {REDIS_URL}: {e}"))
}

async fn harness(smoke: bool) -> Res<bool> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = tollgate_bin(root)?;
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let env = BenchEnv {
        bin,
        config: root.join("config/tollgate.toml"),
        db_name: format!("tollgate_bench_{id}"),
        prefix: format!("bench{id}:"),
        dir: tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?,
    };
    let admin = pg(PG_ADMIN).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {}", env.db_name))
        .await
        .map_err(|e| format!("create database {}: {e}", env.db_name))?;
    eprintln!(
        "load: database {}, redis prefix {}",
        env.db_name, env.prefix
    );

    let mut procs: Vec<Proc> = Vec::new();
    let outcome = tokio::select! {
        r = run(&env, smoke, &mut procs) => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
    };
    for p in &mut procs {
        let _ = p.child.kill().await;
    }
    if outcome.is_err() {
        for p in &procs {
            let tail = log_tail(&p.log);
            if !tail.is_empty() {
                eprintln!("--- {} log (last lines) ---\n{tail}", p.name);
            }
        }
    }
    drop(procs);

    if let Err(e) = admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            env.db_name
        ))
        .await
    {
        eprintln!("load: could not drop {}: {e}", env.db_name);
    }
    match delete_redis_keys(&env.prefix).await {
        Ok(n) => eprintln!("load: cleaned up ({n} redis keys deleted)"),
        Err(e) => eprintln!("load: could not delete redis keys {}*: {e}", env.prefix),
    }
    outcome
}

async fn delete_redis_keys(prefix: &str) -> Res<usize> {
    let mut r = redis_conn().await?;
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    for _ in 0..100_000 {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut r)
            .await
            .map_err(|e| e.to_string())?;
        if !keys.is_empty() {
            let n: usize = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut r)
                .await
                .map_err(|e| e.to_string())?;
            deleted += n;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(deleted)
}

// ---------------------------------------------------------------------------
// The client side
// ---------------------------------------------------------------------------

struct Target {
    name: &'static str,
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    addr: String,
    auth: HeaderValue,
    /// Completed 200 answers (whole body; `[DONE]` seen for streams).
    ok: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Target {
    fn new(name: &'static str, addr: &str, token: &str) -> Res<Target> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(http);
        Ok(Target {
            name,
            client,
            uri: format!("http://{addr}/v1/chat/completions")
                .parse()
                .map_err(|e| format!("{name} address {addr}: {e}"))?,
            addr: addr.to_owned(),
            auth: HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|e| format!("token: {e}"))?,
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        })
    }

    fn request(&self, body: &'static str) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::from_static(body.as_bytes())));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::AUTHORIZATION, self.auth.clone());
        req
    }

    fn fail(&self, msg: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(msg);
        }
    }

    /// One JSON chat completion; true if it completed with 200.
    async fn call(&self) -> bool {
        let req = self.request(CHAT_BODY);
        let r = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((status, body.to_bytes()))
        })
        .await;
        match r {
            Ok(Ok((StatusCode::OK, _))) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(Ok((s, b))) => {
                let b = String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned();
                self.fail(format!("HTTP {s}: {b}"));
                false
            }
            Ok(Err(e)) => {
                self.fail(e);
                false
            }
            Err(_) => {
                self.fail("timed out after 30 s".into());
                false
            }
        }
    }

    /// One streamed completion: (time to first body byte, gaps between body frames).
    async fn call_stream(&self) -> Option<(u64, Vec<u64>)> {
        let req = self.request(STREAM_BODY);
        let t0 = Instant::now();
        let r = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let mut body = resp.into_body();
            let mut stamps = Vec::with_capacity(16);
            let mut done = false;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| e.to_string())?;
                if let Ok(d) = frame.into_data() {
                    if !d.is_empty() {
                        stamps.push(Instant::now());
                        done |= d.windows(6).any(|w| w == b"[DONE]");
                    }
                }
            }
            Ok::<_, String>((status, stamps, done))
        })
        .await;
        match r {
            Ok(Ok((StatusCode::OK, stamps, true))) if !stamps.is_empty() => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                let ttfb = nanos(stamps[0] - t0);
                let gaps = stamps.windows(2).map(|w| nanos(w[1] - w[0])).collect();
                Some((ttfb, gaps))
            }
            Ok(Ok((status, _, done))) => {
                self.fail(format!("stream: HTTP {status}, [DONE] seen: {done}"));
                None
            }
            Ok(Err(e)) => {
                self.fail(e);
                None
            }
            Err(_) => {
                self.fail("stream timed out after 30 s".into());
                None
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// p in [0, 1] of sorted nanoseconds, in µs.
fn pct(sorted: &[u64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    Some(sorted[i] as f64 / 1000.0)
}

/// Closed loop: `conc` workers, each sending back to back until `dur` is over.
/// Returns successful requests per second.
async fn closed_loop(t: &Arc<Target>, conc: usize, dur: Duration) -> (u64, f64) {
    let start = Instant::now();
    let deadline = start + dur;
    let mut set = JoinSet::new();
    for _ in 0..conc {
        let t = Arc::clone(t);
        set.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                if t.call().await {
                    n += 1;
                }
            }
            n
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r.unwrap_or(0);
    }
    let secs = start.elapsed().as_secs_f64();
    (total, total as f64 / secs)
}

/// Open loop at `rate` req/s for `dur`: a pacer thread (precise sleeps) spawns each
/// request at its scheduled time; latency is measured from that scheduled time, so
/// a slow server cannot hide its queueing (no coordinated omission).
/// Returns (sorted latencies of successes in ns, requests shed at the in-flight cap).
async fn open_loop(t: &Arc<Target>, rate: f64, dur: Duration) -> (Vec<u64>, u64) {
    let handle = tokio::runtime::Handle::current();
    let t = Arc::clone(t);
    let n = (rate * dur.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / rate);
    let paced = tokio::task::spawn_blocking(move || {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut shed = 0u64;
        let mut handles = Vec::with_capacity(n as usize);
        let start = Instant::now() + Duration::from_millis(5);
        for i in 0..n {
            let scheduled = start + period.mul_f64(i as f64);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            if in_flight.load(Ordering::Relaxed) >= OPEN_LOOP_MAX_IN_FLIGHT {
                shed += 1;
                continue;
            }
            in_flight.fetch_add(1, Ordering::Relaxed);
            let t = Arc::clone(&t);
            let in_flight = Arc::clone(&in_flight);
            handles.push(handle.spawn(async move {
                let ok = t.call().await;
                let lat = nanos(scheduled.elapsed());
                in_flight.fetch_sub(1, Ordering::Relaxed);
                ok.then_some(lat)
            }));
        }
        (handles, shed)
    })
    .await;
    let Ok((handles, shed)) = paced else {
        return (Vec::new(), 0);
    };
    let mut lat = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(Some(l)) = h.await {
            lat.push(l);
        }
    }
    lat.sort_unstable();
    (lat, shed)
}

/// Opens `n` raw TCP connections to the target, sends one request on each (32 at a
/// time), keeps them all open and returns them. Counts successes on the target.
async fn open_raw_connections(t: &Arc<Target>, n: usize) -> Vec<TcpStream> {
    let request = Arc::new(format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAuthorization: {}\r\nContent-Length: {}\r\n\r\n{CHAT_BODY}",
        t.addr,
        t.auth.to_str().unwrap_or(""),
        CHAT_BODY.len()
    ));
    let sem = Arc::new(Semaphore::new(32));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let t = Arc::clone(t);
        let sem = Arc::clone(&sem);
        let request = Arc::clone(&request);
        set.spawn(async move {
            let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
            let r = tokio::time::timeout(Duration::from_secs(10), async {
                let mut s = TcpStream::connect(&t.addr)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = s.set_nodelay(true);
                s.write_all(request.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let status = read_raw_response(&mut s).await?;
                Ok::<_, String>((s, status))
            })
            .await
            .map_err(|_| "raw connection: timed out".to_owned())?;
            r
        });
    }
    let mut conns = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok((s, 200))) => {
                t.ok.fetch_add(1, Ordering::Relaxed);
                conns.push(s);
            }
            Ok(Ok((s, status))) => {
                t.fail(format!("raw connection: HTTP {status}"));
                conns.push(s);
            }
            Ok(Err(e)) => t.fail(e),
            Err(e) => t.fail(e.to_string()),
        }
    }
    conns
}

/// Reads one HTTP/1.1 response (Content-Length or chunked); returns its status.
async fn read_raw_response(s: &mut TcpStream) -> Res<u16> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Err("raw connection: closed before the response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("raw connection: no status line")?;
    let content_length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    loop {
        let body = &buf[head_end..];
        let complete = match content_length {
            Some(len) => body.len() >= len,
            None if chunked => body.ends_with(b"0\r\n\r\n"),
            None => true,
        };
        if complete {
            return Ok(status);
        }
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("raw connection: closed mid-body".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------
// /proc and Redis CPU accounting
// ---------------------------------------------------------------------------

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command name: field 3 (state) is f[0]; utime is field 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident set size of a process, in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Redis server CPU (user + sys) in seconds, from INFO cpu.
async fn redis_cpu(r: &mut redis::aio::MultiplexedConnection) -> Option<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(r).await.ok()?;
    let get = |k: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some(get("used_cpu_user:")? + get("used_cpu_sys:")?)
}

/// CPU µs per request between two snapshots.
struct CpuPerRequest {
    middle: Option<f64>,
    mock: Option<f64>,
    me: Option<f64>,
    redis: Option<f64>,
}

impl CpuPerRequest {
    fn new(before: &CpuSnap, after: &CpuSnap, requests: u64, tck: f64) -> CpuPerRequest {
        let n = requests as f64;
        let ticks = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) if requests > 0 => Some(b.saturating_sub(a) as f64 * 1e6 / tck / n),
            _ => None,
        };
        CpuPerRequest {
            middle: ticks(before.middle, after.middle),
            mock: ticks(before.mock, after.mock),
            me: ticks(before.me, after.me),
            redis: match (before.redis, after.redis) {
                (Some(a), Some(b)) if requests > 0 => Some((b - a).max(0.0) * 1e6 / n),
                _ => None,
            },
        }
    }
}

struct CpuSnap {
    middle: Option<u64>,
    mock: Option<u64>,
    me: Option<u64>,
    redis: Option<f64>,
}

async fn cpu_snap(
    middle: Option<u32>,
    mock: u32,
    r: &mut redis::aio::MultiplexedConnection,
) -> CpuSnap {
    CpuSnap {
        middle: middle.and_then(|p| cpu_ticks(&p.to_string())),
        mock: cpu_ticks(&mock.to_string()),
        me: cpu_ticks("self"),
        redis: redis_cpu(r).await,
    }
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

struct Plan {
    warmup: usize,
    latency_n: usize,
    throughput: Duration,
    open: Duration,
    streams: usize,
}

#[derive(Default, Clone)]
struct Stats {
    lat: [Option<f64>; 3],
    tput16: Option<f64>,
    tput64: Option<f64>,
    open: [Option<f64>; 2],
    open_shed: Option<f64>,
    open2: [Option<f64>; 2],
    open2_shed: Option<f64>,
    ttfb: [Option<f64>; 2],
    gap: [Option<f64>; 2],
    cpu16_middle: Option<f64>,
    cpu16_redis: Option<f64>,
    cpu_middle: Option<f64>,
    cpu_mock: Option<f64>,
    cpu_redis: Option<f64>,
    cpu_client: Option<f64>,
    rss_idle: Option<f64>,
    rss_conns: Option<f64>,
    rss_after: Option<f64>,
    rss_settled: Option<f64>,
    errors: Option<f64>,
}

async fn run(env: &BenchEnv, smoke: bool, procs: &mut Vec<Proc>) -> Res<bool> {
    let plan = if smoke {
        Plan {
            warmup: 20,
            latency_n: 300,
            throughput: Duration::from_millis(400),
            open: Duration::from_millis(400),
            streams: 10,
        }
    } else {
        Plan {
            warmup: 300,
            latency_n: 3000,
            throughput: Duration::from_secs(5),
            open: Duration::from_secs(5),
            streams: 200,
        }
    };
    let started = Instant::now();
    // `LOAD_PHASES=latency,throughput,open,stream,rss` runs only those phases (all by
    // default), for profiling one phase; the rows check always runs.
    let phases = std::env::var("LOAD_PHASES").unwrap_or_default();
    let want = |phase: &str| phases.is_empty() || phases.split(',').any(|p| p.trim() == phase);

    // Database and user.
    env.cli(&["migrate"]).await?;
    env.cli(&["seed"]).await?;
    env.cli(&["user", "create", "--email", EMAIL, "--no-subscription"])
        .await?;
    env.cli(&[
        "credits",
        "grant",
        "--email",
        EMAIL,
        "--amount",
        &GRANT.to_string(),
    ])
    .await?;
    let token = env
        .cli(&["token", "issue", "--email", EMAIL, "--ttl", "3600"])
        .await?;

    // Processes: mock, gateway, bare proxy.
    let mut mock_cmd = Command::new(&env.bin);
    mock_cmd
        .args([
            "mock-provider",
            "--listen",
            "127.0.0.1:0",
            "--completion-tokens",
            "16",
            "--chunks",
            "8",
            "--chunk-interval-ms",
            "2",
        ])
        .env("RUST_LOG", "warn");
    let mock = spawn_listening("mock", mock_cmd, env.dir.path()).await?;
    let (mock_pid, mock_addr) = (mock.pid, mock.addr.clone());
    procs.push(mock);

    let mut gw_cmd = env.command(&["serve"]);
    gw_cmd.env("TOLLGATE__SERVER__LISTEN", "127.0.0.1:0").env(
        "TOLLGATE__PROVIDERS__OPENAI__BASE_URL",
        format!("http://{mock_addr}/v1"),
    );
    let gw = spawn_listening("gateway", gw_cmd, env.dir.path()).await?;
    let (gw_pid, gw_addr) = (gw.pid, gw.addr.clone());
    procs.push(gw);

    let me = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut bare_cmd = Command::new(me);
    bare_cmd.arg("--bare-proxy").arg(&mock_addr);
    let bare = spawn_listening("bare-proxy", bare_cmd, env.dir.path()).await?;
    let (bare_pid, bare_addr) = (bare.pid, bare.addr.clone());
    procs.push(bare);

    let targets = [
        Arc::new(Target::new("direct", &mock_addr, &token)?),
        Arc::new(Target::new("bare", &bare_addr, &token)?),
        Arc::new(Target::new("full", &gw_addr, &token)?),
    ];
    let middle_pid = [None, Some(bare_pid), Some(gw_pid)];
    let mut stats: [Stats; 3] = Default::default();
    let mut redis = redis_conn().await?;
    let db = pg(&env.db_url()).await?;
    let tck = clk_tck();

    // RSS idle, then with PROBE_CONNS keep-alive connections each after one request.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in (1..3).filter(|_| want("rss")) {
        let pid = middle_pid[i].unwrap_or(0);
        stats[i].rss_idle = rss_mib(pid);
        eprintln!("load: {} with {PROBE_CONNS} connections", targets[i].name);
        let conns = open_raw_connections(&targets[i], PROBE_CONNS).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        stats[i].rss_conns = rss_mib(pid);
        if conns.len() < PROBE_CONNS {
            eprintln!(
                "load: {}: only {} of {PROBE_CONNS} connections opened",
                targets[i].name,
                conns.len()
            );
        }
        drop(conns);
    }

    // Latency at concurrency 1.
    for (t, s) in targets
        .iter()
        .zip(stats.iter_mut())
        .filter(|_| want("latency"))
    {
        quiesce(&db, t).await?;
        eprintln!("load: {} latency c=1", t.name);
        for _ in 0..plan.warmup {
            t.call().await;
        }
        let mut lat = Vec::with_capacity(plan.latency_n);
        for _ in 0..plan.latency_n {
            let t0 = Instant::now();
            if t.call().await {
                lat.push(nanos(t0.elapsed()));
            }
        }
        lat.sort_unstable();
        s.lat = [pct(&lat, 0.50), pct(&lat, 0.99), pct(&lat, 0.999)];
    }

    // Throughput at 16 and 64, with CPU per request.
    for conc in [16, 64].into_iter().filter(|_| want("throughput")) {
        for ((t, s), mid) in targets.iter().zip(stats.iter_mut()).zip(middle_pid) {
            quiesce(&db, t).await?;
            eprintln!("load: {} throughput c={conc}", t.name);
            let before = cpu_snap(mid, mock_pid, &mut redis).await;
            let (n, rps) = closed_loop(t, conc, plan.throughput).await;
            let after = cpu_snap(mid, mock_pid, &mut redis).await;
            let cpu = CpuPerRequest::new(&before, &after, n, tck);
            if conc == 16 {
                s.tput16 = Some(rps);
                s.cpu16_middle = cpu.middle;
                s.cpu16_redis = cpu.redis;
            } else {
                s.tput64 = Some(rps);
                s.cpu_middle = cpu.middle;
                s.cpu_mock = cpu.mock;
                s.cpu_client = cpu.me;
                s.cpu_redis = cpu.redis;
            }
        }
    }

    // Open loop at a quarter of the direct target's c=64 throughput, then at half the
    // gateway's (a rate every target can sustain).
    let rate = (stats[0].tput64.unwrap_or(0.0) * 0.25).clamp(10.0, OPEN_LOOP_MAX_RATE);
    let rate2 = (stats[2].tput64.unwrap_or(0.0) * 0.5).clamp(10.0, OPEN_LOOP_MAX_RATE);
    for (t, s) in targets
        .iter()
        .zip(stats.iter_mut())
        .filter(|_| want("open"))
    {
        quiesce(&db, t).await?;
        eprintln!("load: {} open loop at {rate2:.0} req/s", t.name);
        let (lat, shed) = open_loop(t, rate2, plan.open).await;
        s.open2 = [pct(&lat, 0.50), pct(&lat, 0.99)];
        s.open2_shed = Some(shed as f64);
        quiesce(&db, t).await?;
        eprintln!("load: {} open loop at {rate:.0} req/s", t.name);
        let (lat, shed) = open_loop(t, rate, plan.open).await;
        s.open = [pct(&lat, 0.50), pct(&lat, 0.99)];
        s.open_shed = Some(shed as f64);
    }

    // Streaming at concurrency 1.
    for (t, s) in targets
        .iter()
        .zip(stats.iter_mut())
        .filter(|_| want("stream"))
    {
        quiesce(&db, t).await?;
        eprintln!("load: {} streaming", t.name);
        let mut ttfb = Vec::with_capacity(plan.streams);
        let mut gaps = Vec::with_capacity(plan.streams * 12);
        for _ in 0..plan.streams {
            if let Some((first, g)) = t.call_stream().await {
                ttfb.push(first);
                gaps.extend(g);
            }
        }
        ttfb.sort_unstable();
        gaps.sort_unstable();
        s.ttfb = [pct(&ttfb, 0.50), pct(&ttfb, 0.99)];
        s.gap = [pct(&gaps, 0.50), pct(&gaps, 0.99)];
    }

    // Totals, then RSS after the load with the client pools closed.
    let successes = targets[2].ok.load(Ordering::Relaxed);
    for (t, s) in targets.iter().zip(stats.iter_mut()) {
        let errors = t.errors.load(Ordering::Relaxed);
        s.errors = Some(errors as f64);
        if errors > 0 {
            let first = t
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default();
            eprintln!("load: {}: {errors} failed requests; first: {first}", t.name);
        }
    }
    drop(targets);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in (1..3).filter(|_| want("rss")) {
        stats[i].rss_after = middle_pid[i].and_then(rss_mib);
    }
    // And once idle for a while: whether memory goes back after the burst.
    if want("rss") {
        tokio::time::sleep(Duration::from_millis(if smoke { 500 } else { 3000 })).await;
        for i in 1..3 {
            stats[i].rss_settled = middle_pid[i].and_then(rss_mib);
        }
    }

    // Every successful metered request has exactly one usage row.
    eprintln!("load: waiting for the usage flusher ({successes} successes)");
    let rows = wait_for_rows(&db, successes, Duration::from_secs(30), true).await?;
    // One lost row and one recorded twice (same id, another created_at) would cancel
    // out in the count: the ids must be distinct too.
    let distinct: bool = db
        .query_one(
            "SELECT count(DISTINCT id) = count(*) FROM usage_history",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .map_err(|e| format!("count distinct ids: {e}"))?;
    if !distinct {
        eprintln!("load: a request id has more than one usage row");
    }
    let rows_ok = u64::try_from(rows).ok() == Some(successes) && successes > 0 && distinct;

    let report = render(
        &stats,
        [rate, rate2],
        &plan,
        smoke,
        rows,
        successes,
        rows_ok,
    );
    println!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/load-report.md");
    if let Err(e) = std::fs::create_dir_all(out.parent().unwrap_or(Path::new(".")))
        .and_then(|()| std::fs::write(&out, &report))
    {
        eprintln!("load: could not write {}: {e}", out.display());
    } else {
        eprintln!(
            "load: report written to {} ({:.1} s)",
            out.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(rows_ok)
}

/// Before a phase on the gateway: lets the flusher catch up with the previous phase's
/// usage (≤ 10 s) so its PostgreSQL writes do not eat into this phase's CPU.
async fn quiesce(db: &tokio_postgres::Client, t: &Target) -> Res<()> {
    if t.name == "full" {
        let done = t.ok.load(Ordering::Relaxed);
        wait_for_rows(db, done, Duration::from_secs(10), false).await?;
    }
    Ok(())
}

/// Waits (≤ `timeout`) until `usage_history` holds `want` rows; with `confirm`, checks
/// again after a pause that no late extra row arrives. Returns the last count.
async fn wait_for_rows(
    db: &tokio_postgres::Client,
    want: u64,
    timeout: Duration,
    confirm: bool,
) -> Res<i64> {
    let want = i64::try_from(want).unwrap_or(i64::MAX);
    let count = || async {
        db.query_one("SELECT count(*) FROM usage_history", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .map_err(|e| format!("count usage_history: {e}"))
    };
    let deadline = Instant::now() + timeout;
    let mut last = -1;
    let mut unchanged_since = Instant::now();
    loop {
        let n = count().await?;
        if n == want {
            if !confirm {
                return Ok(n);
            }
            // A late extra row would show a double record.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return count().await;
        }
        if n != last {
            last = n;
            unchanged_since = Instant::now();
        } else if n > want && unchanged_since.elapsed() > Duration::from_secs(2) {
            return Ok(n);
        }
        if Instant::now() > deadline {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Kind {
    /// µs; comparisons are added µs (full − direct, bare − direct).
    Latency,
    /// req/s; comparisons are ratios full/direct, full/bare.
    Rate,
    /// a per-process cost; comparisons are ratios (no direct value for the middle process).
    Cost,
    /// a count; no comparison.
    Count,
}

fn fmt_val(v: Option<f64>, kind: Kind) -> String {
    match (v, kind) {
        (None, _) => "—".into(),
        (Some(v), Kind::Count) => format!("{v:.0}"),
        (Some(v), Kind::Cost) if v < 100.0 => format!("{v:.1}"),
        (Some(v), _) => format!("{v:.0}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn delta(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:+.0} µs", a - b),
        _ => "—".into(),
    }
}

fn row(out: &mut String, label: &str, v: [Option<f64>; 3], kind: Kind) {
    let (c1, c2) = match kind {
        Kind::Latency => (delta(v[2], v[0]), delta(v[1], v[0])),
        Kind::Rate | Kind::Cost => (ratio(v[2], v[0]), ratio(v[2], v[1])),
        Kind::Count => (String::new(), String::new()),
    };
    out.push_str(&format!(
        "| {label} | {} | {} | {} | {c1} | {c2} |\n",
        fmt_val(v[0], kind),
        fmt_val(v[1], kind),
        fmt_val(v[2], kind)
    ));
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    format!("Machine: {cpus} CPUs (nproc), {model}, Linux {kernel}")
}

fn render(
    s: &[Stats; 3],
    rates: [f64; 2],
    plan: &Plan,
    smoke: bool,
    rows: i64,
    successes: u64,
    rows_ok: bool,
) -> String {
    use Kind::{Cost, Count, Latency, Rate};
    let g = |f: fn(&Stats) -> Option<f64>| [f(&s[0]), f(&s[1]), f(&s[2])];
    let (n, streams, secs) = (plan.latency_n, plan.streams, plan.throughput.as_secs_f64());
    let [r1, r2] = rates;
    let table: Vec<(String, [Option<f64>; 3], Kind)> = vec![
        (
            format!("latency c=1 p50 (µs, n={n})"),
            g(|s| s.lat[0]),
            Latency,
        ),
        ("latency c=1 p99 (µs)".into(), g(|s| s.lat[1]), Latency),
        ("latency c=1 p99.9 (µs)".into(), g(|s| s.lat[2]), Latency),
        (
            format!("throughput c=16 (req/s, {secs} s)"),
            g(|s| s.tput16),
            Rate,
        ),
        ("throughput c=64 (req/s)".into(), g(|s| s.tput64), Rate),
        (
            format!("open loop {r1:.0} req/s p50 (µs)"),
            g(|s| s.open[0]),
            Latency,
        ),
        ("open loop p99 (µs)".into(), g(|s| s.open[1]), Latency),
        (
            format!("open loop shed (> {OPEN_LOOP_MAX_IN_FLIGHT} in flight)"),
            g(|s| s.open_shed),
            Count,
        ),
        (
            format!("open loop {r2:.0} req/s p50 (µs)"),
            g(|s| s.open2[0]),
            Latency,
        ),
        ("open loop p99 (µs)".into(), g(|s| s.open2[1]), Latency),
        ("open loop shed".into(), g(|s| s.open2_shed), Count),
        (
            format!("stream TTFB p50 (µs, n={streams})"),
            g(|s| s.ttfb[0]),
            Latency,
        ),
        ("stream TTFB p99 (µs)".into(), g(|s| s.ttfb[1]), Latency),
        (
            "stream inter-chunk gap p50 (µs)".into(),
            g(|s| s.gap[0]),
            Latency,
        ),
        (
            "stream inter-chunk gap p99 (µs)".into(),
            g(|s| s.gap[1]),
            Latency,
        ),
        (
            "CPU µs/req c=16: proxy or gateway".into(),
            g(|s| s.cpu16_middle),
            Cost,
        ),
        ("CPU µs/req c=16: redis".into(), g(|s| s.cpu16_redis), Cost),
        (
            "CPU µs/req c=64: proxy or gateway".into(),
            g(|s| s.cpu_middle),
            Cost,
        ),
        ("CPU µs/req c=64: mock".into(), g(|s| s.cpu_mock), Cost),
        ("CPU µs/req c=64: redis".into(), g(|s| s.cpu_redis), Cost),
        (
            "CPU µs/req c=64: load client".into(),
            g(|s| s.cpu_client),
            Cost,
        ),
        ("RSS MiB idle".into(), g(|s| s.rss_idle), Cost),
        (
            format!("RSS MiB with {PROBE_CONNS} keep-alive conns"),
            g(|s| s.rss_conns),
            Cost,
        ),
        ("RSS MiB after load".into(), g(|s| s.rss_after), Cost),
        (
            format!("RSS MiB {} s later, idle", if smoke { 0.5 } else { 3.0 }),
            g(|s| s.rss_settled),
            Cost,
        ),
        (
            "failed requests (all phases)".into(),
            g(|s| s.errors),
            Count,
        ),
    ];
    let mut o = format!(
        "## tollgate load{}\n\n",
        if smoke {
            " (smoke run: counts too small for the numbers to mean anything)"
        } else {
            ""
        }
    );
    o.push_str("| metric | direct | bare | full | full/direct (Δ full−direct) | full/bare (Δ bare−direct) |\n");
    o.push_str("|---|---:|---:|---:|---:|---:|\n");
    for (label, v, kind) in table {
        row(&mut o, &label, v, kind);
    }
    o.push_str(
        "\nRatios (×) for throughput, CPU and RSS; latency rows show added µs: full − direct, and bare − direct.\n\
         direct: client → mock; bare: client → minimal hyper proxy → mock; full: client → gateway → mock.\n\
         Streams: 8 content chunks, 2 ms apart, usage requested; the load client shares the machine.\n\n",
    );
    o.push_str(&machine());
    o.push_str(&format!(
        "\n\nusage rows == successes, one row per id: {} ({rows}, {successes})\n",
        if rows_ok { "yes" } else { "no" }
    ));
    o
}
