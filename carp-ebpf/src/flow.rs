//! Flow capture: every IPv4/IPv6 TCP, UDP and ICMP echo packet updates its flow's entry
//! (counters, pf-style TCP tracking), and a delta goes on the ring buffer when the flow is
//! born, a TCP direction changes phase, the flow ends, or the peer has not heard of it for
//! `refresh_ns`: not per packet. A full ring buffer never stalls the packet: the loss is
//! counted and the next refresh repairs it. Plain segments of a settled flow are summed in a
//! per-CPU cache slot and reach the map within `FLOW_CACHE_HOLD_NS` (see `FlowCacheSlot`):
//! the hash map's lookup alone costs more than a bare XDP program.

use crate::{clock, count, count_n, ptr_at};
use aya_ebpf::{
    btf_maps::{LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
    programs::XdpContext,
};
use carp_common::{
    flow::{
        DEFAULT_FLOWS_MAX, DELTA_BORN, DELTA_CHANGED, DELTA_ENDED, DELTA_REFRESH, DELTA_RING_BYTES,
        FLOW_CACHE_SLOTS, FlowCacheSlot, FlowDelta, FlowEntry, FlowKey, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, TcpTrack, WSCALE_MAX, WSCALE_SEEN, cache_slot_of,
        tcp_phase,
    },
    maps::{STAT_DELTA_LOST, STAT_FLOW_INSERT_FAILED, STAT_FLOW_PACKETS, STAT_FLOW_UNTRACKED},
};
use core::mem::{MaybeUninit, align_of, size_of};

#[btf_map]
static CARP_FLOWS: LruHashMap<FlowKey, FlowEntry, { DEFAULT_FLOWS_MAX as usize }> =
    LruHashMap::new();

#[btf_map]
static CARP_DELTAS: RingBuf<FlowDelta, { DELTA_RING_BYTES as usize }> = RingBuf::new();

#[btf_map]
static CARP_FLOW_CACHE: PerCpuArray<FlowCacheSlot, { FLOW_CACHE_SLOTS as usize }> =
    PerCpuArray::new();

/// [`carp_common::flow::CAPTURE_ON_GLOBAL`]: off unless the loader sets it.
#[unsafe(no_mangle)]
static CARP_CAPTURE_ON: u32 = 0;
/// [`carp_common::flow::CAPTURE_REFRESH_GLOBAL`].
#[unsafe(no_mangle)]
static CARP_CAPTURE_REFRESH_NS: u64 = u64::MAX;

// Volatile reads, so LLVM does not fold the values the object was compiled with: the loader
// sets the real ones.
#[inline(always)]
fn capture_on() -> bool {
    // SAFETY: a plain integer in .rodata, written only by the loader before the program runs.
    unsafe { core::ptr::read_volatile(&CARP_CAPTURE_ON) != 0 }
}

#[inline(always)]
fn capture_refresh_ns() -> u64 {
    // SAFETY: as for `capture_on`.
    unsafe { core::ptr::read_volatile(&CARP_CAPTURE_REFRESH_NS) }
}

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
pub fn track(ctx: &XdpContext) -> Result<(), ()> {
    if !capture_on() {
        return Ok(());
    }
    if summed_in_cache_v4(ctx) {
        return Ok(());
    }
    let ether_type = ether_type(ctx)?;
    // Zeroed in place and kept in memory: as a value, LLVM splits the key into 40 single bytes
    // shared by both IP versions and shuffles them through the stack, costing more than the
    // parsing, and zeroes it with a call to the byte-wise `memset`.
    let mut packet = MaybeUninit::<Packet>::uninit();
    zero_words(&mut packet);
    // SAFETY: all zero is a valid Packet (integers only).
    let packet = unsafe { packet.assume_init_mut() };
    let tracked = if ether_type == ETHERTYPE_IPV4 {
        parse_ipv4(ctx, packet)?
    } else if ether_type == ETHERTYPE_IPV6 {
        parse_ipv6(ctx, packet)?
    } else {
        return Ok(());
    };
    if tracked {
        // Read again rather than kept from above: a value live across the fast path costs it
        // a spill to the stack and back.
        update(packet, capture_refresh_ns());
    } else {
        count(STAT_FLOW_UNTRACKED);
    }
    Ok(())
}

/// The frame's EtherType, read from the frame where it is needed rather than passed in: a
/// value kept across the fast path's map lookups (calls, to LLVM) would take one of the four
/// registers calls preserve, and the fast path needs them all.
#[inline(always)]
fn ether_type(ctx: &XdpContext) -> Result<u16, ()> {
    let eth: *const [u16; 7] = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at.
    Ok(unsafe { (*eth)[6] })
}

/// The fast path of busy IPv4 flows: a plain TCP segment or UDP datagram of a flow this
/// CPU's cache holds is summed there straight from the frame's fields, with no key built or
/// ordered (the slot is the same for both directions). `false` leaves the packet to the full
/// path, which handles everything else the same way, only slower. Its order keeps the cost
/// down: the frame is matched against the slot in 16-bit words as read, and the segment is
/// read only once the slot holds its flow, so that few values stay live (each one more
/// would be spilled to the stack).
#[inline(always)]
fn summed_in_cache_v4(ctx: &XdpContext) -> bool {
    // Ethernet, IPv4 and a TCP header (or a UDP header and 12 bytes) in one bounds check:
    // shorter frames take the full path.
    let Ok(frame) = ptr_at::<[u16; 27]>(ctx, 0) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at; frame data is 2-byte aligned.
    let frame = unsafe { &*frame };
    if frame[6] != ETHERTYPE_IPV4 {
        return false;
    }
    // SAFETY: the IPv4 header and what follows it are the frame's last 20 words.
    let h = unsafe { &*(frame[7..].as_ptr() as *const [u16; 20]) };
    // No options (20-byte header), no fragment.
    if h[0].to_ne_bytes()[0] != 0x45 || u16::from_be(h[3]) & 0x3fff != 0 {
        return false;
    }
    let [_, proto] = h[4].to_ne_bytes();
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return false;
    }
    let addrs = ne32(h[6] ^ h[8], h[7] ^ h[9]);
    let Some(slot) = CARP_FLOW_CACHE.get_ptr_mut(cache_slot_of(addrs, h[10] ^ h[11], proto)) else {
        return false;
    };
    // SAFETY: this CPU's slot; XDP runs without preemption, so nobody else writes it now.
    let slot = unsafe { &mut *slot };
    let k = key_halves(&slot.key);
    // Each field read from the frame where it is compared, and element by element: LLVM
    // would load all six ahead for both orders and spill half of them to the stack, and a
    // slice `==` may become a call to the byte-wise memcmp.
    let at = |i: usize| {
        // SAFETY: within the bounds-checked header.
        unsafe { core::ptr::read_volatile(&h[i]) }
    };
    const SRC: usize = 6;
    const DST: usize = 8;
    const PORT: usize = 10;
    if k[KW_ADDR0] == at(SRC)
        && k[KW_ADDR0 + 1] == at(SRC + 1)
        && k[KW_ADDR1] == at(DST)
        && k[KW_ADDR1 + 1] == at(DST + 1)
        && k[KW_PORT0] == at(PORT)
        && k[KW_PORT1] == at(PORT + 1)
    {
        return sum_in_slot::<0>(h, slot);
    }
    if k[KW_ADDR0] == at(DST)
        && k[KW_ADDR0 + 1] == at(DST + 1)
        && k[KW_ADDR1] == at(SRC)
        && k[KW_ADDR1 + 1] == at(SRC + 1)
        && k[KW_PORT0] == at(PORT + 1)
        && k[KW_PORT1] == at(PORT)
    {
        return sum_in_slot::<1>(h, slot);
    }
    false
}

