//! Every XDP path run through BPF_PROG_TEST_RUN on crafted frames: ARP for a VIP as master,
//! as backup and with a dead daemon, ARP for other addresses, virtual-MAC frames, and
//! malformed or truncated frames. Needs root (CI is root); fails, never skips, without it.

mod support;

use aya::programs::{TestRun, TestRunOptions};
use carp::dataplane::Role;
use support::{Loaded, XDP_PASS, load, run};

const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
use carp::dataplane::DataplaneError;
use carp_common::maps::{
    STAT_ARP_DROPPED_BACKUP, STAT_ARP_DROPPED_STALE, STAT_ARP_REPLIED, STAT_MALFORMED,
    STAT_VMAC_ACCEPTED, STAT_VMAC_IGNORED, VIP_PROBES, VipKey, vip_home, virtual_mac,
};
use std::{net::Ipv4Addr, time::Duration};

/// BPF_PROG_TEST_RUN runs XDP as if received on the namespace's loopback (ifindex 1).
const TEST_IFINDEX: u32 = 1;
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const VHID: u8 = 7;
const IF_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x50];
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 50);

fn arp_frame(op: u16, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&CLIENT_IP.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

fn ipv4_frame(dst_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&CLIENT_IP.octets());
    f.extend_from_slice(&VIP.octets());
    f
}

fn master(loaded: &mut Loaded) {
    let dp = &mut loaded.dataplane;
    dp.set_vip(TEST_IFINDEX, VIP, VHID, virtual_mac(VHID), Role::Master)
        .unwrap();
    dp.set_vmac(TEST_IFINDEX, VHID, IF_MAC, Role::Master)
        .unwrap();
    dp.refresh_heartbeat(Duration::from_secs(3)).unwrap();
}

#[test]
fn arp_for_vip_while_master_is_answered_with_the_virtual_mac() {
    let mut l = load();
    master(&mut l);
    let (action, out) = run(&mut l, &arp_frame(1, VIP));
    assert_eq!(action, XDP_TX);
    let vmac = virtual_mac(VHID);
    assert_eq!(&out[0..6], &CLIENT_MAC, "reply goes back to the asker");
    assert_eq!(&out[6..12], &vmac, "from the virtual MAC");
    assert_eq!(&out[12..14], &[0x08, 0x06]);
    assert_eq!(&out[20..22], &[0, 2], "ARP reply");
    assert_eq!(&out[22..28], &vmac, "sender hardware = virtual MAC");
    assert_eq!(&out[28..32], &VIP.octets(), "sender protocol = VIP");
    assert_eq!(&out[32..38], &CLIENT_MAC);
    assert_eq!(&out[38..42], &CLIENT_IP.octets());
    assert_eq!(l.dataplane.stats().unwrap()[STAT_ARP_REPLIED as usize], 1);
}

#[test]
fn arp_for_vip_with_interface_mac_mode_answers_with_that_mac() {
    let mut l = load();
    master(&mut l);
    l.dataplane
        .set_vip(TEST_IFINDEX, VIP, VHID, IF_MAC, Role::Master)
        .unwrap();
    let (action, out) = run(&mut l, &arp_frame(1, VIP));
    assert_eq!(action, XDP_TX);
    assert_eq!(&out[22..28], &IF_MAC);
}

#[test]
fn arp_for_vip_while_backup_is_dropped() {
    let mut l = load();
    master(&mut l);
    l.dataplane
        .set_vip(TEST_IFINDEX, VIP, VHID, virtual_mac(VHID), Role::Backup)
        .unwrap();
    let (action, _) = run(&mut l, &arp_frame(1, VIP));
    assert_eq!(action, XDP_DROP);
    assert_eq!(
        l.dataplane.stats().unwrap()[STAT_ARP_DROPPED_BACKUP as usize],
        1
    );
}

