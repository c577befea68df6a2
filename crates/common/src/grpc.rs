//! gRPC server scaffolding both services use: health, reflection (v1 and v1alpha, so that
//! grpcurl 1.8 works as well as newer clients), and serving until shutdown.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    Request, Status,
    service::interceptor::InterceptedService,
    transport::{Identity, Server, ServerTlsConfig, server::TcpIncoming},
};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{calls::CallCounter, cli::SecurityArgs};

/// A server's router: its services under the [`CallCounter`] layer.
pub type Router =
    tonic::transport::server::Router<tower_layer::Stack<CallCounter, tower_layer::Identity>>;

/// The bearer tokens a server accepts: any line of the token file. Shared by every interceptor
/// and replaced whole when the file changes.
type Tokens = Arc<std::sync::RwLock<Arc<[String]>>>;

/// TLS for a client of an agent: with `ca_pem`, that CA alone is trusted (a private CA, or a
/// public one pinned); without, the public web PKI (Mozilla's roots, built in).
pub fn client_tls(ca_pem: Option<Vec<u8>>) -> tonic::transport::ClientTlsConfig {
    let tls = tonic::transport::ClientTlsConfig::new();
    match ca_pem {
        Some(pem) => tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
        None => tls.with_webpki_roots(),
    }
}

/// How a server is protected: optional bearer tokens (every RPC but health) and optional TLS.
#[derive(Clone, Default)]
pub struct Security {
    token: Option<Tokens>,
    tls: Option<ServerTlsConfig>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Security")
            .field("token", &self.token.is_some())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Why the security settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The token file holds no token.
    #[error("the token file {0} holds no token")]
    EmptyToken(String),
    /// Listening beyond loopback without a token.
    #[error(
        "refusing to listen on {0} without --auth-token-file: anyone who can reach it could \
         drive the fleet. Give a token, listen on loopback, or pass --allow-unauthenticated"
    )]
    Exposed(SocketAddr),
    /// A bearer token on a listener beyond loopback without TLS: it would cross the network in
    /// clear.
    #[error(
        "refusing to take a bearer token in clear text on {0}: add --tls-cert and --tls-key, \
         listen on loopback (behind a TLS proxy), or pass --allow-plaintext-token"
    )]
    PlaintextToken(SocketAddr),
}

fn read(path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Reads a bearer token file: one token per line (blank lines and `#` comments ignored); none
/// is an error. A server accepts every one of them, so that a token is rotated without
/// downtime: add the new line, move the clients to it, remove the old line.
pub fn read_tokens(path: &Path) -> Result<Vec<String>, SecurityError> {
    let tokens: Vec<String> = String::from_utf8_lossy(&read(path)?)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if tokens.is_empty() {
        return Err(SecurityError::EmptyToken(path.display().to_string()));
    }
    Ok(tokens)
}

/// The token a client sends: the first of the file's.
pub fn read_token(path: &Path) -> Result<String, SecurityError> {
    Ok(read_tokens(path)?.swap_remove(0))
}

/// How often a server reads its token file again.
const TOKEN_RELOAD: Duration = Duration::from_secs(2);

/// Reads `path` again every [`TOKEN_RELOAD`] and replaces the accepted tokens when its tokens
/// change; a file that cannot be read or holds none keeps the ones in use (with a warning).
fn reload_tokens(path: std::path::PathBuf, tokens: Tokens) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(TOKEN_RELOAD);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            interval.tick().await;
            match read_tokens(&path) {
                Ok(read) => {
                    warned = false;
                    let current = tokens.read().unwrap_or_else(|e| e.into_inner()).clone();
                    if *current != *read {
                        tracing::info!(file = %path.display(), tokens = read.len(), "bearer tokens reloaded");
                        *tokens.write().unwrap_or_else(|e| e.into_inner()) = read.into();
                    }
                }
                Err(err) if !warned => {
                    warned = true;
                    tracing::warn!(error = %err, "keeping the bearer tokens in use");
                }
                Err(_) => {}
            }
        }
    });
}

