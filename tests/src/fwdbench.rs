//! `cargo xtask bench`'s forwarding cost: TCP and 64-byte UDP from the client through gw1 to
//! the server (iperf3), in four settings of the same run: carp off (the VIPs as plain
//! addresses on gw1, the same path), the bare XDP program on gw1 (what XDP itself costs on
//! veth), carp on (XDP attached, no sync), and carp with state sync (flow capture on, the
//! peer taking the flows). Each in generic XDP on veth, as the lab
//! runs it, and in native XDP, where the gateways' switch ports carry a bare XDP program in
//! every setting (veth's native XDP_TX, carp's ARP answers, needs one on the peer) and
//! carp answers with the interface's MAC (`mac = "interface"`: veth's native path keeps the
//! packet type it set before XDP, so a frame XDP readdressed from the virtual MAC would be
//! dropped as another host's; a NIC driver sets it after XDP). All of it on the lab's
//! shared cores, so the figures move by several percent from run to run: the four settings
//! of a mode stand up side by side in labs of their own and take turns, round by round.

use crate::{
    Host, LAN_VIP, Lab, NodeOptions, SERVER_IP, SYNC_SECRET, WAN_VIP, carp_bin,
    cluster::{backup_opts, wait_all},
    end_process,
};
use anyhow::{Context, Result};
use aya::programs::XdpMode;
use carp::carp::fsm::State;
use std::time::Duration;

/// Seconds per iperf3 run, and rounds per figure (the median is kept): short runs, many
/// rounds, since this VM's speed moves within seconds.
const SECONDS: u32 = 3;
const RUNS: usize = 9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    Off,
    /// carp off, the bare XDP program on gw1's veths in the same mode: the price of XDP
    /// itself on veth (generic XDP linearises frames; native gives up veth's GRO).
    Bare,
    Carp,
    Capture,
}

impl Setting {
    fn name(self) -> &'static str {
        match self {
            Setting::Off => "carp off",
            Setting::Bare => "bare XDP program",
            Setting::Carp => "carp on",
            Setting::Capture => "carp + capture",
        }
    }
}

/// How XDP runs on the gateways' veths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Generic,
    Native,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Generic => "generic XDP",
            Mode::Native => "native XDP",
        }
    }

    /// The gateways' `[node] xdp_mode` and `[carp] mac`.
    fn config(self) -> (&'static str, &'static str) {
        match self {
            Mode::Generic => ("generic", "virtual"),
            Mode::Native => ("native", "interface"),
        }
    }
}

pub struct Forwarding {
    pub mode: Mode,
    pub setting: Setting,
    /// Each round's figure, in round order: settings of one round ran back to back.
    pub tcp_rounds: Vec<f64>,
    pub udp_rounds: Vec<f64>,
}

impl Forwarding {
    /// Gbit/s, the median of the rounds.
    pub fn tcp_gbps(&self) -> f64 {
        median(&self.tcp_rounds)
    }

    /// 64-byte UDP kpps, the median of the rounds.
    pub fn udp_kpps(&self) -> f64 {
        median(&self.udp_rounds)
    }

    /// The median over rounds of what this setting lost against `base` in the same round,
    /// in percent, with the smallest and largest of those: pairs within a round share the
    /// machine's speed of the moment, which medians of each setting alone do not.
    fn paired_cost(&self, base: &Forwarding, tcp: bool) -> Cost {
        let (mine, theirs) = if tcp {
            (&self.tcp_rounds, &base.tcp_rounds)
        } else {
            (&self.udp_rounds, &base.udp_rounds)
        };
        let mut costs: Vec<f64> = mine
            .iter()
            .zip(theirs)
            .map(|(m, b)| (1.0 - m / b) * 100.0)
            .collect();
        costs.sort_by(f64::total_cmp);
        Cost {
            median: costs[costs.len() / 2],
            low: costs[0],
            high: costs[costs.len() - 1],
        }
    }
}

/// A paired cost in percent: median and range over the rounds.
struct Cost {
    median: f64,
    low: f64,
    high: f64,
}

impl std::fmt::Display for Cost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1}% ({:.0}..{:.0})", self.median, self.low, self.high)
    }
}

pub fn measure() -> Result<Vec<Forwarding>> {
    let mut figures = Vec::new();
    for mode in [Mode::Generic, Mode::Native] {
        println!("  {}:", mode.name());
        figures.extend(one_mode(mode)?);
    }
    Ok(figures)
}

