//! The sync frame codec, version 1. Every frame is `magic "CSYN" | version | kind | reserved
//! (2) | payload length (4) | payload`, all integers big-endian. The streaming decoder reads
//! from a byte buffer, asks for more when a frame is incomplete, and rejects garbage before
//! allocating anything sized by the peer (smoltcp's check-then-parse discipline).

use crate::flow::{FlowKey, FlowRecord, TcpPeer};
use std::net::IpAddr;

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CSYN";
/// The protocol version this codec speaks.
pub const VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 12;
/// Largest payload accepted: a frame must fit one encrypted transport message (64 KiB).
pub const MAX_PAYLOAD: usize = 60_000;

/// Why bytes from the sync port are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {found:02x?}")]
    Magic { found: [u8; 4] },
    #[error("unsupported version {version} (this node speaks {VERSION})")]
    Version { version: u8 },
    #[error("unknown frame kind {kind}")]
    Kind { kind: u8 },
    #[error("payload of {len} bytes exceeds {MAX_PAYLOAD}")]
    TooLong { len: usize },
    #[error("{what} is truncated")]
    Truncated { what: &'static str },
    #[error("address family {family} is not 4 or 6")]
    Family { family: u8 },
    #[error("node name is not UTF-8")]
    NodeName,
    #[error("{what} is not UTF-8")]
    Text { what: &'static str },
    #[error("a record's reply tuple is not of its connection's address family and protocol")]
    ReplyMismatch,
    #[error("{extra} bytes after the last record")]
    Trailing { extra: usize },
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame each way: who is speaking.
    Hello {
        node: String,
    },
    /// "Send me everything" (pfsync's UPD_REQ 0,0).
    BulkRequest,
    /// A bulk transfer begins; `generation` ties its end to it.
    BulkStart {
        generation: u64,
    },
    /// Flows created or changed.
    Upsert {
        records: Vec<FlowRecord>,
    },
    /// Flows that ended.
    Delete {
        keys: Vec<FlowKey>,
    },
    /// The bulk transfer `generation` is complete after `count` records.
    BulkEnd {
        generation: u64,
        count: u64,
    },
    Keepalive,
    /// Part `part` of `parts` of the primary's configuration areas (TOML), for a secondary
    /// that accepts them; a large nftables ruleset takes many.
    ConfigPush {
        schema: u32,
        /// `config_sync::DRY_RUN`, `config_sync::FORCE`.
        flags: u8,
        part: u16,
        parts: u16,
        areas: String,
    },
    /// The secondary's answer: applied (and the content hash of what it now holds), or why
    /// not.
    ConfigResult {
        schema: u32,
        ok: bool,
        hash: String,
        message: String,
    },
}

const KIND_HELLO: u8 = 1;
const KIND_BULK_REQUEST: u8 = 2;
const KIND_BULK_START: u8 = 3;
const KIND_UPSERT: u8 = 4;
const KIND_DELETE: u8 = 5;
const KIND_BULK_END: u8 = 6;
const KIND_KEEPALIVE: u8 = 7;
const KIND_CONFIG_PUSH: u8 = 8;
const KIND_CONFIG_RESULT: u8 = 9;
/// Longest message in a ConfigResult (the rest is cut).
const MAX_RESULT_MESSAGE: usize = 8192;

/// Longest encoding of a key (IPv6) and of a record.
pub const MAX_KEY_LEN: usize = 6 + 32;
pub const MAX_RECORD_LEN: usize = 2 * MAX_KEY_LEN + 2 * 12 + 4 * 8 + 4;

impl Frame {
    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        match self {
            Frame::Hello { node } => {
                // Node names are short (config allows 64); cut longer ones on a character
                // boundary so the peer can decode what we send.
                let mut end = node.len().min(255);
                while !node.is_char_boundary(end) {
                    end -= 1;
                }
                out.push(end as u8);
                out.extend_from_slice(&node.as_bytes()[..end]);
            }
            Frame::BulkRequest | Frame::Keepalive => {}
            Frame::BulkStart { generation } => out.extend_from_slice(&generation.to_be_bytes()),
            Frame::Upsert { records } => {
                out.extend_from_slice(&(records.len() as u16).to_be_bytes());
                for r in records {
                    encode_record(r, out);
                }
            }
            Frame::Delete { keys } => {
                out.extend_from_slice(&(keys.len() as u16).to_be_bytes());
                for k in keys {
                    encode_key(k, out);
                }
            }
            Frame::BulkEnd { generation, count } => {
                out.extend_from_slice(&generation.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
            }
            Frame::ConfigPush {
                schema,
                flags,
                part,
                parts,
                areas,
            } => {
                out.extend_from_slice(&schema.to_be_bytes());
                out.push(*flags);
                out.extend_from_slice(&part.to_be_bytes());
                out.extend_from_slice(&parts.to_be_bytes());
                out.extend_from_slice(&(areas.len() as u32).to_be_bytes());
                out.extend_from_slice(areas.as_bytes());
            }
            Frame::ConfigResult {
                schema,
                ok,
                hash,
                message,
            } => {
                out.extend_from_slice(&schema.to_be_bytes());
                out.push(u8::from(*ok));
                let hash = cut(hash, 255);
                out.push(hash.len() as u8);
                out.extend_from_slice(hash.as_bytes());
                let message = cut(message, MAX_RESULT_MESSAGE);
                out.extend_from_slice(&(message.len() as u16).to_be_bytes());
                out.extend_from_slice(message.as_bytes());
            }
        }
        let len = (out.len() - start - HEADER_LEN) as u32;
        out[start + 8..start + 12].copy_from_slice(&len.to_be_bytes());
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::Hello { .. } => KIND_HELLO,
            Frame::BulkRequest => KIND_BULK_REQUEST,
            Frame::BulkStart { .. } => KIND_BULK_START,
            Frame::Upsert { .. } => KIND_UPSERT,
            Frame::Delete { .. } => KIND_DELETE,
            Frame::BulkEnd { .. } => KIND_BULK_END,
            Frame::Keepalive => KIND_KEEPALIVE,
            Frame::ConfigPush { .. } => KIND_CONFIG_PUSH,
            Frame::ConfigResult { .. } => KIND_CONFIG_RESULT,
        }
    }

    /// Decodes the frame at the start of `buf`: `Ok(None)` when more bytes are needed,
    /// `Ok(Some((frame, consumed)))`, or an error for bytes that can never be a frame.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtoError> {
        let magic_len = buf.len().min(4);
        if buf[..magic_len] != MAGIC[..magic_len] {
            let mut found = [0u8; 4];
            found[..magic_len].copy_from_slice(&buf[..magic_len]);
            return Err(ProtoError::Magic { found });
        }
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if buf[4] != VERSION {
            return Err(ProtoError::Version { version: buf[4] });
        }
        let kind = buf[5];
        let len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(ProtoError::TooLong { len });
        }
        let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        let mut r = Reader(payload);
        let frame = match kind {
            KIND_HELLO => {
                let n = usize::from(r.u8("hello")?);
                let name = r.take(n, "hello")?;
                Frame::Hello {
                    node: String::from_utf8(name.to_vec()).map_err(|_| ProtoError::NodeName)?,
                }
            }
            KIND_BULK_REQUEST => Frame::BulkRequest,
            KIND_KEEPALIVE => Frame::Keepalive,
            KIND_BULK_START => Frame::BulkStart {
                generation: r.u64("bulk start")?,
            },
            KIND_UPSERT => {
                let count = usize::from(r.u16("upsert")?);
                // Bounded by the payload: each record takes at least its minimum size.
                let mut records = Vec::with_capacity(count.min(len / 64));
                for _ in 0..count {
                    records.push(decode_record(&mut r)?);
                }
                Frame::Upsert { records }
            }
            KIND_DELETE => {
                let count = usize::from(r.u16("delete")?);
                let mut keys = Vec::with_capacity(count.min(len / 14));
                for _ in 0..count {
                    keys.push(decode_key(&mut r)?);
                }
                Frame::Delete { keys }
            }
            KIND_BULK_END => Frame::BulkEnd {
                generation: r.u64("bulk end")?,
                count: r.u64("bulk end")?,
            },
            KIND_CONFIG_PUSH => {
                let schema = r.u32("config push")?;
                let flags = r.u8("config push")?;
                let part = r.u16("config push")?;
                let parts = r.u16("config push")?;
                let n = r.u32("config push")? as usize;
                Frame::ConfigPush {
                    schema,
                    flags,
                    part,
                    parts,
                    areas: r.text(n, "config push")?,
                }
            }
            KIND_CONFIG_RESULT => {
                let schema = r.u32("config result")?;
                let ok = r.u8("config result")? != 0;
                let n = usize::from(r.u8("config result")?);
                let hash = r.text(n, "config result")?;
                let n = usize::from(r.u16("config result")?);
                Frame::ConfigResult {
                    schema,
                    ok,
                    hash,
                    message: r.text(n, "config result")?,
                }
            }
            kind => return Err(ProtoError::Kind { kind }),
        };
        if !r.0.is_empty() {
            return Err(ProtoError::Trailing { extra: r.0.len() });
        }
        Ok(Some((frame, HEADER_LEN + len)))
    }
}

