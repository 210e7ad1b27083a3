//! The CARP advertisement (36 bytes after the IPv4 header) and its HMAC-SHA1, wire-compatible
//! with FreeBSD/pfSense `ip_carp.c` and ucarp. Parsing never panics: every length is checked
//! before a byte is read (smoltcp's `new_checked` discipline).

use hmac::{KeyInit, Mac};
use std::net::Ipv4Addr;

/// IP protocol number of CARP.
pub const IPPROTO_CARP: u8 = 112;
/// IPv4 multicast group adverts go to.
pub const CARP_GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// TTL every advert is sent with and must arrive with.
pub const CARP_TTL: u8 = 255;
/// The advert's length on the wire.
pub const ADVERT_LEN: usize = 36;
/// Protocol version (high nibble of byte 0).
pub const CARP_VERSION: u8 = 2;
/// Message type "advertisement" (low nibble of byte 0).
pub const CARP_ADVERTISEMENT: u8 = 1;
/// Authentication data length in 32-bit words (FreeBSD `CARP_AUTHLEN`).
pub const CARP_AUTHLEN: u8 = 7;
/// Largest advskew a node puts on the wire, demotion included (FreeBSD `CARP_MAXSKEW`).
pub const CARP_MAXSKEW: u8 = 240;
/// Longest passphrase: the key is the passphrase zero-padded to 20 bytes, NUL-terminated.
pub const MAX_PASSPHRASE_LEN: usize = 19;

/// Why received bytes are not a CARP advertisement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("advert is {len} bytes, needs {ADVERT_LEN}")]
    Truncated { len: usize },
    #[error("CARP version {version}, expected {CARP_VERSION}")]
    Version { version: u8 },
    #[error("CARP type {kind}, expected advertisement ({CARP_ADVERTISEMENT})")]
    Type { kind: u8 },
    #[error("bad CARP checksum")]
    Checksum,
}

/// A decoded advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advert {
    pub vhid: u8,
    pub advskew: u8,
    pub authlen: u8,
    /// OpenBSD's demote counter; FreeBSD and ucarp send 0.
    pub demote: u8,
    pub advbase: u8,
    /// 64-bit replay counter, as on the wire (big-endian).
    pub counter: u64,
    /// HMAC-SHA1 over the vhid, the VIPs and the counter.
    pub md: [u8; 20],
}

impl Advert {
    /// Decodes and checksums an advertisement. Does not check the HMAC: that needs the vhid's
    /// key and VIPs, see [`Advert::verify`].
    pub fn parse(bytes: &[u8]) -> Result<Self, PacketError> {
        let Some(b) = bytes.get(..ADVERT_LEN) else {
            return Err(PacketError::Truncated { len: bytes.len() });
        };
        if b[0] >> 4 != CARP_VERSION {
            return Err(PacketError::Version { version: b[0] >> 4 });
        }
        if b[0] & 0x0f != CARP_ADVERTISEMENT {
            return Err(PacketError::Type { kind: b[0] & 0x0f });
        }
        if internet_checksum(b) != 0 {
            return Err(PacketError::Checksum);
        }
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&b[8..16]);
        let mut md = [0u8; 20];
        md.copy_from_slice(&b[16..36]);
        Ok(Self {
            vhid: b[1],
            advskew: b[2],
            authlen: b[3],
            demote: b[4],
            advbase: b[5],
            counter: u64::from_be_bytes(counter),
            md,
        })
    }

    /// A signed advertisement for `vhid` carrying `vips`.
    pub fn signed(
        key: &AuthKey,
        vhid: u8,
        vips: &[Ipv4Addr],
        advbase: u8,
        advskew: u8,
        counter: u64,
    ) -> Self {
        Self {
            vhid,
            advskew,
            authlen: CARP_AUTHLEN,
            demote: 0,
            advbase,
            counter,
            md: key.digest(vhid, vips, counter),
        }
    }

    /// Encodes the advertisement, checksum included.
    pub fn emit(&self) -> [u8; ADVERT_LEN] {
        let mut b = [0u8; ADVERT_LEN];
        b[0] = (CARP_VERSION << 4) | CARP_ADVERTISEMENT;
        b[1] = self.vhid;
        b[2] = self.advskew;
        b[3] = self.authlen;
        b[4] = self.demote;
        b[5] = self.advbase;
        b[8..16].copy_from_slice(&self.counter.to_be_bytes());
        b[16..36].copy_from_slice(&self.md);
        let sum = internet_checksum(&b);
        b[6..8].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Whether the HMAC matches `key` and the vhid's `vips` (constant-time comparison).
    pub fn verify(&self, key: &AuthKey, vips: &[Ipv4Addr]) -> bool {
        key.mac(self.vhid, vips, self.counter)
            .verify_slice(&self.md)
            .is_ok()
    }
}

