//! The two scenario builders every test starts from: [`Scenario`] for agents in this process (a
//! database of a backend, a fleet of real sshd hosts, the agents, their settings, the fleet's
//! servers registered) and [`AgentProcess`] for agent binaries (the flags the multi-agent tests
//! share, each one overridable). Both own their setup and clean up on drop.

use std::path::{Path, PathBuf};

use fleetsync_common::{
    Backend,
    proto::sync::v1::{DatabaseService, fleet_client::FleetClient},
};
use fleetsync_sync_agent::{
    runner::RunnerConfig,
    ssh::{ClientKeys, DEFAULT_OUTPUT_CAP, SshClient, Timeouts},
};
use tonic::transport::Channel;

use crate::{
    SshFleet, TestAgent, TestDb,
    events::sync_timeouts,
    fleet::Placement,
    netns::NetNs,
    services::{ServeProcess, migrate, register_fleet, test_runner_config},
};

/// Agents in this process on one database, with a fleet of real sshd hosts: what
/// [`Scenario::on`] builds. Fields drop in order: the agents stop before the fleet and the
/// database go.
#[derive(Debug)]
pub struct Scenario {
    /// The agents, started in order, each on the database (through
    /// [`ScenarioBuilder::agent_url`] if given).
    pub agents: Vec<TestAgent>,
    /// The fleet's servers, registered through `Fleet` in host order
    /// ([`ScenarioBuilder::register`]; empty otherwise).
    pub ids: Vec<i64>,
    /// The sshd hosts (none unless asked for), and the key they accept.
    pub fleet: SshFleet,
    /// The control-plane database, migrated.
    pub db: TestDb,
    settings: AgentSettings,
    /// Where the processes a test starts keep their logs (removed on drop).
    dir: tempfile::TempDir,
}

/// What every agent of a scenario starts with, kept for [`Scenario::add_agent`].
#[derive(Debug, Clone)]
struct AgentSettings {
    url: String,
    key: Option<PathBuf>,
    timeouts: Timeouts,
    output_cap: usize,
    runner: RunnerConfig,
    max_streams: usize,
}

/// How a [`Scenario`] is set up: see each method for its default.
#[must_use = "a builder does nothing until `start`"]
pub struct ScenarioBuilder {
    db: DbChoice,
    agent_url: Option<String>,
    key: Option<PathBuf>,
    placements: Vec<Placement>,
    agents: usize,
    timeouts: Timeouts,
    output_cap: usize,
    runner: RunnerConfig,
    max_streams: usize,
    register: Option<(String, DatabaseService)>,
    migrate: bool,
}

enum DbChoice {
    Fresh(Backend),
    Given(TestDb),
}

impl Scenario {
    /// A scenario on a fresh database of `backend`: one agent, no hosts, the tests' scheduler
    /// settings ([`test_runner_config`]) and SSH timeouts ([`sync_timeouts`]).
    pub fn on(backend: Backend) -> ScenarioBuilder {
        ScenarioBuilder::new(DbChoice::Fresh(backend))
    }

    /// The same on a database the test made (to put a proxy or a role between it and the
    /// agents first: [`ScenarioBuilder::agent_url`]).
    pub fn with_db(db: TestDb) -> ScenarioBuilder {
        ScenarioBuilder::new(DbChoice::Given(db))
    }

    /// The first agent.
    pub fn agent(&self) -> &TestAgent {
        &self.agents[0]
    }

    /// The URL the agents connect with.
    pub fn agent_url(&self) -> &str {
        &self.settings.url
    }

    /// The agent binary on this scenario's database (through the agent URL, if one was given),
    /// logging in with the fleet's key, otherwise with its own defaults: add
    /// [`AgentProcess::fleet_defaults`] or flags, then [`start`](Self::start_process) it.
    pub fn agent_process(&self) -> AgentProcess<'static> {
        let key = self
            .settings
            .key
            .as_deref()
            .unwrap_or(self.fleet.client_key());
        AgentProcess::on(&self.settings.url).key(key)
    }

    /// Starts `process` with its log in the scenario's directory; returns once it listens.
    pub fn start_process(&self, process: &AgentProcess<'_>) -> ServeProcess {
        process.start(self.dir())
    }

    /// Starts `process` serving metrics on a loopback port of its own, the fleet's gauges read
    /// at most every `interval` (`--metrics-interval`); returns it with the metrics address.
    pub fn start_with_metrics(
        &self,
        process: AgentProcess<'_>,
        interval: &str,
    ) -> (ServeProcess, std::net::SocketAddr) {
        let agent = self.start_process(
            &process
                .flag("--metrics-listen", "127.0.0.1:0")
                .flag("--metrics-interval", interval),
        );
        let metrics = agent.logged("metrics_addr").parse().expect("an address");
        (agent, metrics)
    }

    /// The scenario's directory, for the processes a test starts.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A `Fleet` client of the first agent.
    pub fn fleet_api(&self) -> FleetClient<Channel> {
        self.agent().fleet()
    }

    /// Starts one more agent with the scenario's settings (after the others, or in place of
    /// one the test stopped); returns it.
    pub async fn add_agent(&mut self) -> &TestAgent {
        self.add_agents(1).await;
        self.agents.last().expect("just added")
    }

    /// Starts `n` more agents at the same moment (each returns once the migrations' sync
    /// requests are jobs).
    pub async fn add_agents(&mut self, n: usize) {
        let started =
            futures_util::future::join_all((0..n).map(|_| self.settings.start(&self.fleet))).await;
        self.agents.extend(started);
    }

    /// Stops agent `i` (as SIGTERM would: runs in flight get the shutdown grace) and checks
    /// that it stopped cleanly; the others keep their places after it.
    pub async fn stop_agent(&mut self, i: usize) {
        self.agents
            .remove(i)
            .service
            .stop()
            .await
            .expect("the agent stops cleanly");
    }

    /// Stops every agent and checks that each stopped cleanly.
    pub async fn stop(self) {
        for agent in self.agents {
            agent.service.stop().await.expect("the agent stops cleanly");
        }
    }
}

