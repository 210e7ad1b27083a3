//! Flow capture shared by XDP and the daemon: the flow map's key and value, the delta events
//! XDP puts on the ring buffer, and the capture settings the daemon writes.

use core::mem::size_of;

/// Name of the flow map: [`FlowKey`] -> [`FlowEntry`], LRU.
pub const FLOW_MAP: &str = "CARP_FLOWS";
/// Name of the ring buffer of [`FlowDelta`] events.
pub const DELTA_RING: &str = "CARP_DELTAS";
/// Name of XDP's read-only global (`.rodata`, a u32) that turns flow capture on: 1 to track
/// flows, 0 (no `[sync]`) to leave XDP at its CARP duties. Set when the program is loaded, so
/// the verifier knows it and drops the branch not taken, and the fast path pays no map
/// lookup; a change of `[sync]` re-executes the daemon, which loads the program anew.
pub const CAPTURE_ON_GLOBAL: &str = "CARP_CAPTURE_ON";
/// Name of XDP's read-only global (a u64) saying how long a flow may go without a delta
/// before a refresh is sent, in ns; set at load like [`CAPTURE_ON_GLOBAL`].
pub const CAPTURE_REFRESH_GLOBAL: &str = "CARP_CAPTURE_REFRESH_NS";
/// Default size of the flow map (overridden at load time by `flows_max`).
pub const DEFAULT_FLOWS_MAX: u32 = 262_144;
/// Bytes of the delta ring buffer (a power of two pages).
pub const DELTA_RING_BYTES: u32 = 4 << 20;

/// IP protocol numbers the capture tracks (one definition for XDP, the daemon and the wire).
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// ICMP or ICMPv6: flows keyed by the echo id, whose tuples carry the echo type.
pub const fn is_icmp(proto: u8) -> bool {
    matches!(proto, IPPROTO_ICMP | IPPROTO_ICMPV6)
}

/// [`FlowDelta::kind`]: the flow was first seen.
pub const DELTA_BORN: u8 = 1;
/// A TCP direction changed phase.
pub const DELTA_CHANGED: u8 = 2;
/// The flow ended (RST, or FIN both ways).
pub const DELTA_ENDED: u8 = 3;
/// Nothing changed, but the peer has not been told for `refresh_ns`.
pub const DELTA_REFRESH: u8 = 4;

/// TCP phases of one direction, in the order a connection moves through them; a phase never
/// goes back. The sync protocol carries the same numbers.
pub mod tcp_phase {
    pub const NONE: u8 = 0;
    pub const SYN_SENT: u8 = 1;
    pub const SYN_RECEIVED: u8 = 2;
    pub const ESTABLISHED: u8 = 3;
    pub const FIN_WAIT: u8 = 4;
    pub const CLOSING: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSED: u8 = 7;
}

/// A connection's identity regardless of direction: endpoint 0 is the lower (address, port)
/// of the two, so both directions of an untranslated flow share one entry. 8-byte aligned so
/// that XDP builds, compares and swaps it in whole words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// The endpoints' addresses, network byte order; IPv4 in the first 4 bytes, rest zero.
    pub addr: [[u8; 16]; 2],
    /// The endpoints' ports, network byte order (ICMP: the echo id, then 0).
    pub port: [[u8; 2]; 2],
    /// IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP or IPPROTO_ICMPV6.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// One direction's TCP tracking, after pf: what the endpoint has sent and may send.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpTrack {
    /// Highest sequence number the endpoint has sent, plus its length (host order).
    pub seqlo: u32,
    /// Highest sequence number the other side has allowed it (ack + window, host order).
    pub seqhi: u32,
    /// Largest window the endpoint advertised (unscaled).
    pub max_win: u16,
    /// Window scale from the endpoint's SYN: [`WSCALE_SEEN`] | shift, or 0 without the option.
    pub wscale: u8,
    /// A `tcp_phase` value.
    pub phase: u8,
}
const _: () = assert!(size_of::<TcpTrack>() == 12);

impl TcpTrack {
    /// The endpoint sent up to `end` (sequence number plus length): pf's seqlo. A side not yet
    /// tracked takes any value; after that it only moves forward.
    #[inline(always)]
    pub fn sent_up_to(&mut self, end: u32) {
        if self.phase == tcp_phase::NONE || seq_after(end, self.seqlo) {
            self.seqlo = end;
        }
    }

