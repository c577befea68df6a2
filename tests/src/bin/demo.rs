//! `just demo`: the main job on the embedded default. A small real fleet on loopback, the
//! control plane in `./demo/fleetsync.db`, Vito's incident migration applied while servers are
//! down, and the sync-agent reporting one outcome per server. Run it twice: the second run
//! finds the schema current and syncs afresh. Everything it starts is stopped on the way out.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fleetsync_tests::{
    AgentProcess, SshFleet,
    catalog::execute,
    fleet::{Placement, SSH_USER},
    process::bin_path,
    services::ServeProcess,
};

struct Host {
    name: &'static str,
    service: &'static str,
    fault: &'static str,
}

const HOSTS: &[Host] = &[
    Host {
        name: "db-1",
        service: "mariadb",
        fault: "healthy",
    },
    Host {
        name: "db-2",
        service: "mariadb",
        fault: "healthy",
    },
    Host {
        name: "db-3",
        service: "postgresql",
        fault: "healthy",
    },
    Host {
        name: "web-1",
        service: "",
        fault: "no database service",
    },
    Host {
        name: "db-4",
        service: "mariadb",
        fault: "stopped: connection refused",
    },
    Host {
        name: "db-5",
        service: "mariadb",
        fault: "frozen: accepts TCP, never answers",
    },
    Host {
        name: "db-6",
        service: "mariadb",
        fault: "will be re-installed with a new host key",
    },
];

fn say(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

fn note(text: &str) {
    println!("   {text}");
}

/// Runs one of the binaries with inherited output (the user sees exactly what it prints).
fn show(binary: &str, args: &[&str]) -> std::process::ExitStatus {
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                (*a).to_owned()
            }
        })
        .collect();
    println!("\x1b[2m$ {binary} {}\x1b[0m", shown.join(" "));
    Command::new(bin_path(binary))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|err| panic!("run {binary}: {err}"))
}

#[tokio::main]
async fn main() {
    let demo_dir = PathBuf::from("demo");
    std::fs::create_dir_all(&demo_dir).expect("create ./demo");
    let db_path = demo_dir.join("fleetsync.db");
    let first_run = !db_path.exists();
    let url = format!(
        "sqlite://{}",
        std::fs::canonicalize(&demo_dir)
            .expect("demo dir")
            .join("fleetsync.db")
            .display()
    );

    tokio::select! {
        () = run(&demo_dir, &url, first_run) => {}
        _ = tokio::signal::ctrl_c() => println!("\ninterrupted: cleaning up"),
    }
    // The fleet and the agent were dropped with `run`: their processes, namespaces and temp
    // dirs are gone.
    say("done: every sshd and the agent are stopped; the control plane stays in ./demo");
    note(
        "run `just demo` again to see a no-op migration and a fresh sync; `rm -r demo` to start over",
    );
}

