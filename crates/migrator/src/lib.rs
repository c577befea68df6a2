//! The fleetsync migrator: applies control-plane schema changes and records what must be
//! re-synced. Its only network peer is the sync-agent; it never connects to a managed server.
#![forbid(unsafe_code)]

pub mod agents;
mod catalog;
pub mod commands;
pub mod config;
pub mod engine;
pub mod entry;
pub mod grants;
mod history;
pub mod migration;
pub mod model;
pub mod outbox;
pub mod service;

use anyhow::Context;
use fleetsync_common::{
    Db, grpc,
    proto::{MIGRATOR_DESCRIPTOR_SET, migrator::v1::migrator_server::MigratorServer},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;

use crate::service::MigratorService;

/// What `run` needs, resolved from the command line (or built by tests).
#[derive(Debug, Clone)]
pub struct Config {
    /// Control-plane database URL.
    pub database_url: String,
    /// How long calls in flight may take to finish on shutdown.
    pub shutdown_grace: std::time::Duration,
    /// How long health says NOT_SERVING before the server stops taking calls.
    pub drain_delay: std::time::Duration,
    /// Longest wait for another migrator's lock.
    pub lock_timeout: std::time::Duration,
    /// Bearer token and TLS.
    pub security: grpc::Security,
}

/// Serves the `Migrator` service on `listener` until `shutdown` is cancelled.
///
/// Health reports `SERVING` once the database answers, and `NOT_SERVING` as soon as shutdown
/// begins; the function returns when calls in flight have ended.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let db = Db::connect(&config.database_url).await?;
    let (router, health) = grpc::base_router(
        &[MigratorServer::<MigratorService>::NAME],
        MIGRATOR_DESCRIPTOR_SET,
        &config.security,
        Default::default(),
    )
    .await
    .context("building the gRPC server")?;
    let router = router.add_service(config.security.protect(MigratorServer::new(
        MigratorService::new(db.clone(), config.lock_timeout),
    )));

    db.ping()
        .await
        .context("checking the control-plane database")?;
    health.serving().await;
    health.follow_database(
        db.clone(),
        std::time::Duration::from_secs(2),
        shutdown.clone(),
    );
    let addr = listener
        .local_addr()
        .context("reading the listen address")?;
    tracing::info!(%addr, backend = %db.backend(), "migrator listening");

    let stop = CancellationToken::new();
    grpc::drain_then_stop(shutdown, health.clone(), config.drain_delay, stop.clone());
    grpc::serve(router, listener, health, stop, config.shutdown_grace)
        .await
        .context("serving gRPC")?;
    db.close().await;
    tracing::info!("migrator stopped");
    Ok(())
}
