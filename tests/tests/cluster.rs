//! The CARP cluster in the namespace lab: election, ARP ownership, failover, preemption,
//! maintenance, bow-out, split brain, authentication, unicast. Needs root (CI is root).

use anyhow::{Context, Result};
use carp::carp::fsm::State;
use carp_lab::cluster::{
    assert_answered_once_by, assert_never_two_answers, backup_opts, carp_cli, carp_cli_refused,
    pair, wait_all, wait_state,
};
use carp_lab::{
    Host, LAN_VIP, Lab, Node, NodeOptions, SERVER_IP, carp_bin, end_process, kill_hard, probe,
    wait_for, wait_pid_exit,
};
use std::time::{Duration, Instant};

const VMAC_LAN: &str = "00:00:5e:00:01:01";

#[test]
fn election_gives_one_master_and_exactly_one_arp_answer() -> Result<()> {
    let lab = Lab::up()?;
    let (_gw1, _gw2) = pair(&lab)?;
    assert_answered_once_by(&lab, LAN_VIP, VMAC_LAN, 20)?;
    // The VIP is on gw1's interface only, and reachable through the virtual MAC.
    assert!(
        lab.sh(Host::Gw1, "ip -4 addr show dev lan")?
            .contains(LAN_VIP)
    );
    assert!(
        !lab.sh(Host::Gw2, "ip -4 addr show dev lan")?
            .contains(LAN_VIP)
    );
    lab.sh(Host::Client, &format!("ping -c 3 -i 0.2 -W 1 {LAN_VIP}"))?;
    // Maps are pinned per node with BTF: bpftool shows field names.
    let dump = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(format!("/sys/fs/bpf/carp/{}/CARP_VIPS", _gw1.name))
        .output()?;
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("\"ifindex\"") && dump.contains("\"role\""),
        "{dump}"
    );
    Ok(())
}

#[test]
fn killed_master_is_replaced_within_master_down_and_preempts_back_after_restart() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = pair(&lab)?;
    let log = lab.dir.join("probe-kill.log");
    let probe_pid =
        lab.arp_probe_background(&probe::ArpProbe::from_client(LAN_VIP, 20, 7000), &log)?;
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    kill_hard(gw1.pid);
    wait_state(&gw2, 1, State::Master, Duration::from_secs(6))?;
    let takeover = killed.elapsed();
    // 3 x advbase + 100/256 s counted from the last advert, which came before the kill: 3.39 s
    // at most, with a second's room for a slow machine.
    assert!(
        takeover < Duration::from_millis(4500),
        "takeover took {takeover:?}"
    );
    wait_state(&gw2, 2, State::Master, Duration::from_secs(2))?;
    // The dead master's XDP stays attached but stops answering once its heartbeat is stale:
    // never two answers, and answers again once gw2 holds the VIP.
    assert!(
        carp_lab::wait_exit(probe_pid, Duration::from_secs(10)),
        "probe finished"
    );
    let exchanges = probe::parse(&std::fs::read_to_string(&log)?);
    assert!(exchanges.len() > 200, "probe ran: {}", exchanges.len());
    assert_never_two_answers(&exchanges);
    assert_eq!(
        exchanges.last().map(|e| e.replies.len()),
        Some(1),
        "gw2 answers at the end"
    );
    lab.sh(Host::Client, &format!("ping -c 2 -i 0.2 -W 1 {LAN_VIP}"))?;
    // A restarted gw1 reuses its pins, comes back as backup and preempts (skew 0 < 100).
    let gw1 = lab.restart_carp(&carp_bin()?, &gw1)?;
    wait_all(&gw1, State::Master, Duration::from_secs(8))?;
    wait_all(&gw2, State::Backup, Duration::from_secs(2))?;
    assert_answered_once_by(&lab, LAN_VIP, VMAC_LAN, 5)?;
    Ok(())
}

