//! The SSH client: connect, check the server's host key against the pinned one, authenticate
//! with the agent's key files and run commands, every stage under a hard timeout.
//!
//! russh has no connect timeout of its own and no notion of a banner stage, so the TCP connect
//! and the SSH identification line are handled here before russh takes the stream over.
//! `connection` holds an authenticated connection: authentication and commands.

mod connection;
mod error;
mod keys;
mod stream;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use russh::{
    client::{self, Handle},
    keys::{Algorithm, HashAlg, PublicKey, PublicKeyOrCertificate},
};
use tokio::{io::AsyncReadExt, net::TcpStream};

pub use connection::{CommandChannel, CommandOutput, Connection};
pub use error::{ConnectCause, SshError, Stage};
pub use keys::{ClientKeys, KeyError};
use stream::Prefixed;
use tokio_util::sync::DropGuard;

/// Hard timeouts for each stage of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// DNS resolution and TCP connect.
    pub connect: Duration,
    /// The SSH identification line; then, again, the key exchange up to the host key check.
    pub handshake: Duration,
    /// Public-key authentication, all keys together.
    pub auth: Duration,
    /// One command, from opening its channel to its exit status.
    pub command: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(5),
            auth: Duration::from_secs(5),
            command: Duration::from_secs(30),
        }
    }
}

/// Default cap on what one command may print (stdout and stderr each).
pub const DEFAULT_OUTPUT_CAP: usize = 1024 * 1024;

/// Longest SSH identification line accepted (RFC 4253 allows 255 bytes; other lines may come
/// before it, so allow some slack).
const MAX_BANNER_BYTES: usize = 8 * 1024;

/// What every connection shares: timeouts, output cap, keys and russh settings.
#[derive(Clone)]
pub struct SshClient {
    timeouts: Timeouts,
    output_cap: usize,
    keys: ClientKeys,
    config: Arc<client::Config>,
}

impl std::fmt::Debug for SshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshClient")
            .field("timeouts", &self.timeouts)
            .field("output_cap", &self.output_cap)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// Where to connect and as whom.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// IP address or host name.
    pub host: &'a str,
    /// SSH port.
    pub port: u16,
    /// Login user.
    pub user: &'a str,
    /// The host key pinned for this server, if any. A different key is refused before
    /// authentication; with `None`, any key is accepted and reported for pinning.
    pub pinned: Option<&'a HostKey>,
}

pub use crate::model::HostKey;

impl HostKey {
    /// The algorithm and fingerprint of a public key.
    pub fn of(key: &PublicKey) -> Self {
        Self {
            algorithm: key.algorithm().as_str().to_owned(),
            fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
        }
    }
}

/// What [`SshClient::check`] found, stage by stage.
#[derive(Debug, Default)]
pub struct Check {
    /// Time to establish the TCP connection, if it was.
    pub connect_latency: Option<Duration>,
    /// The server's identification line, if it sent one.
    pub banner: Option<String>,
    /// The host key it presented, if the key exchange got that far.
    pub host_key: Option<HostKey>,
    /// Whether one of the keys was accepted.
    pub authenticated: bool,
    /// The first stage that failed.
    pub error: Option<SshError>,
}

/// How long each stage of a connection took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimes {
    /// DNS resolution and the TCP connection.
    pub connect: Duration,
    /// From the connection to the server's identification line.
    pub banner: Duration,
    /// The key exchange, up to the checked host key.
    pub key_exchange: Duration,
    /// Public-key authentication.
    pub auth: Duration,
}

/// A TCP connection whose server sent its SSH identification line: the cheap part of a
/// connection, which waits on the network, not on the CPU. [`SshClient::establish`] goes on
/// with the key exchange and authentication.
pub struct Dialed {
    tcp: TcpStream,
    banner: String,
    /// Bytes the server sent after its identification line (the start of its key exchange).
    rest: Vec<u8>,
    connect: Duration,
    banner_time: Duration,
}

impl std::fmt::Debug for Dialed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialed")
            .field("banner", &self.banner)
            .finish_non_exhaustive()
    }
}

impl Dialed {
    /// The server's identification line.
    pub fn banner(&self) -> &str {
        &self.banner
    }
}

/// A finished key exchange, before authentication.
struct Handshake {
    banner: String,
    handle: Handle<HostKeyCheck>,
    host_key: HostKey,
    /// Ends russh's session task (and closes the socket) when dropped.
    kill: DropGuard,
    connect: Duration,
    banner_time: Duration,
    key_exchange_time: Duration,
}

/// The client settings, with these algorithm preferences.
fn client_config(preferred: russh::Preferred) -> client::Config {
    client::Config {
        nodelay: true,
        // Stage timeouts bound every wait; a connection lives for one run only.
        inactivity_timeout: None,
        preferred,
        ..Default::default()
    }
}

