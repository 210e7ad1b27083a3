//! The chaos soak (`cargo xtask soak [--minutes N]`): random faults over the lab while NATed
//! TCP streams, a UDP flow, pings and an ARP probe run through it, with the cluster's
//! invariants checked all along. Prints the faults injected, the checks made and every
//! violation with the timeline around it; fails if there was one.

use crate::{
    Host, LAN_VIP, Lab, Node, NodeOptions, SERVER_IP, SYNC_SECRET, carp_bin,
    cluster::{LAB_VHIDS, backup_opts, pair_with},
    end_process,
    impair::Impairment,
    kill_hard,
    probe::{self, ArpProbe},
    streams, unix_us,
};
use anyhow::{Context, Result, bail};
use carp::{carp::fsm::State, control};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Master-down of the backup (advskew 100) plus the second the issue allows.
const MASTER_DEADLINE: Duration = Duration::from_millis(3_391 + 1_000);
/// Flow tables must agree this long after the sync link heals.
const FLOWS_DEADLINE: Duration = Duration::from_secs(5);
/// Streams per traffic round, and how long a round runs.
const STREAMS: usize = 16;
const ROUND: Duration = Duration::from_secs(40);
/// Faults are injected in the first part of a round; the rest shows the traffic recovered.
const FAULT_WINDOW: Duration = Duration::from_secs(26);
/// The sync link's bad spell: netem's `loss 20% delay 50ms 10ms reorder 25%`, in user space
/// (this kernel has no netem).
const SYNC_IMPAIRMENT: Impairment = Impairment {
    loss_pct: 20,
    delay: Duration::from_millis(50),
    jitter: Duration::from_millis(10),
    reorder_pct: 25,
};
/// Two masters of one VIP seen this long in a row is a split brain.
const DUAL_MASTER_LIMIT: Duration = Duration::from_millis(1_500);

/// One fault, drawn at random.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill {
        node: usize,
        down: Duration,
    },
    Term {
        node: usize,
        down: Duration,
    },
    Restart {
        node: usize,
    },
    Upgrade {
        node: usize,
    },
    /// `carp reload` of a changed file: the node's skew moves by 10 and back.
    Reload {
        node: usize,
    },
    LinkFlap {
        node: usize,
        link: &'static str,
        down: Duration,
    },
    SyncImpaired {
        hold: Duration,
    },
    Maintenance {
        node: usize,
        hold: Duration,
    },
}

impl Fault {
    fn draw(rng: &mut StdRng) -> Self {
        let node = rng.random_range(0..2);
        let secs = |rng: &mut StdRng, lo: u64, hi: u64| {
            Duration::from_millis(rng.random_range(lo * 1000..hi * 1000))
        };
        match rng.random_range(0..10) {
            0 => Fault::Kill {
                node,
                down: secs(rng, 0, 6),
            },
            1 => Fault::Term {
                node,
                down: secs(rng, 0, 3),
            },
            2 => Fault::Restart { node },
            3 if rng.random_bool(0.5) => Fault::Upgrade { node },
            3 => Fault::Reload { node },
            4 | 5 => Fault::LinkFlap {
                node,
                link: ["lan", "wan", "sync"][rng.random_range(0..3)],
                down: secs(rng, 1, 6),
            },
            6 | 7 => Fault::SyncImpaired {
                hold: secs(rng, 4, 12),
            },
            _ => Fault::Maintenance {
                node,
                hold: secs(rng, 2, 7),
            },
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "SIGKILL",
            Fault::Term { .. } => "SIGTERM",
            Fault::Restart { .. } => "restart",
            Fault::Upgrade { .. } => "in-place upgrade",
            Fault::Reload { .. } => "reload",
            Fault::LinkFlap { .. } => "link flap",
            Fault::SyncImpaired { .. } => "sync loss, delay, reordering",
            Fault::Maintenance { .. } => "maintenance",
        }
    }

    /// Whether healing it needs the flow tables to agree again.
    fn touches_sync(&self) -> bool {
        !matches!(self, Fault::Maintenance { .. })
    }
}

/// What the soak saw, shared with its monitor thread.
#[derive(Default)]
struct Record {
    started: Option<Instant>,
    /// (seconds since start, what happened)
    timeline: Vec<(f64, String)>,
    violations: Vec<(f64, String)>,
}

impl Record {
    fn at(&self) -> f64 {
        self.started.map_or(0.0, |s| s.elapsed().as_secs_f64())
    }

