//! Turns XDP's deltas into sync records. Each new XDP flow is matched to the kernel's
//! conntrack entry (which gives the original direction and the NAT mapping); the views of a
//! connection are folded into one record. Runs on its own thread: ctnetlink calls block,
//! and the ring buffer must keep draining whatever the sync link does.

use super::view::{self, Side, ViewOf};
use crate::{
    conntrack::{Conntrack, Direction, Entry, invert},
    flow::{FlowKey, FlowRecord},
};
use carp_common::flow::{self as xdp, DELTA_BORN, DELTA_ENDED, FlowDelta, FlowEntry, is_icmp};
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};
use tracing::warn;

/// Lookups a view waits for its conntrack entry (the kernel confirms a connection only after
/// the packet XDP saw has crossed the stack) before it is sent without NAT...
const RESOLVE_ROUNDS: u8 = 3;
/// ...and for at least this long: rounds come as fast as deltas do, and a burst of new
/// flows used to spend a view's rounds before a busy CPU had confirmed its connection.
const RESOLVE_WAIT: Duration = Duration::from_millis(100);
/// How often connections nothing refreshed are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// What the capture tells the sync session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    Upsert(FlowRecord),
    Delete(FlowKey),
}

struct Connection {
    record: FlowRecord,
    views: Vec<xdp::FlowKey>,
    updated: Instant,
}

struct Unresolved {
    entry: FlowEntry,
    sender: usize,
    rounds: u8,
    since: Instant,
}

impl Unresolved {
    /// Whether the view has waited its rounds and its time for conntrack.
    fn waited_enough(&self, now: Instant) -> bool {
        self.rounds >= RESOLVE_ROUNDS && now.saturating_duration_since(self.since) >= RESOLVE_WAIT
    }
}

/// Counters the status shows.
#[derive(Debug, Default, Clone, Copy)]
pub struct CaptureStats {
    pub deltas: u64,
    pub conntrack_lookups: u64,
    /// Time spent in conntrack lookups, for the cost of taking NAT from the kernel.
    pub lookup_ns: u64,
    pub unmatched: u64,
}

/// The capture side's state (sans-IO but for the conntrack lookups it is given).
#[derive(Default)]
pub struct Capture {
    views: HashMap<xdp::FlowKey, ViewOf>,
    connections: HashMap<FlowKey, Connection>,
    unresolved: HashMap<xdp::FlowKey, Unresolved>,
    last_sweep: Option<Instant>,
    pub stats: CaptureStats,
}

impl Capture {
    /// Whether views are waiting for conntrack (the caller should come back soon).
    pub fn waiting(&self) -> bool {
        !self.unresolved.is_empty()
    }

    /// Handles a batch of deltas; `conntrack` is `None` where the kernel has none.
    pub fn handle(
        &mut self,
        deltas: &[FlowDelta],
        conntrack: Option<&mut Conntrack>,
        now: Instant,
    ) -> Vec<Local> {
        let mut out = Vec::new();
        for delta in deltas {
            self.stats.deltas += 1;
            if let Some(view) = self.views.get(&delta.key).copied() {
                self.apply(&delta.entry, view, delta.kind, now, &mut out);
            } else {
                let sender = if delta.kind == DELTA_BORN {
                    view::first_sender(&delta.entry)
                } else {
                    0
                };
                let slot = self.unresolved.entry(delta.key).or_insert(Unresolved {
                    entry: delta.entry,
                    sender,
                    rounds: 0,
                    since: now,
                });
                slot.entry = delta.entry;
            }
        }
        self.resolve(conntrack, now, &mut out);
        if self
            .last_sweep
            .is_none_or(|at| now.duration_since(at) >= SWEEP_EVERY)
        {
            self.last_sweep = Some(now);
            self.sweep(now);
        }
        out
    }

    fn apply(
        &mut self,
        entry: &FlowEntry,
        view: ViewOf,
        kind: u8,
        now: Instant,
        out: &mut Vec<Local>,
    ) {
        let Some(connection) = self.connections.get_mut(&view.connection) else {
            return;
        };
        view::fold(&mut connection.record, entry, &view);
        connection.updated = now;
        if kind == DELTA_ENDED || view::ended(&connection.record) {
            let connection = self
                .connections
                .remove(&view.connection)
                .expect("just looked up");
            for k in &connection.views {
                self.views.remove(k);
            }
            out.push(Local::Delete(view.connection));
        } else {
            out.push(Local::Upsert(connection.record));
        }
    }

