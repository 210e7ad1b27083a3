//! Flow capture: every IPv4/IPv6 TCP, UDP and ICMP echo packet updates its flow's entry
//! (counters, pf-style TCP tracking), and a delta goes on the ring buffer when the flow is
//! born, a TCP direction changes phase, the flow ends, or the peer has not heard of it for
//! `refresh_ns`: not per packet. A full ring buffer never stalls the packet: the loss is
//! counted and the next refresh repairs it.

use crate::{count, ptr_at};
use aya_ebpf::{
    btf_maps::{Array, LruHashMap, RingBuf},
    macros::btf_map,
    programs::XdpContext,
};
use carp_common::{
    flow::{
        CaptureConfig, DEFAULT_FLOWS_MAX, DELTA_BORN, DELTA_CHANGED, DELTA_ENDED, DELTA_REFRESH,
        DELTA_RING_BYTES, FlowDelta, FlowEntry, FlowKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
        IPPROTO_UDP, TcpTrack, WSCALE_MAX, WSCALE_SEEN, tcp_phase,
    },
    maps::{STAT_DELTA_LOST, STAT_FLOW_INSERT_FAILED, STAT_FLOW_PACKETS, STAT_FLOW_UNTRACKED},
};

#[btf_map]
static CARP_FLOWS: LruHashMap<FlowKey, FlowEntry, { DEFAULT_FLOWS_MAX as usize }> =
    LruHashMap::new();

#[btf_map]
static CARP_DELTAS: RingBuf<FlowDelta, { DELTA_RING_BYTES as usize }> = RingBuf::new();

#[btf_map]
static CARP_CAPTURE: Array<CaptureConfig, 1> = Array::new();

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800u16.to_be();
const ETHERTYPE_IPV6: u16 = 0x86ddu16.to_be();
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const BPF_NOEXIST: u64 = 1;

/// What one packet says about its flow: the key in the packet's own (source, destination)
/// order until `update` normalises it.
struct Packet {
    key: FlowKey,
    /// All zero unless the key's protocol is TCP. Not an `Option`: LLVM may fill a `None`'s
    /// undefined bytes from any register, and the verifier refuses spilled packet pointers.
    tcp: Segment,
    /// Frame bytes as the IP header states them (no pointer arithmetic on the frame).
    len: u64,
}

#[derive(Default)]
struct Segment {
    flags: u8,
    /// `WSCALE_SEEN | shift` from a SYN's options, else 0.
    wscale: u8,
    seq: u32,
    ack: u32,
    win: u16,
    payload: u32,
}

/// Tracks the packet in `ctx` if capture is on. `Err` for headers cut short.
#[inline(always)]
pub fn track(ctx: &XdpContext, ether_type: u16) -> Result<(), ()> {
    let Some(config) = CARP_CAPTURE.get(0) else {
        return Ok(());
    };
    if config.enabled == 0 {
        return Ok(());
    }
    let packet = if ether_type == ETHERTYPE_IPV4 {
        parse_ipv4(ctx)?
    } else if ether_type == ETHERTYPE_IPV6 {
        parse_ipv6(ctx)?
    } else {
        return Ok(());
    };
    match packet {
        Some(mut packet) => update(&mut packet, config.refresh_ns),
        None => count(STAT_FLOW_UNTRACKED),
    }
    Ok(())
}

fn parse_ipv4(ctx: &XdpContext) -> Result<Option<Packet>, ()> {
    let ip: *const [u8; 20] = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds-checked by ptr_at; byte array, alignment 1.
    let ip = unsafe { &*ip };
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(());
    }
    // Fragments carry no (or a partial) L4 header: not tracked.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Ok(None);
    }
    let total = u32::from(u16::from_be_bytes([ip[2], ip[3]]));
    let mut key = FlowKey {
        proto: ip[9],
        family: 4,
        ..FlowKey::default()
    };
    key.addr[0][..4].copy_from_slice(&ip[12..16]);
    key.addr[1][..4].copy_from_slice(&ip[16..20]);
    let l4_len = total.saturating_sub(ihl as u32);
    parse_l4(
        ctx,
        ETH_LEN + ihl,
        key,
        l4_len,
        u64::from(total) + ETH_LEN as u64,
    )
}

fn parse_ipv6(ctx: &XdpContext) -> Result<Option<Packet>, ()> {
    let ip: *const [u8; 40] = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds-checked by ptr_at; byte array, alignment 1.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 6 {
        return Err(());
    }
    let mut key = FlowKey {
        proto: ip[6],
        family: 6,
        ..FlowKey::default()
    };
    key.addr[0].copy_from_slice(&ip[8..24]);
    key.addr[1].copy_from_slice(&ip[24..40]);
    let l4_len = u32::from(u16::from_be_bytes([ip[4], ip[5]]));
    // Extension headers (next header not an L4 protocol) fall through to "not tracked".
    parse_l4(
        ctx,
        ETH_LEN + 40,
        key,
        l4_len,
        u64::from(l4_len) + (ETH_LEN + 40) as u64,
    )
}

