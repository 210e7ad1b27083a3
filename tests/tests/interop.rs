//! Interop with a real ucarp (Debian's) on the lab's LAN, in both roles. ucarp hashes exactly
//! one IPv4 VIP, so carp runs the one LAN VIP here. Needs root (CI is root).

use anyhow::{Context, Result};
use carp::carp::fsm::State;
use carp_lab::cluster::wait_state;
use carp_lab::{Host, LAN_VIP, Lab, NodeOptions, carp_bin, end_process, kill_hard, wait_for};
use std::time::Duration;

const VHID: u8 = 1;

fn lan_only(advskew: u8) -> NodeOptions {
    NodeOptions {
        advskew,
        vips: vec![("lan", VHID, format!("{LAN_VIP}/24"))],
        ..NodeOptions::default()
    }
}

#[test]
fn carp_backs_up_a_ucarp_master_and_takes_over_when_it_dies() -> Result<()> {
    let lab = Lab::up()?;
    let ucarp = lab.start_ucarp(Host::Gw2, 0)?;
    wait_for(Duration::from_secs(8), || {
        (ucarp.recorded_state() == "MASTER").then_some(())
    })
    .context("ucarp never became master")?;
    let gw1 = lab.start_carp(&carp_bin()?, Host::Gw1, &lan_only(100))?;
    wait_state(&gw1, VHID, State::Backup, Duration::from_secs(2))?;
    std::thread::sleep(Duration::from_secs(5));
    let status = gw1.status()?;
    assert_eq!(
        status.vips[0].state,
        State::Backup,
        "carp defers to the faster ucarp"
    );
    assert!(
        status.counters.adverts_received >= 3,
        "{:?}",
        status.counters
    );
    assert_eq!(status.counters.bad_auth, 0, "ucarp's HMAC verifies");
    for pid in ucarp.crash_order_pids() {
        kill_hard(pid);
    }
    wait_state(&gw1, VHID, State::Master, Duration::from_secs(6))?;
    lab.sh(Host::Client, &format!("ping -c 2 -i 0.2 -W 1 {LAN_VIP}"))?;
    Ok(())
}

#[test]
fn ucarp_backs_up_a_carp_master_and_takes_over_on_its_bow_out() -> Result<()> {
    let lab = Lab::up()?;
    let gw1 = lab.start_carp(&carp_bin()?, Host::Gw1, &lan_only(0))?;
    wait_state(&gw1, VHID, State::Master, Duration::from_secs(10))?;
    let ucarp = lab.start_ucarp(Host::Gw2, 100)?;
    std::thread::sleep(Duration::from_secs(6));
    assert_ne!(
        ucarp.recorded_state(),
        "MASTER",
        "ucarp accepts carp's adverts and stays backup"
    );
    assert_eq!(gw1.state(VHID), Some(State::Master));
    // carp's SIGTERM bow-out (advbase 255, advskew 255) makes ucarp take over at once.
    end_process(gw1.pid, Duration::from_secs(5));
    wait_for(Duration::from_secs(2), || {
        (ucarp.recorded_state() == "MASTER").then_some(())
    })
    .context("ucarp did not take over on carp's bow-out")?;
    lab.sh(Host::Client, &format!("ping -c 2 -i 0.2 -W 1 {LAN_VIP}"))?;
    Ok(())
}
