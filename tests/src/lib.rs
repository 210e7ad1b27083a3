//! The namespace lab: two gateways, a LAN client and a WAN server in network namespaces that
//! carry a per-run suffix, built with iproute2 and always removed again (on drop, on panic,
//! on Ctrl-C/SIGTERM). Used by the integration tests and by `cargo xtask lab|demo|bench`.
//!
//! ```text
//!   client 198.18.1.100 ── br-lan ──┬── lan gw1 198.18.1.2   wan ──┬── br-wan ── server 198.18.2.100
//!                      (VIP .1.1)   └── lan gw2 198.18.1.3   wan ──┘  (VIP 198.18.2.1)
//!                                gw1 sync 198.18.3.1 ── br-sync ── gw2 sync 198.18.3.2
//! ```

pub mod baselines;
pub mod bench;
pub mod cluster;
pub mod demo;
pub mod dhcp;
pub mod dhcpbench;
pub mod fwdbench;
pub mod impair;
pub mod inspect;
pub mod ping;
pub mod probe;
pub mod samework;
pub mod soak;
pub mod streams;
pub mod syncbench;
pub mod syns;

use anyhow::{Context, Result, bail};
use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Mutex, Once, atomic::AtomicU32},
    time::{Duration, Instant},
};

/// The hosts of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Switch,
    Gw1,
    Gw2,
    Client,
    Server,
}

impl Host {
    /// Every host of the lab, one namespace each.
    pub const ALL: [Host; 5] = [
        Host::Switch,
        Host::Gw1,
        Host::Gw2,
        Host::Client,
        Host::Server,
    ];

    fn tag(self) -> &'static str {
        match self {
            Host::Switch => "sw",
            Host::Gw1 => "gw1",
            Host::Gw2 => "gw2",
            Host::Client => "cl",
            Host::Server => "sv",
        }
    }

    /// The gateway's last address octet on LAN and WAN.
    fn gw_octet(self) -> u8 {
        match self {
            Host::Gw2 => 3,
            _ => 2,
        }
    }
}

pub const LAN_VIP: &str = "198.18.1.1";
/// The sync service's port on the lab's sync link.
pub const SYNC_PORT: u16 = 8370;
/// The lab's shared sync secret.
pub const SYNC_SECRET: &str = "lab sync secret, same on both";
pub const WAN_VIP: &str = "198.18.2.1";
pub const CLIENT_IP: &str = "198.18.1.100";
pub const SERVER_IP: &str = "198.18.2.100";

/// What a lab owns, so a signal handler can tear it down too.
#[derive(Debug, Default, Clone)]
struct Owned {
    namespaces: Vec<String>,
    pids: Vec<u32>,
    pin_dirs: Vec<PathBuf>,
    dir: Option<PathBuf>,
}

static LIVE: Mutex<Vec<(String, Owned)>> = Mutex::new(Vec::new());
static SIGNALS: Once = Once::new();

fn register(id: &str, update: impl FnOnce(&mut Owned)) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, owned)) = live.iter_mut().find(|(i, _)| i == id) {
        update(owned);
    } else {
        let mut owned = Owned::default();
        update(&mut owned);
        live.push((id.to_owned(), owned));
    }
}

fn teardown(owned: &Owned) {
    for &pid in &owned.pids {
        end_process(pid, Duration::from_secs(3));
    }
    // What our processes started and left running (a carp killed before it stopped its
    // Kea, a DHCP client that went to the background), by the PID files in the lab's
    // directory.
    if let Some(dir) = &owned.dir {
        dhcp::end_left_behind(dir);
    }
    for ns in &owned.namespaces {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    for dir in &owned.pin_dirs {
        let _ = fs::remove_dir_all(dir);
    }
    if let Some(dir) = &owned.dir {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Sends SIGTERM to a process we started, then SIGKILL if it has not exited in `grace`.
pub fn end_process(pid: u32, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
        return;
    }
    if !wait_pid_exit(pid.as_raw() as u32, grace) {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}

/// Waits up to `timeout` for a process we started to exit, and reaps it; false if it runs on.
pub fn wait_pid_exit(pid: u32, timeout: Duration) -> bool {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => return true,
        }
    }
    false
}

/// Tears down every live lab and exits: the Ctrl-C / SIGTERM path.
fn install_signal_handler() {
    SIGNALS.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            let live = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
            for (_, owned) in &live {
                teardown(owned);
            }
            eprintln!("interrupted: lab removed");
            std::process::exit(130);
        });
    });
}