impl ScenarioBuilder {
    fn new(db: DbChoice) -> Self {
        Self {
            db,
            agent_url: None,
            key: None,
            placements: Vec::new(),
            agents: 1,
            timeouts: sync_timeouts(),
            output_cap: DEFAULT_OUTPUT_CAP,
            runner: test_runner_config(),
            max_streams: 1024,
            register: None,
            migrate: true,
        }
    }

    /// `n` sshd hosts on loopback (default none).
    pub fn hosts(self, n: usize) -> Self {
        self.placements(&vec![Placement::Loopback; n])
    }

    /// One sshd host per placement, in order.
    pub fn placements(mut self, placements: &[Placement]) -> Self {
        self.placements = placements.to_vec();
        self
    }

    /// `n` agents (default 1); `0` for a test that starts its own later.
    pub fn agents(mut self, n: usize) -> Self {
        self.agents = n;
        self
    }

    /// The agents' SSH timeouts (default [`sync_timeouts`]).
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The agents' cap on a command's output (default [`DEFAULT_OUTPUT_CAP`]).
    pub fn output_cap(mut self, bytes: usize) -> Self {
        self.output_cap = bytes;
        self
    }

    /// Changes the agents' scheduler settings (default [`test_runner_config`]).
    pub fn runner(mut self, change: impl FnOnce(&mut RunnerConfig)) -> Self {
        change(&mut self.runner);
        self
    }

    /// At most `n` event streams open per agent (default 1024).
    pub fn max_streams(mut self, n: usize) -> Self {
        self.max_streams = n;
        self
    }

    /// Leaves the database as it is, unmigrated (a test that runs the migrator itself, then
    /// [`Scenario::add_agent`]); no agent starts.
    pub fn unmigrated(mut self) -> Self {
        self.migrate = false;
        self.agents = 0;
        self
    }

    /// The URL the agents connect with instead of the database's own (a proxy, a role).
    pub fn agent_url(mut self, url: impl Into<String>) -> Self {
        self.agent_url = Some(url.into());
        self
    }

    /// The agents log in with this fleet's key (a fleet the test keeps across scenarios)
    /// instead of the scenario's own.
    pub fn key_of(mut self, fleet: &SshFleet) -> Self {
        self.key = Some(fleet.client_key().to_owned());
        self
    }

    /// Registers every host as `{prefix}{index}` with this database service once the agents
    /// run ([`Scenario::ids`]).
    pub fn register(mut self, prefix: &str, service: DatabaseService) -> Self {
        self.register = Some((prefix.to_owned(), service));
        self
    }

    /// Creates the database and the fleet, migrates, starts the agents (each returns once the
    /// migrations' sync requests are jobs) and registers the fleet if asked.
    pub async fn start(self) -> Scenario {
        let db = match self.db {
            DbChoice::Fresh(backend) => TestDb::create(backend).await,
            DbChoice::Given(db) => db,
        };
        let fleet = SshFleet::start_with(&self.placements).await;
        if self.migrate {
            migrate(db.url()).await;
        }
        let settings = AgentSettings {
            url: self.agent_url.unwrap_or_else(|| db.url().to_owned()),
            key: self.key,
            timeouts: self.timeouts,
            output_cap: self.output_cap,
            runner: self.runner,
            max_streams: self.max_streams,
        };
        let mut scenario = Scenario {
            agents: Vec::with_capacity(self.agents),
            ids: Vec::new(),
            fleet,
            db,
            settings,
            dir: tempfile::Builder::new()
                .prefix("fleetsync-scenario-")
                .tempdir()
                .expect("create the scenario's directory"),
        };
        scenario.add_agents(self.agents).await;
        if let Some((prefix, service)) = &self.register {
            assert!(self.agents > 0, "registering a fleet needs an agent");
            scenario.ids =
                register_fleet(&mut scenario.fleet_api(), &scenario.fleet, prefix, *service).await;
        }
        scenario
    }
}

impl AgentSettings {
    async fn start(&self, fleet: &SshFleet) -> TestAgent {
        let key = self.key.as_deref().unwrap_or(fleet.client_key());
        let keys = ClientKeys::load(&[key]).expect("load the agents' SSH key");
        TestAgent::start(
            &self.url,
            SshClient::new(self.timeouts, self.output_cap, keys),
            self.runner.clone(),
            self.max_streams,
        )
        .await
    }
}