/// The four settings of `mode`, each in a lab of its own, all up at once and measured in
/// turn, round after round: a drift in the machine's speed hits every setting alike.
fn one_mode(mode: Mode) -> Result<Vec<Forwarding>> {
    let settings = [Setting::Off, Setting::Bare, Setting::Carp, Setting::Capture];
    let mut prepared = Vec::new();
    for setting in settings {
        prepared.push(prepare(mode, setting)?);
    }
    let mut figures: Vec<Forwarding> = settings
        .iter()
        .map(|&setting| Forwarding {
            mode,
            setting,
            tcp_rounds: Vec::new(),
            udp_rounds: Vec::new(),
        })
        .collect();
    for round in 0..RUNS {
        let mut line = format!("    round {} of {RUNS}:", round + 1);
        for (setting, f) in prepared.iter().zip(&mut figures) {
            let (gbps, kpps) = one_round(&setting.lab)?;
            line += &format!(" {} {gbps:.2} Gb/s {kpps:.0} kpps;", f.setting.name());
            f.tcp_rounds.push(gbps);
            f.udp_rounds.push(kpps);
        }
        println!("{}", line.trim_end_matches(';'));
    }
    for (setting, f) in prepared.into_iter().zip(&figures) {
        end_process(setting.server, Duration::from_secs(2));
        println!(
            "    {}: TCP {:.2} Gbit/s, 64-byte UDP {:.0} kpps (medians of {RUNS} x {SECONDS} s)",
            f.setting.name(),
            f.tcp_gbps(),
            f.udp_kpps()
        );
    }
    Ok(figures)
}

/// One setting's lab, ready to forward: what it attached lives as long as this does.
struct Prepared {
    server: u32,
    _xdp: (Option<aya::Ebpf>, Option<aya::Ebpf>),
    lab: Lab,
}

