//! The fleetsync sync-agent: the one component that opens SSH connections to managed servers.
//! It serves `SyncAgent` and `Fleet` over gRPC, with health and reflection.
#![forbid(unsafe_code)]

pub mod config;
pub mod service;
pub mod ssh;

use anyhow::Context;
use fleetsync_common::{
    Db, grpc,
    proto::{
        SYNC_DESCRIPTOR_SET,
        sync::v1::{fleet_server::FleetServer, sync_agent_server::SyncAgentServer},
    },
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;

use crate::{
    service::{AgentState, FleetService, SyncAgentService},
    ssh::SshClient,
};

/// What `run` needs, resolved from the command line (or built by tests).
#[derive(Debug, Clone)]
pub struct Config {
    /// Control-plane database URL.
    pub database_url: String,
    /// How long calls in flight may take to finish on shutdown.
    pub shutdown_grace: std::time::Duration,
    /// SSH client with keys and timeouts.
    pub ssh: SshClient,
}

/// Runs the agent on `listener` until `shutdown` is cancelled.
///
/// Health reports `SERVING` once the database answers, and `NOT_SERVING` as soon as shutdown
/// begins; the function returns when calls in flight have ended.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = Db::connect(&config.database_url).await?;
    let shutdown_grace = config.shutdown_grace;
    let state = AgentState {
        db: db.clone(),
        ssh: config.ssh,
    };
    let (router, health) = grpc::base_router(
        &[
            SyncAgentServer::<SyncAgentService>::NAME,
            FleetServer::<FleetService>::NAME,
        ],
        SYNC_DESCRIPTOR_SET,
    )
    .await
    .context("building the gRPC server")?;
    let router = router
        .add_service(SyncAgentServer::new(SyncAgentService::new(state.clone())))
        .add_service(FleetServer::new(FleetService::new(state)));

    db.ping()
        .await
        .context("checking the control-plane database")?;
    health.serving().await;
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    tracing::info!(%addr, backend = %db.backend(), "sync-agent listening");

    grpc::serve(router, listener, health, shutdown, shutdown_grace)
        .await
        .context("serving gRPC")?;
    db.close().await;
    tracing::info!("sync-agent stopped");
    Ok(())
}

/// Builds the run configuration from `sync-agent serve` arguments, loading the key files.
pub fn config_from_args(args: &config::ServeArgs) -> anyhow::Result<Config> {
    let keys = if args.ssh.ssh_keys.is_empty() {
        tracing::warn!("no --ssh-key given: every sync will end with AUTH_FAILED");
        ssh::ClientKeys::default()
    } else {
        let keys = ssh::ClientKeys::load(&args.ssh.ssh_keys)?;
        tracing::info!(keys = ?keys.fingerprints(), "loaded ssh keys");
        keys
    };
    Ok(Config {
        database_url: args.common.database_url.clone(),
        shutdown_grace: args.common.shutdown_grace.into(),
        ssh: SshClient::new(args.ssh.timeouts(), args.ssh.output_cap, keys),
    })
}
