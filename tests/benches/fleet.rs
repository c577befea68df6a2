//! `just bench-fleet`: fleetsync against the tools operators script this job with, side by side
//! on one fleet of real OpenSSH hosts: 200 healthy ones on loopback, 20 that refuse (sshd
//! stopped), 10 frozen (sshd stopped with SIGSTOP: the kernel accepts TCP, no banner ever comes)
//! and 10 with no route (each in a network namespace whose address is removed), in an
//! interleaved order. Every tool reads the MariaDB inventory of each host with the same query
//! through `sudo mariadb`, with 5 s timeouts:
//!
//! - fleetsync: the release agent (SQLite, default `--concurrency`), one job over gRPC from
//!   `StartSync` to the summary, host keys pinned and checked, every outcome stored;
//! - Ansible (`ansible-core`, `-m raw -f 50 -T 5`, host key checking off);
//! - parallel-ssh (the Python library on libssh2: pool 100, timeout 5 s, `num_retries=0`);
//! - pssh (Debian's `parallel-ssh`, `-p 100`, `ConnectTimeout=5`).
//!
//! After one warm-up round, `BENCH_RUNS` (default 3) rounds run the tools in turn. Medians of:
//! wall time; client CPU (user + system of the tool's whole process tree, from a cgroup, or of
//! the agent process); peak memory (the tree's, from the memory cgroup); the machine's busy
//! CPU; the sshd side's CPU (every sshd and what it runs, from a cgroup); and how each tool
//! classified the 40 faulty hosts. Prints a markdown table and writes it to `bench/fleet.md`.
//!
//! Then the same again over a WAN: every healthy host behind a userspace proxy that holds each
//! direction back by 50 ms (`proxy::DelayProxy`; this kernel has no netem), the faulty hosts as
//! they were; the report sets fleetsync's wall against the floor the round trips set (one
//! healthy host synced alone through its proxy). `BENCH_WAN=0` skips this part.
//!
//! `BENCH_ONLY=fleetsync,pssh` runs some tools only (and leaves `bench/fleet.md` alone);
//! `BENCH_PROFILE=FILE` records the agent with `perf record -g` during each of its jobs (the
//! last one stays in FILE); `BENCH_TIMELINE=1` prints when each kind of host finished.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use fleetsync_common::{
    clock::new_id,
    proto::sync::v1::{
        DatabaseService, ServerSpec, StartSyncRequest, UnreachableCause, UpsertServerRequest,
        fleet_client::FleetClient, sync_agent_client::SyncAgentClient,
    },
};
use fleetsync_tests::{
    AgentProcess, SshFleet, TestDb,
    bench::{machine, median, peak_rss_mib, runs},
    fleet::{Placement, SSH_USER},
    proxy::DelayProxy,
    services::{ServeProcess, connect, job_outcomes, migrate, watch_to_end},
};

const HEALTHY: usize = 200;
const REFUSED: usize = 20;
const FROZEN: usize = 10;
const NO_ROUTE: usize = 10;
const TIMEOUT_S: u64 = 5;
/// One way, over the WAN: a round trip is twice it.
const WAN_DELAY: Duration = Duration::from_millis(50);

/// What a host does when asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Healthy,
    Refused,
    Frozen,
    NoRoute,
}

/// How a tool reported a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Ok,
    Refused,
    Timeout,
    NoRoute,
    Other,
}

impl Kind {
    fn expected(self) -> Seen {
        match self {
            Kind::Healthy => Seen::Ok,
            Kind::Refused => Seen::Refused,
            Kind::Frozen => Seen::Timeout,
            Kind::NoRoute => Seen::NoRoute,
        }
    }
}

/// Reads an error message as the operator would.
fn classify(message: &str) -> Seen {
    let m = message.to_ascii_lowercase();
    if m.contains("refused") {
        Seen::Refused
    } else if m.contains("no route") || m.contains("network is unreachable") {
        Seen::NoRoute
    } else if m.contains("timed out") || m.contains("timeout") {
        Seen::Timeout
    } else {
        Seen::Other
    }
}

/// A cgroup v1 pair (cpuacct, memory) that holds a process tree, daemons it forks included.
struct Group {
    cpu: PathBuf,
    memory: Option<PathBuf>,
}