/// Removes namespaces left by an earlier run whose process is gone (a SIGKILLed test run).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        // carp-<tag>-<pid>-<n>
        let parts: Vec<&str> = name.split('-').collect();
        if parts.len() == 4
            && parts[0] == "carp"
            && let Ok(pid) = parts[2].parse::<i32>()
        {
            let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
            let kept = std::env::temp_dir()
                .join(format!("carp-lab-{}-{}/kept", parts[2], parts[3]))
                .exists();
            if !alive && !kept {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

/// A built lab; dropping it removes everything it made.
pub struct Lab {
    pub id: String,
    pub dir: PathBuf,
}

impl Lab {
    /// Builds the whole topology. Needs root.
    pub fn up() -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the namespace lab needs root (CI runs as root; use `sudo cargo xtask test`)");
        }
        install_signal_handler();
        sweep_stale();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("carp-lab-{id}"));
        fs::create_dir_all(&dir)?;
        register(&id, |o| o.dir = Some(dir.clone()));
        let lab = Self { id, dir };
        lab.build().context("building the namespace lab")?;
        Ok(lab)
    }

    /// The namespace name of `host` in this lab.
    pub fn ns(&self, host: Host) -> String {
        format!("carp-{}-{}", host.tag(), self.id)
    }

    fn build(&self) -> Result<()> {
        for host in Host::ALL {
            let ns = self.ns(host);
            ip(&["netns", "add", &ns])?;
            register(&self.id, |o| o.namespaces.push(ns.clone()));
            self.sh(host, "ip link set lo up; sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")?;
        }
        self.sh(
            Host::Switch,
            "ip link add br-lan type bridge && ip link add br-wan type bridge \
             && ip link add br-sync type bridge \
             && ip link set br-lan up && ip link set br-wan up && ip link set br-sync up",
        )?;
        for gw in [Host::Gw1, Host::Gw2] {
            let o = gw.gw_octet();
            let t = gw.tag();
            for (side, net) in [("lan", 1), ("wan", 2)] {
                self.veth(gw, side, &format!("{t}-{side}"), &format!("br-{side}"))?;
                self.sh(gw, &format!("ip addr add 198.18.{net}.{o}/24 dev {side}"))?;
            }
            self.sh(gw, "sysctl -qw net.ipv4.ip_forward=1")?;
            // The sync link runs through the switch, where it can be impaired.
            self.veth(gw, "sync", &format!("{t}-sync"), "br-sync")?;
            let (me, _) = sync_addresses(gw);
            self.sh(gw, &format!("ip addr add {me}/24 dev sync"))?;
        }
        self.veth(Host::Client, "eth0", "cl", "br-lan")?;
        self.sh(
            Host::Client,
            &format!("ip addr add {CLIENT_IP}/24 dev eth0 && ip route add default via {LAN_VIP}"),
        )?;
        self.veth(Host::Server, "eth0", "sv", "br-wan")?;
        self.sh(
            Host::Server,
            &format!("ip addr add {SERVER_IP}/24 dev eth0 && ip route add default via {WAN_VIP}"),
        )?;
        Ok(())
    }

    /// pfSense's outbound NAT on both gateways: LAN traffic leaving by the WAN takes the WAN
    /// VIP as its source, so connections depend on the NAT state the gateways keep.
    pub fn enable_nat(&self) -> Result<()> {
        for gw in [Host::Gw1, Host::Gw2] {
            self.sh(
                gw,
                &format!(
                    "nft -f - <<'NFT'\n\
                     table ip carp_lab_nat {{\n\
                       chain post {{ type nat hook postrouting priority srcnat; \
                         oifname \"wan\" ip saddr 198.18.1.0/24 snat to {WAN_VIP}; }}\n\
                     }}\n\
                     NFT"
                ),
            )?;
        }
        Ok(())
    }

    /// Impairs the sync link (loss, delay, reordering) until [`Lab::heal_sync`]: its two
    /// switch ports leave the bridge and a `carp-traffic impair` forwards between them.
    pub fn impair_sync(&self, impairment: &impair::Impairment) -> Result<u32> {
        let (a, b) = ("gw1-sync", "gw2-sync");
        // veth leaves TCP checksums to be filled in later, which a frame copied through a
        // packet socket never gets: the gateways compute them while impaired.
        for gw in [Host::Gw1, Host::Gw2] {
            self.sh(gw, "ethtool -K sync tx off >/dev/null")?;
        }
        self.sh(
            Host::Switch,
            &format!("ip link set {a} nomaster && ip link set {b} nomaster"),
        )?;
        let bin = traffic_bin()?.to_string_lossy().into_owned();
        let mut args = vec![bin];
        args.extend(impairment.args(a, b));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.dir.join(format!("impair-{}.log", unix_us()));
        self.spawn(Host::Switch, &args, &log)
    }

    /// Ends an impairment: the forwarder `pid` stops and the ports rejoin the bridge.
    pub fn heal_sync(&self, pid: u32) -> Result<()> {
        end_process(pid, Duration::from_secs(2));
        self.sh(
            Host::Switch,
            "ip link set gw1-sync master br-sync && ip link set gw2-sync master br-sync",
        )?;
        for gw in [Host::Gw1, Host::Gw2] {
            self.sh(gw, "ethtool -K sync tx on >/dev/null")?;
        }
        Ok(())
    }

    /// A veth from `host` (named `inner`) to a port `port` of the switch's `bridge`.
    fn veth(&self, host: Host, inner: &str, port: &str, bridge: &str) -> Result<()> {
        ip(&[
            "link",
            "add",
            inner,
            "netns",
            &self.ns(host),
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            &self.ns(Host::Switch),
        ])?;
        self.sh(
            Host::Switch,
            &format!("ip link set {port} master {bridge} && ip link set {port} up"),
        )?;
        self.sh(host, &format!("ip link set {inner} up"))?;
        Ok(())
    }

    /// The command prefix that runs in `host`'s network namespace (mounts stay the host's,
    /// so bpffs pins land in /sys/fs/bpf/carp/<node>/ for bpftool to see).
    pub fn in_ns(&self, host: Host) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--net=/run/netns/{}", self.ns(host)),
            "--".into(),
        ]
    }

    /// Runs a shell command in `host`; fails with its stderr when it fails.
    pub fn sh(&self, host: Host, script: &str) -> Result<String> {
        let out = self.command(host, &["sh", "-c", script]).output()?;
        check(&out, script)
    }

    /// Runs `args` in `host` and returns its output whatever the exit status.
    pub fn output(&self, host: Host, args: &[&str]) -> Result<Output> {
        Ok(self.command(host, args).output()?)
    }

    /// A `Command` for `args` in `host`.
    pub fn command(&self, host: Host, args: &[&str]) -> Command {
        let prefix = self.in_ns(host);
        let mut cmd = Command::new(&prefix[0]);
        cmd.args(&prefix[1..]).args(args);
        cmd
    }

    /// Starts `args` in `host` in the background, output to `log`; the lab ends it.
    pub fn spawn(&self, host: Host, args: &[&str], log: &Path) -> Result<u32> {
        self.spawn_with_env(host, args, &[], log)
    }

    /// [`Lab::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        &self,
        host: Host,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<u32> {
        // Appended: a daemon started again keeps its earlier runs' lines (the soak reads
        // every run's log for panics).
        let log_file = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = self
            .command(host, args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {args:?}"))?;
        let pid = child.id();
        register(&self.id, |o| o.pids.push(pid));
        let mut pids = fs::read_to_string(self.dir.join("pids")).unwrap_or_default();
        writeln!(pids, "{pid}")?;
        fs::write(self.dir.join("pids"), pids)?;
        // The child is reaped by end_process/kill_hard; the handle is not needed.
        std::mem::forget(child);
        Ok(pid)
    }

    /// The MAC of `host`'s interface `iface`, as `aa:bb:cc:dd:ee:ff`.
    pub fn mac(&self, host: Host, iface: &str) -> Result<String> {
        self.sh(host, &format!("ip -br link show {iface}"))?
            .split_whitespace()
            .nth(2)
            .map(str::to_owned)
            .with_context(|| format!("{iface} on {host:?} has no MAC"))
    }

    /// Remembers a pin directory to remove at teardown.
    pub fn own_pin_dir(&self, dir: PathBuf) {
        register(&self.id, |o| o.pin_dirs.push(dir));
    }
}