/// The rest of the fast path once `slot` holds the frame's addresses and ports, sent by
/// endpoint `D`: a constant, so that the slot's fields for it sit at fixed offsets. The hold
/// check comes before the frame's fields are read: the clock reads in it are calls to LLVM,
/// and only two pointers live across them fit the registers calls preserve.
#[inline(always)]
fn sum_in_slot<const D: usize>(h: &[u16; 20], slot: &mut FlowCacheSlot) -> bool {
    let [_, proto] = h[4].to_ne_bytes();
    if key_halves(&slot.key)[KW_PROTO] != u16::from_ne_bytes([proto, 4]) {
        return false;
    }
    if proto == IPPROTO_UDP {
        if !still_held(slot, clock::jiffies()) {
            return false;
        }
        slot.add_packet(D, u64::from(u16::from_be(h[1])) + ETH_LEN as u64);
        return true;
    }
    // SAFETY: the TCP header is the second half of `h`.
    let t = unsafe { &*(h[10..].as_ptr() as *const [u16; 10]) };
    // Volatile, as the frame's other fields here: a value kept past the clock reads takes a
    // register the slot's pointer needs.
    // SAFETY: within the bounds-checked header.
    let flags = unsafe { core::ptr::read_volatile(&t[6]) }.to_ne_bytes()[1];
    if !cacheable_segment(flags) {
        return false;
    }
    if !still_held(slot, clock::jiffies()) {
        return false;
    }
    let total = u32::from(u16::from_be(h[1]));
    let [data_offset, _] = t[6].to_ne_bytes();
    let win = u16::from_be(t[7]);
    let payload = total.saturating_sub(20 + u32::from(data_offset >> 4) * 4);
    slot.add_acked_segment::<D>(
        u64::from(total) + ETH_LEN as u64,
        be32(t[2], t[3]).wrapping_add(payload),
        win,
        be32(t[4], t[5]).wrapping_add(u32::from(win)),
    );
    true
}

