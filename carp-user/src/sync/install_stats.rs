//! What the installer and its flow map writer report for `carp status`: both count into it,
//! so it is theirs in common rather than either's.

use super::lag::LagHistogram;

/// What the installer has done, for `carp status`.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct InstallStats {
    pub conntrack_created: u64,
    pub conntrack_updated: u64,
    pub conntrack_deleted: u64,
    pub conntrack_errors: u64,
    pub map_errors: u64,
    pub last_error: Option<String>,
    /// From a frame's arrival to its flows being in conntrack (the XDP map is written
    /// alongside, on its own thread).
    pub install_lag: LagHistogram,
}