impl Lab {
    /// Keeps the lab after this process exits (`lab up`): nothing is torn down on drop, and
    /// `Lab::remove` with the same id takes it down later.
    pub fn keep(self) -> String {
        let id = self.id.clone();
        let _ = fs::write(self.dir.join("kept"), b"");
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _)| *i != id);
        std::mem::forget(self);
        id
    }

    /// Removes a kept lab by id: its namespaces (which ends what runs only there), pins and
    /// files. Processes are ended by the pids recorded in its directory.
    pub fn remove(id: &str) -> Result<()> {
        let dir = std::env::temp_dir().join(format!("carp-lab-{id}"));
        let pids: Vec<u32> = fs::read_to_string(dir.join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        let owned = Owned {
            namespaces: Host::ALL
                .iter()
                .map(|h| format!("carp-{}-{id}", h.tag()))
                .collect(),
            pids,
            pin_dirs: fs::read_dir("/sys/fs/bpf/carp")
                .map(|d| {
                    d.filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| p.to_string_lossy().ends_with(id))
                        .collect()
                })
                .unwrap_or_default(),
            dir: Some(dir),
        };
        teardown(&owned);
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = live.iter().position(|(id, _)| *id == self.id) {
            let (_, owned) = live.remove(pos);
            drop(live);
            teardown(&owned);
        }
    }
}

