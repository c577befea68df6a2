//! The gRPC services of the agent: `SyncAgent` (jobs and their streams) and `Fleet` (servers
//! and their inventory), over the store and the scheduler's signals.

pub(crate) mod convert;
mod feeds;
mod fields;
mod fleet;
mod sync;
mod sync_requests;

use std::{pin::Pin, time::Duration};

use fleetsync_common::proto::sync::v1::SyncEvent;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub use feeds::Feeds;
pub use fleet::FleetService;
pub use sync::SyncAgentService;

use crate::{runner::Signals, ssh::SshClient, store::Store};

/// A stream of sync events as the services return it.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<SyncEvent, Status>> + Send>>;

/// State shared by the agent's services.
#[derive(Debug, Clone)]
pub struct AgentState {
    /// The control-plane database.
    pub store: Store,
    /// The SSH client with the agent's keys and timeouts.
    pub ssh: SshClient,
    /// Wakes the scheduler, and tells watchers that outcomes were recorded.
    pub signals: Signals,
    /// Cancelled when the agent shuts down: streams end.
    pub shutdown: CancellationToken,
    /// How often watchers re-read the database when nothing woke them (outcomes recorded by
    /// other agents).
    pub watch_poll: Duration,
    /// The jobs being watched: their watchers share reads.
    pub feeds: Feeds,
    /// One permit per open event stream: streams are capped.
    pub streams: std::sync::Arc<tokio::sync::Semaphore>,
    /// One permit per `CheckConnection` in flight: each holds a socket and a task for up to
    /// the SSH timeouts, so they are capped too.
    pub checks: std::sync::Arc<tokio::sync::Semaphore>,
}
