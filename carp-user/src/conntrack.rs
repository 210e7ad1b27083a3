//! The kernel's connection tracking through ctnetlink (`NETLINK_NETFILTER`): look up a
//! connection's NAT mapping, and install, refresh and remove the connections the peer
//! syncs. Requests go out in batches, one datagram each, answered by sequence number, so a
//! batch of hundreds costs two system calls. Changes ask no acknowledgement but the batch's
//! last: the kernel reports failures anyway, in order, so the last one's ACK fences them.

use crate::flow::{FlowKey, FlowRecord};
use carp_common::flow::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, WSCALE_SEEN, WSCALE_SHIFT, is_icmp,
    tcp_phase,
};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use std::{io, net::IpAddr};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_HDR: usize = 16;
const NFGENMSG: usize = 4;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_NAT_SRC: u16 = 6;
const CTA_TIMEOUT: u16 = 7;
const CTA_NAT_DST: u16 = 13;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const CTA_PROTOINFO_TCP_WSCALE_ORIGINAL: u16 = 2;
const CTA_PROTOINFO_TCP_WSCALE_REPLY: u16 = 3;
const CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: u16 = 4;
const CTA_PROTOINFO_TCP_FLAGS_REPLY: u16 = 5;
const CTA_NAT_V4_MINIP: u16 = 1;
const CTA_NAT_V4_MAXIP: u16 = 2;
const CTA_NAT_PROTO: u16 = 3;
const CTA_NAT_V6_MINIP: u16 = 4;
const CTA_NAT_V6_MAXIP: u16 = 5;
const CTA_PROTONAT_PORT_MIN: u16 = 1;
const CTA_PROTONAT_PORT_MAX: u16 = 2;

const IPS_SEEN_REPLY: u32 = 1 << 1;
const IPS_ASSURED: u32 = 1 << 2;
const IPS_CONFIRMED: u32 = 1 << 3;
/// `IP_CT_TCP_FLAG_BE_LIBERAL`: ctnetlink cannot carry the sequence window, so the kernel
/// checks only that segments belong to the connection (pf's window lives in our XDP map).
const TCP_FLAG_BE_LIBERAL: u8 = 0x08;
const TCP_FLAG_WINDOW_SCALE: u8 = 0x01;

/// Requests per datagram: the answers of one batch must fit the socket's receive buffer.
const BATCH: usize = 512;
const RECV_BUFFER: usize = 4 << 20;

/// What the kernel's conntrack holds for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The original direction.
    pub orig: FlowKey,
    /// The reply direction, translated when NATed.
    pub reply: FlowKey,
    /// Seconds until it expires.
    pub timeout_s: u32,
}

/// Which of a connection's tuples a lookup gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Original,
    Reply,
}

