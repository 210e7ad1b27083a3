//! Which of the node's vhids a received packet speaks to, or why it is refused: the checks
//! FreeBSD's `carp_input` makes before a state machine hears a peer (IPv4 and protocol, TTL
//! 255, the advert's own checks, a vhid run here, its HMAC). Sans-IO: the daemon hands in the
//! packet, counts each refusal by its reason and feeds the accepted advert to the vhid.
//! <https://github.com/freebsd/freebsd-src/blob/main/sys/netinet/ip_carp.c> (`carp_input_c`).

use super::{
    frame::{self, FrameError},
    fsm::PeerAdvert,
    packet::{Advert, AuthKey, CARP_TTL, IPPROTO_CARP, PacketError},
};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// What acceptance needs to know of one vhid the node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub vhid: u8,
    /// The interface it runs on (adverts for it arrive there, unless unicast).
    pub ifindex: u32,
    /// Its VIP, which the advert's HMAC covers.
    pub vip: Ipv4Addr,
}

/// The node-wide rules an advert is held to.
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    /// Addresses of this host: adverts from them are our own, looped back.
    pub own_addresses: &'a [Ipv4Addr],
    pub key: &'a AuthKey,
    /// Adverts go to one configured peer: they may arrive on any interface.
    pub unicast: bool,
}

/// An advert for the vhid at `index` of the listeners handed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub index: usize,
    pub peer: PeerAdvert,
}

/// Why a received packet does not reach any vhid. The daemon counts each but
/// [`Refusal::NotFromPeer`] under its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Another protocol on the raw socket, or our own advert looped back: not counted.
    #[error("not an advert from a peer")]
    NotFromPeer,
    #[error("malformed IPv4 packet")]
    Ipv4 {
        #[source]
        source: FrameError,
    },
    /// RFC 5798 5.1.1.3, FreeBSD alike: an advert that crossed a router is refused.
    #[error("advert from {src} with TTL {ttl}, not 255")]
    Ttl { src: Ipv4Addr, ttl: u8 },
    #[error("malformed advert from {src}")]
    Advert {
        src: Ipv4Addr,
        #[source]
        source: PacketError,
    },
    #[error("advert from {src} for vhid {vhid}, which does not run on that interface")]
    UnknownVhid { src: Ipv4Addr, vhid: u8 },
    #[error("advert from {src} for vhid {vhid} failed authentication")]
    Auth { src: Ipv4Addr, vhid: u8 },
}

/// Checks an IPv4 packet received on `ifindex` against `rules` and the node's `listeners`.
pub fn accept(
    packet: &[u8],
    ifindex: u32,
    rules: Rules<'_>,
    listeners: impl IntoIterator<Item = Listener>,
) -> Result<Accepted, Refusal> {
    let (ip, payload) = frame::parse_ipv4(packet).map_err(|source| Refusal::Ipv4 { source })?;
    if ip.protocol != IPPROTO_CARP || rules.own_addresses.contains(&ip.src) {
        return Err(Refusal::NotFromPeer);
    }
    let src = ip.src;
    if ip.ttl != CARP_TTL {
        return Err(Refusal::Ttl { src, ttl: ip.ttl });
    }
    let advert = Advert::parse(payload).map_err(|source| Refusal::Advert { src, source })?;
    let vhid = advert.vhid;
    let (index, listener) = listeners
        .into_iter()
        .enumerate()
        .find(|(_, l)| l.vhid == vhid && (l.ifindex == ifindex || rules.unicast))
        .ok_or(Refusal::UnknownVhid { src, vhid })?;
    if !advert.verify(rules.key, &[listener.vip]) {
        return Err(Refusal::Auth { src, vhid });
    }
    Ok(Accepted {
        index,
        peer: PeerAdvert {
            advbase: advert.advbase,
            advskew: advert.advskew,
            source: src,
        },
    })
}

/// Authentication failures repeat with every advert of a misconfigured peer: one warning
/// per [`AuthWarnings::QUIET`] is enough, the counter has the rest.
#[derive(Debug, Default)]
pub struct AuthWarnings {
    last: Option<Instant>,
}

impl AuthWarnings {
    pub const QUIET: Duration = Duration::from_secs(10);

    /// Whether a failure at `now` is worth a warning (and then counts as warned).
    pub fn due(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Self::QUIET)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carp::frame::{AdvertAddrs, ETH_LEN, advert_frame};
    use crate::carp::packet::CARP_GROUP_V4;

