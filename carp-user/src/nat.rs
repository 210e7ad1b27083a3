//! Managed outbound NAT to the VIP (pfSense's manual outbound NAT): `[[nat]]` rules checked so
//! none can match the cluster's own WAN traffic, and the `ip carp` nftables table that carries
//! them, replaced whole in one transaction. The table outlives the daemon (NATed traffic must
//! not break on a restart); `carp nat flush` removes it. Rule checks and the ruleset are pure.

use crate::{
    config::{Problem, Vip},
    interfaces::{Interface, Ipv4Net},
    nft::{self, NftError, equals, payload},
};
use nftables::{
    expr::{Expression, Meta, MetaKey, NamedExpression, Prefix, Range, SetItem},
    schema::{Chain, NfListObject, Nftables, Rule},
    stmt::{NAT, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};
use serde::Deserialize;
use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr},
};

/// A `[[nat]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNat {
    pub interface: String,
    pub source: OneOrMany,
    pub to: String,
    pub ports: Option<String>,
}

/// One network or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(one) => vec![one.as_str()],
            OneOrMany::Many(many) => many.iter().map(String::as_str).collect(),
        }
    }
}

/// A checked rule: traffic from `sources` leaving by `interface` takes `to` as its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRule {
    pub interface: String,
    pub sources: Vec<Ipv4Net>,
    pub to: Ipv4Addr,
    /// Source ports for TCP and UDP, when set.
    pub ports: Option<(u16, u16)>,
}

/// What the cluster itself has, that no NAT source may cover.
pub struct Cluster<'a> {
    pub interfaces: &'a [Interface],
    pub vips: &'a [Vip],
    /// The sync link's own address, whose network is the nodes' private link.
    pub sync: Option<IpAddr>,
}

/// Checks every rule; each refusal names its field (`nat[0].source: ...`).
pub fn validate(raw: &[RawNat], cluster: &Cluster, problems: &mut Vec<Problem>) -> Vec<NatRule> {
    // With each rule's index as written, for the messages.
    let mut rules: Vec<(usize, NatRule)> = Vec::new();
    for (i, nat) in raw.iter().enumerate() {
        let mut problem = |name: &str, message: String| {
            problems.push(Problem {
                field: format!("nat[{i}].{name}"),
                message,
            });
        };
        let Some(iface) = cluster.interfaces.iter().find(|f| f.name == nat.interface) else {
            problem(
                "interface",
                format!("no interface `{}` on this host", nat.interface),
            );
            continue;
        };
        let mut sources = Vec::new();
        for text in nat.source.items() {
            match text.parse::<Ipv4Net>() {
                Ok(net) => match source_problem(net, iface, cluster) {
                    Some(message) => problem("source", message),
                    None => sources.push(net),
                },
                Err(e) => problem("source", e),
            }
        }
        if nat.source.items().is_empty() {
            problem("source", "no network given".into());
        }
        let to = match nat.to.parse::<Ipv4Addr>() {
            Ok(to)
                if cluster
                    .vips
                    .iter()
                    .any(|v| v.interface == nat.interface && v.address.addr == to) =>
            {
                Some(to)
            }
            Ok(to) => {
                problem(
                    "to",
                    format!(
                        "{to} is not a VIP on `{}`: NAT must use the address that moves with the master",
                        nat.interface
                    ),
                );
                None
            }
            Err(_) => {
                problem("to", format!("`{}` is not an IPv4 address", nat.to));
                None
            }
        };
        let ports = match nat.ports.as_deref().map(parse_ports).transpose() {
            Ok(ports) => ports,
            Err(message) => {
                problem("ports", message);
                None
            }
        };
        let mut overlapping = false;
        for (j, earlier) in &rules {
            if earlier.interface != nat.interface {
                continue;
            }
            if let Some(net) = sources
                .iter()
                .find(|net| earlier.sources.iter().any(|e| overlap(**net, *e)))
            {
                overlapping = true;
                problem(
                    "source",
                    format!(
                        "{net} overlaps a source of nat[{j}] on `{}`: the first would always win",
                        nat.interface
                    ),
                );
            }
        }
        if let Some(to) = to
            && !sources.is_empty()
            && !overlapping
        {
            rules.push((
                i,
                NatRule {
                    interface: nat.interface.clone(),
                    sources,
                    to,
                    ports,
                },
            ));
        }
    }
    rules.into_iter().map(|(_, rule)| rule).collect()
}