/// Bytes of configuration text per ConfigPush frame.
const CONFIG_PART: usize = MAX_PAYLOAD - 64;
/// The most parts a push may have (about 15 MB of configuration).
pub const MAX_CONFIG_PARTS: u16 = 256;

/// The ConfigPush frames carrying `areas`, each within [`MAX_PAYLOAD`]; `None` if it would
/// take more than [`MAX_CONFIG_PARTS`].
pub fn config_push_frames(schema: u32, flags: u8, areas: &str) -> Option<Vec<Frame>> {
    let mut chunks = Vec::new();
    let mut rest = areas;
    loop {
        let chunk = cut(rest, CONFIG_PART);
        chunks.push(chunk);
        rest = &rest[chunk.len()..];
        if rest.is_empty() {
            break;
        }
    }
    let parts = u16::try_from(chunks.len())
        .ok()
        .filter(|n| *n <= MAX_CONFIG_PARTS)?;
    Some(
        chunks
            .into_iter()
            .enumerate()
            .map(|(part, chunk)| Frame::ConfigPush {
                schema,
                flags,
                part: part as u16,
                parts,
                areas: chunk.to_owned(),
            })
            .collect(),
    )
}

/// `text` cut to at most `max` bytes on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Splits `records` into Upsert frames that each fit [`MAX_PAYLOAD`] (a bulk answer).
pub fn upsert_frames(records: &[FlowRecord]) -> impl Iterator<Item = Frame> + '_ {
    const PER_FRAME: usize = (MAX_PAYLOAD - 2) / MAX_RECORD_LEN;
    records.chunks(PER_FRAME).map(|chunk| Frame::Upsert {
        records: chunk.to_vec(),
    })
}

