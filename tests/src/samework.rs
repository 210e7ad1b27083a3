//! `cargo xtask bench`'s live sync on the same work for carp and conntrackd: the client
//! opens [`FLOWS`] TCP connections through gw1 (their SYNs, `carp-traffic syns`; the
//! server drops them, so each stays a new flow), and the clock runs from the first SYN until
//! gw2's kernel conntrack holds them all. carp's capture (XDP on gw1), conntrackd's event
//! listening and both links are inside the clock; conntrackd runs with its external cache
//! (committed with `conntrackd -c`, inside the clock too) and with `DisableExternalCache`
//! (straight into the kernel, as carp).

use crate::{
    Host, LAN_VIP, Lab, NodeOptions, SERVER_IP, SYNC_SECRET, WAN_VIP, carp_bin,
    cluster::{backup_opts, wait_all},
    syncbench::{commit, conntrack_count, in_netns, read_count, wait_external},
    traffic_bin,
};
use anyhow::{Context, Result, ensure};
use carp::carp::fsm::State;
use std::time::{Duration, Instant};

/// Connections opened.
pub const FLOWS: u32 = 50_000;
const PORT: u16 = 5001;

/// One system's figure: states in gw2's kernel per second of the whole clock, and how many
/// never arrived.
pub struct SameWork {
    pub system: &'static str,
    pub per_s: f64,
    pub took: Duration,
    pub arrived: u64,
}

pub fn measure() -> Result<Vec<SameWork>> {
    Ok(vec![carp()?, conntrackd(true)?, conntrackd(false)?])
}

/// The server drops the SYNs: no RST, so every flow stays open on both gateways.
fn silence_server(lab: &Lab) -> Result<()> {
    lab.sh(
        Host::Server,
        &format!(
            "nft add table inet carp_lab_quiet && \
             nft add chain inet carp_lab_quiet in '{{ type filter hook input priority 0; }}' && \
             nft add rule inet carp_lab_quiet in tcp dport {PORT} drop"
        ),
    )?;
    Ok(())
}

/// Sends the SYNs from the client; returns when the last left.
fn open_flows(lab: &Lab) -> Result<()> {
    let out = lab.output(
        Host::Client,
        &[
            &traffic_bin()?.to_string_lossy(),
            "syns",
            crate::CLIENT_IP,
            &format!("{SERVER_IP}:{PORT}"),
            &FLOWS.to_string(),
        ],
    )?;
    ensure!(
        out.status.success(),
        "carp-traffic syns: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Waits until gw2's kernel holds `base + FLOWS`, or stops growing for 5 s.
fn wait_kernel(lab: &Lab, base: u64, since: Instant) -> Result<(u64, Duration)> {
    let ns = lab.ns(Host::Gw2);
    in_netns(&ns, move || -> Result<(u64, Duration)> {
        let (mut held, mut last_growth) = (0, since.elapsed());
        loop {
            let n = read_count()?.saturating_sub(base);
            if n != held {
                (held, last_growth) = (n, since.elapsed());
            }
            if held >= u64::from(FLOWS) || since.elapsed() > last_growth + Duration::from_secs(5) {
                return Ok((held, last_growth));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    })
    .join()
    .expect("no panic")?
}

fn carp() -> Result<SameWork> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    silence_server(&lab)?;
    let sync = || Some(SYNC_SECRET.to_owned());
    let gw1 = lab.start_carp(
        &bin,
        Host::Gw1,
        &NodeOptions {
            sync_key: sync(),
            nat: true,
            ..NodeOptions::default()
        },
    )?;
    let gw2 = lab.start_carp(
        &bin,
        Host::Gw2,
        &NodeOptions {
            sync_key: sync(),
            nat: true,
            ..backup_opts()
        },
    )?;
    wait_all(&gw1, State::Master, Duration::from_secs(15))?;
    crate::wait_for(Duration::from_secs(15), || {
        gw2.status()
            .ok()
            .and_then(|s| s.sync)
            .filter(|s| s.connected && s.bulk == "done")
    })
    .context("gw2's sync never finished its bulk")?;
    let base = conntrack_count(&lab.ns(Host::Gw2))?;
    let started = Instant::now();
    open_flows(&lab)?;
    let (arrived, took) = wait_kernel(&lab, base, started)?;
    Ok(SameWork {
        system: "carp",
        per_s: arrived as f64 / took.as_secs_f64(),
        took,
        arrived,
    })
}

fn conntrackd(external_cache: bool) -> Result<SameWork> {
    let lab = Lab::up()?;
    silence_server(&lab)?;
    // The path carp's VIPs give, as plain addresses on gw1.
    lab.sh(
        Host::Gw1,
        &format!("ip addr add {LAN_VIP}/24 dev lan && ip addr add {WAN_VIP}/24 dev wan"),
    )?;
    lab.enable_nat()?;
    let _gw1 = lab.start_conntrackd_with(Host::Gw1, external_cache)?;
    let gw2 = lab.start_conntrackd_with(Host::Gw2, external_cache)?;
    let gw2_ns = lab.ns(Host::Gw2);
    let base = conntrack_count(&gw2_ns)?;
    let started = Instant::now();
    open_flows(&lab)?;
    let (arrived, took) = if external_cache {
        let (arrived, transfer) = wait_external(&lab, &gw2, u64::from(FLOWS), started)?;
        (arrived, transfer + commit(&lab, &gw2, &gw2_ns, arrived)?)
    } else {
        wait_kernel(&lab, base, started)?
    };
    Ok(SameWork {
        system: if external_cache {
            "conntrackd FTFW, external cache + commit"
        } else {
            "conntrackd FTFW, DisableExternalCache"
        },
        per_s: arrived as f64 / took.as_secs_f64(),
        took,
        arrived,
    })
}

pub fn print(figures: &[SameWork]) {
    println!(
        "\nLive sync, the same work for each: {FLOWS} TCP connections opened by the client through gw1\n\
         (SYNs; capture or event listening, the link and the install all inside the clock) until\n\
         gw2's kernel conntrack holds them"
    );
    let carp = figures.iter().find(|f| f.system == "carp").map(|f| f.per_s);
    for f in figures {
        println!(
            "  {:<42} {:>9.0} states/s  ({:.2} s, {} of {FLOWS} arrived){}",
            f.system,
            f.per_s,
            f.took.as_secs_f64(),
            f.arrived,
            match carp {
                Some(c) if f.system != "carp" => format!("  carp {:.1}x", c / f.per_s),
                _ => String::new(),
            }
        );
    }
}

/// Only these figures (`carp-lab bench samework`).
pub fn run() -> Result<()> {
    print(&measure()?);
    Ok(())
}
