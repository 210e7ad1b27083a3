//! DHCP failover with Kea: carp generates the hot-standby pair's configuration from
//! `[[dhcp]]`, runs and supervises kea-dhcp4, and drives it on planned failover.

pub mod kea;
pub mod kea_config;
pub mod scope;
pub mod supervisor;
