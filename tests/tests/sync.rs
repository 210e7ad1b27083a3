//! State sync in the namespace lab, with outbound NAT to the WAN VIP on both gateways: the
//! WAN server pushes data to dozens of LAN client connections through the master; they must
//! survive its death, a restarted backup must get them back by bulk update, the sync link
//! may flap (flows that end meanwhile are deleted on the peer when it returns), connections
//! on a reset connection's reused ports are new ones, and the sync
//! port shrugs off wrong keys and garbage. The same failover without sync must break them, so
//! the survival test is known to be able to fail. Needs root.

use anyhow::{Context, Result, bail};
use carp::{carp::fsm::State, sync::service::SyncStatus};
use carp_lab::{
    Host, Lab, Node, NodeOptions, SYNC_SECRET, carp_bin,
    cluster::{backup_opts, pair_with, wait_all},
    end_process, kill_hard, streams, unix_us, wait_for,
};
use std::time::Duration;

const CONNECTIONS: usize = 40;

/// State sync on, and carp's managed NAT of the LAN to the WAN VIP.
fn sync_opts(base: NodeOptions) -> NodeOptions {
    NodeOptions {
        sync_key: Some(SYNC_SECRET.into()),
        nat: true,
        ..base
    }
}

fn sync_status(node: &Node) -> Result<SyncStatus> {
    node.status()?.sync.context("the daemon reports no sync")
}

/// Waits until `node`'s sync session is up and its first bulk update is done.
#[track_caller]
fn wait_synced(node: &Node) -> Result<()> {
    wait_for(Duration::from_secs(15), || {
        sync_status(node)
            .ok()
            .filter(|s| s.connected && !s.demoted && s.bulk == "done")
    })
    .map(drop)
    .with_context(|| format!("{} never synced; log:\n{}", node.name, node.log()))
}

/// Connections in `host`'s kernel conntrack translated to the WAN VIP.
fn natted_conntrack(lab: &Lab, host: Host) -> Result<usize> {
    let out = lab.output(host, &["conntrack", "-L", "-p", "tcp", "--dport", "5001"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("ESTABLISHED") && l.contains(&format!("dst={}", carp_lab::WAN_VIP)))
        .count())
}