    /// The other side allowed the endpoint up to `allowed` (its ack plus window): pf's seqhi.
    #[inline(always)]
    pub fn allowed_up_to(&mut self, allowed: u32) {
        if self.seqhi == 0 || seq_after(allowed, self.seqhi) {
            self.seqhi = allowed;
        }
    }

    /// The endpoint advertised window `win`.
    #[inline(always)]
    pub fn advertised(&mut self, win: u16) {
        if win > self.max_win {
            self.max_win = win;
        }
    }
}

/// Whether sequence number `a` is after `b`, modulo 2^32.
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// [`TcpTrack::wscale`] flag: the SYN carried the window-scale option (pf's PF_WSCALE_FLAG),
/// whose shift is in the bits of [`WSCALE_SHIFT`]. Scaling is on only when both SYNs have it.
pub const WSCALE_SEEN: u8 = 0x80;
pub const WSCALE_SHIFT: u8 = 0x0f;
/// Largest shift RFC 7323 allows; larger values are read as 14.
pub const WSCALE_MAX: u8 = 14;

/// Value of the flow map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEntry {
    /// CLOCK_MONOTONIC_COARSE nanoseconds.
    pub first_ns: u64,
    pub last_ns: u64,
    /// When a delta for this flow last made it onto the ring buffer.
    pub synced_ns: u64,
    /// Packets and bytes sent by endpoint 0 and endpoint 1.
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub tcp: [TcpTrack; 2],
    /// 1 when the entry was installed from the peer rather than seen here.
    pub learned: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(size_of::<FlowEntry>() == 88);

/// Name of the per-CPU flow cache: [`FLOW_CACHE_SLOTS`] of [`FlowCacheSlot`] per CPU.
pub const FLOW_CACHE_MAP: &str = "CARP_FLOW_CACHE";
/// Slots per CPU, a power of two (480 KiB per CPU): enough for the flows that carry most
/// packets on a busy gateway, small enough to stay in a core's L2.
pub const FLOW_CACHE_SLOTS: u32 = 4096;
/// How long a slot sums a flow before its first packet after that writes the sums back: it
/// bounds how late refreshes, a phase seen on another CPU, and the map's `last_ns` can be.
pub const FLOW_CACHE_HOLD_NS: u64 = 50_000_000;

impl FlowKey {
    /// The key as 64-bit words (each endpoint's address is two of them): XDP compares,
    /// swaps and hashes it in words, where `==` or a field copy would be byte-wise.
    #[inline(always)]
    pub fn quads(&self) -> &[u64; 5] {
        // SAFETY: FlowKey is 40 bytes of plain integers, 8-byte aligned.
        unsafe { &*(self as *const FlowKey as *const [u64; 5]) }
    }

    #[inline(always)]
    pub fn quads_mut(&mut self) -> &mut [u64; 5] {
        // SAFETY: as in `quads`; every bit pattern is a valid FlowKey.
        unsafe { &mut *(self as *mut FlowKey as *mut [u64; 5]) }
    }

    /// The key as 32-bit words in memory order: an IPv4 key's addresses are words
    /// [`FlowKey::W_ADDR0`] and [`FlowKey::W_ADDR1`] (the rest of each address is zero), its
    /// protocol and family word [`FlowKey::W_PROTO`].
    #[inline(always)]
    pub fn words(&self) -> &[u32; 10] {
        // SAFETY: FlowKey is 40 bytes of plain integers, 8-byte aligned.
        unsafe { &*(self as *const FlowKey as *const [u32; 10]) }
    }

    pub const W_ADDR0: usize = 0;
    pub const W_ADDR1: usize = 4;
    pub const W_PROTO: usize = 9;

    /// The flow cache slot of this key. It is the same for both orders of the endpoints, so
    /// XDP finds a cached flow straight from a frame's fields without ordering them first.
    /// XDP and the daemon both use it.
    #[inline(always)]
    pub fn cache_slot(&self) -> u32 {
        let w = self.words();
        let mut addrs = 0;
        for i in 0..4 {
            addrs ^= w[Self::W_ADDR0 + i] ^ w[Self::W_ADDR1 + i];
        }
        let ports = u16::from_ne_bytes(self.port[0]) ^ u16::from_ne_bytes(self.port[1]);
        cache_slot_of(addrs, ports, self.proto)
    }
}