/// Splits `keys` into Delete frames that each fit [`MAX_PAYLOAD`].
pub fn delete_frames(keys: &[FlowKey]) -> impl Iterator<Item = Frame> + '_ {
    const PER_FRAME: usize = (MAX_PAYLOAD - 2) / MAX_KEY_LEN;
    keys.chunks(PER_FRAME).map(|chunk| Frame::Delete {
        keys: chunk.to_vec(),
    })
}

fn encode_key(k: &FlowKey, out: &mut Vec<u8>) {
    let family = if k.src.is_ipv4() && k.dst.is_ipv4() {
        4
    } else {
        6
    };
    out.push(family);
    out.push(k.proto);
    out.extend_from_slice(&k.src_port.to_be_bytes());
    out.extend_from_slice(&k.dst_port.to_be_bytes());
    for ip in [k.src, k.dst] {
        match (family, ip) {
            (4, IpAddr::V4(v4)) => out.extend_from_slice(&v4.octets()),
            (_, IpAddr::V4(v4)) => out.extend_from_slice(&v4.to_ipv6_mapped().octets()),
            (_, IpAddr::V6(v6)) => out.extend_from_slice(&v6.octets()),
        }
    }
}

fn encode_record(r: &FlowRecord, out: &mut Vec<u8>) {
    encode_key(&r.key, out);
    encode_key(&r.reply, out);
    for peer in &r.tcp {
        out.push(peer.phase);
        out.push(peer.wscale);
        out.extend_from_slice(&peer.max_win.to_be_bytes());
        out.extend_from_slice(&peer.seqlo.to_be_bytes());
        out.extend_from_slice(&peer.seqhi.to_be_bytes());
    }
    for n in r.packets.iter().chain(&r.bytes) {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out.extend_from_slice(&r.timeout_s.to_be_bytes());
}

fn decode_key(r: &mut Reader) -> Result<FlowKey, ProtoError> {
    let family = r.u8("flow key")?;
    let proto = r.u8("flow key")?;
    let src_port = r.u16("flow key")?;
    let dst_port = r.u16("flow key")?;
    let mut addr = || -> Result<IpAddr, ProtoError> {
        Ok(match family {
            4 => {
                let b = r.take(4, "IPv4 address")?;
                IpAddr::from([b[0], b[1], b[2], b[3]])
            }
            6 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(r.take(16, "IPv6 address")?);
                IpAddr::from(o)
            }
            family => return Err(ProtoError::Family { family }),
        })
    };
    let src = addr()?;
    let dst = addr()?;
    Ok(FlowKey {
        proto,
        src,
        dst,
        src_port,
        dst_port,
    })
}

