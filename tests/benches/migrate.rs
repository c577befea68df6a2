//! `just bench-migrate`: wall time of `migrator migrate` from the version before the
//! charset/collation migration to the latest, with 0, 1,000 and 10,000 registered servers (all
//! unreachable, agent down), on each backend. Prints medians and the ratio to 0 servers: the
//! migration must not depend on the fleet.

use std::time::{Duration, Instant};

use fleetsync_common::Backend;
use fleetsync_tests::{
    TestDb,
    catalog::{execute, insert_servers},
    db::ALL_BACKENDS,
    migrator::migrator,
};

const PRE_INCIDENT: &str = "20240101000004";
const FLEETS: [usize; 3] = [0, 1_000, 10_000];

fn runs() -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7)
}

async fn one_run(backend: Backend, servers: usize, agent_url: &str) -> Duration {
    let db = TestDb::create(backend).await;
    let run = migrator(
        db.url(),
        &["migrate", "--no-dispatch", "--target", PRE_INCIDENT],
    )
    .await;
    assert_eq!(run.code(), 0, "{}", run.stderr);
    let conn = db.connect().await;
    let databases = if backend == Backend::MySql {
        "`databases`"
    } else {
        "databases"
    };
    insert_servers(&conn, servers, 1, |_| "127.0.0.1".into()).await;
    if servers > 0 {
        execute(
            &conn,
            &format!(
                "INSERT INTO {databases} (server_id, name, status, created_at, updated_at) \
                 SELECT id, 'app', 'ready', 0, 0 FROM servers"
            ),
        )
        .await;
    }
    conn.close().await;

    let started = Instant::now();
    let run = migrator(db.url(), &["migrate", "--agent-url", agent_url]).await;
    let elapsed = started.elapsed();
    assert_eq!(run.code(), 0, "{}{}", run.stdout, run.stderr);
    elapsed
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let runs = runs();
    // The agent is down: a loopback port nothing listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let agent_url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);

    println!(
        "migrate {PRE_INCIDENT} -> latest, agent down, servers unreachable; median of {runs} runs"
    );
    println!(
        "{:<10} {:>8} {:>12} {:>12} {:>14}",
        "backend", "servers", "median", "min", "ratio to 0"
    );
    let mut worst: f64 = 0.0;
    for backend in ALL_BACKENDS {
        let mut base = None;
        for servers in FLEETS {
            // Interleave nothing: runs of one size back to back, after one warm-up.
            one_run(backend, servers, &agent_url).await;
            let mut samples = Vec::with_capacity(runs);
            for _ in 0..runs {
                samples.push(one_run(backend, servers, &agent_url).await);
            }
            let min = *samples.iter().min().expect("samples");
            let median = median(samples);
            let base = *base.get_or_insert(median);
            let ratio = median.as_secs_f64() / base.as_secs_f64();
            worst = worst.max(ratio);
            println!(
                "{:<10} {:>8} {:>9.1} ms {:>9.1} ms {:>14.2}",
                backend.as_str(),
                servers,
                median.as_secs_f64() * 1e3,
                min.as_secs_f64() * 1e3,
                ratio
            );
        }
    }
    println!("worst ratio: {worst:.2} (target: at most 1.20)");
}