#[test]
fn master_losing_a_link_demotes_and_every_vip_moves_together() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = pair(&lab)?;
    // Pull gw1's LAN cable (at the switch): its LAN vhid goes INIT, the demotion of 240 makes
    // the WAN vhid advertise slower, and preempting gw2 takes both.
    lab.sh(Host::Switch, "ip link set gw1-lan down")?;
    wait_state(&gw2, 2, State::Master, Duration::from_secs(3))?;
    wait_state(&gw2, 1, State::Master, Duration::from_secs(5))?;
    let status = gw1.status()?;
    assert_eq!(status.demotion, 240);
    assert_eq!(
        status.vips.iter().find(|v| v.vhid == 1).map(|v| v.state),
        Some(State::Init)
    );
    assert_eq!(
        status.vips.iter().find(|v| v.vhid == 2).map(|v| v.state),
        Some(State::Backup)
    );
    assert!(!lab.sh(Host::Gw1, "ip -4 addr show")?.contains(LAN_VIP));
    // Cable back: demotion gone, gw1 preempts both back.
    lab.sh(Host::Switch, "ip link set gw1-lan up")?;
    wait_all(&gw1, State::Master, Duration::from_secs(8))?;
    assert_eq!(gw1.status()?.demotion, 0);
    Ok(())
}

#[test]
fn maintenance_mode_moves_the_vips_at_once_and_persists_across_restart() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = pair(&lab)?;
    let socket = gw1.socket.to_string_lossy().into_owned();
    let started = Instant::now();
    let table = carp_cli(&["maintenance", "on", "--socket", &socket])?;
    assert!(table.contains("maintenance ON"), "{table}");
    wait_all(&gw2, State::Master, Duration::from_secs(1))?;
    assert!(started.elapsed() < Duration::from_secs(1));
    // Restart gw1: still in maintenance, so gw2 keeps the VIPs.
    end_process(gw1.pid, Duration::from_secs(5));
    let gw1 = lab.restart_carp(&carp_bin()?, &gw1)?;
    let status = gw1.status()?;
    assert!(status.maintenance);
    assert_eq!(status.demotion, 240);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(gw2.state(1), Some(State::Master));
    assert_eq!(gw1.state(1), Some(State::Backup));
    // The CLI finds the socket through -c too.
    let config = gw1.config.to_string_lossy().into_owned();
    carp_cli(&["maintenance", "off", "-c", &config])?;
    wait_all(&gw1, State::Master, Duration::from_secs(3))?;
    let json: serde_json::Value =
        serde_json::from_str(&carp_cli(&["status", "--json", "-c", &config])?)?;
    assert_eq!(json["maintenance"], false);
    assert_eq!(json["vips"][0]["state"], "MASTER");
    assert_eq!(json["vips"][0]["address"], "198.18.1.1/24");
    Ok(())
}

#[test]
fn sigterm_hands_over_before_letting_go_and_cleans_up() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = pair(&lab)?;
    // Pings at 1,000/s through both VIPs: releasing them before the peer holds them loses one
    // for every millisecond of the gap (1 or 2 with the old stop that released at once).
    let log = lab.dir.join("ping-sigterm.log");
    let ping = lab.ping_background(Host::Client, SERVER_IP, 0.001, 3000, &log)?;
    std::thread::sleep(Duration::from_millis(1000));
    let stopped = Instant::now();
    end_process(gw1.pid, Duration::from_secs(5));
    let took = stopped.elapsed();
    wait_all(&gw2, State::Master, Duration::from_secs(1))?;
    assert!(
        stopped.elapsed() < Duration::from_secs(1),
        "the stop and the takeover took {:?}",
        stopped.elapsed()
    );
    anyhow::ensure!(
        carp_lab::wait_exit(ping, Duration::from_secs(20)),
        "ping did not finish"
    );
    let report = carp_lab::ping::parse(&std::fs::read_to_string(&log)?);
    println!(
        "SIGTERM: {} of {} pings lost, the stop took {took:?}",
        report.lost(),
        report.sent
    );
    assert!(report.sent >= 2900, "{report:?}");
    assert_eq!(report.lost(), 0, "{report:?}; gw1:\n{}", gw1.log());
    // Each VIP went to the peer first, then gw1 let go of it.
    let handed_over = gw1
        .log()
        .matches("a peer took over from our bow-out")
        .count();
    assert_eq!(handed_over, 2, "gw1:\n{}", gw1.log());
    assert!(
        !lab.sh(Host::Gw1, "ip -4 addr show")?.contains(LAN_VIP),
        "VIP released"
    );
    assert!(
        !lab.sh(Host::Gw1, "ip link show lan")?.contains("xdp"),
        "XDP detached"
    );
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/carp/{}", gw1.name)).exists());
    assert!(!gw1.socket.exists());
    Ok(())
}

