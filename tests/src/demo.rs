//! `cargo xtask demo`: two gateways in the lab, client traffic through the VIP, the master
//! killed, the takeover shown with its time and the packets lost. Everything is removed after.

use crate::{
    Host, LAN_VIP, Lab, NodeOptions, SERVER_IP, carp_bin,
    cluster::{backup_opts, wait_all, wait_state},
    kill_hard, ping, wait_exit,
};
use anyhow::{Context, Result};
use carp::{carp::fsm::State, cli::format_status};
use std::time::{Duration, Instant};

fn say(what: &str) {
    println!("\n==> {what}");
}

pub fn run() -> Result<()> {
    say("building the lab: gw1, gw2 (LAN, WAN, sync), a LAN client, a WAN server");
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    say("starting carp on gw1 (advskew 0) and gw2 (advskew 100)");
    let gw1 = lab.start_carp(&bin, Host::Gw1, &NodeOptions::default())?;
    let gw2 = lab.start_carp(&bin, Host::Gw2, &backup_opts())?;
    println!("    waiting for the election (master-down timer: 3 s)");
    wait_all(&gw1, State::Master, Duration::from_secs(10))?;
    wait_all(&gw2, State::Backup, Duration::from_secs(2))?;
    println!(
        "\n--- carp status on gw1 ---\n{}",
        format_status(&gw1.status()?)
    );
    println!(
        "--- carp status on gw2 ---\n{}",
        format_status(&gw2.status()?)
    );

    say(&format!(
        "client {} pings server {SERVER_IP} through the VIPs, 100 per second",
        crate::CLIENT_IP
    ));
    let log = lab.dir.join("demo-ping.log");
    let ping_pid = lab.ping_background(Host::Client, SERVER_IP, 0.01, 900, &log)?;
    std::thread::sleep(Duration::from_secs(2));

    say("killing gw1's carp daemon (SIGKILL: no bow-out, the VIPs and XDP stay behind)");
    let killed = Instant::now();
    kill_hard(gw1.pid);
    wait_state(&gw2, 1, State::Master, Duration::from_secs(8))?;
    let takeover = killed.elapsed();
    wait_state(&gw2, 2, State::Master, Duration::from_secs(2))?;
    println!(
        "    gw2 is MASTER {:.2} s after the kill (master-down for advskew 100: 3.39 s from gw1's last advert)",
        takeover.as_secs_f64()
    );
    println!(
        "\n--- carp status on gw2 ---\n{}",
        format_status(&gw2.status()?)
    );

    println!("    letting the pings finish");
    wait_exit(ping_pid, Duration::from_secs(15))
        .then_some(())
        .context("ping did not finish")?;
    let report = ping::parse(&std::fs::read_to_string(&log)?);
    say("result");
    println!(
        "    pings sent {}, answered {}, lost {} ({:.2} s of traffic); longest gap {:.2} s",
        report.sent,
        report.received,
        report.lost(),
        report.lost() as f64 / 100.0,
        report.longest_gap_s
    );
    println!(
        "    ARP for {LAN_VIP}: answered by gw1's XDP until its heartbeat lapsed, then by gw2's"
    );
    say("removing the lab");
    drop(lab);
    println!("    done");
    Ok(())
}
