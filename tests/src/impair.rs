//! A link impairment in user space, for kernels without netem (this one has none): frames
//! between two interfaces are forwarded by AF_PACKET sockets, each direction losing a share,
//! delaying the rest with jitter, and sending a share at once (so they overtake: reordering,
//! as netem's `reorder`). `carp-traffic impair` runs it in the lab's switch.

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

/// What happens to frames crossing the link, each way.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// Percent of frames dropped.
    pub loss_pct: u32,
    pub delay: Duration,
    /// Each delayed frame waits `delay` ± up to this.
    pub jitter: Duration,
    /// Percent of the surviving frames sent at once, overtaking the delayed ones.
    pub reorder_pct: u32,
}

impl Impairment {
    /// The command line of `carp-traffic impair` for interfaces `a` and `b`.
    pub fn args(&self, a: &str, b: &str) -> Vec<String> {
        vec![
            "impair".into(),
            a.into(),
            b.into(),
            self.loss_pct.to_string(),
            self.delay.as_millis().to_string(),
            self.jitter.as_millis().to_string(),
            self.reorder_pct.to_string(),
        ]
    }
}

/// Forwards between `a` and `b` until killed.
pub fn run(a: &str, b: &str, impairment: Impairment) -> Result<()> {
    let a = Arc::new(PacketSocket::bind(a)?);
    let b = Arc::new(PacketSocket::bind(b)?);
    let forward = |from: Arc<PacketSocket>, to: Arc<PacketSocket>, seed: u64| {
        thread::spawn(move || direction(&from, to, impairment, seed))
    };
    let one = forward(a.clone(), b.clone(), 1);
    let other = forward(b, a, 2);
    let _ = one.join();
    let _ = other.join();
    Ok(())
}

/// Frames waiting for their time, earliest first.
type Queue = Arc<(Mutex<BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>>, Condvar)>;

fn direction(from: &PacketSocket, to: Arc<PacketSocket>, impairment: Impairment, seed: u64) {
    let queue: Queue = Arc::default();
    let sender = {
        let queue = queue.clone();
        thread::spawn(move || send_when_due(&queue, &to))
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 65536];
    let mut sequence = 0u64;
    while let Some(len) = from.recv_incoming(&mut buf) {
        if rng.random_range(0..100) < impairment.loss_pct {
            continue;
        }
        let wait = if rng.random_range(0..100) < impairment.reorder_pct {
            Duration::ZERO
        } else {
            let jitter = impairment.jitter.as_micros() as i64;
            let offset = if jitter > 0 {
                rng.random_range(-jitter..=jitter)
            } else {
                0
            };
            let micros = (impairment.delay.as_micros() as i64 + offset).max(0);
            Duration::from_micros(micros as u64)
        };
        sequence += 1;
        let (heap, ready) = &*queue;
        heap.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Reverse((
                Instant::now() + wait,
                sequence,
                buf[..len].to_vec(),
            )));
        ready.notify_one();
    }
    drop(sender);
}

fn send_when_due(queue: &Queue, to: &PacketSocket) {
    let (heap, ready) = &**queue;
    let mut heap = heap
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let due = heap.peek().map(|Reverse((at, _, _))| *at);
        match due {
            Some(at) if at <= Instant::now() => {
                let Some(Reverse((_, _, frame))) = heap.pop() else {
                    continue;
                };
                drop(heap);
                to.send(&frame);
                heap = queue
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                heap = ready
                    .wait_timeout(heap, wait)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            None => {
                heap = ready
                    .wait(heap)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
    }
}

/// An AF_PACKET socket bound to one interface, all protocols.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn bind(ifname: &str) -> Result<Self> {
        let name = CString::new(ifname)?;
        // SAFETY: plain libc calls on values we own; the fd is wrapped at once.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr());
            anyhow::ensure!(ifindex != 0, "no interface {ifname}");
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol));
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            addr.sll_ifindex = ifindex as i32;
            let bound = libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if bound < 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("bind {ifname}"));
            }
            Ok(Self { fd })
        }
    }

    /// The next frame that arrived on the interface (not one sent from it); `None` on error.
    fn recv_incoming(&self, buf: &mut [u8]) -> Option<usize> {
        loop {
            // SAFETY: buf and addr are valid for the call.
            let (len, addr) = unsafe {
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                let mut addr_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let len = libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut addr).cast(),
                    &mut addr_len,
                );
                (len, addr)
            };
            if len < 0 {
                return None;
            }
            if addr.sll_pkttype != libc::PACKET_OUTGOING {
                return Some(len as usize);
            }
        }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: frame is valid for the call; the socket is bound to its interface.
        unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    }
}
