//! Between XDP's flow map and the sync records. XDP keys a flow by its two endpoints, sorted;
//! a record names the original direction. Where NAT rewrites a connection, XDP sees it as
//! two flows (one per side of the gateway, each in one direction only), so a record is
//! folded together from up to two such views.

use crate::conntrack::KernelTcpState;
use crate::flow::{FlowKey, FlowRecord, TcpPeer};
use carp_common::flow::{
    self as xdp, FlowEntry, IPPROTO_TCP, IPPROTO_UDP, TcpTrack, is_icmp, tcp_phase,
};
use std::net::IpAddr;

/// Which of a connection's tuples an XDP flow carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The original tuple: seen where the connection enters untranslated.
    Original,
    /// The (translated) reply tuple: seen on the far side of a NAT.
    Reply,
}

/// How one XDP flow maps onto a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewOf {
    /// The connection's original tuple.
    pub connection: FlowKey,
    pub side: Side,
    /// The endpoint (0 or 1 of the XDP key) that sends that side's tuple.
    pub sender: usize,
}

fn ip_of(bytes: &[u8; 16], family: u8) -> IpAddr {
    if family == 4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(*bytes)
    }
}

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The tuple XDP's flow `key` has when endpoint `sender` sends (ICMP: the echo id, 0).
pub fn tuple_of(key: &xdp::FlowKey, sender: usize) -> FlowKey {
    let (s, d) = (sender & 1, (sender & 1) ^ 1);
    let port = |i: usize| u16::from_be_bytes(key.port[i]);
    FlowKey {
        proto: key.proto,
        src: ip_of(&key.addr[s], key.family),
        dst: ip_of(&key.addr[d], key.family),
        src_port: port(s),
        dst_port: if is_icmp(key.proto) { 0 } else { port(d) },
    }
}

/// XDP's key for `tuple`, and which endpoint of it sends `tuple`. The order matches XDP's:
/// endpoint 0 is the lower (address, port).
pub fn key_of(tuple: &FlowKey) -> (xdp::FlowKey, usize) {
    let src = ip_bytes(tuple.src);
    let dst = ip_bytes(tuple.dst);
    let (sport, dport) = if is_icmp(tuple.proto) {
        (tuple.src_port, tuple.src_port)
    } else {
        (tuple.src_port, tuple.dst_port)
    };
    let src_first = (src, sport) <= (dst, dport);
    let (a, b) = if src_first {
        ((src, sport), (dst, dport))
    } else {
        ((dst, dport), (src, sport))
    };
    let key = xdp::FlowKey {
        addr: [a.0, b.0],
        port: [a.1.to_be_bytes(), b.1.to_be_bytes()],
        proto: tuple.proto,
        family: if tuple.src.is_ipv4() { 4 } else { 6 },
        _pad: [0; 2],
    };
    (key, if src_first { 0 } else { 1 })
}

/// The endpoint that sent a newborn flow's first packet: the connection's initiator on the
/// original side, the replier on a NAT's far side.
pub fn first_sender(entry: &FlowEntry) -> usize {
    usize::from(entry.packets[0] == 0)
}

/// A fresh record for a connection, before any view is folded in.
pub fn empty_record(connection: FlowKey, reply: FlowKey) -> FlowRecord {
    FlowRecord {
        key: connection,
        reply,
        tcp: [TcpPeer::default(); 2],
        packets: [0; 2],
        bytes: [0; 2],
        timeout_s: 0,
    }
}

fn peer_of(t: &TcpTrack) -> TcpPeer {
    TcpPeer {
        phase: t.phase,
        wscale: t.wscale,
        max_win: t.max_win,
        seqlo: t.seqlo,
        seqhi: t.seqhi,
    }
}

fn track_of(p: &TcpPeer) -> TcpTrack {
    TcpTrack {
        seqlo: p.seqlo,
        seqhi: p.seqhi,
        max_win: p.max_win,
        wscale: p.wscale,
        phase: p.phase,
    }
}

