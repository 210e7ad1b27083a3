//! Configuration sync's part of the sync session: a primary sends its areas on every
//! (re)connect and whenever they change; a secondary hands what arrives to the daemon, which
//! applies it, and sends back the daemon's answer. The session task drives it.

use super::proto::Frame;
use crate::config_sync::SCHEMA;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// Configuration sync as `carp status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSyncStatus {
    /// primary (pushes), secondary (accepts) or off.
    pub role: String,
    /// Content hash of the areas this node holds (a primary: what it sends, as the secondary
    /// will hold it).
    pub local_hash: Option<String>,
    /// What the peer last said it holds.
    pub peer_hash: Option<String>,
    pub in_step: bool,
    /// RFC 3339 times of the last push (sent or received) and the last answer.
    pub last_push: Option<String>,
    pub last_result: Option<String>,
    pub last_error: Option<String>,
}

/// The daemon's answer to a push.
#[derive(Debug, Clone)]
pub struct Answer {
    pub ok: bool,
    pub hash: String,
    pub message: String,
}

/// The session's end of configuration sync.
pub struct ConfigLink {
    /// A primary's areas (TOML) and their hash; `None` on a node that pushes nothing.
    pub outgoing: watch::Receiver<Option<(String, String)>>,
    /// Where a secondary's pushes go; `None` on a node that accepts nothing.
    pub to_daemon: Option<mpsc::Sender<String>>,
    /// The daemon's answers to them.
    pub answers: mpsc::Receiver<Answer>,
}

impl ConfigLink {
    /// The push to send now, if this node pushes.
    pub fn push(&mut self, status: &mut ConfigSyncStatus) -> Option<Frame> {
        let (areas, hash) = self.outgoing.borrow_and_update().clone()?;
        status.local_hash = Some(hash);
        status.in_step = status.local_hash == status.peer_hash;
        status.last_push = Some(now());
        Some(Frame::ConfigPush {
            schema: SCHEMA,
            areas,
        })
    }

    /// A push from the peer: handed to the daemon, or refused at once.
    pub fn on_push(
        &self,
        schema: u32,
        areas: String,
        status: &mut ConfigSyncStatus,
    ) -> Option<Frame> {
        status.last_push = Some(now());
        let refusal = if schema != SCHEMA {
            format!("configuration schema {schema} is not this node's {SCHEMA}")
        } else if let Some(to_daemon) = &self.to_daemon {
            if to_daemon.try_send(areas).is_ok() {
                return None;
            }
            "busy applying an earlier push".to_owned()
        } else {
            "this node accepts no configuration ([config_sync] accept)".to_owned()
        };
        warn!(reason = %refusal, "configuration push refused");
        status.last_error = Some(refusal.clone());
        Some(Frame::ConfigResult {
            schema: SCHEMA,
            ok: false,
            hash: status.local_hash.clone().unwrap_or_default(),
            message: refusal,
        })
    }

    /// The daemon's answer, to send to the peer; the status follows it.
    pub fn answer(answer: Answer, status: &mut ConfigSyncStatus) -> Frame {
        if answer.ok {
            // What the primary sent is what this node now holds.
            status.local_hash = Some(answer.hash.clone());
            status.peer_hash = Some(answer.hash.clone());
            status.last_error = None;
        } else {
            status.last_error = Some(answer.message.clone());
        }
        status.in_step = answer.ok;
        status.last_result = Some(now());
        Frame::ConfigResult {
            schema: SCHEMA,
            ok: answer.ok,
            hash: answer.hash,
            message: answer.message,
        }
    }

    /// The secondary's answer to our push.
    pub fn on_result(
        schema: u32,
        ok: bool,
        hash: String,
        message: String,
        status: &mut ConfigSyncStatus,
    ) {
        status.last_result = Some(now());
        if ok && schema == SCHEMA {
            info!(%hash, "the peer applied our configuration");
            status.peer_hash = Some(hash);
            status.last_error = None;
        } else {
            warn!(%message, "the peer refused our configuration");
            status.peer_hash = (!hash.is_empty()).then_some(hash);
            status.last_error = Some(message);
        }
        status.in_step = status.local_hash.is_some() && status.local_hash == status.peer_hash;
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