/// Why `net` must not be a NAT source on `iface`, if it must not.
fn source_problem(net: Ipv4Net, iface: &Interface, cluster: &Cluster) -> Option<String> {
    if net.prefix_len == 0 {
        return Some(format!(
            "{net} matches everything, the cluster's own WAN traffic too: name the inside networks"
        ));
    }
    if network(net) != net {
        return Some(format!("{net} has host bits set: write {}", network(net)));
    }
    // The egress network holds both nodes' own addresses there and its VIPs (each VIP lies
    // in the subnet of a real address of its interface). The inside network holds its own
    // VIP, the clients' gateway: its traffic does not leave by the egress interface.
    if let Some(own) = iface.addrs.iter().find(|a| overlap(net, network(**a))) {
        return Some(format!(
            "{net} covers `{}`'s network {} (both nodes' own addresses and the VIPs there)",
            iface.name,
            network(*own)
        ));
    }
    if let Some(IpAddr::V4(sync)) = cluster.sync {
        let link = cluster
            .interfaces
            .iter()
            .flat_map(|i| &i.addrs)
            .find(|a| a.addr == sync);
        if let Some(link) = link
            && overlap(net, network(*link))
        {
            return Some(format!(
                "{net} covers the sync link's network {}",
                network(*link)
            ));
        }
    }
    None
}

/// The network an address lies in (host bits cleared).
fn network(net: Ipv4Net) -> Ipv4Net {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(net.prefix_len))
        .unwrap_or(0);
    Ipv4Net {
        addr: Ipv4Addr::from(u32::from(net.addr) & mask),
        prefix_len: net.prefix_len,
    }
}

/// Whether two networks share an address (one contains the other).
fn overlap(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(b.addr) || b.contains(a.addr)
}

fn parse_ports(text: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = text.split_once('-').unwrap_or((text, text));
    let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
    match (port(lo), port(hi)) {
        (Some(lo), Some(hi)) if lo <= hi => Ok((lo, hi)),
        _ => Err(format!("`{text}` is not a port range like 1024-65535")),
    }
}

/// The `ip carp` table for `rules`: a source-NAT chain at postrouting, one rule per entry (two
/// with ports: TCP and UDP get the port range, other protocols the address alone).
pub fn ruleset(rules: &[NatRule]) -> Nftables<'static> {
    let family = NfFamily::IP;
    let chain = "postrouting";
    let mut objects = vec![NfListObject::Chain(Chain {
        family,
        table: nft::TABLE.into(),
        name: chain.into(),
        _type: Some(NfChainType::NAT),
        hook: Some(NfHook::Postrouting),
        prio: Some(100),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    })];
    for rule in rules {
        let sources = Expression::Named(NamedExpression::Set(
            rule.sources
                .iter()
                .map(|net| {
                    SetItem::Element(Expression::Named(NamedExpression::Prefix(Prefix {
                        addr: Box::new(Expression::String(net.addr.to_string().into())),
                        len: u32::from(net.prefix_len),
                    })))
                })
                .collect(),
        ));
        let base = vec![
            equals(
                Expression::Named(NamedExpression::Meta(Meta {
                    key: MetaKey::Oifname,
                })),
                Expression::String(rule.interface.clone().into()),
            ),
            equals(payload("ip", "saddr"), sources),
        ];
        let snat = |port: Option<(u16, u16)>| {
            Statement::SNAT(Some(NAT {
                addr: Some(Expression::String(rule.to.to_string().into())),
                family: None,
                port: port.map(|(lo, hi)| {
                    Expression::Range(Box::new(Range {
                        range: [
                            Expression::Number(u32::from(lo)),
                            Expression::Number(u32::from(hi)),
                        ],
                    }))
                }),
                flags: None,
            }))
        };
        let mut add = |statements: Vec<Statement<'static>>| {
            objects.push(NfListObject::Rule(Rule {
                family,
                table: nft::TABLE.into(),
                chain: chain.into(),
                expr: Cow::Owned(statements),
                comment: Some("carp [[nat]]".into()),
                ..Rule::default()
            }));
        };
        if let Some(ports) = rule.ports {
            let mut with_ports = base.clone();
            with_ports.push(equals(
                Expression::Named(NamedExpression::Meta(Meta {
                    key: MetaKey::L4proto,
                })),
                Expression::Named(NamedExpression::Set(vec![
                    SetItem::Element(Expression::String("tcp".into())),
                    SetItem::Element(Expression::String("udp".into())),
                ])),
            ));
            with_ports.push(snat(Some(ports)));
            add(with_ports);
        }
        let mut plain = base;
        plain.push(snat(None));
        add(plain);
    }
    nft::replace_table(family, objects)
}

