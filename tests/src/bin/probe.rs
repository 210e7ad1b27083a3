//! Lab helper, run inside a namespace.
//!
//! `carp-probe arp IFACE TARGET INTERVAL_MS DURATION_MS`: sends an ARP request for TARGET
//! every INTERVAL_MS out of IFACE and prints `req <unix_us>` per request and
//! `reply <unix_us> <mac>` per reply, so a test can count answers and time takeovers.
//!
//! `carp-probe dhcp-rebind IFACE MAC ADDRESS INTERVAL_MS DURATION_MS`: a rebinding client
//! (RFC 2131 4.4.5: ADDRESS as ciaddr, broadcast, no server named) asking every INTERVAL_MS
//! until the first DHCPACK, printed as `ack <unix_us> <server>` (or `nak ...`).

use anyhow::{Context, Result, bail};
use carp_lab::unix_us;
use std::{
    io::Write,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

const ETH_P_ARP: u16 = 0x0806;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, iface, mac, address, interval, duration] = args.as_slice()
        && mode == "dhcp-rebind"
    {
        return carp_lab::dhcp::rebind_probe(
            iface,
            mac,
            address.parse()?,
            Duration::from_millis(interval.parse()?),
            Duration::from_millis(duration.parse()?),
        );
    }
    let [_, mode, iface, target, interval, duration] = args.as_slice() else {
        bail!(
            "usage: carp-probe arp IFACE TARGET INTERVAL_MS DURATION_MS | dhcp-rebind IFACE MAC ADDRESS INTERVAL_MS DURATION_MS"
        );
    };
    if mode != "arp" {
        bail!("unknown mode {mode}");
    }
    let target: Ipv4Addr = target.parse()?;
    let interval = Duration::from_millis(interval.parse()?);
    let duration = Duration::from_millis(duration.parse()?);
    let (ifindex, mac, ip) = local(iface)?;
    let fd = open(ifindex)?;
    let request = arp_request(mac, ip, target);
    let end = Instant::now() + duration;
    let mut out = std::io::stdout().lock();
    let mut next_send = Instant::now();
    let mut buf = [0u8; 1600];
    while Instant::now() < end {
        if Instant::now() >= next_send {
            send(&fd, ifindex, &request)?;
            writeln!(out, "req {}", unix_us())?;
            next_send += interval;
        }
        let wait = next_send
            .saturating_duration_since(Instant::now())
            .min(end - Instant::now().min(end));
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, wait.as_millis().max(1) as i32) };
        if ready <= 0 {
            continue;
        }
        // SAFETY: `buf` is valid for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 42 {
            continue;
        }
        let f = &buf[..n as usize];
        if f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == target.octets() {
            let sha = &f[22..28];
            let mac: Vec<String> = sha.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(out, "reply {} {}", unix_us(), mac.join(":"))?;
        }
        out.flush()?;
    }
    out.flush()?;
    Ok(())
}

fn local(iface: &str) -> Result<(u32, [u8; 6], Ipv4Addr)> {
    let ifindex = nix::net::if_::if_nametoindex(iface).context("no such interface")?;
    let (mut mac, mut ip) = (None, None);
    for ifa in nix::ifaddrs::getifaddrs()? {
        if ifa.interface_name != iface {
            continue;
        }
        if let Some(a) = ifa.address {
            if let Some(l) = a.as_link_addr() {
                mac = l.addr();
            } else if let Some(s) = a.as_sockaddr_in() {
                ip = Some(s.ip());
            }
        }
    }
    Ok((
        ifindex,
        mac.context("no MAC")?,
        ip.context("no IPv4 address")?,
    ))
}

fn open(ifindex: u32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ARP.to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a valid sockaddr_ll for the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(fd)
}

fn send(fd: &OwnedFd, ifindex: u32, frame: &[u8]) -> Result<()> {
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: valid buffer and address for the call.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn arp_request(mac: [u8; 6], ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}