/// [`FlowKey::cache_slot`] from the XOR of the endpoints' address words and of their port
/// words (as read from the frame, in memory order), spread by a multiplicative hash. In 32
/// bits: the ports land on the address halves that differ least between flows (the first
/// two bytes), and the product's top bits mix in every input bit.
#[inline(always)]
pub const fn cache_slot_of(addrs: u32, ports: u16, proto: u8) -> u32 {
    let folded = addrs ^ ports as u32 ^ (proto as u32) << 24;
    folded.wrapping_mul(0x9e37_79b9) >> (32 - FLOW_CACHE_SLOTS.trailing_zeros())
}

/// [`FlowCacheSlot::seen`]: endpoint `d` sent a TCP segment (`SENT << d`) or an ACK
/// (`ACKED << d`) since the last write-back.
pub const CACHE_SENT: u8 = 0x01;
pub const CACHE_ACKED: u8 = 0x04;

/// One slot of XDP's per-CPU write-back cache. Plain segments of a settled flow (no SYN, FIN
/// or RST, no handshake in progress) are summed here instead of in the flow map, whose hash
/// lookup costs more than the bare XDP program; the sums go to the map with the flow's first
/// packet once [`FLOW_CACHE_HOLD_NS`] have passed, with any packet that can change its state,
/// or when another flow takes the slot after the flow sent nothing for a whole tick. Readers
/// add the slot's sums to the map entry ([`FlowCacheSlot::fold_into`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowCacheSlot {
    pub key: FlowKey,
    /// The last tick (jiffies) a packet of the flow was summed in, or it was written back.
    /// 0: the slot holds no flow.
    pub jiffies: u64,
    /// The coarse clock in that tick: the last-seen time of every packet summed.
    pub since_ns: u64,
    /// The coarse clock at the last write-back.
    pub written_ns: u64,
    /// Packets and bytes sent by endpoint 0 and 1 since the write-back.
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// Per sending endpoint: the furthest sequence end, the furthest ack + window, the largest
    /// window, each valid per [`FlowCacheSlot::seen`].
    pub sent_up_to: [u32; 2],
    pub allowed_up_to: [u32; 2],
    pub max_win: [u16; 2],
    pub seen: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowCacheSlot>() == 120);

impl FlowCacheSlot {
    /// Whether the slot holds sums for `key`.
    #[inline(always)]
    pub fn holds(&self, key: &FlowKey) -> bool {
        // Word by word: `==` on the key would be a byte-wise memcmp call in BPF.
        let (a, b) = (self.key.quads(), key.quads());
        self.jiffies != 0
            && a[0] == b[0]
            && a[1] == b[1]
            && a[2] == b[2]
            && a[3] == b[3]
            && a[4] == b[4]
    }

    /// Whether the flow it holds sent in tick `jiffies` or the one before: such a flow keeps
    /// the slot against others.
    #[inline(always)]
    pub fn busy(&self, jiffies: u64) -> bool {
        self.jiffies != 0 && jiffies.wrapping_sub(self.jiffies) <= 1
    }

    /// For a packet of the held flow in a new tick `jiffies` at coarse time `now`: whether
    /// the hold still runs (then the flow counts as seen now), or the sums must go back.
    #[inline(always)]
    pub fn hold(&mut self, jiffies: u64, now: u64) -> bool {
        if now.wrapping_sub(self.written_ns) >= FLOW_CACHE_HOLD_NS {
            return false;
        }
        self.jiffies = jiffies;
        self.since_ns = now;
        true
    }

    /// Whether anything was summed since the last write-back.
    #[inline(always)]
    pub fn pending(&self) -> bool {
        self.packets[0] | self.packets[1] != 0
    }

    /// Sums a packet of `len` bytes from endpoint `dir`.
    #[inline(always)]
    pub fn add_packet(&mut self, dir: usize, len: u64) {
        self.packets[dir & 1] += 1;
        self.bytes[dir & 1] += len;
    }

