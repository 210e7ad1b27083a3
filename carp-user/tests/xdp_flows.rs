//! Flow capture through BPF_PROG_TEST_RUN on crafted frames: a whole TCP connection's phases
//! and the deltas it emits (birth, changes, end; not one per packet), UDP and ICMP echo in
//! both directions on one entry, a reused tuple born again, IPv6, fragments and truncated
//! headers, capture switched off,
//! a full ring buffer that loses deltas without stalling packets, and the per-CPU cache of
//! plain segments against slot sharing and LRU eviction. Needs root.

mod support;

use aya::programs::{TestRun, TestRunOptions};
use carp_common::{
    flow::{
        DELTA_BORN, DELTA_CHANGED, DELTA_ENDED, DELTA_REFRESH, FLOW_CACHE_HOLD_NS, FlowKey,
        WSCALE_SEEN, tcp_phase,
    },
    maps::{STAT_DELTA_LOST, STAT_FLOW_UNTRACKED, STAT_MALFORMED},
};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};
use std::time::Duration;
use support::{Loaded, XDP_PASS, load, load_with, run};

const CLIENT: [u8; 4] = [198, 18, 1, 100];
const SERVER: [u8; 4] = [198, 18, 2, 100];
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const RST: u8 = 0x04;

fn eth(ethertype: [u8; 2]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 0x50];
    f.extend_from_slice(&ethertype);
    f
}

fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], frag: u16, l4: &[u8]) -> Vec<u8> {
    let mut f = eth([0x08, 0x00]);
    let total = (20 + l4.len()) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&frag.to_be_bytes());
    f.extend_from_slice(&[64, proto, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(l4);
    f
}

fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, payload: usize) -> Vec<u8> {
    let mut t = tcp_header(sport, dport, seq, ack, flags, &[]);
    t.resize(20 + payload, 0);
    t
}

