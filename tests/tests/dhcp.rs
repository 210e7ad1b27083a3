//! DHCP failover in the namespace lab, with real Kea on both gateways (run by carp; the
//! secondary's `[[dhcp]]` arrives by config sync) and a real client (dhclient): a lease with
//! the VIP as router and DNS, replicated to the secondary within a second; planned failover
//! through `carp maintenance`; the primary's death, after which the client keeps its address
//! from the secondary; `carp leases` naming the node that served each; Kea run by a service
//! manager instead, configured and reloaded by carp; a changed `[[dhcp]]` handed to the
//! running Kea without a restart; a partner Kea that never answers, which holds up `carp
//! maintenance` but not the daemon; and the control, two Kea servers without the HA hook,
//! which hand the same address out twice. Needs root.

use anyhow::{Context, Result, ensure};
use carp::carp::fsm::State;
use carp::dhcp::{
    LeaseRow,
    kea_config::{self, HaRole, KeaSetup},
    scope::DhcpScope,
};
use carp_lab::{
    CLIENT_IP, ConfigSyncPart, Host, LAN_VIP, Lab, Node, NodeOptions, SERVER_IP, SYNC_SECRET,
    carp_bin,
    cluster::{backup_opts, carp_cli, wait_all},
    dhcp::{self, ClientLease},
    end_process, kill_hard, traffic_bin, wait_for,
};
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

const GW1_LAN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const GW2_LAN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
/// The pool a reload changes `[[dhcp]]` to, beside the lab's own.
const NEW_POOL: &str = "198.18.1.200-198.18.1.220";

/// The primary: VIPs, DHCP, and both pushed to the secondary by config sync.
fn primary() -> NodeOptions {
    NodeOptions {
        sync_key: Some(SYNC_SECRET.into()),
        dhcp: true,
        config_sync: ConfigSyncPart::Push,
        ..NodeOptions::default()
    }
}

/// The secondary: only its own sections; VIPs and `[[dhcp]]` come from the primary, its
/// skew +100 makes it Kea's standby.
fn secondary() -> NodeOptions {
    NodeOptions {
        sync_key: Some(SYNC_SECRET.into()),
        config_sync: ConfigSyncPart::Accept,
        ..NodeOptions::default()
    }
}

fn leases(node: &Node) -> Vec<LeaseRow> {
    let socket = node.socket.to_string_lossy().into_owned();
    carp_cli(&["leases", "--json", "--socket", &socket])
        .ok()
        .and_then(|out| serde_json::from_str(&out).ok())
        .unwrap_or_default()
}

/// The primary and the secondary started, their Kea pair in hot-standby.
fn kea_pair(lab: &Lab) -> Result<(Node, Node)> {
    let bin = carp_bin()?;
    let gw1 = lab.start_carp(&bin, Host::Gw1, &primary())?;
    let gw2 = lab.start_carp(&bin, Host::Gw2, &secondary())?;
    wait_ha(&gw1, "hot-standby", Duration::from_secs(30))?;
    wait_ha(&gw2, "hot-standby", Duration::from_secs(10))?;
    Ok((gw1, gw2))
}

#[track_caller]
fn wait_ha(node: &Node, state: &str, within: Duration) -> Result<()> {
    wait_for(within, || (dhcp::kea_state(node) == state).then_some(())).with_context(|| {
        format!(
            "{}'s Kea is `{}`, not `{state}`: {:?}",
            node.name,
            dhcp::kea_state(node),
            node.status().map(|s| s.dhcp)
        )
    })
}

/// The node `carp leases` on `node` says answered `lease`'s last transaction.
fn served_by(node: &Node, lease: &ClientLease) -> String {
    leases(node)
        .into_iter()
        .find(|l| l.address == lease.address.to_string())
        .map_or_else(|| "not listed".into(), |l| l.server)
}

/// `served_by` once it names `expected`, or as it stands after two of the supervisor's
/// once-a-second looks at Kea's HA state: who serves is noted from those looks, so a lease
/// taken just after a change is attributed once the next look has seen the change.
fn served_by_after_a_look(node: &Node, lease: &ClientLease, expected: &str) -> String {
    wait_for(Duration::from_secs(2), || {
        Some(served_by(node, lease)).filter(|server| server == expected)
    })
    .unwrap_or_else(|| served_by(node, lease))
}

