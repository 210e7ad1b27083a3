//! DHCP in the lab: a real client (ISC dhclient) in the client namespace, one per MAC
//! (macvlans on the client's port), its lease read from the lease file it writes; and the
//! clean-up of what carp's Kea and the clients leave running.

use crate::{Host, Lab};
use anyhow::{Context, Result, bail};
use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

/// The LAN pool the lab's `[[dhcp]]` serves.
pub const POOL: &str = "198.18.1.150-198.18.1.199";

/// What a client was given, from its lease file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLease {
    pub address: Ipv4Addr,
    pub routers: String,
    pub dns: String,
    /// The server that answered (Kea sends its interface's own address).
    pub server: Ipv4Addr,
}

/// A client on its own MAC: a macvlan `name` on the client's port (`eth0` itself for
/// "eth0").
pub fn add_client(lab: &Lab, name: &str) -> Result<()> {
    if name != "eth0" {
        lab.sh(
            Host::Client,
            &format!(
                "ip link add {name} link eth0 type macvlan mode bridge && ip link set {name} up"
            ),
        )?;
    }
    Ok(())
}

/// Runs dhclient once on `iface` and returns the lease it got; with a lease file from an
/// earlier run it asks for the same address again (INIT-REBOOT, as a client does after a
/// reboot or when its renewal goes unanswered). The client is stopped once bound.
pub fn request(lab: &Lab, iface: &str, within: Duration) -> Result<(ClientLease, Duration)> {
    request_wanting(lab, iface, within, None)
}

/// [`request`], the client asking for `wanted` in its DISCOVER (option 50), as a client does
/// that remembers an address.
pub fn request_wanting(
    lab: &Lab,
    iface: &str,
    within: Duration,
    wanted: Option<Ipv4Addr>,
) -> Result<(ClientLease, Duration)> {
    let files = |ext: &str| lab.dir.join(format!("dhclient-{iface}.{ext}"));
    let conf = files("conf");
    // Retransmitted every second (dhclient's backoff otherwise grows to a minute),
    // so the time to an answer is the servers' and not the client's.
    std::fs::write(
        &conf,
        format!(
            "timeout {};\nretry 1;\ninitial-interval 1;\nbackoff-cutoff 1;\n{}",
            within.as_secs().max(1),
            wanted.map_or(String::new(), |a| format!(
                "send dhcp-requested-address {a};\n"
            ))
        ),
    )?;
    // In the foreground (-d), as our own child: stopped by its PID once the lease is
    // written, and by the lab's teardown whatever happens (a daemonised dhclient writes its
    // PID file after its parent returns, and could outlive the lab).
    let leases = files("leases");
    let count = || {
        std::fs::read_to_string(&leases)
            .map(|t| t.matches("lease {").count())
            .unwrap_or(0)
    };
    let before = count();
    let started = Instant::now();
    let pid = lab.spawn(
        Host::Client,
        &[
            "dhclient",
            "-d",
            "-1",
            "-cf",
            &conf.to_string_lossy(),
            "-lf",
            &leases.to_string_lossy(),
            "-pf",
            &files("pid").to_string_lossy(),
            "-sf",
            "/bin/true",
            iface,
        ],
        &files("log"),
    )?;
    let bound = crate::wait_for(within + Duration::from_secs(1), || {
        (count() > before).then_some(())
    });
    let took = started.elapsed();
    crate::end_process(pid, Duration::from_secs(2));
    if bound.is_none() {
        bail!(
            "dhclient on {iface} got no lease within {within:?}: {}",
            std::fs::read_to_string(files("log"))
                .unwrap_or_default()
                .trim()
        );
    }
    let text = std::fs::read_to_string(files("leases"))?;
    Ok((parse_last_lease(&text)?, took))
}

