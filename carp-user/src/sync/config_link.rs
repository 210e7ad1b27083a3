//! Configuration sync's part of the sync session: a primary sends its areas on every
//! (re)connect and whenever they change; a secondary hands what arrives to the daemon, which
//! applies it, and sends back the daemon's answer. The session task drives it.

use super::proto::{Frame, config_push_frames};
use crate::config_sync::SCHEMA;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
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
    /// A secondary's last failed `reload_after` command (none once one passes).
    #[serde(default)]
    pub reload_after_failure: Option<String>,
}

/// The daemon's answer to a push.
#[derive(Debug, Clone)]
pub struct Answer {
    pub ok: bool,
    pub hash: String,
    pub message: String,
}

/// A push the operator asked for (`carp config push`, `carp config diff`): its flags, and
/// who waits for the secondary's answer.
pub struct Explicit {
    pub areas: String,
    pub hash: String,
    pub flags: u8,
    pub answer: oneshot::Sender<Answer>,
}

/// A push received in full: the areas and the flags.
pub type Received = (String, u8);

/// The session's end of configuration sync.
pub struct ConfigLink {
    /// A primary's areas (TOML) and their hash; `None` on a node that pushes nothing.
    pub outgoing: watch::Receiver<Option<(String, String)>>,
    /// Pushes the operator asked for.
    pub explicit: mpsc::Receiver<Explicit>,
    /// Where a secondary's pushes go; `None` on a node that accepts nothing.
    pub to_daemon: Option<mpsc::Sender<Received>>,
    /// The daemon's answers to them.
    pub answers: mpsc::Receiver<Answer>,
    /// The parts of a push received so far.
    pub partial: Vec<String>,
    /// Pushes sent and answers received in this session: the secondary answers in order,
    /// so the waiter of the n-th push gets the n-th answer.
    pub sent: u64,
    pub answered: u64,
    pub waiter: Option<(u64, oneshot::Sender<Answer>)>,
}

impl ConfigLink {
    /// The push to send now (its frames), if this node pushes.
    pub fn push(&mut self, status: &mut ConfigSyncStatus) -> Vec<Frame> {
        let Some((areas, hash)) = self.outgoing.borrow_and_update().clone() else {
            return Vec::new();
        };
        self.frames(areas, hash, 0, status)
    }

    /// An operator's push: sent with its flags, its answer awaited; refused at once when no
    /// peer is connected.
    pub fn push_explicit(
        &mut self,
        push: Explicit,
        connected: bool,
        status: &mut ConfigSyncStatus,
    ) -> Vec<Frame> {
        if !connected {
            let _ = push.answer.send(Answer {
                ok: false,
                hash: String::new(),
                message: "the sync peer is not connected".into(),
            });
            return Vec::new();
        }
        let frames = self.frames(push.areas, push.hash, push.flags, status);
        if let Some((_, earlier)) = self.waiter.replace((self.sent, push.answer)) {
            let _ = earlier.send(Answer {
                ok: false,
                hash: String::new(),
                message: "superseded by a later push".into(),
            });
        }
        frames
    }

    /// The session ended: counts start again, and a waiter hears why.
    pub fn disconnected(&mut self) {
        self.sent = 0;
        self.answered = 0;
        self.partial.clear();
        if let Some((_, waiter)) = self.waiter.take() {
            let _ = waiter.send(Answer {
                ok: false,
                hash: String::new(),
                message: "the sync session was lost before the peer answered".into(),
            });
        }
    }

    fn frames(
        &mut self,
        areas: String,
        hash: String,
        flags: u8,
        status: &mut ConfigSyncStatus,
    ) -> Vec<Frame> {
        if flags & crate::config_sync::DRY_RUN == 0 {
            status.local_hash = Some(hash);
            status.in_step = status.local_hash == status.peer_hash;
            status.last_push = Some(now());
        }
        self.sent += 1;
        config_push_frames(SCHEMA, flags, &areas).unwrap_or_else(|| {
            warn!(bytes = areas.len(), "configuration too large to push");
            status.last_error = Some(format!(
                "configuration of {} bytes is too large to push",
                areas.len()
            ));
            Vec::new()
        })
    }

