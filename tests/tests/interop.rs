//! Interop with a real ucarp (Debian's) on the lab's LAN, in both roles. ucarp hashes exactly
//! one IPv4 VIP, so carp runs the one LAN VIP here. Needs root (CI is root).

use anyhow::{Context, Result};
use carp::carp::fsm::State;
use carp_lab::cluster::wait_state;
use carp_lab::{Host, LAN_VIP, Lab, NodeOptions, carp_bin, end_process, kill_hard, wait_for};
use std::{path::PathBuf, time::Duration};

const VHID: u8 = 1;

/// Starts ucarp on gw2's LAN with the lab passphrase; its up/down scripts move the VIP and
/// record the state in a file.
fn start_ucarp(lab: &Lab, advskew: u8) -> Result<(u32, PathBuf)> {
    let state = lab.dir.join("ucarp.state");
    std::fs::write(&state, "NONE")?;
    let up = lab.dir.join("ucarp-up.sh");
    let down = lab.dir.join("ucarp-down.sh");
    std::fs::write(
        &up,
        format!(
            "#!/bin/sh\nip addr add \"$2\"/24 dev \"$1\"\necho MASTER > {}\n",
            state.display()
        ),
    )?;
    std::fs::write(
        &down,
        format!(
            "#!/bin/sh\nip addr del \"$2\"/24 dev \"$1\"\necho BACKUP > {}\n",
            state.display()
        ),
    )?;
    for script in [&up, &down] {
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(script)
            .status()?;
    }
    let pid = lab.spawn(
        Host::Gw2,
        &[
            "ucarp",
            "-i",
            "lan",
            "-s",
            "198.18.1.3",
            "-v",
            &VHID.to_string(),
            "-p",
            "labsecret",
            "-a",
            LAN_VIP,
            "-b",
            "1",
            "-k",
            &advskew.to_string(),
            "-P",
            "-u",
            &up.to_string_lossy(),
            "-d",
            &down.to_string_lossy(),
        ],
        &lab.dir.join("ucarp.log"),
    )?;
    Ok((pid, state))
}

fn ucarp_state(state: &PathBuf) -> String {
    std::fs::read_to_string(state)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

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
    let (ucarp, state) = start_ucarp(&lab, 0)?;
    wait_for(Duration::from_secs(8), || {
        (ucarp_state(&state) == "MASTER").then_some(())
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
    kill_hard(ucarp);
    wait_state(&gw1, VHID, State::Master, Duration::from_secs(6))?;
    lab.sh(Host::Client, &format!("ping -c 2 -i 0.2 -W 1 {LAN_VIP}"))?;
    Ok(())
}

#[test]
fn ucarp_backs_up_a_carp_master_and_takes_over_on_its_bow_out() -> Result<()> {
    let lab = Lab::up()?;
    let gw1 = lab.start_carp(&carp_bin()?, Host::Gw1, &lan_only(0))?;
    wait_state(&gw1, VHID, State::Master, Duration::from_secs(10))?;
    let (_ucarp, state) = start_ucarp(&lab, 100)?;
    std::thread::sleep(Duration::from_secs(6));
    assert_ne!(
        ucarp_state(&state),
        "MASTER",
        "ucarp accepts carp's adverts and stays backup"
    );
    assert_eq!(gw1.state(VHID), Some(State::Master));
    // carp's SIGTERM bow-out (advbase 255, advskew 255) makes ucarp take over at once.
    end_process(gw1.pid, Duration::from_secs(5));
    wait_for(Duration::from_secs(2), || {
        (ucarp_state(&state) == "MASTER").then_some(())
    })
    .context("ucarp did not take over on carp's bow-out")?;
    lab.sh(Host::Client, &format!("ping -c 2 -i 0.2 -W 1 {LAN_VIP}"))?;
    Ok(())
}