    fn event(&mut self, what: String) {
        let t = self.at();
        eprintln!("[{t:7.2}] {what}");
        self.timeline.push((t, what));
    }

    fn violation(&mut self, what: String) {
        let t = self.at();
        eprintln!("[{t:7.2}] VIOLATION: {what}");
        self.timeline.push((t, format!("VIOLATION: {what}")));
        self.violations.push((t, what));
    }
}

struct Soak {
    lab: Lab,
    nodes: Mutex<[Node; 2]>,
    /// Each node's configuration as last written (reloads change it).
    options: Mutex<[NodeOptions; 2]>,
    record: Mutex<Record>,
    checks: AtomicU64,
    stop: AtomicBool,
}

/// Runs the soak for `minutes` with `seed` (random when `None`).
pub fn run(minutes: f64, seed: Option<u64>) -> Result<()> {
    let seed = seed.unwrap_or_else(|| unix_us() as u64);
    let mut rng = StdRng::seed_from_u64(seed);
    let total = Duration::from_secs_f64(minutes * 60.0);
    eprintln!("soak: {minutes} min, seed {seed} (`--seed {seed}` repeats the draws)");
    let lab = Lab::up()?;
    streams::start_server(&lab)?;
    let with_sync = |base: NodeOptions| NodeOptions {
        sync_key: Some(SYNC_SECRET.into()),
        nat: true,
        ..base
    };
    let options = [with_sync(NodeOptions::default()), with_sync(backup_opts())];
    let (gw1, gw2) = pair_with(&lab, &options[0], &options[1])?;
    let soak = Arc::new(Soak {
        lab,
        nodes: Mutex::new([gw1, gw2]),
        options: Mutex::new(options),
        record: Mutex::new(Record::default()),
        checks: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    soak.wait_flows_equal(Duration::from_secs(15), "start")?;
    let probe_log = soak.lab.dir.join("soak-arp.log");
    let probe_ms = (total + ROUND + Duration::from_secs(10)).as_millis() as u32;
    let probe_pid = soak
        .lab
        .arp_probe_background(&ArpProbe::from_client(LAN_VIP, 50, probe_ms), &probe_log)?;
    let ping_log = soak.lab.dir.join("soak-ping.log");
    let ping_pid = soak
        .lab
        .ping_background(Host::Client, SERVER_IP, 0.1, 1_000_000, &ping_log)?;
    let probe_started_us = unix_us();
    lock(&soak.record).started = Some(Instant::now());
    let monitor = {
        let soak = soak.clone();
        std::thread::spawn(move || soak.monitor())
    };
    let start = Instant::now();
    let mut faults: Vec<Fault> = Vec::new();
    let mut rounds = || -> Result<()> {
        while start.elapsed() < total {
            soak.round(&mut rng, &mut faults)?;
        }
        Ok(())
    };
    let ran = rounds();
    // Whatever happened, the monitor lets go of the lab, so dropping it removes everything.
    soak.stop.store(true, Ordering::Relaxed);
    let samples = monitor
        .join()
        .map_err(|_| anyhow::anyhow!("the monitor panicked"))?;
    end_process(ping_pid, Duration::from_secs(2));
    end_process(probe_pid, Duration::from_secs(2));
    ran?;
    soak.check_arp(
        &probe::parse(&std::fs::read_to_string(&probe_log)?),
        probe_started_us,
    );
    soak.check_growth(&samples);
    soak.check_logs();
    soak.report(&faults, start.elapsed(), seed)
}

impl Soak {
    /// One traffic round with faults in its first part; the streams must all survive.
    fn round(&self, rng: &mut StdRng, faults: &mut Vec<Fault>) -> Result<()> {
        let client = streams::start_client(&self.lab, STREAMS, ROUND.as_secs())?;
        let began = Instant::now();
        // The streams are synced before the first fault.
        std::thread::sleep(Duration::from_secs(3));
        self.count_check();
        if let Err(e) = self.wait_flows_equal(Duration::from_secs(10), "round start") {
            lock(&self.record).violation(format!("{e:#}"));
        }
        while began.elapsed() < FAULT_WINDOW {
            let fault = Fault::draw(rng);
            self.inject(fault)?;
            faults.push(fault);
            std::thread::sleep(Duration::from_millis(rng.random_range(500..2_500)));
        }
        let report = client.finish()?;
        self.count_check();
        // Data flowing in the last 5 s of the round, none reset: every connection survived.
        let broken = report.broken_after(report.ends_us.saturating_sub(5_000_000));
        if !broken.is_empty() {
            lock(&self.record).violation(format!(
                "{} of {} TCP streams broke in this round: {:?}",
                broken.len(),
                report.tcp.len(),
                broken.iter().take(4).collect::<Vec<_>>()
            ));
        } else {
            lock(&self.record).event(format!("round done: {} streams survived", report.tcp.len()));
        }
        Ok(())
    }

    /// Applies `fault`, holds it, heals it and checks the cluster comes back.
    fn inject(&self, fault: Fault) -> Result<()> {
        lock(&self.record).event(format!("fault: {fault:?}"));
        let bin = carp_bin()?;
        let name = |node: usize| if node == 0 { Host::Gw1 } else { Host::Gw2 };
        match fault {
            Fault::Kill { node, down } | Fault::Term { node, down } => {
                let old = lock(&self.nodes)[node].clone();
                if matches!(fault, Fault::Kill { .. }) {
                    kill_hard(old.pid);
                } else {
                    end_process(old.pid, Duration::from_secs(5));
                }
                std::thread::sleep(down);
                self.replace(node, self.lab.restart_carp(&bin, &old)?);
            }
            Fault::Restart { node } => {
                let old = lock(&self.nodes)[node].clone();
                kill_hard(old.pid);
                self.replace(node, self.lab.restart_carp(&bin, &old)?);
            }
            Fault::Reload { node } => {
                // 0 <-> 10 on gw1, 100 <-> 110 on gw2: retuned, the roles unchanged.
                let opts = {
                    let mut options = lock(&self.options);
                    options[node].advskew ^= 10;
                    options[node].clone()
                };
                self.lab.write_config(name(node), &opts)?;
                let socket = lock(&self.nodes)[node].socket.clone();
                let out = std::process::Command::new(&bin)
                    .args(["reload", "--socket"])
                    .arg(&socket)
                    .output()?;
                if !out.status.success() {
                    lock(&self.record).violation(format!(
                        "carp reload failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            Fault::Upgrade { node } => {
                let socket = lock(&self.nodes)[node].socket.clone();
                let out = std::process::Command::new(&bin)
                    .args(["upgrade", "--socket"])
                    .arg(&socket)
                    .output()?;
                if !out.status.success() {
                    lock(&self.record).violation(format!(
                        "carp upgrade failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            Fault::LinkFlap { node, link, down } => {
                self.lab
                    .sh(name(node), &format!("ip link set {link} down"))?;
                std::thread::sleep(down);
                self.lab.sh(name(node), &format!("ip link set {link} up"))?;
            }
            Fault::SyncImpaired { hold } => {
                let forwarder = self.lab.impair_sync(&SYNC_IMPAIRMENT)?;
                std::thread::sleep(hold);
                self.lab.heal_sync(forwarder)?;
            }
            Fault::Maintenance { node, hold } => {
                let socket = lock(&self.nodes)[node].socket.clone();
                control::call(&socket, &control::Request::Maintenance { enable: true })?;
                std::thread::sleep(hold);
                control::call(&socket, &control::Request::Maintenance { enable: false })?;
            }
        }
        let healed = Instant::now();
        lock(&self.record).event(format!("healed: {}", fault.kind()));
        self.check_masters(healed);
        if fault.touches_sync() {
            self.check_flows_equal(healed);
        }
        Ok(())
    }

    fn replace(&self, node: usize, started: Node) {
        lock(&self.record).event(format!(
            "{} started again, pid {}",
            started.name, started.pid
        ));
        lock(&self.nodes)[node] = started;
    }

    fn count_check(&self) {
        self.checks.fetch_add(1, Ordering::Relaxed);
    }

    /// Every VIP has exactly one master within master-down plus 1 s of the heal.
    fn check_masters(&self, healed: Instant) {
        self.count_check();
        loop {
            let masters = self.masters();
            if LAB_VHIDS.iter().all(|vhid| masters.get(vhid) == Some(&1)) {
                let took = healed.elapsed();
                lock(&self.record).event(format!("one master per VIP {took:.2?} after the heal"));
                return;
            }
            if healed.elapsed() > MASTER_DEADLINE {
                lock(&self.record).violation(format!(
                    "masters per vhid {masters:?} {MASTER_DEADLINE:?} after the heal"
                ));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many nodes say they are master, per vhid (a node that does not answer counts none).
    fn masters(&self) -> HashMap<u8, usize> {
        let nodes = lock(&self.nodes).clone();
        let mut masters = HashMap::new();
        for node in &nodes {
            for vip in node.status().map(|s| s.vips).unwrap_or_default() {
                *masters.entry(vip.vhid).or_insert(0) += usize::from(vip.state == State::Master);
            }
        }
        masters
    }

    /// The flow tables agree within [`FLOWS_DEADLINE`] of the heal.
    fn check_flows_equal(&self, healed: Instant) {
        self.count_check();
        let deadline = healed + FLOWS_DEADLINE;
        let mut last = None;
        while Instant::now() < deadline {
            match self.flow_difference() {
                Ok(None) => {
                    let took = healed.elapsed();
                    lock(&self.record)
                        .event(format!("flow tables equal {took:.2?} after the heal"));
                    return;
                }
                Ok(Some(difference)) => last = Some(difference),
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        lock(&self.record).violation(format!(
            "flow tables differ {FLOWS_DEADLINE:?} after the sync link healed: {last:?}"
        ));
    }

    /// Waits until the tables agree (no violation: for set-up), or fails.
    fn wait_flows_equal(&self, limit: Duration, what: &str) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(None) = self.flow_difference() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "flow tables never agreed at {what}: {:?}",
            self.flow_difference()
        )
    }

    /// `None` when both nodes hold the same flows, else what differs.
    fn flow_difference(&self) -> Result<Option<FlowDifference>> {
        let nodes = lock(&self.nodes).clone();
        let mut tables = Vec::new();
        for node in &nodes {
            let flows = control::call(&node.socket, &control::Request::Flows)?
                .flows
                .context("no flows")?;
            let keys: BTreeMap<String, String> = flows
                .iter()
                .map(|f| {
                    let key = format!("{} {}:{} {}:{}", f.proto, f.src, f.sport, f.dst, f.dport);
                    (key, format!("{} {:?}", f.state, f.origin))
                })
                .collect();
            tables.push(keys);
        }
        let only = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| -> Vec<String> {
            a.iter()
                .filter(|(k, _)| !b.contains_key(*k))
                .map(|(k, v)| format!("{k} {v}"))
                .collect()
        };
        let difference = FlowDifference {
            gw1: tables[0].len(),
            gw2: tables[1].len(),
            only_gw1: only(&tables[0], &tables[1]),
            only_gw2: only(&tables[1], &tables[0]),
        };
        Ok(
            (!difference.only_gw1.is_empty() || !difference.only_gw2.is_empty())
                .then_some(difference),
        )
    }

    /// Every 500 ms: daemons alive, no lasting split brain; every 5 s: descriptors and
    /// memory of each daemon. Returns the samples.
    fn monitor(&self) -> Vec<Sample> {
        let mut samples = Vec::new();
        let mut dual_since: HashMap<u8, Instant> = HashMap::new();
        let mut reported: BTreeSet<u8> = BTreeSet::new();
        let mut last_sample = Instant::now() - Duration::from_secs(10);
        while !self.stop.load(Ordering::Relaxed) {
            let masters = self.masters();
            self.count_check();
            for vhid in LAB_VHIDS {
                if masters.get(&vhid).copied().unwrap_or(0) > 1 {
                    let since = *dual_since.entry(vhid).or_insert_with(Instant::now);
                    if since.elapsed() > DUAL_MASTER_LIMIT && reported.insert(vhid) {
                        lock(&self.record).violation(format!(
                            "two masters of vhid {vhid} for over {DUAL_MASTER_LIMIT:?}"
                        ));
                    }
                } else {
                    dual_since.remove(&vhid);
                    reported.remove(&vhid);
                }
            }
            if last_sample.elapsed() >= Duration::from_secs(5) {
                last_sample = Instant::now();
                for node in lock(&self.nodes).iter() {
                    if let Some(sample) = Sample::of(node) {
                        samples.push(sample);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        samples
    }

    /// No ARP request for the LAN VIP got answers from two MACs.
    fn check_arp(&self, exchanges: &[probe::Exchange], started_us: u128) {
        self.count_check();
        let doubled: Vec<&probe::Exchange> = exchanges
            .iter()
            .filter(|e| {
                let macs: BTreeSet<&str> = e.replies.iter().map(|(_, m)| m.as_str()).collect();
                macs.len() > 1
            })
            .collect();
        let mut record = lock(&self.record);
        record.event(format!(
            "ARP probe: {} requests, {} answered by two MACs",
            exchanges.len(),
            doubled.len()
        ));
        for e in doubled {
            let t = e.sent_us.saturating_sub(started_us) as f64 / 1e6;
            record.violations.push((
                t,
                format!("two MACs answered ARP for the VIP: {:?}", e.replies),
            ));
        }
    }

    /// No daemon grew its descriptors or memory over its life.
    fn check_growth(&self, samples: &[Sample]) {
        let mut by_pid: HashMap<u32, Vec<&Sample>> = HashMap::new();
        for sample in samples {
            by_pid.entry(sample.pid).or_default().push(sample);
        }
        let mut record = lock(&self.record);
        let mut checked = 0;
        for (pid, runs) in by_pid {
            // The first samples are start-up; a life under a minute says little.
            if runs.len() < 12 {
                continue;
            }
            checked += 1;
            self.count_check();
            let early = &runs[2..5];
            let late = &runs[runs.len() - 3..];
            let fds = |s: &[&Sample]| s.iter().map(|s| s.fds).max().unwrap_or(0);
            let rss = |s: &[&Sample]| s.iter().map(|s| s.rss_kib).min().unwrap_or(0);
            let (fds0, fds1) = (fds(early), fds(late));
            let (rss0, rss1) = (rss(early), rss(late));
            record.event(format!(
                "{} pid {pid}: fds {fds0} -> {fds1}, rss {rss0} -> {rss1} KiB over {} samples",
                runs[0].node,
                runs.len()
            ));
            if fds1 > fds0 + 8 {
                record.violation(format!(
                    "{} pid {pid}: descriptors grew {fds0} -> {fds1}",
                    runs[0].node
                ));
            }
            if rss1 > rss0 + rss0 / 4 + 8192 {
                record.violation(format!(
                    "{} pid {pid}: memory grew {rss0} -> {rss1} KiB",
                    runs[0].node
                ));
            }
        }
        record.event(format!(
            "descriptors and memory checked over {checked} daemon lives of a minute or more"
        ));
    }

    /// No daemon panicked, and both still run.
    fn check_logs(&self) {
        self.count_check();
        let nodes = lock(&self.nodes).clone();
        for node in &nodes {
            if let Err(e) = node.status() {
                lock(&self.record)
                    .violation(format!("{} does not answer at the end: {e:#}", node.name));
            }
            let log = node.log();
            if let Some(line) = log.lines().find(|l| l.contains("panicked")) {
                lock(&self.record).violation(format!("{} panicked: {line}", node.name));
            }
        }
    }

    fn report(&self, faults: &[Fault], took: Duration, seed: u64) -> Result<()> {
        let record = lock(&self.record);
        let mut kinds: Vec<(&str, usize)> = Vec::new();
        for fault in faults {
            match kinds.iter_mut().find(|(k, _)| *k == fault.kind()) {
                Some((_, n)) => *n += 1,
                None => kinds.push((fault.kind(), 1)),
            }
        }
        let mut out = String::new();
        let minutes = took.as_secs_f64() / 60.0;
        writeln!(
            out,
            "\nsoak: {minutes:.1} min, seed {seed}: {} faults injected ({}), {:.0} faults/hour survived, {} invariant checks, {} violations",
            faults.len(),
            kinds
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            faults.len() as f64 / took.as_secs_f64() * 3600.0,
            self.checks.load(Ordering::Relaxed),
            record.violations.len()
        )?;
        for (t, what) in &record.violations {
            writeln!(out, "\nVIOLATION at {t:.2} s: {what}\ntimeline:")?;
            for (at, event) in record
                .timeline
                .iter()
                .filter(|(at, _)| (at - t).abs() <= 12.0)
            {
                writeln!(out, "  [{at:7.2}] {event}")?;
            }
        }
        print!("{out}");
        if record.violations.is_empty() {
            Ok(())
        } else {
            bail!(
                "the soak found {} violations (seed {seed})",
                record.violations.len()
            )
        }
    }
}

/// Flows one node holds and the other does not.
#[derive(Debug)]
#[allow(dead_code, reason = "read through Debug in reports")]
struct FlowDifference {
    gw1: usize,
    gw2: usize,
    only_gw1: Vec<String>,
    only_gw2: Vec<String>,
}

/// One look at a daemon's descriptors and memory.
struct Sample {
    node: String,
    pid: u32,
    fds: usize,
    rss_kib: u64,
}

impl Sample {
    fn of(node: &Node) -> Option<Self> {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", node.pid))
            .ok()?
            .count();
        let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid)).ok()?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(Self {
            node: node.name.clone(),
            pid: node.pid,
            fds,
            rss_kib,
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