#[test]
fn arp_for_vip_with_stale_heartbeat_is_dropped() {
    let mut l = load();
    master(&mut l);
    l.dataplane
        .refresh_heartbeat(Duration::from_millis(1))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let (action, _) = run(&mut l, &arp_frame(1, VIP));
    assert_eq!(action, XDP_DROP);
    // A daemon that never wrote a heartbeat counts as dead too.
    l.dataplane.clear_heartbeat().unwrap();
    let (action, _) = run(&mut l, &arp_frame(1, VIP));
    assert_eq!(action, XDP_DROP);
    assert_eq!(
        l.dataplane.stats().unwrap()[STAT_ARP_DROPPED_STALE as usize],
        2
    );
    // And a fresh heartbeat brings the answers back.
    l.dataplane
        .refresh_heartbeat(Duration::from_secs(3))
        .unwrap();
    assert_eq!(run(&mut l, &arp_frame(1, VIP)).0, XDP_TX);
}

#[test]
fn arp_for_other_addresses_and_other_interfaces_passes_untouched() {
    let mut l = load();
    master(&mut l);
    let other = arp_frame(1, Ipv4Addr::new(198, 18, 1, 2));
    assert_eq!(run(&mut l, &other), (XDP_PASS, other.clone()));
    // The same VIP configured on another interface is not answered here.
    l.dataplane
        .set_vip(TEST_IFINDEX, VIP, VHID, virtual_mac(VHID), Role::Backup)
        .unwrap();
    l.dataplane
        .set_vip(TEST_IFINDEX + 1, VIP, VHID, virtual_mac(VHID), Role::Master)
        .unwrap();
    assert_eq!(run(&mut l, &arp_frame(1, VIP)).0, XDP_DROP);
    // ARP replies about the VIP are not ours to judge.
    let reply = arp_frame(2, VIP);
    assert_eq!(run(&mut l, &reply), (XDP_PASS, reply.clone()));
}

#[test]
fn vips_sharing_a_home_slot_are_all_answered_and_a_full_probe_window_is_refused() {
    let mut l = load();
    master(&mut l);
    let key = |addr: Ipv4Addr| VipKey {
        ifindex: TEST_IFINDEX,
        addr: addr.octets(),
    };
    let home = vip_home(&key(VIP));
    let same_home: Vec<Ipv4Addr> = (0..=u16::MAX)
        .map(|i| Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8))
        .filter(|addr| vip_home(&key(*addr)) == home)
        .take(VIP_PROBES as usize + 1)
        .collect();
    // VIP sits at home; the next VIP_PROBES - 1 fill the rest of its probe window.
    let (fits, rest) = same_home.split_at(VIP_PROBES as usize - 1);
    for addr in fits {
        l.dataplane
            .set_vip(TEST_IFINDEX, *addr, VHID, virtual_mac(VHID), Role::Master)
            .unwrap();
    }
    for addr in fits.iter().chain([&VIP]) {
        let (action, out) = run(&mut l, &arp_frame(1, *addr));
        assert_eq!(action, XDP_TX, "{addr}");
        assert_eq!(&out[28..32], &addr.octets(), "answered for {addr}");
    }
    // Changing a placed VIP finds its own slot again, even with the window full.
    l.dataplane
        .set_vip(TEST_IFINDEX, fits[3], VHID, virtual_mac(VHID), Role::Backup)
        .unwrap();
    assert_eq!(run(&mut l, &arp_frame(1, fits[3])).0, XDP_DROP);
    // One more with the same home has no room, and is named in the error.
    let err = l
        .dataplane
        .set_vip(TEST_IFINDEX, rest[0], VHID, virtual_mac(VHID), Role::Master)
        .unwrap_err();
    assert!(
        matches!(err, DataplaneError::VipTableFull { addr } if addr == rest[0]),
        "{err}"
    );
    // An unplaced address whose probe runs through the full window is not ours.
    let other = arp_frame(1, rest[1]);
    assert_eq!(run(&mut l, &other), (XDP_PASS, other.clone()));
    // A VIP removed from the configuration: XDP no longer knows it, the VIPs after it on the
    // probe sequence are still found, and its slot takes the next VIP.
    l.dataplane.remove_vip(TEST_IFINDEX, VIP, VHID).unwrap();
    let removed = arp_frame(1, VIP);
    assert_eq!(run(&mut l, &removed), (XDP_PASS, removed.clone()));
    for addr in fits {
        // fits[3] was made backup above.
        let expected = if *addr == fits[3] { XDP_DROP } else { XDP_TX };
        assert_eq!(
            run(&mut l, &arp_frame(1, *addr)).0,
            expected,
            "{addr} after the removal"
        );
    }
    l.dataplane
        .set_vip(TEST_IFINDEX, rest[0], VHID, virtual_mac(VHID), Role::Master)
        .expect("the removed VIP's slot is free again");
    assert_eq!(run(&mut l, &arp_frame(1, rest[0])).0, XDP_TX);
    assert_eq!(l.dataplane.vip_role(TEST_IFINDEX, VIP), None);
}

