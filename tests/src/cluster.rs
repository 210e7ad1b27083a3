//! Driving carp pairs in the lab: waiting for states, counting ARP answers, the CLI.

use crate::{Lab, Node, NodeOptions, wait_for};
use anyhow::{Context, Result};
use carp::carp::fsm::State;
use std::time::Duration;

/// Waits until `node` reports `state` for `vhid`; the error carries the node's log.
pub fn wait_state(node: &Node, vhid: u8, state: State, timeout: Duration) -> Result<()> {
    wait_for(timeout, || (node.state(vhid) == Some(state)).then_some(())).with_context(|| {
        format!(
            "{} vhid {vhid} never became {state} (now {:?}); log:\n{}",
            node.name,
            node.state(vhid),
            node.log()
        )
    })
}

/// The lab's vhids: 1 holds the LAN VIP, 2 the WAN VIP.
pub const LAB_VHIDS: [u8; 2] = [1, 2];

/// Waits until `node` reports `state` for both lab VIPs.
pub fn wait_all(node: &Node, state: State, timeout: Duration) -> Result<()> {
    for vhid in LAB_VHIDS {
        wait_state(node, vhid, state, timeout)?;
    }
    Ok(())
}

/// The MACs that answered each ARP request for `target` from the client.
pub fn arp_answers(lab: &Lab, target: &str, count: u32) -> Result<Vec<Vec<String>>> {
    let exchanges = lab.arp_probe(&crate::probe::ArpProbe::from_client(target, 50, count * 50))?;
    Ok(exchanges
        .into_iter()
        .map(|e| e.replies.into_iter().map(|(_, mac)| mac).collect())
        .collect())
}

/// gw1 (skew 0) and gw2 (skew 100), started in that order; returns once gw1 is master of
/// both VIPs and gw2 backup.
pub fn pair(lab: &Lab) -> Result<(Node, Node)> {
    pair_with(lab, &NodeOptions::default(), &backup_opts())
}

/// gw1 with `primary` and gw2 with `secondary`, started in that order; returns once gw1 is
/// master of both VIPs and gw2 backup.
pub fn pair_with(
    lab: &Lab,
    primary: &NodeOptions,
    secondary: &NodeOptions,
) -> Result<(Node, Node)> {
    let bin = crate::carp_bin()?;
    let gw1 = lab.start_carp(&bin, crate::Host::Gw1, primary)?;
    let gw2 = lab.start_carp(&bin, crate::Host::Gw2, secondary)?;
    wait_all(&gw1, State::Master, Duration::from_secs(10))?;
    wait_all(&gw2, State::Backup, Duration::from_secs(2))?;
    Ok((gw1, gw2))
}

/// The backup's options: pfSense's secondary skew.
pub fn backup_opts() -> NodeOptions {
    NodeOptions {
        advskew: 100,
        ..NodeOptions::default()
    }
}

/// Runs the `carp` CLI (as an operator would) and returns its stdout.
pub fn carp_cli(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(crate::carp_bin()?)
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "carp {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the `carp` CLI expecting it to fail; returns its exit code and stderr.
pub fn carp_cli_refused(args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = std::process::Command::new(crate::carp_bin()?)
        .args(args)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    anyhow::ensure!(!out.status.success(), "carp {args:?} succeeded: {stderr}");
    Ok((out.status.code(), stderr))
}

/// Asserts that no ARP request got more than one answer.
pub fn assert_never_two_answers(exchanges: &[crate::probe::Exchange]) {
    for e in exchanges {
        assert!(
            e.replies.len() <= 1,
            "request at {} got {} answers: {:?}",
            e.sent_us,
            e.replies.len(),
            e.replies
        );
    }
}

/// Asserts that each of `count` ARP requests for `target` got exactly one answer, from `mac`.
pub fn assert_answered_once_by(lab: &Lab, target: &str, mac: &str, count: u32) -> Result<()> {
    let answers = arp_answers(lab, target, count)?;
    anyhow::ensure!(
        answers == vec![vec![mac.to_owned()]; count as usize],
        "expected one answer from {mac} to each of {count} requests, got {answers:?}"
    );
    Ok(())
}

/// The rules of `host`'s `ip carp` table, without the handles that differ from node to node.
pub fn nat_rules(lab: &Lab, host: crate::Host) -> Result<String> {
    let json = lab.sh(host, "nft -j list table ip carp")?;
    let value: serde_json::Value = serde_json::from_str(&json)?;
    let rules: Vec<&serde_json::Value> = value["nftables"]
        .as_array()
        .context("no nftables array")?
        .iter()
        .filter_map(|o| o.get("rule").map(|r| &r["expr"]))
        .collect();
    Ok(serde_json::to_string(&rules)?)
}