/// An agent binary (`sync-agent`, or `sync-agent-older`) on a database, as a test starts it:
/// [`on`](Self::on) gives the binary's own defaults (an operator's start; `ServeProcess` gives
/// an agent started without `--ssh-key` a key of the test's own), [`fleet_defaults`](Self::fleet_defaults)
/// the flags of the tests that run several agents on real sshd hosts; [`flag`](Self::flag)
/// replaces one or adds another.
#[must_use = "a builder does nothing until `start`"]
pub struct AgentProcess<'a> {
    binary: &'a str,
    flags: Vec<(String, Option<String>)>,
    netns: Option<&'a NetNs>,
}

impl<'a> AgentProcess<'a> {
    /// `sync-agent` on the database at `database_url`, otherwise with its own defaults.
    pub fn on(database_url: &str) -> Self {
        Self {
            binary: "sync-agent",
            flags: Vec::new(),
            netns: None,
        }
        .flag("--database-url", database_url)
    }

    /// The flags of the tests that run several agents on real sshd hosts: a 2 s lease, quick
    /// polls, no schedule, no probes or backoff within a test, and generous timeouts (hundreds
    /// of sshd on two cores, and CI runs other work beside).
    pub fn fleet_defaults(self) -> Self {
        self.flag("--lease-ttl", "2s")
            .flag("--poll-interval", "100ms")
            .flag("--sync-interval", "0s")
            .flag("--probe-interval", "1h")
            .flag("--backoff-base", "1h")
            .flag("--connect-timeout", "2s")
            .flag("--handshake-timeout", "4s")
    }

    /// Logs in with the key at `path` (`--ssh-key`).
    pub fn key(self, path: impl AsRef<Path>) -> Self {
        self.flag("--ssh-key", path.as_ref().display())
    }

    /// Another build of the agent (`sync-agent-older`).
    pub fn binary(mut self, binary: &'a str) -> Self {
        self.binary = binary;
        self
    }

    /// `--FLAG VALUE`: replaces the flag's value if it has one, else adds it.
    pub fn flag(mut self, flag: &str, value: impl std::fmt::Display) -> Self {
        let value = Some(value.to_string());
        match self.flags.iter_mut().find(|(f, _)| f == flag) {
            Some(entry) => entry.1 = value,
            None => self.flags.push((flag.to_owned(), value)),
        }
        self
    }

    /// `--FLAG` without a value (a switch), once.
    pub fn switch(mut self, flag: &str) -> Self {
        if !self.flags.iter().any(|(f, _)| f == flag) {
            self.flags.push((flag.to_owned(), None));
        }
        self
    }

    /// Flags as a command line gives them: `--flag value` pairs and `--switch`es.
    pub fn args(mut self, args: &[&str]) -> Self {
        let mut rest = args.iter().peekable();
        while let Some(flag) = rest.next() {
            match rest.peek() {
                Some(value) if !value.starts_with("--") => {
                    self = self.flag(flag, value);
                    rest.next();
                }
                _ => self = self.switch(flag),
            }
        }
        self
    }

    /// Leaves a default flag out.
    pub fn without(mut self, flag: &str) -> Self {
        self.flags.retain(|(f, _)| f != flag);
        self
    }

    /// Runs it inside this network namespace, listening on its address.
    pub fn in_netns(mut self, netns: &'a NetNs) -> Self {
        self.netns = Some(netns);
        self
    }

    /// The arguments after `serve --listen ...`, in order.
    pub fn command_line(&self) -> Vec<String> {
        let mut args = Vec::with_capacity(self.flags.len() * 2);
        for (flag, value) in &self.flags {
            args.push(flag.clone());
            args.extend(value.clone());
        }
        args
    }

    /// Starts it with its log in `dir`; returns once it listens.
    pub fn start(&self, dir: &Path) -> ServeProcess {
        let args = self.command_line();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match self.netns {
            Some(netns) => ServeProcess::start_in(netns, self.binary, &args, dir),
            None => ServeProcess::start(self.binary, &args, dir),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_given_again_replaces_the_default_and_others_are_added_in_order() {
        let agent = AgentProcess::on("sqlite:x.db")
            .fleet_defaults()
            .key("/k")
            .flag("--lease-ttl", "3s")
            .args(&["--concurrency", "4", "--allow-remote"])
            .without("--backoff-base");
        let args = agent.command_line();
        let at = |flag: &str| args.iter().position(|a| a == flag).expect(flag);
        assert_eq!(args[at("--lease-ttl") + 1], "3s");
        assert_eq!(args.iter().filter(|a| *a == "--lease-ttl").count(), 1);
        assert_eq!(args[at("--concurrency") + 1], "4");
        assert_eq!(args.last().map(String::as_str), Some("--allow-remote"));
        assert!(!args.iter().any(|a| a == "--backoff-base"));
        assert_eq!(args[..2], ["--database-url", "sqlite:x.db"]);
        assert_eq!(args[at("--ssh-key") + 1], "/k");
    }
}