fn decode_record(r: &mut Reader) -> Result<FlowRecord, ProtoError> {
    let key = decode_key(r)?;
    let reply = decode_key(r)?;
    // Netfilter translates neither between families nor protocols: such a pair is not a
    // connection, and the kernel would only refuse it after it had travelled this far.
    if reply.proto != key.proto || reply.src.is_ipv4() != key.src.is_ipv4() {
        return Err(ProtoError::ReplyMismatch);
    }
    let mut tcp = [TcpPeer::default(); 2];
    for peer in &mut tcp {
        peer.phase = r.u8("tcp peer")?;
        peer.wscale = r.u8("tcp peer")?;
        peer.max_win = r.u16("tcp peer")?;
        peer.seqlo = r.u32("tcp peer")?;
        peer.seqhi = r.u32("tcp peer")?;
    }
    let mut counters = [0u64; 4];
    for c in &mut counters {
        *c = r.u64("counters")?;
    }
    Ok(FlowRecord {
        key,
        reply,
        tcp,
        packets: [counters[0], counters[1]],
        bytes: [counters[2], counters[3]],
        timeout_s: r.u32("timeout")?,
    })
}

/// A cursor that never reads past its slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.0.len() < n {
            return Err(ProtoError::Truncated { what });
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn text(&mut self, n: usize, what: &'static str) -> Result<String, ProtoError> {
        String::from_utf8(self.take(n, what)?.to_vec()).map_err(|_| ProtoError::Text { what })
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(a))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::flow::TcpPhase;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    pub(crate) fn tcp_record(port: u16, phase: TcpPhase, seqhi: u32) -> FlowRecord {
        let key = FlowKey {
            proto: 6,
            src: Ipv4Addr::new(198, 18, 1, 100).into(),
            dst: Ipv4Addr::new(198, 18, 2, 100).into(),
            src_port: port,
            dst_port: 80,
        };
        let peer = TcpPeer {
            phase: phase as u8,
            wscale: 7,
            max_win: 64240,
            seqlo: seqhi.wrapping_sub(1000),
            seqhi,
        };
        FlowRecord {
            key,
            reply: FlowKey {
                src: key.dst,
                dst: Ipv4Addr::new(198, 18, 2, 1).into(),
                src_port: 80,
                dst_port: 40000 + port % 1000,
                proto: 6,
            },
            tcp: [peer, peer],
            packets: [10, 9],
            bytes: [1000, 9000],
            timeout_s: 86400,
        }
    }

    fn round_trip(frame: &Frame) {
        let mut buf = Vec::new();
        frame.encode(&mut buf);
        assert_eq!(Frame::decode(&buf), Ok(Some((frame.clone(), buf.len()))));
        // Every strict prefix asks for more rather than failing or inventing a frame.
        for cut in 0..buf.len() {
            assert_eq!(Frame::decode(&buf[..cut]), Ok(None), "prefix {cut}");
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let v6 = FlowKey {
            proto: 17,
            src: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
            dst: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2).into(),
            src_port: 5353,
            dst_port: 53,
        };
        for frame in [
            Frame::Hello { node: "gw1".into() },
            Frame::BulkRequest,
            Frame::BulkStart { generation: 7 },
            Frame::Upsert {
                records: vec![tcp_record(1, TcpPhase::Established, 5)],
            },
            Frame::Delete { keys: vec![v6] },
            Frame::BulkEnd {
                generation: 7,
                count: 1,
            },
            Frame::Keepalive,
            Frame::ConfigPush {
                schema: 1,
                flags: 3,
                part: 0,
                parts: 1,
                areas: "[carp]\npassphrase = \"é\"\n".into(),
            },
            Frame::ConfigResult {
                schema: 1,
                ok: false,
                hash: "0123456789abcdef".into(),
                message: "vip[2].interface: no interface `dmz`".into(),
            },
        ] {
            round_trip(&frame);
        }
    }

    #[test]
    fn a_large_configuration_travels_in_parts_that_each_fit_and_rejoin() {
        let areas = "é".repeat(200_000);
        let frames = config_push_frames(1, 0, &areas).unwrap();
        assert!(frames.len() > 1);
        let mut joined = String::new();
        for (i, frame) in frames.iter().enumerate() {
            let mut buf = Vec::new();
            frame.encode(&mut buf);
            assert!(buf.len() - HEADER_LEN <= MAX_PAYLOAD);
            let (decoded, _) = Frame::decode(&buf).unwrap().unwrap();
            let Frame::ConfigPush {
                part, parts, areas, ..
            } = decoded
            else {
                panic!("{decoded:?}")
            };
            assert_eq!((usize::from(part), usize::from(parts)), (i, frames.len()));
            joined.push_str(&areas);
        }
        assert_eq!(joined, areas);
        assert_eq!(config_push_frames(1, 0, "").unwrap().len(), 1, "even empty");
        let too_big = "x".repeat(CONFIG_PART * usize::from(MAX_CONFIG_PARTS) + 1);
        assert!(config_push_frames(1, 0, &too_big).is_none());
    }

    #[test]
    fn a_long_result_message_is_cut_on_a_character_boundary() {
        let frame = Frame::ConfigResult {
            schema: 1,
            ok: false,
            hash: String::new(),
            message: "é".repeat(MAX_RESULT_MESSAGE),
        };
        let mut buf = Vec::new();
        frame.encode(&mut buf);
        let (decoded, _) = Frame::decode(&buf).unwrap().unwrap();
        let Frame::ConfigResult { message, .. } = decoded else {
            panic!("{decoded:?}")
        };
        assert_eq!(message.len(), MAX_RESULT_MESSAGE);
        // Text that is not UTF-8 is refused, not mangled.
        let mut bad = Vec::new();
        Frame::ConfigPush {
            schema: 1,
            flags: 0,
            part: 0,
            parts: 1,
            areas: "ab".into(),
        }
        .encode(&mut bad);
        let last = bad.len() - 1;
        bad[last] = 0xff;
        assert_eq!(
            Frame::decode(&bad),
            Err(ProtoError::Text {
                what: "config push"
            })
        );
    }

    #[test]
    fn rejects_garbage_wrong_version_kind_and_oversize() {
        assert_eq!(
            Frame::decode(b"GET / HTTP/1.1\r\n"),
            Err(ProtoError::Magic { found: *b"GET " })
        );
        assert!(matches!(
            Frame::decode(b"CX"),
            Err(ProtoError::Magic { .. })
        ));
        let mut buf = Vec::new();
        Frame::Keepalive.encode(&mut buf);
        let mut v2 = buf.clone();
        v2[4] = 2;
        assert_eq!(Frame::decode(&v2), Err(ProtoError::Version { version: 2 }));
        let mut kind = buf.clone();
        kind[5] = 99;
        assert_eq!(Frame::decode(&kind), Err(ProtoError::Kind { kind: 99 }));
        let mut huge = buf.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Frame::decode(&huge),
            Err(ProtoError::TooLong {
                len: u32::MAX as usize
            })
        );
    }

    #[test]
    fn hello_names_must_be_utf8_and_long_ones_are_cut_on_a_character_boundary() {
        // Found by cargo fuzz: a lossy decode re-encoded to something else.
        let mut buf = Vec::new();
        Frame::Hello { node: "gw".into() }.encode(&mut buf);
        buf[13] = 0xff;
        assert_eq!(Frame::decode(&buf), Err(ProtoError::NodeName));
        let long = "é".repeat(200);
        let mut buf = Vec::new();
        Frame::Hello { node: long }.encode(&mut buf);
        let Ok(Some((Frame::Hello { node }, _))) = Frame::decode(&buf) else {
            panic!("long name decodes");
        };
        assert_eq!(node, "é".repeat(127));
    }

    #[test]
    fn a_count_larger_than_the_payload_is_truncation_not_allocation() {
        let mut buf = Vec::new();
        Frame::Upsert { records: vec![] }.encode(&mut buf);
        buf[12..14].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            Frame::decode(&buf),
            Err(ProtoError::Truncated { what: "flow key" })
        );
    }

    #[test]
    fn a_reply_of_another_family_or_protocol_is_refused() {
        let v4 = tcp_record(1, TcpPhase::Established, 1);
        let mut other_family = v4;
        other_family.reply.src = Ipv6Addr::LOCALHOST.into();
        other_family.reply.dst = Ipv6Addr::LOCALHOST.into();
        let mut other_proto = v4;
        other_proto.reply.proto = 17;
        for record in [other_family, other_proto] {
            let mut buf = Vec::new();
            Frame::Upsert {
                records: vec![record],
            }
            .encode(&mut buf);
            assert_eq!(Frame::decode(&buf), Err(ProtoError::ReplyMismatch));
        }
    }

    #[test]
    fn bulk_answers_split_into_frames_that_fit() {
        let records: Vec<_> = (0..2000)
            .map(|i| tcp_record(i, TcpPhase::Established, 1))
            .collect();
        let frames: Vec<Frame> = upsert_frames(&records).collect();
        assert!(frames.len() > 1);
        let mut total = 0;
        for f in &frames {
            let mut buf = Vec::new();
            f.encode(&mut buf);
            assert!(buf.len() - HEADER_LEN <= MAX_PAYLOAD);
            let Frame::Upsert { records } = f else {
                unreachable!()
            };
            total += records.len();
        }
        assert_eq!(total, 2000);
    }

    #[test]
    fn many_deletes_split_into_frames_that_fit() {
        let keys: Vec<_> = (0..5000)
            .map(|i| tcp_record(i, TcpPhase::Established, 1).key)
            .collect();
        let frames: Vec<Frame> = delete_frames(&keys).collect();
        assert!(frames.len() > 1);
        let mut decoded = Vec::new();
        for f in &frames {
            let mut buf = Vec::new();
            f.encode(&mut buf);
            assert!(buf.len() - HEADER_LEN <= MAX_PAYLOAD);
            let Some((Frame::Delete { keys }, _)) = Frame::decode(&buf).unwrap() else {
                panic!("a delete frame decodes as one");
            };
            decoded.extend(keys);
        }
        assert_eq!(decoded, keys);
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_only_consumes_what_it_has(
            bytes in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            for input in [&bytes[..], &framed[..]] {
                if let Ok(Some((_, used))) = Frame::decode(input) {
                    prop_assert!(used <= input.len());
                }
            }
        }

        #[test]
        fn records_round_trip(port: u16, seqhi: u32, packets: [u64; 2], timeout_s: u32) {
            let mut r = tcp_record(port, TcpPhase::FinWait, seqhi);
            r.packets = packets;
            r.timeout_s = timeout_s;
            let frame = Frame::Upsert { records: vec![r] };
            let mut buf = Vec::new();
            frame.encode(&mut buf);
            prop_assert_eq!(Frame::decode(&buf), Ok(Some((frame, buf.len()))));
        }
    }
}