/// Loads `rules` into the `ip carp` table, or removes the table when there are none.
pub fn apply(rules: &[NatRule]) -> Result<(), NftError> {
    if rules.is_empty() {
        flush()
    } else {
        nft::apply(NfFamily::IP, &ruleset(rules))
    }
}

/// The rules of the `ip carp` table as the kernel holds them, one line each (handles left
/// out), or nothing when there is no table: what a hand change to the table would change.
pub fn listing() -> String {
    let Ok(out) = std::process::Command::new("nft")
        .args(["-j", "list", "table", "ip", nft::TABLE])
        .output()
    else {
        return String::new();
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return String::new();
    };
    value["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|object| {
            object
                .get("rule")
                .map(|rule| rule["expr"].to_string() + "\n")
        })
        .collect()
}

/// Removes the `ip carp` table (`carp nat flush`).
pub fn flush() -> Result<(), NftError> {
    nft::remove_table(NfFamily::IP)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster_host() -> Vec<Interface> {
        let iface = |name: &str, index: u32, addr: &str| Interface {
            name: name.into(),
            index,
            mac: [2, 0, 0, 0, 0, index as u8],
            link_up: true,
            addrs: vec![addr.parse().unwrap()],
        };
        vec![
            iface("lan", 2, "198.18.1.2/24"),
            iface("wan", 3, "198.18.2.2/24"),
            iface("sync", 4, "198.18.3.1/24"),
        ]
    }

    fn vips() -> Vec<Vip> {
        vec![
            Vip {
                interface: "lan".into(),
                vhid: 1,
                address: "198.18.1.1/24".parse().unwrap(),
                advskew: 0,
            },
            Vip {
                interface: "wan".into(),
                vhid: 2,
                address: "198.18.2.1/24".parse().unwrap(),
                advskew: 0,
            },
        ]
    }

    fn raw(source: &str, to: &str) -> RawNat {
        RawNat {
            interface: "wan".into(),
            source: OneOrMany::One(source.into()),
            to: to.into(),
            ports: None,
        }
    }

    fn check(raw: &[RawNat]) -> (Vec<NatRule>, Vec<String>) {
        let host = cluster_host();
        let vips = vips();
        let cluster = Cluster {
            interfaces: &host,
            vips: &vips,
            sync: Some("198.18.3.1".parse().unwrap()),
        };
        let mut problems = Vec::new();
        let rules = validate(raw, &cluster, &mut problems);
        (rules, problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn the_lan_translated_to_the_wan_vip_is_accepted() {
        let (rules, problems) = check(&[raw("198.18.1.0/24", "198.18.2.1")]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(rules[0].sources, ["198.18.1.0/24".parse().unwrap()]);
    }

    #[test]
    fn every_source_that_could_match_the_clusters_own_traffic_is_refused() {
        for (source, why) in [
            ("0.0.0.0/0", "matches everything"),
            ("198.18.2.0/24", "covers `wan`'s network"),
            ("198.18.0.0/16", "covers `wan`'s network"),
            ("198.18.2.2/32", "covers `wan`'s network"),
            ("198.18.2.1/32", "covers `wan`'s network"),
            ("198.18.3.0/30", "covers the sync link's network"),
            ("198.18.1.5/24", "host bits set: write 198.18.1.0/24"),
            ("198.18.1.0/33", "is not 0..=32"),
        ] {
            let (rules, problems) = check(&[raw(source, "198.18.2.1")]);
            assert!(rules.is_empty(), "{source}");
            assert_eq!(problems.len(), 1, "{source}: {problems:?}");
            assert!(
                problems[0].starts_with("nat[0].source: ") && problems[0].contains(why),
                "{source}: {problems:?}"
            );
        }
    }

    #[test]
    fn to_must_be_a_vip_of_the_egress_interface() {
        for to in ["198.18.2.2", "198.18.1.1", "not an address"] {
            let (_, problems) = check(&[raw("198.18.1.0/24", to)]);
            assert_eq!(problems.len(), 1, "{to}");
            assert!(problems[0].starts_with("nat[0].to: "), "{problems:?}");
        }
    }

    #[test]
    fn overlapping_rules_on_one_interface_are_refused() {
        let (rules, problems) = check(&[
            raw("198.18.1.0/24", "198.18.2.1"),
            raw("198.18.1.128/25", "198.18.2.1"),
        ]);
        assert_eq!(rules.len(), 1);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("nat[1].source: 198.18.1.128/25 overlaps a source of nat[0]"),
            "{problems:?}"
        );
    }

    #[test]
    fn ports_and_interface_are_checked() {
        let mut bad_ports = raw("198.18.1.0/24", "198.18.2.1");
        bad_ports.ports = Some("2000-1000".into());
        let mut bad_iface = raw("198.18.1.0/24", "198.18.2.1");
        bad_iface.interface = "dmz".into();
        let (_, problems) = check(&[bad_ports, bad_iface]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("nat[0].ports: "));
        assert!(problems[1].starts_with("nat[1].interface: no interface `dmz`"));
        assert_eq!(parse_ports("1024-65535"), Ok((1024, 65535)));
        assert_eq!(parse_ports("5000"), Ok((5000, 5000)));
    }

    #[test]
    fn the_ruleset_translates_each_source_on_its_interface() {
        let mut with_ports = raw("198.18.1.0/24", "198.18.2.1");
        with_ports.ports = Some("1024-65535".into());
        let mut list = raw("x", "198.18.2.1");
        list.source = OneOrMany::Many(vec!["198.18.4.0/24".into(), "198.18.5.0/24".into()]);
        let (rules, problems) = check(&[with_ports, list]);
        assert!(problems.is_empty(), "{problems:?}");
        let text = serde_json::to_string(&ruleset(&rules)).unwrap();
        for needle in [
            r#""type":"nat","hook":"postrouting","prio":100"#,
            r#"{"match":{"left":{"meta":{"key":"oifname"}},"right":"wan","op":"=="}}"#,
            r#"{"set":[{"prefix":{"addr":"198.18.4.0","len":24}},{"prefix":{"addr":"198.18.5.0","len":24}}]}"#,
            r#"{"snat":{"addr":"198.18.2.1","port":{"range":[1024,65535]}}}"#,
            r#"{"set":["tcp","udp"]}"#,
            r#"{"snat":{"addr":"198.18.2.1"}}"#,
        ] {
            assert!(text.contains(needle), "no {needle} in {text}");
        }
        assert_eq!(
            text.matches(r#""rule""#).count(),
            3,
            "two for the ported rule, one for the list"
        );
    }
}