/// A TCP header with `options` (a multiple of 4 bytes) and no payload.
fn tcp_header(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, options: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    let words = (20 + options.len()) as u8 / 4;
    t.extend_from_slice(&[words << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    t.extend_from_slice(options);
    t
}

/// A TCP segment between the client (port 40000) and the server (port 80).
fn segment(from_client: bool, seq: u32, ack: u32, flags: u8, payload: usize) -> Vec<u8> {
    segment_on(40000, from_client, seq, ack, flags, payload)
}

/// A TCP segment between the client's `port` and the server's port 80.
fn segment_on(
    port: u16,
    from_client: bool,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: usize,
) -> Vec<u8> {
    if from_client {
        ipv4(
            6,
            CLIENT,
            SERVER,
            0x4000,
            &tcp(port, 80, seq, ack, flags, payload),
        )
    } else {
        ipv4(
            6,
            SERVER,
            CLIENT,
            0x4000,
            &tcp(80, port, seq, ack, flags, payload),
        )
    }
}

fn key(proto: u8, ports: [u16; 2]) -> FlowKey {
    let mut k = FlowKey {
        proto,
        family: 4,
        ..FlowKey::default()
    };
    k.addr[0][..4].copy_from_slice(&CLIENT);
    k.addr[1][..4].copy_from_slice(&SERVER);
    k.port = [ports[0].to_be_bytes(), ports[1].to_be_bytes()];
    k
}

fn capturing(refresh: Duration) -> Loaded {
    load_with(Some(refresh))
}

fn pass(l: &mut Loaded, frame: &[u8]) {
    assert_eq!(
        run(l, frame),
        (XDP_PASS, frame.to_vec()),
        "frames pass untouched"
    );
}

fn delta_kinds(l: &mut Loaded) -> Vec<u8> {
    std::iter::from_fn(|| l.dataplane.next_delta())
        .map(|d| d.kind)
        .collect()
}

/// Behind a NAT, each side of the gateway sees one direction of a connection under its own
/// key: the client's ACK after its SYN still establishes its direction there.
#[test]
fn one_direction_seen_alone_reaches_established() {
    let mut l = capturing(Duration::from_secs(60));
    let k = key(6, [40000, 80]);
    pass(&mut l, &segment(true, 1000, 0, SYN, 0));
    pass(&mut l, &segment(true, 1001, 5001, ACK, 0));
    let e = l.dataplane.flow(&k).expect("flow tracked");
    assert_eq!(
        [e.tcp[0].phase, e.tcp[1].phase],
        [tcp_phase::ESTABLISHED, tcp_phase::NONE]
    );
    assert_eq!(e.packets, [2, 0]);
    // Born, then one change; the unseen direction stays untouched.
    assert_eq!(delta_kinds(&mut l), [DELTA_BORN, DELTA_CHANGED]);
}

#[test]
fn a_tcp_connection_moves_through_its_phases_with_one_delta_per_change() {
    let mut l = capturing(Duration::from_secs(60));
    let k = key(6, [40000, 80]);
    let phases = |l: &Loaded| {
        let e = l.dataplane.flow(&k).expect("flow tracked");
        [e.tcp[0].phase, e.tcp[1].phase]
    };
    pass(&mut l, &segment(true, 1000, 0, SYN, 0));
    assert_eq!(phases(&l), [tcp_phase::SYN_SENT, tcp_phase::NONE]);
    pass(&mut l, &segment(false, 5000, 1001, SYN | ACK, 0));
    assert_eq!(phases(&l), [tcp_phase::SYN_SENT, tcp_phase::SYN_RECEIVED]);
    pass(&mut l, &segment(true, 1001, 5001, ACK, 0));
    assert_eq!(phases(&l), [tcp_phase::ESTABLISHED; 2]);
    for i in 0..5 {
        pass(&mut l, &segment(true, 1001 + i * 100, 5001, ACK, 100));
    }
    let e = l.dataplane.flow(&k).unwrap();
    assert_eq!(e.tcp[0].seqlo, 1501, "client has sent up to 1501");
    pass(&mut l, &segment(true, 1501, 5001, FIN | ACK, 0));
    assert_eq!(phases(&l), [tcp_phase::FIN_WAIT, tcp_phase::ESTABLISHED]);
    pass(&mut l, &segment(false, 5001, 1502, FIN | ACK, 0));
    assert_eq!(phases(&l), [tcp_phase::TIME_WAIT; 2]);
    let e = l.dataplane.flow(&k).unwrap();
    assert_eq!(e.packets, [8, 2]);
    assert_eq!(e.bytes[1], 2 * 54);
    assert_eq!(
        delta_kinds(&mut l),
        [
            DELTA_BORN,
            DELTA_CHANGED,
            DELTA_CHANGED,
            DELTA_CHANGED,
            DELTA_ENDED
        ],
        "no delta for plain data segments"
    );
}

/// Keeps this test on one CPU, so every run meets the same per-CPU flow cache.
fn stay_on_one_cpu() {
    let mut cpus = CpuSet::new();
    cpus.set(0).unwrap();
    sched_setaffinity(Pid::from_raw(0), &cpus).unwrap();
}

/// Longer than a tick at any HZ, well within `FLOW_CACHE_HOLD_NS`.
const NEXT_TICK: Duration = Duration::from_millis(20);

/// Handshake on the client's `port`, then `n` client data segments of 100 bytes.
fn established_with_data(l: &mut Loaded, port: u16, n: u32) {
    pass(l, &segment_on(port, true, 1000, 0, SYN, 0));
    pass(l, &segment_on(port, false, 5000, 1001, SYN | ACK, 0));
    pass(l, &segment_on(port, true, 1001, 5001, ACK, 0));
    for i in 0..n {
        pass(l, &segment_on(port, true, 1001 + i * 100, 5001, ACK, 100));
    }
}

/// Five data segments summed in the CPU cache on a fresh flow of `ports`; which port did it.
/// BPF_PROG_TEST_RUN runs take microseconds, so they land in one tick unless a tick boundary
/// falls in between: a few tries on fresh flows make that chance nil.
fn summed_in_the_cache(l: &mut Loaded, ports: std::ops::Range<u16>) -> u16 {
    let map = l.dataplane.open_flow_map().unwrap();
    ports
        .into_iter()
        .find(|&port| {
            established_with_data(l, port, 5);
            map.get(&key(6, [port, 80]), 0).unwrap().packets[0] < 7
        })
        .expect("plain segments are summed in the per-CPU cache")
}

#[test]
fn plain_segments_wait_in_the_cpu_cache_until_a_flag_or_the_hold_runs_out() {
    stay_on_one_cpu();
    let mut l = capturing(Duration::from_secs(60));
    let map = l.dataplane.open_flow_map().unwrap();
    let in_map = |port: u16| map.get(&key(6, [port, 80]), 0).unwrap();
    let port = summed_in_the_cache(&mut l, 40100..40103);
    // Readers fold the cache in: they see every packet and the furthest sequence.
    let seen = l.dataplane.flow(&key(6, [port, 80])).unwrap();
    assert_eq!(seen.packets, [7, 1]);
    assert_eq!(seen.bytes[0], 2 * 54 + 5 * 154);
    assert_eq!(seen.tcp[0].seqlo, 1501);
    while l.dataplane.next_delta().is_some() {}
    // A FIN takes the map path and brings the sums along, also into its delta.
    pass(&mut l, &segment_on(port, true, 1501, 5001, FIN | ACK, 0));
    let e = in_map(port);
    assert_eq!(e.packets, [8, 1]);
    assert_eq!(e.tcp[0].seqlo, 1502);
    let delta = l.dataplane.next_delta().expect("FIN is a phase change");
    assert_eq!((delta.kind, delta.entry.packets), (DELTA_CHANGED, [8, 1]));
    // Plain segments again (the flow is settled in FIN_WAIT), summed straight from the frame
    // in the other direction too; ticks later they still wait in the cache...
    for _ in 0..3 {
        pass(&mut l, &segment_on(port, false, 5001, 1502, ACK, 0));
    }
    std::thread::sleep(NEXT_TICK);
    pass(&mut l, &segment_on(port, false, 5001, 1502, ACK, 0));
    assert_eq!(in_map(port).packets, [8, 1], "held past a tick");
    assert_eq!(
        l.dataplane.flow(&key(6, [port, 80])).unwrap().packets,
        [8, 5]
    );
    // ...until the hold runs out: the next packet writes them back.
    std::thread::sleep(Duration::from_nanos(FLOW_CACHE_HOLD_NS));
    pass(&mut l, &segment_on(port, false, 5001, 1502, ACK, 0));
    assert_eq!(in_map(port).packets, [8, 6]);
}

#[test]
fn a_segment_without_ack_takes_the_map_path_and_brings_the_sums_along() {
    stay_on_one_cpu();
    let mut l = capturing(Duration::from_secs(60));
    let map = l.dataplane.open_flow_map().unwrap();
    let port = summed_in_the_cache(&mut l, 40150..40153);
    let held = map.get(&key(6, [port, 80]), 0).unwrap().packets;
    assert!(held[0] < 7, "the data segments wait in the cache");
    // Only a broken or hostile sender omits ACK after the handshake: the cache sums only
    // segments that carry one, so this one is tracked in the map, with the sums before it.
    pass(&mut l, &segment_on(port, true, 1501, 0, PSH, 100));
    let e = map.get(&key(6, [port, 80]), 0).unwrap();
    assert_eq!(e.packets, [8, 1]);
    assert_eq!(e.tcp[0].seqlo, 1601);
}

#[test]
fn a_flow_sharing_a_cache_slot_never_loses_the_other_flows_sums() {
    stay_on_one_cpu();
    let mut l = capturing(Duration::from_secs(60));
    let map = l.dataplane.open_flow_map().unwrap();
    let first = 40200;
    let slot = key(6, [first, 80]).cache_slot();
    let second = (first + 1..u16::MAX)
        .find(|&port| key(6, [port, 80]).cache_slot() == slot)
        .expect("another port with the same slot");
    established_with_data(&mut l, first, 5);
    // The second flow meets the slot taken in this tick: it goes to the map every time.
    established_with_data(&mut l, second, 3);
    for (port, packets) in [(first, [7, 1]), (second, [5, 1])] {
        assert_eq!(
            l.dataplane.flow(&key(6, [port, 80])).unwrap().packets,
            packets
        );
    }
    // Next tick: the second flow takes the slot and writes the first one's sums back.
    std::thread::sleep(NEXT_TICK);
    pass(&mut l, &segment_on(second, true, 1301, 5001, ACK, 0));
    assert_eq!(map.get(&key(6, [first, 80]), 0).unwrap().packets, [7, 1]);
    assert_eq!(map.get(&key(6, [second, 80]), 0).unwrap().packets, [6, 1]);
}

#[test]
fn a_flow_the_map_evicts_while_the_cache_holds_its_sums_is_reborn_with_them() {
    stay_on_one_cpu();
    let mut l = capturing(Duration::from_secs(60));
    let mut map = l.dataplane.open_flow_map().unwrap();
    let port = summed_in_the_cache(&mut l, 40300..40303);
    // The LRU map evicts the flow; the cache still holds its 5 segments.
    map.remove(&key(6, [port, 80])).unwrap();
    while l.dataplane.next_delta().is_some() {}
    // Its FIN finds no entry: the flow is born again with the cached sums and the FIN.
    pass(&mut l, &segment_on(port, true, 1501, 5001, FIN | ACK, 0));
    let e = map.get(&key(6, [port, 80]), 0).unwrap();
    assert_eq!(e.packets, [6, 0]);
    assert_eq!(e.bytes[0], 5 * 154 + 54);
    let delta = l.dataplane.next_delta().expect("a birth");
    assert_eq!((delta.kind, delta.entry.packets), (DELTA_BORN, [6, 0]));
}

#[test]
fn sums_of_an_evicted_flow_are_dropped_without_harm_to_the_flow_taking_the_slot() {
    stay_on_one_cpu();
    let mut l = capturing(Duration::from_secs(60));
    let mut map = l.dataplane.open_flow_map().unwrap();
    let evicted = summed_in_the_cache(&mut l, 40400..40403);
    let slot = key(6, [evicted, 80]).cache_slot();
    let other = (evicted + 3..u16::MAX)
        .find(|&port| key(6, [port, 80]).cache_slot() == slot)
        .expect("another port with the same slot");
    map.remove(&key(6, [evicted, 80])).unwrap();
    // Next tick: the other flow takes the slot; the write-back finds no entry to add to.
    std::thread::sleep(NEXT_TICK);
    pass(&mut l, &segment_on(other, true, 1000, 0, SYN, 0));
    assert!(
        map.get(&key(6, [evicted, 80]), 0).is_err(),
        "an evicted flow is not resurrected by its sums"
    );
    assert_eq!(map.get(&key(6, [other, 80]), 0).unwrap().packets, [1, 0]);
    established_with_data(&mut l, other, 0);
    assert_eq!(
        l.dataplane.flow(&key(6, [other, 80])).unwrap().packets,
        [3, 1]
    );
}

#[test]
fn seqhi_follows_the_peers_ack_and_window() {
    let mut l = capturing(Duration::from_secs(60));
    pass(&mut l, &segment(true, 1000, 0, SYN, 0));
    pass(&mut l, &segment(false, 5000, 1001, SYN | ACK, 0));
    let e = l.dataplane.flow(&key(6, [40000, 80])).unwrap();
    assert_eq!(
        e.tcp[0].seqhi,
        1001 + 0xfaf0,
        "client may send up to ack + window"
    );
    assert_eq!(e.tcp[1].max_win, 0xfaf0);
}

#[test]
fn window_scale_is_taken_from_each_syn() {
    let mut l = capturing(Duration::from_secs(60));
    // Linux's SYN: MSS, SACK permitted, timestamps, NOP, window scale 7.
    let linux = [
        2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];
    // Windows' SYN-ACK: MSS, NOP, window scale 0 (present: scaling is on), NOP, NOP, SACK.
    let windows = [2, 4, 0x05, 0xb4, 1, 3, 3, 0, 1, 1, 4, 2];
    let syn = tcp_header(40000, 80, 1000, 0, SYN, &linux);
    let syn_ack = tcp_header(80, 40000, 5000, 1001, SYN | ACK, &windows);
    pass(&mut l, &ipv4(6, CLIENT, SERVER, 0x4000, &syn));
    pass(&mut l, &ipv4(6, SERVER, CLIENT, 0x4000, &syn_ack));
    let e = l.dataplane.flow(&key(6, [40000, 80])).unwrap();
    assert_eq!(e.tcp[0].wscale, WSCALE_SEEN | 7);
    assert_eq!(e.tcp[1].wscale, WSCALE_SEEN);
    // Without the option, or with options the frame cuts short, the scale is unknown (0).
    let bare = tcp_header(40001, 80, 1000, 0, SYN, &[2, 4, 0x05, 0xb4]);
    pass(&mut l, &ipv4(6, CLIENT, SERVER, 0x4000, &bare));
    assert_eq!(
        l.dataplane.flow(&key(6, [40001, 80])).unwrap().tcp[0].wscale,
        0
    );
    let cut = ipv4(
        6,
        CLIENT,
        SERVER,
        0x4000,
        &tcp_header(40002, 80, 1, 0, SYN, &linux),
    );
    pass(&mut l, &cut[..cut.len() - 2]);
    let e = l.dataplane.flow(&key(6, [40002, 80])).unwrap();
    assert_eq!(e.tcp[0].wscale, 0);
    // A zero-length option cannot stall the walk; a shift over 14 is read as 14.
    let looping = tcp_header(40003, 80, 1, 0, SYN, &[8, 0, 1, 1]);
    pass(&mut l, &ipv4(6, CLIENT, SERVER, 0x4000, &looping));
    let huge = tcp_header(40004, 80, 1, 0, SYN, &[3, 3, 30, 0]);
    pass(&mut l, &ipv4(6, CLIENT, SERVER, 0x4000, &huge));
    assert_eq!(
        l.dataplane.flow(&key(6, [40003, 80])).unwrap().tcp[0].wscale,
        0
    );
    assert_eq!(
        l.dataplane.flow(&key(6, [40004, 80])).unwrap().tcp[0].wscale,
        WSCALE_SEEN | 14
    );
}

#[test]
fn a_reset_ends_the_flow() {
    let mut l = capturing(Duration::from_secs(60));
    pass(&mut l, &segment(true, 1000, 0, SYN, 0));
    pass(&mut l, &segment(false, 0, 1001, RST | ACK, 0));
    let e = l.dataplane.flow(&key(6, [40000, 80])).unwrap();
    assert_eq!([e.tcp[0].phase, e.tcp[1].phase], [tcp_phase::CLOSED; 2]);
    assert_eq!(delta_kinds(&mut l), [DELTA_BORN, DELTA_ENDED]);
}

/// A client that reset its connection may connect again from the same port: the new SYN is
/// a new connection, born afresh, not more packets of the ended one.
#[test]
fn a_syn_on_a_reset_flows_tuple_is_a_new_connection() {
    let mut l = capturing(Duration::from_secs(60));
    let k = key(6, [40000, 80]);
    pass(&mut l, &segment(true, 1000, 0, SYN, 0));
    pass(&mut l, &segment(false, 5000, 1001, SYN | ACK, 0));
    pass(&mut l, &segment(true, 1001, 5001, RST | ACK, 0));
    assert_eq!(
        delta_kinds(&mut l),
        [DELTA_BORN, DELTA_CHANGED, DELTA_ENDED]
    );
    pass(&mut l, &segment(true, 9000, 0, SYN, 0));
    let e = l.dataplane.flow(&k).unwrap();
    assert_eq!(
        [e.tcp[0].phase, e.tcp[1].phase],
        [tcp_phase::SYN_SENT, tcp_phase::NONE]
    );
    assert_eq!(e.packets, [1, 0], "nothing of the old connection is kept");
    assert_eq!(e.tcp[0].seqlo, 9001);
    pass(&mut l, &segment(false, 7000, 9001, SYN | ACK, 0));
    pass(&mut l, &segment(true, 9001, 7001, ACK, 0));
    assert_eq!(
        delta_kinds(&mut l),
        [DELTA_BORN, DELTA_CHANGED, DELTA_CHANGED]
    );
    let e = l.dataplane.flow(&k).unwrap();
    assert_eq!(
        [e.tcp[0].phase, e.tcp[1].phase],
        [tcp_phase::ESTABLISHED; 2]
    );
}

/// Behind a NAT the far side sees a reused tuple first as the server's SYN-ACK, and it may
/// never have seen the old connection end (the client's reset left by the other side): a
/// SYN-ACK with a new sequence number is a new connection, a retransmitted one is not.
#[test]
fn a_syn_ack_with_a_new_sequence_number_is_a_new_connection() {
    let mut l = capturing(Duration::from_secs(60));
    let k = key(6, [40000, 80]);
    pass(&mut l, &segment(false, 5000, 1001, SYN | ACK, 0));
    pass(&mut l, &segment(false, 5000, 1001, SYN | ACK, 0));
    assert_eq!(
        delta_kinds(&mut l),
        [DELTA_BORN],
        "a retransmission is the same one"
    );
    pass(&mut l, &segment(false, 5001, 1001, ACK, 100));
    assert_eq!(delta_kinds(&mut l), [DELTA_CHANGED]);
    pass(&mut l, &segment(false, 8000, 3001, SYN | ACK, 0));
    assert_eq!(delta_kinds(&mut l), [DELTA_BORN]);
    let e = l.dataplane.flow(&k).unwrap();
    assert_eq!(
        [e.tcp[0].phase, e.tcp[1].phase],
        [tcp_phase::NONE, tcp_phase::SYN_RECEIVED]
    );
    assert_eq!(e.packets, [0, 1]);
}

#[test]
fn an_unchanged_flow_is_refreshed_to_the_peer_after_refresh_ns() {
    let mut l = capturing(Duration::ZERO);
    pass(&mut l, &segment(true, 1000, 0, SYN, 0));
    pass(&mut l, &segment(true, 1000, 0, SYN, 0));
    pass(&mut l, &segment(true, 1000, 0, SYN, 0));
    assert_eq!(
        delta_kinds(&mut l),
        [DELTA_BORN, DELTA_REFRESH, DELTA_REFRESH]
    );
}

#[test]
fn udp_both_directions_share_one_entry() {
    let mut l = capturing(Duration::from_secs(60));
    let udp = |sport: u16, dport: u16| {
        let mut u = sport.to_be_bytes().to_vec();
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&[0, 12, 0, 0, 1, 2, 3, 4]);
        u
    };
    pass(&mut l, &ipv4(17, CLIENT, SERVER, 0, &udp(5353, 53)));
    pass(&mut l, &ipv4(17, SERVER, CLIENT, 0, &udp(53, 5353)));
    pass(&mut l, &ipv4(17, SERVER, CLIENT, 0, &udp(53, 5353)));
    let e = l
        .dataplane
        .flow(&key(17, [5353, 53]))
        .expect("one UDP flow");
    assert_eq!(e.packets, [1, 2]);
    assert_eq!(l.dataplane.flow_count(), 1);
    assert_eq!(delta_kinds(&mut l), [DELTA_BORN]);
}

#[test]
fn icmp_echo_request_and_reply_share_one_entry_and_errors_are_not_tracked() {
    let mut l = capturing(Duration::from_secs(60));
    let echo = |kind: u8| vec![kind, 0, 0, 0, 0x12, 0x34, 0, 1];
    pass(&mut l, &ipv4(1, CLIENT, SERVER, 0, &echo(8)));
    pass(&mut l, &ipv4(1, SERVER, CLIENT, 0, &echo(0)));
    let e = l
        .dataplane
        .flow(&key(1, [0x1234, 0x1234]))
        .expect("echo flow");
    assert_eq!(e.packets, [1, 1]);
    pass(
        &mut l,
        &ipv4(1, SERVER, CLIENT, 0, &[3, 1, 0, 0, 0, 0, 0, 0]),
    );
    assert_eq!(l.dataplane.flow_count(), 1);
    assert_eq!(
        l.dataplane.stats().unwrap()[STAT_FLOW_UNTRACKED as usize],
        1
    );
}

#[test]
fn ipv6_tcp_is_tracked_with_its_full_addresses() {
    let mut l = capturing(Duration::from_secs(60));
    let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let dst = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let l4 = tcp(40000, 443, 7, 0, SYN, 0);
    let mut f = eth([0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    f.extend_from_slice(&[6, 64]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&l4);
    pass(&mut l, &f);
    let k = FlowKey {
        addr: [src, dst],
        port: [40000u16.to_be_bytes(), 443u16.to_be_bytes()],
        proto: 6,
        family: 6,
        _pad: [0; 2],
    };
    let e = l.dataplane.flow(&k).expect("IPv6 flow");
    assert_eq!(e.tcp[0].phase, tcp_phase::SYN_SENT);
    assert_eq!(e.bytes[0], f.len() as u64);
}

#[test]
fn fragments_and_truncated_headers_pass_without_a_flow() {
    let mut l = capturing(Duration::from_secs(60));
    // A later fragment (offset 185 x 8 bytes): no L4 header to read.
    pass(&mut l, &ipv4(6, CLIENT, SERVER, 185, &[0u8; 20]));
    // A first fragment (more-fragments bit) is left alone too.
    pass(&mut l, &ipv4(17, CLIENT, SERVER, 0x2000, &[0u8; 8]));
    assert_eq!(
        l.dataplane.stats().unwrap()[STAT_FLOW_UNTRACKED as usize],
        2
    );
    let syn = segment(true, 1000, 0, SYN, 0);
    for len in 14..syn.len() {
        pass(&mut l, &syn[..len]);
    }
    assert_eq!(l.dataplane.flow_count(), 0);
    assert!(l.dataplane.stats().unwrap()[STAT_MALFORMED as usize] >= 20);
    assert_eq!(delta_kinds(&mut l), Vec::<u8>::new());
}

#[test]
fn capture_off_tracks_nothing() {
    let mut l = load();
    pass(&mut l, &segment(true, 1000, 0, SYN, 0));
    assert_eq!(l.dataplane.flow_count(), 0);
    assert!(l.dataplane.next_delta().is_none());
}

#[test]
fn a_full_ring_buffer_loses_deltas_but_never_stalls_a_packet() {
    let mut l = capturing(Duration::ZERO);
    // Every run refreshes the flow; far more deltas than the 4 MiB ring holds, none drained.
    let syn = segment(true, 1000, 0, SYN, 0);
    let result = l
        .dataplane
        .program()
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(&syn),
            repeat: 60_000,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(result.return_value, XDP_PASS);
    let lost = l.dataplane.stats().unwrap()[STAT_DELTA_LOST as usize];
    assert!(lost > 20_000, "lost {lost}");
    let kept = std::iter::from_fn(|| l.dataplane.next_delta()).count() as u64;
    assert_eq!(kept + lost, 60_000);
}