/// A master with no peer waits out the hand-over grace on SIGTERM. An upgrade or a reload
/// asked meanwhile is refused, not served (the upgrade would re-execute a daemon that then
/// runs on as if never told to stop), and the stop goes through.
#[test]
fn a_stopping_daemon_refuses_changes_and_still_stops() -> Result<()> {
    let lab = Lab::up()?;
    let gw1 = lab.start_carp(&carp_bin()?, Host::Gw1, &NodeOptions::default())?;
    wait_all(&gw1, State::Master, Duration::from_secs(10))?;
    let socket = gw1.socket.to_string_lossy();
    let stopped = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(gw1.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    // The signal first, so the requests cannot overtake it.
    wait_for(Duration::from_millis(400), || {
        gw1.log().contains("SIGTERM: handing over").then_some(())
    })
    .with_context(|| format!("gw1 did not take the SIGTERM:\n{}", gw1.log()))?;
    let shown = carp_cli(&["status", "--socket", &socket])?;
    assert!(shown.contains("STOPPING"), "{shown}");
    for change in ["upgrade", "reload"] {
        let (_, stderr) = carp_cli_refused(&[change, "--socket", &socket])?;
        assert!(
            stderr.contains("carp is stopping"),
            "{change} {:?} after SIGTERM: {stderr}\ngw1:\n{}",
            stopped.elapsed(),
            gw1.log()
        );
    }
    assert!(
        wait_pid_exit(gw1.pid, Duration::from_secs(3)),
        "gw1 runs on after SIGTERM:\n{}",
        gw1.log()
    );
    let log = gw1.log();
    assert!(log.contains("refused: the daemon is stopping"), "{log}");
    assert!(!log.contains("re-executing in place"), "{log}");
    assert!(log.contains("stopped: VIPs released"), "{log}");
    Ok(())
}

#[test]
fn split_brain_heals_to_one_master_and_the_winner_reannounces() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = pair(&lab)?;
    // Partition the adverts at the switch: both become master.
    lab.sh(
        Host::Switch,
        "nft add table bridge carp && nft add chain bridge carp filt '{ type filter hook forward priority 0; }' \
         && nft add rule bridge carp filt ip protocol 112 drop",
    )?;
    wait_state(&gw2, 1, State::Master, Duration::from_secs(6))?;
    assert_eq!(gw1.state(1), Some(State::Master));
    let garps_before = gw1.status()?.counters.garps_sent;
    lab.sh(Host::Switch, "nft delete table bridge carp")?;
    wait_state(&gw2, 1, State::Backup, Duration::from_secs(3))?;
    wait_state(&gw2, 2, State::Backup, Duration::from_secs(3))?;
    assert_eq!(gw1.state(1), Some(State::Master));
    carp_lab::wait_for(Duration::from_secs(3), || {
        (gw1.status().ok()?.counters.garps_sent > garps_before).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the winner sent no fresh gratuitous ARPs ({garps_before} before); gw1:\n{}\ngw2:\n{}",
            gw1.log(),
            gw2.log()
        )
    });
    assert_answered_once_by(&lab, LAN_VIP, VMAC_LAN, 5)?;
    Ok(())
}

