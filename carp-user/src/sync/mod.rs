//! Connection-state sync between the peers (pfsync's job), sans-IO: the frame codec, the
//! never-backwards merge rule and the bulk-update session. The transport (an authenticated,
//! encrypted TCP session on the sync link) carries these frames.

pub mod bulk;
pub mod capture;
pub mod config_link;
pub mod flow_writer;
pub mod install;
pub mod install_stats;
pub mod lag;
pub mod merge;
pub mod proto;
pub mod recent_deletes;
pub mod service;
pub mod transport;
pub mod unsent;
pub mod view;
pub mod worker;