/// Both nodes' sync status, logs and conntrack tables, for a failure message.
fn diagnose(lab: &Lab, nodes: &[&Node]) -> String {
    let mut out = String::new();
    for node in nodes {
        let conntrack = lab
            .output(node.host, &["conntrack", "-L"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let log = node.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        out.push_str(&format!(
            "--- {} sync {:?}\nconntrack:\n{}\nlog tail:\n{}\n",
            node.name,
            sync_status(node).ok(),
            conntrack.lines().take(6).collect::<Vec<_>>().join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    out
}

/// gw1 master, gw2 backup, both with or without sync, carp's NAT on, the server running.
fn cluster(lab: &Lab, sync: bool) -> Result<(Node, Node)> {
    streams::start_server(lab)?;
    let nat = |base: NodeOptions| NodeOptions { nat: true, ..base };
    let (o1, o2) = if sync {
        (sync_opts(NodeOptions::default()), sync_opts(backup_opts()))
    } else {
        (nat(NodeOptions::default()), nat(backup_opts()))
    };
    let (gw1, gw2) = pair_with(lab, &o1, &o2)?;
    if sync {
        wait_synced(&gw1)?;
        wait_synced(&gw2)?;
    }
    Ok((gw1, gw2))
}

/// The master dies the hard way (daemon SIGKILLed, both links cut) and the survivor takes
/// both VIPs; returns when it died.
fn take_over(lab: &Lab, dead: &Node, survivor: &Node) -> Result<u128> {
    let at = unix_us();
    kill_hard(dead.pid);
    lab.sh(dead.host, "ip link set lan down; ip link set wan down")?;
    wait_all(survivor, State::Master, Duration::from_secs(6))?;
    Ok(at)
}

/// Waits until `host` holds at least `want` NATed connections in conntrack.
#[track_caller]
fn wait_conntrack(lab: &Lab, host: Host, want: usize) -> Result<()> {
    wait_for(Duration::from_secs(10), || {
        natted_conntrack(lab, host).ok().filter(|n| *n >= want)
    })
    .map(drop)
    .with_context(|| {
        format!(
            "{host:?} has {:?} of {want} NATed connections in conntrack",
            natted_conntrack(lab, host)
        )
    })
}

/// Takes gw1's sync link down until `peer` notices; returns the sessions it had seen.
#[track_caller]
fn cut_sync_link(lab: &Lab, peer: &Node) -> Result<u64> {
    let sessions = sync_status(peer)?.sessions;
    lab.sh(Host::Gw1, "ip link set sync down")?;
    wait_for(Duration::from_secs(10), || {
        sync_status(peer).ok().filter(|s| !s.connected)
    })
    .context("the peer never noticed the cut")?;
    Ok(sessions)
}

/// Brings gw1's sync link back and waits for a new session on `peer`.
#[track_caller]
fn restore_sync_link(lab: &Lab, peer: &Node, sessions: u64) -> Result<()> {
    lab.sh(Host::Gw1, "ip link set sync up")?;
    wait_for(Duration::from_secs(10), || {
        sync_status(peer)
            .ok()
            .filter(|s| s.connected && s.sessions > sessions)
    })
    .map(drop)
    .context("the session never came back")
}

/// Flows in `node`'s pinned XDP flow map learned from the peer with an endpoint on `port`.
fn learned_in_map(node: &Node, port: u16) -> Result<usize> {
    use aya::maps::{HashMap, Map, MapData};
    use carp_common::flow::{FLOW_MAP, FlowEntry, FlowKey};
    let pin = format!("/sys/fs/bpf/carp/{}/{FLOW_MAP}", node.name);
    let data = MapData::from_pin(&pin).with_context(|| pin.clone())?;
    let map: HashMap<_, FlowKey, FlowEntry> = HashMap::try_from(Map::LruHashMap(data))?;
    let mut count = 0;
    for item in map.iter() {
        let (key, entry) = item?;
        if entry.learned == 1 && key.port.contains(&port.to_be_bytes()) {
            count += 1;
        }
    }
    Ok(count)
}

/// Kills the master mid-stream and returns the client's report and the kill time.
fn failover_under_load(
    lab: &Lab,
    gw1: &Node,
    gw2: &Node,
    synced: bool,
) -> Result<(streams::Report, u128)> {
    let client = streams::start_client(lab, CONNECTIONS, 14)?;
    std::thread::sleep(Duration::from_secs(4));
    if synced {
        // Every connection, with its NAT mapping, is in the backup's kernel already.
        wait_conntrack(lab, Host::Gw2, CONNECTIONS).with_context(|| diagnose(lab, &[gw1, gw2]))?;
        // `carp flows` on the backup lists them with their NAT, learned from the peer.
        let flows = carp::control::call(&gw2.socket, &carp::control::Request::Flows)?
            .flows
            .context("no flows")?;
        let natted = flows
            .iter()
            .filter(|f| {
                f.dport == streams::PORT
                    && f.reply_dst == carp_lab::WAN_VIP
                    && f.origin == carp::sync::merge::Origin::Peer
            })
            .count();
        assert!(
            natted >= CONNECTIONS,
            "{natted} NATed flows listed: {flows:?}"
        );
        // Both lag histograms counted the flows on their way: sent here, installed there.
        let sent = sync_status(gw1)?.send_lag;
        let installed = sync_status(gw2)?.install.install_lag;
        assert!(
            sent.count() > 0 && installed.count() > 0,
            "{sent:?} {installed:?}"
        );
        // XDP's map on the backup holds both sides of each, marked learned.
        let in_map = learned_in_map(gw2, streams::PORT)?;
        assert!(
            in_map >= 2 * CONNECTIONS,
            "{in_map} learned XDP flows on port {}",
            streams::PORT
        );
    }
    let killed = take_over(lab, gw1, gw2)?;
    Ok((client.finish()?, killed))
}

/// Data must flow on every connection after the takeover (within 4 s of the kill), and
/// none may have been reset.
fn assert_all_survived(report: &streams::Report, killed: u128) {
    let after = killed + 4_000_000;
    // When the kill came (in s from the client's start) says whether the client ran long enough.
    let at = |us: u128| format!("{:.1} s", us.saturating_sub(report.started_us) as f64 / 1e6);
    let timing = format!(
        "killed at {}, data required after {}, client ran to {}",
        at(killed),
        at(after),
        at(report.ends_us)
    );
    eprintln!("{timing}");
    let broken = report.broken_after(after);
    assert!(
        broken.is_empty(),
        "{} of {} connections broke ({timing}): {broken:?}",
        broken.len(),
        report.tcp.len()
    );
    assert!(
        report.udp_last_rx_us > after,
        "the UDP flow stopped ({timing}): {report:?}"
    );
}

#[test]
fn connections_and_nat_survive_the_masters_death() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = cluster(&lab, true)?;
    let (report, killed) = failover_under_load(&lab, &gw1, &gw2, true)?;
    assert_all_survived(&report, killed);
    let status = sync_status(&gw2)?;
    assert_eq!(status.install.conntrack_errors, 0, "{status:?}");
    assert_eq!(status.install.map_errors, 0, "{status:?}");
    assert!(
        status.install.conntrack_created >= CONNECTIONS as u64,
        "{status:?}"
    );
    Ok(())
}

/// A planned stop of the master (SIGTERM) with state sync: it hands over before it lets go,
/// waiting while the peer installs the flows it got, and no connection notices.
#[test]
fn connections_survive_a_planned_stop_of_the_master() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = cluster(&lab, true)?;
    let client = streams::start_client(&lab, CONNECTIONS, 10)?;
    std::thread::sleep(Duration::from_secs(4));
    wait_conntrack(&lab, Host::Gw2, CONNECTIONS).with_context(|| diagnose(&lab, &[&gw1, &gw2]))?;
    let stopped = unix_us();
    end_process(gw1.pid, Duration::from_secs(5));
    wait_all(&gw2, State::Master, Duration::from_secs(1))?;
    let report = client.finish()?;
    assert_all_survived(&report, stopped);
    println!(
        "UDP across the stop: {} of {} datagrams received",
        report.udp_received, report.udp_sent
    );
    let handed_over = gw1
        .log()
        .matches("a peer took over from our bow-out")
        .count();
    assert_eq!(handed_over, 2, "gw1:\n{}", gw1.log());
    Ok(())
}

/// A client that reset its connections and opens them again from the same ports at once (a
/// restarted client, a busy NAT) makes new connections on the old tuples: they are synced as
/// new ones, not taken for more of the ended ones, and survive the master's death. This is
/// what a chaos soak found: ports reused by chance were not synced, and a takeover reset them.
#[test]
fn connections_reusing_reset_connections_ports_survive_the_masters_death() -> Result<()> {
    const FIRST_PORT: u16 = 40100;
    let lab = Lab::up()?;
    let (gw1, gw2) = cluster(&lab, true)?;
    let before = streams::start_client_from(&lab, CONNECTIONS, 2, FIRST_PORT)?.finish()?;
    assert!(
        before.tcp.iter().all(|s| s.bytes > 0 && s.error == "-"),
        "the first connections ran: {before:?}"
    );
    let client = streams::start_client_from(&lab, CONNECTIONS, 14, FIRST_PORT)?;
    std::thread::sleep(Duration::from_secs(4));
    wait_conntrack(&lab, Host::Gw2, CONNECTIONS).with_context(|| diagnose(&lab, &[&gw1, &gw2]))?;
    let killed = take_over(&lab, &gw1, &gw2)?;
    assert_all_survived(&client.finish()?, killed);
    Ok(())
}

/// The control: the same lab and failover without sync resets the connections.
#[test]
fn without_sync_the_same_failover_breaks_connections() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = cluster(&lab, false)?;
    let (report, killed) = failover_under_load(&lab, &gw1, &gw2, false)?;
    let broken = report.broken_after(killed + 4_000_000);
    assert!(
        broken.len() == report.tcp.len(),
        "without sync only {} of {} connections broke",
        broken.len(),
        report.tcp.len()
    );
    Ok(())
}

#[test]
fn restarted_backup_gets_every_flow_back_by_bulk_before_it_may_master() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = cluster(&lab, true)?;
    let client = streams::start_client(&lab, CONNECTIONS, 20)?;
    std::thread::sleep(Duration::from_secs(3));
    wait_conntrack(&lab, Host::Gw2, CONNECTIONS)?;
    // The backup crashes and loses its kernel state too.
    kill_hard(gw2.pid);
    lab.sh(Host::Gw2, "conntrack -F 2>/dev/null; true")?;
    assert_eq!(natted_conntrack(&lab, Host::Gw2)?, 0);
    let bin = carp_bin()?;
    let gw2 = lab.restart_carp(&bin, &gw2)?;
    wait_synced(&gw2)?;
    let log = gw2.log();
    let restarted = log.rfind("carp running").context("no start line")?;
    assert!(
        log[restarted..].contains("bulk update complete"),
        "no bulk update after the restart:\n{log}"
    );
    // Everything came back by the bulk update, then the master dies.
    wait_conntrack(&lab, Host::Gw2, CONNECTIONS)?;
    let killed = take_over(&lab, &gw1, &gw2)?;
    assert_all_survived(&client.finish()?, killed);
    Ok(())
}

#[test]
fn sync_link_cut_and_restored_resyncs_without_loss() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = cluster(&lab, true)?;
    let sessions = cut_sync_link(&lab, &gw2)?;
    // Connections born while the link is down reach gw2 only by the resync.
    let client = streams::start_client(&lab, CONNECTIONS, 16)?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        natted_conntrack(&lab, Host::Gw2)?,
        0,
        "nothing can arrive while cut"
    );
    restore_sync_link(&lab, &gw2, sessions)?;
    wait_conntrack(&lab, Host::Gw2, CONNECTIONS)?;
    // A resync after a flap does not demote anyone: the VIPs stayed put.
    assert_eq!(gw1.state(1), Some(State::Master));
    let killed = take_over(&lab, &gw1, &gw2)?;
    assert_all_survived(&client.finish()?, killed);
    Ok(())
}