/// One change to the kernel's table.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A connection the kernel does not hold yet, with its NAT mapping.
    Create(&'a FlowRecord),
    /// New TCP state, status and timeout for a connection the kernel holds.
    Update(&'a FlowRecord),
    /// An ended connection.
    Delete(&'a FlowKey),
    /// A TCP connection whose windows moved on elsewhere: the kernel stops checking its
    /// sequence numbers (nothing else changes).
    Liberal(&'a FlowKey),
}

/// An open ctnetlink socket.
pub struct Conntrack {
    socket: Socket,
    seq: u32,
    out: Vec<u8>,
    buf: Vec<u8>,
}

/// Which requests of a batch the kernel answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answered {
    Each,
    /// Only failures, and the last request (it asks for an ACK).
    FailuresAndLast,
}

/// The kernel's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Not answered yet (a request's state while its batch is out; never parsed).
    Pending,
    /// An ACK, the end of a dump, or a message carp does not read.
    Done,
    /// A GET's answer: the connection.
    Entry(Entry),
    /// The request failed with this errno.
    Errno(i32),
}

impl Conntrack {
    /// Opens a ctnetlink socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        // Errors echo only the header, not the whole request.
        socket.set_cap_ack(true)?;
        // A full batch of answers must not overflow: past rmem_max where allowed (root).
        force_rx_buf(&socket, RECV_BUFFER);
        Ok(Self {
            socket,
            seq: 1,
            out: Vec::with_capacity(64 << 10),
            buf: Vec::with_capacity(256 << 10),
        })
    }

    /// A socket that hears of every connection the kernel confirms (NFNLGRP_CONNTRACK_NEW),
    /// for measuring when synced flows land.
    pub fn subscribe_new() -> io::Result<Self> {
        const NFNLGRP_CONNTRACK_NEW: u32 = 1;
        let conntrack = Self::open()?;
        conntrack.socket.add_membership(NFNLGRP_CONNTRACK_NEW)?;
        Ok(conntrack)
    }

    /// The connections announced in the next datagram (blocks until one arrives).
    pub fn next_events(&mut self) -> io::Result<Vec<Entry>> {
        self.buf.clear();
        self.socket.recv(&mut self.buf, 0)?;
        Ok(parse_answers(&self.buf)
            .into_iter()
            .filter_map(|(_, answer)| match answer {
                Answer::Entry(entry) => Some(entry),
                _ => None,
            })
            .collect())
    }

    /// Looks each `(tuple, direction)` up; `None` where the kernel tracks no such connection.
    pub fn lookup(&mut self, queries: &[(FlowKey, Direction)]) -> io::Result<Vec<Option<Entry>>> {
        let mut found = Vec::with_capacity(queries.len());
        for batch in queries.chunks(BATCH) {
            let first = self.seq;
            self.out.clear();
            for (tuple, direction) in batch {
                let attr = match direction {
                    Direction::Original => CTA_TUPLE_ORIG,
                    Direction::Reply => CTA_TUPLE_REPLY,
                };
                let at = begin_message(&mut self.out, IPCTNL_MSG_CT_GET, NLM_F_REQUEST, self.seq);
                put_tuple(&mut self.out, attr, tuple, *direction);
                end_message(&mut self.out, at, family(tuple));
                self.seq = self.seq.wrapping_add(1);
            }
            for answer in self.exchange(first, batch.len(), Answered::Each)? {
                found.push(match answer {
                    Answer::Entry(entry) => Some(entry),
                    _ => None,
                });
            }
        }
        Ok(found)
    }

    /// Applies `changes`; each result is `Ok` or the kernel's errno for that change.
    pub fn apply(&mut self, changes: &[Change]) -> io::Result<Vec<Result<(), i32>>> {
        let mut results = Vec::with_capacity(changes.len());
        for batch in changes.chunks(BATCH) {
            let first = self.seq;
            self.out.clear();
            for (index, change) in batch.iter().enumerate() {
                let fence = index + 1 == batch.len();
                encode_change(&mut self.out, change, self.seq, fence);
                self.seq = self.seq.wrapping_add(1);
            }
            for answer in self.exchange(first, batch.len(), Answered::FailuresAndLast)? {
                results.push(match answer {
                    Answer::Errno(errno) => Err(errno),
                    _ => Ok(()),
                });
            }
        }
        Ok(results)
    }

    /// Sends the batch in `self.out` and collects its answers by sequence number; requests
    /// the kernel need not answer count as done once the last one is.
    fn exchange(
        &mut self,
        first: u32,
        count: usize,
        answered: Answered,
    ) -> io::Result<Vec<Answer>> {
        self.socket.send(&self.out, 0)?;
        let mut answers = vec![Answer::Pending; count];
        let mut pending = match answered {
            Answered::Each => count,
            Answered::FailuresAndLast => 1,
        };
        while pending > 0 {
            self.buf.clear();
            self.socket.recv(&mut self.buf, 0)?;
            for (seq, answer) in parse_answers(&self.buf) {
                let index = seq.wrapping_sub(first) as usize;
                if let Some(slot) = answers.get_mut(index)
                    && *slot == Answer::Pending
                {
                    *slot = answer;
                    if answered == Answered::Each || index + 1 == count {
                        pending -= 1;
                    }
                }
            }
        }
        for slot in &mut answers {
            if *slot == Answer::Pending {
                *slot = Answer::Done;
            }
        }
        Ok(answers)
    }
}

