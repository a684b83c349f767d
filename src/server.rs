//! Stage 1, accept, and the gateway's lifecycle: build the state, start the background
//! tasks (model refresh, partition upkeep, usage flusher), serve until the shutdown
//! future resolves, then drain: stop accepting, let in-flight requests finish within
//! the grace period, cut those still running (each settles what it received), and
//! flush the usage they settled.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::authenticate::Authenticator;
use crate::config::Config;
use crate::db::Db;
use crate::flush::Flusher;
use crate::ledger::Ledger;
use crate::route::Models;
use crate::state::{AppState, Inner};
use crate::upstream::Upstream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long requests cut at the end of the grace period get to settle.
const SHUTDOWN_CUT_WAIT: Duration = Duration::from_secs(5);

/// Connects to Redis, retrying for a while (the gateway may start before it).
async fn connect_ledger(cfg: &Config) -> Result<Ledger, BoxError> {
    let mut last = None;
    for _ in 0..20 {
        match Ledger::connect(&cfg.redis.url, &cfg.redis.key_prefix, cfg.redis.buckets).await {
            Ok(l) => return Ok(l),
            Err(e) => {
                tracing::warn!(error = %e, "redis not reachable yet");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(format!(
        "redis at {}: {}",
        redact(&cfg.redis.url),
        last.map(|e| e.to_string()).unwrap_or_default()
    )
    .into())
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// Builds the shared state (connections, keys, the model cache).
pub async fn build_state(cfg: Config) -> Result<AppState, BoxError> {
    let db = Db::new(&cfg.database)?;
    let ledger = connect_ledger(&cfg).await?;
    let auth = Authenticator::from_config(&cfg.auth)?;
    let workers = crate::worker::count(cfg.worker_threads);
    let upstream = Upstream::new(&cfg.providers, workers)?;
    let models = Models::default();
    let rate_limits = crate::rate_limit::RateLimits::new(&cfg.rate_limits);
    match models.refresh(&db).await {
        Ok(n) => tracing::info!(models = n, "model table loaded"),
        Err(e) => {
            tracing::warn!(error = %e, "model table not loaded yet; retrying in the background")
        }
    }
    let preferences = crate::preferences::PreferenceCache::new(&cfg.preferences);
    let drains = tokio::sync::Semaphore::new(cfg.disconnect_drains as usize);
    let (orphans, orphans_rx) = tokio::sync::mpsc::unbounded_channel();
    let hashers = crate::oauth::password::Hashers::new(cfg.passwords.max_queued);
    Ok(AppState(Arc::new(Inner {
        cfg,
        db,
        ledger,
        hot: crate::worker::PerWorker::new(workers, std::sync::OnceLock::new),
        auth,
        models,
        upstream,
        rate_limits,
        preferences,
        drains,
        hashers,
        draining: AtomicBool::new(false),
        tasks: TaskTracker::new(),
        cut: tokio_util::sync::CancellationToken::new(),
        orphans,
        orphans_rx: tokio::sync::Mutex::new(orphans_rx),
    })))
}

/// Serves on `listener` until `shutdown` resolves; returns once drained.
///
/// The lifecycle, in the order of the body (each step names why it comes where it does):
///
/// 1. [`Background::start`]: metrics upkeep, model refresh and partition upkeep,
///    revocation reloads, the orphan task, the usage flusher.
/// 2. [`Workers::start`]: the data plane's threads.
/// 3. [`accept_until`] `shutdown` resolves: serve.
/// 4. Draining: `/readyz` fails from now on, and [`accept_until`] the end of
///    `server.shutdown_delay` keeps serving while load balancers see `/readyz` fail and
///    move traffic away.
/// 5. The listener closes, then [`Workers::close`]: closing their channels ends the
///    workers' accept loops; their connections go on.
/// 6. [`drain_requests`]: in-flight requests finish within `server.shutdown_grace`; at
///    its end those still running are cut, and get [`SHUTDOWN_CUT_WAIT`] to settle.
/// 7. [`Background::settle_orphans`]: what dropped tickets left is settled before the
///    flusher's last pass (step 8).
/// 8. [`Background::stop`]: the flusher's last pass; the other background tasks end.
/// 9. [`ClosedWorkers::join`]: the workers drove their connections and request tails
///    until now, and the connections they opened for the shared pools (PostgreSQL, the
///    shared Redis connection's reconnects) are driven by them too: the flusher
///    (step 8) must finish before they stop.
/// 10. [`settle_last_orphans`]: tickets dropped as the workers stopped; their charges
///     go to Redis, where the next flusher of any gateway writes them to PostgreSQL.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let mut background = Background::start(&state);
    let workers = Workers::start(&state)?;
    let dispatch = |stream, peer| workers.dispatch(stream, peer);
    accept_until(&listener, dispatch, shutdown).await;
    state.draining.store(true, Ordering::SeqCst);
    if !state.cfg.shutdown_delay.is_zero() {
        tracing::info!(delay = ?state.cfg.shutdown_delay, "draining: /readyz now fails");
        accept_until(
            &listener,
            dispatch,
            tokio::time::sleep(state.cfg.shutdown_delay),
        )
        .await;
    }
    drop(listener);
    let (workers, graceful) = workers.close();
    let grace = state.cfg.shutdown_grace;
    drain_requests(&state, graceful, grace).await;
    background.settle_orphans(grace).await;
    background.stop(grace).await;
    workers.join().await;
    settle_last_orphans(&state).await;
    tracing::info!("stopped");
    Ok(())
}

/// Hands each connection `listener` accepts to `dispatch` until `until` resolves.
async fn accept_until(
    listener: &TcpListener,
    dispatch: impl Fn(TcpStream, SocketAddr),
    until: impl Future<Output = ()>,
) {
    tokio::pin!(until);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => dispatch(stream, peer),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = &mut until => break,
        }
    }
}

/// Lets the requests in flight finish within `grace`; at its end cuts those still
/// running, which get [`SHUTDOWN_CUT_WAIT`] to settle.
async fn drain_requests(state: &AppState, graceful: Arc<GracefulShutdown>, grace: Duration) {
    tracing::info!("shutting down: draining in-flight requests");
    state.tasks.close();
    let drained = tokio::time::timeout(grace, async {
        // Each worker lets go of its handle once its accept loop has ended.
        let mut g = graceful;
        let graceful = loop {
            match Arc::try_unwrap(g) {
                Ok(x) => break x,
                Err(back) => {
                    g = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        graceful.shutdown().await;
        state.tasks.wait().await;
    })
    .await;
    if drained.is_err() {
        // Every request still in flight settles what it received (an estimate capped at
        // its hold, marked `shutdown_cut`) or releases its hold, and ends.
        tracing::warn!("grace period over with requests still in flight: cutting them");
        state.cut.cancel();
        if tokio::time::timeout(SHUTDOWN_CUT_WAIT, state.tasks.wait())
            .await
            .is_err()
        {
            tracing::error!("requests still running after the shutdown cut; their tickets settle as the workers stop");
        }
    }
}

/// Tickets dropped as the workers stopped: their charges go to Redis, where the next
/// flusher of any gateway writes them to PostgreSQL.
async fn settle_last_orphans(state: &AppState) {
    let mut rx = state.orphans_rx.lock().await;
    while let Ok(o) = rx.try_recv() {
        crate::settle::handle_orphan(state, o).await;
    }
}

/// The tasks beside the data plane, on the main runtime, and their stops. Dropped
/// without [`Background::stop`] (startup failed), the stops close and the tasks end.
struct Background {
    /// Ends the periodic tasks and the flusher (after its last pass).
    stop: watch::Sender<bool>,
    periodic: TaskTracker,
    flusher: JoinHandle<()>,
    /// Ends the orphan task (after it has settled what is queued).
    orphans_stop: watch::Sender<bool>,
    orphans: JoinHandle<()>,
}

impl Background {
    fn start(state: &AppState) -> Background {
        let metrics = crate::telemetry::install();
        let (stop, stop_rx) = watch::channel(false);
        let periodic = TaskTracker::new();
        // Histogram samples wait in the recorder until upkeep folds them in: without a
        // scrape they would pile up, so fold them in every few seconds.
        if let Some(handle) = metrics {
            periodic.spawn(metrics_upkeep(handle, stop_rx.clone()));
        }
        // Present (at zero) from the start, so an alert on its increase has a series.
        metrics::counter!("tollgate_partition_upkeep_failures_total").increment(0);
        periodic.spawn(models_and_partitions_upkeep(state.clone(), stop_rx.clone()));
        if state.cfg.billing.enabled {
            periodic.spawn(billing_job(state.clone(), stop_rx.clone()));
        }
        if let Some(every) = state.cfg.billing.reconcile_interval {
            periodic.spawn(reconcile_job(state.clone(), every, stop_rx.clone()));
        }
        // Disabled users and revoked sign-ins, reloaded into memory for the request path.
        periodic.spawn(crate::oauth::revocation::run(
            state.clone(),
            stop_rx.clone(),
        ));
        let (orphans_stop, orphans_stopped) = watch::channel(false);
        let orphans = tokio::spawn(settle_orphans_until(state.clone(), orphans_stopped));
        // The usage flusher.
        let flusher = Flusher::new(
            state.ledger.clone(),
            state.db.clone(),
            state.cfg.flush.clone(),
        );
        let flusher = tokio::spawn(flusher.run(stop_rx));
        Background {
            stop,
            periodic,
            flusher,
            orphans_stop,
            orphans,
        }
    }

    /// Ends the orphan task once it has settled what is queued, within `grace`.
    async fn settle_orphans(&mut self, grace: Duration) {
        let _ = self.orphans_stop.send(true);
        if tokio::time::timeout(grace, &mut self.orphans)
            .await
            .is_err()
        {
            tracing::error!("orphaned requests still being settled at the end of the grace period");
            self.orphans.abort();
        }
    }

    /// Ends the periodic tasks and the flusher (after its last pass), within `grace`.
    async fn stop(self, grace: Duration) {
        let _ = self.stop.send(true);
        self.periodic.close();
        let _ = tokio::time::timeout(grace, async {
            let _ = self.flusher.await;
            self.periodic.wait().await;
        })
        .await;
    }
}

/// Folds the recorder's histogram samples in every few seconds, until `stop` changes.
async fn metrics_upkeep(handle: &'static PrometheusHandle, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(crate::telemetry::UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            _ = stop.changed() => break,
        }
    }
}

/// Model refresh and partition upkeep (and the rate limits' housekeeping), every
/// `models_refresh`, until `stop` changes.
async fn models_and_partitions_upkeep(state: AppState, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(state.cfg.models_refresh);
    let mut partitions_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        if let Err(e) = state.models.refresh(&state.db).await {
            tracing::warn!(error = %e, "model refresh failed");
        }
        state.rate_limits.housekeeping();
        // Hourly; after a failure, again at the next tick.
        if tokio::time::Instant::now() >= partitions_at
            && crate::db::partition_upkeep(&state.db, state.cfg.database.partitions_ahead_months)
                .await
        {
            partitions_at = tokio::time::Instant::now() + Duration::from_secs(3600);
        }
    }
}

/// The billing run (`lifecycle::billing_run`) every `billing.interval_ms`, on one
/// replica at a time (the run's advisory lock; a replica that finds it taken skips
/// that turn), until `stop` changes.
async fn billing_job(state: AppState, mut stop: watch::Receiver<bool>) {
    metrics::counter!("tollgate_billing_runs_total", "outcome" => "failed").increment(0);
    let mut tick = tokio::time::interval(state.cfg.billing.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let run = crate::lifecycle::billing_run(
            &state.db,
            &state.ledger,
            &state.cfg.tiers,
            &state.cfg.billing,
            chrono::Utc::now(),
            false,
        );
        let outcome = tokio::select! {
            r = run => r,
            _ = stop.changed() => break,
        };
        let label = match outcome {
            Ok(Some(r)) => {
                if r != crate::lifecycle::BillingReport::default() {
                    tracing::info!(?r, "billing run");
                }
                "ran"
            }
            Ok(None) => "skipped",
            Err(e) => {
                tracing::warn!(error = %e, "billing run failed");
                "failed"
            }
        };
        metrics::counter!("tollgate_billing_runs_total", "outcome" => label).increment(1);
    }
}

/// Reconciliation (`reconcile::reconcile`, report only) every `every`, on one replica
/// at a time (an advisory lock; a replica that finds it taken skips that turn). Sets
/// `tollgate_ledger_drift_credits` (Σ |drift|) and `tollgate_ledger_drift_users` on the
/// replica that ran; alert on their maximum across replicas.
async fn reconcile_job(state: AppState, every: Duration, mut stop: watch::Receiver<bool>) {
    const RECONCILE_LOCK: i64 = 0x7467_7265_636f; // "tgreco"
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let run = async {
            let mut conn = state.db.get().await?;
            let lock = conn.transaction().await?;
            let got: bool = lock
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RECONCILE_LOCK])
                .await?
                .get(0);
            if !got {
                return Ok(None);
            }
            let r = crate::reconcile::reconcile(&state.db, &state.ledger, None, false).await?;
            lock.commit().await?;
            Ok::<_, BoxError>(Some(r))
        };
        let outcome = tokio::select! {
            r = run => r,
            _ = stop.changed() => break,
        };
        match outcome {
            Ok(Some(r)) => {
                metrics::gauge!("tollgate_ledger_drift_credits").set(r.drift_credits() as f64);
                metrics::gauge!("tollgate_ledger_drift_users").set(r.drifting.len() as f64);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "reconciliation failed"),
        }
    }
}

