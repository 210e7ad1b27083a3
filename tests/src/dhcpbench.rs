//! `cargo xtask bench`'s DHCP failover: the primary gateway dies (carp and its Kea killed,
//! its links down) while a client holds a lease; timed from the kill: the secondary's CARP
//! takeover, its Kea serving alone (`partner-down`), and the first DHCPACK from it to a
//! rebinding client (`carp-probe dhcp-rebind`, asking every 100 ms for the address it has).

use crate::{
    ConfigSyncPart, Host, Lab, NodeOptions, SYNC_SECRET, carp_bin, dhcp, probe_bin, unix_us,
    wait_for,
};
use anyhow::{Context, Result, ensure};
use carp::carp::fsm::State;
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

/// Deaths timed.
const TRIALS: usize = 3;
const GW2_LAN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);

/// One death's timeline, from the kill.
pub struct DhcpFailover {
    pub takeover: Duration,
    pub kea_serving: Duration,
    pub ack: Duration,
}

fn mean(values: impl Iterator<Item = Duration>) -> f64 {
    let all: Vec<f64> = values.map(|d| d.as_secs_f64()).collect();
    all.iter().sum::<f64>() / all.len().max(1) as f64
}

pub fn measure() -> Result<Vec<DhcpFailover>> {
    (0..TRIALS).map(|_| one_death()).collect()
}

fn one_death() -> Result<DhcpFailover> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let primary = NodeOptions {
        sync_key: Some(SYNC_SECRET.into()),
        dhcp: true,
        config_sync: ConfigSyncPart::Push,
        ..NodeOptions::default()
    };
    let secondary = NodeOptions {
        sync_key: Some(SYNC_SECRET.into()),
        config_sync: ConfigSyncPart::Accept,
        ..NodeOptions::default()
    };
    let gw1 = lab.start_carp(&bin, Host::Gw1, &primary)?;
    let gw2 = lab.start_carp(&bin, Host::Gw2, &secondary)?;
    for node in [&gw1, &gw2] {
        wait_for(Duration::from_secs(30), || {
            (dhcp::kea_state(node) == "hot-standby").then_some(())
        })
        .with_context(|| format!("{}'s Kea never paired", node.name))?;
    }
    let (before, _) = dhcp::request(&lab, "eth0", Duration::from_secs(15))?;
    let mac = lab.mac(Host::Client, "eth0")?;
    // The leased address on the client, so the server's unicast answer to it arrives.
    lab.sh(
        Host::Client,
        &format!("ip addr add {}/32 dev eth0", before.address),
    )?;
    let probe = probe_bin()?;
    let killed = Instant::now();
    let killed_us = unix_us();
    dhcp::kill_gateway(&lab, &gw1)?;
    std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            lab.output(
                Host::Client,
                &[
                    &probe.to_string_lossy(),
                    "dhcp-rebind",
                    "eth0",
                    &mac,
                    &before.address.to_string(),
                    "100",
                    "30000",
                ],
            )
        });
        let (mut takeover, mut kea_serving) = (None, None);
        while (takeover.is_none() || kea_serving.is_none())
            && killed.elapsed() < Duration::from_secs(30)
        {
            let status = gw2.status().ok();
            if takeover.is_none()
                && status.as_ref().is_some_and(|s| {
                    s.vips
                        .iter()
                        .any(|v| v.interface == "lan" && v.state == State::Master)
                })
            {
                takeover = Some(killed.elapsed());
            }
            if kea_serving.is_none() && dhcp::kea_state(&gw2) == "partner-down" {
                kea_serving = Some(killed.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = client.join().expect("the client thread")?;
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        let ack_line = said
            .lines()
            .find(|l| l.starts_with("ack "))
            .with_context(|| {
                format!(
                    "no DHCPACK: {said} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let fields: Vec<&str> = ack_line.split_whitespace().collect();
        let (at_us, server): (u128, Ipv4Addr) = (fields[1].parse()?, fields[2].parse()?);
        ensure!(server == GW2_LAN, "the ACK came from {server}");
        ensure!(!said.contains("nak "), "a NAK before the ACK: {said}");
        let ack = Duration::from_micros(u64::try_from(at_us.saturating_sub(killed_us))?);
        let figures = DhcpFailover {
            takeover: takeover.context("gw2 never took the LAN VIP")?,
            kea_serving: kea_serving.context("gw2's Kea never served alone")?,
            ack,
        };
        println!(
            "    CARP takeover {:.2} s, Kea serving {:.2} s, DHCPACK {:.2} s after the kill",
            figures.takeover.as_secs_f64(),
            figures.kea_serving.as_secs_f64(),
            figures.ack.as_secs_f64()
        );
        Ok(figures)
    })
}

pub fn print(trials: &[DhcpFailover]) {
    println!(
        "\nDHCP failover: the primary gateway dies (carp and Kea killed, links down); a client\n\
         rebinding every 100 ms asks for the address it holds, {} deaths",
        trials.len()
    );
    let list = |f: fn(&DhcpFailover) -> Duration| {
        trials
            .iter()
            .map(|t| format!("{:.2}", f(t).as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "  CARP takeover      {:<18} mean {:.2} s",
        list(|t| t.takeover),
        mean(trials.iter().map(|t| t.takeover))
    );
    println!(
        "  Kea serving alone  {:<18} mean {:.2} s  (partner-down in carp status, read each second)",
        list(|t| t.kea_serving),
        mean(trials.iter().map(|t| t.kea_serving))
    );
    println!(
        "  first DHCPACK      {:<18} mean {:.2} s",
        list(|t| t.ack),
        mean(trials.iter().map(|t| t.ack))
    );
    let ok = trials
        .iter()
        .all(|t| t.ack <= t.takeover + Duration::from_secs(2));
    println!(
        "  target: DHCPACK within the CARP takeover + 2 s: {}",
        crate::bench::verdict(ok)
    );
}

/// Only the DHCP figures (`carp-lab bench dhcp`).
pub fn run() -> Result<()> {
    print(&measure()?);
    Ok(())
}