/// Sets the receive buffer with SO_RCVBUFFORCE (CAP_NET_ADMIN), else as far as rmem_max allows.
fn force_rx_buf(socket: &Socket, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt::RcvBufForce};
    if setsockopt(socket, RcvBufForce, &bytes).is_err() {
        let _ = socket.set_rx_buf_sz(bytes);
    }
}

fn family(tuple: &FlowKey) -> u8 {
    if tuple.src.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

/// The kernel's TCP conntrack states a synced connection can be in (`enum tcp_conntrack`,
/// <https://github.com/torvalds/linux/blob/master/include/uapi/linux/netfilter/nf_conntrack_tcp.h>),
/// with the kernel's default timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KernelTcpState {
    SynSent = 1,
    SynRecv = 2,
    Established = 3,
    FinWait = 4,
    CloseWait = 5,
    TimeWait = 7,
    Close = 8,
}

impl KernelTcpState {
    /// The state a record's two directions make.
    pub fn of(record: &FlowRecord) -> Self {
        let [orig, reply] = [record.tcp[0].phase, record.tcp[1].phase];
        let (low, high) = (orig.min(reply), orig.max(reply));
        if high == tcp_phase::CLOSED {
            Self::Close
        } else if low >= tcp_phase::FIN_WAIT {
            Self::TimeWait
        } else if orig >= tcp_phase::FIN_WAIT {
            Self::FinWait
        } else if reply >= tcp_phase::FIN_WAIT {
            Self::CloseWait
        } else if low >= tcp_phase::ESTABLISHED || (orig >= tcp_phase::ESTABLISHED && reply > 0) {
            Self::Established
        } else if reply >= tcp_phase::SYN_RECEIVED {
            Self::SynRecv
        } else {
            Self::SynSent
        }
    }

    /// conntrack's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::Established => "ESTABLISHED",
            Self::FinWait => "FIN_WAIT",
            Self::CloseWait => "CLOSE_WAIT",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
        }
    }

    /// How long the kernel keeps a connection in this state without traffic, in seconds
    /// (the `nf_conntrack_tcp_timeout_*` defaults), so the peer's copy expires when the
    /// original would.
    pub fn timeout_s(self) -> u32 {
        match self {
            Self::SynSent | Self::FinWait | Self::TimeWait => 120,
            Self::SynRecv | Self::CloseWait => 60,
            Self::Established => 432_000,
            Self::Close => 10,
        }
    }
}

/// Encodes one change; only a `fence` asks for an ACK (failures are reported regardless).
fn encode_change(out: &mut Vec<u8>, change: &Change, seq: u32, fence: bool) {
    let flags = if fence {
        NLM_F_REQUEST | NLM_F_ACK
    } else {
        NLM_F_REQUEST
    };
    match change {
        Change::Create(record) => {
            let at = begin_message(
                out,
                IPCTNL_MSG_CT_NEW,
                flags | NLM_F_CREATE | NLM_F_EXCL,
                seq,
            );
            put_tuple(out, CTA_TUPLE_ORIG, &record.key, Direction::Original);
            // The untranslated reply: the kernel derives the translated one from the NAT
            // ranges below, and only then marks the connection NATed.
            put_tuple(out, CTA_TUPLE_REPLY, &invert(&record.key), Direction::Reply);
            put_nat(out, record);
            put_state(out, record);
            end_message(out, at, family(&record.key));
        }
        Change::Update(record) => {
            let at = begin_message(out, IPCTNL_MSG_CT_NEW, flags, seq);
            put_tuple(out, CTA_TUPLE_ORIG, &record.key, Direction::Original);
            put_state(out, record);
            end_message(out, at, family(&record.key));
        }
        Change::Delete(key) => {
            let at = begin_message(out, IPCTNL_MSG_CT_DELETE, flags, seq);
            put_tuple(out, CTA_TUPLE_ORIG, key, Direction::Original);
            end_message(out, at, family(key));
        }
        Change::Liberal(key) => {
            let at = begin_message(out, IPCTNL_MSG_CT_NEW, flags, seq);
            put_tuple(out, CTA_TUPLE_ORIG, key, Direction::Original);
            let info = begin_nest(out, CTA_PROTOINFO);
            let tcp = begin_nest(out, CTA_PROTOINFO_TCP);
            for attr in [
                CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
                CTA_PROTOINFO_TCP_FLAGS_REPLY,
            ] {
                // struct nf_ct_tcp_flags { flags, mask }: this one flag, the rest kept.
                put(out, attr, &[TCP_FLAG_BE_LIBERAL, TCP_FLAG_BE_LIBERAL]);
            }
            end_nest(out, tcp);
            end_nest(out, info);
            end_message(out, at, family(key));
        }
    }
}

