//! No leaks: every socket and task of an SSH attempt ends when the attempt ends, whatever
//! stage it stopped in: a tarpit that sends its banner and then nothing, a connection reset
//! during the key exchange, an authentication that never answers, a command that never ends.
//! This binary holds this one test, so the process's open fds are the attempts' alone.

use std::time::Duration;

use fleetsync_sync_agent::ssh::{DEFAULT_OUTPUT_CAP, SshClient, SshError, Stage, Target, Timeouts};
use fleetsync_tests::{SshFleet, fleet::SSH_USER};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const ATTEMPTS: usize = 100;
const AT_ONCE: usize = 25;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// A server that sends its banner, then reads and never answers. It lets go of a connection
/// only when the client closes it (so a client that leaks its socket leaks this side too).
async fn tarpit() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(b"SSH-2.0-tarpit\r\n").await;
                let mut buf = [0_u8; 1024];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// A server that sends its banner, reads the client's key exchange, then resets.
async fn resetter() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(b"SSH-2.0-resetter\r\n").await;
                let mut buf = [0_u8; 64];
                let _ = stream.read(&mut buf).await;
                let _ = stream.set_zero_linger();
                drop(stream);
            });
        }
    });
    port
}

/// What one attempt against each kind of host ends with.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Tarpit(u16),
    Reset(u16),
    AuthStall,
    CommandStall,
}

/// The clients: `quick` times out the banner and key exchange after 300 ms (what the tarpit
/// and the reset test); `patient` gives a real sshd, forking many sessions at once on a busy
/// machine, 10 s to get there, so that its stalls are the ones under test (auth, command).
struct Clients {
    quick: SshClient,
    patient: SshClient,
}

async fn attempt(clients: &Clients, fleet: &SshFleet, kind: Kind) {
    let Clients { quick, patient } = clients;
    let local = |port| Target {
        host: "127.0.0.1",
        port,
        user: SSH_USER,
        pinned: None,
    };
    match kind {
        Kind::Tarpit(port) => {
            let err = quick.connect(local(port)).await.expect_err("tarpit");
            assert!(
                matches!(
                    err,
                    SshError::Timeout {
                        stage: Stage::Handshake,
                        ..
                    }
                ),
                "{err}"
            );
        }
        Kind::Reset(port) => {
            let err = quick.connect(local(port)).await.expect_err("reset");
            assert!(matches!(err, SshError::Handshake(_)), "{err}");
        }
        Kind::AuthStall => {
            let host = fleet.host(0);
            let ip = host.addr().to_string();
            let err = patient
                .connect(host.target(&ip, None))
                .await
                .expect_err("auth stall");
            assert!(
                matches!(
                    err,
                    SshError::Timeout {
                        stage: Stage::Auth,
                        ..
                    }
                ),
                "{err}"
            );
        }
        Kind::CommandStall => {
            let host = fleet.host(1);
            let ip = host.addr().to_string();
            let connection = patient
                .connect(host.target(&ip, None))
                .await
                .expect("connect");
            let err = connection
                .run("sudo -n true")
                .await
                .expect_err("command stall");
            assert!(
                matches!(
                    err,
                    SshError::Timeout {
                        stage: Stage::Command,
                        ..
                    }
                ),
                "{err}"
            );
        }
    }
}

/// Waits (up to 5 s) for the fds and tasks to come back to `base` (±2); returns the last
/// counts seen.
async fn settled(base: (usize, usize)) -> (usize, usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = (open_fds(), alive_tasks());
        let flat = now.0 <= base.0 + 2 && now.1 <= base.1 + 2;
        if flat || tokio::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_broken_attempts_leave_fds_and_tasks_flat() {
    let fleet = SshFleet::start(2).await;
    fleet.host(0).stall_auth().await;
    fleet
        .host(1)
        .install_program("sudo", "#!/bin/sh\nexec sleep 3600\n");
    let kinds = [
        Kind::Tarpit(tarpit().await),
        Kind::Reset(resetter().await),
        Kind::AuthStall,
        Kind::CommandStall,
    ];
    let timeouts = Timeouts {
        connect: Duration::from_secs(2),
        handshake: Duration::from_millis(300),
        auth: Duration::from_millis(300),
        command: Duration::from_millis(300),
    };
    let clients = Clients {
        quick: fleet.client(timeouts, DEFAULT_OUTPUT_CAP),
        patient: fleet.client(
            Timeouts {
                handshake: Duration::from_secs(10),
                ..timeouts
            },
            DEFAULT_OUTPUT_CAP,
        ),
    };
    // One of each first, so that whatever is made once (the listeners' tasks, lazy
    // statics, resolver threads) is in the baseline.
    for kind in kinds {
        attempt(&clients, &fleet, kind).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = (open_fds(), alive_tasks());
    for kind in kinds {
        for _ in 0..ATTEMPTS / AT_ONCE {
            let wave = (0..AT_ONCE).map(|_| attempt(&clients, &fleet, kind));
            futures_util::future::join_all(wave).await;
        }
        let (fds, tasks) = settled(base).await;
        assert!(
            fds <= base.0 + 2 && tasks <= base.1 + 2,
            "{ATTEMPTS} attempts against {kind:?}: fds {} -> {fds}, tasks {} -> {tasks}",
            base.0,
            base.1
        );
    }
}
