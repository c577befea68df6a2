//! A fleet of real OpenSSH servers for tests: one `sshd` per host, each with its own address,
//! host key and config, all accepting one client key for a dedicated login user (shell `/bin/sh`,
//! passwordless sudo, as a managed server is set up). Faults are applied to running hosts:
//! stop (refused), freeze (accepts, never speaks), rotated host key, revoked client key, and
//! "no route to host" for hosts that live in a network namespace.
//!
//! Everything (processes, namespaces, temp dirs) is removed on drop, also when a test panics;
//! sshd processes also die with the test process (`setpriv --pdeathsig`).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, Once},
    time::Duration,
};

use fleetsync_sync_agent::ssh::{ClientKeys, HostKey, SshClient, Target, Timeouts};
use tempfile::TempDir;
use tokio::{io::AsyncReadExt, net::TcpStream};

use crate::{
    netns::{NetNs, is_root},
    process::{Cgroup, run},
};

/// The login user on every test host (shell `/bin/sh`, passwordless sudo).
pub const SSH_USER: &str = "fleetsync-test";
/// A second login user that may not use sudo: its probes fail.
pub const NO_SUDO_USER: &str = "fleetsync-nosudo";

const SSHD: &str = "/usr/sbin/sshd";

/// How a host is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On a loopback address of this machine (127.x.y.z).
    Loopback,
    /// Inside a network namespace of its own, behind a veth pair (10.77.N.2); supports
    /// [`SshHost::cut_route`].
    Namespace,
}

/// A running fleet. Hosts are started in parallel.
pub struct SshFleet {
    // Field order matters: hosts (processes, namespaces) go before their directory.
    hosts: Vec<SshHost>,
    client_key: PathBuf,
    dir: TempDir,
}

impl std::fmt::Debug for SshFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshFleet")
            .field("dir", &self.dir.path())
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl SshFleet {
    /// Starts `n` hosts on loopback.
    pub async fn start(n: usize) -> Self {
        Self::start_with(&vec![Placement::Loopback; n]).await
    }

    /// Starts one host per placement, in that order.
    pub async fn start_with(placements: &[Placement]) -> Self {
        prepare_machine();
        let dir = tempfile::Builder::new()
            .prefix("fleetsync-fleet-")
            .tempdir()
            .expect("create fleet temp dir");
        make_readable(dir.path());
        let client_key = dir.path().join("client_ed25519");
        keygen(&client_key);
        let client_pub = fs::read_to_string(client_key.with_extension("pub")).expect("read pub");

        let mut hosts = Vec::with_capacity(placements.len());
        for (index, placement) in placements.iter().enumerate() {
            hosts.push(SshHost::prepare(dir.path(), index, *placement, &client_pub));
        }
        let fleet = Self {
            hosts,
            client_key,
            dir,
        };
        // Spawn every sshd first, then wait for each: the hosts start in parallel.
        for host in &fleet.hosts {
            host.spawn();
        }
        for host in &fleet.hosts {
            host.wait_for_banner().await;
        }
        fleet
    }

    /// The hosts, in the order they were asked for.
    pub fn hosts(&self) -> &[SshHost] {
        &self.hosts
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &SshHost {
        &self.hosts[i]
    }

    /// The private key every host accepts (for the agent's `--ssh-key`).
    pub fn client_key(&self) -> &Path {
        &self.client_key
    }

    /// The fleet's directory (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An SSH client with the fleet's key and the given timeouts.
    pub fn client(&self, timeouts: Timeouts, output_cap: usize) -> SshClient {
        let keys = ClientKeys::load(&[&self.client_key]).expect("load fleet client key");
        SshClient::new(timeouts, output_cap, keys)
    }
}

/// One sshd host of a fleet.
pub struct SshHost {
    name: String,
    dir: PathBuf,
    config: PathBuf,
    host_key: PathBuf,
    authorized_keys: PathBuf,
    client_pub: String,
    addr: IpAddr,
    port: u16,
    child: Mutex<Option<Child>>,
    // sshd and everything it forks; dropped (killed) before the namespace goes.
    cgroup: Option<Cgroup>,
    // Dropped after the child (fields drop in order): the process must go first.
    netns: Option<NetNs>,
}

impl std::fmt::Debug for SshHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshHost")
            .field("name", &self.name)
            .field("addr", &self.socket_addr())
            .field("pid", &self.pid())
            .finish()
    }
}

