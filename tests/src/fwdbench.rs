//! `cargo xtask bench`'s forwarding cost: TCP and 64-byte UDP from the client through gw1 to
//! the server (iperf3), in four settings of the same run: carp off (the VIPs as plain
//! addresses on gw1, the same path), the bare XDP program on gw1 (what XDP itself costs on
//! veth), carp on (XDP attached, no sync), and carp with state sync (flow capture on, the
//! peer taking the flows). Each in generic XDP on veth, as the lab
//! runs it, and in native XDP, where the gateways' switch ports carry a bare XDP program in
//! all three settings (veth's native XDP_TX, carp's ARP answers, needs one on the peer) and
//! carp answers with the interface's MAC (`mac = "interface"`: veth's native path keeps the
//! packet type it set before XDP, so a frame XDP readdressed from the virtual MAC would be
//! dropped as another host's; a NIC driver sets it after XDP). All of it on the lab's
//! shared cores, so the figures move by several percent from run to run.

use crate::{
    Host, LAN_VIP, Lab, NodeOptions, SERVER_IP, SYNC_SECRET, WAN_VIP, carp_bin,
    cluster::{backup_opts, wait_all},
    end_process,
};
use anyhow::{Context, Result};
use aya::programs::{Xdp, XdpMode};
use carp::carp::fsm::State;
use carp_common::maps::XDP_PASS_PROGRAM;
use std::time::Duration;

/// Seconds per iperf3 run, and runs per figure (the median is kept).
const SECONDS: u32 = 5;
const RUNS: usize = 5;

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
    /// Medians of [`RUNS`].
    pub tcp_gbps: f64,
    pub udp_kpps: f64,
}

pub fn measure() -> Result<Vec<Forwarding>> {
    let mut figures = Vec::new();
    for mode in [Mode::Generic, Mode::Native] {
        println!("  {}:", mode.name());
        for setting in [Setting::Off, Setting::Bare, Setting::Carp, Setting::Capture] {
            figures.push(one_setting(mode, setting)?);
        }
    }
    Ok(figures)
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
        let bare: &mut Xdp = object
            .program_mut(XDP_PASS_PROGRAM)
            .context("no xdp_pass")?
            .try_into()?;
        bare.load()?;
        for iface in ifaces {
            bare.attach(iface, mode)
                .with_context(|| format!("XDP ({mode:?}) on {iface}"))?;
        }
        Ok(object)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the attaching thread panicked"))??
}

fn one_setting(mode: Mode, setting: Setting) -> Result<Forwarding> {
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
    let seconds = SECONDS.to_string();
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for _ in 0..RUNS {
        let report = iperf(&lab, &["-c", SERVER_IP, "-t", &seconds, "-J"])?;
        tcp.push(
            report["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .context("iperf3 TCP: no bits_per_second")?
                / 1e9,
        );
        let report = iperf(
            &lab,
            &[
                "-c", SERVER_IP, "-u", "-b", "0", "-l", "64", "-t", &seconds, "-J",
            ],
        )?;
        let sum = &report["end"]["sum"];
        let packets = sum["packets"].as_f64().context("iperf3 UDP: no packets")?;
        let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
        let took = sum["seconds"].as_f64().unwrap_or(f64::from(SECONDS));
        udp.push((packets - lost) / took / 1e3);
    }
    end_process(server, Duration::from_secs(2));
    drop((ports, on_gw1));
    let figures = Forwarding {
        mode,
        setting,
        tcp_gbps: median(&mut tcp),
        udp_kpps: median(&mut udp),
    };
    println!(
        "    {}: TCP {:.2} Gbit/s, 64-byte UDP {:.0} kpps (medians of {RUNS} x {SECONDS} s)",
        setting.name(),
        figures.tcp_gbps,
        figures.udp_kpps
    );
    Ok(figures)
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

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn print(figures: &[Forwarding]) {
    println!(
        "\nForwarding through gw1 (client -> VIP -> server, iperf3 on veth; medians of {RUNS} x {SECONDS} s)"
    );
    println!("  costs against carp off (no XDP) / against the bare XDP program in the same mode");
    println!(
        "  {:<34} {:>12} {:>15} {:>10} {:>15}",
        "setting", "TCP", "cost", "UDP 64 B", "cost"
    );
    let of = |mode: Mode, setting: Setting| {
        figures
            .iter()
            .find(|f| f.mode == mode && f.setting == setting)
    };
    // Percent lost against `base`.
    let cost = |value: f64, base: Option<f64>| base.map(|b| (1.0 - value / b) * 100.0);
    let shown = |c: Option<f64>| c.map_or("-".to_owned(), |c| format!("{c:.1}%"));
    for f in figures {
        let (off, bare) = (of(f.mode, Setting::Off), of(f.mode, Setting::Bare));
        println!(
            "  {:<34} {:>7.2} Gb/s {:>7} / {:>5} {:>5.0} kpps {:>7} / {:>5}",
            format!("{}, {}", f.mode.name(), f.setting.name()),
            f.tcp_gbps,
            shown(cost(f.tcp_gbps, off.map(|o| o.tcp_gbps))),
            shown(cost(f.tcp_gbps, bare.map(|b| b.tcp_gbps))),
            f.udp_kpps,
            shown(cost(f.udp_kpps, off.map(|o| o.udp_kpps))),
            shown(cost(f.udp_kpps, bare.map(|b| b.udp_kpps))),
        );
    }
    // carp's own price: capture against the bare program in the same native mode.
    let bare = of(Mode::Native, Setting::Bare);
    if let Some(capture) = of(Mode::Native, Setting::Capture) {
        let tcp = cost(capture.tcp_gbps, bare.map(|b| b.tcp_gbps));
        let udp = cost(capture.udp_kpps, bare.map(|b| b.udp_kpps));
        let met = |c: Option<f64>| {
            if c.is_some_and(|c| c <= 5.0) {
                "met"
            } else {
                "NOT met"
            }
        };
        println!(
            "  target: carp with capture costs <= 5% against the bare program in native XDP: TCP {} ({}), UDP {} ({})",
            shown(tcp),
            met(tcp),
            shown(udp),
            met(udp)
        );
    }
}

/// Only the forwarding figures (`carp-lab bench forwarding`).
pub fn run() -> Result<()> {
    print(&measure()?);
    Ok(())
}