    /// Sums a TCP segment with ACK from endpoint `D` (a constant: its fields sit at fixed
    /// offsets): `len` bytes, ending at sequence number `end`, advertising `win` and allowing
    /// the other side up to `allowed`. The first since the write-back sets the bounds.
    #[inline(always)]
    pub fn add_acked_segment<const D: usize>(
        &mut self,
        len: u64,
        end: u32,
        win: u16,
        allowed: u32,
    ) {
        if self.packets[D] == 0 {
            self.sent_up_to[D] = end;
            self.max_win[D] = win;
            self.allowed_up_to[D] = allowed;
            self.seen |= (CACHE_SENT | CACHE_ACKED) << D;
        } else {
            if seq_after(end, self.sent_up_to[D]) {
                self.sent_up_to[D] = end;
            }
            if win > self.max_win[D] {
                self.max_win[D] = win;
            }
            if seq_after(allowed, self.allowed_up_to[D]) {
                self.allowed_up_to[D] = allowed;
            }
        }
        self.packets[D] += 1;
        self.bytes[D] += len;
    }

    /// Adds the slot's sums to the flow's map entry, by the rules the per-packet tracking
    /// applies (counters add up, sequence bounds only move forward).
    #[inline(always)]
    pub fn fold_into(&self, entry: &mut FlowEntry) {
        if self.pending() && self.since_ns > entry.last_ns {
            entry.last_ns = self.since_ns;
        }
        for d in 0..2 {
            entry.packets[d] += self.packets[d];
            entry.bytes[d] += self.bytes[d];
            if self.seen & (CACHE_SENT << d) != 0 {
                entry.tcp[d].sent_up_to(self.sent_up_to[d]);
                entry.tcp[d].advertised(self.max_win[d]);
            }
            if self.seen & (CACHE_ACKED << d) != 0 {
                entry.tcp[d ^ 1].allowed_up_to(self.allowed_up_to[d]);
            }
        }
    }

    /// Forgets the sums (they are in the map now), keeping the flow for packets in tick
    /// `jiffies` at coarse time `now` (0, 0: holding none).
    #[inline(always)]
    pub fn clear(&mut self, jiffies: u64, now: u64) {
        // Volatile: in BPF, LLVM merges these stores into a call to memset, a byte-wise loop
        // that costs more than the whole cache saves.
        let set = |word: &mut u64, value: u64| {
            // SAFETY: a valid, aligned u64.
            unsafe { core::ptr::write_volatile(word, value) }
        };
        set(&mut self.jiffies, jiffies);
        set(&mut self.since_ns, now);
        set(&mut self.written_ns, now);
        set(&mut self.packets[0], 0);
        set(&mut self.packets[1], 0);
        set(&mut self.bytes[0], 0);
        set(&mut self.bytes[1], 0);
        self.seen = 0;
    }
}

/// A ring-buffer event: the flow as it is after the packet that caused the event.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowDelta {
    pub key: FlowKey,
    pub entry: FlowEntry,
    /// One of the `DELTA_*` constants.
    pub kind: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(size_of::<FlowDelta>() == 136);

#[cfg(test)]
mod tests {
    use super::*;

    /// Segments from endpoint 0 across the sequence wrap (end, window, what they allow
    /// endpoint 1), and endpoint 1's (pure ACKs: its end stays put) acking them.
    const FROM_0: [(u32, u16, u32); 3] = [
        (u32::MAX - 99, 1000, 500),
        (u32::MAX - 9, 3000, 400),
        (90, 2000, 600),
    ];
    const FROM_1: [(u32, u16, u32); 2] = [(300, 500, u32::MAX - 50), (300, 400, 10)];

    fn established() -> FlowEntry {
        let mut entry = FlowEntry::default();
        entry.tcp[0].phase = tcp_phase::ESTABLISHED;
        entry.tcp[0].seqlo = u32::MAX - 200;
        entry.tcp[1].phase = tcp_phase::ESTABLISHED;
        entry.tcp[0].seqhi = u32::MAX - 100;
        entry
    }

