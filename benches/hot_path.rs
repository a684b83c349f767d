//! Criterion benches of the hot-path pieces. Run: `cargo bench --bench hot_path`.
//! The Redis bench talks to the real local Redis (127.0.0.1:6379).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::Ed25519KeyPair;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tollgate::authenticate::Authenticator;
use tollgate::config::AuthConfig;
use tollgate::ledger::{HoldRequest, Ledger};
use tollgate::parse::parse_chat;
use tollgate::route::{Model, Models};
use tollgate::settle::{cost, UsageEvent};
use tollgate::stream_back::SseTap;
use uuid::Uuid;

fn auth_config() -> AuthConfig {
    AuthConfig {
        issuer: "http://127.0.0.1:8080".into(),
        audience: "tollgate".into(),
        signing_key_path: "unused".into(),
        access_token_ttl: Duration::from_secs(900),
        leeway_secs: 30,
        previous_key_paths: Vec::new(),
        external: None,
    }
}

fn jwt(c: &mut Criterion) {
    let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let auth = Authenticator::from_pkcs8(doc.as_ref(), &auth_config()).unwrap();
    let token = auth
        .issue(&Uuid::new_v4(), "bench", "llm.inference", None)
        .unwrap();
    let header = http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    let mut g = c.benchmark_group("jwt_verify_ed25519");
    // A token seen before (every request after a client's first): the verified cache.
    g.bench_function("cached", |b| {
        b.iter(|| auth.verify_header(Some(&header)).unwrap())
    });
    // A token never seen: signature and claims checked in full.
    g.bench_function("cold", |b| {
        b.iter_batched(
            || {
                http::HeaderValue::from_str(&format!(
                    "Bearer {}",
                    auth.issue(&Uuid::new_v4(), "bench", "", None).unwrap()
                ))
                .unwrap()
            },
            |h| auth.verify_header(Some(&h)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // The signature check alone (aws-lc-rs) over a token's signing input, for what the
    // cold path costs beyond it, and what another algorithm would cost instead.
    use aws_lc_rs::signature::{self as sig, KeyPair};
    let input = token.rsplit_once('.').unwrap().0.as_bytes().to_vec();
    let mut g = c.benchmark_group("signature_verify_only");
    let ed = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
    let ed_sig = ed.sign(&input);
    let ed_pub = sig::UnparsedPublicKey::new(&sig::ED25519, ed.public_key().as_ref().to_vec());
    g.bench_function("ed25519", |b| {
        b.iter(|| ed_pub.verify(&input, ed_sig.as_ref()).unwrap())
    });
    let rng = SystemRandom::new();
    let p256_doc =
        sig::EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let p256 =
        sig::EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, p256_doc.as_ref())
            .unwrap();
    let p256_sig = p256.sign(&rng, &input).unwrap();
    let p256_pub = sig::UnparsedPublicKey::new(
        &sig::ECDSA_P256_SHA256_FIXED,
        p256.public_key().as_ref().to_vec(),
    );
    g.bench_function("es256_p256", |b| {
        b.iter(|| p256_pub.verify(&input, p256_sig.as_ref()).unwrap())
    });
    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let mut rsa_sig = vec![0; rsa.public_modulus_len()];
    rsa.sign(&sig::RSA_PKCS1_SHA256, &rng, &input, &mut rsa_sig)
        .unwrap();
    let rsa_pub = sig::UnparsedPublicKey::new(
        &sig::RSA_PKCS1_2048_8192_SHA256,
        rsa.public_key().as_ref().to_vec(),
    );
    g.bench_function("rs256_rsa2048", |b| {
        b.iter(|| rsa_pub.verify(&input, &rsa_sig).unwrap())
    });
    g.finish();
}

fn model(id: &str) -> Model {
    Model {
        id: id.into(),
        name: id.into(),
        display_name: id.into(),
        provider: "openai".into(),
        capabilities: vec!["text".into()],
        context_length: 400_000,
        max_output_tokens: Some(128_000),
        credits_per_1k_tokens: 2,
        rates: tollgate::usage::Rates::flat(2),
        provider_costs: tollgate::usage::ProviderCosts::default(),
        image_tokens: Some(1_500),
        is_available: true,
        is_deprecated: false,
        created: 0,
    }
}

fn parse_route(c: &mut Criterion) {
    let models = Models::default();
    models.replace(vec![
        model("gpt-5"),
        model("gemini-2.0-pro"),
        model("claude-3.5-sonnet"),
    ]);
    let small = br#"{"model":"gpt-5","max_tokens":64,"messages":[{"role":"user","content":"Say hello to the benchmark."}]}"#;
    let mut msgs = Vec::new();
    for i in 0..20 {
        msgs.push(serde_json::json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": "lorem ipsum dolor sit amet ".repeat(40)}));
    }
    let large = serde_json::to_vec(
        &serde_json::json!({"model": "gpt-5", "stream": true, "messages": msgs}),
    )
    .unwrap();
    let mut g = c.benchmark_group("parse_route");
    for (name, body) in [("small", small.to_vec()), ("20_messages", large)] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let r = parse_chat(&body).unwrap();
                models.route(&r.model).unwrap()
            })
        });
    }
    g.finish();
}

