//! Configuration sync in the namespace lab: a secondary whose file has only its own `[node]`,
//! `[sync]` and `[config_sync]` follows the primary's VIPs (every skew +100) and NAT, takes
//! changes within 2 s of `carp reload` on the primary, refuses a push that does not fit its
//! host as a whole (the primary hears why), and restarts with what it last received while
//! the primary is down. Needs root.

use anyhow::{Context, Result};
use carp::{carp::fsm::State, sync::config_link::ConfigSyncStatus};
use carp_lab::{
    ConfigSyncPart, Host, Lab, Node, NodeOptions, SYNC_SECRET, carp_bin,
    cluster::{carp_cli, wait_all},
    kill_hard, wait_for,
};
use std::time::{Duration, Instant};

fn config_status(node: &Node) -> Result<ConfigSyncStatus> {
    Ok(node.status()?.sync.context("no sync")?.config)
}

fn primary() -> NodeOptions {
    NodeOptions {
        sync_key: Some(SYNC_SECRET.into()),
        nat: true,
        config_sync: ConfigSyncPart::Push,
        ..NodeOptions::default()
    }
}

/// A secondary whose file holds only its own sections.
fn follower() -> NodeOptions {
    NodeOptions {
        sync_key: Some(SYNC_SECRET.into()),
        config_sync: ConfigSyncPart::Accept,
        ..NodeOptions::default()
    }
}

/// Waits until `node` holds exactly these (vhid, advskew) pairs.
#[track_caller]
fn wait_skews(node: &Node, want: &[(u8, u8)], within: Duration) -> Result<()> {
    wait_for(within, || (skews(node) == want).then_some(()))
        .with_context(|| format!("{} holds {:?}, not {want:?}", node.name, skews(node)))
}

/// `node`'s (vhid, advskew) pairs.
fn skews(node: &Node) -> Vec<(u8, u8)> {
    node.status()
        .map(|s| s.vips.iter().map(|v| (v.vhid, v.advskew)).collect())
        .unwrap_or_default()
}

