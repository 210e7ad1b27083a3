//! Virtual IP ownership through rtnetlink: add a VIP to its interface on MASTER, remove it on
//! BACKUP. Both are idempotent so a restart after a crash converges.

use crate::interfaces::Ipv4Net;
use futures::TryStreamExt;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use std::net::IpAddr;

/// A failed address change.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket")]
    Open {
        #[source]
        source: std::io::Error,
    },
    #[error("reading link {ifindex}")]
    Link {
        ifindex: u32,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{op} {address} on ifindex {ifindex}")]
    Address {
        op: &'static str,
        address: Ipv4Net,
        ifindex: u32,
        #[source]
        source: rtnetlink::Error,
    },
}

/// The daemon's rtnetlink handle.
#[derive(Clone)]
pub struct Addresses {
    handle: rtnetlink::Handle,
}

impl Addresses {
    /// Opens the netlink socket; its connection task runs on the current tokio runtime.
    pub fn open() -> Result<Self, NetlinkError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetlinkError::Open { source })?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Adds `address` to `ifindex` (replacing an identical one: idempotent).
    pub async fn add(&self, ifindex: u32, address: Ipv4Net) -> Result<(), NetlinkError> {
        self.handle
            .address()
            .add(ifindex, IpAddr::V4(address.addr), address.prefix_len)
            .replace()
            .execute()
            .await
            .map_err(|source| NetlinkError::Address {
                op: "adding",
                address,
                ifindex,
                source,
            })
    }

    /// Whether `ifindex` is a veth (IFLA_INFO_KIND), which needs generic XDP.
    pub async fn is_veth(&self, ifindex: u32) -> Result<bool, NetlinkError> {
        let links: Vec<_> = self
            .handle
            .link()
            .get()
            .match_index(ifindex)
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetlinkError::Link { ifindex, source })?;
        Ok(links.iter().flat_map(|l| &l.attributes).any(|a| {
            matches!(a, LinkAttribute::LinkInfo(infos)
                if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
        }))
    }

    /// Removes `address` from `ifindex` if it is there.
    pub async fn remove(&self, ifindex: u32, address: Ipv4Net) -> Result<(), NetlinkError> {
        let error = |source| NetlinkError::Address {
            op: "removing",
            address,
            ifindex,
            source,
        };
        let found: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .set_address_filter(IpAddr::V4(address.addr))
            .execute()
            .try_collect()
            .await
            .map_err(error)?;
        for message in found {
            self.handle
                .address()
                .del(message)
                .execute()
                .await
                .map_err(error)?;
        }
        Ok(())
    }
}