fn sse_tap(c: &mut Criterion) {
    let mut chunks = Vec::new();
    chunks.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-5\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n"));
    for _ in 0..64 {
        chunks.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-5\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hello wor\"},\"finish_reason\":null}],\"usage\":null}\n\n"));
    }
    chunks.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-5\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":64,\"total_tokens\":76}}\n\n"));
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut g = c.benchmark_group("sse_tap");
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("whole_events_per_frame", |b| {
        b.iter(|| {
            let mut tap = SseTap::new(false);
            for ch in &chunks {
                std::hint::black_box(tap.feed(ch.clone()));
            }
            tap.finish()
        })
    });
    // The same bytes cut into 7-byte frames: the slow path that reassembles events.
    let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let split: Vec<Bytes> = joined.chunks(7).map(Bytes::copy_from_slice).collect();
    g.bench_function("split_frames", |b| {
        b.iter(|| {
            let mut tap = SseTap::new(false);
            for ch in &split {
                std::hint::black_box(tap.feed(ch.clone()));
            }
            tap.finish()
        })
    });
    g.finish();
}

fn cost_arith(c: &mut Criterion) {
    c.bench_function("cost_ceil", |b| {
        let mut t = 0i64;
        b.iter(|| {
            t = (t + 7919) % 2_000_000;
            cost(std::hint::black_box(t), 2).unwrap()
        })
    });
}

fn event(i: i64) -> UsageEvent {
    UsageEvent {
        id: Uuid::now_v7(),
        created_at: chrono::Utc::now(),
        user_id: Uuid::new_v4(),
        model_id: "gpt-5".into(),
        operation: "chat",
        credits_used: i % 7,
        input_tokens: i,
        output_tokens: i * 2,
        total_tokens: i * 3,
        duration_ms: 12,
        priced: Some(tollgate::usage::Priced {
            cached_input_tokens: 0,
            rates: tollgate::usage::Rates::flat(2),
            provider_cost_micro_cents: Some(1_000_000),
        }),
        metadata: Some(serde_json::json!({"stream": i % 2 == 0})),
    }
}

fn batcher_encoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("batcher");
    let n = 1000;
    g.throughput(Throughput::Elements(n as u64));
    let events: Vec<UsageEvent> = (0..n).map(event).collect();
    g.bench_function("encode_1000_events", |b| {
        b.iter(|| events.iter().map(UsageEvent::encode).collect::<Vec<_>>())
    });
    let encoded: Vec<String> = events.iter().map(UsageEvent::encode).collect();
    g.bench_function("decode_1000_events", |b| {
        b.iter(|| {
            encoded
                .iter()
                .map(|m| UsageEvent::decode(m).unwrap())
                .collect::<Vec<_>>()
        })
    });
    g.finish();
}

fn redis_round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("bench{}:", &Uuid::new_v4().simple().to_string()[..8]);
    let Ok(ledger) = rt.block_on(Ledger::connect("redis://127.0.0.1:6379", &prefix, 16)) else {
        eprintln!("redis not reachable on 127.0.0.1:6379: skipping the reserve+settle bench");
        return;
    };
    let user = Uuid::new_v4();
    let keys = ledger.keys(&user);
    let mut conn = ledger.conn();
    rt.block_on(async {
        let _: () = redis::cmd("HSET")
            .arg(&keys.acct)
            .arg("bal")
            .arg(i64::MAX / 4)
            .query_async(&mut conn)
            .await
            .unwrap();
    });
    let hold = HoldRequest {
        price_per_1k: 2,
        prompt_tokens: 20,
        max_tokens: 64,
        min_tokens: 16,
        ttl_ms: 600_000,
    };
    let encoded = event(5).encode();
    c.bench_function("redis_reserve_settle_round_trips", |b| {
        b.iter_batched(
            Uuid::now_v7,
            |rid| {
                rt.block_on(async {
                    ledger.reserve(&user, &rid, &hold).await.unwrap();
                    ledger.settle(&user, &rid, 1, &encoded).await.unwrap()
                })
            },
            BatchSize::SmallInput,
        )
    });
    rt.block_on(async {
        let _: () = redis::cmd("DEL")
            .arg(&keys.acct)
            .arg(&keys.pend)
            .arg(&keys.stream)
            .query_async(&mut conn)
            .await
            .unwrap();
    });
}