    #[test]
    fn folded_sums_equal_tracking_each_packet() {
        let mut each = established();
        let mut slot = FlowCacheSlot::default();
        slot.clear(7, 1_000);
        let mut track = |d: usize, (end, win, allowed): (u32, u16, u32), len: u64| {
            each.tcp[d].sent_up_to(end);
            each.tcp[d].advertised(win);
            each.tcp[d ^ 1].allowed_up_to(allowed);
            each.packets[d] += 1;
            each.bytes[d] += len;
        };
        for segment in FROM_0 {
            track(0, segment, 100);
            slot.add_acked_segment::<0>(100, segment.0, segment.1, segment.2);
        }
        for segment in FROM_1 {
            track(1, segment, 54);
            slot.add_acked_segment::<1>(54, segment.0, segment.1, segment.2);
        }
        each.last_ns = 1_000;
        let mut folded = established();
        slot.fold_into(&mut folded);
        assert_eq!(folded, each);
        assert_eq!(folded.tcp[0].seqlo, 90, "past the wrap");
        assert_eq!(folded.tcp[0].seqhi, 10, "past the wrap");
        assert_eq!(folded.tcp[0].max_win, 3000);
        assert_eq!(folded.tcp[1].seqhi, 600, "the last, as it is the furthest");
        assert_eq!(
            folded.tcp[1].max_win, 500,
            "the first, as it is the largest"
        );
    }

    #[test]
    fn the_cache_slot_is_the_same_for_both_orders_of_the_endpoints() {
        let v4 = FlowKey {
            addr: [
                [198, 18, 1, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                [198, 18, 2, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ],
            port: [40_000u16.to_be_bytes(), 80u16.to_be_bytes()],
            proto: IPPROTO_TCP,
            family: 4,
            _pad: [0; 2],
        };
        let swapped = |k: FlowKey| FlowKey {
            addr: [k.addr[1], k.addr[0]],
            port: [k.port[1], k.port[0]],
            ..k
        };
        let mut v6 = v4;
        v6.addr[0][15] = 1;
        v6.addr[1][8] = 7;
        v6.family = 6;
        for key in [v4, v6] {
            assert_eq!(key.cache_slot(), swapped(key).cache_slot());
            assert!(key.cache_slot() < FLOW_CACHE_SLOTS);
        }
        // What XDP's fast path computes from an IPv4 frame's fields.
        let w = v4.words();
        let ports = (
            u16::from_ne_bytes(v4.port[0]),
            u16::from_ne_bytes(v4.port[1]),
        );
        assert_eq!(
            cache_slot_of(
                w[FlowKey::W_ADDR0] ^ w[FlowKey::W_ADDR1],
                ports.0 ^ ports.1,
                IPPROTO_TCP
            ),
            v4.cache_slot()
        );
        assert_eq!(
            w[FlowKey::W_PROTO],
            u32::from_ne_bytes([IPPROTO_TCP, 4, 0, 0])
        );
    }

    #[test]
    fn a_flow_keeps_its_slot_while_busy_and_sums_until_the_hold_runs_out() {
        let mut slot = FlowCacheSlot::default();
        assert!(!slot.busy(100), "empty");
        slot.clear(100, 1_000);
        assert!(
            slot.busy(100) && slot.busy(101),
            "seen this tick or the one before"
        );
        assert!(!slot.busy(102));
        assert!(slot.hold(105, 1_000 + FLOW_CACHE_HOLD_NS - 1));
        assert_eq!(
            (slot.jiffies, slot.since_ns),
            (105, 1_000 + FLOW_CACHE_HOLD_NS - 1)
        );
        assert!(slot.busy(106));
        assert!(
            !slot.hold(110, 1_000 + FLOW_CACHE_HOLD_NS),
            "counted from the write-back"
        );
        assert_eq!(
            slot.jiffies, 105,
            "a hold that ran out leaves the slot for the map path"
        );
    }

    #[test]
    fn a_cleared_slot_folds_nothing_and_an_empty_one_holds_no_flow() {
        let key = FlowKey {
            proto: IPPROTO_UDP,
            family: 4,
            ..FlowKey::default()
        };
        let mut slot = FlowCacheSlot {
            key,
            ..FlowCacheSlot::default()
        };
        assert!(!slot.holds(&key), "jiffies 0: empty");
        slot.clear(7, 1_000);
        assert!(slot.holds(&key));
        let other = FlowKey {
            port: [[0, 1], [0, 2]],
            ..key
        };
        assert!(!slot.holds(&other));
        slot.add_packet(1, 60);
        slot.clear(8, 2_000);
        let mut entry = established();
        slot.fold_into(&mut entry);
        assert_eq!(entry, established());
    }
}