/// Waits until a process we started has exited (reaping it), at most `timeout`.
pub fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    poll_until(timeout, || {
        match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => None,
            _ => Some(()),
        }
    })
    .is_some()
}

/// SIGKILLs a process we started (a crash, for failover tests) and reaps it.
pub fn kill_hard(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(pid, None);
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output()?;
    check(&out, &format!("ip {}", args.join(" ")))
}

fn check(out: &Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Microseconds since the Unix epoch: the clock probe reports and bench kills share.
pub fn unix_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes. A wait that needed more
/// than half its budget says so (with where it was called from): on a slower machine that is
/// the wait to look at first.
#[track_caller]
pub fn wait_for<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    let started = Instant::now();
    let found = poll_until(timeout, f);
    let took = started.elapsed();
    if found.is_some() && took > timeout / 2 {
        let at = std::panic::Location::caller();
        eprintln!("slow wait: {took:.1?} of {timeout:?} at {at}");
    }
    found
}

/// [`wait_for`] without the report, for waits whose length is expected (a process running
/// for a set time).
fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Options of one gateway's carp configuration.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub advbase: u8,
    pub advskew: u8,
    pub preempt: bool,
    pub passphrase: String,
    pub mac: &'static str,
    pub peer: Option<String>,
    /// (interface, vhid, address/prefix)
    pub vips: Vec<(&'static str, u8, String)>,
    /// State sync over the lab's sync link, with this shared secret.
    pub sync_key: Option<String>,
    /// The daemon accepts fault injection on its control socket (`CARP_TEST_HOOKS=1`).
    pub test_hooks: bool,
    /// carp's managed NAT: the LAN translated to the WAN VIP (`[[nat]]`).
    pub nat: bool,
    /// Configuration sync of the carp and nat areas: pushed to the peer, or taken from it
    /// (then this node's own `[carp]`, `[[vip]]` and `[[nat]]` are left out).
    pub config_sync: ConfigSyncPart,
    /// A pushing node's nftables area: ruleset files.
    pub nftables: Vec<PathBuf>,
    /// A pushing node's files area: (path, mode).
    pub files: Vec<(PathBuf, &'static str)>,
    /// An accepting node's own commands after a synced file changed: (path, argv).
    pub reload_after: Vec<(PathBuf, Vec<String>)>,
    /// DHCP on the LAN ([[dhcp]], pool [`dhcp::POOL`]), served by Kea as a pair over sync.
    pub dhcp: bool,
    /// Another pool for that [[dhcp]].
    pub dhcp_pool: Option<&'static str>,
    /// More TOML at the end of the file (`[[notify]]`, `[metrics]`).
    pub extra: String,
    /// `[node] xdp_mode`: auto (generic on the lab's veths), native or generic.
    pub xdp_mode: &'static str,
}

/// A lab node's part in configuration sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConfigSyncPart {
    #[default]
    None,
    Push,
    Accept,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            advbase: 1,
            advskew: 0,
            preempt: true,
            passphrase: "labsecret".into(),
            mac: "virtual",
            peer: None,
            vips: vec![
                ("lan", 1, format!("{LAN_VIP}/24")),
                ("wan", 2, format!("{WAN_VIP}/24")),
            ],
            sync_key: None,
            test_hooks: false,
            nat: false,
            config_sync: ConfigSyncPart::None,
            nftables: Vec::new(),
            files: Vec::new(),
            reload_after: Vec::new(),
            dhcp: false,
            dhcp_pool: None,
            extra: String::new(),
            xdp_mode: "auto",
        }
    }
}