impl Group {
    fn create(name: &str) -> Self {
        let make = |controller: &str| {
            let path = PathBuf::from(format!(
                "/sys/fs/cgroup/{controller}/fleetsync-bench-{name}"
            ));
            let _ = std::fs::create_dir(&path);
            path.join("cgroup.procs").exists().then_some(path)
        };
        Self {
            cpu: make("cpuacct").expect(
                "a cgroup v1 cpuacct hierarchy at /sys/fs/cgroup/cpuacct (the bench measures \
                 process trees with it)",
            ),
            memory: make("memory"),
        }
    }

    fn add(&self, pid: u32) {
        for dir in std::iter::once(&self.cpu).chain(self.memory.as_ref()) {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string()).expect("join cgroup");
        }
    }

    /// A shell prefix that joins this group, then execs the command.
    fn wrap(&self, command: &mut Command) -> Command {
        let mut script = String::new();
        for dir in std::iter::once(&self.cpu).chain(self.memory.as_ref()) {
            let _ = write!(script, "echo $$ > {}/cgroup.procs; ", dir.display());
        }
        script.push_str("exec \"$@\"");
        let mut wrapped = Command::new("sh");
        wrapped
            .args(["-c", &script, "sh"])
            .arg(command.get_program())
            .args(command.get_args());
        for (key, value) in command.get_envs() {
            if let Some(value) = value {
                wrapped.env(key, value);
            }
        }
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    fn cpu_seconds(&self) -> f64 {
        read_number(&self.cpu.join("cpuacct.usage")) / 1e9
    }

    fn reset_peak(&self) {
        if let Some(memory) = &self.memory {
            let _ = std::fs::write(memory.join("memory.max_usage_in_bytes"), "0");
        }
    }

    fn peak_mib(&self) -> Option<f64> {
        let memory = self.memory.as_ref()?;
        Some(read_number(&memory.join("memory.max_usage_in_bytes")) / 1024.0 / 1024.0)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for dir in std::iter::once(&self.cpu).chain(self.memory.as_ref()) {
            // Move what is left to the root group, then remove this one.
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                let root = dir.parent().expect("controller root").join("cgroup.procs");
                for pid in procs.lines() {
                    let _ = std::fs::write(&root, pid);
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn read_number(path: &Path) -> f64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
        .trim()
        .parse()
        .expect("a number")
}

/// Busy CPU seconds of the whole machine so far (every core; idle and iowait excluded).
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().expect("ticks"))
        .collect();
    let total: f64 = fields.iter().sum();
    (total - fields[3] - fields[4]) / 100.0
}

/// One tool's run.
#[derive(Debug, Clone, Default)]
struct Sample {
    wall: f64,
    client_cpu: f64,
    peak_mib: f64,
    machine_cpu: f64,
    sshd_cpu: f64,
    /// Per host index, what the tool reported.
    seen: BTreeMap<usize, Seen>,
}

struct Bench {
    fleet: SshFleet,
    kinds: Vec<Kind>,
    /// Hosts reached through a proxy (the WAN part): host index to the proxy.
    via: BTreeMap<usize, DelayProxy>,
    sshd: Group,
    dir: tempfile::TempDir,
    command: String,
    key: String,
    python: PathBuf,
    ansible: PathBuf,
}

impl Bench {
    /// Runs `command` (in a cgroup of its own) and measures it; `parse` reads its output.
    fn measure_command(
        &self,
        name: &str,
        mut command: Command,
        parse: impl Fn(&str, &str) -> BTreeMap<usize, Seen>,
    ) -> Sample {
        let group = Group::create(name);
        group.reset_peak();
        let mut wrapped = group.wrap(&mut command);
        let (machine, sshd) = (machine_busy_seconds(), self.sshd.cpu_seconds());
        let started = Instant::now();
        let output = wrapped.output().expect("run the tool");
        let wall = started.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        Sample {
            wall,
            client_cpu: group.cpu_seconds(),
            peak_mib: group.peak_mib().unwrap_or(0.0),
            machine_cpu: machine_busy_seconds() - machine,
            sshd_cpu: self.sshd.cpu_seconds() - sshd,
            seen: parse(&stdout, &stderr),
        }
    }

    /// `index -> (host, port)` where every tool reaches each host, in the bench's order: the
    /// host itself, or its proxy.
    fn targets(&self) -> Vec<(usize, String, u16)> {
        self.fleet
            .hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| match self.via.get(&i) {
                Some(proxy) => (i, proxy.addr.ip().to_string(), proxy.addr.port()),
                None => (i, h.addr().to_string(), h.port()),
            })
            .collect()
    }

    fn ansible(&self) -> Sample {
        let inventory = self.dir.path().join("inventory.ini");
        let mut text = String::from("[fleet]\n");
        for (i, host, port) in self.targets() {
            let _ = writeln!(text, "h{i} ansible_host={host} ansible_port={port}");
        }
        let _ = write!(
            text,
            "[fleet:vars]\nansible_user={SSH_USER}\nansible_ssh_private_key_file={}\n",
            self.key
        );
        std::fs::write(&inventory, text).expect("write inventory");
        let mut command = Command::new(&self.ansible);
        command
            .args(["fleet", "-i"])
            .arg(&inventory)
            .args(["-m", "raw", "-a", &self.command, "-f", "50", "-T"])
            .arg(TIMEOUT_S.to_string())
            .arg("--one-line")
            .env("ANSIBLE_HOST_KEY_CHECKING", "False")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_LOCAL_TEMP", self.dir.path())
            .env("ANSIBLE_HOME", self.dir.path().join("ansible"))
            // Ansible's default ssh arguments, without ControlPersist: a persisted master would
            // outlive the run (its CPU unmeasured) and serve the next run warm.
            .env(
                "ANSIBLE_SSH_ARGS",
                "-C -o ControlMaster=no -o UserKnownHostsFile=/dev/null",
            );
        self.measure_command("ansible", command, |stdout, _| {
            let mut seen = BTreeMap::new();
            for line in stdout.lines() {
                let Some((name, rest)) = line.split_once(" | ") else {
                    continue;
                };
                let Some(i) = name.trim().strip_prefix('h').and_then(|n| n.parse().ok()) else {
                    continue;
                };
                let status = if rest.starts_with("CHANGED") || rest.starts_with("SUCCESS") {
                    Seen::Ok
                } else {
                    classify(rest)
                };
                seen.insert(i, status);
            }
            seen
        })
    }

    fn parallel_ssh(&self) -> Sample {
        let hosts = self.dir.path().join("hosts.json");
        let list: Vec<String> = self
            .targets()
            .into_iter()
            .map(|(_, host, port)| format!("[\"{host}\", {port}]"))
            .collect();
        std::fs::write(&hosts, format!("[{}]", list.join(","))).expect("write hosts");
        let script = self.dir.path().join("pssh_run.py");
        std::fs::write(&script, PARALLEL_SSH_SCRIPT).expect("write script");
        let mut command = Command::new(&self.python);
        command
            .arg(&script)
            .arg(&hosts)
            .arg(&self.command)
            .arg(&self.key)
            .arg(SSH_USER)
            .arg(TIMEOUT_S.to_string());
        self.measure_command("parallel-ssh", command, |stdout, _| {
            stdout
                .lines()
                .filter_map(|line| {
                    let (i, result) = line.split_once('\t')?;
                    let seen = if result == "ok" {
                        Seen::Ok
                    } else {
                        classify(result)
                    };
                    Some((i.parse().ok()?, seen))
                })
                .collect()
        })
    }

    fn pssh(&self) -> Sample {
        let hosts = self.dir.path().join("pssh-hosts");
        let mut text = String::new();
        let mut index = BTreeMap::new();
        for (i, host, port) in self.targets() {
            let target = format!("{SSH_USER}@{host}:{port}");
            let _ = writeln!(text, "{target}");
            index.insert(target, i);
        }
        std::fs::write(&hosts, text).expect("write hosts");
        let errors = self.dir.path().join(format!("pssh-err-{}", new_id()));
        let mut command = Command::new("/usr/bin/parallel-ssh");
        command
            .arg("-h")
            .arg(&hosts)
            .args(["-p", "100", "-t", "60", "-x"])
            .arg(format!("-i {}", self.key))
            .args([
                "-O",
                &format!("ConnectTimeout={TIMEOUT_S}"),
                "-O",
                "StrictHostKeyChecking=no",
                "-O",
                "UserKnownHostsFile=/dev/null",
                "-O",
                "BatchMode=yes",
                "-O",
                "LogLevel=ERROR",
                "-e",
            ])
            .arg(&errors)
            .arg(&self.command);
        self.measure_command("pssh", command, |stdout, _| {
            let mut seen = BTreeMap::new();
            for line in stdout.lines() {
                // "[1] 12:00:00 [SUCCESS] user@127.1.2.3:22000" or "[FAILURE] ... Exited with"
                let ok = line.contains("[SUCCESS]");
                let Some(target) = line.split_whitespace().find(|w| index.contains_key(*w)) else {
                    continue;
                };
                let i = index[target];
                let status = if ok {
                    Seen::Ok
                } else {
                    let stderr = std::fs::read_to_string(errors.join(target)).unwrap_or_default();
                    classify(&format!("{stderr} {line}"))
                };
                seen.insert(i, status);
            }
            seen
        })
    }
}

