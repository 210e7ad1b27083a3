//! The frames around adverts: the IPv4 header of a received advert, the Ethernet + IPv4 +
//! CARP frame we send from the virtual MAC, and gratuitous ARP. Sans-IO, bounds-checked.

use super::packet::{ADVERT_LEN, CARP_TTL, IPPROTO_CARP, internet_checksum};
use std::net::Ipv4Addr;

/// Bytes of the Ethernet header in front of the IPv4 packet.
pub const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const ARP_LEN: usize = 28;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
/// IP TOS of adverts (IPTOS_LOWDELAY, as FreeBSD and ucarp send).
const CARP_TOS: u8 = 0x10;
/// Length of an advert frame on the wire.
pub const ADVERT_FRAME_LEN: usize = ETH_LEN + IPV4_LEN + ADVERT_LEN;
/// Length of a gratuitous ARP frame (before padding by the NIC).
pub const GARP_FRAME_LEN: usize = ETH_LEN + ARP_LEN;
/// The Ethernet broadcast address.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// Why a received IPv4 packet is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("IPv4 packet of {len} bytes is truncated")]
    Truncated { len: usize },
    #[error("not IPv4 (version {version})")]
    NotIpv4 { version: u8 },
    #[error("IPv4 header length {ihl} words is invalid")]
    HeaderLength { ihl: u8 },
}

/// The fields of a received IPv4 header that CARP cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Info {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub protocol: u8,
}

/// Splits a raw-socket IPv4 packet into its header fields and payload.
pub fn parse_ipv4(packet: &[u8]) -> Result<(Ipv4Info, &[u8]), FrameError> {
    let Some(&first) = packet.first() else {
        return Err(FrameError::Truncated { len: 0 });
    };
    if first >> 4 != 4 {
        return Err(FrameError::NotIpv4 {
            version: first >> 4,
        });
    }
    let ihl = first & 0x0f;
    let header_len = usize::from(ihl) * 4;
    if ihl < 5 {
        return Err(FrameError::HeaderLength { ihl });
    }
    if packet.len() < header_len {
        return Err(FrameError::Truncated { len: packet.len() });
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    // The kernel may hand over trailing padding; a total shorter than the header is bogus.
    let end = if total >= header_len && total <= packet.len() {
        total
    } else {
        packet.len()
    };
    let info = Ipv4Info {
        ttl: packet[8],
        protocol: packet[9],
        src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
    };
    Ok((info, &packet[header_len..end]))
}

/// The Ethernet multicast MAC of an IPv4 group (RFC 1112: 01:00:5e + low 23 bits).
pub fn ipv4_multicast_mac(group: Ipv4Addr) -> [u8; 6] {
    let o = group.octets();
    [0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]]
}

/// Addresses of an advert frame.
#[derive(Debug, Clone, Copy)]
pub struct AdvertAddrs {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
}

/// A whole advert frame: Ethernet from `src_mac` (the virtual MAC), IPv4 with TTL 255,
/// TOS 0x10 and DF, and the encoded advert.
pub fn advert_frame(
    addrs: &AdvertAddrs,
    ip_id: u16,
    advert: &[u8; ADVERT_LEN],
) -> [u8; ADVERT_FRAME_LEN] {
    let mut f = [0u8; ADVERT_FRAME_LEN];
    f[0..6].copy_from_slice(&addrs.dst_mac);
    f[6..12].copy_from_slice(&addrs.src_mac);
    f[12..14].copy_from_slice(&ETHERTYPE_IPV4);
    let ip = &mut f[ETH_LEN..ETH_LEN + IPV4_LEN];
    ip[0] = 0x45;
    ip[1] = CARP_TOS;
    ip[2..4].copy_from_slice(&((IPV4_LEN + ADVERT_LEN) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&ip_id.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = CARP_TTL;
    ip[9] = IPPROTO_CARP;
    ip[12..16].copy_from_slice(&addrs.src_ip.octets());
    ip[16..20].copy_from_slice(&addrs.dst_ip.octets());
    let sum = internet_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f[ETH_LEN + IPV4_LEN..].copy_from_slice(advert);
    f
}

/// A gratuitous ARP request announcing that `ip` is at `mac` (sender = target = `ip`), the
/// form FreeBSD's `arp_announce` and keepalived send.
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> [u8; GARP_FRAME_LEN] {
    let mut f = [0u8; GARP_FRAME_LEN];
    f[0..6].copy_from_slice(&BROADCAST_MAC);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP);
    let arp = &mut f[ETH_LEN..];
    arp[0..2].copy_from_slice(&[0, 1]); // Ethernet
    arp[2..4].copy_from_slice(&ETHERTYPE_IPV4);
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&[0, 1]); // request
    arp[8..14].copy_from_slice(&mac);
    arp[14..18].copy_from_slice(&ip.octets());
    arp[24..28].copy_from_slice(&ip.octets());
    f
}

