//! A TCP proxy on loopback in front of a real database server, that a test can cut (the
//! database "goes down": open connections drop, new ones are refused) and restore.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{net::TcpListener, task::JoinSet};

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
