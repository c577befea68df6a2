//! The real services, started for a test on an ephemeral port (a listener bound to
//! `127.0.0.1:0` is handed in: no port races), with typed gRPC clients. Also the real binaries,
//! for tests of the command line, signals and grpcurl.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use fleetsync_common::proto::{
    migrator::v1::migrator_client::MigratorClient,
    sync::v1::{fleet_client::FleetClient, sync_agent_client::SyncAgentClient},
};
use fleetsync_sync_agent::{runner::RunnerConfig, ssh::SshClient};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

use crate::process::bin_path;

/// A service running in this process until [`stop`](Self::stop) or drop.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// A channel to it.
    pub channel: Channel,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The in-process agent's settings: a short shutdown grace, no drain delay, no metrics, and a
/// database that does not answer at start waited for as long as it takes.
pub fn agent_config(
    database_url: &str,
    ssh: SshClient,
    runner: RunnerConfig,
) -> fleetsync_sync_agent::Config {
    fleetsync_sync_agent::Config {
        database_url: database_url.to_owned(),
        shutdown_grace: Duration::from_secs(1),
        drain_delay: Duration::ZERO,
        ssh,
        runner,
        security: Default::default(),
        db_pool_size: 16,
        max_streams: 1024,
        metrics_listen: None,
        metrics_interval: Duration::ZERO,
        max_checks: 64,
        database_wait: None,
    }
}