/// Whether the slot, holding the packet's flow, may sum it in tick `jiffies`: it summed in
/// this tick already, or it holds a flow whose hold still runs.
#[inline(always)]
fn still_held(slot: &mut FlowCacheSlot, jiffies: u64) -> bool {
    slot.jiffies == jiffies
        || (slot.jiffies != 0 && slot.hold(jiffies, clock::coarse_ns_at(jiffies)))
}

/// Whether a TCP segment with `flags` may be summed in a cache slot: no SYN, FIN or RST (they
/// can change the flow's phases) and an ACK. A segment without ACK (after the handshake, only
/// a broken or hostile sender's) takes the map path: every segment a slot sums acks, which
/// is what lets the slot keep no flags.
#[inline(always)]
const fn cacheable_segment(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_ACK) == TCP_ACK
}

/// A TCP segment with ACK from endpoint `dir`, summed in the slot with its packet.
#[inline(always)]
fn sum_segment(slot: &mut FlowCacheSlot, dir: usize, len: u64, s: &Segment) {
    let end = s.seq.wrapping_add(s.payload);
    let allowed = s.ack.wrapping_add(u32::from(s.win));
    if dir == 0 {
        slot.add_acked_segment::<0>(len, end, s.win, allowed);
    } else {
        slot.add_acked_segment::<1>(len, end, s.win, allowed);
    }
}

/// Two 16-bit words as read from the frame, as the 32-bit word of the same four bytes.
#[inline(always)]
fn ne32(first: u16, second: u16) -> u32 {
    // SAFETY: two u16 are four bytes, in memory order either way.
    unsafe { core::mem::transmute::<[u16; 2], u32>([first, second]) }
}

/// Zeroes `value` with one volatile 64-bit store per word, which LLVM can neither turn into
/// a `memset` call nor see through.
#[inline(always)]
fn zero_words<T>(value: &mut MaybeUninit<T>) {
    const { assert!(size_of::<T>().is_multiple_of(8) && align_of::<T>() == 8) };
    let words = value.as_mut_ptr() as *mut u64;
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: within `value`, which is 8-byte aligned.
        unsafe { words.add(i).write_volatile(0) };
    }
}

/// The key as 16-bit words: headers are read from the frame in words (every field used sits
/// at an even offset, and XDP data is at least 2-byte aligned), a third of the instructions of
/// byte-wise copies.
#[inline(always)]
fn key_words(key: &mut FlowKey) -> &mut [u16; 20] {
    // SAFETY: FlowKey is 40 bytes of plain integers, 8-byte aligned.
    unsafe { &mut *(key as *mut FlowKey as *mut [u16; 20]) }
}

#[inline(always)]
fn key_halves(key: &FlowKey) -> &[u16; 20] {
    // SAFETY: as in `key_words`.
    unsafe { &*(key as *const FlowKey as *const [u16; 20]) }
}

/// Word indexes of the key's fields in [`key_words`]: protocol and family share one.
const KW_ADDR0: usize = 0;
const KW_ADDR1: usize = 8;
const KW_PORT0: usize = 16;
const KW_PORT1: usize = 17;
const KW_PROTO: usize = 18;

