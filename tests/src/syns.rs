//! `carp-traffic syns`: the first packet of many TCP connections, from the client through
//! the gateway, as fast as a raw socket sends them. Each SYN makes one flow in the gateway's
//! kernel conntrack (what conntrackd listens to) and in carp's XDP capture alike, so both
//! sync daemons are timed on the same work.

use anyhow::{Result, bail};
use std::net::Ipv4Addr;

/// Distinct flows per source address (source ports 10,000..60,000).
const PORTS: u32 = 50_000;

/// SYN `i` of a run from `src` (the next source address every [`PORTS`] flows) to
/// `dst:port`: an IPv4 header (checksummed) and a TCP header (checksummed), 40 bytes.
pub fn syn(src: Ipv4Addr, dst: Ipv4Addr, port: u16, i: u32) -> (Ipv4Addr, [u8; 40]) {
    let src = Ipv4Addr::from(u32::from(src) + i / PORTS);
    let sport = (10_000 + i % PORTS) as u16;
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_sum = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p[24..28].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
    p[32] = 0x50; // data offset 5 words
    p[33] = 0x02; // SYN
    p[34..36].copy_from_slice(&64_240u16.to_be_bytes());
    let mut pseudo = 0u32;
    for pair in [src.octets(), dst.octets()] {
        pseudo += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        pseudo += u32::from(u16::from_be_bytes([pair[2], pair[3]]));
    }
    pseudo += 6 + 20;
    let tcp_sum = checksum(&p[20..], pseudo);
    p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
    (src, p)
}

/// The Internet checksum of `data`, starting from `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `count` SYNs from `src` (and the addresses after it) to `dst:port` through a raw
/// socket; prints `sent <count> first_us=<t> last_us=<t>`.
pub fn run(src: Ipv4Addr, dst: Ipv4Addr, port: u16, count: u32) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let first = crate::unix_us();
    for i in 0..count {
        let (_, packet) = syn(src, dst, port, i);
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        loop {
            // SAFETY: a valid buffer and address of the sizes given.
            let sent = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if sent >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            // A full queue: wait for it rather than lose a flow.
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::sleep(std::time::Duration::from_micros(50));
                continue;
            }
            bail!("sendto: {e}");
        }
    }
    println!("sent {count} first_us={first} last_us={}", crate::unix_us());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syns_are_distinct_and_checksum_to_zero() {
        let (src, dst) = (
            Ipv4Addr::new(198, 18, 1, 100),
            Ipv4Addr::new(198, 18, 2, 100),
        );
        let (a_src, a) = syn(src, dst, 5001, 0);
        let (b_src, b) = syn(src, dst, 5001, PORTS + 1);
        assert_eq!(a_src, src);
        assert_eq!(b_src, Ipv4Addr::new(198, 18, 1, 101));
        assert_eq!(checksum(&a[..20], 0), 0, "the IP header checks");
        let mut pseudo = 0u32;
        for pair in [src.octets(), dst.octets()] {
            pseudo += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
            pseudo += u32::from(u16::from_be_bytes([pair[2], pair[3]]));
        }
        assert_eq!(checksum(&a[20..], pseudo + 26), 0, "the TCP segment checks");
        assert_ne!(a[20..22], b[20..22], "another source port");
        assert_eq!(a[33], 0x02);
    }
}
