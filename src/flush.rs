//! Stage 9, flush (off the request path): read the usage streams as a consumer group,
//! write `usage_history` rows and the matching `credits.used_credits` increments in one
//! PostgreSQL transaction per batch, then acknowledge. Batches go out at
//! `flush.batch_rows` rows or every `flush.interval_ms`, whichever comes first.
//!
//! Exactly once: rows are inserted with `ON CONFLICT (id, created_at) DO NOTHING` and
//! only the rows actually inserted move `used_credits`, so a batch replayed after a
//! crash between COMMIT and XACK changes nothing. Entries left pending by a dead
//! gateway are claimed (XAUTOCLAIM) once idle for `flush.claim_idle_ms`. While
//! PostgreSQL is down the streams grow and drain when it returns.
//!
//! Which credit rows a batch's charges go to is decided by the pure
//! `allocation` module, inside the transaction that locks the rows.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::Value;
use uuid::Uuid;

use crate::config::FlushConfig;
use crate::db::{Db, DbError};
use crate::ledger::{Ledger, STREAM_SLICE};
use crate::usage::UsageEvent;

mod allocation;
use allocation::{allocate, CreditRow};

/// One stream entry read by this consumer.
struct Entry {
    bucket: u32,
    entry_id: String,
    event: Option<UsageEvent>,
}

pub struct Flusher {
    ledger: Ledger,
    db: Db,
    cfg: FlushConfig,
    consumer: String,
    /// The bucket the next read starts from: a batch may fill before the last bucket,
    /// and the start turns so that no bucket waits behind the others for long.
    next_bucket: std::sync::atomic::AtomicU32,
}

fn field(map: &HashMap<String, Value>, k: &str) -> Option<String> {
    map.get(k)
        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
}