impl SshHost {
    fn prepare(fleet_dir: &Path, index: usize, placement: Placement, client_pub: &str) -> Self {
        let name = format!("host-{index}");
        let dir = fleet_dir.join(&name);
        fs::create_dir(&dir).expect("create host dir");
        make_readable(&dir);
        let (addr, port, netns) = match placement {
            Placement::Loopback => {
                let r = crate::random_u64();
                let addr = Ipv4Addr::new(
                    127,
                    100 + (r % 100) as u8,
                    (r >> 8) as u8,
                    2 + (r >> 16) as u8 % 250,
                );
                let port = 20_000 + ((r >> 24) % 40_000) as u16;
                (IpAddr::V4(addr), port, None)
            }
            Placement::Namespace => {
                let netns = NetNs::create();
                (IpAddr::V4(netns.ns_addr), 22, Some(netns))
            }
        };
        let host = Self {
            config: dir.join("sshd_config"),
            host_key: dir.join("host_ed25519"),
            authorized_keys: dir.join("authorized_keys"),
            client_pub: client_pub.to_owned(),
            name,
            dir,
            addr,
            port,
            child: Mutex::new(None),
            cgroup: Cgroup::create(),
            netns,
        };
        keygen(&host.host_key);
        fs::create_dir(host.dir.join("bin")).expect("create host bin dir");
        // Sticky and writable by all, like /tmp: a fake program run by the login user may keep
        // files there; the programs the test installs stay the test's.
        fs::set_permissions(host.dir.join("bin"), fs::Permissions::from_mode(0o1777))
            .expect("chmod host bin dir");
        host.authorize_client_key();
        host.write_config();
        host
    }

    fn write_config(&self) {
        let config = format!(
            "ListenAddress {listen}\n\
             HostKey {key}\n\
             PidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {auth}\n\
             AllowUsers {SSH_USER} {NO_SUDO_USER}\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             MaxStartups 200:30:400\n\
             MaxSessions 64\n\
             SetEnv PATH={dir}/bin:/usr/local/bin:/usr/bin:/bin\n\
             LogLevel ERROR\n",
            listen = self.socket_addr(),
            key = self.host_key.display(),
            dir = self.dir.display(),
            auth = self.authorized_keys.display(),
        );
        fs::write(&self.config, config).expect("write sshd_config");
    }

    /// The host's name in the fleet (`host-0`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network namespace the host lives in ([`Placement::Namespace`]).
    pub fn netns(&self) -> Option<&NetNs> {
        self.netns.as_ref()
    }

    /// The address sshd listens on.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The port sshd listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Address and port.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }

