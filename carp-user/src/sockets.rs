//! The daemon's sockets: a raw IPv4 protocol-112 socket that receives adverts (with the
//! arrival interface from IP_PKTINFO) and sends unicast ones, and an AF_PACKET socket that
//! sends whole frames, so adverts and gratuitous ARP leave from the virtual MAC.

use crate::carp::packet::{CARP_GROUP_V4, CARP_TTL, IPPROTO_CARP};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt};
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};
use std::{
    io::{self, IoSliceMut},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};
use tokio::io::unix::AsyncFd;

/// One received IPv4 packet of protocol 112, IP header included.
pub struct Received {
    pub ifindex: u32,
    pub len: usize,
}

/// The raw protocol-112 socket.
pub struct AdvertSocket {
    fd: AsyncFd<Socket>,
}

impl AdvertSocket {
    /// Opens the socket and joins 224.0.0.18 on every interface in `ifindexes`.
    pub fn open(ifindexes: &[u32]) -> io::Result<Self> {
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(i32::from(IPPROTO_CARP))),
        )?;
        socket.set_nonblocking(true)?;
        socket.set_multicast_loop_v4(false)?;
        socket.set_multicast_all_v4(false)?;
        socket.set_multicast_ttl_v4(u32::from(CARP_TTL))?;
        socket.set_ttl_v4(u32::from(CARP_TTL))?;
        socket.set_tos_v4(0x10)?;
        setsockopt(&socket, sockopt::Ipv4PacketInfo, &true).map_err(io::Error::from)?;
        // SAFETY: `socket` owns its descriptor for as long as the AsyncFd holds it.
        let fd =
            unsafe { AsyncFd::register(socket) }.map_err(|e| io::Error::other(e.to_string()))?;
        let this = Self { fd };
        for &index in ifindexes {
            this.join(index)?;
        }
        Ok(this)
    }

    /// Joins 224.0.0.18 on `ifindex` (a VIP on a new interface); joined already is fine
    /// (several VIPs share an interface).
    pub fn join(&self, ifindex: u32) -> io::Result<()> {
        match self
            .fd
            .get_ref()
            .join_multicast_v4_n(&CARP_GROUP_V4, &InterfaceIndexOrAddress::Index(ifindex))
        {
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => Ok(()),
            joined => joined,
        }
    }

    /// Waits for the next packet; fills `buf` with it (IP header first).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| recv_with_ifindex(inner.get_ref(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends a CARP payload (advert bytes) by unicast to `peer`; the kernel adds the IPv4
    /// header with TTL 255.
    pub fn send_unicast(&self, peer: Ipv4Addr, payload: &[u8]) -> io::Result<()> {
        let to = SocketAddrV4::new(peer, 0);
        self.fd.get_ref().send_to(payload, &to.into()).map(drop)
    }
}

fn recv_with_ifindex(socket: &Socket, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
    let msg = recvmsg::<SockaddrIn>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let mut ifindex = 0;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::Ipv4PacketInfo(info) = c {
            ifindex = info.ipi_ifindex as u32;
        }
    }
    Ok(Received {
        ifindex,
        len: msg.bytes,
    })
}

/// An AF_PACKET socket that only sends (protocol 0: it receives nothing).
pub struct FrameSocket {
    fd: OwnedFd,
}

impl FrameSocket {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Sends `frame` (Ethernet header included) out of `ifindex`.
    pub fn send(&self, ifindex: u32, frame: &[u8]) -> io::Result<()> {
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` outlive the call; lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}