/// parallel-ssh's documented use: one client for all hosts, `run_command`, `join`, then each
/// host's output or exception. Prints `index<TAB>ok` or `index<TAB>ExceptionName: message`.
const PARALLEL_SSH_SCRIPT: &str = r#"
import json, sys
from pssh.clients import ParallelSSHClient
from pssh.config import HostConfig

hosts = json.load(open(sys.argv[1]))
command, key, user, timeout = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
client = ParallelSSHClient(
    [h for h, _ in hosts],
    host_config=[
        HostConfig(port=p, user=user, private_key=key, alias=str(i))
        for i, (_, p) in enumerate(hosts)
    ],
    pool_size=100, timeout=timeout, num_retries=0,
)
output = client.run_command(command, stop_on_errors=False)
client.join(output)
for host_output in output:
    i = host_output.alias
    if host_output.exception is not None:
        e = host_output.exception
        print(f"{i}\t{type(e).__name__}: {' '.join(str(a) for a in e.args)}")
        continue
    lines = list(host_output.stdout)
    ok = host_output.exit_code == 0 and lines
    print(f"{i}\t{'ok' if ok else 'exit ' + str(host_output.exit_code)}")
"#;

/// The agent, its API and the server ids in the bench's host order.
struct Agent {
    process: ServeProcess,
    group: Group,
    sync: SyncAgentClient<tonic::transport::Channel>,
    ids: Vec<i64>,
    _db: TestDb,
}

