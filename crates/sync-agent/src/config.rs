//! Command-line configuration of the sync-agent (clap, every flag also an environment variable).

use std::{net::SocketAddr, path::PathBuf};

use clap::{
    Args, Parser, Subcommand,
    builder::{PossibleValuesParser, TypedValueParser},
};
use fleetsync_common::cli::{CommonArgs, SecurityArgs, ShutdownArgs};

use crate::{
    model::{JobOrigin, JobState, Reachability},
    ssh::{DEFAULT_OUTPUT_CAP, Timeouts},
};

/// Parses a stored enum by its stored names, which `--help` lists as the possible values.
fn stored<T: Copy + Send + Sync + 'static>(
    all: &'static [T],
    name: fn(T) -> &'static str,
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(all.iter().map(move |v| name(*v))).map(move |text| {
        *all.iter()
            .find(|v| name(**v) == text)
            .expect("clap allows only the possible values")
    })
}

/// The fleetsync sync-agent: owns every SSH connection to managed servers and syncs their
/// database inventories, one outcome per server, over gRPC.
#[derive(Debug, Parser)]
#[command(name = "sync-agent", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The agent's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the SyncAgent and Fleet gRPC services (with health and reflection).
    Serve(Box<ServeArgs>),
    /// List registered servers with their reachability and last outcome; `servers add`,
    /// `servers remove` and `servers import` register one, remove one, and register a whole
    /// fleet from a file.
    Servers(ServersArgs),
    /// Sync some servers (or all), and with --watch follow the job live.
    Sync(SyncArgs),
    /// Show a job: summary and per-server outcomes; with --watch, follow it.
    Job(JobArgs),
    /// List jobs, newest first: those started by calls, migrations, the periodic sync and
    /// recovery syncs.
    Jobs(JobsArgs),
    /// Check one server now: connect, banner, host key, authentication (runs nothing).
    Check(CheckArgs),
    /// List the sync-agents of this control plane: state, zone, version, keys, heartbeat,
    /// leases, runs in flight, outcomes and second opinions (any agent answers for all);
    /// `agents resume ID` returns a quarantined agent to service.
    Agents(AgentsArgs),
    /// Forget a server's pinned host key (after a legitimate re-install); the next sync pins
    /// the key the server presents.
    ResetHostKey(ResetHostKeyArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(fleetsync_common::cli::CompletionsArgs),
    /// Print the man page (with --dir: write one page per command).
    Man(fleetsync_common::cli::ManArgs),
}

/// How the operator commands reach a running agent (given before or after a subcommand).
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The agent's gRPC URL (`https://` for TLS).
    #[arg(
        long,
        global = true,
        env = "FLEETSYNC_AGENT_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub agent_url: String,

    /// File holding the agent's bearer token, if it requires one.
    #[arg(long, global = true, env = "FLEETSYNC_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<PathBuf>,

    /// PEM certificate of the CA that signed the agent's certificate (private CA).
    #[arg(long, global = true, env = "FLEETSYNC_AGENT_CA")]
    pub agent_ca: Option<PathBuf>,

    /// Output format.
    #[arg(long, short, global = true, env = "FLEETSYNC_OUTPUT", value_enum, default_value_t = Output::Human)]
    pub output: Output,

    /// How long to wait for the agent: to connect, and for each answer. A watch waits for
    /// events as long as the job runs, but a connection that stops answering its keepalive
    /// pings for this long is given up.
    #[arg(
        long,
        global = true,
        env = "FLEETSYNC_TIMEOUT",
        default_value = "30s",
        value_parser = positive_duration
    )]
    pub timeout: humantime::Duration,
}

/// A count of at least 1.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// A duration greater than zero.
fn positive_duration(text: &str) -> Result<humantime::Duration, String> {
    let d: humantime::Duration = text.parse().map_err(|e| format!("{e}"))?;
    if d.is_zero() {
        return Err("must be greater than 0".into());
    }
    Ok(d)
}

/// Output format of the operator commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables and a live progress bar.
    Human,
    /// JSON on stdout, for scripts.
    Json,
}

/// `sync-agent servers [add|remove]`.
#[derive(Debug, Clone, Args)]
pub struct ServersArgs {
    /// Without one: list the servers.
    #[command(subcommand)]
    pub action: Option<ServersAction>,

    #[command(flatten)]
    pub agent: AgentArgs,

    /// Only servers with this reachability.
    #[arg(long, value_parser = stored(Reachability::ALL, Reachability::as_str))]
    pub reachability: Option<Reachability>,
}