/// The tuple of the other direction, untranslated.
pub fn invert(key: &FlowKey) -> FlowKey {
    let icmp = is_icmp(key.proto);
    FlowKey {
        proto: key.proto,
        src: key.dst,
        dst: key.src,
        // ICMP echo keeps its id in both directions.
        src_port: if icmp { key.src_port } else { key.dst_port },
        dst_port: if icmp { 0 } else { key.src_port },
    }
}

/// Status, timeout and TCP state. The status restates CONFIRMED, which the kernel sets
/// before it applies ours (on create too) and refuses to see changed.
fn put_state(out: &mut Vec<u8>, record: &FlowRecord) {
    if record.packets[1] > 0 {
        put_u32(
            out,
            CTA_STATUS,
            IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED,
        );
    }
    put_u32(out, CTA_TIMEOUT, record.timeout_s);
    if record.key.proto == IPPROTO_TCP {
        let info = begin_nest(out, CTA_PROTOINFO);
        let tcp = begin_nest(out, CTA_PROTOINFO_TCP);
        put(
            out,
            CTA_PROTOINFO_TCP_STATE,
            &[KernelTcpState::of(record) as u8],
        );
        let [orig, reply] = &record.tcp;
        put(
            out,
            CTA_PROTOINFO_TCP_WSCALE_ORIGINAL,
            &[orig.wscale & WSCALE_SHIFT],
        );
        put(
            out,
            CTA_PROTOINFO_TCP_WSCALE_REPLY,
            &[reply.wscale & WSCALE_SHIFT],
        );
        for (attr, side) in [
            (CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, orig),
            (CTA_PROTOINFO_TCP_FLAGS_REPLY, reply),
        ] {
            let scale = if side.wscale & WSCALE_SEEN != 0 {
                TCP_FLAG_WINDOW_SCALE
            } else {
                0
            };
            let flags = TCP_FLAG_BE_LIBERAL | scale;
            // struct nf_ct_tcp_flags { flags, mask }
            put(
                out,
                attr,
                &[flags, TCP_FLAG_BE_LIBERAL | TCP_FLAG_WINDOW_SCALE],
            );
        }
        end_nest(out, tcp);
        end_nest(out, info);
    }
}

/// The NAT ranges that turn the untranslated reply into the record's reply tuple.
fn put_nat(out: &mut Vec<u8>, record: &FlowRecord) {
    let plain = invert(&record.key);
    let reply = &record.reply;
    // Source NAT shows as the reply going to another address or port than the original
    // source; destination NAT as it coming from another than the original destination.
    if (reply.dst, reply.dst_port) != (plain.dst, plain.dst_port) {
        put_nat_range(
            out,
            CTA_NAT_SRC,
            reply.dst,
            reply.dst_port,
            record.key.proto,
        );
    }
    if (reply.src, reply.src_port) != (plain.src, plain.src_port) {
        put_nat_range(
            out,
            CTA_NAT_DST,
            reply.src,
            reply.src_port,
            record.key.proto,
        );
    }
}

