//! A connection as the daemon holds it: its key in one direction, the record the peers
//! exchange, TCP tracking. State sync (codec, merge rule, views) and conntrack (what it
//! installs) both build on these types, and so on neither of each other.

use carp_common::flow::tcp_phase;
use std::net::IpAddr;

/// A connection's identity in one direction: protocol, addresses, ports (ICMP: id, 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

/// One direction's TCP tracking, as pf keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpPeer {
    /// [`TcpPhase`] as a byte.
    pub phase: u8,
    /// `WSCALE_SEEN | shift` when the direction's SYN carried the option, else 0.
    pub wscale: u8,
    pub max_win: u16,
    pub seqlo: u32,
    pub seqhi: u32,
}

/// TCP progress of one direction, ordered: a state never moves to a smaller phase. The
/// numbers are XDP's (`carp_common::flow::tcp_phase`), so records carry them unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpPhase {
    None = tcp_phase::NONE,
    SynSent = tcp_phase::SYN_SENT,
    SynReceived = tcp_phase::SYN_RECEIVED,
    Established = tcp_phase::ESTABLISHED,
    FinWait = tcp_phase::FIN_WAIT,
    Closing = tcp_phase::CLOSING,
    TimeWait = tcp_phase::TIME_WAIT,
    Closed = tcp_phase::CLOSED,
}

/// A flow as the peers exchange it: both tuples (so NAT survives), TCP tracking, counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowRecord {
    /// The original direction.
    pub key: FlowKey,
    /// The reply direction as the kernel's conntrack sees it (translated when NATed).
    pub reply: FlowKey,
    /// Original and reply direction TCP tracking (zero for UDP/ICMP).
    pub tcp: [TcpPeer; 2],
    /// Packets and bytes, original then reply direction.
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// Seconds until the flow expires if nothing refreshes it.
    pub timeout_s: u32,
}