/// `sync-agent servers add|remove`: the Fleet API's UpsertServer and DeleteServer.
#[derive(Debug, Clone, Subcommand)]
pub enum ServersAction {
    /// Register a server (or, with --id, change the registered one); prints its id.
    Add(AddServerArgs),
    /// Remove a server and what was stored about it (its rows in past jobs stay, by name).
    Remove(RemoveServerArgs),
    /// Register many servers from a file: JSON lines (one ServerSpec per line, as grpcurl
    /// prints it) or CSV with a header row. Each server is created or updated by name, so an
    /// import can be run again; a bad line is reported with its number and skipped.
    Import(ImportArgs),
}

/// `sync-agent servers import FILE`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The file to read; `-` reads standard input.
    pub file: std::path::PathBuf,
    /// Its format. `auto`: by the extension (`.csv`; `.jsonl`, `.ndjson`, `.json`), else JSON
    /// lines when the first character is `{`, else CSV.
    #[arg(long, value_enum, default_value_t = ImportFormat::Auto)]
    pub format: ImportFormat,
    /// Servers per call to the agent (at most 10,000; a call also stays under 3 MiB).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
    /// Calls in flight at once (a name never travels in two at once, so the later line wins).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
}

/// The format of an import file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFormat {
    /// From the file's name or first character.
    Auto,
    /// One JSON object per line: a ServerSpec in the proto3 JSON mapping (`grpcurl` prints it
    /// so), field names in camelCase or as in the proto, enums by name or number.
    Jsonl,
    /// A header row naming ServerSpec fields (`name,ip,port,ssh_user,database_service,...`),
    /// then one server per row; enums by name (`mariadb` or `DATABASE_SERVICE_MARIADB`).
    Csv,
}

/// `sync-agent servers add NAME IP`.
#[derive(Debug, Clone, Args)]
pub struct AddServerArgs {
    /// The server's name, as the panel shows it.
    pub name: String,
    /// Its IP address (IPv4 or IPv6) or host name.
    pub ip: String,
    /// SSH port.
    #[arg(long, default_value_t = 22, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// The SSH login user (it needs passwordless sudo for the database client).
    #[arg(long, default_value = "vito")]
    pub user: String,
    /// The database service whose inventory is synced.
    #[arg(long, value_enum, default_value_t = ServiceArg::Mariadb)]
    pub service: ServiceArg,
    /// The service's version, as the panel records it (informational).
    #[arg(long, default_value = "")]
    pub service_version: String,
    /// Change the server with this id instead of registering a new one.
    #[arg(long)]
    pub id: Option<i64>,
    /// Its SSH host public key, as in `/etc/ssh/ssh_host_ed25519_key.pub` ("ssh-ed25519 AAAA..."):
    /// pinned now, so that the first contact already refuses another key.
    #[arg(long)]
    pub host_key: Option<String>,
    /// The zone (network) it lives in: only agents started with the same --zone sync it.
    #[arg(long, default_value = "")]
    pub zone: String,
}

/// A server's database service on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceArg {
    /// No database service: syncs skip it (SKIPPED_NO_DATABASE_SERVICE).
    None,
    /// MySQL.
    Mysql,
    /// MariaDB.
    Mariadb,
    /// PostgreSQL.
    Postgresql,
}

/// `sync-agent servers remove ID`.
#[derive(Debug, Clone, Args)]
pub struct RemoveServerArgs {
    /// The server's id.
    pub server_id: i64,
}

/// `sync-agent sync`.
#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub agent: AgentArgs,

    /// Server ids to sync.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub servers: Vec<i64>,

    /// Sync every registered server.
    #[arg(long)]
    pub all: bool,

    /// Also try servers that are offline and in backoff.
    #[arg(long)]
    pub force: bool,

    /// Why (stored with the job).
    #[arg(long, default_value = "manual sync")]
    pub reason: String,

    /// Idempotency key: the same key returns the same job.
    #[arg(long)]
    pub request_id: Option<String>,

    /// Follow the job: live progress, then a summary table.
    #[arg(long, short)]
    pub watch: bool,
}

/// `sync-agent job`.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub agent: AgentArgs,

    /// The job's id.
    pub job_id: String,

    /// Follow the job until it is done.
    #[arg(long, short)]
    pub watch: bool,
}

/// `sync-agent check`.
#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub agent: AgentArgs,

    /// Only jobs of this origin.
    #[arg(long, value_parser = stored(JobOrigin::ALL, JobOrigin::as_str))]
    pub origin: Option<JobOrigin>,

    /// Only jobs in this state.
    #[arg(long, value_parser = stored(JobState::ALL, JobState::as_str))]
    pub state: Option<JobState>,

    /// Only jobs that cover this server.
    #[arg(long)]
    pub server: Option<i64>,

    /// Most jobs to show.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
}

