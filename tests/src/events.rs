//! Reading a job's events and other helpers the end-to-end sync tests share.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fleetsync_common::proto::sync::v1::{
    self as pb, Outcome, SyncEvent, UnreachableCause, WatchSyncRequest,
    sync_agent_client::SyncAgentClient, sync_event,
};
use fleetsync_sync_agent::ssh::Timeouts;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::catalog::execute;

/// Short timeouts for fleets on loopback: a fault shows within seconds.
pub fn sync_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(3),
        handshake: Duration::from_secs(2),
        auth: Duration::from_secs(3),
        command: Duration::from_secs(10),
    }
}

/// Each server's outcome in `events`, by server id.
pub fn outcomes(events: &[SyncEvent]) -> BTreeMap<i64, pb::ServerOutcome> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(sync_event::Event::Outcome(o)) => Some((o.server_id, o.clone())),
            _ => None,
        })
        .collect()
}

/// The summary that ends a job's stream.
pub fn summary(events: &[SyncEvent]) -> pb::JobSummary {
    match events.last().and_then(|e| e.event.clone()) {
        Some(sync_event::Event::Summary(s)) => s,
        other => panic!("the stream must end with a summary, got {other:?}"),
    }
}

/// A protobuf duration as a `Duration` (panics if unset).
pub fn prost_duration(d: Option<&prost_types::Duration>) -> Duration {
    let d = d.expect("duration");
    Duration::new(d.seconds as u64, d.nanos as u32)
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:x}", crate::random_u64() >> 24)
}

/// Follows a job from `cursor` to its end (within 30 s); returns every event.
pub async fn watch(
    client: &mut SyncAgentClient<Channel>,
    job_id: &str,
    cursor: u64,
) -> Vec<SyncEvent> {
    let stream = client
        .watch_sync(WatchSyncRequest {
            job_id: job_id.into(),
            cursor,
        })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::timeout(
        Duration::from_secs(30),
        stream.map(|e| e.expect("event")).collect::<Vec<_>>(),
    )
    .await
    .expect("the watch ends within 30s")
}

/// Creates a database on the machine's MariaDB (what the hosts' `sudo mariadb` sees).
pub async fn mariadb_exec(sql: &str) {
    let db = fleetsync_common::Db::connect(&crate::db::mysql_admin_url())
        .await
        .expect("mariadb");
    execute(&db, sql).await;
    db.close().await;
}

/// Runs a statement on the machine's PostgreSQL (what the hosts' `sudo -u postgres psql` sees).
pub async fn postgres_exec(sql: &str) {
    let db = fleetsync_common::Db::connect(&crate::db::postgres_admin_url())
        .await
        .expect("postgres");
    execute(&db, sql).await;
    db.close().await;
}

/// Watches a job to its summary, resuming from the last cursor on whichever agent in `agents`
/// answers when a stream breaks (panics on a gap or a repeat, or past `within`). Returns every
/// outcome event as (cursor, server, outcome, cause) and how often the watch resumed.
pub async fn watch_resumably(
    agents: Arc<Mutex<Vec<SocketAddr>>>,
    job_id: String,
    within: Duration,
) -> (Vec<(u64, i64, Outcome, UnreachableCause)>, usize) {
    let deadline = Instant::now() + within;
    let mut cursor = 0;
    let mut events = Vec::new();
    let mut resumed = 0;
    let mut attempt = 0usize;
    loop {
        assert!(
            Instant::now() < deadline,
            "the job did not finish within {within:?}"
        );
        let addrs = agents.lock().expect("agents").clone();
        let addr = addrs[attempt % addrs.len()];
        attempt += 1;
        let stream = SyncAgentClient::new(crate::services::connect(addr).await)
            .watch_sync(WatchSyncRequest {
                job_id: job_id.clone(),
                cursor,
            })
            .await;
        let Ok(stream) = stream else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        loop {
            match stream.next().await {
                Some(Ok(event)) => {
                    assert_eq!(event.cursor, cursor + 1, "no gap, no duplicate");
                    cursor = event.cursor;
                    match event.event {
                        Some(sync_event::Event::Outcome(o)) => {
                            events.push((event.cursor, o.server_id, o.outcome(), o.cause()));
                        }
                        Some(sync_event::Event::Summary(s)) => {
                            assert_eq!(s.finished, s.total);
                            return (events, resumed);
                        }
                        None => {}
                    }
                }
                Some(Err(_)) | None => {
                    resumed += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

/// What [`watch_resumably`] returns: every outcome event as (cursor, server, outcome, cause),
/// and how often the watch resumed.
pub type Watched = (Vec<(u64, i64, Outcome, UnreachableCause)>, usize);

/// A job of every server, started on the first of `agents` and watched in the background by
/// [`watch_resumably`] on whichever of them answers.
pub struct WatchedJob {
    /// The job's id.
    pub job_id: String,
    /// The watch, to its summary.
    pub watcher: tokio::task::JoinHandle<Watched>,
}

impl WatchedJob {
    /// Starts it (`force`: offline servers too, and whatever was synced lately) and its watch,
    /// which must see the summary within `within`.
    pub async fn start(
        agents: Arc<Mutex<Vec<SocketAddr>>>,
        request_id: &str,
        force: bool,
        within: Duration,
    ) -> Self {
        let first = agents.lock().expect("agents")[0];
        let job = SyncAgentClient::new(crate::services::connect(first).await)
            .start_sync(pb::StartSyncRequest {
                all_servers: true,
                force,
                request_id: request_id.into(),
                ..Default::default()
            })
            .await
            .expect("start")
            .into_inner();
        let watcher = tokio::spawn(watch_resumably(agents, job.job_id.clone(), within));
        Self {
            job_id: job.job_id,
            watcher,
        }
    }

    /// SQL counting the job's rows that have an outcome.
    pub fn finished_sql(&self) -> String {
        format!(
            "SELECT COUNT(*) FROM sync_job_servers WHERE job_id = '{}' AND seq IS NOT NULL",
            self.job_id
        )
    }

    /// Waits until at least `n` of its servers have an outcome (at most `within`).
    pub async fn wait_finished(&self, db: &fleetsync_common::Db, n: i64, within: Duration) {
        crate::catalog::wait_for_count(db, &self.finished_sql(), |f| f >= n, within, "progress")
            .await;
    }

    /// The watch's result, once the summary came.
    pub async fn watched(self) -> Watched {
        self.watcher.await.expect("watcher")
    }
}