type HmacSha1 = hmac::Hmac<sha1::Sha1>;

/// The CARP key: the passphrase bytes zero-padded to 20 bytes, not hashed (FreeBSD, ucarp).
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey([u8; 20]);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

impl AuthKey {
    /// The key for `passphrase`, or `None` when it is longer than [`MAX_PASSPHRASE_LEN`].
    pub fn new(passphrase: &[u8]) -> Option<Self> {
        if passphrase.len() > MAX_PASSPHRASE_LEN {
            return None;
        }
        let mut key = [0u8; 20];
        key[..passphrase.len()].copy_from_slice(passphrase);
        Some(Self(key))
    }

    fn mac(&self, vhid: u8, vips: &[Ipv4Addr], counter: u64) -> HmacSha1 {
        let mut mac = HmacSha1::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(&[CARP_VERSION, CARP_ADVERTISEMENT, vhid]);
        let mut sorted: Vec<[u8; 4]> = vips.iter().map(|ip| ip.octets()).collect();
        sorted.sort_unstable();
        for ip in &sorted {
            mac.update(ip);
        }
        mac.update(&counter.to_be_bytes());
        mac
    }

    /// HMAC-SHA1 of `version || type || vhid || VIPs ascending || counter`.
    pub fn digest(&self, vhid: u8, vips: &[Ipv4Addr], counter: u64) -> [u8; 20] {
        self.mac(vhid, vips, counter).finalize().into_bytes().into()
    }
}