#[test]
fn adverts_with_a_wrong_passphrase_are_ignored() -> Result<()> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let gw1 = lab.start_carp(&bin, Host::Gw1, &NodeOptions::default())?;
    wait_state(&gw1, 1, State::Master, Duration::from_secs(10))?;
    let intruder = NodeOptions {
        passphrase: "wrongsecret".into(),
        advbase: 1,
        advskew: 0,
        ..NodeOptions::default()
    };
    let gw2 = lab.start_carp(&bin, Host::Gw2, &intruder)?;
    // gw2 ignores gw1 too, becomes master after its master-down time and advertises; those
    // equal adverts from a higher address would not demote gw1 anyway, but a faster one would.
    wait_state(&gw2, 1, State::Master, Duration::from_secs(6))?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(gw1.state(1), Some(State::Master));
    assert!(gw1.status()?.counters.bad_auth > 0);
    assert_eq!(gw1.status()?.counters.adverts_received, 0);
    assert!(gw2.status()?.counters.bad_auth > 0);
    Ok(())
}

#[test]
fn unicast_peers_elect_where_multicast_is_blocked() -> Result<()> {
    let lab = Lab::up()?;
    lab.sh(
        Host::Switch,
        "nft add table bridge nomc && nft add chain bridge nomc filt '{ type filter hook forward priority 0; }' \
         && nft add rule bridge nomc filt ip daddr 224.0.0.18 drop",
    )?;
    let bin = carp_bin()?;
    let unicast = |peer: &str, advskew| NodeOptions {
        peer: Some(peer.into()),
        advskew,
        vips: vec![("lan", 1, format!("{LAN_VIP}/24"))],
        ..NodeOptions::default()
    };
    let gw1 = lab.start_carp(&bin, Host::Gw1, &unicast("198.18.1.3", 0))?;
    let gw2 = lab.start_carp(&bin, Host::Gw2, &unicast("198.18.1.2", 100))?;
    wait_state(&gw1, 1, State::Master, Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        gw2.state(1),
        Some(State::Backup),
        "gw2 hears gw1 by unicast"
    );
    assert!(gw2.status()?.counters.adverts_received > 0);
    kill_hard(gw1.pid);
    wait_state(&gw2, 1, State::Master, Duration::from_secs(6))?;
    Ok(())
}

#[test]
fn interface_mac_mode_answers_with_the_nic_mac() -> Result<()> {
    let lab = Lab::up()?;
    let opts = NodeOptions {
        mac: "interface",
        ..NodeOptions::default()
    };
    let gw1 = lab.start_carp(&carp_bin()?, Host::Gw1, &opts)?;
    wait_state(&gw1, 1, State::Master, Duration::from_secs(10))?;
    let expected = lab.mac(Host::Gw1, "lan")?;
    assert_answered_once_by(&lab, LAN_VIP, &expected, 3)?;
    lab.sh(Host::Client, &format!("ping -c 2 -i 0.2 -W 1 {LAN_VIP}"))?;
    Ok(())
}

#[test]
fn advert_send_errors_demote_the_whole_node() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = pair(&lab)?;
    // A queue of length 0 on gw1's WAN: the kernel refuses every frame gw1 sends there
    // (sendto fails with ENOBUFS). After three failed adverts gw1 demotes itself by 240, so
    // gw2 preempts the LAN VIP too.
    lab.sh(Host::Gw1, "tc qdisc replace dev wan root pfifo limit 0")?;
    let waited = wait_state(&gw2, 1, State::Master, Duration::from_secs(6));
    let status = gw1.status()?;
    waited.map_err(|e| e.context(format!("gw1: {status:?}\n{}", gw1.log())))?;
    wait_state(&gw2, 2, State::Master, Duration::from_secs(6))?;
    assert!(status.counters.send_errors >= 3, "{:?}", status.counters);
    assert_eq!(status.demotion, 240);
    assert!(
        gw1.log()
            .contains("advert send errors in a row: demoting by 240"),
        "{}",
        gw1.log()
    );
    // The queue is gone: gw1, a backup that sends no adverts, probes its send path, heals
    // and preempts back.
    lab.sh(Host::Gw1, "tc qdisc del dev wan root")?;
    wait_all(&gw1, State::Master, Duration::from_secs(10))
        .map_err(|e| e.context(format!("gw1 never healed: {:?}", gw1.status())))?;
    assert_eq!(gw1.status()?.demotion, 0);
    wait_all(&gw2, State::Backup, Duration::from_secs(2))?;
    assert!(
        gw1.log().contains("send-error demotion removed"),
        "{}",
        gw1.log()
    );
    Ok(())
}