impl Agent {
    async fn start(bench: &Bench) -> Self {
        let db = TestDb::sqlite().await;
        migrate(db.url()).await;
        let timeout = format!("{TIMEOUT_S}s");
        let process = AgentProcess::on(db.url())
            .args(&[
                "--ssh-key",
                &bench.key,
                "--connect-timeout",
                &timeout,
                "--handshake-timeout",
                &timeout,
                "--auth-timeout",
                &timeout,
                "--sync-interval",
                "0s",
                "--probe-interval",
                "1h",
            ])
            .start(bench.dir.path());
        let group = Group::create("agent");
        group.add(process.pid());
        let channel = connect(process.addr).await;
        let mut fleet = FleetClient::new(channel.clone());
        let mut ids = Vec::new();
        for (i, ip, port) in bench.targets() {
            let server = fleet
                .upsert_server(UpsertServerRequest {
                    id: 0,
                    spec: Some(ServerSpec {
                        name: format!("h{i}"),
                        ip,
                        port: u32::from(port),
                        ssh_user: SSH_USER.into(),
                        database_service: DatabaseService::Mariadb as i32,
                        ..Default::default()
                    }),
                })
                .await
                .expect("register a host")
                .into_inner()
                .server
                .expect("the server");
            ids.push(server.id);
        }
        Self {
            process,
            group,
            sync: SyncAgentClient::new(channel),
            ids,
            _db: db,
        }
    }