/// The usage writer against the real local PostgreSQL: 1000 rows per transaction
/// (UNNEST insert + credit increments), in a scratch database.
fn flush_writer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let name = format!(
        "tollgate_bench_flush_{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let admin = "postgres://postgres@127.0.0.1:5432/postgres";
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let setup = rt.block_on(async {
        let (a, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(conn);
        a.batch_execute(&format!("CREATE DATABASE {name}")).await.ok()?;
        let (mut c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(conn);
        tollgate::db::migrate(&mut c).await.ok()?;
        tollgate::db::ensure_partitions(&c, 1).await.ok()?;
        tollgate::db::seed(&mut c).await.ok()?;
        let mut users = Vec::new();
        for i in 0..50 {
            let u: Uuid = c
                .query_one("INSERT INTO users (email) VALUES ($1) RETURNING id", &[&format!("b{i}@bench.test")])
                .await
                .ok()?
                .get(0);
            c.execute(
                "INSERT INTO credits (user_id, total_credits, billing_period_start, billing_period_end)
                 VALUES ($1, 2000000000, now(), now() + interval '1 day')",
                &[&u],
            )
            .await
            .ok()?;
            users.push(u);
        }
        Some((a, users))
    });
    let Some((admin_client, users)) = setup else {
        eprintln!("PostgreSQL not reachable on 127.0.0.1:5432: skipping the usage writer bench");
        return;
    };
    let guard = rt.enter();
    let db = tollgate::db::Db::new(&tollgate::config::DatabaseConfig {
        url: url.clone(),
        pool_size: 4,
        idle_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        partitions_ahead_months: 1,
    })
    .unwrap();
    let mut g = c.benchmark_group("usage_writer");
    g.throughput(Throughput::Elements(1000));
    g.sample_size(20);
    g.bench_function("write_batch_1000_rows", |b| {
        b.iter_batched(
            || {
                (0..1000)
                    .map(|i| UsageEvent {
                        user_id: users[i % users.len()],
                        ..event(i as i64)
                    })
                    .collect::<Vec<_>>()
            },
            |events| {
                rt.block_on(tollgate::flush::write_batch(&db, &events))
                    .unwrap()
            },
            BatchSize::LargeInput,
        )
    });
    // Two batches over disjoint users written at once (no shared credit rows to lock).
    g.throughput(Throughput::Elements(2000));
    g.bench_function("write_batch_2x1000_rows_concurrently", |b| {
        b.iter_batched(
            || {
                let half = users.len() / 2;
                let mk = |offset: usize| {
                    (0..1000)
                        .map(|i| UsageEvent {
                            user_id: users[offset + i % half],
                            ..event(i as i64)
                        })
                        .collect::<Vec<_>>()
                };
                (mk(0), mk(half))
            },
            |(a, b)| {
                rt.block_on(async {
                    let (x, y) = tokio::join!(
                        tollgate::flush::write_batch(&db, &a),
                        tollgate::flush::write_batch(&db, &b)
                    );
                    x.unwrap();
                    y.unwrap();
                })
            },
            BatchSize::LargeInput,
        )
    });
    // The whole flusher, end to end: 10k settled events waiting in the usage streams
    // (as settle leaves them), drained into PostgreSQL by a fresh flusher.
    let prefix = format!("benchflush{}:", &Uuid::new_v4().simple().to_string()[..8]);
    if let Ok(ledger) = rt.block_on(Ledger::connect("redis://127.0.0.1:6379", &prefix, 16)) {
        let n = 10_000usize;
        g.throughput(Throughput::Elements(n as u64));
        g.sample_size(10);
        let cfg = tollgate::config::FlushConfig {
            batch_rows: 1000,
            writers: 4,
            interval: Duration::from_millis(50),
            claim_idle: Duration::from_secs(30),
            consumer_group: "bench".into(),
        };
        g.bench_function("flusher_drains_10k_settled_events", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    rt.block_on(async {
                        let mut conn = ledger.conn();
                        let mut pipe = redis::pipe();
                        for i in 0..n {
                            let e = UsageEvent {
                                user_id: users[i % users.len()],
                                ..event(i as i64)
                            };
                            let b = ledger.bucket_of(&e.user_id);
                            pipe.cmd("XADD")
                                .arg(ledger.stream_key(b))
                                .arg("*")
                                .arg("e")
                                .arg(e.encode())
                                .ignore();
                            pipe.cmd("HSET")
                                .arg(ledger.pend_key(b, &e.user_id.to_string()))
                                .arg(e.id.to_string())
                                .arg(e.credits_used)
                                .ignore();
                        }
                        let _: () = pipe.query_async(&mut conn).await.unwrap();
                        let before: i64 = db
                            .get()
                            .await
                            .unwrap()
                            .query_one("SELECT count(*) FROM usage_history", &[])
                            .await
                            .unwrap()
                            .get(0);
                        let (stop, rx) = tokio::sync::watch::channel(false);
                        let started = std::time::Instant::now();
                        let flusher = tokio::spawn(
                            tollgate::flush::Flusher::new(ledger.clone(), db.clone(), cfg.clone())
                                .run(rx),
                        );
                        loop {
                            let now: i64 = db
                                .get()
                                .await
                                .unwrap()
                                .query_one("SELECT count(*) FROM usage_history", &[])
                                .await
                                .unwrap()
                                .get(0);
                            if now - before >= n as i64 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        total += started.elapsed();
                        let _ = stop.send(true);
                        let _ = flusher.await;
                    });
                }
                total
            })
        });
        rt.block_on(async {
            let mut conn = ledger.conn();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
            }
        });
    }
    g.finish();
    drop(db);
    drop(guard);
    rt.block_on(async {
        let _ = admin_client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = jwt, parse_route, sse_tap, cost_arith, batcher_encoding, redis_round_trip, flush_writer
}
criterion_main!(benches);