/// A master whose XDP program goes with it (started the `ip netns exec` way, its bpffs
/// private) and whose VIPs stay on the interface: its kernel must still never answer ARP
/// for them, before or after the backup takes over.
#[test]
fn a_killed_master_that_lost_its_xdp_never_answers_arp_from_its_kernel() -> Result<()> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let gw1 = lab.start_carp_private_mounts(&bin, Host::Gw1, &NodeOptions::default())?;
    let gw2 = lab.start_carp(&bin, Host::Gw2, &backup_opts())?;
    wait_all(&gw1, State::Master, Duration::from_secs(10))?;
    wait_all(&gw2, State::Backup, Duration::from_secs(2))?;
    let gw1_mac = lab.mac(Host::Gw1, "lan")?;
    let log = lab.dir.join("probe-xdp-gone.log");
    let probe_pid =
        lab.arp_probe_background(&probe::ArpProbe::from_client(LAN_VIP, 20, 7000), &log)?;
    std::thread::sleep(Duration::from_millis(500));
    kill_hard(gw1.pid);
    // The premise: XDP went with the daemon's mounts, the VIP stayed on the interface.
    let link = lab.sh(Host::Gw1, "ip -d link show dev lan")?;
    assert!(!link.contains("xdp"), "XDP still attached: {link}");
    assert!(
        lab.sh(Host::Gw1, "ip -4 addr show dev lan")?
            .contains(LAN_VIP)
    );
    wait_state(&gw2, 1, State::Master, Duration::from_secs(6))?;
    assert!(
        carp_lab::wait_exit(probe_pid, Duration::from_secs(10)),
        "probe finished"
    );
    let exchanges = probe::parse(&std::fs::read_to_string(&log)?);
    assert!(exchanges.len() > 200, "probe ran: {}", exchanges.len());
    let from_gw1: Vec<_> = exchanges
        .iter()
        .filter(|e| e.replies.iter().any(|(_, mac)| *mac == gw1_mac))
        .collect();
    assert!(
        from_gw1.is_empty(),
        "gw1's kernel answered {} requests with its own MAC, first at {:?}",
        from_gw1.len(),
        from_gw1.first()
    );
    assert_never_two_answers(&exchanges);
    let last: Vec<&str> = exchanges.last().map_or(Vec::new(), |e| {
        e.replies.iter().map(|(_, mac)| mac.as_str()).collect()
    });
    assert_eq!(
        last,
        [VMAC_LAN],
        "gw2 answers with the virtual MAC at the end"
    );
    // The guard is carp's own table, and stays after the daemon's death.
    let table = lab.sh(Host::Gw1, "nft list table arp carp")?;
    assert!(table.contains(LAN_VIP) && table.contains("drop"), "{table}");
    Ok(())
}

/// Hitless restart: the master's daemon killed and started again at once finds its
/// heartbeat fresh and its VIPs held, and stays master: pings at 1,000/s through both VIPs
/// lose none, and the backup never moves.
#[test]
fn a_masters_daemon_restarted_at_once_keeps_its_vips_without_a_gap() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = pair(&lab)?;
    let gw1 = no_gap_across(&lab, gw1, &gw2, |gw1| {
        kill_hard(gw1.pid);
        lab.restart_carp(&carp_bin()?, gw1)
    })?;
    assert!(gw1.log().contains("hitless restart"), "{}", gw1.log());
    Ok(())
}