/// XDP's bare program attached to `ifaces` in `host`'s namespace, for as long as the
/// returned object lives.
fn bare_on(
    lab: &Lab,
    host: Host,
    ifaces: &'static [&'static str],
    mode: XdpMode,
) -> Result<aya::Ebpf> {
    crate::syncbench::in_netns(&lab.ns(host), move || -> Result<aya::Ebpf> {
        let mut object = aya::Ebpf::load(carp::EBPF_OBJECT)?;
        let bare = crate::bench::loaded_bare(&mut object)?;
        for iface in ifaces {
            bare.attach(iface, mode)
                .with_context(|| format!("XDP ({mode:?}) on {iface}"))?;
        }
        Ok(object)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the attaching thread panicked"))??
}

fn prepare(mode: Mode, setting: Setting) -> Result<Prepared> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let ports = match mode {
        Mode::Native => Some(bare_on(
            &lab,
            Host::Switch,
            &["gw1-lan", "gw1-wan", "gw2-lan", "gw2-wan"],
            XdpMode::Driver,
        )?),
        Mode::Generic => None,
    };
    let (xdp_mode, mac) = mode.config();
    let mut on_gw1 = None;
    match setting {
        Setting::Off | Setting::Bare => {
            if setting == Setting::Bare {
                let attach = match mode {
                    Mode::Native => XdpMode::Driver,
                    Mode::Generic => XdpMode::Skb,
                };
                on_gw1 = Some(bare_on(&lab, Host::Gw1, &["lan", "wan"], attach)?);
            }
            lab.sh(
                Host::Gw1,
                &format!("ip addr add {LAN_VIP}/24 dev lan && ip addr add {WAN_VIP}/24 dev wan"),
            )?;
        }
        Setting::Carp => {
            let gw1 = lab.start_carp(
                &bin,
                Host::Gw1,
                &NodeOptions {
                    xdp_mode,
                    mac,
                    ..NodeOptions::default()
                },
            )?;
            wait_all(&gw1, State::Master, Duration::from_secs(10))?;
        }
        Setting::Capture => {
            let sync = || Some(SYNC_SECRET.to_owned());
            let gw1 = lab.start_carp(
                &bin,
                Host::Gw1,
                &NodeOptions {
                    sync_key: sync(),
                    xdp_mode,
                    mac,
                    ..NodeOptions::default()
                },
            )?;
            // The peer takes the flows, as in service; it shares the lab's cores with gw1.
            lab.start_carp(
                &bin,
                Host::Gw2,
                &NodeOptions {
                    sync_key: sync(),
                    xdp_mode,
                    mac,
                    ..backup_opts()
                },
            )?;
            wait_all(&gw1, State::Master, Duration::from_secs(15))?;
        }
    }
    let server = lab.spawn(
        Host::Server,
        &["iperf3", "-s"],
        &lab.dir.join("iperf3-server.log"),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(Prepared {
        server,
        _xdp: (ports, on_gw1),
        lab,
    })
}

/// One TCP and one 64-byte UDP run through `lab`'s gw1: Gbit/s and kpps received. A run
/// iperf3 reports without figures (its control connection lost the race with the last run's
/// end, now and then) is run again, once.
fn one_round(lab: &Lab) -> Result<(f64, f64)> {
    let seconds = SECONDS.to_string();
    let tcp = ["-c", SERVER_IP, "-t", &seconds, "-J"];
    let gbps = retried(|| {
        let report = iperf(lab, &tcp)?;
        report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|bps| bps / 1e9)
            .with_context(|| format!("iperf3 TCP: no bits_per_second in {}", brief(&report)))
    })?;
    let udp = [
        "-c", SERVER_IP, "-u", "-b", "0", "-l", "64", "-t", &seconds, "-J",
    ];
    let kpps = retried(|| {
        let report = iperf(lab, &udp)?;
        let sum = &report["end"]["sum"];
        let packets = sum["packets"]
            .as_f64()
            .with_context(|| format!("iperf3 UDP: no packets in {}", brief(&report)))?;
        let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
        let took = sum["seconds"].as_f64().unwrap_or(f64::from(SECONDS));
        Ok((packets - lost) / took / 1e3)
    })?;
    Ok((gbps, kpps))
}

fn retried(mut run: impl FnMut() -> Result<f64>) -> Result<f64> {
    run().or_else(|e| {
        println!("    ({e:#}; once more)");
        std::thread::sleep(Duration::from_secs(1));
        run()
    })
}

/// The start of an iperf3 report, for an error message.
fn brief(report: &serde_json::Value) -> String {
    let mut text = report.get("error").unwrap_or(report).to_string();
    text.truncate(300);
    text
}

fn iperf(lab: &Lab, args: &[&str]) -> Result<serde_json::Value> {
    let mut command = vec!["iperf3"];
    command.extend_from_slice(args);
    let out = lab.output(Host::Client, &command)?;
    anyhow::ensure!(
        out.status.success(),
        "iperf3 {args:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

pub fn print(figures: &[Forwarding]) {
    println!(
        "\nForwarding through gw1 (client -> VIP -> server, iperf3 on veth; medians of {RUNS} rounds x {SECONDS} s)"
    );
    println!(
        "  costs: median over rounds of the loss against carp off (no XDP) / against the bare XDP\n  \
         program in the same round and mode, with their range over the rounds"
    );
    let of = |mode: Mode, setting: Setting| {
        figures
            .iter()
            .find(|f| f.mode == mode && f.setting == setting)
    };
    let shown = |f: &Forwarding, base: Option<&Forwarding>, tcp: bool| {
        base.map_or("-".to_owned(), |b| f.paired_cost(b, tcp).to_string())
    };
    for f in figures {
        let (off, bare) = (of(f.mode, Setting::Off), of(f.mode, Setting::Bare));
        println!(
            "  {:<30} TCP {:>6.2} Gb/s, cost {} / {}",
            format!("{}, {}", f.mode.name(), f.setting.name()),
            f.tcp_gbps(),
            shown(f, off, true),
            shown(f, bare, true),
        );
        println!(
            "  {:<30} UDP {:>6.0} kpps, cost {} / {}",
            "",
            f.udp_kpps(),
            shown(f, off, false),
            shown(f, bare, false),
        );
    }
    // carp's own price: capture against the bare program in the same native mode.
    if let (Some(capture), Some(bare)) = (
        of(Mode::Native, Setting::Capture),
        of(Mode::Native, Setting::Bare),
    ) {
        let (tcp, udp) = (
            capture.paired_cost(bare, true),
            capture.paired_cost(bare, false),
        );
        let met = |c: &Cost| crate::bench::verdict(c.median <= 5.0);
        println!(
            "  target: carp with capture costs <= 5% against the bare program in native XDP: TCP {tcp} ({}), UDP {udp} ({})",
            met(&tcp),
            met(&udp)
        );
    }
}

/// Only the forwarding figures (`carp-lab bench forwarding`).
pub fn run() -> Result<()> {
    print(&measure()?);
    Ok(())
}
