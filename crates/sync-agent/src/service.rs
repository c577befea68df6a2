//! The gRPC services of the agent: `SyncAgent` and `Fleet`.
//!
//! The contract is complete; the behaviour arrives with the inventory work, and until then each
//! call answers `UNIMPLEMENTED` with a message saying so.

use std::pin::Pin;

use fleetsync_common::{
    Db, ServiceError,
    proto::sync::v1::{
        CheckConnectionRequest, CheckConnectionResponse, DeleteServerRequest, DeleteServerResponse,
        GetServerRequest, GetServerResponse, GetSyncJobRequest, GetSyncJobResponse,
        ListServersRequest, ListServersResponse, ResetHostKeyRequest, ResetHostKeyResponse,
        StartSyncRequest, StartSyncResponse, SyncEvent, UpsertServerRequest, UpsertServerResponse,
        WatchSyncRequest, fleet_server::Fleet, sync_agent_server::SyncAgent,
    },
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::ssh::SshClient;

/// A stream of sync events as the services return it.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<SyncEvent, Status>> + Send>>;

/// State shared by the agent's services.
#[derive(Debug, Clone)]
pub struct AgentState {
    /// The control-plane database.
    pub db: Db,
    /// The SSH client with the agent's keys and timeouts.
    pub ssh: SshClient,
}

/// `fleetsync.sync.v1.SyncAgent`.
#[derive(Debug, Clone)]
pub struct SyncAgentService {
    #[allow(dead_code)]
    state: AgentState,
}

impl SyncAgentService {
    /// The service over shared agent state.
    pub fn new(state: AgentState) -> Self {
        Self { state }
    }
}

fn pending(rpc: &'static str) -> Status {
    ServiceError::Unimplemented(rpc).into()
}

#[tonic::async_trait]
impl SyncAgent for SyncAgentService {
    type WatchSyncStream = EventStream;
    type SyncStream = EventStream;

    async fn start_sync(
        &self,
        _request: Request<StartSyncRequest>,
    ) -> Result<Response<StartSyncResponse>, Status> {
        Err(pending("SyncAgent/StartSync"))
    }

    async fn watch_sync(
        &self,
        _request: Request<WatchSyncRequest>,
    ) -> Result<Response<Self::WatchSyncStream>, Status> {
        Err(pending("SyncAgent/WatchSync"))
    }

    async fn sync(
        &self,
        _request: Request<StartSyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        Err(pending("SyncAgent/Sync"))
    }

    async fn get_sync_job(
        &self,
        _request: Request<GetSyncJobRequest>,
    ) -> Result<Response<GetSyncJobResponse>, Status> {
        Err(pending("SyncAgent/GetSyncJob"))
    }

    async fn check_connection(
        &self,
        _request: Request<CheckConnectionRequest>,
    ) -> Result<Response<CheckConnectionResponse>, Status> {
        Err(pending("SyncAgent/CheckConnection"))
    }
}

/// `fleetsync.sync.v1.Fleet`.
#[derive(Debug, Clone)]
pub struct FleetService {
    #[allow(dead_code)]
    state: AgentState,
}

impl FleetService {
    /// The service over shared agent state.
    pub fn new(state: AgentState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl Fleet for FleetService {
    async fn upsert_server(
        &self,
        _request: Request<UpsertServerRequest>,
    ) -> Result<Response<UpsertServerResponse>, Status> {
        Err(pending("Fleet/UpsertServer"))
    }

    async fn delete_server(
        &self,
        _request: Request<DeleteServerRequest>,
    ) -> Result<Response<DeleteServerResponse>, Status> {
        Err(pending("Fleet/DeleteServer"))
    }

    async fn list_servers(
        &self,
        _request: Request<ListServersRequest>,
    ) -> Result<Response<ListServersResponse>, Status> {
        Err(pending("Fleet/ListServers"))
    }

    async fn get_server(
        &self,
        _request: Request<GetServerRequest>,
    ) -> Result<Response<GetServerResponse>, Status> {
        Err(pending("Fleet/GetServer"))
    }

    async fn reset_host_key(
        &self,
        _request: Request<ResetHostKeyRequest>,
    ) -> Result<Response<ResetHostKeyResponse>, Status> {
        Err(pending("Fleet/ResetHostKey"))
    }
}