    /// Wall time of a forced job of host `index` alone (the floor a host's round trips set).
    async fn alone(&mut self, index: usize) -> f64 {
        let started = Instant::now();
        let job = self
            .sync
            .start_sync(StartSyncRequest {
                request_id: format!("bench-alone-{}", new_id()),
                server_ids: vec![self.ids[index]],
                force: true,
                reason: "bench-fleet: one host alone".into(),
                ..Default::default()
            })
            .await
            .expect("start")
            .into_inner();
        watch_to_end(&mut self.sync, &job.job_id).await;
        started.elapsed().as_secs_f64()
    }

    async fn run(&mut self, bench: &Bench) -> Sample {
        self.group.reset_peak();
        let (machine, sshd, cpu) = (
            machine_busy_seconds(),
            bench.sshd.cpu_seconds(),
            self.group.cpu_seconds(),
        );
        let perf = std::env::var("BENCH_PROFILE").ok().map(|out| {
            Command::new("perf")
                .args([
                    "record",
                    "-e",
                    "cpu-clock",
                    "-F",
                    "4999",
                    "-g",
                    "-o",
                    &out,
                    "-p",
                ])
                .arg(self.process.pid().to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("run perf (apt-get install linux-perf)")
        });
        if perf.is_some() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let started = Instant::now();
        let requested = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let job = self
            .sync
            .start_sync(StartSyncRequest {
                request_id: format!("bench-{}", new_id()),
                all_servers: true,
                force: true,
                reason: "bench-fleet".into(),
                ..Default::default()
            })
            .await
            .expect("start")
            .into_inner();
        let accepted = started.elapsed().as_secs_f64();
        watch_to_end(&mut self.sync, &job.job_id).await;
        let wall = started.elapsed().as_secs_f64();
        if let Some(mut perf) = perf {
            let _ = Command::new("kill")
                .args(["-INT", &perf.id().to_string()])
                .status();
            let _ = perf.wait();
        }
        let sample = Sample {
            wall,
            client_cpu: self.group.cpu_seconds() - cpu,
            peak_mib: peak_rss_mib(self.process.pid()),
            machine_cpu: machine_busy_seconds() - machine,
            sshd_cpu: bench.sshd.cpu_seconds() - sshd,
            seen: BTreeMap::new(),
        };
        let by_id: BTreeMap<i64, usize> = self
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, i))
            .collect();
        let outcomes = job_outcomes(&mut self.sync, &job.job_id).await;
        if std::env::var_os("BENCH_TIMELINE").is_some() {
            // When each kind of host finished, from the request (seconds), and how long its
            // run took: where the wall time goes.
            let mut by_kind: BTreeMap<Kind, (f64, f64)> = BTreeMap::new();
            for o in &outcomes {
                let at = o.finished_at.expect("finished_at");
                let at = at.seconds as f64 + f64::from(at.nanos) / 1e9 - requested;
                let took = o
                    .duration
                    .map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9);
                let entry = by_kind.entry(bench.kinds[by_id[&o.server_id]]).or_default();
                entry.0 = entry.0.max(at);
                entry.1 = entry.1.max(took);
            }
            eprintln!(
                "timeline: wall {wall:.2}s, StartSync answered after {accepted:.3}s; last finished, longest run per kind: {by_kind:?}"
            );
        }
        let seen = outcomes
            .into_iter()
            .map(|o| {
                let seen = match (o.outcome().as_str_name(), o.cause()) {
                    ("OUTCOME_OK", _) => Seen::Ok,
                    (_, UnreachableCause::Refused) => Seen::Refused,
                    (_, UnreachableCause::Timeout) => Seen::Timeout,
                    (_, UnreachableCause::NoRoute) => Seen::NoRoute,
                    _ => Seen::Other,
                };
                (by_id[&o.server_id], seen)
            })
            .collect();
        Sample { seen, ..sample }
    }
}