    /// Matches waiting views to conntrack entries, in one batch of lookups.
    fn resolve(&mut self, conntrack: Option<&mut Conntrack>, now: Instant, out: &mut Vec<Local>) {
        if self.unresolved.is_empty() {
            return;
        }
        let keys: Vec<xdp::FlowKey> = self.unresolved.keys().copied().collect();
        let tracked = conntrack.is_some();
        let found = match conntrack {
            Some(conntrack) => self.lookup(conntrack, &keys),
            None => vec![None; keys.len()],
        };
        for (key, hit) in keys.into_iter().zip(found) {
            let waiting = self.unresolved.get_mut(&key).expect("listed above");
            waiting.rounds += 1;
            let from_kernel = hit.is_some();
            let (view, entry) = match hit {
                Some(hit) => hit,
                None if tracked && !waiting.waited_enough(now) => continue,
                None => {
                    // Not in conntrack (not tracked, or already gone): the tuple as seen,
                    // untranslated.
                    self.stats.unmatched += 1;
                    let tuple = view::tuple_of(&key, waiting.sender);
                    let view = ViewOf {
                        connection: tuple,
                        side: Side::Original,
                        sender: waiting.sender,
                    };
                    let entry = Entry {
                        orig: tuple,
                        reply: invert(&tuple),
                        timeout_s: 0,
                    };
                    (view, entry)
                }
            };
            let waiting = self.unresolved.remove(&key).expect("listed above");
            let connection =
                self.connections
                    .entry(view.connection)
                    .or_insert_with(|| Connection {
                        record: view::empty_record(entry.orig, entry.reply),
                        views: Vec::new(),
                        updated: now,
                    });
            if from_kernel {
                // A view that gave up waiting made the record untranslated: the kernel's
                // answer for another view of the connection puts its NAT mapping back.
                connection.record.reply = entry.reply;
            }
            connection.views.push(key);
            self.views.insert(key, view);
            self.apply(&waiting.entry, view, 0, now, out);
        }
    }

    /// For each view: its tuple both ways. The kernel finds a connection by either of its
    /// tuples, so which side the view is comes from comparing the tuple with the answer; only
    /// ICMP, whose tuples carry the echo type, is asked for in each direction.
    fn lookup(
        &mut self,
        conntrack: &mut Conntrack,
        keys: &[xdp::FlowKey],
    ) -> Vec<Option<(ViewOf, Entry)>> {
        let mut queries = Vec::with_capacity(keys.len() * 2);
        // For each query: which key it is for, and the endpoint sending its tuple.
        let mut owners = Vec::with_capacity(keys.len() * 2);
        for (index, key) in keys.iter().enumerate() {
            let directions: &[Direction] = if is_icmp(key.proto) {
                &[Direction::Original, Direction::Reply]
            } else {
                &[Direction::Original]
            };
            let first = self.unresolved[key].sender;
            for sender in [first, first ^ 1] {
                let tuple = view::tuple_of(key, sender);
                for direction in directions {
                    queries.push((tuple, *direction));
                    owners.push((index, sender));
                }
            }
        }
        let started = Instant::now();
        let answers = match conntrack.lookup(&queries) {
            Ok(answers) => answers,
            Err(e) => {
                warn!(error = %e, "conntrack lookup failed");
                vec![None; queries.len()]
            }
        };
        self.stats.conntrack_lookups += queries.len() as u64;
        self.stats.lookup_ns += started.elapsed().as_nanos() as u64;
        let mut found = vec![None; keys.len()];
        for ((answer, (tuple, _)), (index, sender)) in answers.iter().zip(&queries).zip(owners) {
            let Some(entry) = *answer else { continue };
            let side = if *tuple == entry.orig {
                Side::Original
            } else if *tuple == entry.reply {
                Side::Reply
            } else {
                continue;
            };
            found[index].get_or_insert((
                ViewOf {
                    connection: entry.orig,
                    side,
                    sender,
                },
                entry,
            ));
        }
        found
    }