impl SshClient {
    /// A client with these timeouts, output cap and keys.
    pub fn new(timeouts: Timeouts, output_cap: usize, keys: ClientKeys) -> Self {
        Self {
            timeouts,
            output_cap,
            keys,
            config: Arc::new(client_config(russh::Preferred::default())),
        }
    }

    /// The client settings for a server with this pinned key: its key type asked for first, so
    /// that a server with several host keys presents the pinned one (a key the panel gave may
    /// be an ECDSA or RSA key where the default order would negotiate Ed25519).
    fn config_for(&self, pinned: Option<&HostKey>) -> Arc<client::Config> {
        let Some(wanted) = pinned.and_then(|p| p.algorithm.parse::<Algorithm>().ok()) else {
            return Arc::clone(&self.config);
        };
        let same = |a: &Algorithm| match (a, &wanted) {
            (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
            (a, wanted) => a == wanted,
        };
        let order = &self.config.preferred.key;
        if order.first().is_some_and(same) {
            return Arc::clone(&self.config);
        }
        let key: Vec<Algorithm> = order
            .iter()
            .filter(|a| same(a))
            .chain(order.iter().filter(|a| !same(a)))
            .cloned()
            .collect();
        Arc::new(client_config(russh::Preferred {
            key: key.into(),
            ..self.config.preferred.clone()
        }))
    }

    /// The SHA256 fingerprints of the client keys, in the order they are offered.
    pub fn key_fingerprints(&self) -> Vec<String> {
        self.keys.fingerprints()
    }

    /// The stage timeouts.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Connects, checks the host key and authenticates, each stage under its timeout.
    pub async fn connect(&self, target: Target<'_>) -> Result<Connection, SshError> {
        let dialed = self.dial(target.host, target.port).await?;
        self.establish(dialed, target).await
    }

    /// The first, cheap stages: TCP connect (`connect` timeout) and the server's SSH
    /// identification line (`handshake` timeout). What fails here is the network or a server
    /// that does not answer; it costs waiting, not CPU.
    pub async fn dial(&self, host: &str, port: u16) -> Result<Dialed, SshError> {
        let started = Instant::now();
        let mut tcp = self.tcp_connect(host, port).await?;
        let connect = started.elapsed();
        let limit = self.timeouts.handshake;
        let started = Instant::now();
        let (banner, rest) = tokio::time::timeout(limit, read_banner(&mut tcp))
            .await
            .map_err(|_| SshError::Timeout {
                stage: Stage::Banner,
                after: limit,
            })??;
        Ok(Dialed {
            tcp,
            banner,
            rest,
            connect,
            banner_time: started.elapsed(),
        })
    }

    /// The costly stages of a dialed connection: key exchange with the host key check
    /// (`handshake` timeout, counted from here) and authentication (`auth` timeout).
    pub async fn establish(
        &self,
        dialed: Dialed,
        target: Target<'_>,
    ) -> Result<Connection, SshError> {
        let handshake = self.handshake(dialed, target.pinned).await?;
        let mut connection = Connection::new(handshake, self);
        let started = Instant::now();
        connection.authenticate(target.user, &self.keys).await?;
        connection.times.auth = started.elapsed();
        Ok(connection)
    }

    /// The cheap reachability probe: TCP connect and the SSH banner, no key exchange, no login.
    /// Returns the connect latency and the banner.
    pub async fn probe(&self, host: &str, port: u16) -> Result<(Duration, String), SshError> {
        let dialed = self.dial(host, port).await?;
        Ok((dialed.connect, dialed.banner))
    }

    /// Checks a server stage by stage without running anything: connect, banner, host key
    /// (compared with `target.pinned`, never pinned here), and authentication, which is only
    /// tried if the key matches or none is pinned.
    pub async fn check(&self, target: Target<'_>) -> Check {
        let mut check = Check::default();
        let dialed = match self.dial(target.host, target.port).await {
            Ok(dialed) => dialed,
            Err(err) => {
                check.error = Some(err);
                return check;
            }
        };
        check.connect_latency = Some(dialed.connect);
        check.banner = Some(dialed.banner.clone());
        let handshake = match self.handshake(dialed, None).await {
            Ok(handshake) => handshake,
            Err(err) => {
                check.error = Some(err);
                return check;
            }
        };
        check.host_key = Some(handshake.host_key.clone());
        if let Some(pinned) = target.pinned
            && *pinned != handshake.host_key
        {
            check.error = Some(SshError::HostKeyMismatch {
                pinned: pinned.clone(),
                presented: handshake.host_key,
            });
            return check;
        }
        let mut connection = Connection::new(handshake, self);
        match connection.authenticate(target.user, &self.keys).await {
            Ok(()) => check.authenticated = true,
            Err(err) => check.error = Some(err),
        }
        connection.close().await;
        check
    }

    async fn tcp_connect(&self, host: &str, port: u16) -> Result<TcpStream, SshError> {
        let limit = self.timeouts.connect;
        let deadline = tokio::time::Instant::now() + limit;
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                let resolved =
                    tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port)))
                        .await
                        .map_err(|_| SshError::Timeout {
                            stage: Stage::Connect,
                            after: limit,
                        })?;
                let addrs: Vec<_> = resolved
                    .map_err(|source| SshError::Dns {
                        host: host.to_owned(),
                        message: source.to_string(),
                    })?
                    .collect();
                if addrs.is_empty() {
                    return Err(SshError::Dns {
                        host: host.to_owned(),
                        message: "no addresses".into(),
                    });
                }
                addrs
            }
        };

        let mut last_error = None;
        for addr in addrs {
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    // Best effort: a socket without NODELAY still works, only slower.
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(source)) => last_error = Some(SshError::connect(addr, source)),
                Err(_) => {
                    return Err(SshError::Timeout {
                        stage: Stage::Connect,
                        after: limit,
                    });
                }
            }
        }
        Err(last_error.expect("at least one address was tried"))
    }

    /// The key exchange over a dialed connection. The identification line was read by
    /// [`dial`](Self::dial), so that "accepted and never spoke" is told apart from a failed key
    /// exchange; it and the bytes read past it are replayed to russh.
    async fn handshake(
        &self,
        dialed: Dialed,
        pinned: Option<&HostKey>,
    ) -> Result<Handshake, SshError> {
        let limit = self.timeouts.handshake;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + limit;
        let Dialed {
            tcp,
            banner,
            rest,
            connect,
            banner_time,
        } = dialed;
        let mut replay = format!("{banner}\r\n").into_bytes();
        replay.extend_from_slice(&rest);

        let seen = Arc::new(Mutex::new(None));
        let handler = HostKeyCheck {
            pinned: pinned.cloned(),
            seen: Arc::clone(&seen),
        };
        // Whatever ends this attempt (a timeout here, a failed stage later, the connection's
        // drop), the guard's drop ends russh's session task and closes the socket.
        let kill = tokio_util::sync::CancellationToken::new();
        let guard = kill.clone().drop_guard();
        let stream = Prefixed::new(replay, tcp, kill);
        let result = tokio::time::timeout_at(
            deadline,
            client::connect_stream(self.config_for(pinned), stream, handler),
        )
        .await
        .map_err(|_| SshError::Timeout {
            stage: Stage::Handshake,
            after: limit,
        })?;
        let presented = seen.lock().expect("host key lock").clone();
        match (result, presented) {
            (Ok(handle), Some(host_key)) => Ok(Handshake {
                banner,
                handle,
                host_key,
                kill: guard,
                connect,
                banner_time,
                key_exchange_time: started.elapsed(),
            }),
            (Ok(_), None) => Err(SshError::Handshake(
                "server completed the handshake without presenting a host key".into(),
            )),
            (Err(_), Some(presented)) if pinned.is_some_and(|p| *p != presented) => {
                Err(SshError::HostKeyMismatch {
                    pinned: pinned.cloned().expect("checked above"),
                    presented,
                })
            }
            (Err(err), _) => Err(SshError::Handshake(err.to_string())),
        }
    }
}

