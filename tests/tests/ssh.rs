//! The SSH path against real OpenSSH servers: commands on healthy hosts, and every connection
//! fault ending within its timeout with its own error kind, without holding up the others.

use std::time::{Duration, Instant};

use fleetsync_sync_agent::model::{Cause, Outcome};
use fleetsync_sync_agent::ssh::{
    DEFAULT_OUTPUT_CAP, HostKey, SshClient, SshError, Stage, Timeouts,
};
use fleetsync_tests::{SshFleet, SshHost, fleet::Placement};

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(3),
        handshake: Duration::from_secs(2),
        auth: Duration::from_secs(3),
        command: Duration::from_secs(5),
    }
}

async fn connect(
    client: &SshClient,
    host: &SshHost,
    pinned: Option<&HostKey>,
) -> Result<fleetsync_sync_agent::ssh::Connection, SshError> {
    let ip = host.addr().to_string();
    client.connect(host.target(&ip, pinned)).await
}

#[tokio::test]
async fn runs_commands_on_three_healthy_hosts() {
    let fleet = SshFleet::start(3).await;
    let client = fleet.client(timeouts(), DEFAULT_OUTPUT_CAP);

    let runs = fleet.hosts().iter().map(|host| {
        let client = client.clone();
        let ip = host.addr().to_string();
        let target_port = host.port();
        let expected_key = host.host_key();
        tokio::spawn(async move {
            let target = fleetsync_sync_agent::ssh::Target {
                host: &ip,
                port: target_port,
                user: fleetsync_tests::fleet::SSH_USER,
                pinned: None,
            };
            let connection = client.connect(target).await.expect("connect");
            // The key presented is the host's own, reported for pinning.
            assert_eq!(*connection.host_key(), expected_key);
            assert!(
                connection.banner().starts_with("SSH-2.0-OpenSSH"),
                "{}",
                connection.banner()
            );
            // Several commands over one connection: output, stderr, exit status, sudo.
            let out = connection
                .run("id -un; echo to-stderr >&2; exit 3")
                .await
                .expect("run");
            assert_eq!(String::from_utf8_lossy(&out.stdout), "fleetsync-test\n");
            assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");
            assert_eq!(out.exit_status, Some(3));
            let sudo = connection.run("sudo -n id -u").await.expect("run sudo");
            assert!(sudo.success(), "passwordless sudo: {sudo:?}");
            assert_eq!(String::from_utf8_lossy(&sudo.stdout), "0\n");
            connection.close().await;
        })
    });
    // Spawned first, awaited after: the three hosts are served concurrently.
    let handles: Vec<_> = runs.collect();
    for handle in handles {
        handle.await.expect("host task");
    }
}