impl Running {
    async fn spawn<F>(run: impl FnOnce(TcpListener, CancellationToken) -> F) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        crate::init_test_log();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ephemeral port");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(listener, shutdown.clone()));
        let channel = connect(addr).await;
        let mut running = Self {
            addr,
            channel,
            shutdown,
            task: Some(task),
        };
        running.wait_until_serving().await;
        running
    }

    /// Waits until the service's health says `SERVING` (it has finished starting); panics
    /// with its error if it stops instead.
    async fn wait_until_serving(&mut self) {
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let status = self
                .health()
                .check(HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status());
            if matches!(status, Ok(ServingStatus::Serving)) {
                return;
            }
            let task = self.task.as_mut().expect("task present until stop");
            if task.is_finished() {
                let ended = task.await;
                panic!("the service stopped while starting: {ended:?}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the service is not serving after 30 s: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A health client.
    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }

    /// Shuts the service down gracefully and returns how `run` ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let task = self.task.take().expect("task present until stop");
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("service stops within 10s")
            .expect("service task did not panic")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A lazily connecting channel to `addr`.
pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// The sync-agent, in process.
#[derive(Debug)]
pub struct TestAgent {
    /// The running service.
    pub service: Running,
}

/// Scheduler settings for tests: quick polls, so that cross-agent work shows up fast.
pub fn test_runner_config() -> RunnerConfig {
    RunnerConfig {
        concurrency: 64,
        lease_ttl: Duration::from_secs(30),
        poll_interval: Duration::from_millis(100),
        outbox_interval: Duration::from_millis(500),
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(4),
        probe_interval: Duration::from_millis(200),
        sync_interval: None,
        ..RunnerConfig::default()
    }
}

/// Applies every migration to the database at `url` (what `migrator migrate` does, without
/// contacting an agent).
pub async fn migrate(url: &str) {
    let db = fleetsync_common::Db::connect(url)
        .await
        .expect("connect to migrate");
    let engine = fleetsync_migrator::engine::Engine::new(db.clone(), Default::default());
    engine.migrate(None, &mut |_| {}).await.expect("migrate");
    db.close().await;
}

impl TestAgent {
    /// Starts the agent on an already migrated database with these settings, with at most
    /// `max_streams` event streams open; returns once the migrations' sync requests are jobs.
    /// Tests start agents through [`crate::scenario::Scenario`].
    pub(crate) async fn start(
        database_url: &str,
        ssh: SshClient,
        runner: RunnerConfig,
        max_streams: usize,
    ) -> Self {
        let config = fleetsync_sync_agent::Config {
            max_streams,
            ..agent_config(database_url, ssh, runner)
        };
        let service = Running::spawn(move |listener, shutdown| {
            fleetsync_sync_agent::run(config, listener, shutdown)
        })
        .await;
        // Returns once the agent has turned the migrations' sync requests into jobs. Those
        // jobs sync every registered server: made while a test registers or syncs servers, one
        // would add a run to the test's own (a run that serves it alone, or that meets a fault
        // the test injects). Taken before the test registers anything, each is a job of no
        // servers, done at once; a test that registers first gets them as it expects.
        let db = fleetsync_common::Db::connect(database_url)
            .await
            .expect("connect to watch the outbox");
        crate::catalog::wait_for_count(
            &db,
            "SELECT COUNT(*) FROM sync_requests WHERE state <> 'taken'",
            |n| n == 0,
            Duration::from_secs(30),
            "the agent never took the migrations' sync requests",
        )
        .await;
        db.close().await;
        Self { service }
    }

    /// A `SyncAgent` client.
    pub fn sync(&self) -> SyncAgentClient<Channel> {
        SyncAgentClient::new(self.service.channel.clone())
    }

    /// Starts a sync of these servers (a fresh request id); returns the job's id.
    pub async fn start_sync(&self, server_ids: &[i64]) -> String {
        self.sync()
            .start_sync(fleetsync_common::proto::sync::v1::StartSyncRequest {
                server_ids: server_ids.to_vec(),
                ..Default::default()
            })
            .await
            .expect("start a sync")
            .into_inner()
            .job_id
    }

    /// A `Fleet` client.
    pub fn fleet(&self) -> FleetClient<Channel> {
        FleetClient::new(self.service.channel.clone())
    }
}

/// The migrator's gRPC service, in process.
#[derive(Debug)]
pub struct TestMigrator {
    /// The running service.
    pub service: Running,
}

impl TestMigrator {
    /// Starts the migrator's service on `database_url`.
    pub async fn spawn(database_url: &str) -> Self {
        let config = fleetsync_migrator::Config {
            database_url: database_url.to_owned(),
            shutdown_grace: Duration::from_secs(1),
            drain_delay: Duration::ZERO,
            lock_timeout: Duration::from_secs(60),
            security: Default::default(),
        };
        let service = Running::spawn(move |listener, shutdown| {
            fleetsync_migrator::run(config, listener, shutdown)
        })
        .await;
        Self { service }
    }

    /// A `Migrator` client.
    pub fn migrator(&self) -> MigratorClient<Channel> {
        MigratorClient::new(self.service.channel.clone())
    }
}

/// A real service binary (`sync-agent` or `migrator`) running `serve` on an ephemeral port.
/// Killed on drop.
#[derive(Debug)]
pub struct ServeProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ServeProcess {
    /// Runs `BINARY serve --listen 127.0.0.1:0 ARGS...` and waits for its "listening" line.
    pub fn start(binary: &str, args: &[&str], dir: &Path) -> Self {
        Self::spawn(
            Command::new(bin_path(binary)),
            binary,
            "127.0.0.1",
            args,
            dir,
        )
    }

    /// The same, inside a network namespace (`ip netns exec`), listening on its address: the
    /// process reaches only what the namespace routes to (its database through a proxy on the
    /// namespace's veth, say).
    pub fn start_in(netns: &crate::netns::NetNs, binary: &str, args: &[&str], dir: &Path) -> Self {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns.name()])
            .arg(bin_path(binary));
        // The namespace's address is no loopback: the agent wants a token or the explicit
        // opt-in (only this test can reach the namespace).
        let mut args = args.to_vec();
        args.push("--allow-unauthenticated");
        Self::spawn(command, binary, &netns.ns_addr.to_string(), &args, dir)
    }

    fn spawn(mut command: Command, binary: &str, ip: &str, args: &[&str], dir: &Path) -> Self {
        // An agent needs a key to start; one of the test's own unless the test gives one.
        let key = (binary.starts_with("sync-agent") && !args.contains(&"--ssh-key"))
            .then(|| crate::fleet::agent_key(dir));
        let key_args = key
            .iter()
            .flat_map(|k| ["--ssh-key".to_owned(), k.display().to_string()]);
        let listen = format!("{ip}:0");
        let mut child = command
            .arg("serve")
            .args(key_args)
            .args(["--listen", &listen, "--log-format", "json"])
            // Tests stop services at once; the drain delay has its own test.
            .env("FLEETSYNC_DRAIN_DELAY", "0s")
            // The agent's default schedule syncs every server on each wall-clock hour: a test
            // that ran across one got a job it did not ask for (CI, at 23:00:00). Tests that
            // want the schedule pass `--sync-interval`, which wins over the environment.
            .env("FLEETSYNC_SYNC_INTERVAL", "0s")
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {binary}: {err}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening")
                    && let Some(addr) = json_field(&line, "addr")
                {
                    let _ = tx.send(addr);
                }
                let mut log = sink.lock().expect("log lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let Ok(addr) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            let status = child.wait().expect("wait");
            // Give the reader thread a moment to drain what the process printed.
            std::thread::sleep(Duration::from_millis(100));
            let log = log.lock().expect("log lock").clone();
            panic!("{binary} did not start listening within 20s ({status}): {log}");
        };
        Self {
            addr: addr.parse().expect("listen address"),
            child,
            log,
        }
    }

    /// What its health service says of the entry `fleetsync.sync.v1.Work` (whether it claims
    /// work).
    pub async fn work_health(&self) -> tonic_health::pb::health_check_response::ServingStatus {
        HealthClient::new(connect(self.addr).await)
            .check(tonic_health::pb::HealthCheckRequest {
                service: "fleetsync.sync.v1.Work".into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status()
    }

    /// Waits (at most `within`) until the `fleetsync.sync.v1.Work` health says `status`.
    pub async fn wait_for_work_health(
        &self,
        status: tonic_health::pb::health_check_response::ServingStatus,
        within: Duration,
    ) {
        crate::poll_until(&format!("Work health {status:?}"), within, || async {
            match self.work_health().await {
                now if now == status => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// The value of `"key":"value"` in the first log line that has it, waiting up to 10 s.
    pub fn logged(&self, key: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(value) = self.log().lines().find_map(|line| json_field(line, key)) {
                return value;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {key:?} in the log within 10 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to 10 s) for a process that was signalled elsewhere to exit.
    pub fn terminate_wait(&mut self) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process did not exit within {within:?} after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pulls `"key":"value"` out of a JSON log line (values without escapes only).
fn json_field(line: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\":\"");
    let start = line.find(&needle)? + needle.len();
    let end = line[start..].find('"')? + start;
    Some(line[start..end].to_owned())
}

/// `BINARY serve` as a test runs it by hand (to see it refuse something): for the agent, with
/// a key of the test's own in `dir` (without one it refuses to start).
pub fn serve_command(binary: &str, dir: &Path) -> Command {
    let mut command = Command::new(bin_path(binary));
    command.arg("serve");
    if binary.starts_with("sync-agent") {
        command.arg("--ssh-key").arg(crate::fleet::agent_key(dir));
    }
    command
}

/// Registers a sshd host of a fleet as a server through `Fleet/UpsertServer`; returns its id.
pub async fn register_server(
    fleet: &mut FleetClient<Channel>,
    name: &str,
    host: &crate::SshHost,
    user: &str,
    service: fleetsync_common::proto::sync::v1::DatabaseService,
) -> i64 {
    use fleetsync_common::proto::sync::v1::{ServerSpec, UpsertServerRequest};
    fleet
        .upsert_server(UpsertServerRequest {
            id: 0,
            spec: Some(ServerSpec {
                name: name.into(),
                ip: host.addr().to_string(),
                port: u32::from(host.port()),
                ssh_user: user.into(),
                database_service: service as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("register server")
        .into_inner()
        .server
        .expect("server")
        .id
}

/// Registers every host of a fleet as `{prefix}{index}` with the same service; returns the ids
/// in host order.
pub async fn register_fleet(
    fleet: &mut FleetClient<Channel>,
    hosts: &crate::SshFleet,
    prefix: &str,
    service: fleetsync_common::proto::sync::v1::DatabaseService,
) -> Vec<i64> {
    let mut ids = Vec::with_capacity(hosts.hosts().len());
    for (i, host) in hosts.hosts().iter().enumerate() {
        ids.push(
            register_server(
                fleet,
                &format!("{prefix}{i}"),
                host,
                crate::fleet::SSH_USER,
                service,
            )
            .await,
        );
    }
    ids
}

/// Runs `Sync` for these servers and collects its events; panics unless the job ends within
/// 30 s.
pub async fn sync_events(
    client: &mut SyncAgentClient<Channel>,
    ids: &[i64],
    request_id: &str,
) -> Vec<fleetsync_common::proto::sync::v1::SyncEvent> {
    use tokio_stream::StreamExt;
    let stream = client
        .sync(fleetsync_common::proto::sync::v1::StartSyncRequest {
            request_id: request_id.into(),
            server_ids: ids.to_vec(),
            ..Default::default()
        })
        .await
        .expect("sync")
        .into_inner();
    tokio::time::timeout(
        Duration::from_secs(30),
        stream.map(|e| e.expect("event")).collect::<Vec<_>>(),
    )
    .await
    .expect("the job finishes within 30s")
}

/// Follows a job with `WatchSync` from the start until the stream ends; returns every event.
pub async fn watch_to_end(
    sync: &mut SyncAgentClient<Channel>,
    job_id: &str,
) -> Vec<fleetsync_common::proto::sync::v1::SyncEvent> {
    use fleetsync_common::proto::sync::v1::WatchSyncRequest;
    let mut stream = sync
        .watch_sync(WatchSyncRequest {
            job_id: job_id.to_owned(),
            cursor: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = tokio_stream::StreamExt::next(&mut stream).await {
        events.push(event.expect("event"));
    }
    events
}

/// Every outcome a job has recorded so far (`GetSyncJob` with `include_outcomes`, one page).
pub async fn job_outcomes(
    sync: &mut SyncAgentClient<Channel>,
    job_id: &str,
) -> Vec<fleetsync_common::proto::sync::v1::ServerOutcome> {
    use fleetsync_common::proto::sync::v1::GetSyncJobRequest;
    sync.get_sync_job(GetSyncJobRequest {
        job_id: job_id.to_owned(),
        include_outcomes: true,
        ..Default::default()
    })
    .await
    .expect("get job")
    .into_inner()
    .outcomes
}