/// Fills `p` from an IPv4 frame; `Ok(false)` for what is not tracked.
#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, p: &mut Packet) -> Result<bool, ()> {
    let ip: *const [u16; 10] = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds-checked by ptr_at; frame data is 2-byte aligned.
    let ip = unsafe { &*ip };
    let [version_ihl, _] = ip[0].to_ne_bytes();
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return Err(());
    }
    // Fragments carry no (or a partial) L4 header: not tracked.
    if u16::from_be(ip[3]) & 0x3fff != 0 {
        return Ok(false);
    }
    let total = u32::from(u16::from_be(ip[1]));
    let [_, proto] = ip[4].to_ne_bytes();
    p.key.proto = proto;
    p.key.family = 4;
    let words = key_words(&mut p.key);
    words[KW_ADDR0] = ip[6];
    words[KW_ADDR0 + 1] = ip[7];
    words[KW_ADDR1] = ip[8];
    words[KW_ADDR1 + 1] = ip[9];
    p.len = u64::from(total) + ETH_LEN as u64;
    parse_l4(ctx, ETH_LEN + ihl, p, total.saturating_sub(ihl as u32))
}

/// Fills `p` from an IPv6 frame; `Ok(false)` for what is not tracked.
#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, p: &mut Packet) -> Result<bool, ()> {
    let ip: *const [u16; 20] = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds-checked by ptr_at; frame data is 2-byte aligned.
    let ip = unsafe { &*ip };
    if ip[0].to_ne_bytes()[0] >> 4 != 6 {
        return Err(());
    }
    let [next_header, _] = ip[3].to_ne_bytes();
    p.key.proto = next_header;
    p.key.family = 6;
    let words = key_words(&mut p.key);
    #[expect(
        clippy::manual_memcpy,
        reason = "a slice copy may become a call to the byte-wise memcpy"
    )]
    for i in 0..8 {
        words[KW_ADDR0 + i] = ip[4 + i];
        words[KW_ADDR1 + i] = ip[12 + i];
    }
    let l4_len = u32::from(u16::from_be(ip[2]));
    p.len = u64::from(l4_len) + (ETH_LEN + 40) as u64;
    // Extension headers (next header not an L4 protocol) fall through to "not tracked".
    parse_l4(ctx, ETH_LEN + 40, p, l4_len)
}

/// A big-endian 32-bit field from two words as read from the wire.
#[inline(always)]
fn be32(high: u16, low: u16) -> u32 {
    u32::from(u16::from_be(high)) << 16 | u32::from(u16::from_be(low))
}

