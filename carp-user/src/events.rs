//! `carp events`: what happens as it happens (state changes, the sync link coming and going,
//! notify hooks failing), one JSON object per line on the control socket, for tools.

use crate::carp::fsm::State;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// How many events a slow reader may fall behind before it misses some.
const BACKLOG: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, to the millisecond.
    pub time: String,
    pub node: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EventKind {
    Transition {
        vhid: u8,
        interface: String,
        vip: String,
        old: State,
        new: State,
        reason: String,
    },
    SyncConnected,
    SyncLost,
    NotifyFailed {
        hook: String,
        message: String,
    },
    /// This reader fell behind and missed events.
    Missed {
        count: u64,
    },
}

/// Where the daemon publishes events; each `carp events` reader subscribes.
#[derive(Debug, Clone)]
pub struct Events {
    node: String,
    sender: broadcast::Sender<Event>,
}

impl Events {
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            sender: broadcast::channel(BACKLOG).0,
        }
    }

    /// Publishes `kind` now; nobody listening is fine.
    pub fn publish(&self, kind: EventKind) {
        let _ = self.sender.send(Event {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            node: self.node.clone(),
            kind,
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}

/// One line for people: time, node, what.
pub fn format(event: &Event) -> String {
    let what = match &event.kind {
        EventKind::Transition {
            vhid,
            interface,
            vip,
            old,
            new,
            reason,
        } => format!("vhid {vhid} {interface} {vip}: {old} -> {new} ({reason})"),
        EventKind::SyncConnected => "sync: connected to the peer".into(),
        EventKind::SyncLost => "sync: the peer is gone".into(),
        EventKind::NotifyFailed { hook, message } => format!("notify {hook}: {message}"),
        EventKind::Missed { count } => format!("{count} events missed (reader too slow)"),
    };
    format!("{} {} {what}", event.time, event.node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_a_flat_json_form_and_a_line() {
        let events = Events::new("gw1");
        let mut reader = events.subscribe();
        events.publish(EventKind::Transition {
            vhid: 1,
            interface: "lan".into(),
            vip: "198.18.1.1/24".into(),
            old: State::Backup,
            new: State::Master,
            reason: "master down timer expired".into(),
        });
        let event = reader.try_recv().unwrap();
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["event"], "transition");
        assert_eq!(json["new"], "MASTER");
        assert_eq!(json["node"], "gw1");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
        assert!(format(&event).ends_with(
            "gw1 vhid 1 lan 198.18.1.1/24: BACKUP -> MASTER (master down timer expired)"
        ));
    }
}
