//! The bulk update, after pfsync: a joining node asks its peer for every flow and stays
//! demoted until the transfer (start, records, end) completes, so it never takes mastership
//! half-synced. A transfer that stalls is asked for again, up to [`BULK_ATTEMPTS`] times; then
//! the node gives up loudly and undemotes anyway. Sans-IO: frames in and out, time passed in.

use super::proto::Frame;
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};
use tracing::{error, info, warn};

/// How long a request or a transfer may go without progress before it is asked for again.
pub const BULK_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests before giving up (pfsync's 12).
pub const BULK_ATTEMPTS: u32 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not connected, or connected but not yet asked.
    Idle,
    Requested {
        deadline: Instant,
    },
    Receiving {
        generation: u64,
        received: u64,
        deadline: Instant,
    },
    Done,
    GaveUp,
}

/// What the I/O layer learns from the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The peer's flows are all in: `received` records.
    Completed { received: u64 },
    /// No complete transfer after `attempts` requests.
    GaveUp { attempts: u32 },
}

/// The joining side of the bulk update.
#[derive(Debug)]
pub struct BulkSync {
    phase: Phase,
    attempts: u32,
    /// Only the first bulk update after start demotes; a resync after a link flap must not
    /// move the VIPs.
    initial: bool,
    transmit: VecDeque<Frame>,
    events: VecDeque<Event>,
}

impl Default for BulkSync {
    fn default() -> Self {
        Self::new()
    }
}