    /// A connection target for the fleet's login user.
    pub fn target<'a>(&'a self, ip: &'a str, pinned: Option<&'a HostKey>) -> Target<'a> {
        Target {
            host: ip,
            port: self.port,
            user: SSH_USER,
            pinned,
        }
    }

    /// The sshd process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .expect("child lock")
            .as_ref()
            .map(Child::id)
    }

    /// The host's public key as OpenSSH writes it (`ssh-ed25519 AAAA... comment`).
    pub fn host_public_key(&self) -> String {
        fs::read_to_string(self.host_key.with_extension("pub"))
            .expect("read the host's public key")
            .trim()
            .to_owned()
    }

    /// The host key sshd presents now.
    pub fn host_key(&self) -> HostKey {
        let public = russh::keys::PublicKey::read_openssh_file(self.host_key.with_extension("pub"))
            .expect("read host public key");
        HostKey::of(&public)
    }

    /// Starts sshd (again) and waits until it sends its banner.
    pub async fn start(&self) {
        self.spawn();
        self.wait_for_banner().await;
    }

    fn spawn(&self) {
        {
            let mut child = self.child.lock().expect("child lock");
            assert!(child.is_none(), "{} is already running", self.name);
            // Join the cgroup first (so that every session sshd forks is tracked; inside a
            // namespace /sys is another one), then enter the namespace if any, then become sshd,
            // which dies with this process.
            let procs = self
                .cgroup
                .as_ref()
                .map_or_else(|| "/dev/null".into(), Cgroup::procs_file);
            let mut command = Command::new("sh");
            command
                .args(["-c", r#"echo $$ > "$0" && exec "$@""#])
                .arg(procs);
            if let Some(netns) = &self.netns {
                command.args(netns.exec_prefix());
            }
            command
                .args(["setpriv", "--pdeathsig", "KILL", SSHD, "-D", "-f"])
                .arg(&self.config)
                .arg("-E")
                .arg(self.dir.join("sshd.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(self.dir.join("start.log")).expect("create start.log"));
            *child = Some(command.spawn().expect("spawn sshd"));
        }
    }

    async fn wait_for_banner(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.try_wait() {
                let log = fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default();
                let start = fs::read_to_string(self.dir.join("start.log")).unwrap_or_default();
                panic!("sshd for {} exited with {status}: {start}{log}", self.name);
            }
            if let Ok(Ok(mut stream)) = tokio::time::timeout(
                Duration::from_millis(500),
                TcpStream::connect(self.socket_addr()),
            )
            .await
            {
                let mut buf = [0_u8; 4];
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut buf)).await
                    && &buf == b"SSH-"
                {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "sshd for {} did not answer within 10s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn try_wait(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().expect("child lock");
        child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Stops sshd: connections are refused until [`start`](Self::start).
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().expect("child lock").take() {
            // Wake it first in case it is frozen, so that it can die.
            let _ = signal(child.id(), "CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills sshd and every process it started (sessions, commands still running).
    fn kill_all(&self) {
        self.stop();
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill_all();
        }
    }

    /// Freezes sshd (SIGSTOP): the kernel still accepts connections, but no banner comes.
    pub fn freeze(&self) {
        let pid = self.pid().expect("host is running");
        assert!(signal(pid, "STOP"), "SIGSTOP {pid}");
    }

    /// Thaws a frozen sshd (SIGCONT).
    pub fn thaw(&self) {
        let pid = self.pid().expect("host is running");
        assert!(signal(pid, "CONT"), "SIGCONT {pid}");
    }

    /// Gives the host a new host key and restarts sshd with it.
    pub async fn rotate_host_key(&self) {
        self.stop();
        fs::remove_file(&self.host_key).expect("remove old host key");
        fs::remove_file(self.host_key.with_extension("pub")).expect("remove old host pub key");
        keygen(&self.host_key);
        self.start().await;
    }

    /// Makes public-key authentication hang: sshd asks an `AuthorizedKeysCommand` that never
    /// answers (the key exchange still completes), then restarts sshd with it.
    pub async fn stall_auth(&self) {
        // sshd runs the command only from a path no one but root can write to, every
        // directory up to `/` included (so not under /tmp): one shared script, made once.
        let dir = Path::new("/usr/local/lib/fleetsync-tests");
        fs::create_dir_all(dir).expect("create /usr/local/lib/fleetsync-tests");
        let command = dir.join("authorized-keys-stall");
        fs::write(&command, "#!/bin/sh\nexec sleep 3600\n").expect("write the stalling command");
        fs::set_permissions(&command, fs::Permissions::from_mode(0o755))
            .expect("chmod the stalling command");
        let mut config = fs::read_to_string(&self.config).expect("read sshd_config");
        config.push_str(&format!(
            "AuthorizedKeysCommand {}\nAuthorizedKeysCommandUser root\n",
            command.display()
        ));
        fs::write(&self.config, config).expect("write sshd_config");
        // sshd asks the command only for keys its authorized_keys file does not have.
        self.revoke_client_key();
        self.stop();
        self.start().await;
    }

    /// Removes the client key from `authorized_keys`: logins fail from now on.
    pub fn revoke_client_key(&self) {
        fs::write(&self.authorized_keys, "").expect("truncate authorized_keys");
    }

    /// Puts the client key (back) into `authorized_keys`.
    pub fn authorize_client_key(&self) {
        fs::write(&self.authorized_keys, &self.client_pub).expect("write authorized_keys");
        fs::set_permissions(&self.authorized_keys, fs::Permissions::from_mode(0o644))
            .expect("chmod authorized_keys");
    }

    /// Puts a program named `name` first on the PATH of this host's sessions: a fake `sudo`,
    /// say, that makes the host hang, print garbage or fail, as a hostile server would.
    pub fn install_program(&self, name: &str, script: &str) {
        let path = self.dir.join("bin").join(name);
        fs::write(&path, script).expect("write program");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod program");
    }

    /// The directory of the programs put first on the PATH, writable by the login users (a
    /// fake program may keep files there: a log of the sessions it saw, say).
    pub fn program_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// Removes a program put there by [`install_program`](Self::install_program).
    pub fn remove_program(&self, name: &str) {
        let _ = fs::remove_file(self.dir.join("bin").join(name));
    }

    /// Cuts the host's network: connecting fails with "no route to host". Only for hosts
    /// placed in a namespace.
    pub fn cut_route(&self) {
        self.netns
            .as_ref()
            .expect("cut_route needs a host placed in a namespace")
            .cut();
    }

    /// Restores the network after [`cut_route`](Self::cut_route).
    pub fn restore_route(&self) {
        self.netns
            .as_ref()
            .expect("restore_route needs a host placed in a namespace")
            .restore();
    }

    /// The namespace the host lives in, if any.
    pub fn netns_name(&self) -> Option<&str> {
        self.netns.as_ref().map(NetNs::name)
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn signal(pid: u32, name: &str) -> bool {
    Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn keygen(path: &Path) {
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "fleetsync-test",
            "-f",
            path.to_str().expect("utf-8 path"),
        ],
    );
}

/// A key pair made by `ssh-keygen` for a test: the private key's path, the public key's line
/// (as in `id_ed25519.pub` or a host's `ssh_host_ed25519_key.pub`), and its fingerprint as
/// `ssh-keygen -l` prints it (`SHA256:...`).
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    /// The private key file.
    pub path: PathBuf,
    /// The public key's line, without its newline.
    pub public: String,
    /// `SHA256:...`.
    pub fingerprint: String,
}

/// The key an agent of a test logs in with when the test gives none: `dir/agent_ed25519`,
/// made on first use (an agent refuses to start without a key).
pub fn agent_key(dir: &Path) -> PathBuf {
    let path = dir.join("agent_ed25519");
    if !path.exists() {
        keygen(&path);
    }
    path
}

/// A fresh ed25519 key pair at `dir/name` (and `name.pub`).
pub fn generate_key(dir: &Path, name: &str) -> GeneratedKey {
    let path = dir.join(name);
    keygen(&path);
    let public_path = path.with_extension("pub");
    let public = fs::read_to_string(&public_path)
        .expect("the public key")
        .trim()
        .to_owned();
    let listed = run(
        "ssh-keygen",
        &["-lf", public_path.to_str().expect("utf-8 path")],
    );
    let fingerprint = String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .nth(1)
        .expect("a fingerprint")
        .to_owned();
    GeneratedKey {
        path,
        public,
        fingerprint,
    }
}

fn make_readable(dir: &Path) {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod dir");
}

/// One-time machine preparation: the login user with `/bin/sh` and passwordless sudo, and the
/// privilege-separation directory sshd needs. Idempotent, also across processes.
fn prepare_machine() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: run `just setup` (installs openssh-server)"
        );
        assert!(
            is_root(),
            "the sshd fleet needs root (to run sshd and add the login user)"
        );
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let exists = |user: &str| {
            Command::new("id")
                .arg(user)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        for user in [SSH_USER, NO_SUDO_USER] {
            if !exists(user) {
                let created = Command::new("useradd")
                    .args(["--system", "--create-home", "--shell", "/bin/sh", user])
                    .status()
                    .is_ok_and(|s| s.success());
                // Another test process may have created it at the same moment.
                assert!(created || exists(user), "cannot create user {user}");
            }
            // `useradd` leaves the password field at `!`, which sshd without PAM treats as locked.
            run("usermod", &["-p", "*", user]);
        }
        let sudoers = format!("/etc/sudoers.d/{SSH_USER}");
        if !Path::new(&sudoers).exists() {
            let tmp = format!("{sudoers}.{}.tmp", std::process::id());
            fs::write(&tmp, format!("{SSH_USER} ALL=(ALL) NOPASSWD: ALL\n"))
                .expect("write sudoers");
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o440)).expect("chmod sudoers");
            fs::rename(&tmp, &sudoers).expect("install sudoers");
        }
    });
}