/// One fleet with one healthy host and one host per fault, all connected to at once.
#[tokio::test]
async fn each_fault_ends_within_its_timeout_with_its_own_kind() {
    let fleet = SshFleet::start_with(&[
        Placement::Loopback,  // 0 healthy
        Placement::Loopback,  // 1 refused
        Placement::Loopback,  // 2 frozen
        Placement::Namespace, // 3 no route
        Placement::Loopback,  // 4 host key changed
        Placement::Loopback,  // 5 client key revoked
    ])
    .await;
    let t = timeouts();
    let client = fleet.client(t, DEFAULT_OUTPUT_CAP);

    // Pin every host's key as a first sync would, before the faults.
    let pinned: Vec<HostKey> = fleet.hosts().iter().map(SshHost::host_key).collect();
    fleet.host(1).stop();
    fleet.host(2).freeze();
    fleet.host(3).cut_route();
    fleet.host(4).rotate_host_key().await;
    fleet.host(5).revoke_client_key();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for (host, pinned) in fleet.hosts().iter().zip(&pinned) {
        let client = client.clone();
        let ip = host.addr().to_string();
        let port = host.port();
        let pinned = pinned.clone();
        tasks.push(tokio::spawn(async move {
            let result = client
                .connect(fleetsync_sync_agent::ssh::Target {
                    host: &ip,
                    port,
                    user: fleetsync_tests::fleet::SSH_USER,
                    pinned: Some(&pinned),
                })
                .await;
            let elapsed = started.elapsed();
            if let Ok(connection) = &result {
                connection
                    .run("true")
                    .await
                    .expect("healthy host runs a command");
            }
            (result.map(|c| c.host_key().clone()), elapsed)
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task"));
    }
    fleet.host(2).thaw();

    let slack = Duration::from_millis(750);
    let (healthy, healthy_elapsed) = &results[0];
    assert_eq!(healthy.as_ref().expect("healthy host connects"), &pinned[0]);
    // The frozen host (2 s handshake timeout) does not hold the healthy one up.
    assert!(
        *healthy_elapsed < Duration::from_secs(1),
        "healthy took {healthy_elapsed:?}"
    );

    let expect = |i: usize, outcome: Outcome, cause: Option<Cause>, limit: Duration| {
        let (result, elapsed) = &results[i];
        let err = result.as_ref().expect_err("faulty host must fail");
        assert_eq!(err.outcome(), (outcome, cause), "host {i}: {err}");
        assert!(
            *elapsed <= limit + slack,
            "host {i} took {elapsed:?}, limit {limit:?}: {err}"
        );
        err
    };

    let refused = expect(
        1,
        Outcome::Unreachable,
        Some(Cause::Refused),
        Duration::ZERO,
    );
    assert!(refused.to_string().contains("refused"), "{refused}");

    let frozen = expect(2, Outcome::Unreachable, Some(Cause::Timeout), t.handshake);
    assert!(
        matches!(
            frozen,
            SshError::Timeout {
                stage: Stage::Banner,
                ..
            }
        ),
        "{frozen:?}"
    );
    assert!(
        results[2].1 >= t.handshake,
        "frozen host ended before its timeout"
    );

    let no_route = expect(3, Outcome::Unreachable, Some(Cause::NoRoute), t.connect);
    assert!(
        no_route.to_string().contains("No route to host"),
        "{no_route}"
    );

    let changed = expect(4, Outcome::HostKeyMismatch, None, t.handshake);
    match changed {
        SshError::HostKeyMismatch {
            pinned: was,
            presented,
        } => {
            assert_eq!(was, &pinned[4]);
            assert_eq!(presented, &fleet.host(4).host_key());
            assert_ne!(was, presented);
        }
        other => panic!("expected a host key mismatch, got {other:?}"),
    }

    let denied = expect(5, Outcome::AuthFailed, None, t.handshake + t.auth);
    assert!(
        matches!(denied, SshError::AuthRejected { .. }),
        "{denied:?}"
    );
}

#[tokio::test]
async fn faults_heal_when_the_host_recovers() {
    let fleet = SshFleet::start_with(&[Placement::Loopback, Placement::Namespace]).await;
    let client = fleet.client(timeouts(), DEFAULT_OUTPUT_CAP);
    let (lo, ns) = (fleet.host(0), fleet.host(1));

    // Frozen, then thawed.
    lo.freeze();
    let err = connect(&client, lo, None).await.expect_err("frozen");
    assert!(
        matches!(
            err,
            SshError::Timeout {
                stage: Stage::Banner,
                ..
            }
        ),
        "{err:?}"
    );
    lo.thaw();
    connect(&client, lo, None)
        .await
        .expect("thawed host answers");

    // Stopped, then started again with the same key.
    let key = lo.host_key();
    lo.stop();
    assert_eq!(
        connect(&client, lo, Some(&key))
            .await
            .expect_err("stopped")
            .outcome()
            .1,
        Some(Cause::Refused)
    );
    lo.start().await;
    connect(&client, lo, Some(&key))
        .await
        .expect("restarted host answers with the same key");

    // A namespaced host, reachable, cut off, then back.
    let ns_key = ns.host_key();
    let conn = connect(&client, ns, Some(&ns_key))
        .await
        .expect("namespaced host answers");
    assert!(conn.run("true").await.expect("run").success());
    ns.cut_route();
    assert_eq!(
        connect(&client, ns, Some(&ns_key))
            .await
            .expect_err("cut off")
            .outcome()
            .1,
        Some(Cause::NoRoute)
    );
    ns.restore_route();
    connect(&client, ns, Some(&ns_key))
        .await
        .expect("route restored");

    // Key revoked, then authorised again.
    lo.revoke_client_key();
    assert_eq!(
        connect(&client, lo, None)
            .await
            .expect_err("revoked")
            .outcome()
            .0,
        Outcome::AuthFailed
    );
    lo.authorize_client_key();
    connect(&client, lo, None)
        .await
        .expect("key authorised again");
}

#[tokio::test]
async fn command_timeout_and_output_cap() {
    let fleet = SshFleet::start(1).await;
    let client = fleet.client(
        Timeouts {
            command: Duration::from_secs(1),
            ..timeouts()
        },
        64 * 1024,
    );
    let host = fleet.host(0);
    let connection = connect(&client, host, None).await.expect("connect");

    let started = Instant::now();
    let err = connection.run("sleep 30").await.expect_err("hangs");
    assert!(
        matches!(
            err,
            SshError::Timeout {
                stage: Stage::Command,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.outcome().0, Outcome::CommandFailed);

    // 1 MiB of output against a 64 KiB cap: refused, not buffered.
    let err = connection
        .run("head -c 1048576 /dev/zero")
        .await
        .expect_err("over the cap");
    assert!(
        matches!(err, SshError::OutputTooLarge { limit: 65536 }),
        "{err:?}"
    );
    assert_eq!(err.outcome().0, Outcome::ParseFailed);

    // The connection still carries further commands, and output just under the cap passes.
    let out = connection
        .run("head -c 65536 /dev/zero")
        .await
        .expect("at the cap");
    assert_eq!(out.stdout.len(), 65536);
    assert!(out.success());
}

#[tokio::test]
async fn host_name_that_does_not_resolve_is_a_dns_failure() {
    let fleet = SshFleet::start(1).await;
    let client = fleet.client(timeouts(), DEFAULT_OUTPUT_CAP);
    let err = client
        .connect(fleet.host(0).target("no-such-host.invalid", None))
        .await
        .expect_err("must not resolve");
    assert_eq!(
        err.outcome(),
        (Outcome::Unreachable, Some(Cause::Dns)),
        "{err}"
    );
}

#[tokio::test]
async fn a_non_ssh_listener_is_a_handshake_failure() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    let fleet = SshFleet::start(0).await;
    let client = fleet.client(timeouts(), DEFAULT_OUTPUT_CAP);
    let err = client
        .connect(fleetsync_sync_agent::ssh::Target {
            host: "127.0.0.1",
            port,
            user: "x",
            pinned: None,
        })
        .await
        .expect_err("not ssh");
    assert_eq!(err.outcome().0, Outcome::HandshakeFailed, "{err}");
}

/// A host that stalls after its banner ("tarpit"), or resets the connection right after it:
/// every attempt ends when its timeout does, and takes its socket and russh's session task with
/// it (counted on the server side). Before the kill switch, each tarpit attempt left one socket
/// established for good.
#[tokio::test]
async fn attempts_against_stalling_hosts_leave_no_socket_behind() {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Clone, Copy, Debug)]
    enum Kind {
        Tarpit,
        Reset,
    }
    for kind in [Kind::Tarpit, Kind::Reset] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let live = Arc::new(AtomicUsize::new(0));
        let server = {
            let live = Arc::clone(&live);
            tokio::spawn(async move {
                loop {
                    let Ok((mut socket, _)) = listener.accept().await else {
                        continue;
                    };
                    let live = Arc::clone(&live);
                    live.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let _ = socket.write_all(b"SSH-2.0-tarpit\r\n").await;
                        if let Kind::Reset = kind {
                            let _ = socket.set_zero_linger();
                            drop(socket);
                        } else {
                            // Read (the client's banner and KEXINIT) and never answer, until the
                            // client goes away.
                            let mut buf = [0u8; 4096];
                            while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                        }
                        live.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })
        };
        let client = SshClient::new(
            Timeouts {
                handshake: Duration::from_millis(300),
                ..timeouts()
            },
            DEFAULT_OUTPUT_CAP,
            fleetsync_sync_agent::ssh::ClientKeys::default(),
        );
        // One attempt to warm up whatever the runtime keeps open, then count.
        let target = || fleetsync_sync_agent::ssh::Target {
            host: "127.0.0.1",
            port,
            user: "vito",
            pinned: None,
        };
        let _ = client.connect(target()).await;
        let attempts = (0..100).map(|_| {
            let client = client.clone();
            async move { client.connect(target()).await }
        });
        for result in futures_util::future::join_all(attempts).await {
            let err = result.expect_err("a stalling host never lets us in");
            assert_eq!(err.outcome().0, Outcome::HandshakeFailed, "{kind:?}: {err}");
        }
        // The attempts are over: their sockets close (the server sees EOF) within moments.
        fleetsync_tests::wait_until(
            &format!("{kind:?}: connections still established on the server side"),
            Duration::from_secs(5),
            || live.load(Ordering::SeqCst) == 0,
        )
        .await;
        server.abort();
    }
}

/// A command that stalls on a real sshd: each attempt (connect, authenticate, run, time out,
/// drop) leaves no connection behind.
#[tokio::test]
async fn attempts_that_stall_mid_command_leave_no_socket_behind() {
    let fleet = SshFleet::start(1).await;
    let host = fleet.host(0);
    let client = fleet.client(
        Timeouts {
            command: Duration::from_millis(300),
            ..timeouts()
        },
        DEFAULT_OUTPUT_CAP,
    );
    let attempt = || async {
        let connection = connect(&client, host, None).await.expect("connect");
        let err = connection.run("sleep 30").await.expect_err("stalls");
        assert!(
            matches!(
                err,
                SshError::Timeout {
                    stage: Stage::Command,
                    ..
                }
            ),
            "{err:?}"
        );
        // Dropped without a goodbye, as a run that timed out is.
        drop(connection);
    };
    for _ in 0..3 {
        let batch = (0..10).map(|_| attempt());
        futures_util::future::join_all(batch).await;
    }
    // Every attempt is over: no connection to that host is left established (counted in the
    // kernel's table, so that other tests running beside this one do not count).
    fleetsync_tests::wait_until(
        "connections left to the host",
        Duration::from_secs(5),
        || established_to(host.port()) == 0,
    )
    .await;
}

/// Established TCP connections (IPv4) whose remote port is `port`.
fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3
                && fields[3] == "01"
                && fields[2]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count()
}