/// The fleet, in an order that spreads the faulty hosts among the healthy ones.
async fn start_fleet() -> (SshFleet, Vec<Kind>) {
    let total = HEALTHY + REFUSED + FROZEN + NO_ROUTE;
    let mut kinds = Vec::with_capacity(total);
    let faulty: Vec<Kind> = std::iter::repeat_n(Kind::Refused, REFUSED)
        .chain(std::iter::repeat_n(Kind::Frozen, FROZEN))
        .chain(std::iter::repeat_n(Kind::NoRoute, NO_ROUTE))
        .collect();
    let every = total / faulty.len();
    let mut next = faulty.iter();
    for i in 0..total {
        match (i % every == every / 2).then(|| next.next()).flatten() {
            Some(kind) => kinds.push(*kind),
            None => kinds.push(Kind::Healthy),
        }
    }
    let placements: Vec<Placement> = kinds
        .iter()
        .map(|k| match k {
            Kind::NoRoute => Placement::Namespace,
            _ => Placement::Loopback,
        })
        .collect();
    let fleet = SshFleet::start_with(&placements).await;
    for (host, kind) in fleet.hosts().iter().zip(&kinds) {
        match kind {
            Kind::Healthy => {}
            Kind::Refused => host.stop(),
            Kind::Frozen => host.freeze(),
            Kind::NoRoute => host.cut_route(),
        }
    }
    (fleet, kinds)
}

struct Row {
    tool: &'static str,
    samples: Vec<Sample>,
}

impl Row {
    fn med(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        median(self.samples.iter().map(f).collect())
    }

    /// The run with the median wall time: the one whose classification is reported.
    fn median_sample(&self) -> &Sample {
        let mut by_wall: Vec<&Sample> = self.samples.iter().collect();
        by_wall.sort_by(|a, b| a.wall.total_cmp(&b.wall));
        by_wall[by_wall.len() / 2]
    }

    /// Healthy hosts reported OK and faulty hosts reported with the right class, in the
    /// median-wall run.
    fn classified(&self, kinds: &[Kind]) -> (usize, usize) {
        let sample = self.median_sample();
        let right = |i: usize, kind: &Kind| sample.seen.get(&i) == Some(&kind.expected());
        let healthy = kinds
            .iter()
            .enumerate()
            .filter(|(i, k)| **k == Kind::Healthy && right(*i, k))
            .count();
        let faulty = kinds
            .iter()
            .enumerate()
            .filter(|(i, k)| **k != Kind::Healthy && right(*i, k))
            .count();
        (healthy, faulty)
    }