impl Security {
    /// Security from the command line, checked against the address the server will listen on.
    pub fn from_args(args: &SecurityArgs, listen: SocketAddr) -> Result<Self, SecurityError> {
        let token: Option<Tokens> = match &args.auth_token_file {
            Some(path) => {
                let tokens: Tokens = Arc::new(std::sync::RwLock::new(read_tokens(path)?.into()));
                // The binaries run in a runtime; a caller without one reads the file once.
                if tokio::runtime::Handle::try_current().is_ok() {
                    reload_tokens(path.clone(), Arc::clone(&tokens));
                }
                Some(tokens)
            }
            None => None,
        };
        if token.is_none() && !listen.ip().is_loopback() && !args.allow_unauthenticated {
            return Err(SecurityError::Exposed(listen));
        }
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                Some(ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?)))
            }
            _ => None,
        };
        if token.is_some()
            && tls.is_none()
            && !listen.ip().is_loopback()
            && !args.allow_plaintext_token
        {
            return Err(SecurityError::PlaintextToken(listen));
        }
        Ok(Self { token, tls })
    }

    /// Only a token (tests).
    pub fn with_token(token: &str) -> Self {
        Self {
            token: Some(Arc::new(std::sync::RwLock::new(
                vec![token.to_owned()].into(),
            ))),
            tls: None,
        }
    }

    /// True if a token is required.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The interceptor that checks the bearer token (or lets everything through without one).
    pub fn interceptor(&self) -> Auth {
        Auth {
            token: self.token.clone(),
        }
    }

    /// Wraps a service in the token check.
    pub fn protect<S>(&self, service: S) -> InterceptedService<S, Auth> {
        InterceptedService::new(service, self.interceptor())
    }
}

/// Checks `authorization: Bearer TOKEN` against each accepted token, in constant time.
#[derive(Clone)]
pub struct Auth {
    token: Option<Tokens>,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let accepted = expected.read().unwrap_or_else(|e| e.into_inner()).clone();
        // Every token compared, so the time says nothing about which one matched.
        let matched = accepted.iter().fold(false, |found, t| {
            constant_time_eq(given.as_bytes(), t.as_bytes()) | found
        });
        if matched {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong bearer token (send `authorization: Bearer TOKEN`)",
            ))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

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

    /// Keeps health in step with the database until `shutdown`: `NOT_SERVING` while `ping`
    /// fails (or takes more than two seconds), `SERVING` again when it answers. Health reports
    /// what the service can do: without its database it can do nothing useful.
    pub fn follow_database(
        &self,
        db: crate::Db,
        every: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let health = self.clone();
        tokio::spawn(async move {
            let mut serving = true;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(2), db.ping()).await,
                    Ok(Ok(()))
                );
                if shutdown.is_cancelled() {
                    return;
                }
                if ok != serving {
                    serving = ok;
                    if ok {
                        tracing::info!("control-plane database answers again: SERVING");
                        health.serving().await;
                    } else {
                        tracing::warn!("control-plane database does not answer: NOT_SERVING");
                        health.not_serving().await;
                    }
                }
            }
        })
    }

    /// Sets the status of one named entry that is not a gRPC service of its own (e.g. the
    /// agent's claiming of work), leaving the server's and the services' statuses alone.
    pub async fn set_entry(&self, name: &str, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(name, status).await;
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
/// service's own protos, served by reflection. `calls` counts every call (see
/// [`CallCounter`]; `CallCounter::default()` counts nothing).
pub async fn base_router(
    services: &[&'static str],
    descriptor_set: &'static [u8],
    security: &Security,
    calls: CallCounter,
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

    let mut builder = Server::builder();
    if let Some(tls) = &security.tls {
        builder = builder.tls_config(tls.clone()).map_err(BuildError::Tls)?;
    }
    // Health answers everyone (load balancers, orchestrators); reflection needs the token.
    let router = builder
        .layer(calls)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(security.protect(reflection_v1))
        .add_service(security.protect(reflection_v1alpha));
    Ok((router, health))
}

/// Runs `until` while health alone answers on `listener`, `NOT_SERVING` for the server and
/// every one of `services` (a service waiting for its database at start: a service manager and
/// a load balancer see it alive but not ready, instead of a refused port or a crash loop).
/// The listener is only borrowed: the full router serves it afterwards; connections made in
/// the meantime are closed when `until` ends, and clients connect again.
pub async fn not_serving_until<F: std::future::Future>(
    listener: &TcpListener,
    services: &[&'static str],
    descriptor_set: &'static [u8],
    security: &Security,
    until: F,
) -> Result<F::Output, BuildError> {
    // Health (NOT_SERVING) and reflection, so that grpcurl finds `Health/Check`; no services.
    let (router, _health) =
        base_router(services, descriptor_set, security, CallCounter::default()).await?;
    let stop = CancellationToken::new();
    let server =
        router.serve_with_incoming_shutdown(Accepting(listener), stop.clone().cancelled_owned());
    tokio::pin!(server);
    tokio::pin!(until);
    let output = tokio::select! {
        output = &mut until => output,
        ended = &mut server => {
            if let Err(err) = ended {
                tracing::warn!(error = %err, "the health-only server stopped; waiting without it");
            }
            return Ok(until.await);
        }
    };
    stop.cancel();
    // Health checks are short; a client that keeps its connection open is cut after a moment.
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    Ok(output)
}

/// The connections a borrowed listener accepts, as a stream.
struct Accepting<'a>(&'a TcpListener);

impl tokio_stream::Stream for Accepting<'_> {
    type Item = std::io::Result<tokio::net::TcpStream>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_accept(cx).map(|accepted| {
            Some(accepted.map(|(stream, _)| {
                // As `serve` does: no delayed-ACK wait on small answers.
                let _ = stream.set_nodelay(true);
                stream
            }))
        })
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled. Health turns `NOT_SERVING`
/// first, then the server stops accepting and waits up to `grace` for calls in flight to end
/// (a health watch or a sync stream may never end by itself); then it stops regardless.
/// The drain that load balancers need: on `shutdown`, health turns `NOT_SERVING` at once while
/// the server goes on serving every call for `delay`; then `stop` is cancelled and the server
/// stops taking calls (see [`serve`]). Without the delay, a load balancer or a Kubernetes probe
/// rarely sees `NOT_SERVING` before the connection is refused.
pub fn drain_then_stop(
    shutdown: CancellationToken,
    health: Health,
    delay: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = stop.cancelled() => return,
        }
        health.not_serving().await;
        if !delay.is_zero() {
            tracing::info!(delay = %humantime::format_duration(delay), "health is NOT_SERVING; still serving while load balancers notice");
            tokio::time::sleep(delay).await;
        }
        stop.cancel();
    })
}