/// `sync-agent agents`.
#[derive(Debug, Clone, Args)]
pub struct AgentsArgs {
    #[command(flatten)]
    pub agent: AgentArgs,

    #[command(subcommand)]
    pub action: Option<AgentsAction>,
}

/// What `sync-agent agents` does besides listing.
#[derive(Debug, Clone, Subcommand)]
pub enum AgentsAction {
    /// Ask a quarantined agent to serve again (it acts at its next heartbeat). Fix what made
    /// its attempts fail first: it quarantines itself again if they keep failing.
    Resume {
        /// The agent's id, as `sync-agent agents` shows it.
        id: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub agent: AgentArgs,

    /// The server's id.
    pub server_id: i64,
}

/// `sync-agent reset-host-key`.
#[derive(Debug, Clone, Args)]
pub struct ResetHostKeyArgs {
    #[command(flatten)]
    pub agent: AgentArgs,

    /// The server's id.
    pub server_id: i64,
}

/// `sync-agent serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on for gRPC.
    #[arg(
        long,
        env = "FLEETSYNC_AGENT_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub common: CommonArgs,

    #[command(flatten)]
    pub shutdown: ShutdownArgs,

    #[command(flatten)]
    pub security: SecurityArgs,

    #[command(flatten)]
    pub ssh: SshArgs,

    /// Servers synced at once: key exchanges, authentications and commands in flight. Servers
    /// being dialed (TCP connect and banner, which cost waiting, not CPU) do not count: up to
    /// 4x this (at least 256, at most 1024) are in flight, so unreachable servers wait out
    /// their timeouts alongside the healthy work.
    #[arg(long, env = "FLEETSYNC_CONCURRENCY", default_value_t = 64, value_parser = at_least_one())]
    pub concurrency: usize,

    /// Most servers in flight, dialing included (default 4x --concurrency, 256 to 1024; never
    /// fewer than --concurrency). An agent claims this many at once: agents side by side share
    /// jobs larger than this, and a smaller job is run by the agent that claims it first.
    #[arg(long, env = "FLEETSYNC_IN_FLIGHT", value_parser = at_least_one())]
    pub in_flight: Option<usize>,

    /// The zone (network) this agent serves: it syncs only servers registered with this zone,
    /// and asks only agents of this zone for second opinions. Without one, it syncs the servers
    /// without a zone.
    #[arg(long, env = "FLEETSYNC_ZONE", default_value = "", value_parser = zone_name)]
    pub zone: String,

    /// Record a failure that may be this agent's own (authentication refused, unreachable,
    /// handshake failed) at once, without asking a live peer of its zone for a second opinion
    /// first (README, "Running several agents"). For agents known to be alike (one key, one
    /// network); `bench-scale` measures what the second opinion costs.
    #[arg(long, env = "FLEETSYNC_NO_SECOND_OPINIONS")]
    pub no_second_opinions: bool,

    /// Lease on a server while it is synced; renewed during the run, taken over by another
    /// agent if this one dies.
    #[arg(long, env = "FLEETSYNC_LEASE_TTL", default_value = "60s")]
    pub lease_ttl: humantime::Duration,

    /// How often the database is polled for work and outcomes made by other agents.
    #[arg(long, env = "FLEETSYNC_POLL_INTERVAL", default_value = "200ms")]
    pub poll_interval: humantime::Duration,

    /// How often sync requests recorded by migrations are taken (also at start).
    #[arg(long, env = "FLEETSYNC_OUTBOX_INTERVAL", default_value = "10s")]
    pub outbox_interval: humantime::Duration,

    /// Every server is synced this often; 0 turns the periodic sync off.
    #[arg(long, env = "FLEETSYNC_SYNC_INTERVAL", default_value = "1h")]
    pub sync_interval: humantime::Duration,

    /// Backoff after a server's first failed connection; doubles with each failure (±20%).
    #[arg(long, env = "FLEETSYNC_BACKOFF_BASE", default_value = "5s")]
    pub backoff_base: humantime::Duration,

    /// Longest backoff between probes of an offline server.
    #[arg(long, env = "FLEETSYNC_BACKOFF_MAX", default_value = "10m")]
    pub backoff_max: humantime::Duration,

    /// How often offline servers due for a probe are checked (TCP connect and SSH banner).
    #[arg(long, env = "FLEETSYNC_PROBE_INTERVAL", default_value = "5s")]
    pub probe_interval: humantime::Duration,

