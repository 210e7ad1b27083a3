//! Which server of the Kea pair answered a lease's last transaction. Kea does not record it,
//! but in hot-standby exactly one server serves at a time (the one whose HA scopes are not
//! empty), so the supervisor notes who served when, and a lease is attributed by its client
//! last transaction time (cltt, to the second). A change counts from the last time the old
//! state was seen: at a failover the old server was silent by then (dead, or gone into
//! maintenance before its partner took over). What happened before this daemon started is
//! unknown.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// The server answering clients, as this node's Kea sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Server {
    Here,
    Partner,
    /// Neither, or this node cannot tell (the pair is syncing or waiting, or the Kea here
    /// does not answer).
    Unknown,
}

/// Changes kept: one per failover or maintenance, so this covers far more than a lease time.
const KEPT: usize = 1024;

/// Who served from when (unix milliseconds), oldest first, one entry per change.
#[derive(Debug, Clone, Default)]
pub struct ServedBy {
    changes: VecDeque<(u64, Server)>,
    /// When the current state was last seen.
    last_seen_ms: u64,
}

impl ServedBy {
    /// Notes who serves as Kea was asked at `unix_ms`. An answer to an earlier question
    /// than one already noted is older news and is dropped: looks overlap (the supervisor's
    /// once a second, `carp leases` at any time).
    pub fn observe(&mut self, unix_ms: u64, server: Server) {
        if unix_ms < self.last_seen_ms {
            return;
        }
        let previous = self.changes.back().map(|(_, last)| *last);
        if previous != Some(server) {
            if self.changes.len() == KEPT {
                self.changes.pop_front();
            }
            let since = if previous.is_some() {
                self.last_seen_ms + 1
            } else {
                unix_ms
            };
            self.changes.push_back((since, server));
        }
        self.last_seen_ms = unix_ms;
    }

    /// Who served at the end of the second `unix_s`; `None` before the first observation.
    pub fn at(&self, unix_s: u64) -> Option<Server> {
        let at_ms = unix_s * 1000 + 999;
        self.changes
            .iter()
            .rev()
            .find(|(since, _)| *since <= at_ms)
            .map(|(_, server)| *server)
    }
}

/// Who serves, from the HA scopes Kea reports here and for the partner.
pub fn serving(local_scopes: &[String], partner_scopes: &[String]) -> Server {
    if !local_scopes.is_empty() {
        Server::Here
    } else if !partner_scopes.is_empty() {
        Server::Partner
    } else {
        Server::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_attributed_to_whoever_served_at_its_last_transaction() {
        let mut served = ServedBy::default();
        assert_eq!(served.at(100), None);
        served.observe(100_500, Server::Here);
        served.observe(101_500, Server::Here);
        // Polled each second: the partner took over after 149.5 s, seen at 150.5 s.
        served.observe(149_500, Server::Here);
        served.observe(150_500, Server::Partner);
        served.observe(151_500, Server::Partner);
        served.observe(152_500, Server::Unknown);
        assert_eq!(served.at(99), None, "before carp looked");
        assert_eq!(served.at(100), Some(Server::Here));
        assert_eq!(served.at(148), Some(Server::Here));
        assert_eq!(
            served.at(149),
            Some(Server::Partner),
            "the second it changed in goes to the new server"
        );
        assert_eq!(served.at(150), Some(Server::Partner));
        assert_eq!(served.at(151), Some(Server::Unknown));
        assert_eq!(served.at(10_000), Some(Server::Unknown));
        assert_eq!(served.changes.len(), 3, "one entry per change");
    }

    #[test]
    fn an_answer_to_an_earlier_look_changes_nothing() {
        let mut served = ServedBy::default();
        served.observe(100_000, Server::Partner);
        served.observe(101_500, Server::Here);
        // Asked at 101.2 s, answered after the look of 101.5 s.
        served.observe(101_200, Server::Partner);
        assert_eq!(served.at(101), Some(Server::Here));
        assert_eq!(served.at(102), Some(Server::Here));
    }

    #[test]
    fn only_the_latest_changes_are_kept() {
        let mut served = ServedBy::default();
        for t in 0..(KEPT as u64 + 10) {
            let server = if t % 2 == 0 {
                Server::Here
            } else {
                Server::Partner
            };
            served.observe(t * 1000, server);
        }
        assert_eq!(served.changes.len(), KEPT);
        assert_eq!(served.at(5), None, "forgotten");
        assert_eq!(served.at(KEPT as u64 + 9), Some(Server::Partner));
    }

    #[test]
    fn the_server_with_scopes_serves() {
        let scope = vec!["primary".to_string()];
        assert_eq!(serving(&scope, &[]), Server::Here);
        assert_eq!(serving(&[], &scope), Server::Partner);
        assert_eq!(serving(&[], &[]), Server::Unknown);
    }
}