/// A carp daemon started in the lab.
#[derive(Debug, Clone)]
pub struct Node {
    pub host: Host,
    pub name: String,
    pub pid: u32,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// Started with `CARP_TEST_HOOKS=1` (and restarted so).
    pub test_hooks: bool,
}

impl Lab {
    /// Writes `host`'s config; returns its path. The node name carries the lab id so pins
    /// never collide.
    pub fn write_config(&self, host: Host, opts: &NodeOptions) -> Result<(String, PathBuf)> {
        let name = format!("{}-{}", host.tag(), self.id);
        let mut text = format!(
            "[node]\nname = \"{name}\"\ncontrol_socket = \"{dir}/{name}.sock\"\nstate_dir = \"{dir}/{name}-state\"\nxdp_mode = \"{mode}\"\n",
            dir = self.dir.display(),
            mode = opts.xdp_mode,
        );
        match opts.config_sync {
            ConfigSyncPart::None => {}
            ConfigSyncPart::Push => {
                let mut areas = vec!["\"carp\"", "\"nat\""];
                let rulesets: Vec<String> = opts
                    .nftables
                    .iter()
                    .map(|f| format!("\"{}\"", f.display()))
                    .collect();
                let files: Vec<String> = opts
                    .files
                    .iter()
                    .map(|(f, mode)| format!("{{ path = \"{}\", mode = \"{mode}\" }}", f.display()))
                    .collect();
                if !rulesets.is_empty() {
                    areas.push("\"nftables\"");
                }
                if !files.is_empty() {
                    areas.push("\"files\"");
                }
                if opts.dhcp {
                    areas.push("\"dhcp\"");
                }
                write!(
                    text,
                    "\n[config_sync]\npush = [{}]\nnftables = [{}]\nfiles = [{}]\n",
                    areas.join(", "),
                    rulesets.join(", "),
                    files.join(", ")
                )?;
            }
            ConfigSyncPart::Accept => {
                text.push_str(
                    "\n[config_sync]\naccept = [\"carp\", \"nat\", \"nftables\", \"files\", \"dhcp\"]\n",
                );
                if !opts.reload_after.is_empty() {
                    let commands: Vec<String> = opts
                        .reload_after
                        .iter()
                        .map(|(path, argv)| format!("\"{}\" = {argv:?}", path.display()))
                        .collect();
                    writeln!(text, "reload_after = {{ {} }}", commands.join(", "))?;
                }
            }
        }
        let own_areas = opts.config_sync != ConfigSyncPart::Accept;
        if own_areas {
            write!(
                text,
                "\n[carp]\nadvbase = {}\nadvskew = {}\npreempt = {}\npassphrase = \"{}\"\nmac = \"{}\"\n",
                opts.advbase, opts.advskew, opts.preempt, opts.passphrase, opts.mac,
            )?;
            if let Some(peer) = &opts.peer {
                writeln!(text, "peer = \"{peer}\"")?;
            }
            for (iface, vhid, addr) in &opts.vips {
                write!(
                    text,
                    "\n[[vip]]\ninterface = \"{iface}\"\nvhid = {vhid}\naddress = \"{addr}\"\n"
                )?;
            }
        }
        if opts.dhcp && own_areas {
            write!(
                text,
                "\n[[dhcp]]\ninterface = \"lan\"\npool = \"{}\"\nlease_time = \"10m\"\n",
                opts.dhcp_pool.unwrap_or(dhcp::POOL)
            )?;
        }
        if opts.nat && own_areas {
            write!(
                text,
                "\n[[nat]]\ninterface = \"wan\"\nsource = \"198.18.1.0/24\"\nto = \"{WAN_VIP}\"\n"
            )?;
        }
        if let Some(secret) = &opts.sync_key {
            let key_file = self.dir.join(format!("{name}.key"));
            fs::write(&key_file, format!("{secret}\n"))?;
            let (me, peer) = sync_addresses(host);
            write!(
                text,
                "\n[sync]\ninterface = \"sync\"\nlisten = \"{me}:{SYNC_PORT}\"\n\
                 peer = \"{peer}:{SYNC_PORT}\"\nkey_file = \"{}\"\n",
                key_file.display()
            )?;
        }
        text.push_str(&opts.extra);
        let path = self.dir.join(format!("{name}.toml"));
        fs::write(&path, text)?;
        self.own_pin_dir(PathBuf::from(format!("/sys/fs/bpf/carp/{name}")));
        Ok((name, path))
    }