/// `carp upgrade` re-executes the master's daemon in place (same process, sockets handed
/// over, state sync on): no ping lost at 1,000/s, the backup never moves, the CLI answers
/// throughout and the sync session comes back.
#[test]
fn an_in_place_upgrade_of_the_master_loses_nothing() -> Result<()> {
    let lab = Lab::up()?;
    let with_sync = |base: NodeOptions| NodeOptions {
        sync_key: Some(carp_lab::SYNC_SECRET.into()),
        ..base
    };
    let (gw1, gw2) = carp_lab::cluster::pair_with(
        &lab,
        &with_sync(NodeOptions::default()),
        &with_sync(backup_opts()),
    )?;
    let sessions = wait_for(Duration::from_secs(15), || {
        gw2.status()
            .ok()?
            .sync
            .filter(|s| s.connected)
            .map(|s| s.sessions)
    })
    .context("sync never connected")?;
    let gw1 = no_gap_across(&lab, gw1, &gw2, |gw1| {
        let shown = carp_cli(&["upgrade", "--socket", &gw1.socket.to_string_lossy()])?;
        anyhow::ensure!(shown.contains("upgraded in place"), "{shown}");
        Ok(gw1.clone())
    })?;
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(gw1.pid as i32), None).is_ok(),
        "the same process runs on"
    );
    let log = gw1.log();
    assert!(log.contains("re-executing in place"), "{log}");
    assert!(log.contains("hitless restart"), "{log}");
    wait_for(Duration::from_secs(15), || {
        gw2.status()
            .ok()?
            .sync
            .filter(|s| s.connected && s.sessions > sessions)
    })
    .with_context(|| format!("sync never came back; gw1:\n{}", gw1.log()))?;
    Ok(())
}

/// Pings from the client to the server at 1,000/s through both VIPs while `disturb` does
/// something to gw1's daemon: none may be lost, gw1 must still be master and gw2 must never
/// have moved. Returns gw1 as `disturb` left it.
fn no_gap_across(
    lab: &Lab,
    gw1: Node,
    gw2: &Node,
    disturb: impl FnOnce(&Node) -> Result<Node>,
) -> Result<Node> {
    let backup_before = gw2.status()?;
    let log = lab
        .dir
        .join(format!("ping-no-gap-{}.log", carp_lab::unix_us()));
    let ping = lab.ping_background(Host::Client, SERVER_IP, 0.001, 4000, &log)?;
    std::thread::sleep(Duration::from_millis(1000));
    let started = Instant::now();
    let gw1 = disturb(&gw1)?;
    let took = started.elapsed();
    anyhow::ensure!(
        carp_lab::wait_exit(ping, Duration::from_secs(20)),
        "ping did not finish"
    );
    let report = carp_lab::ping::parse(&std::fs::read_to_string(&log)?);
    assert!(report.sent >= 3900, "{report:?}");
    assert_eq!(
        report.lost(),
        0,
        "{report:?} across {took:?}; gw1:\n{}",
        gw1.log()
    );
    wait_all(&gw1, State::Master, Duration::from_secs(1))?;
    let backup_after = gw2.status()?;
    for (before, after) in backup_before.vips.iter().zip(&backup_after.vips) {
        assert_eq!(after.state, State::Backup, "{after:?}");
        assert_eq!(after.since, before.since, "gw2 moved: {after:?}");
    }
    Ok(gw1)
}

