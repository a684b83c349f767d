//! Times Redis calls through each layer the gateway uses (raw TCP, the multiplexed
//! connection, the connection manager, the ledger's scripts) on a current-thread or
//! (argument `mt`) multi-thread runtime. See BENCHMARKS.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn p50(mut v: Vec<u128>) -> u128 {
    v.sort();
    v[v.len() / 2]
}

async fn run() {
    let n = 3000;
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut cm = redis::aio::ConnectionManager::new(client.clone())
        .await
        .unwrap();
    let mut mx = client.get_multiplexed_async_connection().await.unwrap();
    let mut raw = tokio::net::TcpStream::connect("127.0.0.1:6379")
        .await
        .unwrap();
    raw.set_nodelay(true).unwrap();
    let ledger = tollgate::ledger::Ledger::connect("redis://127.0.0.1:6379", "probe:", 16)
        .await
        .unwrap();
    let user = uuid::Uuid::new_v4();
    let mut buf = [0u8; 64];
    let mut conn = ledger.conn();
    let k = ledger.keys(&user);
    let _: () = redis::cmd("HSET")
        .arg(&k.acct)
        .arg("bal")
        .arg(1_000_000_000i64)
        .query_async(&mut conn)
        .await
        .unwrap();
    let h = tollgate::ledger::HoldRequest {
        price_per_1k: 1000,
        prompt_tokens: 10,
        max_tokens: 10,
        min_tokens: 1,
        ttl_ms: 60000,
    };
    for round in 0..2 {
        let mut a = vec![];
        let mut b = vec![];
        let mut c = vec![];
        let mut d = vec![];
        let mut e = vec![];
        for _ in 0..n {
            let t = Instant::now();
            let _: String = redis::cmd("PING").query_async(&mut cm).await.unwrap();
            a.push(t.elapsed().as_micros());
            let t = Instant::now();
            let _: String = redis::cmd("PING").query_async(&mut mx).await.unwrap();
            b.push(t.elapsed().as_micros());
            let t = Instant::now();
            raw.write_all(b"PING\r\n").await.unwrap();
            let _ = raw.read(&mut buf).await.unwrap();
            c.push(t.elapsed().as_micros());
            let t = Instant::now();
            let _ = ledger.balance(&user).await.unwrap();
            d.push(t.elapsed().as_micros());
            let rid = uuid::Uuid::now_v7();
            let t = Instant::now();
            let r = ledger.reserve(&user, &rid, &h).await.unwrap();
            assert!(
                matches!(r, tollgate::ledger::Reserve::Admitted { .. }),
                "{r:?}"
            );
            ledger.settle(&user, &rid, 1, "x").await.unwrap();
            e.push(t.elapsed().as_micros());
        }
        println!("round {round}: p50 µs  conn-manager {}  multiplexed {}  raw-tcp {}  ledger.balance {}  reserve+settle {}", p50(a), p50(b), p50(c), p50(d), p50(e));
    }
    // Leave nothing behind in the shared Redis.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("probe:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

fn main() {
    let mt = std::env::args().any(|a| a == "mt");
    let rt = if mt {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    println!(
        "runtime: {}",
        if mt { "multi_thread" } else { "current_thread" }
    );
    rt.block_on(run());
}
