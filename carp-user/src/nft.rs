//! carp's own nftables tables, built with the `nftables` crate's JSON schema and loaded
//! through `nft -j -f -`. Each is replaced whole in one transaction; no other table is ever
//! touched: the ARP guard (`arp carp`) here, the managed NAT (`ip carp`) in `nat`.

use nftables::{
    batch::Batch,
    expr::{Expression, NamedExpression, Payload, PayloadField},
    helper::{self, NftablesError},
    schema::{Chain, NfListObject, Nftables, Rule, Set, SetType, SetTypeValue, Table},
    stmt::{Counter, Match, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};
use std::{borrow::Cow, net::Ipv4Addr};

/// The name of every table carp owns (one per family).
pub const TABLE: &str = "carp";
/// The ARP guard's set of VIPs, for `nft list set arp carp vips`.
pub const VIP_SET: &str = "vips";

/// Why carp's nftables could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("loading the `{family} {TABLE}` nftables table")]
    Apply {
        family: &'static str,
        #[source]
        source: NftablesError,
    },
}

/// The ARP guard: ARP requests for a VIP are dropped before the kernel sees them. XDP
/// answers them while this node is master and its daemon alive, and drops them otherwise, so
/// the kernel never needs them; but if XDP is gone (a daemon killed with a private bpffs, an
/// operator detaching it), the kernel would answer for a VIP still on the interface with the
/// interface's own MAC, beside the new master's virtual MAC. The table is kernel state: it
/// outlives the daemon, which is the point. Replies are untouched: the kernel's own lookups
/// from a VIP need them.
pub fn arp_guard(vips: &[Ipv4Addr]) -> Nftables<'static> {
    let family = NfFamily::ARP;
    let chain = "guard";
    let elements: Vec<Expression<'static>> = vips
        .iter()
        .map(|vip| Expression::String(vip.to_string().into()))
        .collect();
    replace_table(
        family,
        vec![
            NfListObject::Set(Box::new(Set {
                family,
                table: TABLE.into(),
                name: VIP_SET.into(),
                handle: None,
                set_type: SetTypeValue::Single(SetType::Ipv4Addr),
                policy: None,
                flags: None,
                elem: (!elements.is_empty()).then(|| Cow::Owned(elements)),
                timeout: None,
                gc_interval: None,
                size: None,
                comment: None,
            })),
            NfListObject::Chain(Chain {
                family,
                table: TABLE.into(),
                name: chain.into(),
                _type: Some(NfChainType::Filter),
                hook: Some(NfHook::Input),
                prio: Some(0),
                policy: Some(NfChainPolicy::Accept),
                ..Chain::default()
            }),
            NfListObject::Rule(Rule {
                family,
                table: TABLE.into(),
                chain: chain.into(),
                expr: Cow::Owned(vec![
                    equals(
                        payload("arp", "operation"),
                        Expression::String("request".into()),
                    ),
                    equals(
                        payload("arp", "daddr ip"),
                        Expression::String(format!("@{VIP_SET}").into()),
                    ),
                    Statement::Counter(Counter::Anonymous(None)),
                    Statement::Drop(None),
                ]),
                comment: Some("XDP answers for VIPs; the kernel never does".into()),
                ..Rule::default()
            }),
        ],
    )
}

/// A packet field, `protocol field` in nft's words (`ip saddr`, `arp operation`).
pub fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

/// The match `left == right`.
pub fn equals(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

/// One transaction that makes the `family` carp table exactly `objects`: created if missing
/// (so the delete cannot fail), deleted, created anew.
pub fn replace_table(family: NfFamily, objects: Vec<NfListObject<'static>>) -> Nftables<'static> {
    let mut batch = remove_table_batch(family);
    batch.add(NfListObject::Table(table(family)));
    for object in objects {
        batch.add(object);
    }
    batch.to_nftables()
}

/// Adding first makes the delete of a missing table no error.
fn remove_table_batch(family: NfFamily) -> Batch<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table(family)));
    batch.delete(NfListObject::Table(table(family)));
    batch
}

fn table(family: NfFamily) -> Table<'static> {
    Table {
        family,
        name: TABLE.into(),
        handle: None,
    }
}

fn family_name(family: NfFamily) -> &'static str {
    match family {
        NfFamily::IP => "ip",
        NfFamily::IP6 => "ip6",
        NfFamily::INet => "inet",
        NfFamily::ARP => "arp",
        NfFamily::Bridge => "bridge",
        NfFamily::NetDev => "netdev",
    }
}

/// Loads the ARP guard for `vips`, replacing the one there.
pub fn apply_arp_guard(vips: &[Ipv4Addr]) -> Result<(), NftError> {
    apply(NfFamily::ARP, &arp_guard(vips))
}

/// Removes the ARP guard (clean shutdown: the VIPs are released with it).
pub fn remove_arp_guard() -> Result<(), NftError> {
    remove_table(NfFamily::ARP)
}

/// Removes the `family` carp table; none there is no error.
pub fn remove_table(family: NfFamily) -> Result<(), NftError> {
    apply(family, &remove_table_batch(family).to_nftables())
}

/// Loads `ruleset` in one transaction.
pub fn apply(family: NfFamily, ruleset: &Nftables) -> Result<(), NftError> {
    helper::apply_ruleset(ruleset).map_err(|source| NftError::Apply {
        family: family_name(family),
        source,
    })
}

/// Checks a ruleset in nft's own syntax without loading it (`nft -c -f -`); nft's message
/// when it refuses.
pub fn check_text(ruleset: &str) -> Result<(), String> {
    run_nft(&["-c", "-f", "-"], ruleset)
}

/// Loads a ruleset in nft's own syntax as one transaction (`nft -f -`).
pub fn load_text(ruleset: &str) -> Result<(), String> {
    run_nft(&["-f", "-"], ruleset)
}

fn run_nft(args: &[&str], input: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arp_guard_drops_requests_for_the_vips_and_replaces_the_table_whole() {
        let vips = [Ipv4Addr::new(198, 18, 1, 1), Ipv4Addr::new(198, 18, 2, 1)];
        let json = serde_json::to_value(arp_guard(&vips)).unwrap();
        let commands: Vec<String> = json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_object().unwrap().keys().next().unwrap().clone())
            .collect();
        assert_eq!(commands[..3], ["add", "delete", "add"], "{json}");
        let text = json.to_string();
        for needle in [
            r#""elem":["198.18.1.1","198.18.2.1"]"#,
            r#"{"match":{"left":{"payload":{"field":"operation","protocol":"arp"}},"op":"==","right":"request"}}"#,
            r#"{"match":{"left":{"payload":{"field":"daddr ip","protocol":"arp"}},"op":"==","right":"@vips"}}"#,
            r#"{"drop":null}"#,
            r#""hook":"input""#,
        ] {
            assert!(text.contains(needle), "no {needle} in {text}");
        }
        assert!(
            !text.contains(r#""table":{"family":"ip""#),
            "only the arp table"
        );
    }

    #[test]
    fn no_vips_makes_an_empty_set() {
        let text = serde_json::to_string(&arp_guard(&[])).unwrap();
        assert!(!text.contains("elem"), "{text}");
    }
}
