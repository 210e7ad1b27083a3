//! `cargo xtask bench`'s forwarding cost: TCP and 64-byte UDP from the client through gw1 to
//! the server (iperf3), in three settings of the same run: carp off (the VIPs as plain
//! addresses on gw1, the same path), carp on (XDP attached, no sync), and carp with state
//! sync (flow capture on, the peer taking the flows). Generic XDP on veth, as the lab runs
//! it; all of it on the lab's shared cores, so the figures move by several percent from run
//! to run.

use crate::{
    Host, LAN_VIP, Lab, NodeOptions, SERVER_IP, SYNC_SECRET, WAN_VIP, carp_bin,
    cluster::{backup_opts, wait_all},
    end_process,
};
use anyhow::{Context, Result};
use carp::carp::fsm::State;
use std::time::Duration;

/// Seconds per iperf3 run, and runs per figure (the median is kept).
const SECONDS: u32 = 5;
const RUNS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    Off,
    Carp,
    Capture,
}

impl Setting {
    fn name(self) -> &'static str {
        match self {
            Setting::Off => "carp off",
            Setting::Carp => "carp on",
            Setting::Capture => "carp + capture",
        }
    }
}

pub struct Forwarding {
    pub setting: Setting,
    /// Medians of [`RUNS`].
    pub tcp_gbps: f64,
    pub udp_kpps: f64,
}

pub fn measure() -> Result<Vec<Forwarding>> {
    [Setting::Off, Setting::Carp, Setting::Capture]
        .into_iter()
        .map(one_setting)
        .collect()
}

fn one_setting(setting: Setting) -> Result<Forwarding> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    match setting {
        Setting::Off => {
            lab.sh(
                Host::Gw1,
                &format!("ip addr add {LAN_VIP}/24 dev lan && ip addr add {WAN_VIP}/24 dev wan"),
            )?;
        }
        Setting::Carp => {
            let gw1 = lab.start_carp(&bin, Host::Gw1, &NodeOptions::default())?;
            wait_all(&gw1, State::Master, Duration::from_secs(10))?;
        }
        Setting::Capture => {
            let sync = || Some(SYNC_SECRET.to_owned());
            let gw1 = lab.start_carp(
                &bin,
                Host::Gw1,
                &NodeOptions {
                    sync_key: sync(),
                    ..NodeOptions::default()
                },
            )?;
            // The peer takes the flows, as in service; it shares the lab's cores with gw1.
            lab.start_carp(
                &bin,
                Host::Gw2,
                &NodeOptions {
                    sync_key: sync(),
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
    let figures = Forwarding {
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
        "\nForwarding through gw1 (client -> VIP -> server, iperf3, generic XDP on veth; medians of {RUNS} x {SECONDS} s)"
    );
    println!(
        "  {:<16} {:>14} {:>8} {:>18} {:>8}",
        "setting", "TCP", "cost", "64-byte UDP", "cost"
    );
    let off = figures.iter().find(|f| f.setting == Setting::Off);
    for f in figures {
        let cost = |value: f64, base: Option<f64>| {
            base.map_or("-".to_owned(), |b| {
                format!("{:.1}%", (1.0 - value / b) * 100.0)
            })
        };
        println!(
            "  {:<16} {:>9.2} Gb/s {:>8} {:>13.0} kpps {:>8}",
            f.setting.name(),
            f.tcp_gbps,
            cost(f.tcp_gbps, off.map(|o| o.tcp_gbps)),
            f.udp_kpps,
            cost(f.udp_kpps, off.map(|o| o.udp_kpps)),
        );
    }
    println!(
        "  target: capture costs <= 5% in native XDP mode: not measured here (veth's native mode needs an XDP program on the peer; the lab runs generic)"
    );
}

/// Only the forwarding figures (`carp-lab bench forwarding`).
pub fn run() -> Result<()> {
    print(&measure()?);
    Ok(())
}