fn put_nat_range(out: &mut Vec<u8>, attr: u16, addr: IpAddr, port: u16, proto: u8) {
    let nat = begin_nest(out, attr);
    match addr {
        IpAddr::V4(v4) => {
            put(out, CTA_NAT_V4_MINIP, &v4.octets());
            put(out, CTA_NAT_V4_MAXIP, &v4.octets());
        }
        IpAddr::V6(v6) => {
            put(out, CTA_NAT_V6_MINIP, &v6.octets());
            put(out, CTA_NAT_V6_MAXIP, &v6.octets());
        }
    }
    if matches!(
        proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP | IPPROTO_ICMPV6
    ) {
        let ports = begin_nest(out, CTA_NAT_PROTO);
        put(out, CTA_PROTONAT_PORT_MIN, &port.to_be_bytes());
        put(out, CTA_PROTONAT_PORT_MAX, &port.to_be_bytes());
        end_nest(out, ports);
    }
    end_nest(out, nat);
}

fn put_tuple(out: &mut Vec<u8>, attr: u16, tuple: &FlowKey, direction: Direction) {
    let outer = begin_nest(out, attr);
    let ip = begin_nest(out, CTA_TUPLE_IP);
    match (tuple.src, tuple.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            put(out, CTA_IP_V4_SRC, &src.octets());
            put(out, CTA_IP_V4_DST, &dst.octets());
        }
        (src, dst) => {
            put(out, CTA_IP_V6_SRC, &v6_octets(src));
            put(out, CTA_IP_V6_DST, &v6_octets(dst));
        }
    }
    end_nest(out, ip);
    let proto = begin_nest(out, CTA_TUPLE_PROTO);
    put(out, CTA_PROTO_NUM, &[tuple.proto]);
    // Echo request in the original direction, echo reply in the other.
    let request = direction == Direction::Original;
    match tuple.proto {
        IPPROTO_ICMP => {
            put(out, CTA_PROTO_ICMP_ID, &tuple.src_port.to_be_bytes());
            put(out, CTA_PROTO_ICMP_TYPE, &[if request { 8 } else { 0 }]);
            put(out, CTA_PROTO_ICMP_CODE, &[0]);
        }
        IPPROTO_ICMPV6 => {
            put(out, CTA_PROTO_ICMPV6_ID, &tuple.src_port.to_be_bytes());
            put(
                out,
                CTA_PROTO_ICMPV6_TYPE,
                &[if request { 128 } else { 129 }],
            );
            put(out, CTA_PROTO_ICMPV6_CODE, &[0]);
        }
        _ => {
            put(out, CTA_PROTO_SRC_PORT, &tuple.src_port.to_be_bytes());
            put(out, CTA_PROTO_DST_PORT, &tuple.dst_port.to_be_bytes());
        }
    }
    end_nest(out, proto);
    end_nest(out, outer);
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn begin_message(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32) -> usize {
    let at = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family (filled in at the end), version 0, resource id 0.
    out.extend_from_slice(&[0, 0, 0, 0]);
    at
}

fn end_message(out: &mut [u8], at: usize, family: u8) {
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    out[at + NLMSG_HDR] = family;
}

