//! Helpers shared by the namespace tests.

use anyhow::{Context, Result};
use carp::carp::fsm::State;
use carp_lab::{Lab, Node, wait_for};
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

/// The MACs that answered each ARP request for `target` from the client.
pub fn arp_answers(lab: &Lab, target: &str, count: u32) -> Result<Vec<Vec<String>>> {
    let exchanges = lab.arp_probe(
        &carp_lab::probe_bin()?,
        carp_lab::Host::Client,
        "eth0",
        target,
        50,
        count * 50,
    )?;
    Ok(exchanges
        .into_iter()
        .map(|e| e.replies.into_iter().map(|(_, mac)| mac).collect())
        .collect())
}