/// Length of a send-path probe: the Ethernet minimum without FCS.
pub const PROBE_FRAME_LEN: usize = 60;
/// IEEE 802.3 Configuration Testing Protocol ("loopback"), made for testing a link.
const ETHERTYPE_LOOPBACK: [u8; 2] = [0x90, 0x00];

/// A frame that tests the send path of an interface and reaches nobody: a loopback (CTP)
/// reply from `mac` to `mac`, which a switch or bridge drops on the port that sent it. A
/// backup demoted for send errors sends no adverts, so this is what shows the path healed.
pub fn send_probe(mac: [u8; 6]) -> [u8; PROBE_FRAME_LEN] {
    let mut f = [0u8; PROBE_FRAME_LEN];
    f[0..6].copy_from_slice(&mac);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETHERTYPE_LOOPBACK);
    // skipCount 0, then a Reply message (function 1, little-endian as CTP has it).
    f[16] = 1;
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carp::packet::{Advert, AuthKey, CARP_GROUP_V4};

    #[test]
    fn send_probe_goes_from_the_interface_to_itself() {
        let mac = [0x02, 0, 0, 0, 0, 7];
        let f = send_probe(mac);
        assert_eq!(
            &f[0..6],
            &mac,
            "to itself: the bridge drops it on the same port"
        );
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x90, 0x00]);
        assert_eq!(f.len(), 60);
    }

    /// The IPv4 header ucarp sent with the golden advert in `packet.rs`.
    const UCARP_IPV4_HEADER: [u8; 20] = [
        0x45, 0x10, 0x00, 0x38, 0xf2, 0xd9, 0x40, 0x00, 0xff, 0x70, 0xe1, 0x44, 0xc6, 0x12, 0x01,
        0x02, 0xe0, 0x00, 0x00, 0x12,
    ];

    #[test]
    fn advert_frame_ip_header_matches_ucarp() {
        let advert = [0u8; ADVERT_LEN];
        let addrs = AdvertAddrs {
            src_mac: [0, 0, 0x5e, 0, 1, 7],
            dst_mac: ipv4_multicast_mac(CARP_GROUP_V4),
            src_ip: Ipv4Addr::new(198, 18, 1, 2),
            dst_ip: CARP_GROUP_V4,
        };
        let frame = advert_frame(&addrs, 0xf2d9, &advert);
        assert_eq!(&frame[0..6], &[0x01, 0x00, 0x5e, 0x00, 0x00, 0x12]);
        assert_eq!(&frame[6..12], &[0, 0, 0x5e, 0, 1, 7]);
        assert_eq!(&frame[14..34], &UCARP_IPV4_HEADER);
    }

    #[test]
    fn parse_ipv4_round_trips_a_sent_advert() {
        let advert = Advert::signed(&AuthKey::new(b"k").unwrap(), 9, &[], 1, 0, 5);
        let addrs = AdvertAddrs {
            src_mac: [2; 6],
            dst_mac: [1; 6],
            src_ip: Ipv4Addr::new(198, 18, 0, 1),
            dst_ip: CARP_GROUP_V4,
        };
        let frame = advert_frame(&addrs, 1, &advert.emit());
        let (info, payload) = parse_ipv4(&frame[ETH_LEN..]).unwrap();
        assert_eq!(info.ttl, 255);
        assert_eq!(info.protocol, IPPROTO_CARP);
        assert_eq!(info.src, addrs.src_ip);
        assert_eq!(Advert::parse(payload), Ok(advert));
    }

    #[test]
    fn parse_ipv4_rejects_short_and_bogus_headers() {
        assert_eq!(parse_ipv4(&[]), Err(FrameError::Truncated { len: 0 }));
        assert_eq!(parse_ipv4(&[0x65]), Err(FrameError::NotIpv4 { version: 6 }));
        assert_eq!(
            parse_ipv4(&[0x44]),
            Err(FrameError::HeaderLength { ihl: 4 })
        );
        assert_eq!(
            parse_ipv4(&UCARP_IPV4_HEADER[..19]),
            Err(FrameError::Truncated { len: 19 })
        );
        let mut options = [0u8; 24];
        options[0] = 0x46;
        assert!(parse_ipv4(&options[..23]).is_err());
        assert_eq!(parse_ipv4(&options).unwrap().1.len(), 0);
    }

    #[test]
    fn gratuitous_arp_announces_ip_at_mac() {
        let f = gratuitous_arp([0, 0, 0x5e, 0, 1, 3], Ipv4Addr::new(198, 18, 1, 1));
        assert_eq!(&f[0..6], &BROADCAST_MAC);
        assert_eq!(&f[12..14], &ETHERTYPE_ARP);
        assert_eq!(&f[22..28], &[0, 0, 0x5e, 0, 1, 3]);
        assert_eq!(&f[28..32], &[198, 18, 1, 1]);
        assert_eq!(&f[38..42], &[198, 18, 1, 1]);
    }
}