/// The last `lease { ... }` block of a dhclient lease file.
fn parse_last_lease(text: &str) -> Result<ClientLease> {
    let block = text
        .rsplit("lease {")
        .next()
        .context("no lease in the file")?;
    let value = |key: &str| -> Option<String> {
        block.lines().find_map(|l| {
            l.trim()
                .strip_prefix(key)
                .map(|v| v.trim().trim_end_matches(';').trim().to_owned())
        })
    };
    Ok(ClientLease {
        address: value("fixed-address")
            .context("no fixed-address")?
            .parse()?,
        routers: value("option routers").unwrap_or_default(),
        dns: value("option domain-name-servers").unwrap_or_default(),
        server: value("option dhcp-server-identifier")
            .context("no server identifier")?
            .parse()?,
    })
}

/// Ends a dhclient that went to the background, by its PID file.
fn stop_client(pid_file: &Path) {
    if let Some(pid) = pid_of(pid_file, "dhclient") {
        end(pid);
    }
    let _ = std::fs::remove_file(pid_file);
}

/// A PID file's process, if it still runs `comm` (a PID reused by another is left alone).
fn pid_of(pid_file: &Path, comm: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let running = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    running.trim().starts_with(comm).then_some(pid)
}

/// SIGTERM, then SIGKILL after 3 s, for a process that is not our child.
fn end(pid: i32) {
    use nix::sys::signal::{Signal, kill};
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if kill(pid, None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(pid, Signal::SIGKILL);
}

/// Ends the Kea servers carp started for the lab's nodes and any DHCP client left running.
pub fn end_left_behind(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("dhclient-") && name.ends_with(".pid") {
            stop_client(&path);
        }
        for kea_dir in [path.join("kea"), path.clone()] {
            if let Some(pid) = pid_of(&kea_dir.join("kea-dhcp4.kea-dhcp4.pid"), "kea-dhcp4") {
                end(pid);
            }
        }
    }
}

/// The address the lab's client holds from the pool, as the gateways' lease list shows it.
pub fn in_pool(address: Ipv4Addr) -> bool {
    in_range(POOL, address)
}

/// Whether `address` lies in `range` (`first-last`, as `[[dhcp]] pool` has it).
pub fn in_range(range: &str, address: Ipv4Addr) -> bool {
    let (lo, hi) = range.split_once('-').expect("a range");
    let (lo, hi): (Ipv4Addr, Ipv4Addr) = (lo.parse().expect("lo"), hi.parse().expect("hi"));
    (lo..=hi).contains(&address)
}

/// The rebinding client of `carp-probe dhcp-rebind` (run in the client's namespace, with
/// `address` on `iface` so the server's unicast answer arrives).
pub fn rebind_probe(
    iface: &str,
    mac: &str,
    address: Ipv4Addr,
    interval: Duration,
    duration: Duration,
) -> Result<()> {
    use std::net::UdpSocket;
    let mac: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 68))?;
    socket.set_broadcast(true)?;
    bind_to_device(&socket, iface)?;
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    let xid: u32 = std::process::id().wrapping_mul(2_654_435_761);
    let request = rebind_request(xid, &mac, address);
    let end = Instant::now() + duration;
    let mut next = Instant::now();
    let mut buf = [0u8; 1500];
    while Instant::now() < end {
        if Instant::now() >= next {
            socket.send_to(&request, (Ipv4Addr::BROADCAST, 67))?;
            next += interval;
        }
        let Ok((n, _)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if let Some((kind, server)) = parse_reply(&buf[..n], xid) {
            println!("{kind} {} {server}", crate::unix_us());
            if kind == "ack" {
                return Ok(());
            }
        }
    }
    bail!("no DHCPACK within {duration:?}")
}