    const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
    const OWN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
    const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);

    fn key() -> AuthKey {
        AuthKey::new(b"secret").unwrap()
    }

    /// The node runs vhid 1 on interface 3 and vhid 2 on interface 4.
    fn listeners() -> [Listener; 2] {
        [
            Listener {
                vhid: 1,
                ifindex: 3,
                vip: VIP,
            },
            Listener {
                vhid: 2,
                ifindex: 4,
                vip: OTHER_VIP,
            },
        ]
    }

    /// The IPv4 packet (as the raw socket hands it over) of an advert from `src`.
    fn packet(src: Ipv4Addr, advert: &Advert) -> Vec<u8> {
        let addrs = AdvertAddrs {
            src_mac: [0, 0, 0x5e, 0, 1, advert.vhid],
            dst_mac: [1, 0, 0x5e, 0, 0, 0x12],
            src_ip: src,
            dst_ip: CARP_GROUP_V4,
        };
        advert_frame(&addrs, 7, &advert.emit())[ETH_LEN..].to_vec()
    }

    fn advert(key: &AuthKey, vhid: u8, vip: Ipv4Addr) -> Advert {
        Advert::signed(key, vhid, &[vip], 1, 100, 42)
    }

    fn check(packet: &[u8], ifindex: u32, unicast: bool) -> Result<Accepted, Refusal> {
        let key = key();
        let rules = Rules {
            own_addresses: &[OWN],
            key: &key,
            unicast,
        };
        accept(packet, ifindex, rules, listeners())
    }

    #[test]
    fn a_peers_advert_reaches_its_vhid_with_its_timing_and_source() {
        let accepted = check(&packet(PEER, &advert(&key(), 2, OTHER_VIP)), 4, false);
        assert_eq!(
            accepted,
            Ok(Accepted {
                index: 1,
                peer: PeerAdvert {
                    advbase: 1,
                    advskew: 100,
                    source: PEER
                },
            })
        );
    }

    #[test]
    fn our_own_advert_and_other_protocols_are_ignored_uncounted() {
        let own = check(&packet(OWN, &advert(&key(), 1, VIP)), 3, false);
        assert_eq!(own, Err(Refusal::NotFromPeer));
        let mut tcp = packet(PEER, &advert(&key(), 1, VIP));
        tcp[9] = 6;
        assert_eq!(check(&tcp, 3, false), Err(Refusal::NotFromPeer));
    }

    #[test]
    fn an_advert_that_crossed_a_router_is_refused() {
        let mut routed = packet(PEER, &advert(&key(), 1, VIP));
        routed[8] = 254;
        let refusal = check(&routed, 3, false).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::Ttl {
                src: PEER,
                ttl: 254
            }
        );
    }

    #[test]
    fn truncated_or_corrupt_packets_count_as_malformed() {
        let whole = packet(PEER, &advert(&key(), 1, VIP));
        let short = check(&whole[..30], 3, false).unwrap_err();
        assert!(
            matches!(short, Refusal::Advert { src: PEER, .. }),
            "{short:?}"
        );
        let mut corrupt = whole.clone();
        corrupt[30] ^= 0xff;
        let corrupt = check(&corrupt, 3, false).unwrap_err();
        assert!(
            matches!(
                corrupt,
                Refusal::Advert {
                    source: PacketError::Checksum,
                    ..
                }
            ),
            "{corrupt:?}"
        );
        let not_ip = check(&[0x65; 40], 3, false).unwrap_err();
        assert!(matches!(not_ip, Refusal::Ipv4 { .. }), "{not_ip:?}");
    }

    #[test]
    fn a_vhid_is_heard_on_its_own_interface_unless_adverts_are_unicast() {
        let for_vhid_1 = packet(PEER, &advert(&key(), 1, VIP));
        let elsewhere = check(&for_vhid_1, 4, false).unwrap_err();
        assert_eq!(elsewhere, Refusal::UnknownVhid { src: PEER, vhid: 1 });
        assert_eq!(check(&for_vhid_1, 4, true).map(|a| a.index), Ok(0));
        let unknown = packet(PEER, &advert(&key(), 9, VIP));
        assert!(matches!(
            check(&unknown, 3, true),
            Err(Refusal::UnknownVhid { vhid: 9, .. })
        ));
    }

    #[test]
    fn another_passphrase_or_another_vip_fails_authentication() {
        let wrong_key = AuthKey::new(b"other").unwrap();
        let refusal = check(&packet(PEER, &advert(&wrong_key, 1, VIP)), 3, false).unwrap_err();
        assert_eq!(refusal, Refusal::Auth { src: PEER, vhid: 1 });
        // The HMAC covers the VIP: a peer configured with another address is not our peer.
        let other_vip = packet(PEER, &advert(&key(), 1, OTHER_VIP));
        assert_eq!(
            check(&other_vip, 3, false),
            Err(Refusal::Auth { src: PEER, vhid: 1 })
        );
    }

    #[test]
    fn authentication_warnings_come_once_per_quiet_period() {
        let start = Instant::now();
        let mut warnings = AuthWarnings::default();
        assert!(warnings.due(start));
        assert!(!warnings.due(start + Duration::from_secs(1)));
        assert!(!warnings.due(start + AuthWarnings::QUIET - Duration::from_millis(1)));
        assert!(warnings.due(start + AuthWarnings::QUIET));
        assert!(!warnings.due(start + AuthWarnings::QUIET + Duration::from_secs(9)));
    }
}
