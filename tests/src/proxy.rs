//! TCP proxies on loopback: one in front of a real database server that a test can cut (the
//! database "goes down": open connections drop, new ones are refused) and restore, and one that
//! delays each direction, for a WAN's latency without netem (`just bench-fleet`).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::mpsc,
    task::JoinSet,
    time::Instant,
};

/// A proxy to one address.
#[derive(Debug)]
pub struct TcpProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    target: SocketAddr,
    tasks: Arc<Mutex<Option<JoinSet<()>>>>,
}

impl TcpProxy {
    /// Starts forwarding `127.0.0.1:<free port>` to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        Self::start_on("127.0.0.1".parse().expect("loopback"), target).await
    }

    /// Starts forwarding `<ip>:<free port>` to `target` (e.g. a namespace's veth address, so
    /// that a process inside it reaches a database on this machine's loopback).
    pub async fn start_on(ip: std::net::IpAddr, target: SocketAddr) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let proxy = Self {
            addr,
            target,
            tasks: Arc::new(Mutex::new(None)),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let mut set = JoinSet::new();
        let target = self.target;
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let held = Arc::clone(&connections);
        set.spawn(async move {
            // Keeps the connection tasks alive as long as the accept loop lives.
            let _held = held;
            while let Ok((mut client, _)) = listener.accept().await {
                connections.lock().expect("lock").spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        *self.tasks.lock().expect("lock") = Some(set);
    }

    /// The database goes down: every open connection is dropped and the port refuses new ones.
    pub fn cut(&self) {
        // Dropping the set aborts the accept loop, which drops the listener and, with it, the
        // set of connection tasks.
        drop(self.tasks.lock().expect("lock").take());
    }

    /// The database comes back on the same address.
    pub async fn restore(&self) {
        let listener = TcpListener::bind(self.addr).await.expect("re-bind proxy");
        self.serve(listener);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// A proxy that holds each direction back by `delay` (one way; a round trip is twice it): every
/// chunk read is written `delay` after it was read, in order, and an end of file is passed on
/// `delay` after it came. The connection upstream is made three delays after the client's: the
/// round trip of the TCP handshake that the local accept skips, and the final ACK's way, so a
/// server that speaks first (sshd's banner) is heard two round trips after the client
/// connected, as over a real link. Stops accepting on drop.
#[derive(Debug)]
pub struct DelayProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    accept: JoinSet<()>,
}

impl DelayProxy {
    /// Starts forwarding `127.0.0.1:<free port>` to `target`, `delay` each way.
    pub async fn start(target: SocketAddr, delay: Duration) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind delay proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let mut accept = JoinSet::new();
        accept.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(async move {
                    tokio::time::sleep(delay * 3).await;
                    let Ok(server) = TcpStream::connect(target).await else {
                        return; // The client sees its connection closed, as on a refusal.
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (from_client, to_client) = client.into_split();
                    let (from_server, to_server) = server.into_split();
                    tokio::join!(
                        delayed(from_client, to_server, delay),
                        delayed(from_server, to_client, delay),
                    );
                });
                // Finished connections are reaped as new ones come.
                while connections.try_join_next().is_some() {}
            }
        });
        Self { addr, accept }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort_all();
    }
}

/// Copies `from` to `to`, each chunk and the end of file `delay` after it was read.
async fn delayed(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let read = async move {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let chunk = match from.read(&mut buf).await {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(buf[..n].to_vec()),
            };
            let end = chunk.is_none();
            if chunks.send((Instant::now() + delay, chunk)).is_err() || end {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            let Some(bytes) = chunk else {
                let _ = to.shutdown().await;
                break;
            };
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind the proxy: what is sent comes back whole and in order, a round trip
    /// later (two delays), and the end of file comes back too.
    #[tokio::test]
    async fn each_direction_is_held_back_in_order_end_of_file_included() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let target = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut socket, _) = echo.accept().await.expect("accept");
            let (mut r, mut w) = socket.split();
            tokio::io::copy(&mut r, &mut w).await.expect("echo");
            w.shutdown().await.expect("shutdown");
        });
        let delay = Duration::from_millis(50);
        let proxy = DelayProxy::start(target, delay).await;
        let started = Instant::now();
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = client.split();
        let (got, ()) = tokio::join!(
            async {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.expect("read to the end");
                got
            },
            async {
                for part in sent.chunks(7_000) {
                    w.write_all(part).await.expect("write");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                w.shutdown().await.expect("shutdown");
            },
        );
        let took = started.elapsed();
        assert_eq!(
            got.len(),
            sent.len(),
            "every byte back, the end of file after them"
        );
        assert!(got == sent, "the bytes came back in order");
        // Three delays before the upstream connect, two for the echo's way there and back.
        assert!(took >= delay * 5, "back after {took:?}, before five delays");
        assert!(took < delay * 5 + Duration::from_secs(2), "took {took:?}");
    }
}