    fn misread(&self, kinds: &[Kind]) -> String {
        let sample = self.median_sample();
        let mut counts: BTreeMap<(Kind, Option<Seen>), usize> = BTreeMap::new();
        for (i, kind) in kinds.iter().enumerate() {
            let seen = sample.seen.get(&i).copied();
            if seen != Some(kind.expected()) {
                *counts.entry((*kind, seen)).or_default() += 1;
            }
        }
        counts
            .iter()
            .map(|((kind, seen), n)| {
                format!(
                    "{n} {kind:?} as {}",
                    seen.map_or("nothing".into(), |s| format!("{s:?}"))
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `text` in base64 on one line (coreutils' `base64`, as the hosts decode it).
fn base64(text: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run base64");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to base64");
    let output = child.wait_with_output().expect("base64");
    assert!(output.status.success(), "base64 failed");
    String::from_utf8(output.stdout).expect("base64 is ASCII")
}

fn tool_path(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: `just bench-fleet` installs it",
        path.display()
    );
    path
}

#[tokio::main]
async fn main() {
    let runs = runs();
    let venv = PathBuf::from(
        std::env::var("FLEETSYNC_BENCH_VENV").expect("FLEETSYNC_BENCH_VENV (set by just)"),
    );
    let (fleet, kinds) = start_fleet().await;
    let sshd = Group::create("sshd");
    for host in fleet.hosts() {
        if let Some(pid) = host.pid() {
            sshd.add(pid);
        }
    }
    // The query as fleetsync sends it on a first sync (collations included), for every tool, on
    // the client's stdin as fleetsync sends it: the peers' command line carries it in base64
    // (it holds both kinds of quotes, which no tool's quoting carries through every shell).
    let (command, query) = fleetsync_sync_agent::inventory::probe(
        fleetsync_sync_agent::store::DatabaseService::Mariadb,
        None,
    );
    let mut bench = Bench {
        command: format!("echo {} | base64 -d | {command}", base64(&query)),
        key: fleet.client_key().display().to_string(),
        fleet,
        kinds,
        via: BTreeMap::new(),
        sshd,
        dir: tempfile::tempdir().expect("temp dir"),
        python: tool_path(&venv, "python"),
        ansible: tool_path(&venv, "ansible"),
    };
    let tools = ["fleetsync", "parallel-ssh", "pssh", "Ansible"];
    let only = std::env::var("BENCH_ONLY").ok();
    let wanted: Vec<&'static str> = tools
        .into_iter()
        .filter(|tool| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|t| t == *tool))
        })
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;

    eprintln!("loopback");
    let mut agent = Agent::start(&bench).await;
    let rows = rounds(&bench, &mut agent, &wanted, runs).await;
    drop(agent);
    let loopback = table(&rows, &bench.kinds);
    if rows.len() < tools.len() {
        println!("{loopback}\n(BENCH_ONLY: a partial run; bench/fleet.md is left alone)");
        return;
    }
    let fleetsync_wall = rows[0].med(|s| s.wall);
    let sshd_cpu = rows[0].med(|s| s.sshd_cpu);
    let floor = (TIMEOUT_S as f64).max(sshd_cpu / cores);
    let parallel_ssh = rows[1].med(|s| s.wall);
    let ansible = rows[3].med(|s| s.wall);
    let agent_ms = rows[0].med(|s| s.client_cpu) * 1000.0 / HEALTHY as f64;
    let machine_ratio = rows[0].med(|s| s.machine_cpu) / rows[1].med(|s| s.machine_cpu);
    let mut report = String::new();
    let _ = writeln!(
        report,
        "# bench-fleet: fleetsync and the tools operators script this with\n\n\
         Machine: {}.\n\n\
         Fleet: {HEALTHY} healthy OpenSSH hosts on loopback, {REFUSED} refused, {FROZEN} frozen \
         (TCP accepted, no banner), {NO_ROUTE} with no route (network namespaces), spread \
         through the list; every tool reads the MariaDB inventory with the same query through \
         `sudo mariadb`, {TIMEOUT_S} s timeouts. Medians of {runs} rounds after a warm-up \
         (`just bench-fleet`, `BENCH_RUNS`). Client CPU and peak memory are the whole process \
         tree's (cgroup), or the agent's; machine CPU is every core's busy time (sshd, sudo, \
         the MariaDB server, the tool); sshd-side CPU is every sshd and what it ran.\n",
        machine()
    );
    let _ = writeln!(report, "{loopback}");
    let _ = writeln!(
        report,
        "Floor: the larger of the timeout ({TIMEOUT_S} s: a frozen host cannot be told apart \
         sooner) and the sshd side's CPU over the cores ({sshd_cpu:.2} s / {cores:.0}) = \
         **{floor:.2} s**.\n\n\
         Targets: fleetsync's wall {:.2}x parallel-ssh (≤ 0.6), {:.2}x Ansible (≤ 0.3), \
         {:.3}x the floor (≤ 1.15); agent CPU {agent_ms:.2} ms per healthy host (≤ 2, its \
         database writes included); machine CPU {machine_ratio:.2}x parallel-ssh's (≤ 1.2).\n",
        fleetsync_wall / parallel_ssh,
        fleetsync_wall / ansible,
        fleetsync_wall / floor,
    );

    if std::env::var("BENCH_WAN").as_deref() != Ok("0") {
        eprintln!("WAN: every healthy host behind {WAN_DELAY:?} each way");
        for (i, host) in bench.fleet.hosts().iter().enumerate() {
            if bench.kinds[i] == Kind::Healthy {
                let proxy = DelayProxy::start(host.socket_addr(), WAN_DELAY).await;
                bench.via.insert(i, proxy);
            }
        }
        let mut agent = Agent::start(&bench).await;
        // The round trips' floor: one healthy host synced alone through its proxy (first
        // contact pins its key; then three timed jobs).
        let first_healthy = bench
            .kinds
            .iter()
            .position(|k| *k == Kind::Healthy)
            .expect("a healthy host");
        agent.alone(first_healthy).await;
        let mut alone = Vec::new();
        for _ in 0..3 {
            alone.push(agent.alone(first_healthy).await);
        }
        let alone = median(alone);
        let rows = rounds(&bench, &mut agent, &wanted, runs).await;
        drop(agent);
        let wan = table(&rows, &bench.kinds);
        let fleetsync_wall = rows[0].med(|s| s.wall);
        let wan_floor = (TIMEOUT_S as f64).max(alone);
        let rtt_ms = WAN_DELAY.as_secs_f64() * 2000.0;
        let _ = writeln!(
            report,
            "## Over a WAN: {rtt_ms:.0} ms round trips\n\n\
             The same fleet, every healthy host behind a userspace TCP proxy in the bench that \
             holds each direction back by {} ms, in order, end of file included \
             (`tests/src/proxy.rs`, `DelayProxy`: this kernel has no netem); the faulty hosts \
             as above. The proxy runs in the bench's process, outside every tool's cgroup: its \
             CPU counts in machine CPU only, alike for every tool.\n",
            WAN_DELAY.as_millis()
        );
        let _ = writeln!(report, "{wan}");
        let _ = writeln!(
            report,
            "Floor: the larger of the timeout ({TIMEOUT_S} s) and one healthy host synced alone \
             through its proxy ({alone:.2} s, median of 3: the round trips of a connection, \
             key exchange, login and command) = **{wan_floor:.2} s**. fleetsync's wall \
             {fleetsync_wall:.2} s is {:.2}x the floor; {:.2}x parallel-ssh's, {:.2}x Ansible's.\n",
            fleetsync_wall / wan_floor,
            fleetsync_wall / rows[1].med(|s| s.wall),
            fleetsync_wall / rows[3].med(|s| s.wall),
        );
    }
    println!("{report}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/fleet.md");
    std::fs::write(&out, report).expect("write bench/fleet.md");
    eprintln!("wrote {}", out.display());
}

/// A warm-up round, then `runs` rounds of every wanted tool in turn.
async fn rounds(bench: &Bench, agent: &mut Agent, tools: &[&'static str], runs: usize) -> Vec<Row> {
    let mut rows: Vec<Row> = tools
        .iter()
        .map(|tool| Row {
            tool,
            samples: Vec::new(),
        })
        .collect();
    for round in 0..=runs {
        let mut samples = Vec::new();
        for row in &rows {
            samples.push(match row.tool {
                "fleetsync" => agent.run(bench).await,
                "parallel-ssh" => bench.parallel_ssh(),
                "pssh" => bench.pssh(),
                _ => bench.ansible(),
            });
        }
        eprintln!(
            "round {round}{}: {}",
            if round == 0 { " (warm-up)" } else { "" },
            samples
                .iter()
                .zip(&rows)
                .map(|(s, r)| format!("{} {:.1}s", r.tool, s.wall))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if round > 0 {
            for (row, sample) in rows.iter_mut().zip(samples) {
                row.samples.push(sample);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    rows
}

/// The markdown table of the rows, ratios against the first (fleetsync's).
fn table(rows: &[Row], kinds: &[Kind]) -> String {
    let fleetsync_wall = rows[0].med(|s| s.wall);
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| tool | wall | × fleetsync | client CPU | client CPU / healthy host | peak memory | machine CPU | machine CPU / healthy host | sshd-side CPU | healthy OK | faulty classified right |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let (healthy, faulty) = row.classified(kinds);
        let misread = row.misread(kinds);
        let _ = writeln!(
            table,
            "| {} | {:.2} s | {:.2} | {:.2} s | {:.2} ms | {:.0} MiB | {:.2} s | {:.2} ms | {:.2} s | {healthy}/{HEALTHY} | {faulty}/{}{} |",
            row.tool,
            row.med(|s| s.wall),
            row.med(|s| s.wall) / fleetsync_wall,
            row.med(|s| s.client_cpu),
            row.med(|s| s.client_cpu) * 1000.0 / HEALTHY as f64,
            row.med(|s| s.peak_mib),
            row.med(|s| s.machine_cpu),
            row.med(|s| s.machine_cpu) * 1000.0 / HEALTHY as f64,
            row.med(|s| s.sshd_cpu),
            REFUSED + FROZEN + NO_ROUTE,
            if misread.is_empty() {
                String::new()
            } else {
                format!(" ({misread})")
            },
        );
    }
    table
}