#[inline(always)]
fn parse_l4(
    ctx: &XdpContext,
    offset: usize,
    key: FlowKey,
    l4_len: u32,
    len: u64,
) -> Result<Option<Packet>, ()> {
    let proto = key.proto;
    let mut packet = Packet {
        key,
        tcp: Segment::default(),
        len,
    };
    match proto {
        IPPROTO_TCP => {
            let t: *const [u8; 20] = ptr_at(ctx, offset)?;
            // SAFETY: bounds-checked by ptr_at.
            let t = unsafe { &*t };
            packet.key.port = [[t[0], t[1]], [t[2], t[3]]];
            let header = u32::from(t[12] >> 4) * 4;
            let wscale = if t[13] & TCP_SYN != 0 {
                syn_wscale(ctx, offset + 20, offset + header as usize)
            } else {
                0
            };
            packet.tcp = Segment {
                flags: t[13],
                wscale,
                seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
                ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
                win: u16::from_be_bytes([t[14], t[15]]),
                payload: l4_len.saturating_sub(header),
            };
        }
        IPPROTO_UDP => {
            let u: *const [u8; 8] = ptr_at(ctx, offset)?;
            // SAFETY: bounds-checked by ptr_at.
            let u = unsafe { &*u };
            packet.key.port = [[u[0], u[1]], [u[2], u[3]]];
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let i: *const [u8; 8] = ptr_at(ctx, offset)?;
            // SAFETY: bounds-checked by ptr_at.
            let i = unsafe { &*i };
            let echo = match proto {
                IPPROTO_ICMP => i[0] == 8 || i[0] == 0,
                _ => i[0] == 128 || i[0] == 129,
            };
            if !echo {
                return Ok(None);
            }
            // Request and reply carry the same id: both directions meet on one key.
            packet.key.port = [[i[4], i[5]], [i[4], i[5]]];
        }
        _ => return Ok(None),
    }
    Ok(Some(packet))
}

/// Option walks stop after this many options; a SYN carries five or six.
const TCP_MAX_OPTIONS: usize = 16;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_WSCALE: u8 = 3;

/// The window-scale option among the TCP options in `[at, end)` of a SYN, as
/// `WSCALE_SEEN | shift`, or 0 without one (or with options cut short by the frame).
#[inline(always)]
fn syn_wscale(ctx: &XdpContext, mut at: usize, end: usize) -> u8 {
    for _ in 0..TCP_MAX_OPTIONS {
        if at >= end {
            break;
        }
        // Two bytes even for a one-byte option: only a NOP or EOL can be the frame's last
        // byte, and a one-byte bounds check reads to LLVM as `>=`, which the verifier misses.
        let Ok(head) = ptr_at::<[u8; 2]>(ctx, at) else {
            break;
        };
        // SAFETY: bounds-checked by ptr_at.
        let [kind, len] = unsafe { *head };
        match kind {
            TCPOPT_EOL => break,
            TCPOPT_NOP => at += 1,
            _ if len < 2 => break,
            TCPOPT_WSCALE if len == 3 => {
                let Ok(option) = ptr_at::<[u8; 3]>(ctx, at) else {
                    break;
                };
                // SAFETY: bounds-checked by ptr_at.
                return WSCALE_SEEN | unsafe { (*option)[2] }.min(WSCALE_MAX);
            }
            _ => at += usize::from(len),
        }
    }
    0
}

/// Whether endpoint (a, pa) sorts before (b, pb).
#[inline(always)]
fn lower(a: &[u8; 16], pa: &[u8; 2], b: &[u8; 16], pb: &[u8; 2]) -> bool {
    for i in 0..16 {
        if a[i] != b[i] {
            return a[i] < b[i];
        }
    }
    u16::from_be_bytes(*pa) <= u16::from_be_bytes(*pb)
}

fn update(p: &mut Packet, refresh_ns: u64) {
    let len = p.len;
    let key = &mut p.key;
    let dir = if lower(&key.addr[0], &key.port[0], &key.addr[1], &key.port[1]) {
        0usize
    } else {
        key.addr.swap(0, 1);
        key.port.swap(0, 1);
        1usize
    };
    let key = &p.key;
    let now = crate::clock::coarse_now_ns();
    count(STAT_FLOW_PACKETS);
    if let Some(entry) = CARP_FLOWS.get_ptr_mut(key) {
        // SAFETY: the map value stays valid for this program run.
        let entry = unsafe { &mut *entry };
        entry.last_ns = now;
        entry.packets[dir & 1] += 1;
        entry.bytes[dir & 1] += len;
        let before = [entry.tcp[0].phase, entry.tcp[1].phase];
        if key.proto == IPPROTO_TCP {
            track_tcp(&mut entry.tcp, dir & 1, &p.tcp);
        }
        let after = [entry.tcp[0].phase, entry.tcp[1].phase];
        let kind = if ended(after) && !ended(before) {
            DELTA_ENDED
        } else if after != before {
            DELTA_CHANGED
        } else if now.wrapping_sub(entry.synced_ns) >= refresh_ns {
            DELTA_REFRESH
        } else {
            return;
        };
        emit(key, entry, kind, now);
    } else {
        let mut entry = FlowEntry {
            first_ns: now,
            last_ns: now,
            ..FlowEntry::default()
        };
        entry.packets[dir & 1] = 1;
        entry.bytes[dir & 1] = len;
        if key.proto == IPPROTO_TCP {
            track_tcp(&mut entry.tcp, dir & 1, &p.tcp);
        }
        emit(key, &mut entry, DELTA_BORN, now);
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "by value, the 88-byte entry is copied again and the BPF stack overflows"
        )]
        let inserted = CARP_FLOWS.insert(key, &entry, BPF_NOEXIST);
        if inserted.is_err() {
            count(STAT_FLOW_INSERT_FAILED);
        }
    }
}