fn put(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn put_u32(out: &mut Vec<u8>, kind: u16, value: u32) {
    put(out, kind, &value.to_be_bytes());
}

fn begin_nest(out: &mut Vec<u8>, kind: u16) -> usize {
    let at = out.len();
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    at
}

fn end_nest(out: &mut [u8], at: usize) {
    let len = (out.len() - at) as u16;
    out[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

/// The kernel's answer to a GET for `entry`: a CT_NEW message with both tuples and the
/// timeout, laid out as the request encoder lays out a create (the tests and the fuzzer
/// parse it back).
pub fn entry_message(seq: u32, entry: &Entry) -> Vec<u8> {
    let mut out = Vec::new();
    let at = begin_message(&mut out, IPCTNL_MSG_CT_NEW, 0, seq);
    put_tuple(&mut out, CTA_TUPLE_ORIG, &entry.orig, Direction::Original);
    put_tuple(&mut out, CTA_TUPLE_REPLY, &entry.reply, Direction::Reply);
    put_u32(&mut out, CTA_TIMEOUT, entry.timeout_s);
    end_message(&mut out, at, family(&entry.orig));
    out
}

/// The (sequence number, answer) pairs in one datagram from the kernel. What it cannot read
/// (cut short, or attributes of a newer kernel) ends the datagram or is skipped, never a panic.
pub fn parse_answers(mut buf: &[u8]) -> Vec<(u32, Answer)> {
    let mut answers = Vec::new();
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDR || len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes"));
        let body = &buf[NLMSG_HDR..len];
        let answer = match kind {
            NLMSG_ERROR if body.len() >= 4 => {
                // Wrapping: i32::MIN (no errno, but a datagram can say it) has no negation.
                match i32::from_ne_bytes(body[0..4].try_into().expect("4 bytes")).wrapping_neg() {
                    0 => Answer::Done,
                    errno => Answer::Errno(errno),
                }
            }
            NLMSG_DONE => Answer::Done,
            _ if kind == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => {
                parse_entry(body.get(NFGENMSG..).unwrap_or_default())
                    .map_or(Answer::Done, Answer::Entry)
            }
            _ => Answer::Done,
        };
        answers.push((seq, answer));
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    answers
}

/// Iterates over the attributes in `buf` as (type without flags, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, payload))
    })
}

fn parse_entry(body: &[u8]) -> Option<Entry> {
    let (mut orig, mut reply, mut timeout_s) = (None, None, 0);
    for (kind, payload) in attrs(body) {
        match kind {
            CTA_TUPLE_ORIG => orig = parse_tuple(payload),
            CTA_TUPLE_REPLY => reply = parse_tuple(payload),
            CTA_TIMEOUT if payload.len() == 4 => {
                timeout_s = u32::from_be_bytes(payload.try_into().expect("4 bytes"));
            }
            _ => {}
        }
    }
    Some(Entry {
        orig: orig?,
        reply: reply?,
        timeout_s,
    })
}