/// The orphan task. Requests whose ticket was dropped unsettled (a panic, an aborted
/// task, the shutdown cut): settle what they received, or give their hold back. Runs
/// until `stop` changes, then settles what is queued.
async fn settle_orphans_until(state: AppState, mut stop: watch::Receiver<bool>) {
    let mut rx = state.orphans_rx.lock().await;
    loop {
        tokio::select! {
            o = rx.recv() => match o {
                Some(o) => crate::settle::handle_orphan(&state, o).await,
                None => break,
            },
            _ = stop.changed() => break,
        }
    }
    while let Ok(o) = rx.try_recv() {
        crate::settle::handle_orphan(&state, o).await;
    }
}

/// The data plane's threads, and what they share.
struct Workers {
    running: Vec<Worker>,
    /// Watches every connection the workers serve, for the drain.
    graceful: Arc<GracefulShutdown>,
    /// Tells the threads the gateway has drained (they drive the pools until then).
    done: watch::Sender<bool>,
}

impl Workers {
    /// Starts `server.worker_threads` of them; an error if none started.
    fn start(state: &AppState) -> Result<Workers, BoxError> {
        let app = crate::app::router(state.clone());
        let graceful = Arc::new(GracefulShutdown::new());
        let (done, done_rx) = watch::channel(false);
        let mut running = Vec::new();
        for i in 1..=crate::worker::count(state.cfg.worker_threads) {
            match Worker::start(
                i,
                state.clone(),
                app.clone(),
                graceful.clone(),
                done_rx.clone(),
            ) {
                Ok(w) => running.push(w),
                Err(e) => tracing::warn!(worker = i, error = %e, "worker thread did not start"),
            }
        }
        if running.is_empty() {
            return Err("no worker thread started".into());
        }
        Ok(Workers {
            running,
            graceful,
            done,
        })
    }