#[test]
fn leases_follow_the_master() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = kea_pair(&lab)?;
    let status = gw1.status()?.dhcp.context("no DHCP in gw1's status")?;
    assert!(status.running && status.role == "primary", "{status:?}");
    assert_eq!(gw2.status()?.dhcp.context("gw2")?.role, "standby");

    // A client gets a lease from the pool, router and DNS the LAN VIP, from the primary.
    let (a, _) = dhcp::request(&lab, "eth0", Duration::from_secs(15))?;
    assert!(dhcp::in_pool(a.address), "{a:?}");
    assert_eq!((a.routers.as_str(), a.dns.as_str()), (LAN_VIP, LAN_VIP));
    assert_eq!(a.server, GW1_LAN, "the primary answers");
    // ... and the secondary holds it within a second.
    let since = Instant::now();
    let held = |node: &Node, lease: &ClientLease| {
        leases(node)
            .iter()
            .any(|l| l.address == lease.address.to_string() && l.state == "active")
    };
    wait_for(Duration::from_secs(1), || held(&gw2, &a).then_some(()))
        .with_context(|| format!("gw2 does not hold {a:?} 1 s later: {:?}", leases(&gw2)))?;
    eprintln!("lease replicated to the secondary in {:?}", since.elapsed());
    // Both name the primary as the server that answered.
    assert_eq!(served_by_after_a_look(&gw1, &a, &gw1.name), gw1.name);
    assert_eq!(served_by_after_a_look(&gw2, &a, &gw1.name), gw1.name);
    // carp status reads Kea's lease count once a second.
    let counted = |node: &Node| {
        node.status()
            .ok()
            .and_then(|s| s.dhcp)
            .map_or(0, |d| d.scopes[0].leases)
    };
    wait_for(Duration::from_secs(3), || {
        (counted(&gw1) == 1).then_some(())
    })
    .with_context(|| format!("status counts {} leases", counted(&gw1)))?;

    // Planned failover: gw1's Kea goes into maintenance through gw2's, a new client is
    // served by gw2 without a conflict, and gw1 knows that lease once back.
    let gw1_socket = gw1.socket.to_string_lossy().into_owned();
    carp_cli(&["maintenance", "on", "--socket", &gw1_socket])?;
    wait_ha(&gw2, "partner-in-maintenance", Duration::from_secs(5))?;
    dhcp::add_client(&lab, "mv0")?;
    let (b, _) = dhcp::request(&lab, "mv0", Duration::from_secs(15))?;
    assert_eq!(
        b.server, GW2_LAN,
        "the secondary answers during maintenance: {b:?}"
    );
    assert_ne!(b.address, a.address, "no address handed out twice");
    assert_eq!(served_by_after_a_look(&gw2, &b, &gw2.name), gw2.name);
    carp_cli(&["maintenance", "off", "--socket", &gw1_socket])?;
    wait_ha(&gw1, "hot-standby", Duration::from_secs(20))?;
    wait_for(Duration::from_secs(10), || held(&gw1, &b).then_some(()))
        .with_context(|| format!("gw1 does not know {b:?}: {:?}", leases(&gw1)))?;
    let (again, _) = dhcp::request(&lab, "mv0", Duration::from_secs(15))?;
    assert_eq!(
        (again.server, again.address),
        (GW1_LAN, b.address),
        "the primary serves again, knowing the secondary's lease"
    );
    assert_eq!(served_by_after_a_look(&gw1, &again, &gw1.name), gw1.name);

    // The primary dies: carp and its Kea killed, its links down. The client asks for its
    // address again and the secondary gives it the same one; traffic through the VIP flows.
    let died = Instant::now();
    dhcp::kill_gateway(&lab, &gw1)?;
    let (renewed, took) = dhcp::request(&lab, "eth0", Duration::from_secs(30))?;
    eprintln!(
        "after the primary's death: ACK from {} {:?} later ({took:?} in the client)",
        renewed.server,
        died.elapsed()
    );
    assert_eq!(
        (renewed.server, renewed.address),
        (GW2_LAN, a.address),
        "the secondary keeps the client's address"
    );
    assert_eq!(served_by_after_a_look(&gw2, &renewed, &gw2.name), gw2.name);
    ensure!(
        lab.sh(
            Host::Client,
            &format!("ping -c 3 -i 0.2 -W 1 -I {CLIENT_IP} {SERVER_IP}")
        )
        .is_ok(),
        "no traffic through the VIP after the failover"
    );
    Ok(())
}