    /// Starts `carp run` in `host` with `opts` and waits until its control socket answers.
    pub fn start_carp(&self, carp_bin: &Path, host: Host, opts: &NodeOptions) -> Result<Node> {
        let (name, config) = self.write_config(host, opts)?;
        self.start_carp_with(carp_bin, host, name, config, &[], opts.test_hooks)
    }

    /// Starts `carp run` the `ip netns exec` way: with a mount namespace and /sys of its
    /// own, so the bpffs it mounts, its pins and the XDP links they hold vanish with it.
    pub fn start_carp_private_mounts(
        &self,
        carp_bin: &Path,
        host: Host,
        opts: &NodeOptions,
    ) -> Result<Node> {
        let (name, config) = self.write_config(host, opts)?;
        let ns = self.ns(host);
        let launcher = ["ip", "netns", "exec", &ns];
        self.start_carp_with(carp_bin, host, name, config, &launcher, opts.test_hooks)
    }

    /// Starts `carp run` in a mount namespace of its own where `own` is mounted over `over`:
    /// lab nodes share one filesystem, and a node that writes synced files must not write
    /// its peer's.
    pub fn start_carp_with_own_dir(
        &self,
        carp_bin: &Path,
        host: Host,
        opts: &NodeOptions,
        over: &Path,
        own: &Path,
    ) -> Result<Node> {
        let (name, config) = self.write_config(host, opts)?;
        let (over, own) = (over.to_string_lossy(), own.to_string_lossy());
        let launcher = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind \"$1\" \"$2\" && shift 2 && exec \"$@\"",
            "sh",
            &own,
            &over,
        ];
        self.start_carp_with(carp_bin, host, name, config, &launcher, opts.test_hooks)
    }

    /// Starts `node` again: `carp run` on its config, pins and state directory.
    pub fn restart_carp(&self, carp_bin: &Path, node: &Node) -> Result<Node> {
        self.start_carp_with(
            carp_bin,
            node.host,
            node.name.clone(),
            node.config.clone(),
            &[],
            node.test_hooks,
        )
    }

    /// Starts `carp run` on a written config, behind `launcher` (a command prefix) if any.
    fn start_carp_with(
        &self,
        carp_bin: &Path,
        host: Host,
        name: String,
        config: PathBuf,
        launcher: &[&str],
        test_hooks: bool,
    ) -> Result<Node> {
        let socket = self.dir.join(format!("{name}.sock"));
        let log = self.dir.join(format!("{name}.log"));
        let _ = fs::remove_file(&socket);
        let bin = carp_bin.to_string_lossy().into_owned();
        let cfg = config.to_string_lossy().into_owned();
        let mut args = launcher.to_vec();
        args.extend([bin.as_str(), "run", "-c", &cfg]);
        let env: &[(&str, &str)] = if test_hooks {
            &[("CARP_TEST_HOOKS", "1")]
        } else {
            &[]
        };
        let pid = self.spawn_with_env(host, &args, env, &log)?;
        let node = Node {
            host,
            name,
            pid,
            config,
            socket,
            log,
            test_hooks,
        };
        wait_for(Duration::from_secs(15), || node.status().ok()).with_context(|| {
            format!(
                "carp on {host:?} did not come up; its log:\n{}",
                fs::read_to_string(&node.log).unwrap_or_default()
            )
        })?;
        Ok(node)
    }
}

