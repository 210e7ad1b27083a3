//! Flow capture shared by XDP and the daemon: the flow map's key and value, the delta events
//! XDP puts on the ring buffer, and the capture settings the daemon writes.

use core::mem::size_of;

/// Name of the flow map: [`FlowKey`] -> [`FlowEntry`], LRU.
pub const FLOW_MAP: &str = "CARP_FLOWS";
/// Name of the ring buffer of [`FlowDelta`] events.
pub const DELTA_RING: &str = "CARP_DELTAS";
/// Name of the one-slot array holding the [`CaptureConfig`].
pub const CAPTURE_MAP: &str = "CARP_CAPTURE";
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
/// of the two, so both directions of an untranslated flow share one entry.
#[repr(C)]
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

/// Capture settings, written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CaptureConfig {
    /// 1 to track flows; 0 (no `[sync]` configured) leaves XDP at its CARP duties only.
    pub enabled: u32,
    pub _pad: u32,
    /// How long a flow may go without a delta before a refresh is sent.
    pub refresh_ns: u64,
}
const _: () = assert!(size_of::<CaptureConfig>() == 16);
