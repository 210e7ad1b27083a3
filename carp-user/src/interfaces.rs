//! What the host has: interfaces with their index, MAC, link state and IPv4 addresses, read
//! through getifaddrs (the kernel's netlink dump underneath).

use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags};
use std::net::Ipv4Addr;

/// An IPv4 address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Net {
    /// Whether `ip` lies in this address's subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        u32::from(self.addr) & mask == u32::from(ip) & mask
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not ADDRESS/PREFIX"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IPv4 address"))?;
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|n| *n <= 32)
            .ok_or_else(|| format!("prefix `/{len}` is not 0..=32"))?;
        Ok(Self { addr, prefix_len })
    }
}

/// One network interface as the host sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    /// Administratively up with carrier (IFF_UP and IFF_LOWER_UP).
    pub link_up: bool,
    pub addrs: Vec<Ipv4Net>,
}

/// Every interface of the current network namespace.
pub fn list() -> nix::Result<Vec<Interface>> {
    let mut out: Vec<Interface> = Vec::new();
    for ifa in getifaddrs()? {
        let index = nix::net::if_::if_nametoindex(ifa.interface_name.as_str()).unwrap_or(0);
        let pos = match out.iter().position(|i| i.name == ifa.interface_name) {
            Some(pos) => pos,
            None => {
                out.push(Interface {
                    name: ifa.interface_name.clone(),
                    index,
                    mac: [0; 6],
                    link_up: false,
                    addrs: Vec::new(),
                });
                out.len() - 1
            }
        };
        let iface = &mut out[pos];
        iface.link_up = ifa.flags.contains(InterfaceFlags::IFF_UP)
            && ifa.flags.contains(InterfaceFlags::IFF_LOWER_UP);
        let Some(address) = ifa.address else { continue };
        if let Some(link) = address.as_link_addr() {
            if let Some(mac) = link.addr() {
                iface.mac = mac;
            }
        } else if let Some(sin) = address.as_sockaddr_in() {
            let prefix_len = ifa
                .netmask
                .and_then(|m| {
                    m.as_sockaddr_in()
                        .map(|m| u32::from(m.ip()).count_ones() as u8)
                })
                .unwrap_or(32);
            iface.addrs.push(Ipv4Net {
                addr: sin.ip(),
                prefix_len,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_membership() {
        let net: Ipv4Net = "198.18.1.2/24".parse().unwrap();
        assert!(net.contains(Ipv4Addr::new(198, 18, 1, 200)));
        assert!(!net.contains(Ipv4Addr::new(198, 18, 2, 1)));
        let all: Ipv4Net = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        let host: Ipv4Net = "198.18.1.2/32".parse().unwrap();
        assert!(!host.contains(Ipv4Addr::new(198, 18, 1, 3)));
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        assert!(
            "198.18.1.1"
                .parse::<Ipv4Net>()
                .unwrap_err()
                .contains("ADDRESS/PREFIX")
        );
        assert!(
            "198.18.1/24"
                .parse::<Ipv4Net>()
                .unwrap_err()
                .contains("IPv4")
        );
        assert!(
            "198.18.1.1/33"
                .parse::<Ipv4Net>()
                .unwrap_err()
                .contains("0..=32")
        );
    }

    #[test]
    fn loopback_is_listed() {
        let all = list().unwrap();
        let lo = all.iter().find(|i| i.name == "lo").expect("lo exists");
        assert!(
            lo.addrs
                .iter()
                .any(|a| a.addr == Ipv4Addr::LOCALHOST && a.prefix_len == 8)
        );
        assert_eq!(lo.index, 1);
    }
}