/// `carp reload` applies a changed file to the running master: a new VIP comes up, a new
/// skew is advertised, a removed VIP is released cleanly; VIPs it does not change never move
/// (their `since` stays), pings through them lose none, and an invalid file is refused with
/// the field named, changing nothing.
#[test]
fn reload_applies_changes_and_disturbs_nothing_else() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = pair(&lab)?;
    let socket = gw1.socket.to_string_lossy().into_owned();
    let since = |node: &Node| -> Result<Vec<(u8, String)>> {
        Ok(node
            .status()?
            .vips
            .into_iter()
            .filter(|v| v.vhid <= 2)
            .map(|v| (v.vhid, v.since))
            .collect())
    };
    let (gw1_since, gw2_since) = (since(&gw1)?, since(&gw2)?);
    let log = lab.dir.join("ping-reload.log");
    let ping = lab.ping_background(Host::Client, SERVER_IP, 0.01, 1000, &log)?;
    std::thread::sleep(Duration::from_millis(500));
    // A third VIP, on gw1 only: it becomes master of it once its master-down time passes.
    let mut opts = NodeOptions::default();
    opts.vips.push(("lan", 3, "198.18.1.5/24".into()));
    lab.write_config(Host::Gw1, &opts)?;
    let shown = carp_cli(&["reload", "--socket", &socket])?;
    assert!(
        shown.contains("1 VIPs added, 0 removed, 0 retuned, 2 unchanged"),
        "{shown}"
    );
    wait_state(&gw1, 3, State::Master, Duration::from_secs(6))?;
    assert_answered_once_by(&lab, "198.18.1.5", "00:00:5e:00:01:03", 3)?;
    // An invalid file: refused, field named, exit 2, nothing changed.
    let mut bad = opts.clone();
    bad.vips.push(("lan", 1, "198.18.1.6/24".into()));
    lab.write_config(Host::Gw1, &bad)?;
    let (code, stderr) = carp_lab::cluster::carp_cli_refused(&["reload", "--socket", &socket])?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("vip[3].vhid: vhid 1 is used twice"),
        "{stderr}"
    );
    assert_eq!(gw1.status()?.vips.len(), 3);
    // The third VIP goes again and gw1's skew changes: released cleanly, advertised at once.
    let retuned = NodeOptions {
        advskew: 20,
        ..NodeOptions::default()
    };
    lab.write_config(Host::Gw1, &retuned)?;
    let shown = carp_cli(&["reload", "--socket", &socket])?;
    assert!(
        shown.contains("0 VIPs added, 1 removed, 2 retuned, 0 unchanged"),
        "{shown}"
    );
    let status = gw1.status()?;
    assert!(status.vips.iter().all(|v| v.vhid != 3), "{status:?}");
    assert!(status.vips.iter().all(|v| v.advskew == 20), "{status:?}");
    assert!(
        !lab.sh(Host::Gw1, "ip -4 addr show dev lan")?
            .contains("198.18.1.5")
    );
    let answers = carp_lab::cluster::arp_answers(&lab, "198.18.1.5", 3)?;
    assert!(
        answers.iter().all(Vec::is_empty),
        "the removed VIP still answered: {answers:?}"
    );
    assert!(
        !lab.sh(Host::Gw1, "nft list table arp carp")?
            .contains("198.18.1.5"),
        "the ARP guard follows the VIPs"
    );
    assert!(
        carp_lab::wait_exit(ping, Duration::from_secs(20)),
        "ping finished"
    );
    let report = carp_lab::ping::parse(&std::fs::read_to_string(&log)?);
    assert!(report.sent >= 990, "{report:?}");
    assert_eq!(report.lost(), 0, "{report:?}");
    assert_eq!(since(&gw1)?, gw1_since, "gw1's VIPs moved");
    assert_eq!(since(&gw2)?, gw2_since, "gw2's VIPs moved");
    wait_all(&gw1, State::Master, Duration::from_secs(1))?;
    // SIGHUP does the same (systemd's ExecReload).
    lab.write_config(
        Host::Gw1,
        &NodeOptions {
            advskew: 30,
            ..NodeOptions::default()
        },
    )?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(gw1.pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    wait_for(Duration::from_secs(5), || {
        gw1.status()
            .ok()
            .filter(|s| s.vips.iter().all(|v| v.advskew == 30))
    })
    .context("SIGHUP did not reload")?;
    assert_eq!(since(&gw1)?, gw1_since, "gw1's VIPs moved on SIGHUP");
    Ok(())
}