/// A changed `[[dhcp]]` reaches the running Kea on `carp reload` without a restart: the
/// same kea-dhcp4 processes (their PIDs in `carp status`) serve a new client from the new
/// pool, outside the old one, and the pair is back in hot-standby.
#[test]
fn a_changed_dhcp_section_reaches_the_running_kea_without_a_restart() -> Result<()> {
    let lab = Lab::up()?;
    let (gw1, gw2) = kea_pair(&lab)?;
    let kea_pid = |node: &Node| -> Result<u32> {
        node.status()?
            .dhcp
            .and_then(|d| d.pid)
            .context("no Kea PID in carp status")
    };
    let before = (kea_pid(&gw1)?, kea_pid(&gw2)?);
    lab.write_config(
        Host::Gw1,
        &NodeOptions {
            dhcp_pool: Some(NEW_POOL),
            ..primary()
        },
    )?;
    let socket = gw1.socket.to_string_lossy().into_owned();
    carp_cli(&["reload", "--socket", &socket])?;
    // The secondary gets the section by config sync and hands it to its Kea alike.
    let no_failure = |node: &Node| {
        node.status()
            .ok()
            .and_then(|s| s.dhcp)
            .is_some_and(|d| d.failure.is_none())
    };
    std::thread::sleep(Duration::from_secs(1));
    wait_ha(&gw1, "hot-standby", Duration::from_secs(30))?;
    wait_ha(&gw2, "hot-standby", Duration::from_secs(30))?;
    ensure!(
        no_failure(&gw1) && no_failure(&gw2),
        "a node shows a DHCP failure"
    );
    assert_eq!(
        (kea_pid(&gw1)?, kea_pid(&gw2)?),
        before,
        "Kea was restarted instead of reconfigured"
    );
    dhcp::add_client(&lab, "mv0")?;
    let (b, _) = dhcp::request(&lab, "mv0", Duration::from_secs(15))?;
    ensure!(
        dhcp::in_range(NEW_POOL, b.address) && !dhcp::in_pool(b.address),
        "{b:?} is not from the new pool {NEW_POOL}"
    );
    assert_eq!(b.server, GW1_LAN, "the primary serves");
    Ok(())
}

/// `carp maintenance` waits for the partner's Kea to take over DHCP, up to Kea's command
/// timeout (3 s), but the daemon goes on meanwhile: `carp status` answers at once and the
/// master keeps its VIPs (its adverts go on). The partner here accepts Kea's HA port and
/// never answers. The control: the maintenance command itself did wait.
#[test]
fn a_partner_kea_that_never_answers_does_not_hold_up_the_daemon() -> Result<()> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let traffic = traffic_bin()?.to_string_lossy().into_owned();
    lab.spawn(
        Host::Gw2,
        &[&traffic, "serve", "198.18.3.2:8371"],
        &lab.dir.join("silent-kea.log"),
    )?;
    // gw2's carp runs (without DHCP of its own), so the sync link is up and gw1 does not
    // fence the partner's Kea port off as it would with the peer gone.
    let gw1 = lab.start_carp(&bin, Host::Gw1, &primary())?;
    let _gw2 = lab.start_carp(
        &bin,
        Host::Gw2,
        &NodeOptions {
            sync_key: Some(SYNC_SECRET.into()),
            ..backup_opts()
        },
    )?;
    wait_all(&gw1, State::Master, Duration::from_secs(10))?;
    wait_for(Duration::from_secs(15), || {
        gw1.status()
            .ok()
            .and_then(|s| s.sync)
            .is_some_and(|s| s.connected)
            .then_some(())
    })
    .context("the sync link does not come up")?;
    let socket = gw1.socket.to_string_lossy().into_owned();
    let asked = Instant::now();
    let maintenance =
        std::thread::spawn(move || carp_cli(&["maintenance", "on", "--socket", &socket]));
    std::thread::sleep(Duration::from_millis(500));
    let status_asked = Instant::now();
    let status = gw1.status()?;
    let status_took = status_asked.elapsed();
    ensure!(
        status_took < Duration::from_millis(500),
        "carp status took {status_took:?} while the partner's Kea was being asked"
    );
    ensure!(
        !status.maintenance,
        "in maintenance before the partner answered: {:?}",
        status.dhcp.and_then(|d| d.maintenance)
    );
    let table = maintenance
        .join()
        .map_err(|_| anyhow::anyhow!("the maintenance thread panicked"))??;
    let took = asked.elapsed();
    ensure!(
        took >= Duration::from_millis(2500),
        "the maintenance command answered after {took:?}: it did not wait for the partner"
    );
    assert!(table.contains("maintenance ON"), "{table}");
    let shown = gw1.status()?.dhcp.context("no DHCP in gw1's status")?;
    let last = shown.maintenance.unwrap_or_default();
    assert!(last.contains("did not answer"), "{last}");
    Ok(())
}