#[test]
fn flows_that_end_while_the_sync_link_is_down_are_deleted_on_the_peer_when_it_returns() -> Result<()>
{
    ended_while_the_link_is_down(false)
}

/// The deletes waiting for the peer are kept in the state directory: a crash of the daemon
/// that holds them loses none.
#[test]
fn deletes_waiting_for_the_peer_survive_a_daemon_crash() -> Result<()> {
    ended_while_the_link_is_down(true)
}

/// UDP flows of the lab client: they have no end, so they stay until they time out.
const UDP_FLOWS: u64 = 1;

/// The client's connections end while the sync link is down (and, if `crash`, gw1's daemon
/// then dies and starts again); once the link is back they are gone from gw2 too.
fn ended_while_the_link_is_down(crash: bool) -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = cluster(&lab, true)?;
    let (sessions, waiting) = end_connections_during_a_cut(&lab, &gw1, &gw2)?;
    let gw1 = if crash {
        kill_hard(gw1.pid);
        let gw1 = lab.restart_carp(&carp_bin()?, &gw1)?;
        let status = wait_for(Duration::from_secs(10), || sync_status(&gw1).ok())
            .with_context(|| format!("gw1 did not come back; log:\n{}", gw1.log()))?;
        assert_eq!(
            status.deletes_waiting, waiting,
            "lost in the crash: {status:?}"
        );
        gw1
    } else {
        gw1
    };
    restore_sync_link(&lab, &gw2, sessions)?;
    assert_ended_flows_gone_from_gw2(&lab, &gw1, &gw2)
}