fn bind_to_device(socket: &std::net::UdpSocket, iface: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket and a buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            iface.as_ptr().cast(),
            iface.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "SO_BINDTODEVICE {iface}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A DHCPREQUEST in the REBINDING state: ciaddr set, no server identifier, no requested
/// address.
fn rebind_request(xid: u32, mac: &[u8], address: Ipv4Addr) -> Vec<u8> {
    let mut m = vec![0u8; 240];
    m[0] = 1; // BOOTREQUEST
    m[1] = 1; // Ethernet
    m[2] = 6;
    m[4..8].copy_from_slice(&xid.to_be_bytes());
    m[12..16].copy_from_slice(&address.octets());
    m[28..28 + mac.len().min(16)].copy_from_slice(&mac[..mac.len().min(16)]);
    m[236..240].copy_from_slice(&[99, 130, 83, 99]);
    m.extend_from_slice(&[53, 1, 3, 55, 3, 1, 3, 6, 255]);
    m.resize(300, 0);
    m
}

/// `("ack" | "nak", server identifier)` of a reply to `xid`.
fn parse_reply(m: &[u8], xid: u32) -> Option<(&'static str, Ipv4Addr)> {
    if m.len() < 240
        || m[0] != 2
        || m[4..8] != xid.to_be_bytes()
        || m[236..240] != [99, 130, 83, 99]
    {
        return None;
    }
    let (mut kind, mut server) = (None, None);
    let mut i = 240;
    while i + 1 < m.len() && m[i] != 255 {
        if m[i] == 0 {
            i += 1;
            continue;
        }
        let (code, len) = (m[i], usize::from(m[i + 1]));
        let value = m.get(i + 2..i + 2 + len)?;
        match (code, value) {
            (53, [5]) => kind = Some("ack"),
            (53, [6]) => kind = Some("nak"),
            (54, [a, b, c, d]) => server = Some(Ipv4Addr::new(*a, *b, *c, *d)),
            _ => {}
        }
        i += 2 + len;
    }
    Some((kind?, server?))
}

/// `node`'s Kea HA state as `carp status` shows it ("" if none).
pub fn kea_state(node: &crate::Node) -> String {
    node.status()
        .ok()
        .and_then(|s| s.dhcp)
        .and_then(|d| d.ha)
        .map(|ha| ha.local_state)
        .unwrap_or_default()
}

/// A gateway's death as the DHCP tests and bench stage it: its carp and its Kea SIGKILLed,
/// its links down. Returns when it is dead.
pub fn kill_gateway(lab: &Lab, node: &crate::Node) -> Result<()> {
    let kea = node
        .status()?
        .dhcp
        .and_then(|d| d.pid)
        .context("the gateway's Kea pid")?;
    crate::kill_hard(node.pid);
    // Kea is carp's child, not ours: killed, not reaped.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(kea as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    lab.sh(
        node.host,
        "ip link set lan down; ip link set wan down; ip link set sync down",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rebind_request_and_its_ack_are_read_back() {
        let request = rebind_request(7, &[2, 0, 0, 0, 0, 1], Ipv4Addr::new(198, 18, 1, 150));
        assert_eq!(request.len(), 300);
        assert_eq!(request[12..16], [198, 18, 1, 150], "ciaddr");
        let mut ack = request.clone();
        ack[0] = 2;
        ack.truncate(240);
        ack.extend_from_slice(&[53, 1, 5, 54, 4, 198, 18, 1, 3, 255]);
        assert_eq!(
            parse_reply(&ack, 7),
            Some(("ack", Ipv4Addr::new(198, 18, 1, 3)))
        );
        assert_eq!(parse_reply(&ack, 8), None, "another transaction");
        assert_eq!(parse_reply(&request, 7), None, "not a reply");
        ack[242] = 6;
        assert_eq!(parse_reply(&ack, 7).map(|r| r.0), Some("nak"));
    }

    #[test]
    fn the_last_lease_of_a_dhclient_file_is_read() {
        let text = "lease {\n  interface \"lan\";\n  fixed-address 198.18.1.150;\n  option dhcp-server-identifier 198.18.1.2;\n}\nlease {\n  interface \"lan\";\n  fixed-address 198.18.1.151;\n  option subnet-mask 255.255.255.0;\n  option routers 198.18.1.1;\n  option dhcp-server-identifier 198.18.1.3;\n  option domain-name-servers 198.18.1.1;\n}\n";
        let lease = parse_last_lease(text).unwrap();
        assert_eq!(lease.address, Ipv4Addr::new(198, 18, 1, 151));
        assert_eq!(lease.server, Ipv4Addr::new(198, 18, 1, 3));
        assert_eq!(lease.routers, "198.18.1.1");
        assert!(in_pool(lease.address) && !in_pool(Ipv4Addr::new(198, 18, 1, 1)));
    }
}