impl Flusher {
    pub fn new(ledger: Ledger, db: Db, cfg: FlushConfig) -> Flusher {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "gw".into());
        let consumer = format!("{host}-{}-{}", std::process::id(), Uuid::new_v4().simple());
        Flusher {
            ledger,
            db,
            cfg,
            consumer,
            next_bucket: std::sync::atomic::AtomicU32::new(0),
        }
    }

    async fn ensure_groups(&self) -> Result<(), redis::RedisError> {
        let mut conn = self.ledger.conn();
        for b in 0..self.ledger.buckets() {
            let r: Result<(), redis::RedisError> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.ledger.stream_key(b))
                .arg(&self.cfg.consumer_group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            if let Err(e) = r {
                if e.code() != Some("BUSYGROUP") {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn entries_of(bucket: u32, ids: Vec<StreamId>, out: &mut Vec<Entry>) {
        for s in ids {
            let event = field(&s.map, "e").as_deref().and_then(UsageEvent::decode);
            if event.is_none() {
                tracing::error!(entry = %s.id, "unreadable usage event; acknowledging it to unblock the stream");
            }
            out.push(Entry {
                bucket,
                entry_id: s.id,
                event,
            });
        }
    }

    /// The buckets whose stream holds entries (one pipelined `XLEN` of every bucket,
    /// O(1) each; a missing stream counts 0), in the order of this pass: the start
    /// turns on every call.
    async fn buckets_to_read(&self) -> Result<Vec<u32>, redis::RedisError> {
        let n = self.ledger.buckets();
        let mut pipe = redis::pipe();
        for b in 0..n {
            pipe.cmd("XLEN").arg(self.ledger.stream_key(b));
        }
        let lengths: Vec<u64> = pipe.query_async(&mut self.ledger.conn()).await?;
        let start = self
            .next_bucket
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % n.max(1);
        Ok((start..n)
            .chain(0..start)
            .filter(|b| lengths.get(*b as usize).copied().unwrap_or(0) > 0)
            .collect())
    }

    /// Reads up to `flush.batch_rows` entries from `source` — new ones (`>`), or this
    /// consumer's own pending ones (`0`) after a failed write or read — from `buckets`
    /// (those holding entries, in this pass's order), one bucket and at most
    /// [`STREAM_SLICE`] entries per call, one call after the other: a pipelined read of
    /// every bucket, or a whole batch in one call, would hold Redis (and every reserve
    /// and settle queued behind it) for as long as it takes to read them all.
    async fn read(&self, buckets: &[u32], source: Source) -> Result<Vec<Entry>, redis::RedisError> {
        let own_pending = source == Source::OwnPending;
        let mut out = Vec::new();
        let mut conn = self.ledger.conn();
        for &b in buckets {
            // Pending entries are paged by id; new ones advance the group by themselves.
            let mut after = if own_pending {
                "0".to_string()
            } else {
                ">".to_string()
            };
            while out.len() < self.cfg.batch_rows {
                let count = STREAM_SLICE.min(self.cfg.batch_rows - out.len());
                let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&self.cfg.consumer_group)
                    .arg(&self.consumer)
                    .arg("COUNT")
                    .arg(count)
                    .arg("STREAMS")
                    .arg(self.ledger.stream_key(b))
                    .arg(&after)
                    .query_async(&mut conn)
                    .await?;
                let ids: Vec<StreamId> = reply
                    .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                    .unwrap_or_default();
                let got = ids.len();
                if own_pending {
                    if let Some(last) = ids.last() {
                        after.clone_from(&last.id);
                    }
                }
                Self::entries_of(b, ids, &mut out);
                if got < count {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Claims entries that another (dead) consumer left pending too long, in slices
    /// like [`Flusher::read`], up to `flush.batch_rows`.
    async fn claim_stale(&self, buckets: &[u32]) -> Result<Vec<Entry>, redis::RedisError> {
        let mut out = Vec::new();
        let idle = u64::try_from(self.cfg.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.ledger.conn();
        for &b in buckets {
            let mut cursor = "0-0".to_string();
            while out.len() < self.cfg.batch_rows {
                let count = STREAM_SLICE.min(self.cfg.batch_rows - out.len());
                let r: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                    .arg(self.ledger.stream_key(b))
                    .arg(&self.cfg.consumer_group)
                    .arg(&self.consumer)
                    .arg(idle)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut conn)
                    .await?;
                Self::entries_of(b, r.claimed, &mut out);
                // "0-0": the whole pending list of the bucket was scanned.
                if r.next_stream_id == "0-0" {
                    break;
                }
                cursor = r.next_stream_id;
            }
        }
        Ok(out)
    }

    /// Writes the entries to PostgreSQL, then acknowledges them. On a PostgreSQL error
    /// nothing is acknowledged: the entries stay pending and are retried (by claim).
    async fn write_and_ack(&self, entries: Vec<Entry>) -> Result<usize, FlushError> {
        if entries.is_empty() {
            return Ok(0);
        }
        // One pass can see an entry twice (claimed, then re-read from this consumer's
        // pending list): write and acknowledge each entry once.
        let mut seen = std::collections::HashSet::new();
        let entries: Vec<Entry> = entries
            .into_iter()
            .filter(|e| seen.insert((e.bucket, e.entry_id.clone())))
            .collect();
        // Split by user into `flush.writers` groups written concurrently: disjoint users
        // lock disjoint credit rows, and one writer alone waits on PostgreSQL's round
        // trips more than it uses its CPU. Entries without a readable event ride along
        // with group 0 (they are only acknowledged).
        let writers = self.cfg.writers.max(1);
        let mut groups: Vec<Vec<Entry>> = (0..writers).map(|_| Vec::new()).collect();
        for e in entries {
            let g = e
                .event
                .as_ref()
                .map_or(0, |ev| (ev.user_id.as_u128() % writers as u128) as usize);
            groups[g].push(e);
        }
        let results =
            futures_util::future::join_all(groups.into_iter().filter(|g| !g.is_empty()).map(
                |group| async move {
                    let events: Vec<UsageEvent> =
                        group.iter().filter_map(|e| e.event.clone()).collect();
                    let mut written = 0;
                    for chunk in events.chunks(self.cfg.batch_rows.max(1)) {
                        match write_batch(&self.db, chunk).await {
                            Ok(ids) => written += ids.len(),
                            Err(e) => return (group, Err(FlushError::Write(e))),
                        }
                    }
                    (group, Ok(written))
                },
            ))
            .await;
        // Acknowledge what was committed; what failed stays pending and is retried.
        let mut written = 0;
        let mut failure = None;
        let mut by_bucket: HashMap<u32, Vec<(String, String, String)>> = HashMap::new();
        for (group, result) in results {
            match result {
                Ok(n) => written += n,
                Err(e) => {
                    failure = Some(e);
                    continue;
                }
            }
            for e in group {
                let (rid, user) = e
                    .event
                    .as_ref()
                    .map(|ev| (ev.id.to_string(), ev.user_id.to_string()))
                    .unwrap_or_default();
                by_bucket
                    .entry(e.bucket)
                    .or_default()
                    .push((e.entry_id, rid, user));
            }
        }
        for (bucket, list) in by_bucket {
            self.ledger
                .ack(bucket, &self.cfg.consumer_group, &list)
                .await?;
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(written),
        }
    }

    /// Claims entries left by dead consumers (every `claim_idle / 2`) and reads the
    /// next batch from `source`. A failed read marks the groups for recreation (Redis
    /// may have lost its data; XGROUP CREATE is idempotent).
    async fn next_batch(
        &self,
        source: Source,
        last_claim: &mut Option<Instant>,
        groups: &mut Groups,
    ) -> Read {
        let buckets = match self.buckets_to_read().await {
            Ok(b) => b,
            Err(e) => {
                *groups = Groups::Recreate;
                tracing::warn!(error = %e, "reading usage stream lengths failed");
                return Read::Failed;
            }
        };
        let mut entries = Vec::new();
        if last_claim.is_none_or(|t| t.elapsed() >= self.cfg.claim_idle / 2) {
            *last_claim = Some(Instant::now());
            match self.claim_stale(&buckets).await {
                Ok(v) => entries.extend(v),
                Err(e) => {
                    *groups = Groups::Recreate;
                    tracing::warn!(error = %e, "claiming stale usage events failed");
                }
            }
        }
        match self.read(&buckets, source).await {
            Ok(v) => {
                entries.extend(v);
                Read::Batch(Batch { entries, source })
            }
            Err(e) => {
                *groups = Groups::Recreate;
                tracing::warn!(error = %e, "reading usage events failed");
                Read::Failed
            }
        }
    }

    /// The write half of a pass: writes and acknowledges `batch`, if any.
    async fn write(&self, batch: Option<Batch>) -> Written {
        let Some(Batch { entries, source }) = batch else {
            return Written::Nothing;
        };
        let n = entries.len();
        match self.write_and_ack(entries).await {
            Ok(inserted) => Written::Flushed {
                entries: n,
                inserted,
                source,
            },
            Err(error) => Written::Failed { entries: n, error },
        }
    }

    /// One pass: (re)creates the groups if needed, then writes the batch carried from
    /// the last pass while reading the next one (when [`Pass::read_source`] says so).
    async fn pass(&self, p: &mut Pass) -> Outcome {
        if p.groups == Groups::Recreate {
            match self.ensure_groups().await {
                Ok(()) => p.groups = Groups::Ready,
                Err(e) => tracing::warn!(error = %e, "usage streams unavailable"),
            }
        }
        let writing = p.carried.take();
        let read_from = p.read_source(writing.as_ref(), self.cfg.batch_rows);
        let (written, read) = tokio::join!(self.write(writing), async {
            match read_from {
                Some(source) => {
                    self.next_batch(source, &mut p.last_claim, &mut p.groups)
                        .await
                }
                None => Read::Skipped,
            }
        });
        p.apply(written, read, self.cfg.batch_rows)
    }

    /// Runs until `shutdown` flips, then drains what is left: everything settled
    /// before the flip is written before this returns (unless PostgreSQL or Redis
    /// fails meanwhile, in which case the entries stay pending in Redis for the next
    /// gateway to claim).
    ///
    /// While the streams hold more than a batch, the next batch is read while the
    /// current one is written (two stages in flight). After a failed write the
    /// concurrently read batch is dropped — it stays in this consumer's pending list —
    /// and the next pass re-reads that list alone.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut p = Pass::new(self.cfg.interval);
        loop {
            let stopping = *shutdown.borrow();
            let outcome = self.pass(&mut p).await;
            p.backoff = match outcome {
                Outcome::Failed => (p.backoff * 2).min(MAX_BACKOFF),
                Outcome::Carrying | Outcome::Idle { .. } => self.cfg.interval,
            };
            match outcome.next(stopping, p.carried.is_some()) {
                Next::Stop => break,
                Next::Now => continue,
                Next::Wait => tokio::select! {
                    _ = tokio::time::sleep(p.backoff) => {}
                    _ = shutdown.changed(), if !stopping => {}
                },
            }
        }
        tracing::info!("usage flusher stopped");
    }
}

/// The longest wait between two failed passes (the wait doubles from
/// `flush.interval_ms` on each failure in a row).
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where a batch's read came from. Stale entries claimed from dead consumers
/// (XAUTOCLAIM, every `claim_idle / 2`) ride along with a read from either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Entries not yet delivered to any consumer of the group (`>`).
    New,
    /// This consumer's own pending list (`0`, paged by id): entries delivered to it
    /// and not acknowledged — after a failed write or read, or after a full batch
    /// from that list.
    OwnPending,
}

/// Entries read together, and where from.
struct Batch {
    entries: Vec<Entry>,
    source: Source,
}

/// The consumer groups on the buckets' streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Groups {
    /// Created (or found) on every stream.
    Ready,
    /// To be created before the next read: at start, and after a failed read, which
    /// may mean that Redis lost its data.
    Recreate,
}

/// How the write half of a pass ended.
enum Written {
    /// Nothing was carried over to write.
    Nothing,
    /// Committed and acknowledged: `entries` read, `inserted` of them new rows.
    Flushed {
        entries: usize,
        inserted: usize,
        source: Source,
    },
    /// Not committed (or not acknowledged): the entries stay pending.
    Failed { entries: usize, error: FlushError },
}

/// Why a batch was not written and acknowledged; its entries stay pending. Shown as
/// the underlying error's own text.
#[derive(Debug, thiserror::Error)]
enum FlushError {
    /// Writing the usage rows to PostgreSQL failed (nothing of that group is acked).
    #[error(transparent)]
    Write(#[from] DbError),
    /// Acknowledging the written entries in Redis failed.
    #[error(transparent)]
    Ack(#[from] redis::RedisError),
}

/// How the read half of a pass ended.
enum Read {
    /// No read this pass: the groups are not ready, or the batch being written is
    /// neither full nor from new entries.
    Skipped,
    Batch(Batch),
    /// The read failed, maybe part-way: it may have delivered entries to this
    /// consumer (they are in its pending list now, and `>` will not return them again).
    Failed,
}

/// What a pass came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A write or a read failed, or the groups could not be created: back off.
    Failed,
    /// A batch was read and waits to be written: more is likely waiting.
    Carrying,
    /// Nothing failed and nothing waits. `caught_up`: the pass read new entries and
    /// found none (nor anything pending of this consumer's to read again).
    Idle { caught_up: bool },
}

/// When the next pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// At once.
    Now,
    /// After the back-off (or, before the shutdown flips, when it flips).
    Wait,
    /// Never: the flusher stops.
    Stop,
}

impl Outcome {
    /// Once `stopping`, the flusher ends as soon as nothing is carried and either the
    /// streams are read to their end or a failure leaves the rest pending (for the
    /// next gateway to claim); until then it passes again at once.
    fn next(self, stopping: bool, carrying: bool) -> Next {
        match self {
            Outcome::Failed if stopping && !carrying => Next::Stop,
            Outcome::Failed => Next::Wait,
            Outcome::Carrying => Next::Now,
            Outcome::Idle { caught_up: true } if stopping => Next::Stop,
            Outcome::Idle { .. } if stopping => Next::Now,
            Outcome::Idle { .. } => Next::Wait,
        }
    }
}

/// What one pass hands to the next.
struct Pass {
    groups: Groups,
    last_claim: Option<Instant>,
    /// Where the next read comes from.
    next_read: Source,
    backoff: Duration,
    /// Read and not yet written (never empty).
    carried: Option<Batch>,
}

impl Pass {
    fn new(interval: Duration) -> Pass {
        Pass {
            groups: Groups::Recreate,
            last_claim: None,
            next_read: Source::New,
            backoff: interval,
            carried: None,
        }
    }

    /// Whether this pass reads, and from where: when nothing is being written, or
    /// alongside the write of a full batch (more is likely waiting) — but not while
    /// this consumer's pending list is being recovered.
    fn read_source(&self, writing: Option<&Batch>, batch_rows: usize) -> Option<Source> {
        let read = self.groups == Groups::Ready
            && writing
                .is_none_or(|b| b.entries.len() >= batch_rows && self.next_read == Source::New);
        read.then_some(self.next_read)
    }

    /// Takes in what the two halves of a pass came to: logs and counts the write,
    /// keeps the batch read for the next pass, and decides where the next read comes
    /// from.
    fn apply(&mut self, written: Written, read: Read, batch_rows: usize) -> Outcome {
        let mut write_failed = false;
        match written {
            Written::Nothing => {}
            Written::Flushed {
                entries,
                inserted,
                source,
            } => {
                tracing::debug!(entries, inserted, "usage batch flushed");
                metrics::counter!("tollgate_usage_rows_flushed_total").increment(inserted as u64);
                // A full batch from the pending list: read the list again.
                self.next_read = if source == Source::OwnPending && entries >= batch_rows {
                    Source::OwnPending
                } else {
                    Source::New
                };
            }
            Written::Failed { entries, error } => {
                tracing::warn!(%error, entries, "usage batch failed; will retry");
                metrics::counter!("tollgate_flush_failures_total").increment(1);
                self.next_read = Source::OwnPending;
                write_failed = true;
            }
        }
        let mut failed = write_failed || self.groups == Groups::Recreate;
        let mut read_through = false;
        match read {
            // After a failed write the batch read alongside stays in this consumer's
            // pending list and is read again from there.
            Read::Batch(batch) if !write_failed => {
                read_through = true;
                if batch.source == Source::OwnPending && batch.entries.is_empty() {
                    self.next_read = Source::New;
                }
                self.carried = (!batch.entries.is_empty()).then_some(batch);
            }
            Read::Batch(_) | Read::Skipped => {}
            Read::Failed => {
                failed = true;
                self.next_read = Source::OwnPending;
            }
        }
        if failed {
            Outcome::Failed
        } else if self.carried.is_some() {
            Outcome::Carrying
        } else {
            Outcome::Idle {
                caught_up: read_through && self.next_read == Source::New,
            }
        }
    }
}

/// Writes usage rows and their credit increments in one transaction. Returns the ids
/// actually inserted (rows already present are skipped, and move no credits; rows of
/// users or models that no longer exist are dropped).
pub async fn write_batch(db: &Db, events: &[UsageEvent]) -> Result<Vec<Uuid>, DbError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = db.get().await?;
    let tx = conn.transaction().await?;
    let mut users: Vec<Uuid> = events.iter().map(|e| e.user_id).collect();
    users.sort_unstable();
    users.dedup();
    // Lock the users' current credit rows, earliest-ending first: the allocation
    // below and the increment are one decision.
    let rows = tx
        .query(
            "SELECT id, user_id, total_credits::bigint, used_credits::bigint FROM credits
              WHERE user_id = ANY($1) AND is_current
              ORDER BY user_id, billing_period_end, created_at, id
              FOR UPDATE",
            &[&users],
        )
        .await?;
    let mut credit_rows: HashMap<Uuid, Vec<CreditRow>> = HashMap::new();
    for r in rows {
        let total: i64 = r.get(2);
        let used: i64 = r.get(3);
        credit_rows.entry(r.get(1)).or_default().push(CreditRow {
            id: r.get(0),
            remaining: total - used,
        });
    }
    carry_rows(&tx, events, &mut credit_rows).await?;
    let allocation = allocate(events, &credit_rows);
    let credit_ids = &allocation.credit_ids;
    let to_i32 = |v: i64| i32::try_from(v).unwrap_or(i32::MAX);
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let user_ids: Vec<Uuid> = events.iter().map(|e| e.user_id).collect();
    let models: Vec<&str> = events.iter().map(|e| e.model_id.as_str()).collect();
    let ops: Vec<&str> = events.iter().map(|e| e.operation).collect();
    let credits: Vec<i32> = events.iter().map(|e| to_i32(e.credits_used)).collect();
    let input: Vec<i32> = events.iter().map(|e| to_i32(e.input_tokens)).collect();
    let output: Vec<i32> = events.iter().map(|e| to_i32(e.output_tokens)).collect();
    let total: Vec<i32> = events.iter().map(|e| to_i32(e.total_tokens)).collect();
    let dur: Vec<i32> = events.iter().map(|e| to_i32(e.duration_ms)).collect();
    let meta: Vec<Option<serde_json::Value>> = events.iter().map(|e| e.metadata.clone()).collect();
    let created: Vec<chrono::DateTime<chrono::Utc>> = events.iter().map(|e| e.created_at).collect();
    // What each row was charged at (NULL for an event of a gateway before prices per
    // token kind); the provider's cost travels in millionths of a cent.
    let priced = |f: fn(&crate::usage::Priced) -> i64| -> Vec<Option<i32>> {
        events
            .iter()
            .map(|e| e.priced.as_ref().map(|p| to_i32(f(p))))
            .collect()
    };
    let cached = priced(|p| p.cached_input_tokens);
    let rate_in = priced(|p| p.rates.input);
    let rate_out = priced(|p| p.rates.output);
    let rate_cached = priced(|p| p.rates.cached_input);
    let provider_cost: Vec<Option<i64>> = events
        .iter()
        .map(|e| e.priced.and_then(|p| p.provider_cost_micro_cents))
        .collect();
    let inserted = tx
        .query(
            "INSERT INTO usage_history (id, user_id, credit_id, model_id, operation, credits_used, input_tokens,
                                        output_tokens, total_tokens, request_duration_ms, request_metadata, created_at,
                                        cached_input_tokens, input_rate, output_rate, cached_input_rate,
                                        provider_cost_cents)
             SELECT v.id, v.user_id, v.credit_id, v.model_id, v.op::usage_operation, v.credits, v.inp, v.outp,
                    v.tot, v.dur, v.meta, v.created, v.cached, v.rin, v.rout, v.rcached,
                    v.pc_micro * 0.000001
               FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::int[], $7::int[],
                           $8::int[], $9::int[], $10::int[], $11::jsonb[], $12::timestamptz[],
                           $13::int[], $14::int[], $15::int[], $16::int[], $17::int8[])
                    AS v(id, user_id, credit_id, model_id, op, credits, inp, outp, tot, dur, meta, created,
                         cached, rin, rout, rcached, pc_micro)
              WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = v.user_id)
                AND EXISTS (SELECT 1 FROM models m WHERE m.id = v.model_id)
             ON CONFLICT (id, created_at) DO NOTHING
             RETURNING id",
            &[&ids, &user_ids, credit_ids, &models, &ops, &credits, &input, &output, &total, &dur, &meta, &created,
              &cached, &rate_in, &rate_out, &rate_cached, &provider_cost],
        )
        .await?;
    let inserted: Vec<Uuid> = inserted.iter().map(|r| r.get(0)).collect();
    let inc = allocation.increments(events, &inserted);
    if !inc.is_empty() {
        let (rows, amounts): (Vec<Uuid>, Vec<i32>) =
            inc.into_iter().map(|(k, v)| (k, to_i32(v))).unzip();
        tx.execute(
            "UPDATE credits SET used_credits = credits.used_credits + v.inc
               FROM UNNEST($1::uuid[], $2::int[]) AS v(id, inc)
              WHERE credits.id = v.id",
            &[&rows, &amounts],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// Gives a charge that no current credits row can take a row to land on: a user whose
/// last row was retired (an expired grant, a subscription that ended) while a request
/// was in flight gets a zero-credit "carry" row, current and ending last, which the
/// charge takes below zero. The live balance subtracted the charge at settle; the
/// carry row makes PostgreSQL's sum of current rows subtract it too, so the two agree.
async fn carry_rows(
    tx: &tokio_postgres::Transaction<'_>,
    events: &[UsageEvent],
    rows: &mut HashMap<Uuid, Vec<CreditRow>>,
) -> Result<(), DbError> {
    let mut bare: Vec<Uuid> = events
        .iter()
        .filter(|e| e.credits_used > 0 && !rows.contains_key(&e.user_id))
        .map(|e| e.user_id)
        .collect();
    if bare.is_empty() {
        return Ok(());
    }
    bare.sort_unstable();
    bare.dedup();
    // A row committed while the lock above waited (a new period replacing a retired
    // one) is not in that statement's snapshot: look again before making a carry row.
    let found = tx
        .query(
            "SELECT id, user_id, total_credits::bigint - used_credits::bigint FROM credits
              WHERE user_id = ANY($1) AND is_current
              ORDER BY user_id, billing_period_end, created_at, id
              FOR UPDATE",
            &[&bare],
        )
        .await?;
    for r in found {
        rows.entry(r.get(1)).or_default().push(CreditRow {
            id: r.get(0),
            remaining: r.get(2),
        });
    }
    bare.retain(|u| !rows.contains_key(u));
    let made = tx
        .query(
            "INSERT INTO credits (user_id, total_credits, billing_period_start, billing_period_end)
             SELECT u, 0, now(), '9999-12-31 00:00:00+00' FROM UNNEST($1::uuid[]) AS u
              WHERE EXISTS (SELECT 1 FROM users WHERE id = u)
             RETURNING id, user_id",
            &[&bare],
        )
        .await?;
    for r in made {
        rows.entry(r.get(1)).or_default().push(CreditRow {
            id: r.get(0),
            remaining: 0,
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const ROWS: usize = 4;

    fn batch(n: usize, source: Source) -> Batch {
        Batch {
            entries: (0..n)
                .map(|i| Entry {
                    bucket: 0,
                    entry_id: format!("1-{i}"),
                    event: None,
                })
                .collect(),
            source,
        }
    }

    fn ready() -> Pass {
        let mut p = Pass::new(Duration::from_millis(10));
        p.groups = Groups::Ready;
        p
    }

    fn flushed(entries: usize, source: Source) -> Written {
        Written::Flushed {
            entries,
            inserted: entries,
            source,
        }
    }

    fn failed_write() -> Written {
        Written::Failed {
            entries: ROWS,
            error: FlushError::Write(DbError::Pool("down".into())),
        }
    }

    #[test]
    fn a_pass_reads_when_idle_or_alongside_a_full_batch_of_new_entries() {
        let mut p = ready();
        assert_eq!(p.read_source(None, ROWS), Some(Source::New));
        assert_eq!(
            p.read_source(Some(&batch(ROWS, Source::New)), ROWS),
            Some(Source::New)
        );
        assert_eq!(
            p.read_source(Some(&batch(ROWS - 1, Source::New)), ROWS),
            None
        );
        p.next_read = Source::OwnPending;
        assert_eq!(p.read_source(None, ROWS), Some(Source::OwnPending));
        // Recovering the pending list: one batch at a time.
        assert_eq!(
            p.read_source(Some(&batch(ROWS, Source::OwnPending)), ROWS),
            None
        );
        p.groups = Groups::Recreate;
        assert_eq!(p.read_source(None, ROWS), None);
    }

    #[test]
    fn a_batch_read_is_carried_to_the_next_pass() {
        let mut p = ready();
        let o = p.apply(Written::Nothing, Read::Batch(batch(2, Source::New)), ROWS);
        assert_eq!(o, Outcome::Carrying);
        assert_eq!(p.carried.as_ref().map(|b| b.entries.len()), Some(2));
        let writing = p.carried.take();
        assert!(writing.is_some());
        let o = p.apply(flushed(2, Source::New), Read::Skipped, ROWS);
        assert_eq!(o, Outcome::Idle { caught_up: false });
        assert_eq!(p.next_read, Source::New);
        let o = p.apply(Written::Nothing, Read::Batch(batch(0, Source::New)), ROWS);
        assert_eq!(o, Outcome::Idle { caught_up: true });
        assert!(p.carried.is_none());
    }

    #[test]
    fn a_failed_write_drops_the_batch_read_alongside_and_rereads_the_pending_list() {
        let mut p = ready();
        let o = p.apply(failed_write(), Read::Batch(batch(ROWS, Source::New)), ROWS);
        assert_eq!(o, Outcome::Failed);
        assert!(p.carried.is_none());
        assert_eq!(p.next_read, Source::OwnPending);
        // The pending list, read again, comes back whole: written, and read once more.
        let o = p.apply(
            Written::Nothing,
            Read::Batch(batch(ROWS, Source::OwnPending)),
            ROWS,
        );
        assert_eq!(o, Outcome::Carrying);
        let writing = p.carried.take();
        assert_eq!(p.read_source(writing.as_ref(), ROWS), None);
        let o = p.apply(flushed(ROWS, Source::OwnPending), Read::Skipped, ROWS);
        assert_eq!(o, Outcome::Idle { caught_up: false });
        assert_eq!(p.next_read, Source::OwnPending);
        // Until it is empty: then new entries again.
        let o = p.apply(
            Written::Nothing,
            Read::Batch(batch(0, Source::OwnPending)),
            ROWS,
        );
        assert_eq!(o, Outcome::Idle { caught_up: true });
        assert_eq!(p.next_read, Source::New);
    }

    #[test]
    fn a_short_batch_from_the_pending_list_ends_its_recovery() {
        let mut p = ready();
        p.next_read = Source::OwnPending;
        let o = p.apply(flushed(ROWS - 1, Source::OwnPending), Read::Skipped, ROWS);
        assert_eq!(o, Outcome::Idle { caught_up: false });
        assert_eq!(p.next_read, Source::New);
    }

    #[test]
    fn a_failed_read_rereads_the_pending_list_and_a_lost_group_fails_the_pass() {
        let mut p = ready();
        let o = p.apply(flushed(ROWS, Source::New), Read::Failed, ROWS);
        assert_eq!(o, Outcome::Failed);
        assert_eq!(p.next_read, Source::OwnPending);
        // A failed claim: the batch read is kept, but the pass counts as failed.
        let mut p = ready();
        p.groups = Groups::Recreate;
        let o = p.apply(Written::Nothing, Read::Batch(batch(1, Source::New)), ROWS);
        assert_eq!(o, Outcome::Failed);
        assert!(p.carried.is_some());
    }

    #[test]
    fn stream_entries_are_decoded_and_unreadable_ones_kept_to_be_acknowledged() {
        use chrono::TimeZone;
        let event = UsageEvent {
            id: Uuid::now_v7(),
            created_at: chrono::Utc
                .timestamp_micros(1_764_000_000_000_001)
                .single()
                .unwrap(),
            user_id: Uuid::new_v4(),
            model_id: "gpt-5".into(),
            operation: "function_call",
            credits_used: 3,
            input_tokens: 1,
            output_tokens: 2,
            total_tokens: 3,
            duration_ms: 4,
            priced: None,
            metadata: None,
        };
        let entry = |id: &str, fields: Vec<(&str, Value)>| StreamId {
            id: id.into(),
            map: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            ..StreamId::default()
        };
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let ids = vec![
            entry("1-0", vec![("e", bulk(&event.encode()))]),
            entry("1-1", vec![]),
            entry("1-2", vec![("x", bulk(&event.encode()))]),
            entry("1-3", vec![("e", bulk("garbage"))]),
            entry("1-4", vec![("e", Value::BulkString(vec![0xff, 0xfe]))]),
            entry("1-5", vec![("e", Value::Nil)]),
            entry("1-6", vec![("e", Value::Int(5))]),
            entry("1-7", vec![("e", Value::SimpleString(event.encode()))]),
        ];
        let mut out = Vec::new();
        Flusher::entries_of(7, ids, &mut out);
        let got: Vec<(u32, &str, bool)> = out
            .iter()
            .map(|e| (e.bucket, e.entry_id.as_str(), e.event.is_some()))
            .collect();
        assert_eq!(
            got,
            [
                (7, "1-0", true),
                (7, "1-1", false),
                (7, "1-2", false),
                (7, "1-3", false),
                (7, "1-4", false),
                (7, "1-5", false),
                (7, "1-6", false),
                (7, "1-7", true),
            ]
        );
        assert_eq!(out[0].event.as_ref(), Some(&event));
        assert_eq!(out[7].event.as_ref(), Some(&event));
    }

    #[test]
    fn the_flusher_stops_once_drained_or_failed_with_nothing_carried() {
        use Next::{Now, Stop, Wait};
        let idle = Outcome::Idle { caught_up: false };
        let caught_up = Outcome::Idle { caught_up: true };
        for (outcome, carrying, running, stopping) in [
            (Outcome::Failed, false, Wait, Stop),
            (Outcome::Failed, true, Wait, Wait),
            (Outcome::Carrying, true, Now, Now),
            (idle, false, Wait, Now),
            (caught_up, false, Wait, Stop),
        ] {
            assert_eq!(outcome.next(false, carrying), running, "{outcome:?}");
            assert_eq!(outcome.next(true, carrying), stopping, "{outcome:?}");
        }
    }
}