/// Deletes sent on reconnect stay kept until the peer shows it read them. Here gw2 reads
/// and throws away every frame (the test hook: frames lost in flight), and gw1's daemon is
/// killed right after the reconnect: its restart still tells gw2.
#[test]
fn deletes_sent_on_reconnect_survive_a_daemon_killed_right_after_it() -> Result<()> {
    let lab = Lab::up()?;
    streams::start_server(&lab)?;
    let hooked = NodeOptions {
        test_hooks: true,
        ..sync_opts(backup_opts())
    };
    let (gw1, gw2) = pair_with(&lab, &sync_opts(NodeOptions::default()), &hooked)?;
    wait_synced(&gw1)?;
    wait_synced(&gw2)?;
    let (sessions, waiting) = end_connections_during_a_cut(&lab, &gw1, &gw2)?;
    test_hook(&gw2, carp::control::TestHook::DiscardSyncFrames)?;
    restore_sync_link(&lab, &gw2, sessions)?;
    // gw1 sent them and gw2 threw them away; past gw1's next tick they are still kept.
    std::thread::sleep(Duration::from_millis(1500));
    let status = sync_status(&gw1)?;
    assert!(status.connected, "{status:?}");
    assert_eq!(
        status.deletes_waiting, waiting,
        "taken as delivered: {status:?}"
    );
    kill_hard(gw1.pid);
    test_hook(&gw2, carp::control::TestHook::AcceptSyncFrames)?;
    let gw1 = lab.restart_carp(&carp_bin()?, &gw1)?;
    assert_ended_flows_gone_from_gw2(&lab, &gw1, &gw2)
}