    /// Hands an accepted connection to the worker serving the fewest (a worker whose
    /// thread is gone refuses it, and the next one is tried).
    fn dispatch(&self, stream: TcpStream, peer: SocketAddr) {
        let mut conn = match stream.into_std() {
            Ok(std) => Some((std, peer)),
            Err(e) => {
                tracing::warn!(error = %e, "accepted connection unusable");
                return;
            }
        };
        let mut order: Vec<&Worker> = self.running.iter().collect();
        order.sort_by_key(|w| w.open.load(Ordering::Relaxed));
        for w in order {
            let Some(c) = conn.take() else { return };
            w.open.fetch_add(1, Ordering::Relaxed);
            match w.streams.send(c) {
                Ok(()) => {
                    metrics::counter!("tollgate_worker_connections_total", "worker" => w.label.clone())
                        .increment(1);
                    return;
                }
                Err(back) => {
                    w.open.fetch_sub(1, Ordering::Relaxed);
                    tracing::error!(worker = w.index, "worker thread gone");
                    conn = Some(back.0);
                }
            }
        }
        tracing::error!("no worker thread left; connection dropped");
    }

    /// Closing their channels ends the workers' accept loops; their connections go on.
    /// Also gives back the connections' watch, for [`drain_requests`].
    fn close(self) -> (ClosedWorkers, Arc<GracefulShutdown>) {
        let (threads, senders): (Vec<_>, Vec<_>) = self
            .running
            .into_iter()
            .map(|w| (w.thread, w.streams))
            .unzip();
        drop(senders);
        let closed = ClosedWorkers {
            threads,
            done: self.done,
        };
        (closed, self.graceful)
    }
}