/// A fake `sudo` that takes a lock directory for the length of the session (records an overlap
/// with the holder's connection if another session holds it), takes `seconds`, and answers like
/// a MariaDB server; a session whose answer finds no reader records itself as abandoned. It
/// outlives its connection (`PIPE` and `HUP` ignored), as a slow command on a real server may.
/// [`assert_no_overlaps`] reads what it leaves.
pub fn session_script(seconds: &str) -> String {
    format!(
        r#"#!/bin/sh
D=$(dirname "$0")
cat >/dev/null
held=
if mkdir "$D/session.lock" 2>/dev/null; then
    echo "$SSH_CLIENT" > "$D/session.lock/holder"
    held=1
    trap 'rm -rf "$D/session.lock"' EXIT
else
    echo "overlap $(cat "$D/session.lock/holder" 2>/dev/null)" >> "$D/overlaps"
fi
trap '' PIPE HUP
echo "start $(date +%s.%N) $SSH_CLIENT" >> "$D/sessions"
sleep {seconds}
printf '%s\n' '{{"version": "10.11", "databases": [{{"name": "app", "charset": "utf8mb4", "collation": "utf8mb4_bin"}}]}}' \
    || echo "abandoned $SSH_CLIENT" >> "$D/abandoned"
# The work is done once the answer is out: the lock goes now, not when the shell exits.
if [ -n "$held" ]; then
    trap - EXIT
    rm -rf "$D/session.lock"
fi
echo "end $(date +%s.%N) $SSH_CLIENT" >> "$D/sessions"
"#
    )
}

