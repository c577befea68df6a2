//! The `fleetsync.migrator.v1.Migrator` gRPC service.
//!
//! The contract is complete; the engine behind it arrives with the migration work, and until
//! then each call answers `UNIMPLEMENTED` with a message saying so.

use std::pin::Pin;

use fleetsync_common::{
    Db, ServiceError,
    proto::migrator::v1::{
        GetStatusRequest, GetStatusResponse, MigrateEvent, MigrateRequest, PlanRequest,
        PlanResponse, VerifyRequest, VerifyResponse, migrator_server::Migrator,
    },
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// `fleetsync.migrator.v1.Migrator`.
#[derive(Debug, Clone)]
pub struct MigratorService {
    #[allow(dead_code)]
    db: Db,
}

impl MigratorService {
    /// The service over the control-plane database.
    pub fn new(db: Db) -> Self {
        Self { db }
    }
}

fn pending(rpc: &'static str) -> Status {
    ServiceError::Unimplemented(rpc).into()
}

#[tonic::async_trait]
impl Migrator for MigratorService {
    type MigrateStream = Pin<Box<dyn Stream<Item = Result<MigrateEvent, Status>> + Send>>;

    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        Err(pending("Migrator/GetStatus"))
    }

    async fn plan(&self, _request: Request<PlanRequest>) -> Result<Response<PlanResponse>, Status> {
        Err(pending("Migrator/Plan"))
    }

    async fn migrate(
        &self,
        _request: Request<MigrateRequest>,
    ) -> Result<Response<Self::MigrateStream>, Status> {
        Err(pending("Migrator/Migrate"))
    }

    async fn verify(
        &self,
        _request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        Err(pending("Migrator/Verify"))
    }
}