/// Cuts the sync link, ends the client's connections, and waits until gw1 keeps their
/// deletes for gw2; returns gw2's sessions before the cut and the deletes waiting.
fn end_connections_during_a_cut(lab: &Lab, gw1: &Node, gw2: &Node) -> Result<(u64, u64)> {
    let client = streams::start_client(lab, CONNECTIONS, 6)?;
    wait_conntrack(lab, Host::Gw2, CONNECTIONS)?;
    let sessions = cut_sync_link(lab, gw2)?;
    // The connections end while gw2 cannot hear of it: gw2 still holds them all.
    client.finish()?;
    let waiting = wait_for(Duration::from_secs(10), || {
        sync_status(gw1).ok().filter(|s| s.flows_local == UDP_FLOWS)
    })
    .with_context(|| {
        format!(
            "gw1 never saw the connections end\n{}",
            diagnose(lab, &[gw1, gw2])
        )
    })?
    .deletes_waiting;
    assert!(waiting >= CONNECTIONS as u64, "{waiting} deletes waiting");
    assert_eq!(natted_conntrack(lab, Host::Gw2)?, CONNECTIONS);
    Ok((sessions, waiting))
}

/// Once the link is back, the ended connections go from gw2's table and kernel, and gw2's
/// bulk answer does not bring them back to gw1.
fn assert_ended_flows_gone_from_gw2(lab: &Lab, gw1: &Node, gw2: &Node) -> Result<()> {
    wait_for(Duration::from_secs(10), || {
        let gone = natted_conntrack(lab, Host::Gw2).ok()? == 0
            && sync_status(gw2).ok()?.flows_held == UDP_FLOWS;
        gone.then_some(())
    })
    .with_context(|| format!("ended flows linger on gw2\n{}", diagnose(lab, &[gw1, gw2])))?;
    wait_synced(gw1)?;
    let status = sync_status(gw1)?;
    assert_eq!(status.flows_held, UDP_FLOWS, "nothing came back to gw1");
    assert_eq!(status.deletes_waiting, 0, "{status:?}");
    Ok(())
}

/// Injects a fault through `node`'s control socket (it runs with test hooks).
fn test_hook(node: &Node, hook: carp::control::TestHook) -> Result<()> {
    let answer = carp::control::call(&node.socket, &carp::control::Request::TestHook { hook })?;
    anyhow::ensure!(answer.ok, "{hook:?} refused: {answer:?}");
    Ok(())
}