/// Panics if one of the first `hosts` hosts (those running [`session_script`]) saw two sessions
/// at work at once, or logged no session at all.
pub fn assert_no_overlaps(fleet: &SshFleet, hosts: usize, phase: &str) {
    let overlapped = overlaps(fleet, hosts);
    assert!(
        overlapped.is_empty(),
        "{phase}: {} host(s) saw two sessions at once, the first: {:?}",
        overlapped.len(),
        overlapped.first()
    );
}

/// Hosts that saw two sessions at work at once, each with its logs: an overlap counts unless
/// the session that held the host was abandoned (its agent went away). Every host must have
/// logged its sessions: a script that could not write its files would see no overlap whatever
/// happened.
fn overlaps(fleet: &SshFleet, hosts: usize) -> Vec<(usize, String)> {
    let read = |i: usize, name: &str| {
        std::fs::read_to_string(fleet.host(i).program_dir().join(name)).unwrap_or_default()
    };
    let unlogged: Vec<usize> = (0..hosts)
        .filter(|&i| read(i, "sessions").is_empty())
        .collect();
    assert!(
        unlogged.is_empty(),
        "hosts whose sessions left no log: {unlogged:?}"
    );
    (0..hosts)
        .filter(|&i| {
            let abandoned = read(i, "abandoned");
            read(i, "overlaps").lines().any(|line| {
                let holder = line.trim_start_matches("overlap").trim();
                holder.is_empty()
                    || !abandoned
                        .lines()
                        .any(|a| a.trim_start_matches("abandoned").trim() == holder)
            })
        })
        .map(|i| {
            let logs = format!(
                "overlaps:\n{}abandoned:\n{}sessions:\n{}",
                read(i, "overlaps"),
                read(i, "abandoned"),
                read(i, "sessions")
            );
            (i, logs)
        })
        .collect()
}