    /// Forgets connections whose timeout passed without a delta (XDP refreshes live ones).
    fn sweep(&mut self, now: Instant) {
        let stale: Vec<FlowKey> = self
            .connections
            .iter()
            .filter(|(_, c)| {
                now.saturating_duration_since(c.updated)
                    > Duration::from_secs(u64::from(c.record.timeout_s))
            })
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            if let Some(c) = self.connections.remove(&key) {
                for k in &c.views {
                    self.views.remove(k);
                }
            }
        }
    }

    /// Connections held.
    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carp_common::flow::{DELTA_CHANGED, IPPROTO_TCP, IPPROTO_UDP, tcp_phase};

    fn tuple(proto: u8, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
        FlowKey {
            proto,
            src: src.into(),
            dst: dst.into(),
            src_port: sport,
            dst_port: dport,
        }
    }

    fn delta(t: &FlowKey, kind: u8, packets_from_src: u64, phase: u8) -> FlowDelta {
        let (key, sender) = view::key_of(t);
        let mut entry = FlowEntry::default();
        entry.packets[sender] = packets_from_src;
        entry.tcp[sender].phase = phase;
        FlowDelta {
            key,
            entry,
            kind,
            _pad: [0; 7],
        }
    }

    /// Without conntrack, a flow is sent at once as seen, originated by its first packet's
    /// sender.
    #[test]
    fn untracked_flows_go_out_untranslated() {
        let t = tuple(IPPROTO_UDP, [198, 18, 1, 100], 5000, [198, 18, 2, 100], 53);
        let mut c = Capture::default();
        let now = Instant::now();
        let out = c.handle(&[delta(&t, DELTA_BORN, 1, 0)], None, now);
        assert!(!c.waiting());
        let [Local::Upsert(r)] = out.as_slice() else {
            panic!("one upsert, got {out:?}");
        };
        assert_eq!(r.key, t);
        assert_eq!(r.reply, invert(&t));
        assert_eq!(r.packets, [1, 0]);
        assert_eq!(c.stats.unmatched, 1);
        // Later deltas of the same flow go straight through.
        let out = c.handle(&[delta(&t, DELTA_CHANGED, 4, 0)], None, now);
        assert!(matches!(out.as_slice(), [Local::Upsert(r)] if r.packets == [4, 0]));
    }

    /// A burst of deltas spends a view's rounds in microseconds: it still waits its time
    /// for the kernel to confirm the connection, and the rounds too on a slow loop.
    #[test]
    fn a_view_waits_rounds_and_time_for_conntrack() {
        let since = Instant::now();
        let mut waiting = Unresolved {
            entry: FlowEntry::default(),
            sender: 0,
            rounds: RESOLVE_ROUNDS,
            since,
        };
        assert!(!waiting.waited_enough(since + Duration::from_millis(1)));
        assert!(waiting.waited_enough(since + RESOLVE_WAIT));
        waiting.rounds = 1;
        assert!(!waiting.waited_enough(since + Duration::from_secs(1)));
    }

    #[test]
    fn ended_connections_are_deleted_and_forgotten() {
        let t = tuple(IPPROTO_TCP, [198, 18, 1, 100], 40000, [198, 18, 2, 100], 80);
        let mut c = Capture::default();
        let now = Instant::now();
        c.handle(&[delta(&t, DELTA_BORN, 1, tcp_phase::SYN_SENT)], None, now);
        assert_eq!(c.len(), 1);
        let out = c.handle(&[delta(&t, DELTA_ENDED, 9, tcp_phase::CLOSED)], None, now);
        assert_eq!(out, [Local::Delete(t)]);
        assert!(c.is_empty());
    }

    #[test]
    fn idle_connections_are_swept() {
        let t = tuple(IPPROTO_UDP, [1, 1, 1, 1], 1, [2, 2, 2, 2], 2);
        let mut c = Capture::default();
        let now = Instant::now();
        c.handle(&[delta(&t, DELTA_BORN, 1, 0)], None, now);
        assert_eq!(c.len(), 1);
        c.handle(&[], None, now + Duration::from_secs(29));
        assert_eq!(c.len(), 1, "UDP without replies lives 30 s");
        c.handle(&[], None, now + Duration::from_secs(45));
        assert!(c.is_empty());
    }
}
