//! DHCP failover with Kea: carp generates the hot-standby pair's configuration from
//! `[[dhcp]]`, runs and supervises kea-dhcp4, and drives it on planned failover.

pub mod fence;
pub mod kea;
pub mod kea_config;
pub mod scope;
pub mod served_by;
pub mod supervisor;

use crate::config::Config;
use kea::Lease;
use kea_config::{HaRole, KeaSetup};
use scope::DhcpScope;
use serde::{Deserialize, Serialize};
use served_by::{ServedBy, Server};

/// A node whose `[carp] advskew` is below this runs Kea's primary: pfSense's secondary has
/// every skew raised by 100, so the CARP primary is also Kea's.
pub const STANDBY_SKEW: u8 = 100;

/// The Kea pair's listener port on the sync link: the sync port's neighbour.
fn ha_port(sync_port: u16) -> u16 {
    sync_port.wrapping_add(1)
}

/// What Kea runs with on this node, if it serves any scope. Its peers are the two ends of
/// the sync link: the link is the pair's own, so no LAN client reaches the HA listener and
/// lease updates never cross the LAN.
pub fn kea_setup(config: &Config) -> Option<KeaSetup> {
    let sync = config.sync.as_ref()?;
    if config.dhcp.is_empty() {
        return None;
    }
    let (std::net::IpAddr::V4(this), std::net::IpAddr::V4(peer)) =
        (sync.listen.ip(), sync.peer.ip())
    else {
        return None;
    };
    Some(KeaSetup {
        scopes: config.dhcp.clone(),
        role: if config.carp.advskew < STANDBY_SKEW {
            HaRole::Primary
        } else {
            HaRole::Standby
        },
        this,
        peer,
        port: ha_port(sync.listen.port()),
        dir: config.node.state_dir.join("kea"),
        hooks_dir: kea_config::find_hooks_dir().unwrap_or_else(|| kea_config::HOOK_DIRS[0].into()),
        // CARP's master-down interval: three adverts missed.
        failure_ms: 3000 * u32::from(config.carp.advbase),
        service: config.kea_service.clone(),
    })
}

/// One lease as `carp leases` shows it (pfSense's Status > DHCP Leases).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRow {
    pub interface: String,
    pub address: String,
    pub mac: String,
    pub hostname: String,
    /// RFC 3339.
    pub expires: String,
    /// active, declined or expired.
    pub state: String,
    /// The node that answered the lease's last transaction (`-` if before this daemon).
    pub server: String,
}

/// The pair's node names, for the server column.
pub struct PairNames {
    pub here: String,
    pub partner: String,
}

/// Kea's leases as rows, by interface and address.
pub fn lease_rows(
    scopes: &[DhcpScope],
    leases: Vec<Lease>,
    served_by: &ServedBy,
    names: &PairNames,
) -> Vec<LeaseRow> {
    let mut rows: Vec<LeaseRow> = leases
        .into_iter()
        .map(|lease| LeaseRow {
            server: match served_by.at(lease.cltt) {
                Some(Server::Here) => names.here.clone(),
                Some(Server::Partner) => names.partner.clone(),
                Some(Server::Unknown) | None => "-".into(),
            },
            interface: scopes
                .iter()
                .find(|s| kea_config::subnet_id(s) == lease.subnet_id)
                .map_or_else(|| "?".into(), |s| s.interface.clone()),
            expires: humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(lease.expires),
            )
            .to_string(),
            state: match lease.state {
                0 => "active",
                1 => "declined",
                _ => "expired",
            }
            .into(),
            address: lease.address,
            mac: lease.mac,
            hostname: lease.hostname,
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.interface, a.address.parse::<std::net::Ipv4Addr>().ok())
            .cmp(&(&b.interface, b.address.parse().ok()))
    });
    rows
}
