//! The CARP cluster in the namespace lab: election, ARP ownership, failover, preemption,
//! maintenance, bow-out, split brain, authentication. Needs root (CI is root).

mod common;

use anyhow::Result;
use carp::carp::fsm::State;
use carp_lab::{Host, LAN_VIP, Lab, NodeOptions, carp_bin};
use common::{arp_answers, wait_state};
use std::time::Duration;

const VMAC_LAN: &str = "00:00:5e:00:01:01";

fn backup_opts() -> NodeOptions {
    NodeOptions {
        advskew: 100,
        ..NodeOptions::default()
    }
}

#[test]
fn election_gives_one_master_and_exactly_one_arp_answer() -> Result<()> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let gw1 = lab.start_carp(&bin, Host::Gw1, &NodeOptions::default())?;
    let gw2 = lab.start_carp(&bin, Host::Gw2, &backup_opts())?;
    wait_state(&gw1, 1, State::Master, Duration::from_secs(10))?;
    wait_state(&gw2, 1, State::Backup, Duration::from_secs(1))?;
    let answers = arp_answers(&lab, LAN_VIP, 20)?;
    assert_eq!(answers.len(), 20);
    for (i, macs) in answers.iter().enumerate() {
        assert_eq!(macs, &[VMAC_LAN], "request {i}: exactly one answer, from the virtual MAC");
    }
    // The VIP is on gw1's interface and reachable through the virtual MAC.
    assert!(lab.sh(Host::Gw1, "ip -4 addr show dev lan")?.contains(LAN_VIP));
    assert!(!lab.sh(Host::Gw2, "ip -4 addr show dev lan")?.contains(LAN_VIP));
    lab.sh(Host::Client, &format!("ping -c 3 -i 0.2 -W 1 {LAN_VIP}"))?;
    Ok(())
}
