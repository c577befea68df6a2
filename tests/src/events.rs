//! Reading a job's events and other helpers the end-to-end sync tests share.

use std::{collections::BTreeMap, time::Duration};

use fleetsync_common::proto::sync::v1::{
    self as pb, SyncEvent, WatchSyncRequest, sync_agent_client::SyncAgentClient, sync_event,
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