/// Fills in the ports (ICMP: the echo id) and, for TCP, the segment.
#[inline(always)]
fn parse_l4(ctx: &XdpContext, offset: usize, p: &mut Packet, l4_len: u32) -> Result<bool, ()> {
    let proto = p.key.proto;
    let words = key_words(&mut p.key);
    match proto {
        IPPROTO_TCP => {
            let t: *const [u16; 10] = ptr_at(ctx, offset)?;
            // SAFETY: bounds-checked by ptr_at; the IP header is a whole number of words.
            let t = unsafe { &*t };
            words[KW_PORT0] = t[0];
            words[KW_PORT1] = t[1];
            let [data_offset, flags] = t[6].to_ne_bytes();
            let header = u32::from(data_offset >> 4) * 4;
            let wscale = if flags & TCP_SYN != 0 {
                syn_wscale(ctx, offset + 20, offset + header as usize)
            } else {
                0
            };
            p.tcp = Segment {
                flags,
                wscale,
                seq: be32(t[2], t[3]),
                ack: be32(t[4], t[5]),
                win: u16::from_be(t[7]),
                payload: l4_len.saturating_sub(header),
            };
        }
        IPPROTO_UDP => {
            let u: *const [u16; 4] = ptr_at(ctx, offset)?;
            // SAFETY: bounds-checked by ptr_at.
            let u = unsafe { &*u };
            words[KW_PORT0] = u[0];
            words[KW_PORT1] = u[1];
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let i: *const [u16; 4] = ptr_at(ctx, offset)?;
            // SAFETY: bounds-checked by ptr_at.
            let i = unsafe { &*i };
            let [kind, _] = i[0].to_ne_bytes();
            let echo = match proto {
                IPPROTO_ICMP => kind == 8 || kind == 0,
                _ => kind == 128 || kind == 129,
            };
            if !echo {
                return Ok(false);
            }
            // Request and reply carry the same id: both directions meet on one key.
            words[KW_PORT0] = i[2];
            words[KW_PORT1] = i[2];
        }
        _ => return Ok(false),
    }
    Ok(true)
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

/// Orders the key's endpoints (lower address, then lower port, first) and says which
/// endpoint sent the packet: 0 if it was already in order.
#[inline(always)]
fn normalise(key: &mut FlowKey) -> usize {
    let words = key_words(key);
    let ports = (u16::from_be(words[KW_PORT0]), u16::from_be(words[KW_PORT1]));
    let q = key.quads_mut();
    let a = (u64::from_be(q[0]), u64::from_be(q[1]), ports.0);
    let b = (u64::from_be(q[2]), u64::from_be(q[3]), ports.1);
    if a <= b {
        return 0;
    }
    q.swap(0, 2);
    q.swap(1, 3);
    key_words(key).swap(KW_PORT0, KW_PORT1);
    1
}

fn update(p: &mut Packet, refresh_ns: u64) {
    let len = p.len;
    let dir = normalise(&mut p.key) & 1;
    let key = &p.key;
    let Some(slot) = CARP_FLOW_CACHE.get_ptr_mut(key.cache_slot()) else {
        return;
    };
    // SAFETY: this CPU's slot; XDP runs without preemption, so nobody else writes it now.
    let slot = unsafe { &mut *slot };
    let jiffies = clock::jiffies();
    let plain = key.proto != IPPROTO_TCP || cacheable_segment(p.tcp.flags);
    if plain && slot.holds(key) && still_held(slot, jiffies) {
        if key.proto == IPPROTO_TCP {
            sum_segment(slot, dir, len, &p.tcp);
        } else {
            slot.add_packet(dir, len);
        }
        return;
    }
    let now = clock::coarse_ns_at(jiffies);
    let tick = Tick { jiffies, now };
    count(STAT_FLOW_PACKETS);
    if let Some(entry) = CARP_FLOWS.get_ptr_mut(key) {
        // SAFETY: the map value stays valid for this program run.
        let entry = unsafe { &mut *entry };
        let before = [entry.tcp[0].phase, entry.tcp[1].phase];
        if key.proto == IPPROTO_TCP && reopens(entry, dir, &p.tcp) {
            // A new connection on the tuple (the port was reused), as conntrack and pf take
            // it: without a new birth, phases that only move forward would keep the old
            // connection's and the peer would never hear of the new one.
            if slot.holds(key) {
                slot.clear(0, 0);
            }
            restart(entry, now);
            account(entry, slot, p, dir, now);
            cache(slot, false, key, entry, tick);
            emit(key, entry, DELTA_BORN, now);
            return;
        }
        let cached = account(entry, slot, p, dir, now);
        let after = [entry.tcp[0].phase, entry.tcp[1].phase];
        cache(slot, cached, key, entry, tick);
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
        // A slot may still hold the flow's sums if the map evicted the flow since.
        let cached = account(&mut entry, slot, p, dir, now);
        emit(key, &mut entry, DELTA_BORN, now);
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "by value, the 88-byte entry is copied again and the BPF stack overflows"
        )]
        let inserted = CARP_FLOWS.insert(key, &entry, BPF_NOEXIST);
        if inserted.is_err() {
            count(STAT_FLOW_INSERT_FAILED);
        }
        cache(slot, cached, key, &entry, tick);
    }
}

/// Whether segment `s` from endpoint `dir` opens a new connection on the flow's tuple: a SYN
/// after the old connection ended, or one whose sender has sent other sequence numbers
/// (where NAT splits a flow, this side may never see the old connection's end; a
/// retransmitted SYN ends where its first copy did).
#[inline(always)]
fn reopens(entry: &FlowEntry, dir: usize, s: &Segment) -> bool {
    let sender = &entry.tcp[dir & 1];
    s.flags & TCP_SYN != 0
        && (ended([entry.tcp[0].phase, entry.tcp[1].phase])
            || (entry.packets[dir & 1] > 0 && s.seq.wrapping_add(s.payload + 1) != sender.seqlo))
}

