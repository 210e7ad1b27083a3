//! Lab traffic for the state-sync tests, run inside a namespace.
//!
//! `carp-traffic serve ADDR:PORT`: a TCP server that pushes 1 KiB to every connection every
//! 20 ms until the connection fails, and a UDP echo server on the same port.
//!
//! `carp-traffic streams ADDR:PORT CONNS SECONDS`: opens CONNS TCP connections to the server
//! and one UDP flow (a datagram every 20 ms), reads for SECONDS, then prints one line per
//! connection, `tcp <n> bytes=<b> last_rx_us=<t> error=<e>`, and
//! `udp sent=<s> received=<r> last_rx_us=<t>`, so a test can tell which ones survived. With
//! FIRST_PORT, connection i is made from port FIRST_PORT + i and ends with a reset (as a
//! killed client's does), so the next run may reuse the very same tuples at once.
//!
//! `carp-traffic impair IF_A IF_B LOSS_% DELAY_MS JITTER_MS REORDER_%`: forwards frames
//! between two interfaces with loss, delay and reordering (netem in user space).
//!
//! `carp-traffic syns SRC DST:PORT COUNT`: COUNT TCP SYNs, each a new flow, from SRC (and
//! the addresses after it every 50,000) through the gateway, as fast as they go.

use anyhow::{Result, bail};
use carp_lab::unix_us;
use socket2::{Domain, Socket, Type};
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

const CHUNK: [u8; 1024] = [0x5a; 1024];
const PERIOD: Duration = Duration::from_millis(20);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [_, "serve", addr] => serve(addr.parse()?),
        [_, "streams", addr, conns, seconds] => streams(
            addr.parse()?,
            conns.parse()?,
            Duration::from_secs(seconds.parse()?),
            None,
        ),
        [_, "streams", addr, conns, seconds, first_port] => streams(
            addr.parse()?,
            conns.parse()?,
            Duration::from_secs(seconds.parse()?),
            Some(first_port.parse()?),
        ),
        [_, "impair", a, b, loss, delay_ms, jitter_ms, reorder] => carp_lab::impair::run(
            a,
            b,
            carp_lab::impair::Impairment {
                loss_pct: loss.parse()?,
                delay: Duration::from_millis(delay_ms.parse()?),
                jitter: Duration::from_millis(jitter_ms.parse()?),
                reorder_pct: reorder.parse()?,
            },
        ),
        [_, "syns", src, dst, count] => {
            let dst: std::net::SocketAddrV4 = dst.parse()?;
            carp_lab::syns::run(src.parse()?, *dst.ip(), dst.port(), count.parse()?)
        }
        _ => bail!(
            "usage: carp-traffic serve ADDR:PORT | streams ADDR:PORT CONNS SECONDS [FIRST_PORT] \
             | impair IF_A IF_B LOSS_% DELAY_MS JITTER_MS REORDER_% | syns SRC DST:PORT COUNT"
        ),
    }
}

fn serve(addr: SocketAddr) -> Result<()> {
    let udp = UdpSocket::bind(addr)?;
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    let listener = TcpListener::bind(addr)?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        thread::spawn(move || {
            let _ = stream.set_nodelay(true);
            while stream.write_all(&CHUNK).is_ok() {
                thread::sleep(PERIOD);
            }
        });
    }
    Ok(())
}

#[derive(Default, Clone)]
struct Tally {
    bytes: u64,
    last_rx_us: u128,
    error: Option<String>,
}

/// A connection from `port` that a close resets.
fn connect_from(addr: SocketAddr, port: u16) -> Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_linger(Some(Duration::ZERO))?;
    let any: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], port).into()
    } else {
        ([0u16; 8], port).into()
    };
    socket.bind(&any.into())?;
    socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

fn streams(
    addr: SocketAddr,
    conns: usize,
    duration: Duration,
    first_port: Option<u16>,
) -> Result<()> {
    let end = Instant::now() + duration;
    let tallies: Vec<Arc<Mutex<Tally>>> = (0..conns).map(|_| Arc::default()).collect();
    let mut threads = Vec::new();
    for (i, tally) in tallies.iter().enumerate() {
        let mut stream = match first_port {
            Some(first) => connect_from(addr, first + i as u16)?,
            None => TcpStream::connect_timeout(&addr, Duration::from_secs(5))?,
        };
        let tally = tally.clone();
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 16384];
            while Instant::now() < end {
                let _ = stream.set_read_timeout(Some(
                    end.saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                ));
                match stream.read(&mut buf) {
                    Ok(0) => {
                        tally.lock().unwrap().error = Some("closed".into());
                        return;
                    }
                    Ok(n) => {
                        let mut t = tally.lock().unwrap();
                        t.bytes += n as u64;
                        t.last_rx_us = unix_us();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => {
                        tally.lock().unwrap().error = Some(e.kind().to_string().replace(' ', "_"));
                        return;
                    }
                }
            }
        }));
    }
    let udp = UdpSocket::bind("0.0.0.0:0")?;
    udp.connect(addr)?;
    udp.set_read_timeout(Some(Duration::from_millis(5)))?;
    let (mut sent, mut received, mut udp_last) = (0u64, 0u64, 0u128);
    let mut buf = [0u8; 64];
    let mut next = Instant::now();
    while Instant::now() < end {
        if Instant::now() >= next {
            if udp.send(&sent.to_be_bytes()).is_ok() {
                sent += 1;
            }
            next += PERIOD;
        }
        if udp.recv(&mut buf).is_ok() {
            received += 1;
            udp_last = unix_us();
        }
    }
    for t in threads {
        let _ = t.join();
    }
    let mut out = std::io::stdout().lock();
    for (i, tally) in tallies.iter().enumerate() {
        let t = tally.lock().unwrap().clone();
        writeln!(
            out,
            "tcp {i} bytes={} last_rx_us={} error={}",
            t.bytes,
            t.last_rx_us,
            t.error.as_deref().unwrap_or("-")
        )?;
    }
    writeln!(
        out,
        "udp sent={sent} received={received} last_rx_us={udp_last}"
    )?;
    Ok(())
}
