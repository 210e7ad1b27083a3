//! `[[dhcp]]`: one DHCPv4 scope per LAN interface, checked against the host and the cluster
//! (pools inside the interface's subnet, clear of the VIPs, the node's addresses and each
//! other) before Kea ever sees it.

use crate::{
    config::{Problem, Vip},
    interfaces::{Interface, Ipv4Net},
    nat::OneOrMany,
};
use serde::Deserialize;
use std::net::Ipv4Addr;

/// A `[[dhcp]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDhcp {
    pub interface: String,
    pub pool: OneOrMany,
    pub router: Option<String>,
    pub dns: Option<Vec<String>>,
    pub lease_time: Option<String>,
    #[serde(default)]
    pub reservations: Vec<RawReservation>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReservation {
    pub mac: String,
    pub address: String,
}

/// A checked scope: what Kea serves on `interface`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpScope {
    pub interface: String,
    /// The interface's network the pools lie in.
    pub subnet: Ipv4Net,
    /// Inclusive address ranges.
    pub pools: Vec<(Ipv4Addr, Ipv4Addr)>,
    pub router: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub lease_seconds: u32,
    pub reservations: Vec<Reservation>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
}

/// Leases last an hour unless the scope says otherwise (Kea's own default is two).
const DEFAULT_LEASE_SECONDS: u32 = 3600;

/// Checks every scope; each refusal names its field (`dhcp[0].pool: ...`).
pub fn validate(
    raw: &[RawDhcp],
    interfaces: &[Interface],
    vips: &[Vip],
    problems: &mut Vec<Problem>,
) -> Vec<DhcpScope> {
    let mut scopes: Vec<DhcpScope> = Vec::new();
    // Every pool so far, with its field, to find overlaps across scopes too.
    let mut taken: Vec<((Ipv4Addr, Ipv4Addr), String)> = Vec::new();
    for (i, dhcp) in raw.iter().enumerate() {
        let mut problem = |name: &str, message: String| {
            problems.push(Problem {
                field: format!("dhcp[{i}].{name}"),
                message,
            });
        };
        let Some(iface) = interfaces.iter().find(|f| f.name == dhcp.interface) else {
            problem(
                "interface",
                format!("no interface `{}` on this host", dhcp.interface),
            );
            continue;
        };
        if scopes.iter().any(|s| s.interface == dhcp.interface) {
            problem(
                "interface",
                format!("`{}` has a scope already", dhcp.interface),
            );
            continue;
        }
        let mut pools = Vec::new();
        for text in dhcp.pool.items() {
            match parse_range(text) {
                Ok(range) => pools.push(range),
                Err(message) => problem("pool", message),
            }
        }
        if dhcp.pool.items().is_empty() {
            problem("pool", "no range given".into());
        }
        let Some(&(first, _)) = pools.first() else {
            continue;
        };
        let Some(subnet) = iface.addrs.iter().copied().find(|net| net.contains(first)) else {
            problem(
                "pool",
                format!(
                    "{first} is outside every subnet of `{}` ({})",
                    dhcp.interface,
                    list(&iface.addrs)
                ),
            );
            continue;
        };
        let field = format!("dhcp[{i}].pool");
        for &(lo, hi) in &pools {
            if let Some(message) = pool_problem((lo, hi), subnet, iface, vips) {
                problem("pool", message);
            } else if let Some((_, other)) = taken.iter().find(|(r, _)| overlaps(*r, (lo, hi))) {
                problem("pool", format!("{lo}-{hi} overlaps a pool of {other}"));
            } else {
                taken.push(((lo, hi), field.clone()));
            }
        }
        let vip = vips
            .iter()
            .find(|v| v.interface == dhcp.interface)
            .map(|v| v.address.addr);
        let router = match dhcp.router.as_deref() {
            Some(text) => match text.parse::<Ipv4Addr>() {
                Ok(router) if subnet.contains(router) => Some(router),
                Ok(router) => {
                    problem("router", format!("{router} is outside {subnet}"));
                    None
                }
                Err(_) => {
                    problem("router", format!("`{text}` is not an IPv4 address"));
                    None
                }
            },
            None if vip.is_none() => {
                problem(
                    "router",
                    format!(
                        "no VIP on `{}` to default to: name the router",
                        dhcp.interface
                    ),
                );
                None
            }
            None => vip,
        };
        let dns = match &dhcp.dns {
            Some(list) => list
                .iter()
                .filter_map(|text| match text.parse::<Ipv4Addr>() {
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        problem("dns", format!("`{text}` is not an IPv4 address"));
                        None
                    }
                })
                .collect(),
            None => router.into_iter().collect(),
        };
        let lease_seconds = match dhcp.lease_time.as_deref().map(parse_duration) {
            None => DEFAULT_LEASE_SECONDS,
            Some(Ok(seconds)) => seconds,
            Some(Err(message)) => {
                problem("lease_time", message);
                DEFAULT_LEASE_SECONDS
            }
        };
        let mut reservations: Vec<Reservation> = Vec::new();
        for (r, raw) in dhcp.reservations.iter().enumerate() {
            let mac = parse_mac(&raw.mac);
            let address = raw.address.parse::<Ipv4Addr>();
            match (mac, address) {
                (Err(message), _) => problem(&format!("reservations[{r}].mac"), message),
                (_, Err(_)) => problem(
                    &format!("reservations[{r}].address"),
                    format!("`{}` is not an IPv4 address", raw.address),
                ),
                (Ok(_), Ok(address)) if !subnet.contains(address) => problem(
                    &format!("reservations[{r}].address"),
                    format!("{address} is outside {subnet}"),
                ),
                (Ok(mac), Ok(address))
                    if reservations
                        .iter()
                        .any(|o| o.mac == mac || o.address == address) =>
                {
                    problem(
                        &format!("reservations[{r}]"),
                        format!("{} or {address} is reserved twice", raw.mac),
                    )
                }
                (Ok(mac), Ok(address)) => reservations.push(Reservation { mac, address }),
            }
        }
        if let Some(router) = router {
            scopes.push(DhcpScope {
                interface: dhcp.interface.clone(),
                subnet: Ipv4Net {
                    addr: network(subnet),
                    prefix_len: subnet.prefix_len,
                },
                pools,
                router,
                dns,
                lease_seconds,
                reservations,
            });
        }
    }
    scopes
}