/// `[kea]` for a node whose Kea a service manager runs: systemd's kea-dhcp4-server on a real
/// gateway; here a script in its place that starts Kea or sends it SIGHUP (Kea's reload), as
/// `systemctl reload-or-restart` does. Returns the section and the service's directory.
fn kea_service(lab: &Lab, node: &str) -> Result<(String, PathBuf)> {
    let dir = lab.dir.join(format!("kea-service-{node}"));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("kea-dhcp4.conf");
    let script = dir.join("reload-or-restart.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\ncd {d}\npid=$(cat kea-dhcp4.kea-dhcp4.pid 2>/dev/null || true)\n\
             if [ -n \"$pid\" ] && kill -0 \"$pid\" 2>/dev/null; then exec kill -HUP \"$pid\"; fi\n\
             KEA_PIDFILE_DIR={d} KEA_LOCKFILE_DIR={d} setsid kea-dhcp4 -c {c} >>kea.out 2>&1 </dev/null &\n",
            d = dir.display(),
            c = conf.display()
        ),
    )?;
    let section = format!(
        "\n[kea]\nrun_by = \"service\"\nconfig = \"{}\"\ncontrol_socket = \"{}\"\n\
         lease_file = \"{}\"\nreload = [\"/bin/sh\", \"{}\"]\n",
        conf.display(),
        dir.join("kea.sock").display(),
        dir.join("leases.csv").display(),
        script.display()
    );
    Ok((section, dir))
}

/// The service's Kea, by its PID file.
fn service_kea_pid(dir: &Path) -> Result<i32> {
    Ok(
        std::fs::read_to_string(dir.join("kea-dhcp4.kea-dhcp4.pid"))?
            .trim()
            .parse()?,
    )
}

/// Where a service manager runs Kea, carp writes the configuration where the service reads
/// it, reloads the service, and the pair serves and shows in `carp status` as with carp's
/// own Kea; a changed pool reaches it by the service's reload; Kea is the service's, so it
/// outlives carp.
#[test]
fn a_kea_service_is_configured_and_driven_by_carp() -> Result<()> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let (section1, dir1) = kea_service(&lab, "gw1")?;
    let (section2, dir2) = kea_service(&lab, "gw2")?;
    let gw1 = lab.start_carp(
        &bin,
        Host::Gw1,
        &NodeOptions {
            extra: section1.clone(),
            ..primary()
        },
    )?;
    let gw2 = lab.start_carp(
        &bin,
        Host::Gw2,
        &NodeOptions {
            extra: section2,
            ..secondary()
        },
    )?;
    wait_ha(&gw1, "hot-standby", Duration::from_secs(30))?;
    wait_ha(&gw2, "hot-standby", Duration::from_secs(10))?;
    for (dir, role) in [(&dir1, "primary"), (&dir2, "standby")] {
        let conf: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("kea-dhcp4.conf"))?)?;
        let ha = &conf["Dhcp4"]["hooks-libraries"][1]["parameters"]["high-availability"][0];
        assert_eq!(ha["this-server-name"], role, "{conf}");
    }
    let status = gw1.status()?.dhcp.context("no DHCP in gw1's status")?;
    assert!(status.running && status.failure.is_none(), "{status:?}");
    let kea = service_kea_pid(&dir1)?;
    assert_eq!(
        status.pid.map(|pid| pid as i32),
        Some(kea),
        "`carp status` shows the service's Kea"
    );
    // /proc/PID/stat: "pid (comm) state ppid ...".
    let stat = std::fs::read_to_string(format!("/proc/{kea}/stat"))?;
    let parent = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(1));
    assert_ne!(
        parent,
        Some(gw1.pid.to_string().as_str()),
        "the service runs Kea, not carp"
    );
    let (a, _) = dhcp::request(&lab, "eth0", Duration::from_secs(15))?;
    assert!(dhcp::in_pool(a.address), "{a:?}");
    assert_eq!((a.server, a.routers.as_str()), (GW1_LAN, LAN_VIP));
    // A changed pool: written where the service reads it and the service reloaded (here,
    // as Debian's unit does, SIGHUP: Kea reads its file again).
    lab.write_config(
        Host::Gw1,
        &NodeOptions {
            extra: section1,
            dhcp_pool: Some(NEW_POOL),
            ..primary()
        },
    )?;
    let socket = gw1.socket.to_string_lossy().into_owned();
    carp_cli(&["reload", "--socket", &socket])?;
    for dir in [&dir1, &dir2] {
        wait_for(Duration::from_secs(10), || {
            std::fs::read_to_string(dir.join("kea-dhcp4.conf"))
                .ok()
                .filter(|conf| conf.contains(&NEW_POOL.replace('-', " - ")))
                .map(drop)
        })
        .with_context(|| format!("{} does not get the new pool", dir.display()))?;
    }
    std::thread::sleep(Duration::from_secs(1));
    wait_ha(&gw1, "hot-standby", Duration::from_secs(30))?;
    wait_ha(&gw2, "hot-standby", Duration::from_secs(30))?;
    dhcp::add_client(&lab, "mv0")?;
    let (b, _) = dhcp::request(&lab, "mv0", Duration::from_secs(15))?;
    ensure!(
        dhcp::in_range(NEW_POOL, b.address),
        "{b:?} is not from the new pool"
    );
    // carp stops; the service's Kea goes on.
    end_process(gw1.pid, Duration::from_secs(10));
    ensure!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(kea), None).is_ok(),
        "the service's Kea ended with carp"
    );
    Ok(())
}

