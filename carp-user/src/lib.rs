//! carp: CARP virtual IPs and connection-state sync for Linux gateways.

pub mod carp;
pub mod cli;
pub mod config;
pub mod config_sync;
pub mod conntrack;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod dhcp;
pub mod error;
pub mod events;
pub mod flow;
pub mod inherit;
pub mod interfaces;
pub mod map_batch;
pub mod metrics;
pub mod nat;
pub mod netlink;
pub mod nft;
pub mod notify;
pub mod pins;
pub mod reload;
pub mod sockets;
pub mod sync;
pub mod synced_files;
pub mod systemd;

/// The compiled XDP object, embedded so the daemon is one binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/carp"));