    /// Finished jobs, their outcomes and the run history are deleted this long after they
    /// finished.
    #[arg(long, env = "FLEETSYNC_RETENTION", default_value = "7d")]
    pub retention: humantime::Duration,

    /// Connections to the control-plane database (PostgreSQL, MySQL) for RPCs and watch
    /// streams (the watchers of one job share their reads: one connection per change, however
    /// many watch). The work path (claims, batched completions, the heartbeat) has 6 of its own,
    /// so that busy clients never delay lease renewals, and LISTEN one more: an agent opens at
    /// most this + 7.
    #[arg(long, env = "FLEETSYNC_DB_POOL_SIZE", default_value_t = 6)]
    pub db_pool_size: u32,

    /// Most WatchSync/Sync streams open at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "FLEETSYNC_MAX_STREAMS", default_value_t = 1024)]
    pub max_streams: usize,

    /// Most CheckConnection calls in flight at once (each holds a socket for up to the SSH
    /// timeouts); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "FLEETSYNC_MAX_CHECKS", default_value_t = 64)]
    pub max_checks: usize,

    /// How long to wait at start for a PostgreSQL or MySQL database that does not answer
    /// (health says NOT_SERVING meanwhile, and every attempt is logged); then exit with its
    /// error. Without it, the agent waits as long as it takes: a service manager sees it up
    /// but not ready, instead of a crash loop. A SQLite file is never waited for.
    #[arg(long, env = "FLEETSYNC_DATABASE_WAIT")]
    pub database_wait: Option<humantime::Duration>,

    /// Serve Prometheus metrics as plain HTTP `GET /metrics` on this address (off unless
    /// set), e.g. `127.0.0.1:9464`. The metrics hold no secrets, only counts and names of
    /// outcomes, stages and methods.
    #[arg(long, env = "FLEETSYNC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// The fleet-wide gauges (jobs, servers waiting, reachability, the outbox, the pools) are
    /// read from the database at most this often, however often and however many scrape at
    /// once; 0s reads them at every scrape.
    #[arg(long, env = "FLEETSYNC_METRICS_INTERVAL", default_value = "2s")]
    pub metrics_interval: humantime::Duration,
}

/// How the agent connects to managed servers.
#[derive(Debug, Clone, Args)]
pub struct SshArgs {
    /// Private key file offered to servers (unencrypted OpenSSH format). May be repeated, or a
    /// comma-separated list in the environment variable; keys are tried in order.
    #[arg(long = "ssh-key", env = "FLEETSYNC_SSH_KEYS", value_delimiter = ',')]
    pub ssh_keys: Vec<PathBuf>,

    /// Timeout for DNS resolution and the TCP connection.
    #[arg(long, env = "FLEETSYNC_CONNECT_TIMEOUT", default_value = "5s")]
    pub connect_timeout: humantime::Duration,

    /// Timeout for the SSH banner, and then for the key exchange (each).
    #[arg(long, env = "FLEETSYNC_HANDSHAKE_TIMEOUT", default_value = "5s")]
    pub handshake_timeout: humantime::Duration,

    /// Timeout for public-key authentication.
    #[arg(long, env = "FLEETSYNC_AUTH_TIMEOUT", default_value = "5s")]
    pub auth_timeout: humantime::Duration,

    /// Timeout for each command run on a server.
    #[arg(long, env = "FLEETSYNC_COMMAND_TIMEOUT", default_value = "30s")]
    pub command_timeout: humantime::Duration,

    /// Most bytes a command may print on stdout (and, separately, stderr).
    #[arg(long, env = "FLEETSYNC_OUTPUT_CAP", default_value_t = DEFAULT_OUTPUT_CAP)]
    pub output_cap: usize,
}

impl SshArgs {
    /// The stage timeouts these arguments set.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: self.connect_timeout.into(),
            handshake: self.handshake_timeout.into(),
            auth: self.auth_timeout.into(),
            command: self.command_timeout.into(),
        }
    }
}

fn zone_name(zone: &str) -> Result<String, String> {
    crate::model::check_zone(zone)?;
    Ok(zone.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_durations_and_repeated_keys() {
        let cli = Cli::try_parse_from([
            "sync-agent",
            "serve",
            "--ssh-key",
            "/a",
            "--ssh-key",
            "/b",
            "--connect-timeout",
            "1500ms",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert_eq!(
            args.ssh.ssh_keys,
            [PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert_eq!(
            args.ssh.timeouts().connect,
            std::time::Duration::from_millis(1500)
        );
        assert_eq!(
            args.ssh.timeouts().command,
            std::time::Duration::from_secs(30)
        );
        assert_eq!(args.listen.to_string(), "127.0.0.1:50051");
    }
}