fn parse_tuple(buf: &[u8]) -> Option<FlowKey> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut src_port, mut dst_port) = (0u16, 0u16);
    let be16 = |p: &[u8]| p.try_into().ok().map(u16::from_be_bytes);
    for (kind, payload) in attrs(buf) {
        match kind {
            CTA_TUPLE_IP => {
                for (kind, ip) in attrs(payload) {
                    let addr = match ip.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(ip).ok()?),
                        16 => IpAddr::from(<[u8; 16]>::try_from(ip).ok()?),
                        _ => continue,
                    };
                    match kind {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(addr),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = Some(addr),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (kind, p) in attrs(payload) {
                    match kind {
                        CTA_PROTO_NUM => proto = p.first().copied(),
                        CTA_PROTO_SRC_PORT | CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => {
                            src_port = be16(p)?;
                        }
                        CTA_PROTO_DST_PORT => dst_port = be16(p)?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(FlowKey {
        proto: proto?,
        src: src?,
        dst: dst?,
        src_port,
        dst_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::TcpPeer;

    fn key(src: &str, sport: u16, dst: &str, dport: u16) -> FlowKey {
        FlowKey {
            proto: IPPROTO_TCP,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_port: sport,
            dst_port: dport,
        }
    }

    fn record(reply: FlowKey, phases: [u8; 2]) -> FlowRecord {
        let key = key("198.18.1.100", 40000, "198.18.2.100", 80);
        FlowRecord {
            key,
            reply,
            tcp: phases.map(|phase| TcpPeer {
                phase,
                ..TcpPeer::default()
            }),
            packets: [3, 2],
            bytes: [180, 120],
            timeout_s: 300,
        }
    }

    /// The kernel's answer to a GET is a CT_NEW message carrying both tuples: build one
    /// with the request encoder (same attribute layout) and parse it back.
    #[test]
    fn entries_round_trip_through_the_attribute_layout() {
        let entry = Entry {
            orig: key("198.18.1.100", 40000, "198.18.2.100", 80),
            reply: key("198.18.2.100", 80, "198.18.2.1", 61000),
            timeout_s: 431999,
        };
        let out = entry_message(7, &entry);
        assert_eq!(out[NLMSG_HDR], libc::AF_INET as u8);
        assert_eq!(parse_answers(&out), [(7, Answer::Entry(entry))]);
    }

    /// An NLMSG_ERROR answer to request `seq` with error `code` (0 for an ACK), carrying
    /// the request's header as the kernel does (zeroed here).
    fn error_message(out: &mut Vec<u8>, seq: u32, code: i32) {
        out.extend_from_slice(&36u32.to_ne_bytes());
        out.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&code.to_ne_bytes());
        out.extend_from_slice(&[0u8; 16]);
    }

    #[test]
    fn errors_and_acks_are_matched_by_sequence() {
        let mut out = Vec::new();
        for (seq, errno) in [(5u32, 0i32), (6, -libc::ENOENT)] {
            error_message(&mut out, seq, errno);
        }
        assert_eq!(
            parse_answers(&out),
            [(5, Answer::Done), (6, Answer::Errno(libc::ENOENT))]
        );
    }

    /// Found by the fuzzer: negating this error code overflowed (a panic with overflow
    /// checks on).
    #[test]
    fn an_error_code_without_a_negation_is_read_rather_than_overflowing() {
        let mut out = Vec::new();
        error_message(&mut out, 9, i32::MIN);
        assert_eq!(parse_answers(&out), [(9, Answer::Errno(i32::MIN))]);
    }

    #[test]
    fn truncated_datagrams_yield_nothing_rather_than_panic() {
        let orig = key("198.18.1.100", 1, "198.18.2.100", 2);
        let mut out = Vec::new();
        let at = begin_message(&mut out, IPCTNL_MSG_CT_NEW, 0, 1);
        put_tuple(&mut out, CTA_TUPLE_ORIG, &orig, Direction::Original);
        end_message(&mut out, at, 2);
        for cut in 0..out.len() {
            let _ = parse_answers(&out[..cut]);
        }
        // A whole message without a reply tuple is no entry.
        assert_eq!(parse_answers(&out), [(1, Answer::Done)]);
    }

    #[test]
    fn nat_ranges_follow_the_translated_reply() {
        let snat = record(key("198.18.2.100", 80, "198.18.2.1", 61000), [3, 3]);
        let mut out = Vec::new();
        put_nat(&mut out, &snat);
        let kinds: Vec<u16> = attrs(&out).map(|(k, _)| k).collect();
        assert_eq!(kinds, [CTA_NAT_SRC]);
        let plain = record(invert(&snat.key), [3, 3]);
        out.clear();
        put_nat(&mut out, &plain);
        assert!(out.is_empty(), "an untranslated flow has no NAT");
    }

    #[test]
    fn tcp_states_map_to_the_kernel_enum() {
        let reply = key("198.18.2.100", 80, "198.18.1.100", 40000);
        let est = tcp_phase::ESTABLISHED;
        let of = |phases| KernelTcpState::of(&record(reply, phases));
        assert_eq!(of([tcp_phase::SYN_SENT, 0]) as u8, 1);
        assert_eq!(of([tcp_phase::SYN_SENT, tcp_phase::SYN_RECEIVED]) as u8, 2);
        assert_eq!(of([est, est]) as u8, 3);
        assert_eq!(of([tcp_phase::FIN_WAIT, est]) as u8, 4);
        assert_eq!(of([est, tcp_phase::FIN_WAIT]) as u8, 5);
        assert_eq!(of([tcp_phase::FIN_WAIT, tcp_phase::FIN_WAIT]) as u8, 7);
        assert_eq!(of([tcp_phase::CLOSED, est]) as u8, 8);
    }
}