impl BulkSync {
    pub fn new() -> Self {
        Self {
            phase: Phase::Idle,
            attempts: 0,
            initial: true,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Whether CARP must stay demoted: the first bulk update has neither completed nor been
    /// given up on.
    pub fn demoted(&self) -> bool {
        self.initial && !matches!(self.phase, Phase::Done | Phase::GaveUp)
    }

    /// The phase as `carp status` names it.
    pub fn state(&self) -> &'static str {
        match self.phase {
            Phase::Idle => "idle",
            Phase::Requested { .. } => "requested",
            Phase::Receiving { .. } => "receiving",
            Phase::Done => "done",
            Phase::GaveUp => "gave up",
        }
    }

    /// The session to the peer is up: ask for everything.
    pub fn handle_connected(&mut self, now: Instant) {
        if self.phase == Phase::GaveUp && self.initial {
            self.initial = false;
        }
        self.request(now);
    }

    /// The session dropped: a transfer in progress is asked for again on reconnect.
    pub fn handle_disconnected(&mut self) {
        if matches!(
            self.phase,
            Phase::Requested { .. } | Phase::Receiving { .. }
        ) {
            self.phase = Phase::Idle;
        }
    }

    /// A frame from the peer; only the bulk frames matter here.
    pub fn handle_frame(&mut self, frame: &Frame, now: Instant) {
        match (frame, self.phase) {
            (Frame::BulkStart { generation }, Phase::Requested { .. }) => {
                self.phase = Phase::Receiving {
                    generation: *generation,
                    received: 0,
                    deadline: now + BULK_TIMEOUT,
                };
            }
            (
                Frame::Upsert { records },
                Phase::Receiving {
                    generation,
                    received,
                    ..
                },
            ) => {
                self.phase = Phase::Receiving {
                    generation,
                    received: received + records.len() as u64,
                    deadline: now + BULK_TIMEOUT,
                };
            }
            (
                Frame::BulkEnd { generation, count },
                Phase::Receiving {
                    generation: current,
                    received,
                    ..
                },
            ) if *generation == current => {
                if *count == received {
                    info!(received, attempts = self.attempts, "bulk update complete");
                    self.phase = Phase::Done;
                    self.initial = false;
                    self.attempts = 0;
                    self.events.push_back(Event::Completed { received });
                } else {
                    warn!(
                        expected = count,
                        received, "bulk update lost records: asking again"
                    );
                    self.request(now);
                }
            }
            _ => {}
        }
    }

    /// The deadline from [`BulkSync::poll_timeout`] may have passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Requested { deadline } | Phase::Receiving { deadline, .. }
                if deadline <= now =>
            {
                if self.attempts >= BULK_ATTEMPTS {
                    error!(
                        attempts = self.attempts,
                        "bulk update failed: giving up and undemoting without the peer's flows"
                    );
                    self.phase = Phase::GaveUp;
                    self.events.push_back(Event::GaveUp {
                        attempts: self.attempts,
                    });
                } else {
                    warn!(attempt = self.attempts, "bulk update stalled: asking again");
                    self.request(now);
                }
            }
            _ => {}
        }
    }

    fn request(&mut self, now: Instant) {
        self.attempts += 1;
        self.transmit.push_back(Frame::BulkRequest);
        self.phase = Phase::Requested {
            deadline: now + BULK_TIMEOUT,
        };
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Requested { deadline } | Phase::Receiving { deadline, .. } => Some(deadline),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{flow::TcpPhase, sync::proto::tests::tcp_record};

    fn upsert(n: u16) -> Frame {
        Frame::Upsert {
            records: (0..n)
                .map(|i| tcp_record(i, TcpPhase::Established, 1))
                .collect(),
        }
    }

    #[test]
    fn complete_transfer_undemotes() {
        let t0 = Instant::now();
        let mut bulk = BulkSync::new();
        assert!(bulk.demoted(), "demoted from the start");
        bulk.handle_connected(t0);
        assert_eq!(bulk.poll_transmit(), Some(Frame::BulkRequest));
        bulk.handle_frame(&Frame::BulkStart { generation: 3 }, t0);
        bulk.handle_frame(&upsert(100), t0);
        bulk.handle_frame(&upsert(50), t0);
        assert!(bulk.demoted());
        bulk.handle_frame(
            &Frame::BulkEnd {
                generation: 3,
                count: 150,
            },
            t0,
        );
        assert!(!bulk.demoted());
        assert_eq!(bulk.poll_event(), Some(Event::Completed { received: 150 }));
        assert_eq!(bulk.poll_timeout(), None);
    }

    #[test]
    fn progress_extends_the_deadline() {
        let t0 = Instant::now();
        let mut bulk = BulkSync::new();
        bulk.handle_connected(t0);
        bulk.handle_frame(&Frame::BulkStart { generation: 1 }, t0);
        let later = t0 + Duration::from_secs(4);
        bulk.handle_frame(&upsert(10), later);
        assert_eq!(bulk.poll_timeout(), Some(later + BULK_TIMEOUT));
        bulk.handle_timeout(t0 + BULK_TIMEOUT);
        assert_eq!(bulk.poll_transmit(), Some(Frame::BulkRequest));
        assert_eq!(bulk.poll_transmit(), None, "no retry while it progresses");
    }

    #[test]
    fn stalls_are_retried_then_given_up_loudly() {
        let t0 = Instant::now();
        let mut bulk = BulkSync::new();
        bulk.handle_connected(t0);
        let mut now = t0;
        let mut requests = 0;
        while let Some(deadline) = bulk.poll_timeout() {
            while bulk.poll_transmit().is_some() {
                requests += 1;
            }
            now = deadline;
            bulk.handle_timeout(now);
        }
        assert_eq!(requests, BULK_ATTEMPTS);
        assert_eq!(
            bulk.poll_event(),
            Some(Event::GaveUp {
                attempts: BULK_ATTEMPTS
            })
        );
        assert!(!bulk.demoted(), "gives up and undemotes");
        assert_eq!(now, t0 + BULK_TIMEOUT * BULK_ATTEMPTS);
    }

    #[test]
    fn a_short_transfer_or_a_foreign_generation_is_not_completion() {
        let t0 = Instant::now();
        let mut bulk = BulkSync::new();
        bulk.handle_connected(t0);
        bulk.poll_transmit();
        bulk.handle_frame(&Frame::BulkStart { generation: 1 }, t0);
        bulk.handle_frame(&upsert(5), t0);
        bulk.handle_frame(
            &Frame::BulkEnd {
                generation: 2,
                count: 5,
            },
            t0,
        );
        assert!(bulk.demoted(), "another transfer's end");
        bulk.handle_frame(
            &Frame::BulkEnd {
                generation: 1,
                count: 6,
            },
            t0,
        );
        assert!(bulk.demoted(), "one record missing");
        assert_eq!(
            bulk.poll_transmit(),
            Some(Frame::BulkRequest),
            "asked again"
        );
    }

    #[test]
    fn resync_after_a_link_flap_does_not_demote() {
        let t0 = Instant::now();
        let mut bulk = BulkSync::new();
        bulk.handle_connected(t0);
        bulk.handle_frame(&Frame::BulkStart { generation: 1 }, t0);
        bulk.handle_frame(
            &Frame::BulkEnd {
                generation: 1,
                count: 0,
            },
            t0,
        );
        assert!(!bulk.demoted());
        bulk.handle_disconnected();
        bulk.handle_connected(t0 + Duration::from_secs(60));
        assert_eq!(bulk.poll_transmit(), Some(Frame::BulkRequest));
        assert_eq!(
            bulk.poll_transmit(),
            Some(Frame::BulkRequest),
            "resync asks too"
        );
        assert!(!bulk.demoted(), "but keeps the VIPs where they are");
    }

    #[test]
    fn a_drop_mid_transfer_asks_again_on_reconnect_still_demoted() {
        let t0 = Instant::now();
        let mut bulk = BulkSync::new();
        bulk.handle_connected(t0);
        bulk.handle_frame(&Frame::BulkStart { generation: 1 }, t0);
        bulk.handle_disconnected();
        assert_eq!(bulk.poll_timeout(), None);
        assert!(bulk.demoted());
        bulk.handle_connected(t0 + Duration::from_secs(1));
        assert!(bulk.poll_timeout().is_some());
    }
}