async fn run(demo_dir: &Path, url: &str, first_run: bool) {
    say(&format!(
        "starting {} OpenSSH servers on loopback (real sshd, this machine's MariaDB and PostgreSQL behind them)",
        HOSTS.len()
    ));
    let fleet = SshFleet::start_with(&vec![Placement::Loopback; HOSTS.len()]).await;
    for (host, sshd) in HOSTS.iter().zip(fleet.hosts()) {
        let service = if host.service.is_empty() {
            "-"
        } else {
            host.service
        };
        note(&format!(
            "{:<6} {:<21} {:<11} {}",
            host.name,
            sshd.socket_addr().to_string(),
            service,
            host.fault
        ));
    }
    let key = fleet.client_key().to_str().expect("utf-8 path").to_owned();

    let mut started_agent;
    let job_to_follow;
    if first_run {
        say(&format!(
            "a fresh control plane in {url}: migrating up to the version before Vito's charset/collation migration"
        ));
        show(
            "migrator",
            &[
                "migrate",
                "--database-url",
                url,
                "--no-dispatch",
                "--target",
                "20240101000004",
            ],
        );

        say("registering the servers as the panel would (rows in `servers` and `services`)");
        let db = fleetsync_common::Db::connect(url)
            .await
            .expect("open the control plane");
        for (host, sshd) in HOSTS.iter().zip(fleet.hosts()) {
            execute(
                &db,
                &format!(
                    "INSERT INTO servers (name, ip, port, ssh_user, status, created_at, updated_at) \
                     VALUES ('{}', '{}', {}, '{SSH_USER}', 'ready', 0, 0)",
                    host.name,
                    sshd.addr(),
                    sshd.port()
                ),
            )
            .await;
            if !host.service.is_empty() {
                execute(
                    &db,
                    &format!(
                        "INSERT INTO services (server_id, type, name, version, status, created_at, updated_at) \
                         SELECT id, 'database', '{}', '', 'ready', 0, 0 FROM servers WHERE name = '{}'",
                        host.service, host.name
                    ),
                )
                .await;
            }
        }
        db.close().await;
        note("7 servers registered");

        fleet.host(4).stop();
        fleet.host(5).freeze();
        say(
            "db-4 is stopped and db-5 is frozen; now the incident migration runs, with the sync-agent not running at all",
        );
        let started = Instant::now();
        let status = show(
            "migrator",
            &["migrate", "--database-url", url, "--agent-timeout", "1s"],
        );
        note(&format!(
            "migrate exited with {} after {} ms: it never touched a server; the sync request waits in the outbox",
            status.code().unwrap_or(-1),
            started.elapsed().as_millis()
        ));

        say("starting the sync-agent: it owns every SSH connection and takes the waiting request");
        started_agent = start_agent(demo_dir, url, &key);
        note(&format!("sync-agent listening on {}", started_agent.addr));
        job_to_follow = wait_for_migration_job(url).await;
        say(
            "following the migration's job live (one outcome per server; slow and dead servers only delay themselves)",
        );
        show(
            "sync-agent",
            &[
                "job",
                &job_to_follow,
                "--watch",
                "--agent-url",
                &format!("http://{}", started_agent.addr),
            ],
        );
    } else {
        say(&format!("found {url} from an earlier run"));
        show(
            "migrator",
            &["migrate", "--database-url", url, "--no-dispatch"],
        );
        note("the schema is current: there was nothing to migrate");
        fleet.host(4).stop();
        fleet.host(5).freeze();
        say("starting the sync-agent");
        started_agent = start_agent(demo_dir, url, &key);
        note(&format!("sync-agent listening on {}", started_agent.addr));
        say(
            "this run's fleet is new (new addresses, new host keys): updating the registrations and forgetting the old keys",
        );
        reregister(&fleet, &format!("http://{}", started_agent.addr)).await;
    }
    let agent_url = format!("http://{}", started_agent.addr);

    say("db-6 is re-installed: it comes back with a new host key");
    fleet.host(6).rotate_host_key().await;
    say(
        "a manual sync of every server (db-4 and db-5 are in backoff now, so they are skipped, not waited for)",
    );
    show(
        "sync-agent",
        &["sync", "--all", "--watch", "--agent-url", &agent_url],
    );

    say("the fleet as the agent sees it");
    show("sync-agent", &["servers", "--agent-url", &agent_url]);
    note("db-6 refuses its new key until an operator confirms it: `sync-agent reset-host-key ID`");

    // A clean stop: the registry says the agent is gone, so that `migrator status` (or a
    // roll-back) right after the demo sees no live agent.
    fleet.host(5).thaw();
    say("stopping the sync-agent (SIGTERM): it hands back what it holds and marks itself gone");
    started_agent.terminate(Duration::from_secs(15));
    std::fs::write(demo_dir.join("agent.log"), started_agent.log())
        .expect("write ./demo/agent.log");
    note("the agent's log is in ./demo/agent.log");
}

fn start_agent(demo_dir: &Path, url: &str, key: &str) -> ServeProcess {
    AgentProcess::on(url)
        .args(&[
            "--ssh-key",
            key,
            "--connect-timeout",
            "2s",
            "--handshake-timeout",
            "2s",
            "--poll-interval",
            "200ms",
            "--backoff-base",
            "30s",
            "--sync-interval",
            "0s",
        ])
        .start(demo_dir)
}

async fn wait_for_migration_job(url: &str) -> String {
    let db = fleetsync_common::Db::connect(url)
        .await
        .expect("open the control plane");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(row) = db
            .fetch_optional(
                "SELECT job_id FROM sync_requests WHERE state = 'taken'",
                &[],
            )
            .await
            .expect("read the outbox")
        {
            db.close().await;
            return row.text(0).expect("job id");
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not take the request"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn reregister(fleet: &SshFleet, agent_url: &str) {
    use fleetsync_common::proto::sync::v1::{
        DatabaseService, ResetHostKeyRequest, ServerSpec, UpsertServerRequest,
        fleet_client::FleetClient,
    };
    let mut client = FleetClient::connect(agent_url.to_owned())
        .await
        .expect("connect to the agent");
    for (host, sshd) in HOSTS.iter().zip(fleet.hosts()) {
        let service = match host.service {
            "mariadb" => DatabaseService::Mariadb,
            "postgresql" => DatabaseService::Postgresql,
            _ => DatabaseService::None,
        };
        let server = client
            .upsert_server(UpsertServerRequest {
                id: 0,
                spec: Some(ServerSpec {
                    name: host.name.into(),
                    ip: sshd.addr().to_string(),
                    port: u32::from(sshd.port()),
                    ssh_user: SSH_USER.into(),
                    database_service: service as i32,
                    ..Default::default()
                }),
            })
            .await
            .expect("update registration")
            .into_inner()
            .server
            .expect("server");
        client
            .reset_host_key(ResetHostKeyRequest { id: server.id })
            .await
            .expect("reset host key");
        // A first sync pins the new keys before db-6 is re-installed.
    }
    let status = Command::new(bin_path("sync-agent"))
        .args([
            "sync",
            "--all",
            "--force",
            "--agent-url",
            agent_url,
            "--watch",
            "-o",
            "json",
        ])
        .stdout(Stdio::null())
        .status()
        .expect("run sync-agent");
    // 1: done, with the servers that are down or without a service by design.
    assert!(
        matches!(status.code(), Some(0 | 1)),
        "sync-agent sync ended with {status}"
    );
    note("registrations updated and the new host keys pinned");
}