    /// A part of a push from the peer: the whole push, once its last part is in, goes to
    /// the daemon (or is refused at once).
    pub fn on_push(
        &mut self,
        schema: u32,
        flags: u8,
        part: u16,
        parts: u16,
        areas: String,
        status: &mut ConfigSyncStatus,
    ) -> Option<Frame> {
        if part == 0 {
            self.partial.clear();
        }
        if usize::from(part) != self.partial.len() || part >= parts {
            // A part out of order: what came before it is lost; wait for the next push.
            self.partial.clear();
            return None;
        }
        self.partial.push(areas);
        if usize::from(part) + 1 < usize::from(parts) {
            return None;
        }
        let areas = std::mem::take(&mut self.partial).concat();
        status.last_push = Some(now());
        let refusal = if schema != SCHEMA {
            format!("configuration schema {schema} is not this node's {SCHEMA}")
        } else if let Some(to_daemon) = &self.to_daemon {
            if to_daemon.try_send((areas, flags)).is_ok() {
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
        &mut self,
        schema: u32,
        ok: bool,
        hash: String,
        message: String,
        status: &mut ConfigSyncStatus,
    ) {
        self.answered += 1;
        if self
            .waiter
            .as_ref()
            .is_some_and(|(seq, _)| *seq == self.answered)
            && let Some((_, waiter)) = self.waiter.take()
        {
            let _ = waiter.send(Answer {
                ok: ok && schema == SCHEMA,
                hash: hash.clone(),
                message: message.clone(),
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn link(accepts: bool) -> (ConfigLink, mpsc::Receiver<Received>) {
        let (_out, outgoing) = watch::channel(None);
        let (_explicit, explicit) = mpsc::channel(1);
        let (to_daemon, from_link) = mpsc::channel(1);
        let (_answer, answers) = mpsc::channel(1);
        let link = ConfigLink {
            outgoing,
            explicit,
            to_daemon: accepts.then_some(to_daemon),
            answers,
            partial: Vec::new(),
            sent: 0,
            answered: 0,
            waiter: None,
        };
        (link, from_link)
    }

    #[test]
    fn parts_are_joined_in_order_and_a_gap_drops_the_push() {
        let (mut link, mut daemon) = link(true);
        let mut status = ConfigSyncStatus::default();
        assert!(
            link.on_push(SCHEMA, 1, 0, 2, "ab".into(), &mut status)
                .is_none()
        );
        assert!(
            link.on_push(SCHEMA, 1, 1, 2, "cd".into(), &mut status)
                .is_none()
        );
        assert_eq!(daemon.try_recv().unwrap(), ("abcd".to_owned(), 1));
        // Part 1 of 3 missing: nothing reaches the daemon.
        link.on_push(SCHEMA, 0, 0, 3, "x".into(), &mut status);
        link.on_push(SCHEMA, 0, 2, 3, "z".into(), &mut status);
        assert!(daemon.try_recv().is_err());
    }

    #[test]
    fn another_schema_or_a_node_that_accepts_nothing_is_refused_with_the_reason() {
        let (mut accepting, _daemon) = link(true);
        let mut status = ConfigSyncStatus::default();
        let answer = accepting.on_push(SCHEMA + 1, 0, 0, 1, "a".into(), &mut status);
        let Some(Frame::ConfigResult { ok, message, .. }) = answer else {
            panic!("{answer:?}")
        };
        assert!(!ok);
        assert!(message.contains(&format!(
            "schema {} is not this node's {SCHEMA}",
            SCHEMA + 1
        )));
        let (mut deaf, _daemon) = link(false);
        let answer = deaf.on_push(SCHEMA, 0, 0, 1, "a".into(), &mut status);
        assert!(matches!(
            answer,
            Some(Frame::ConfigResult { ok: false, .. })
        ));
    }

    #[test]
    fn an_operators_push_gets_the_answer_to_it_not_to_an_earlier_push() {
        let (mut primary, _) = link(false);
        let mut status = ConfigSyncStatus::default();
        // An automatic push is in flight when the operator pushes.
        primary.frames("a".into(), "h1".into(), 0, &mut status);
        let (tx, mut rx) = oneshot::channel();
        let push = Explicit {
            areas: "b".into(),
            hash: "h2".into(),
            flags: crate::config_sync::DRY_RUN,
            answer: tx,
        };
        assert!(!primary.push_explicit(push, true, &mut status).is_empty());
        assert_eq!(
            status.local_hash.as_deref(),
            Some("h1"),
            "a dry run holds nothing"
        );
        primary.on_result(SCHEMA, true, "h1".into(), String::new(), &mut status);
        assert!(
            rx.try_recv().is_err(),
            "that answer was the automatic push's"
        );
        primary.on_result(SCHEMA, false, String::new(), "drift".into(), &mut status);
        let answer = rx.try_recv().unwrap();
        assert!(!answer.ok);
        assert_eq!(answer.message, "drift");
        // With no peer, the operator hears so at once.
        let (tx, mut rx) = oneshot::channel();
        let push = Explicit {
            areas: "b".into(),
            hash: "h2".into(),
            flags: 0,
            answer: tx,
        };
        assert!(primary.push_explicit(push, false, &mut status).is_empty());
        assert!(rx.try_recv().unwrap().message.contains("not connected"));
    }
}