/// The control: without the HA hook, two servers on the same pool hand out the same
/// address twice: a second client asking for the first one's address gets it from a server
/// that shares no leases (in the test above, with HA, the second client gets another one).
#[test]
fn two_keas_without_ha_hand_out_the_same_address_twice() -> Result<()> {
    let lab = Lab::up()?;
    let start_kea = |host: Host, own: Ipv4Addr| -> Result<u32> {
        let dir = lab.dir.join(format!("kea-{own}"));
        std::fs::create_dir_all(&dir)?;
        let setup = KeaSetup {
            scopes: vec![DhcpScope {
                interface: "lan".into(),
                subnet: "198.18.1.0/24".parse().map_err(anyhow::Error::msg)?,
                pools: vec![(
                    Ipv4Addr::new(198, 18, 1, 150),
                    Ipv4Addr::new(198, 18, 1, 199),
                )],
                router: LAN_VIP.parse()?,
                dns: vec![LAN_VIP.parse()?],
                lease_seconds: 600,
                reservations: Vec::new(),
            }],
            role: HaRole::Primary,
            this: own,
            peer: own,
            port: 8371,
            dir: dir.clone(),
            hooks_dir: kea_config::find_hooks_dir().context("Kea's hooks are not installed")?,
            failure_ms: 3000,
            service: None,
        };
        let mut config = kea_config::generate(&setup);
        config["Dhcp4"]
            .as_object_mut()
            .context("Dhcp4")?
            .remove("hooks-libraries");
        let file = setup.config_file();
        std::fs::write(&file, config.to_string())?;
        let (pid_dir, lock_dir) = (
            format!("KEA_PIDFILE_DIR={}", dir.display()),
            format!("KEA_LOCKFILE_DIR={}", dir.display()),
        );
        let pid = lab.spawn(
            host,
            &[
                "env",
                &pid_dir,
                &lock_dir,
                "kea-dhcp4",
                "-c",
                &file.to_string_lossy(),
            ],
            &dir.join("kea.out"),
        )?;
        std::thread::sleep(Duration::from_secs(2));
        Ok(pid)
    };
    let gw1 = start_kea(Host::Gw1, GW1_LAN)?;
    let (a, _) = dhcp::request(&lab, "eth0", Duration::from_secs(15))?;
    assert_eq!(a.server, GW1_LAN);
    kill_hard(gw1);
    start_kea(Host::Gw2, GW2_LAN)?;
    dhcp::add_client(&lab, "mv0")?;
    // The second client asks for the first one's address: a server that shares no leases
    // has no reason to refuse it.
    let (b, _) = dhcp::request_wanting(&lab, "mv0", Duration::from_secs(15), Some(a.address))?;
    assert_eq!(b.server, GW2_LAN);
    assert_eq!(
        b.address, a.address,
        "without lease sharing both clients hold {}: the HA test can tell",
        a.address
    );
    Ok(())
}