/// Which XDP endpoint sends each record direction (0 original, 1 reply) in `view`.
fn endpoints(view: &ViewOf) -> [usize; 2] {
    match view.side {
        Side::Original => [view.sender, view.sender ^ 1],
        Side::Reply => [view.sender ^ 1, view.sender],
    }
}

/// Folds XDP's `entry` for one view into `record`: each direction the view has seen packets
/// of, and at least as many as the record holds, is taken from it.
pub fn fold(record: &mut FlowRecord, entry: &FlowEntry, view: &ViewOf) {
    for (direction, e) in endpoints(view).into_iter().enumerate() {
        let e = e & 1;
        if entry.packets[e] > 0 && entry.packets[e] >= record.packets[direction] {
            record.packets[direction] = entry.packets[e];
            record.bytes[direction] = entry.bytes[e];
            record.tcp[direction] = peer_of(&entry.tcp[e]);
        }
    }
    record.timeout_s = kernel_timeout(record);
}

/// XDP flows for a record as the peer installs them, marked learned: the original side, and
/// the far side of a NAT when the connection is translated.
pub fn entries_of(record: &FlowRecord, now_ns: u64) -> Vec<(xdp::FlowKey, FlowEntry)> {
    let mut out = Vec::with_capacity(2);
    for (tuple, side) in [(record.key, Side::Original), (record.reply, Side::Reply)] {
        let (key, sender) = key_of(&tuple);
        // An untranslated flow is one XDP key for both tuples.
        if out.iter().any(|(k, _)| *k == key) {
            continue;
        }
        let view = ViewOf {
            connection: record.key,
            side,
            sender,
        };
        let mut entry = FlowEntry {
            first_ns: now_ns,
            last_ns: now_ns,
            synced_ns: now_ns,
            learned: 1,
            ..FlowEntry::default()
        };
        for (direction, e) in endpoints(&view).into_iter().enumerate() {
            entry.packets[e & 1] = record.packets[direction];
            entry.bytes[e & 1] = record.bytes[direction];
            entry.tcp[e & 1] = track_of(&record.tcp[direction]);
        }
        out.push((key, entry));
    }
    out
}

/// Whether the connection is over: reset, or both directions have sent their FIN.
pub fn ended(record: &FlowRecord) -> bool {
    let [a, b] = [record.tcp[0].phase, record.tcp[1].phase];
    record.key.proto == IPPROTO_TCP
        && (a == tcp_phase::CLOSED
            || b == tcp_phase::CLOSED
            || (a >= tcp_phase::FIN_WAIT && b >= tcp_phase::FIN_WAIT))
}