/// A flow has ended once both directions are past their FIN, or it was reset.
#[inline(always)]
fn ended(phases: [u8; 2]) -> bool {
    phases[0] >= tcp_phase::TIME_WAIT && phases[1] >= tcp_phase::TIME_WAIT
}

#[inline(always)]
fn advance(track: &mut TcpTrack, phase: u8) {
    if phase > track.phase {
        track.phase = phase;
    }
}

/// Whether sequence number `a` is after `b`, modulo 2^32.
#[inline(always)]
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

fn track_tcp(tcp: &mut [TcpTrack; 2], me: usize, s: &Segment) {
    let other = me ^ 1;
    if s.flags & TCP_RST != 0 {
        advance(&mut tcp[0], tcp_phase::CLOSED);
        advance(&mut tcp[1], tcp_phase::CLOSED);
        return;
    }
    let syn = u32::from(s.flags & TCP_SYN != 0);
    let fin = u32::from(s.flags & TCP_FIN != 0);
    let end = s.seq.wrapping_add(s.payload + syn + fin);
    {
        let sender = &mut tcp[me & 1];
        if sender.phase == tcp_phase::NONE || seq_after(end, sender.seqlo) {
            sender.seqlo = end;
        }
        if s.win > sender.max_win {
            sender.max_win = s.win;
        }
        if syn != 0 {
            sender.wscale = s.wscale;
            let phase = if s.flags & TCP_ACK != 0 {
                tcp_phase::SYN_RECEIVED
            } else {
                tcp_phase::SYN_SENT
            };
            advance(sender, phase);
        }
    }
    if s.flags & TCP_ACK != 0 {
        // The ack and window bound what the other side may send next.
        let receiver = &mut tcp[other & 1];
        let allowed = s.ack.wrapping_add(u32::from(s.win));
        if receiver.seqhi == 0 || seq_after(allowed, receiver.seqhi) {
            receiver.seqhi = allowed;
        }
        if syn == 0 {
            // A plain ACK from a side that sent its SYN means it has the other's SYN: its
            // handshake is done. This also holds where NAT splits a flow into two keys and
            // each sees one direction only.
            if tcp[me & 1].phase >= tcp_phase::SYN_SENT {
                advance(&mut tcp[me & 1], tcp_phase::ESTABLISHED);
            }
            // Both SYNs seen here: the ACK completes the handshake for both sides.
            let both_syn =
                tcp[0].phase >= tcp_phase::SYN_SENT && tcp[1].phase >= tcp_phase::SYN_SENT;
            if both_syn {
                advance(&mut tcp[0], tcp_phase::ESTABLISHED);
                advance(&mut tcp[1], tcp_phase::ESTABLISHED);
            }
        }
    }
    if fin != 0 {
        let other_closing = tcp[other & 1].phase >= tcp_phase::FIN_WAIT;
        advance(&mut tcp[me & 1], tcp_phase::FIN_WAIT);
        if other_closing {
            // Both have sent FIN: the connection is in its final wait.
            advance(&mut tcp[0], tcp_phase::TIME_WAIT);
            advance(&mut tcp[1], tcp_phase::TIME_WAIT);
        }
    }
}

/// Puts the flow on the ring buffer; a full buffer is counted, and `synced_ns` stays old so
/// the next packet retries.
fn emit(key: &FlowKey, entry: &mut FlowEntry, kind: u8, now: u64) {
    // Written straight into the reserved slot: a delta does not fit beside the rest on the
    // 512-byte BPF stack.
    let Some(mut slot) = CARP_DELTAS.reserve(0) else {
        count(STAT_DELTA_LOST);
        return;
    };
    let delta = slot.as_mut_ptr();
    // SAFETY: the slot is a reserved, exclusively owned FlowDelta; every field is written.
    unsafe {
        (*delta).key = *key;
        (*delta).entry = *entry;
        (*delta).kind = kind;
        (*delta)._pad = [0; 7];
    }
    slot.submit(0);
    entry.synced_ns = now;
}