#[test]
fn the_secondary_follows_the_primary_and_keeps_what_it_received() -> Result<()> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let gw1 = lab.start_carp(&bin, Host::Gw1, &primary())?;
    let gw2 = lab.start_carp(&bin, Host::Gw2, &follower())?;
    // gw2 starts with no VIP, then gets both with skew 0 + 100, and the NAT.
    wait_skews(&gw2, &[(1, 100), (2, 100)], Duration::from_secs(15))?;
    wait_all(&gw1, State::Master, Duration::from_secs(10))?;
    wait_all(&gw2, State::Backup, Duration::from_secs(5))?;
    assert_eq!(
        carp_lab::cluster::nat_rules(&lab, Host::Gw1)?,
        carp_lab::cluster::nat_rules(&lab, Host::Gw2)?
    );
    let (s1, s2) = wait_for(Duration::from_secs(5), || {
        let (s1, s2) = (config_status(&gw1).ok()?, config_status(&gw2).ok()?);
        (s1.in_step && s2.in_step).then_some((s1, s2))
    })
    .with_context(|| {
        format!(
            "not in step: {:?} {:?}",
            config_status(&gw1),
            config_status(&gw2)
        )
    })?;
    assert_eq!(
        (s1.role.as_str(), s2.role.as_str()),
        ("primary", "secondary")
    );
    assert_eq!(s1.local_hash, s2.local_hash);
    let shown = carp_cli(&["status", "--socket", &gw2.socket.to_string_lossy()])?;
    assert!(shown.contains("config sync: secondary  in step"), "{shown}");

    // A new VIP and a new skew on the primary reach the secondary within 2 s of the reload.
    let mut changed = primary();
    changed.advskew = 20;
    changed.vips.push(("lan", 3, "198.18.1.5/24".into()));
    lab.write_config(Host::Gw1, &changed)?;
    let reloaded = Instant::now();
    carp_cli(&["reload", "--socket", &gw1.socket.to_string_lossy()])?;
    wait_skews(
        &gw2,
        &[(1, 120), (2, 120), (3, 120)],
        Duration::from_secs(2),
    )?;
    eprintln!(
        "secondary applied the reload {:?} after it",
        reloaded.elapsed()
    );
    wait_state_of(&gw1, 3, State::Master)?;

    // A VIP that does not fit the secondary's host: refused whole, the primary hears why.
    lab.sh(Host::Gw1, "ip addr add 198.18.6.2/24 dev lan")?;
    let mut unfit = changed.clone();
    unfit.vips.push(("lan", 6, "198.18.6.1/24".into()));
    lab.write_config(Host::Gw1, &unfit)?;
    carp_cli(&["reload", "--socket", &gw1.socket.to_string_lossy()])?;
    let refused = wait_for(Duration::from_secs(5), || {
        config_status(&gw1).ok().filter(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("198.18.6.1"))
        })
    })
    .with_context(|| format!("no refusal reached gw1: {:?}", config_status(&gw1)))?;
    assert!(!refused.in_step, "{refused:?}");
    assert!(
        refused
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("is not inside the subnet of a real address on `lan`"),
        "{refused:?}"
    );
    assert_eq!(
        skews(&gw2),
        [(1, 120), (2, 120), (3, 120)],
        "gw2 changed nothing"
    );

    // Rollback on the secondary: the version before, and no longer in step.
    let shown = carp_cli(&[
        "config",
        "rollback",
        "--socket",
        &gw2.socket.to_string_lossy(),
    ])?;
    assert!(shown.contains("rolled back to"), "{shown}");
    assert_eq!(skews(&gw2), [(1, 100), (2, 100)]);
    assert!(!config_status(&gw2)?.in_step);
    // A reload on the primary brings it back in step.
    lab.write_config(Host::Gw1, &changed)?;
    carp_cli(&["reload", "--socket", &gw1.socket.to_string_lossy()])?;
    wait_skews(
        &gw2,
        &[(1, 120), (2, 120), (3, 120)],
        Duration::from_secs(2),
    )?;

    // The primary goes; the secondary restarted meanwhile comes up with what it had.
    carp_lab::end_process(gw1.pid, Duration::from_secs(5));
    kill_hard(gw2.pid);
    let gw2 = lab.restart_carp(&bin, &gw2)?;
    assert_eq!(skews(&gw2), [(1, 120), (2, 120), (3, 120)]);
    wait_all(&gw2, State::Master, Duration::from_secs(10))?;
    assert!(carp_lab::cluster::nat_rules(&lab, Host::Gw2)?.contains("snat"));
    // The client reaches the server through gw2, translated to the WAN VIP by the NAT it
    // received.
    lab.sh(Host::Client, "ping -c 3 -i 0.2 -W 1 198.18.2.100")?;
    let natted = lab.sh(Host::Gw2, "conntrack -L -p icmp 2>/dev/null")?;
    assert!(
        natted.contains(&format!("dst={}", carp_lab::WAN_VIP)),
        "not translated to the WAN VIP: {natted}"
    );
    Ok(())
}

fn wait_state_of(node: &Node, vhid: u8, state: State) -> Result<()> {
    carp_lab::cluster::wait_state(node, vhid, state, Duration::from_secs(8))
}

