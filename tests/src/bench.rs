//! What the benchmarks (`tests/benches/`) share: repeat counts, medians, a process's CPU and
//! peak memory from `/proc`, the machine's description that heads each table, and a listener
//! that accepts and never answers (silent hosts).

/// Repeats of each measurement (`BENCH_RUNS`, default 3).
pub fn runs() -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
}

/// The median (upper median for an even count).
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    try_cpu_seconds(pid).expect("read /proc stat")
}

fn try_cpu_seconds(pid: u32) -> Option<f64> {
    stat_ticks(pid, 11..13)
}

/// The sum of the `/proc/PID/stat` fields `range` (counted after the command name), in seconds.
fn stat_ticks(pid: u32, range: std::ops::Range<usize>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let mut ticks = 0.0;
    for field in range {
        ticks += fields.get(field)?.parse::<f64>().ok()?;
    }
    Some(ticks / 100.0)
}

/// CPU seconds (user + system) the machine's database server has used so far: every live
/// process named `postgres` (the postmaster and its backends) or `mariadbd`/`mysqld`, with the
/// time of the children each has reaped (a PostgreSQL backend or autovacuum worker that exited
/// is counted by the postmaster). SQLite runs inside the agent: 0.
pub fn database_cpu_seconds(backend: fleetsync_common::Backend) -> f64 {
    let names: &[&str] = match backend {
        fleetsync_common::Backend::Postgres => &["postgres"],
        fleetsync_common::Backend::MySql => &["mariadbd", "mysqld"],
        fleetsync_common::Backend::Sqlite => return 0.0,
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| names.contains(&comm.trim()))
        })
        // A process may exit between the listing and the read.
        .filter_map(|pid| stat_ticks(pid, 11..15))
        .sum()
}

/// Peak resident set size of a process, in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .expect("VmHWM")
        / 1024.0
}

/// Cores, CPU model, memory and the database servers' versions.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let version = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    format!(
        "{cores} cores ({cpu}), {mem:.0} GiB RAM; {}; {}; SQLite bundled with sqlx; release build",
        version("psql", &["--version"]),
        version("mariadb", &["--version"]),
    )
}

/// Accepts every connection on the wildcard address and never answers: each connection is
/// held until the client closes it.
pub async fn silent_listener() -> (u16, tokio::task::JoinHandle<()>) {
    // A deep accept queue: hundreds of connects arrive at once, and a full queue drops SYNs,
    // which the client sends again only a second later.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("0.0.0.0:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(4096).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 1024];
                while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    (port, task)
}
