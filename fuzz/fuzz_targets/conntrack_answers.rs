//! What the kernel's ctnetlink socket hands back: a datagram of answers, possibly cut short
//! or from a newer kernel with attributes carp does not read, must never panic the parser or
//! yield a request's unanswered state; and a GET's answer laid out by carp's own encoder must
//! parse back to the same connection.
#![no_main]

use carp::{
    conntrack::{self, Answer, Entry},
    flow::FlowKey,
};
use carp_common::flow::{IPPROTO_ICMP, IPPROTO_ICMPV6};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fuzz_target!(|data: &[u8]| {
    for (_, answer) in conntrack::parse_answers(data) {
        assert_ne!(answer, Answer::Pending);
    }
    if let Some(entry) = entry_from(data) {
        let message = conntrack::entry_message(7, &entry);
        assert_eq!(
            conntrack::parse_answers(&message),
            [(7, Answer::Entry(entry))]
        );
    }
});

/// An entry made of the fuzzer's bytes: two tuples of one address family, an ICMP tuple's
/// echo id in `src_port` (the only one the kernel keeps), and a timeout.
fn entry_from(data: &[u8]) -> Option<Entry> {
    let (&v6, rest) = data.split_first()?;
    let (orig, rest) = key_from(rest, v6 & 1 == 1)?;
    let (reply, rest) = key_from(rest, v6 & 1 == 1)?;
    let timeout = rest.get(..4)?;
    Some(Entry {
        orig,
        reply,
        timeout_s: u32::from_be_bytes(timeout.try_into().ok()?),
    })
}

fn key_from(data: &[u8], v6: bool) -> Option<(FlowKey, &[u8])> {
    let width = if v6 { 16 } else { 4 };
    let (&proto, rest) = data.split_first()?;
    let addr = |bytes: &[u8]| -> Option<IpAddr> {
        Some(if v6 {
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?))
        } else {
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))
        })
    };
    let src = addr(rest.get(..width)?)?;
    let dst = addr(rest.get(width..2 * width)?)?;
    let ports = rest.get(2 * width..2 * width + 4)?;
    let icmp = proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
    let key = FlowKey {
        proto,
        src,
        dst,
        src_port: u16::from_be_bytes([ports[0], ports[1]]),
        dst_port: if icmp {
            0
        } else {
            u16::from_be_bytes([ports[2], ports[3]])
        },
    };
    Some((key, &rest[2 * width + 4..]))
}