/// Empties `entry` for a new connection on its tuple.
#[inline(always)]
fn restart(entry: &mut FlowEntry, now: u64) {
    entry.first_ns = now;
    entry.last_ns = now;
    entry.synced_ns = 0;
    entry.packets = [0; 2];
    entry.bytes = [0; 2];
    entry.tcp = [TcpTrack::default(); 2];
    entry.learned = 0;
}

/// Moves the slot's sums for the packet's flow, if it holds them, and then the packet itself
/// into `entry`; returns whether the slot held the flow.
#[inline(always)]
fn account(
    entry: &mut FlowEntry,
    slot: &mut FlowCacheSlot,
    p: &Packet,
    dir: usize,
    now: u64,
) -> bool {
    let cached = slot.holds(&p.key);
    if cached {
        write_back_into(slot, entry);
    }
    entry.last_ns = now;
    entry.packets[dir] += 1;
    entry.bytes[dir] += p.len;
    if p.key.proto == IPPROTO_TCP {
        track_tcp(&mut entry.tcp, dir, &p.tcp);
    }
    cached
}

/// The current tick and the coarse clock in it.
#[derive(Clone, Copy)]
struct Tick {
    jiffies: u64,
    now: u64,
}

/// After a packet took the map path: lets the flow's next plain packets be summed in `slot`
/// if no plain packet can change its state, and never drops another flow's sums. A flow that
/// sends every tick keeps its slot, so busy flows stay cached while quiet ones take the map
/// path. `cached`: the slot held this flow (its sums are in `entry` now).
#[inline(always)]
fn cache(slot: &mut FlowCacheSlot, cached: bool, key: &FlowKey, entry: &FlowEntry, tick: Tick) {
    if !cached {
        if slot.busy(tick.jiffies) {
            // At most one write-back of someone else's sums per slot and tick.
            return;
        }
        if slot.pending() {
            write_back(slot);
        }
    }
    if settled(key.proto, &entry.tcp) {
        slot.key = *key;
        slot.clear(tick.jiffies, tick.now);
    } else {
        slot.clear(0, 0);
    }
}

/// Moves the slot's sums into `entry`, counting their packets as tracked.
#[inline(always)]
fn write_back_into(slot: &mut FlowCacheSlot, entry: &mut FlowEntry) {
    slot.fold_into(entry);
    count_n(STAT_FLOW_PACKETS, slot.packets[0] + slot.packets[1]);
    slot.clear(0, 0);
}

/// Puts the sums of the flow in `slot` into its map entry (gone if the map evicted it).
#[inline(always)]
fn write_back(slot: &mut FlowCacheSlot) {
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "the key stays in the slot; by value it is copied to the stack first"
    )]
    let entry = CARP_FLOWS.get_ptr_mut(&slot.key);
    match entry {
        // SAFETY: the map value stays valid for this program run.
        Some(entry) => write_back_into(slot, unsafe { &mut *entry }),
        None => slot.clear(0, 0),
    }
}

/// Whether no packet without SYN, FIN or RST can change the flow's phases: not TCP, or no
/// side halfway through the handshake (a plain ACK completes it). A SYN seen meanwhile on
/// another CPU is caught up with by this CPU's first packet of the next jiffy.
#[inline(always)]
fn settled(proto: u8, tcp: &[TcpTrack; 2]) -> bool {
    let half_open =
        |t: &TcpTrack| t.phase == tcp_phase::SYN_SENT || t.phase == tcp_phase::SYN_RECEIVED;
    proto != IPPROTO_TCP || !(half_open(&tcp[0]) || half_open(&tcp[1]))
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

fn track_tcp(tcp: &mut [TcpTrack; 2], me: usize, s: &Segment) {
    let other = me ^ 1;
    if s.flags & TCP_RST != 0 {
        advance(&mut tcp[0], tcp_phase::CLOSED);
        advance(&mut tcp[1], tcp_phase::CLOSED);
        return;
    }
    let syn = u32::from(s.flags & TCP_SYN != 0);
    let fin = u32::from(s.flags & TCP_FIN != 0);
    {
        let sender = &mut tcp[me & 1];
        sender.sent_up_to(s.seq.wrapping_add(s.payload + syn + fin));
        sender.advertised(s.win);
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
        tcp[other & 1].allowed_up_to(s.ack.wrapping_add(u32::from(s.win)));
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