#[test]
fn wrong_key_and_garbage_are_refused_and_the_session_carries_on() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = cluster(&lab, true)?;
    let before = sync_status(&gw1)?;
    // Garbage from the peer's address: dropped, counted, the session stays.
    for script in [
        "exec 3<>/dev/tcp/198.18.3.1/8370 && printf '\\000\\040garbage garbage garbage garbage' >&3; sleep 0.3",
        "exec 3<>/dev/tcp/198.18.3.1/8370 && head -c 3000 /dev/urandom >&3; sleep 0.3",
    ] {
        let out = lab.output(Host::Gw2, &["bash", "-c", script])?;
        assert!(out.status.success(), "{script}: {out:?}");
    }
    let after = wait_for(Duration::from_secs(8), || {
        sync_status(&gw1)
            .ok()
            .filter(|s| s.refused >= before.refused + 2)
    })
    .context("garbage was not counted")?;
    assert!(after.connected, "{after:?}");
    assert_eq!(
        after.sessions, before.sessions,
        "the legitimate session was replaced"
    );
    assert!(after.last_error.is_some());
    assert_eq!(gw1.state(1), Some(State::Master));
    // A peer with the wrong key never gets a session.
    kill_hard(gw2.pid);
    let bin = carp_bin()?;
    let wrong = NodeOptions {
        sync_key: Some("not the lab's secret at all".into()),
        ..backup_opts()
    };
    let gw2 = lab.start_carp(&bin, Host::Gw2, &wrong)?;
    // gw1 dials; gw2 cannot decrypt its handshake and says why.
    let refused = wait_for(Duration::from_secs(10), || {
        sync_status(&gw2).ok().filter(|s| s.refused > 0)
    })
    .context("the wrong key was not refused")?;
    assert!(
        refused
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("wrong key"),
        "{refused:?}"
    );
    let gw2_status = sync_status(&gw2)?;
    if gw2_status.connected || sync_status(&gw1)?.connected {
        bail!("a peer with the wrong key got a session: {gw2_status:?}");
    }
    assert!(
        gw2_status.demoted,
        "without its bulk update gw2 stays demoted"
    );
    Ok(())
}

/// A panic in gw2's installer thread (through the test hook) shows in its status, and the
/// thread goes on: flows synced afterwards still reach gw2's kernel. Without the restart
/// they would not (the thread died and nobody noticed).
#[test]
fn a_panicking_installer_is_seen_and_goes_on_installing() -> Result<()> {
    let lab = Lab::up()?;
    streams::start_server(&lab)?;
    let hooked = NodeOptions {
        test_hooks: true,
        ..sync_opts(backup_opts())
    };
    let (gw1, gw2) = pair_with(&lab, &sync_opts(NodeOptions::default()), &hooked)?;
    wait_synced(&gw1)?;
    wait_synced(&gw2)?;
    test_hook(&gw2, carp::control::TestHook::PanicInstaller)?;
    let installer = wait_for(Duration::from_secs(5), || {
        sync_status(&gw2)
            .ok()?
            .workers
            .into_iter()
            .find(|w| w.name == "installer" && w.panics == 1)
    })
    .with_context(|| format!("the panic was not seen: {:?}", sync_status(&gw2)))?;
    assert!(installer.alive, "{installer:?}");
    assert!(
        installer
            .last_panic
            .as_deref()
            .is_some_and(|p| p.contains("test hook")),
        "{installer:?}"
    );
    let shown =
        carp_lab::cluster::carp_cli(&["status", "--socket", &gw2.socket.to_string_lossy()])?;
    assert!(
        shown.contains("thread installer: running, 1 panics"),
        "{shown}"
    );
    // Flows born after the panic reach gw2's conntrack.
    let client = streams::start_client(&lab, CONNECTIONS, 4)?;
    wait_conntrack(&lab, Host::Gw2, CONNECTIONS)
        .map_err(|e| e.context(diagnose(&lab, &[&gw1, &gw2])))?;
    client.finish()?;
    // Hooks are refused by a daemon started without them.
    let hook = carp::control::Request::TestHook {
        hook: carp::control::TestHook::PanicInstaller,
    };
    let refused = carp::control::call(&gw1.socket, &hook)?;
    assert!(
        !refused.ok
            && refused
                .error
                .as_deref()
                .unwrap_or("")
                .contains("test hooks are off"),
        "{refused:?}"
    );
    Ok(())
}