impl Node {
    /// The daemon's status through its control socket.
    pub fn status(&self) -> Result<carp::control::Status> {
        match carp::control::call(&self.socket, &carp::control::Request::Status)? {
            carp::control::Response {
                status: Some(s), ..
            } => Ok(s),
            other => bail!("daemon answered {other:?}"),
        }
    }

    /// The state of `vhid` as the daemon reports it.
    pub fn state(&self, vhid: u8) -> Option<carp::carp::fsm::State> {
        let status = self.status().ok()?;
        status.vips.iter().find(|v| v.vhid == vhid).map(|v| v.state)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The `carp` binary under test: $CARP_BIN, or target/<profile>/carp.
/// A gateway's address on the sync link and its peer's (gw1 198.18.3.1, gw2 198.18.3.2).
pub fn sync_addresses(host: Host) -> (Ipv4Addr, Ipv4Addr) {
    let (gw1, gw2) = (Ipv4Addr::new(198, 18, 3, 1), Ipv4Addr::new(198, 18, 3, 2));
    match host {
        Host::Gw2 => (gw2, gw1),
        _ => (gw1, gw2),
    }
}

pub fn carp_bin() -> Result<PathBuf> {
    built_binary("CARP_BIN", "carp", "cargo build -p carp-user")
}

/// The `carp-probe` lab helper: $CARP_PROBE_BIN, or target/<profile>/carp-probe.
pub fn probe_bin() -> Result<PathBuf> {
    built_binary("CARP_PROBE_BIN", "carp-probe", "cargo build -p carp-tests")
}

/// The `carp-traffic` lab helper: $CARP_TRAFFIC_BIN, or target/<profile>/carp-traffic.
pub fn traffic_bin() -> Result<PathBuf> {
    built_binary(
        "CARP_TRAFFIC_BIN",
        "carp-traffic",
        "cargo build -p carp-tests",
    )
}

/// A workspace binary: from `$env`, else next to the running executable's profile directory
/// (tests run from target/<profile>/deps/, xtask from target/<profile>/).
fn built_binary(env: &str, name: &str, build: &str) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(env) {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    let candidates = [
        dir.join(name),
        dir.parent().map(|p| p.join(name)).unwrap_or_default(),
    ];
    candidates
        .into_iter()
        .find(|c| c.is_file())
        .with_context(|| format!("`{name}` is not built: run `{build}` (`cargo xtask test` does)"))
}