/// RFC 1071 Internet checksum of `data`; 0 over data that carries a correct checksum.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One advert captured from ucarp 1.5.2 (Debian): `ucarp -i <if> -s 198.18.1.2 -v 7
    /// -p labsecret -a 198.18.1.1 -b 1 -k 10`, its 36 CARP bytes as tcpdump showed them.
    const UCARP_ADVERT: [u8; ADVERT_LEN] = [
        0x21, 0x07, 0x0a, 0x07, 0x00, 0x01, 0x30, 0xa6, 0x2c, 0x6c, 0x73, 0x2a, 0x96, 0x40, 0x6a,
        0x5e, 0x16, 0x2e, 0xfd, 0x5d, 0x42, 0xbb, 0x9a, 0xee, 0x25, 0x3b, 0x0b, 0x89, 0x69, 0x0f,
        0xbe, 0x45, 0x69, 0x71, 0x51, 0x54,
    ];

    #[test]
    fn checksum_of_correct_data_is_zero() {
        let advert = Advert::signed(
            &AuthKey::new(b"x").unwrap(),
            1,
            &[Ipv4Addr::new(198, 18, 1, 1)],
            1,
            0,
            42,
        );
        let bytes = advert.emit();
        assert_eq!(internet_checksum(&bytes), 0);
        assert_eq!(Advert::parse(&bytes), Ok(advert));
    }

    #[test]
    fn both_ones_complement_zeros_verify() {
        // Found by cargo fuzz: a header that sums to zero with checksum 0xffff as well as 0.
        let mut bytes = Advert::signed(&AuthKey::new(b"k").unwrap(), 1, &[], 1, 0, 1).emit();
        let sum = u16::from_be_bytes([bytes[6], bytes[7]]);
        if sum == 0 {
            bytes[6..8].copy_from_slice(&[0xff, 0xff]);
            assert!(Advert::parse(&bytes).is_ok());
        }
        let crash: [u8; 36] = [
            33, 8, 0, 0, 247, 58, 255, 255, 69, 0, 0, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27,
            27, 27, 255, 254, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
        ];
        let advert = Advert::parse(&crash).expect("0xffff is a valid zero checksum");
        assert_eq!(Advert::parse(&advert.emit()), Ok(advert));
    }

    #[test]
    fn odd_length_checksum_pads_with_zero() {
        assert_eq!(internet_checksum(&[0x01]), !0x0100);
        assert_eq!(internet_checksum(&[0x01, 0x00]), !0x0100);
    }

    #[test]
    fn rejects_truncated_bad_version_type_and_checksum() {
        let good = Advert::signed(&AuthKey::new(b"k").unwrap(), 3, &[], 1, 0, 1).emit();
        assert_eq!(
            Advert::parse(&good[..35]),
            Err(PacketError::Truncated { len: 35 })
        );
        let mut bad = good;
        bad[0] = 0x31;
        assert_eq!(
            Advert::parse(&bad),
            Err(PacketError::Version { version: 3 })
        );
        bad[0] = 0x22;
        assert_eq!(Advert::parse(&bad), Err(PacketError::Type { kind: 2 }));
        let mut bad = good;
        bad[2] ^= 1;
        assert_eq!(Advert::parse(&bad), Err(PacketError::Checksum));
    }

    #[test]
    fn hmac_covers_vhid_vips_and_counter_but_not_skew() {
        let key = AuthKey::new(b"secret").unwrap();
        let vips = [Ipv4Addr::new(198, 18, 1, 1)];
        let advert = Advert::signed(&key, 5, &vips, 1, 100, 7);
        assert!(advert.verify(&key, &vips));
        assert!(!advert.verify(&AuthKey::new(b"secreT").unwrap(), &vips));
        assert!(!advert.verify(&key, &[Ipv4Addr::new(198, 18, 1, 2)]));
        assert!(
            !Advert {
                counter: 8,
                ..advert
            }
            .verify(&key, &vips)
        );
        assert!(!Advert { vhid: 6, ..advert }.verify(&key, &vips));
        assert!(
            Advert {
                advskew: 0,
                advbase: 9,
                ..advert
            }
            .verify(&key, &vips)
        );
    }

    #[test]
    fn vip_order_does_not_matter() {
        let key = AuthKey::new(b"s").unwrap();
        let a = Ipv4Addr::new(198, 18, 1, 1);
        let b = Ipv4Addr::new(198, 18, 1, 9);
        assert_eq!(key.digest(1, &[a, b], 3), key.digest(1, &[b, a], 3));
    }

    #[test]
    fn passphrase_longer_than_19_bytes_is_refused() {
        assert!(AuthKey::new(&[b'a'; 19]).is_some());
        assert!(AuthKey::new(&[b'a'; 20]).is_none());
    }

    proptest::proptest! {
        #[test]
        fn emit_then_parse_is_identity(
            vhid: u8, advskew: u8, advbase: u8, demote: u8, counter: u64, md: [u8; 20]
        ) {
            let advert = Advert { vhid, advskew, authlen: CARP_AUTHLEN, demote, advbase, counter, md };
            proptest::prop_assert_eq!(Advert::parse(&advert.emit()), Ok(advert));
        }

        #[test]
        fn parse_never_panics_and_accepts_only_checksummed_adverts(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80)
        ) {
            if let Ok(advert) = Advert::parse(&bytes) {
                // Equal but for the checksum, which may be either one's-complement zero.
                let emitted = advert.emit();
                proptest::prop_assert_eq!(&emitted[..6], &bytes[..6]);
                proptest::prop_assert_eq!(&emitted[8..], &bytes[8..ADVERT_LEN]);
            }
        }
    }

    #[test]
    fn golden_ucarp_advert_decodes_and_verifies() {
        let advert = Advert::parse(&UCARP_ADVERT).expect("ucarp advert parses");
        assert_eq!((advert.vhid, advert.advbase, advert.advskew), (7, 1, 10));
        assert_eq!(advert.authlen, CARP_AUTHLEN);
        let key = AuthKey::new(b"labsecret").unwrap();
        assert!(advert.verify(&key, &[Ipv4Addr::new(198, 18, 1, 1)]));
        assert!(!advert.verify(&key, &[Ipv4Addr::new(198, 18, 1, 3)]));
        // Our encoder reproduces ucarp's bytes exactly.
        assert_eq!(advert.emit(), UCARP_ADVERT);
    }
}
