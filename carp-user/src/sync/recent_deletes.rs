//! Deletes sent to the peer in the last [`RESEND_WITHIN`]: bytes in flight when the sync link
//! dies are lost without an error, and the session notices only when the peer has been
//! silent too long, so after a lost session these are told again (a delete of a flow the
//! peer no longer holds is harmless). Sans-IO: time is passed in.

use crate::flow::FlowKey;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Longer than it takes the session to notice a dead link.
pub const RESEND_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct RecentDeletes {
    /// Oldest first.
    sent: VecDeque<(Instant, FlowKey)>,
}

impl RecentDeletes {
    /// `keys` went to the peer (or were tried) at `now`; deletes older than
    /// [`RESEND_WITHIN`] are forgotten.
    pub fn sent(&mut self, keys: impl IntoIterator<Item = FlowKey>, now: Instant) {
        self.sent.extend(keys.into_iter().map(|key| (now, key)));
        while self
            .sent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RESEND_WITHIN)
        {
            self.sent.pop_front();
        }
    }

    /// The session was lost: the deletes to tell the peer again, except those of flows that
    /// are `alive` here again (the tuple reused). Nothing is kept after this.
    pub fn lost(&mut self, alive: impl Fn(&FlowKey) -> bool) -> Vec<FlowKey> {
        self.sent
            .drain(..)
            .map(|(_, key)| key)
            .filter(|key| !alive(key))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            proto: 6,
            src: Ipv4Addr::new(198, 18, 1, 100).into(),
            dst: Ipv4Addr::new(198, 18, 2, 100).into(),
            src_port: port,
            dst_port: 80,
        }
    }

    #[test]
    fn a_lost_session_resends_what_went_out_within_the_window() {
        let start = Instant::now();
        let mut recent = RecentDeletes::default();
        recent.sent([key(1), key(2)], start);
        recent.sent([key(3)], start + RESEND_WITHIN);
        assert_eq!(recent.lost(|_| false), [key(1), key(2), key(3)]);
        assert_eq!(recent.lost(|_| false), [], "told again once");
    }

    #[test]
    fn deletes_older_than_the_window_are_forgotten_at_the_next_send() {
        let start = Instant::now();
        let mut recent = RecentDeletes::default();
        recent.sent([key(1)], start);
        recent.sent([key(2)], start + Duration::from_secs(5));
        recent.sent([], start + RESEND_WITHIN + Duration::from_millis(1));
        assert_eq!(recent.lost(|_| false), [key(2)]);
    }

    #[test]
    fn a_flow_alive_again_is_not_deleted_on_the_peer() {
        let start = Instant::now();
        let mut recent = RecentDeletes::default();
        recent.sent([key(1), key(2)], start);
        assert_eq!(recent.lost(|k| *k == key(1)), [key(2)]);
    }
}