#[test]
fn virtual_mac_frames_while_master_reach_the_stack_as_ours() {
    let mut l = load();
    master(&mut l);
    let frame = ipv4_frame(virtual_mac(VHID));
    let (action, out) = run(&mut l, &frame);
    assert_eq!(action, XDP_PASS);
    assert_eq!(
        &out[0..6],
        &IF_MAC,
        "destination rewritten to the interface MAC"
    );
    assert_eq!(&out[6..], &frame[6..], "nothing else changed");
    assert_eq!(l.dataplane.stats().unwrap()[STAT_VMAC_ACCEPTED as usize], 1);
}

#[test]
fn virtual_mac_frames_while_backup_or_dead_are_left_alone() {
    let mut l = load();
    master(&mut l);
    l.dataplane
        .set_vmac(TEST_IFINDEX, VHID, IF_MAC, Role::Backup)
        .unwrap();
    let frame = ipv4_frame(virtual_mac(VHID));
    assert_eq!(run(&mut l, &frame), (XDP_PASS, frame.clone()));
    l.dataplane
        .set_vmac(TEST_IFINDEX, VHID, IF_MAC, Role::Master)
        .unwrap();
    l.dataplane.clear_heartbeat().unwrap();
    assert_eq!(run(&mut l, &frame), (XDP_PASS, frame.clone()));
    let unknown = ipv4_frame(virtual_mac(VHID + 1));
    assert_eq!(run(&mut l, &unknown), (XDP_PASS, unknown.clone()));
    assert_eq!(l.dataplane.stats().unwrap()[STAT_VMAC_IGNORED as usize], 3);
}

#[test]
fn ordinary_frames_pass_untouched() {
    let mut l = load();
    master(&mut l);
    let frame = ipv4_frame(IF_MAC);
    assert_eq!(run(&mut l, &frame), (XDP_PASS, frame.clone()));
}

#[test]
fn truncated_and_malformed_frames_pass_without_reading_out_of_bounds() {
    let mut l = load();
    master(&mut l);
    let request = arp_frame(1, VIP);
    // Every truncation of an ARP request for the VIP: the verifier already proved the bounds
    // checks; this shows each short frame takes the safe path.
    for len in 14..request.len() {
        let (action, out) = run(&mut l, &request[..len]);
        assert_eq!(action, XDP_PASS, "{len} bytes");
        assert_eq!(out, &request[..len]);
    }
    let truncated_arps = (request.len() - 14) as u64;
    assert_eq!(
        l.dataplane.stats().unwrap()[STAT_MALFORMED as usize],
        truncated_arps
    );
    // Not Ethernet/IPv4 ARP (token ring hardware type, 16-byte protocol addresses).
    let mut odd = request.clone();
    odd[14..16].copy_from_slice(&[0, 6]);
    assert_eq!(run(&mut l, &odd).0, XDP_PASS);
    let mut odd = request.clone();
    odd[19] = 16;
    assert_eq!(run(&mut l, &odd).0, XDP_PASS);
    // Runt frame shorter than an Ethernet header, if the kernel lets us run it at all.
    let runt = [0u8; 10];
    let mut out = [0u8; 64];
    if let Ok(result) = l.dataplane.program().unwrap().test_run(TestRunOptions {
        data_in: Some(&runt),
        data_out: Some(&mut out),
        ..Default::default()
    }) {
        assert_eq!(result.return_value, XDP_PASS);
    }
}