/// The nftables area: the primary's ruleset file is checked and loaded on the secondary; one
/// the secondary's kernel refuses (an interface only the primary has) changes nothing there,
/// and the primary hears nft's reason.
#[test]
fn an_nftables_ruleset_follows_and_a_refused_one_changes_nothing() -> Result<()> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    // The ruleset lives in etc/; gw2 sees its own etc/ there (lab nodes share a filesystem).
    let etc = lab.dir.join("etc");
    let gw2_etc = lab.dir.join("gw2-etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::create_dir_all(&gw2_etc)?;
    let rules = etc.join("rules.nft");
    let table = "table inet carp_lab_filter {\n  chain input {\n    type filter hook input priority 0; policy accept;\n    tcp dport 9999 counter drop\n  }\n}\n";
    std::fs::write(&rules, table)?;
    let pusher = NodeOptions {
        nftables: vec![rules.clone()],
        ..primary()
    };
    let gw1 = lab.start_carp(&bin, Host::Gw1, &pusher)?;
    let gw2 = lab.start_carp_with_own_dir(&bin, Host::Gw2, &follower(), &etc, &gw2_etc)?;
    let loaded = || -> String {
        lab.output(
            Host::Gw2,
            &["nft", "list", "table", "inet", "carp_lab_filter"],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
    };
    wait_for(Duration::from_secs(15), || {
        loaded().contains("dport 9999").then_some(())
    })
    .with_context(|| format!("the ruleset never reached gw2: {:?}", config_status(&gw2)))?;
    assert!(
        lab.output(
            Host::Gw1,
            &["nft", "list", "table", "inet", "carp_lab_filter"]
        )?
        .status
        .code()
            != Some(0),
        "the primary does not load its own ruleset: the operator does"
    );
    assert_eq!(
        std::fs::read_to_string(gw2_etc.join("rules.nft"))?,
        table,
        "gw2 keeps its copy at the same path, in its own view of the filesystem"
    );
    // A rule for an interface gw2 lacks: nft -c refuses it there.
    lab.sh(
        Host::Gw1,
        "ip link add dmz type veth peer name dmz-peer && ip link set dmz up",
    )?;
    std::fs::write(
        &rules,
        table.replace(
            "tcp dport 9999 counter drop",
            "tcp dport 9999 counter drop\n    iif \"dmz\" accept",
        ),
    )?;
    carp_cli(&["reload", "--socket", &gw1.socket.to_string_lossy()])?;
    let refused = wait_for(Duration::from_secs(5), || {
        config_status(&gw1).ok().filter(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("nft -c"))
        })
    })
    .with_context(|| format!("no refusal reached gw1: {:?}", config_status(&gw1)))?;
    assert!(
        refused
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("Interface does not exist"),
        "{refused:?}"
    );
    let now = loaded();
    assert!(now.contains("dport 9999") && !now.contains("dmz"), "{now}");
    assert_eq!(
        skews(&gw2),
        [(1, 100), (2, 100)],
        "the other areas stayed too"
    );
    Ok(())
}

/// `carp config diff` shows what a push would change, per area; a hand edit on the
/// secondary refuses the next push with the diff of that edit, until `--force`.
#[test]
fn diff_shows_the_change_and_drift_needs_force() -> Result<()> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let gw1 = lab.start_carp(&bin, Host::Gw1, &primary())?;
    let gw2 = lab.start_carp(&bin, Host::Gw2, &follower())?;
    wait_skews(&gw2, &[(1, 100), (2, 100)], Duration::from_secs(15))?;
    let socket = gw1.socket.to_string_lossy().into_owned();
    // Edited on the primary, not yet reloaded: the diff shows it and changes nothing.
    lab.write_config(
        Host::Gw1,
        &NodeOptions {
            advskew: 5,
            ..primary()
        },
    )?;
    let shown = carp_cli(&["config", "diff", "--socket", &socket])?;
    assert!(shown.contains("--- carp (secondary)"), "{shown}");
    assert!(
        shown.contains("-advskew = 100") && shown.contains("+advskew = 105"),
        "{shown}"
    );
    assert!(!shown.contains("nat ("), "NAT did not change: {shown}");
    assert_eq!(skews(&gw2), [(1, 100), (2, 100)]);
    // A hand edit of what gw2 holds: the push is refused with that edit, gw2 unchanged.
    let held = lab
        .dir
        .join(format!("{}-state/config-sync/areas.toml", gw2.name));
    let text = std::fs::read_to_string(&held)?;
    std::fs::write(&held, text.replace("labsecret", "edited by hand"))?;
    let (_, stderr) = carp_lab::cluster::carp_cli_refused(&["config", "push", "--socket", &socket])
        .context("the push went through the drift")?;
    assert!(
        stderr.contains("changed by hand on the secondary"),
        "{stderr}"
    );
    assert!(
        stderr.contains("+passphrase = \"edited by hand\""),
        "{stderr}"
    );
    assert_eq!(skews(&gw2), [(1, 100), (2, 100)]);
    // --force overwrites it.
    carp_cli(&["config", "push", "--force", "--socket", &socket])?;
    assert_eq!(skews(&gw2), [(1, 105), (2, 105)]);
    assert!(!std::fs::read_to_string(&held)?.contains("edited by hand"));
    // A hand change to carp's NAT table on gw2 is drift too.
    lab.sh(
        Host::Gw2,
        "nft add rule ip carp postrouting oifname \"lan\" counter",
    )?;
    let (_, stderr) = carp_lab::cluster::carp_cli_refused(&["config", "push", "--socket", &socket])
        .context("the push went through the NAT drift")?;
    assert!(stderr.contains("ip carp table (as found)"), "{stderr}");
    carp_cli(&["config", "push", "--force", "--socket", &socket])?;
    assert!(
        !lab.sh(Host::Gw2, "nft list table ip carp")?
            .contains("\"lan\""),
        "--force put carp's table back"
    );
    Ok(())
}