/// Worker threads that accept no more connections, still driving the open ones, the
/// request tails and the connections they opened for the shared pools.
struct ClosedWorkers {
    threads: Vec<std::thread::JoinHandle<()>>,
    done: watch::Sender<bool>,
}

impl ClosedWorkers {
    /// Lets the threads go and waits for them.
    async fn join(self) {
        let _ = self.done.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// A data-plane thread: a current-thread runtime serving the connections sent to it.
struct Worker {
    index: usize,
    /// `index` as a metric label.
    label: String,
    streams: tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, std::net::SocketAddr)>,
    /// Connections it is serving (for picking the least busy).
    open: Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    fn start(
        index: usize,
        state: AppState,
        app: axum::Router,
        graceful: Arc<GracefulShutdown>,
        mut done: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<Worker> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(std::net::TcpStream, std::net::SocketAddr)>();
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = open.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tollgate-w{index}"))
            .spawn(move || {
                crate::worker::set_index(index);
                rt.block_on(async move {
                    match state.ledger.for_this_thread().await {
                        Ok(l) => {
                            let _ = state.hot.of(index).set(l);
                        }
                        Err(e) => {
                            tracing::warn!(worker = index, error = %e, "worker uses the shared redis connection")
                        }
                    }
                    let builder = auto::Builder::new(TokioExecutor::new());
                    while let Some((std, peer)) = rx.recv().await {
                        let stream = match tokio::net::TcpStream::from_std(std) {
                            Ok(s) => s,
                            Err(e) => {
                                count.fetch_sub(1, Ordering::Relaxed);
                                tracing::warn!(error = %e, "connection not registered");
                                continue;
                            }
                        };
                        let _ = stream.set_nodelay(true);
                        let service = TowerToHyperService::new(tower::util::MapRequest::new(
                            app.clone(),
                            move |mut req: http::Request<hyper::body::Incoming>| {
                                req.extensions_mut().insert(crate::oauth::PeerAddr(peer));
                                req
                            },
                        ));
                        let conn = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .into_owned();
                        let conn = graceful.watch(conn);
                        let count = count.clone();
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                            count.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                    // No more connections: keep driving the open ones and the request
                    // tails until the gateway has drained.
                    drop(graceful);
                    while !*done.borrow_and_update() {
                        if done.changed().await.is_err() {
                            break;
                        }
                    }
                });
            })?;
        Ok(Worker {
            index,
            label: index.to_string(),
            streams: tx,
            open,
            thread,
        })
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accept_until_hands_each_connection_to_dispatch_and_ends_when_told() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let (until_tx, until_rx) = tokio::sync::oneshot::channel::<()>();
        let accepting = tokio::spawn(async move {
            accept_until(
                &listener,
                |stream: TcpStream, peer| {
                    let _ = seen_tx.send((stream, peer));
                },
                async {
                    let _ = until_rx.await;
                },
            )
            .await;
            listener
        });
        let a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let b = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_, peer_a) = seen_rx.recv().await.unwrap();
        let (_, peer_b) = seen_rx.recv().await.unwrap();
        let mut peers = vec![peer_a, peer_b];
        peers.sort();
        let mut expected = vec![a.local_addr().unwrap(), b.local_addr().unwrap()];
        expected.sort();
        assert_eq!(peers, expected);
        until_tx.send(()).unwrap();
        let listener = tokio::time::timeout(Duration::from_secs(5), accepting)
            .await
            .expect("accept_until returns once `until` resolves")
            .unwrap();
        // The listener is given back open: the same loop serves the shutdown delay.
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let again = accept_until(
            &listener,
            |_stream: TcpStream, peer| {
                let _ = peer;
            },
            tokio::time::sleep(Duration::from_millis(50)),
        );
        tokio::time::timeout(Duration::from_secs(5), again)
            .await
            .expect("a timer ends it too");
        assert!(seen_rx.try_recv().is_err(), "nothing more was handed on");
    }
}