/// Reads up to and including the server's `SSH-` identification line. Returns the line without
/// its line end, and whatever was read after it.
async fn read_banner(tcp: &mut TcpStream) -> Result<(String, Vec<u8>), SshError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0_u8; 1024];
    let mut line_start = 0;
    loop {
        let n = tcp
            .read(&mut chunk)
            .await
            .map_err(|err| SshError::Handshake(format!("reading the SSH banner: {err}")))?;
        if n == 0 {
            return Err(SshError::Handshake(
                "connection closed before the SSH banner".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        // RFC 4253 4.2: other lines may precede the identification line.
        while let Some(offset) = buf[line_start..].iter().position(|&b| b == b'\n') {
            let end = line_start + offset;
            let line = &buf[line_start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.starts_with(b"SSH-") {
                let banner = String::from_utf8_lossy(line).into_owned();
                let rest = buf[end + 1..].to_vec();
                return Ok((banner, rest));
            }
            line_start = end + 1;
        }
        if buf.len() > MAX_BANNER_BYTES {
            return Err(SshError::Handshake(format!(
                "no SSH banner in the first {MAX_BANNER_BYTES} bytes: not an SSH server"
            )));
        }
    }
}

/// The russh handler: records the presented host key and refuses one that differs from the
/// pinned key, so nothing (not even authentication) happens with an impostor.
struct HostKeyCheck {
    pinned: Option<HostKey>,
    seen: Arc<Mutex<Option<HostKey>>>,
}

impl client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_public_key else {
            // Host certificates are not advertised, so a server cannot present one.
            return Ok(false);
        };
        let presented = HostKey::of(key);
        let accepted = self
            .pinned
            .as_ref()
            .is_none_or(|pinned| *pinned == presented);
        *self.seen.lock().expect("host key lock") = Some(presented);
        Ok(accepted)
    }
}