/// Why a pool cannot be served: outside the subnet, the network or broadcast address, or
/// holding an address the cluster uses (a VIP anywhere, this node's own on the interface).
fn pool_problem(
    (lo, hi): (Ipv4Addr, Ipv4Addr),
    subnet: Ipv4Net,
    iface: &Interface,
    vips: &[Vip],
) -> Option<String> {
    if !subnet.contains(lo) || !subnet.contains(hi) {
        return Some(format!("{lo}-{hi} is outside {subnet}"));
    }
    let inside = |ip: Ipv4Addr| (lo..=hi).contains(&ip);
    let net = network(subnet);
    let broadcast = Ipv4Addr::from(u32::from(net) | !mask(subnet.prefix_len));
    if subnet.prefix_len < 31 && (inside(net) || inside(broadcast)) {
        return Some(format!(
            "{lo}-{hi} holds the network or broadcast address of {subnet}"
        ));
    }
    if let Some(vip) = vips.iter().find(|v| inside(v.address.addr)) {
        return Some(format!(
            "{lo}-{hi} holds the VIP {} (vhid {})",
            vip.address.addr, vip.vhid
        ));
    }
    if let Some(own) = iface.addrs.iter().find(|a| inside(a.addr)) {
        return Some(format!(
            "{lo}-{hi} holds this node's address {} on `{}`",
            own.addr, iface.name
        ));
    }
    None
}

fn overlaps(a: (Ipv4Addr, Ipv4Addr), b: (Ipv4Addr, Ipv4Addr)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

fn mask(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0)
}

fn network(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.addr) & mask(net.prefix_len))
}

fn list(addrs: &[Ipv4Net]) -> String {
    if addrs.is_empty() {
        return "it has no IPv4 address".into();
    }
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `198.18.1.150-198.18.1.199` (spaces allowed), first not after last; one address alone.
fn parse_range(text: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let (lo, hi) = text.split_once('-').unwrap_or((text, text));
    let addr = |s: &str| {
        s.trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("`{text}` is not a range FIRST-LAST of IPv4 addresses"))
    };
    let (lo, hi) = (addr(lo)?, addr(hi)?);
    if lo > hi {
        return Err(format!("`{text}` ends before it starts"));
    }
    Ok((lo, hi))
}