/// Serves until `shutdown` is cancelled (after the drain delay, with [`drain_then_stop`]),
/// then lets calls in flight finish for at most `grace`.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    health: Health,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    // TCP_NODELAY on every accepted connection: without it a response of more than one
    // segment (a page of jobs, a stream's batch of outcomes) waited ~40 ms for the client's
    // delayed ACK (`ListJobs` took 43 ms whatever it read). Keepalive notices a client that
    // vanished with a stream open.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
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

/// The server could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The reflection service could not be built from the descriptor sets (a build bug).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS certificate or key is unusable.
    #[error("TLS: {0}")]
    Tls(tonic::transport::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn token_check() {
        let mut auth = Security::with_token("s3cret").interceptor();
        let mut request = Request::new(());
        assert_eq!(
            auth.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        request
            .metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(auth.call(request).is_ok());
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert("authorization", "Bearer s3cres".parse().unwrap());
        assert!(auth.call(wrong).is_err());
        assert!(
            Security::default()
                .interceptor()
                .call(Request::new(()))
                .is_ok()
        );
        assert!(format!("{:?}", Security::with_token("s3cret")).contains("token: true"));
        assert!(!format!("{:?}", Security::with_token("s3cret")).contains("s3cret"));
    }

    /// No TLS, no overrides; a token file if given.
    fn plain_args(auth_token_file: Option<std::path::PathBuf>) -> SecurityArgs {
        SecurityArgs {
            auth_token_file,
            tls_cert: None,
            tls_key: None,
            allow_unauthenticated: false,
            allow_plaintext_token: false,
        }
    }

    #[test]
    fn exposure_needs_a_token() {
        let args = plain_args(None);
        let err = Security::from_args(&args, "0.0.0.0:50051".parse().unwrap()).unwrap_err();
        assert!(
            err.to_string()
                .contains("refusing to listen on 0.0.0.0:50051"),
            "{err}"
        );
        assert!(Security::from_args(&args, "127.0.0.1:50051".parse().unwrap()).is_ok());
        assert!(Security::from_args(&args, "[::1]:50051".parse().unwrap()).is_ok());
        let allowed = SecurityArgs {
            allow_unauthenticated: true,
            ..args
        };
        assert!(Security::from_args(&allowed, "0.0.0.0:50051".parse().unwrap()).is_ok());
    }

    #[test]
    fn a_token_beyond_loopback_needs_tls() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let args = plain_args(Some(token));
        let err = Security::from_args(&args, "0.0.0.0:50051".parse().unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("in clear text on 0.0.0.0:50051"),
            "{err}"
        );
        assert!(Security::from_args(&args, "127.0.0.1:50051".parse().unwrap()).is_ok());
        let allowed = SecurityArgs {
            allow_plaintext_token: true,
            ..args
        };
        assert!(Security::from_args(&allowed, "0.0.0.0:50051".parse().unwrap()).is_ok());
    }
}
