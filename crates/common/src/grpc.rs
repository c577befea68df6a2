//! gRPC server scaffolding both services use: health, reflection (v1 and v1alpha, so that
//! grpcurl 1.8 works as well as newer clients), and serving until shutdown.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::Router};
use tonic_health::{ServingStatus, server::HealthReporter};

/// The health statuses of one server: the whole server (`""`) and each named service.
#[derive(Clone, Debug)]
pub struct Health {
    reporter: HealthReporter,
    services: Vec<&'static str>,
}

impl Health {
    /// Marks the server and every service `SERVING`.
    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    /// Marks the server and every service `NOT_SERVING`.
    pub async fn not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for service in &self.services {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

/// A router with health and reflection, ready for the service's own services, and the health
/// handle. Everything starts `NOT_SERVING`: call [`Health::serving`] once the service is ready.
///
/// `services` are the fully qualified names the health service reports on, e.g.
/// `fleetsync.sync.v1.SyncAgent`; `descriptor_set` is the encoded descriptor set of the
/// service's own protos, served by reflection.
pub async fn base_router(
    services: &[&'static str],
    descriptor_set: &'static [u8],
) -> Result<(Router, Health), BuildError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health {
        reporter,
        services: services.to_vec(),
    };
    health.not_serving().await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptor_set)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptor_set)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let router = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((router, health))
}

/// Serves `router` on `listener` until `shutdown` is cancelled. Health turns `NOT_SERVING`
/// first, then the server stops accepting and waits up to `grace` for calls in flight to end
/// (a health watch or a sync stream may never end by itself); then it stops regardless.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    health: Health,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpListenerStream::new(listener);
    let signal = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            health.not_serving().await;
            tracing::info!(grace = %humantime::format_duration(grace), "health is NOT_SERVING, draining calls in flight");
        }
    };
    let server = router.serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("calls still in flight after the shutdown grace period, closing them");
            Ok(())
        }
    }
}

/// The reflection service could not be built from the descriptor sets (a build bug).
pub type BuildError = tonic_reflection::server::Error;
