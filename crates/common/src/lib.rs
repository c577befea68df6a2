//! Pieces both fleetsync services share: the generated gRPC code, the control-plane database
//! connection, telemetry, shutdown, the gRPC server scaffolding, the error-to-`Status` mapping,
//! the domain values both store (`model`) and the typed ids (`ids`).
#![forbid(unsafe_code)]

pub mod calls;
pub mod cli;
pub mod clock;
pub mod db;
pub mod error;
pub mod grpc;
pub mod ids;
pub mod model;
pub mod pool;
pub mod proto;
pub mod shutdown;
pub mod sql;
pub mod telemetry;

pub use db::{Backend, Db, DbError, DbOptions, SessionLimits};
pub use error::ServiceError;
pub use ids::{AgentId, JobId, RequestId, ServerId};
