//! How the connection pools are used, for the agent's metrics: connections open and idle per
//! pool, and how long callers wait for a connection (over every pool of the process).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use sqlx::{Database, Pool, pool::PoolConnection};

use crate::Db;

/// A pool's connections right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    /// Connections open (idle or in use).
    pub open: u32,
    /// Open connections nobody uses.
    pub idle: u32,
    /// Most connections the pool may open.
    pub max: u32,
}

impl PoolUsage {
    /// Connections in use.
    pub fn in_use(&self) -> u32 {
        self.open.saturating_sub(self.idle)
    }
}

impl Db {
    /// How this pool's connections are used right now.
    pub fn usage(&self) -> PoolUsage {
        fn of<DB: Database>(pool: &Pool<DB>) -> PoolUsage {
            PoolUsage {
                open: pool.size(),
                idle: u32::try_from(pool.num_idle()).unwrap_or(u32::MAX),
                max: pool.options().get_max_connections(),
            }
        }
        match self {
            Self::Sqlite(pool) => of(pool),
            Self::Postgres(pool) => of(pool),
            Self::MySql(pool) => of(pool),
        }
    }
}

/// Upper bounds (seconds) of the wait histogram's buckets.
pub const WAIT_BUCKETS: [f64; 10] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// A histogram of waits for a pooled connection, lock-free.
#[derive(Debug)]
pub struct WaitHistogram {
    buckets: [AtomicU64; WAIT_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// A snapshot of a [`WaitHistogram`]: sum in seconds, count, and the waits in each bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitSnapshot {
    /// Total seconds waited.
    pub sum: f64,
    /// Waits observed.
    pub count: u64,
    /// `(upper bound, waits in this bucket only)`, the last bound `+Inf`.
    pub buckets: Vec<(f64, u64)>,
}

impl WaitHistogram {
    const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; WAIT_BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one wait.
    pub fn observe(&self, waited: Duration) {
        let seconds = waited.as_secs_f64();
        if let Some(i) = WAIT_BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// What was recorded so far.
    pub fn snapshot(&self) -> WaitSnapshot {
        let count = self.count.load(Ordering::Relaxed);
        let mut buckets: Vec<(f64, u64)> = WAIT_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(bound, n)| (*bound, n.load(Ordering::Relaxed)))
            .collect();
        let bounded: u64 = buckets.iter().map(|(_, n)| n).sum();
        buckets.push((f64::INFINITY, count.saturating_sub(bounded)));
        WaitSnapshot {
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count,
            buckets,
        }
    }
}

/// Every wait for a pooled connection in this process: statements outside a transaction and
/// the start of each transaction (which includes its `BEGIN`).
pub static ACQUIRE_WAIT: WaitHistogram = WaitHistogram::new();

/// A connection from `pool`, the wait recorded in [`ACQUIRE_WAIT`].
pub(crate) async fn acquire<DB: Database>(
    pool: &Pool<DB>,
) -> Result<PoolConnection<DB>, sqlx::Error> {
    let started = Instant::now();
    let connection = pool.acquire().await;
    ACQUIRE_WAIT.observe(started.elapsed());
    match connection {
        Err(err) => Err(explain(pool, err).await),
        ok => ok,
    }
}

/// Runs `begin` (`pool`'s `begin`), the wait recorded in [`ACQUIRE_WAIT`].
pub(crate) async fn timed<DB: Database, T>(
    pool: &Pool<DB>,
    begin: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    let started = Instant::now();
    let result = begin.await;
    ACQUIRE_WAIT.observe(started.elapsed());
    match result {
        Err(err) => Err(explain(pool, err).await),
        ok => ok,
    }
}

/// A pool that gave up waiting because it could not open a connection (not because all of its
/// connections were busy) only says "pool timed out": one direct attempt says why, e.g.
/// PostgreSQL's "sorry, too many clients already". The error stays one that passes
/// (`sql::classify`: unavailable).
async fn explain<DB: Database>(pool: &Pool<DB>, err: sqlx::Error) -> sqlx::Error {
    use sqlx::ConnectOptions;
    if !matches!(err, sqlx::Error::PoolTimedOut)
        || pool.size() >= pool.options().get_max_connections()
    {
        return err;
    }
    let options = pool.connect_options();
    match tokio::time::timeout(Duration::from_secs(2), options.connect()).await {
        Ok(Err(reason)) => std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!(
                "no connection within the pool's timeout; the database refuses new ones: {reason}"
            ),
        )
        .into(),
        Ok(Ok(connection)) => {
            use sqlx::Connection;
            let _ = connection.close().await;
            err
        }
        Err(_) => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_each_bucket() {
        let histogram = WaitHistogram::new();
        histogram.observe(Duration::from_micros(100));
        histogram.observe(Duration::from_millis(20));
        histogram.observe(Duration::from_secs(10));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 3);
        assert_eq!(snapshot.buckets[0], (0.000_5, 1));
        assert_eq!(snapshot.buckets[5], (0.025, 1));
        assert_eq!(snapshot.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((snapshot.sum - 10.0201).abs() < 1e-6, "{}", snapshot.sum);
    }
}