/// The files area: a declared file reaches the secondary with its mode, atomically; the
/// secondary's own `reload_after` command runs when the file changed and not otherwise; a
/// hand edit there refuses the next push until `--force`.
#[test]
fn a_synced_file_lands_with_its_mode_and_runs_the_secondarys_own_command() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    // The file lives in etc/; gw2 sees its own etc/ there (lab nodes share a filesystem).
    let etc = lab.dir.join("etc");
    let gw2_etc = lab.dir.join("gw2-etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::create_dir_all(&gw2_etc)?;
    let hosts = etc.join("hosts");
    std::fs::write(&hosts, "198.18.1.5 printer\n")?;
    let reloads = lab.dir.join("reloads");
    let pusher = NodeOptions {
        files: vec![(hosts.clone(), "0640")],
        ..primary()
    };
    let taker = NodeOptions {
        reload_after: vec![(
            hosts.clone(),
            vec![
                "sh".into(),
                "-c".into(),
                format!("cat {} >> {}", hosts.display(), reloads.display()),
            ],
        )],
        ..follower()
    };
    let gw1 = lab.start_carp(&bin, Host::Gw1, &pusher)?;
    let gw2 = lab.start_carp_with_own_dir(&bin, Host::Gw2, &taker, &etc, &gw2_etc)?;
    let socket = gw1.socket.to_string_lossy().into_owned();
    let copy = gw2_etc.join("hosts");
    let ran = || std::fs::read_to_string(&reloads).unwrap_or_default();
    wait_for(Duration::from_secs(15), || {
        (ran() == "198.18.1.5 printer\n").then_some(())
    })
    .with_context(|| format!("the command never ran on gw2: {:?}", config_status(&gw2)))?;
    assert_eq!(std::fs::read_to_string(&copy)?, "198.18.1.5 printer\n");
    let mode = std::fs::metadata(&copy)?.permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "written with the declared mode");
    assert_eq!(
        std::fs::read_to_string(&hosts)?,
        "198.18.1.5 printer\n",
        "the command ran in gw2's view, where the file was already in place"
    );
    // A reload that leaves the file as it is: the command does not run again.
    lab.write_config(
        Host::Gw1,
        &NodeOptions {
            advskew: 5,
            ..pusher.clone()
        },
    )?;
    carp_cli(&["reload", "--socket", &socket])?;
    wait_skews(&gw2, &[(1, 105), (2, 105)], Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ran(), "198.18.1.5 printer\n", "ran for an unchanged file");
    // The file changes on the primary: the new content lands and the command runs.
    std::fs::write(&hosts, "198.18.1.5 printer\n198.18.1.6 nas\n")?;
    carp_cli(&["config", "push", "--socket", &socket])?;
    wait_for(Duration::from_secs(5), || {
        ran().ends_with("198.18.1.6 nas\n").then_some(())
    })
    .with_context(|| format!("the command did not run again: {:?}", ran()))?;
    // A hand edit on gw2 is drift: the push is refused with that edit, and the file stays.
    std::fs::write(
        &copy,
        "198.18.1.5 printer\n198.18.1.6 nas\n198.18.1.7 mine\n",
    )?;
    let (_, stderr) = carp_lab::cluster::carp_cli_refused(&["config", "push", "--socket", &socket])
        .context("the push went through the drift")?;
    assert!(
        stderr.contains("(as found)") && stderr.contains("+198.18.1.7 mine"),
        "{stderr}"
    );
    assert!(std::fs::read_to_string(&copy)?.contains("mine"));
    carp_cli(&["config", "push", "--force", "--socket", &socket])?;
    assert_eq!(
        std::fs::read_to_string(&copy)?,
        "198.18.1.5 printer\n198.18.1.6 nas\n"
    );
    let leftovers: Vec<String> = std::fs::read_dir(&gw2_etc)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert_eq!(leftovers, ["hosts"], "no temporary file left behind");
    assert!(config_status(&gw2)?.reload_after_failure.is_none());
    Ok(())
}