/// Over a sync link losing 20% of its frames with 50 ms of delay each way, the backup still
/// gets every connection into its kernel, and they survive the master's death.
#[test]
fn sync_converges_over_a_lossy_link_and_connections_survive() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = cluster(&lab, true)?;
    let forwarder = lab.impair_sync(&carp_lab::syncbench::LOSSY_LINK)?;
    let client = streams::start_client(&lab, CONNECTIONS, 16)?;
    wait_for(Duration::from_secs(20), || {
        natted_conntrack(&lab, Host::Gw2)
            .ok()
            .filter(|n| *n >= CONNECTIONS)
    })
    .with_context(|| format!("never converged\n{}", diagnose(&lab, &[&gw1, &gw2])))?;
    let killed = take_over(&lab, &gw1, &gw2)?;
    let report = client.finish()?;
    lab.heal_sync(forwarder)?;
    assert_all_survived(&report, killed);
    Ok(())
}

/// The master hands its VIPs to the backup for a few seconds (maintenance) while the server
/// pushes data, then takes them back: every connection survives the return, though its TCP
/// windows moved on while the backup carried it (the chaos soak found them stalled: the
/// returning master's kernel held them to the old windows).
#[test]
fn connections_survive_the_vips_coming_back() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = cluster(&lab, true)?;
    let client = streams::start_client(&lab, CONNECTIONS, 16)?;
    wait_conntrack(&lab, Host::Gw2, CONNECTIONS)?;
    let socket = gw1.socket.to_string_lossy().into_owned();
    carp_lab::cluster::carp_cli(&["maintenance", "on", "--socket", &socket])?;
    wait_all(&gw2, State::Master, Duration::from_secs(3))?;
    // 200 KiB a connection through gw2, far past any window gw1's kernel saw.
    std::thread::sleep(Duration::from_secs(4));
    carp_lab::cluster::carp_cli(&["maintenance", "off", "--socket", &socket])?;
    wait_all(&gw1, State::Master, Duration::from_secs(3))?;
    let back = unix_us();
    let report = client.finish()?;
    assert_all_survived(&report, back);
    Ok(())
}

/// carp's managed NAT: the same `ip carp` table on both nodes, the client's connections leave
/// as the WAN VIP, the table outlives a stopped daemon (NATed traffic must not break on a
/// restart), and `carp nat flush` removes it without touching other tables.
#[test]
fn managed_nat_translates_to_the_wan_vip_on_both_nodes_and_outlives_the_daemon() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = cluster(&lab, true)?;
    let (t1, t2) = (
        carp_lab::cluster::nat_rules(&lab, Host::Gw1)?,
        carp_lab::cluster::nat_rules(&lab, Host::Gw2)?,
    );
    assert_eq!(t1, t2, "the nodes' NAT differs");
    assert!(t1.contains(r#""snat":{"addr":"198.18.2.1"}"#), "{t1}");
    // Another table on the node is never touched.
    lab.sh(Host::Gw1, "nft add table ip operator_own")?;
    let client = streams::start_client(&lab, 4, 3)?;
    wait_conntrack(&lab, Host::Gw1, 4)?;
    let seen = lab.sh(Host::Server, "ss -tnH state established")?;
    assert!(
        seen.lines()
            .filter(|l| l.contains(&format!("{}:", carp_lab::WAN_VIP)))
            .count()
            >= 4,
        "the server does not see the WAN VIP: {seen}"
    );
    client.finish()?;
    carp_lab::end_process(gw1.pid, Duration::from_secs(5));
    assert!(
        lab.sh(Host::Gw1, "nft list table ip carp")?
            .contains("snat to 198.18.2.1"),
        "the table went with the daemon"
    );
    let out = lab.output(Host::Gw1, &[&carp_bin()?.to_string_lossy(), "nat", "flush"])?;
    assert!(out.status.success(), "{out:?}");
    assert!(
        lab.output(Host::Gw1, &["nft", "list", "table", "ip", "carp"])?
            .status
            .code()
            != Some(0)
    );
    lab.sh(Host::Gw1, "nft list table ip operator_own")?;
    drop(gw2);
    Ok(())
}
