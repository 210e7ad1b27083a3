//! The fence: while this node is CARP master and the peer is gone from the sync link, its
//! Kea's HA listener is refused at once (a TCP reset from carp's `inet carp` table). Kea then
//! sees its partner down on the next heartbeat or lease update, instead of after the
//! kernel's neighbour timeouts and Kea's own 10 s HTTP timeout, and serves within seconds
//! of the takeover. Lifted when the peer is back, so the pair resynchronises.

use crate::nft::{self, NftError, TABLE, equals, payload};
use nftables::{
    expr::Expression,
    schema::{Chain, NfListObject, Nftables, Rule},
    stmt::{Counter, Reject, RejectType, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};
use std::{borrow::Cow, net::Ipv4Addr};

const FAMILY: NfFamily = NfFamily::INet;

/// The `inet carp` table that refuses connections to `peer:port`.
pub fn ruleset(peer: Ipv4Addr, port: u16) -> Nftables<'static> {
    let chain = "fence";
    nft::replace_table(
        FAMILY,
        vec![
            NfListObject::Chain(Chain {
                family: FAMILY,
                table: TABLE.into(),
                name: chain.into(),
                _type: Some(NfChainType::Filter),
                hook: Some(NfHook::Output),
                prio: Some(0),
                policy: Some(NfChainPolicy::Accept),
                ..Chain::default()
            }),
            NfListObject::Rule(Rule {
                family: FAMILY,
                table: TABLE.into(),
                chain: chain.into(),
                expr: Cow::Owned(vec![
                    equals(
                        payload("ip", "daddr"),
                        Expression::String(peer.to_string().into()),
                    ),
                    equals(payload("tcp", "dport"), Expression::Number(u32::from(port))),
                    Statement::Counter(Counter::Anonymous(None)),
                    Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
                ]),
                comment: Some("the peer is gone: its Kea counts as down at once".into()),
                ..Default::default()
            }),
        ],
    )
}

/// Raises the fence.
pub fn raise(peer: Ipv4Addr, port: u16) -> Result<(), NftError> {
    nft::apply(FAMILY, &ruleset(peer, port))
}

/// Lifts it (none there is no error).
pub fn lift() -> Result<(), NftError> {
    nft::remove_table(FAMILY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_resets_only_the_peers_ha_port() {
        let json = serde_json::to_string(&ruleset(Ipv4Addr::new(198, 18, 3, 2), 8371)).unwrap();
        assert!(
            json.contains("\"198.18.3.2\"") && json.contains("8371"),
            "{json}"
        );
        assert!(
            json.contains("tcp reset") && json.contains("\"output\""),
            "{json}"
        );
    }
}
