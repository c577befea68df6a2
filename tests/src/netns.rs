//! Network namespaces joined to this machine by a veth pair: hosts at real, routed addresses
//! (10.77.N.2) that a test can cut off to produce a genuine "no route to host".
//!
//! Every namespace and link is removed on drop; ones left by a test process that was killed are
//! reaped by the next `NetNs::create` (the owner's pid is in the namespace name and link alias).

use std::net::Ipv4Addr;

use crate::process::{pid_alive, run, run_quiet};

/// One namespace with a veth pair: `host_addr` on this side, `ns_addr` inside.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_link: String,
    ns_link: String,
    /// This machine's end of the pair, 10.77.N.1.
    pub host_addr: Ipv4Addr,
    /// The namespace's end of the pair, 10.77.N.2: where a host inside listens.
    pub ns_addr: Ipv4Addr,
}

const PREFIX: &str = "fleetsync-";

impl NetNs {
    /// Creates a namespace and its veth pair on a free 10.77.N.0/24. Needs root.
    pub fn create() -> Self {
        assert!(
            is_root(),
            "network namespaces need root: run the tests as root (CI does)"
        );
        reap_stale();
        let start = (crate::random_u64() % 256) as usize;
        let pid = std::process::id();
        for step in 0..256 {
            let n = (start + step) % 256;
            let host_link = format!("fs77n{n}a");
            let ns_link = format!("fs77n{n}b");
            // Link names are unique on the machine: whoever creates the pair owns subnet n.
            if !run_quiet(
                "ip",
                &[
                    "link", "add", &host_link, "type", "veth", "peer", "name", &ns_link,
                ],
            ) {
                continue;
            }
            let owner = format!("{PREFIX}{pid}");
            let netns = NetNs {
                name: format!("{PREFIX}{n}-{pid}"),
                host_link,
                ns_link,
                host_addr: Ipv4Addr::new(10, 77, n as u8, 1),
                ns_addr: Ipv4Addr::new(10, 77, n as u8, 2),
            };
            // From here on, drop cleans up whatever was made.
            run("ip", &["link", "set", &netns.host_link, "alias", &owner]);
            run("ip", &["netns", "add", &netns.name]);
            run("ip", &["link", "set", &netns.ns_link, "netns", &netns.name]);
            let host_cidr = format!("{}/24", netns.host_addr);
            run("ip", &["addr", "add", &host_cidr, "dev", &netns.host_link]);
            // Fail ARP for a cut-off host in about 0.6 s instead of 3 s: same error, faster tests.
            let neigh = format!("/proc/sys/net/ipv4/neigh/{}", netns.host_link);
            std::fs::write(format!("{neigh}/retrans_time_ms"), "200").expect("set retrans_time_ms");
            run("ip", &["link", "set", &netns.host_link, "up"]);
            netns.ip(&["addr", "add", &netns.ns_cidr(), "dev", &netns.ns_link]);
            netns.ip(&["link", "set", &netns.ns_link, "up"]);
            netns.ip(&["link", "set", "lo", "up"]);
            return netns;
        }
        panic!("no free 10.77.N.0/24 subnet: 256 fleetsync namespaces exist");
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Cuts the host off: its address disappears, so connecting to `ns_addr` fails with
    /// `EHOSTUNREACH` once ARP gives up.
    pub fn cut(&self) {
        self.ip(&["addr", "del", &self.ns_cidr(), "dev", &self.ns_link]);
        run_quiet("ip", &["neigh", "flush", "dev", &self.host_link]);
    }

    /// Undoes [`cut`](Self::cut).
    pub fn restore(&self) {
        self.ip(&["addr", "add", &self.ns_cidr(), "dev", &self.ns_link]);
        run_quiet("ip", &["neigh", "flush", "dev", &self.host_link]);
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    fn ns_cidr(&self) -> String {
        format!("{}/24", self.ns_addr)
    }

    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys the inner end, which destroys the pair.
        run_quiet("ip", &["netns", "del", &self.name]);
        run_quiet("ip", &["link", "del", &self.host_link]);
    }
}

/// Names of namespaces that exist now.
pub fn list_namespaces() -> Vec<String> {
    let output = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Names of the veth links this harness made that exist now.
pub fn list_links() -> Vec<String> {
    let output = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("run ip link show");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| name.starts_with("fs77n"))
        .collect()
}

/// Removes namespaces and links whose owning test process is gone.
fn reap_stale() {
    for name in list_namespaces() {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest
            .rsplit('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !pid_alive(pid) {
            run_quiet("ip", &["netns", "del", &name]);
        }
    }
    let output = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("run ip link show");
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
        else {
            continue;
        };
        if !name.starts_with("fs77n") {
            continue;
        }
        let owner = line
            .split("alias ")
            .nth(1)
            .and_then(|alias| alias.trim().strip_prefix(PREFIX))
            .and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_some_and(|pid| !pid_alive(pid)) {
            run_quiet("ip", &["link", "del", name]);
        }
    }
}

/// True if this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .map(|line| line.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