/// `90s`, `30m`, `1h`, `1d` or plain seconds; at least a minute.
fn parse_duration(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{text}` is not a duration such as 30m, 1h or 1d")),
    };
    let seconds = number
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("`{text}` is not a duration such as 30m, 1h or 1d"))?;
    if seconds < 60 {
        return Err(format!("`{text}` is shorter than a minute"));
    }
    Ok(seconds)
}

/// `52:54:00:00:00:01`.
fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    let bytes: Option<Vec<u8>> = parts
        .iter()
        .map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect();
    match bytes {
        Some(bytes) if bytes.len() == 6 => Ok(bytes.try_into().expect("six bytes")),
        _ => Err(format!(
            "`{text}` is not a MAC address such as 52:54:00:00:00:01"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lan() -> Vec<Interface> {
        vec![Interface {
            name: "lan".into(),
            index: 2,
            mac: [2, 0, 0, 0, 0, 1],
            link_up: true,
            addrs: vec!["198.18.1.2/24".parse().unwrap()],
        }]
    }

    fn vips() -> Vec<Vip> {
        vec![Vip {
            interface: "lan".into(),
            vhid: 1,
            address: "198.18.1.1/24".parse().unwrap(),
            advskew: 0,
        }]
    }

    fn check(toml_text: &str) -> (Vec<DhcpScope>, Vec<String>) {
        #[derive(Deserialize)]
        struct File {
            dhcp: Vec<RawDhcp>,
        }
        let file: File = toml::from_str(toml_text).unwrap();
        let mut problems = Vec::new();
        let scopes = validate(&file.dhcp, &lan(), &vips(), &mut problems);
        (scopes, problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_scope_defaults_router_and_dns_to_the_vip() {
        let (scopes, problems) = check(
            "[[dhcp]]\ninterface = \"lan\"\npool = \"198.18.1.150 - 198.18.1.199\"\nreservations = [{ mac = \"52:54:00:00:00:01\", address = \"198.18.1.160\" }]\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        let scope = &scopes[0];
        assert_eq!(scope.subnet.to_string(), "198.18.1.0/24");
        assert_eq!(scope.router, Ipv4Addr::new(198, 18, 1, 1));
        assert_eq!(scope.dns, [Ipv4Addr::new(198, 18, 1, 1)]);
        assert_eq!(scope.lease_seconds, 3600);
        assert_eq!(scope.reservations[0].mac, [0x52, 0x54, 0, 0, 0, 1]);
    }

    #[test]
    fn every_refusal_names_its_field() {
        let (_, problems) = check(
            r#"
[[dhcp]]
interface = "lan"
pool = ["198.18.2.10-198.18.2.20", "198.18.1.0-198.18.1.5", "198.18.1.1-198.18.1.9", "198.18.1.100-198.18.1.2", "198.18.1.20-198.18.1.30", "198.18.1.25-198.18.1.40", "bogus"]
lease_time = "5x"
reservations = [{ mac = "52:54:00:00:00:01", address = "198.18.7.1" }, { mac = "nope", address = "198.18.1.7" }]
[[dhcp]]
interface = "wan"
pool = "198.18.2.10-198.18.2.20"
"#,
        );
        assert!(
            problems.contains(
                &"dhcp[0].pool: 198.18.2.10 is outside every subnet of `lan` (198.18.1.2/24)"
                    .into()
            ),
            "{problems:#?}"
        );
        let (_, problems) = check(
            r#"
[[dhcp]]
interface = "lan"
pool = ["198.18.1.0-198.18.1.5", "198.18.1.1-198.18.1.9", "198.18.1.100-198.18.1.2", "198.18.1.20-198.18.1.30", "198.18.1.25-198.18.1.40", "198.18.1.2", "bogus", "198.18.2.1-198.18.2.9"]
lease_time = "5x"
reservations = [{ mac = "52:54:00:00:00:01", address = "198.18.7.1" }, { mac = "nope", address = "198.18.1.7" }]
[[dhcp]]
interface = "wan"
pool = "198.18.2.10-198.18.2.20"
"#,
        );
        let fields: Vec<&str> = problems
            .iter()
            .map(|p| p.split(": ").next().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "dhcp[0].pool",
                "dhcp[0].pool",
                "dhcp[0].pool",
                "dhcp[0].pool",
                "dhcp[0].pool",
                "dhcp[0].pool",
                "dhcp[0].pool",
                "dhcp[0].lease_time",
                "dhcp[0].reservations[0].address",
                "dhcp[0].reservations[1].mac",
                "dhcp[1].interface",
            ],
            "{problems:#?}"
        );
        let text = problems.join("\n");
        for wanted in [
            "ends before it starts",
            "not a range",
            "network or broadcast",
            "holds the VIP 198.18.1.1 (vhid 1)",
            "overlaps a pool of dhcp[0].pool",
            "holds this node's address 198.18.1.2",
            "198.18.2.1-198.18.2.9 is outside 198.18.1.2/24",
            "198.18.7.1 is outside",
            "no interface `wan`",
        ] {
            assert!(text.contains(wanted), "{wanted}: {text}");
        }
    }

    #[test]
    fn durations_and_macs_parse_strictly() {
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("2d"), Ok(172_800));
        assert!(parse_duration("30s").unwrap_err().contains("shorter"));
        assert!(parse_duration("h").is_err());
        assert!(parse_mac("52:54:00:00:00").is_err());
        assert!(parse_mac("52:54:00:00:00:0g").is_err());
    }
}