/// How long the kernel keeps such a connection without traffic (its default timeouts, in
/// seconds), so the peer's copy expires when the original would.
pub fn kernel_timeout(record: &FlowRecord) -> u32 {
    match record.key.proto {
        IPPROTO_TCP => KernelTcpState::of(record).timeout_s(),
        IPPROTO_UDP if record.packets[1] > 0 => 120,
        IPPROTO_UDP => 30,
        _ => 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carp_common::flow::IPPROTO_ICMP;
    use proptest::prelude::*;

    fn tuple(proto: u8, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
        FlowKey {
            proto,
            src: IpAddr::from(src),
            dst: IpAddr::from(dst),
            src_port: sport,
            dst_port: if is_icmp(proto) { 0 } else { dport },
        }
    }

    proptest! {
        #[test]
        fn tuples_survive_the_trip_through_xdp_keys(
            proto in prop::sample::select(vec![IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP]),
            src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16,
        ) {
            let t = tuple(proto, src, sport, dst, dport);
            let (key, sender) = key_of(&t);
            prop_assert_eq!(tuple_of(&key, sender), t);
            // The other direction lands on the same key.
            let back = crate::conntrack::invert(&t);
            let (key2, sender2) = key_of(&back);
            prop_assert_eq!(key, key2);
            if t.src != t.dst || (!is_icmp(proto) && sport != dport) {
                prop_assert_eq!(sender2, sender ^ 1);
            }
        }
    }

    fn entry(packets: [u64; 2], phases: [u8; 2]) -> FlowEntry {
        let mut e = FlowEntry {
            packets,
            bytes: packets.map(|p| p * 100),
            ..FlowEntry::default()
        };
        e.tcp[0].phase = phases[0];
        e.tcp[1].phase = phases[1];
        e
    }

    /// A SNATed connection: XDP sees the client's direction on the LAN, the server's on the
    /// WAN, under different keys. The record gets each direction from the side that saw it.
    #[test]
    fn nat_views_fold_into_one_record() {
        let orig = tuple(IPPROTO_TCP, [198, 18, 1, 100], 40000, [198, 18, 2, 100], 80);
        let reply = tuple(IPPROTO_TCP, [198, 18, 2, 100], 80, [198, 18, 2, 1], 61000);
        let (lan_key, lan_sender) = key_of(&orig);
        let (wan_key, wan_sender) = key_of(&reply);
        assert_ne!(lan_key, wan_key);
        let est = tcp_phase::ESTABLISHED;
        let mut lan = entry([0; 2], [0; 2]);
        lan.packets[lan_sender] = 5;
        lan.tcp[lan_sender].phase = est;
        let mut wan = entry([0; 2], [0; 2]);
        wan.packets[wan_sender] = 7;
        wan.tcp[wan_sender].phase = est;
        let mut record = empty_record(orig, reply);
        let lan_view = ViewOf {
            connection: orig,
            side: Side::Original,
            sender: lan_sender,
        };
        let wan_view = ViewOf {
            connection: orig,
            side: Side::Reply,
            sender: wan_sender,
        };
        fold(&mut record, &lan, &lan_view);
        fold(&mut record, &wan, &wan_view);
        assert_eq!(record.packets, [5, 7]);
        assert_eq!([record.tcp[0].phase, record.tcp[1].phase], [est, est]);
        assert_eq!(record.timeout_s, 432000);
        // The peer installs both views, each with the directions as XDP would see them.
        let installed = entries_of(&record, 1);
        assert_eq!(installed.len(), 2);
        let (k, e) = installed[1];
        assert_eq!(k, wan_key);
        assert_eq!(e.packets[wan_sender], 7);
        assert!(installed.iter().all(|(_, e)| e.learned == 1));
    }

    #[test]
    fn an_untranslated_flow_is_one_view() {
        let orig = tuple(IPPROTO_UDP, [198, 18, 1, 100], 5353, [198, 18, 2, 100], 53);
        let (key, sender) = key_of(&orig);
        let mut record = empty_record(orig, crate::conntrack::invert(&orig));
        let mut e = entry([0; 2], [0; 2]);
        e.packets[sender] = 2;
        e.packets[sender ^ 1] = 1;
        fold(
            &mut record,
            &e,
            &ViewOf {
                connection: orig,
                side: Side::Original,
                sender,
            },
        );
        assert_eq!(record.packets, [2, 1]);
        assert_eq!(record.timeout_s, 120);
        assert_eq!(entries_of(&record, 1).len(), 1);
        assert_eq!(entries_of(&record, 1)[0].0, key);
    }

    #[test]
    fn resets_and_double_fins_end_a_connection() {
        let orig = tuple(IPPROTO_TCP, [1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        let mut r = empty_record(orig, crate::conntrack::invert(&orig));
        r.tcp[0].phase = tcp_phase::ESTABLISHED;
        r.tcp[1].phase = tcp_phase::FIN_WAIT;
        assert!(!ended(&r));
        r.tcp[0].phase = tcp_phase::FIN_WAIT;
        assert!(ended(&r));
        r.tcp[0].phase = tcp_phase::ESTABLISHED;
        r.tcp[1].phase = tcp_phase::CLOSED;
        assert!(ended(&r));
    }

    #[test]
    fn the_first_packet_names_the_sender() {
        assert_eq!(first_sender(&entry([1, 0], [0; 2])), 0);
        assert_eq!(first_sender(&entry([0, 1], [0; 2])), 1);
    }
}
