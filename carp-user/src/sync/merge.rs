//! pfsync's rule: a flow's state never moves backwards. An update whose TCP phase or sequence
//! window is behind the local copy, in either direction, is stale; the receiver keeps its copy
//! (and answers with it). UDP and ICMP flows, which have no phases, go by packet counts.

use crate::flow::{FlowKey, FlowRecord};
use carp_common::flow::{IPPROTO_TCP, seq_after};
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// How an incoming record relates to the local copy of the same flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No local copy: install it.
    New,
    /// Ahead of the local copy: replace it.
    Newer,
    /// Nothing new.
    Same,
    /// Behind the local copy in some respect: keep ours, answer with it.
    Stale,
}

/// Judges `incoming` against the local copy.
pub fn judge(local: Option<&FlowRecord>, incoming: &FlowRecord) -> Verdict {
    let Some(local) = local else {
        return Verdict::New;
    };
    let mut ahead = false;
    if incoming.key.proto == IPPROTO_TCP {
        for (ours, theirs) in local.tcp.iter().zip(&incoming.tcp) {
            if theirs.phase < ours.phase {
                return Verdict::Stale;
            }
            if theirs.phase > ours.phase {
                ahead = true;
            } else if seq_after(ours.seqhi, theirs.seqhi) {
                return Verdict::Stale;
            } else if theirs.seqhi != ours.seqhi {
                ahead = true;
            }
        }
    }
    let ours = packets_seen(local);
    let theirs = packets_seen(incoming);
    if theirs < ours {
        // TCP progress with fewer packets counted is a peer that restarted its counters:
        // the phases and windows decide.
        return if ahead {
            Verdict::Newer
        } else {
            Verdict::Stale
        };
    }
    if ahead || theirs > ours {
        Verdict::Newer
    } else {
        Verdict::Same
    }
}

/// Both directions' packet counts. Saturating: the counters come off the wire, and a peer (or
/// garbage past the transport) may send any value; a sum that wrapped would also misjudge.
fn packets_seen(record: &FlowRecord) -> u64 {
    record
        .packets
        .iter()
        .fold(0, |sum, &n| sum.saturating_add(n))
}

/// Where a held flow was learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Captured by this node's XDP.
    Local,
    /// Sent by the peer.
    Peer,
}

/// A flow as the table holds it.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub record: FlowRecord,
    pub origin: Origin,
    /// When the last update arrived: the flow expires `record.timeout_s` after it.
    pub updated: Instant,
}

/// How long a flow that ended here refuses the peer's updates. The peer may have sent one
/// before our delete reached it (a stale answer, a bulk answer): arriving after the delete,
/// it would bring the ended flow back, here and in this node's kernel, for good (found by
/// the chaos soak). A tuple reused within this time by a connection through the peer waits
/// for its next refresh.
pub const ENDED_REFUSES_UPDATES: Duration = Duration::from_secs(5);

/// What a batch of the peer's records leads to ([`FlowTable::merge_batch`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Ahead of what this node held: for its flow map and conntrack.
    pub install: Vec<FlowRecord>,
    /// This node's copies of flows the peer is behind on: sent back to it.
    pub answer: Vec<FlowRecord>,
}

/// The user-space copy of the flows: what the peer is sent in a bulk update, what the merge
/// rule compares against, and what `carp flows` lists.
#[derive(Debug, Default)]
pub struct FlowTable {
    flows: HashMap<FlowKey, Held>,
    /// Flows that ended here, and when.
    ended: HashMap<FlowKey, Instant>,
}

impl FlowTable {
    /// Applies `record` from the peer if it is new or newer; returns the verdict either way.
    /// An update for a flow that ended here moments ago is nothing new.
    pub fn merge(&mut self, record: FlowRecord, now: Instant) -> Verdict {
        if self
            .ended
            .get(&record.key)
            .is_some_and(|at| now.saturating_duration_since(*at) < ENDED_REFUSES_UPDATES)
        {
            return Verdict::Same;
        }
        let verdict = judge(self.get(&record.key), &record);
        if matches!(verdict, Verdict::New | Verdict::Newer) {
            self.hold(record, Origin::Peer, now);
        }
        verdict
    }

    /// Merges a batch from the peer: what to install here (new or newer), and our copies of
    /// the flows it was behind on, to answer with (pfsync's rule).
    pub fn merge_batch(&mut self, records: &[FlowRecord], now: Instant) -> Merged {
        let mut merged = Merged::default();
        for record in records {
            match self.merge(*record, now) {
                Verdict::New | Verdict::Newer => merged.install.push(*record),
                Verdict::Stale => merged.answer.extend(self.get(&record.key).copied()),
                Verdict::Same => {}
            }
        }
        merged
    }

    /// Takes `record` as captured here: local capture is the truth, never judged.
    pub fn hold(&mut self, record: FlowRecord, origin: Origin, now: Instant) {
        if origin == Origin::Local {
            self.ended.remove(&record.key);
        }
        self.flows.insert(
            record.key,
            Held {
                record,
                origin,
                updated: now,
            },
        );
    }

    /// Forgets a flow the peer says ended; returns whether it was known.
    pub fn remove(&mut self, key: &FlowKey) -> bool {
        self.flows.remove(key).is_some()
    }

    /// Forgets a flow that ended here, refusing the peer's updates of it for a while.
    pub fn end(&mut self, key: &FlowKey, now: Instant) {
        self.flows.remove(key);
        self.ended.insert(*key, now);
    }

    pub fn get(&self, key: &FlowKey) -> Option<&FlowRecord> {
        self.flows.get(key).map(|h| &h.record)
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Every flow, for a bulk answer, each with the time it has left here as its timeout
    /// (pfsync's `expire`): the receiver's copy then expires when this one does, not a whole
    /// timeout after the bulk (found by the chaos soak: a restarted peer kept flows long
    /// gone here).
    pub fn records(&self, now: Instant) -> Vec<FlowRecord> {
        self.flows
            .values()
            .map(|h| {
                let age = now.saturating_duration_since(h.updated).as_secs();
                FlowRecord {
                    timeout_s: h
                        .record
                        .timeout_s
                        .saturating_sub(u32::try_from(age).unwrap_or(u32::MAX))
                        .max(1),
                    ..h.record
                }
            })
            .collect()
    }

    /// Every flow with where it came from, for `carp flows`.
    pub fn held(&self) -> impl Iterator<Item = &Held> {
        self.flows.values()
    }

    /// Drops the flows nothing refreshed within their timeout; returns their keys.
    pub fn expire(&mut self, now: Instant) -> Vec<FlowKey> {
        let expired: Vec<FlowKey> = self
            .flows
            .values()
            .filter(|h| {
                now.saturating_duration_since(h.updated)
                    > Duration::from_secs(u64::from(h.record.timeout_s))
            })
            .map(|h| h.record.key)
            .collect();
        for key in &expired {
            self.flows.remove(key);
        }
        self.ended
            .retain(|_, at| now.saturating_duration_since(*at) < ENDED_REFUSES_UPDATES);
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{flow::TcpPhase, sync::proto::tests::tcp_record};
    use proptest::prelude::*;

    fn at() -> Instant {
        Instant::now()
    }

    #[test]
    fn unknown_flows_are_new_and_repeats_are_same() {
        let r = tcp_record(1, TcpPhase::Established, 100);
        let mut table = FlowTable::default();
        assert_eq!(table.merge(r, at()), Verdict::New);
        assert_eq!(table.merge(r, at()), Verdict::Same);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn an_update_crossing_our_delete_does_not_bring_the_flow_back() {
        let t0 = at();
        let mut table = FlowTable::default();
        let r = tcp_record(1, TcpPhase::Established, 100);
        table.hold(r, Origin::Local, t0);
        // The flow ends here; the peer's copy, sent before it heard, arrives after.
        table.end(&r.key, t0);
        assert_eq!(
            table.merge(r, t0 + Duration::from_millis(50)),
            Verdict::Same
        );
        assert!(table.get(&r.key).is_none(), "still ended");
        // Captured here again (the tuple reused): local capture is the truth.
        table.hold(r, Origin::Local, t0 + Duration::from_millis(60));
        table.end(&r.key, t0 + Duration::from_millis(70));
        // Long after, the peer's news counts again.
        let later = t0 + ENDED_REFUSES_UPDATES + Duration::from_secs(1);
        table.expire(later);
        assert_eq!(table.merge(r, later), Verdict::New);
    }

    #[test]
    fn a_batch_installs_what_is_ahead_and_answers_what_is_behind_with_ours() {
        let t0 = at();
        let mut table = FlowTable::default();
        let ours_ahead = tcp_record(1, TcpPhase::FinWait, 100);
        let same = tcp_record(2, TcpPhase::Established, 100);
        table.hold(ours_ahead, Origin::Local, t0);
        table.hold(same, Origin::Local, t0);
        let behind = tcp_record(1, TcpPhase::Established, 100);
        let unknown = tcp_record(3, TcpPhase::Established, 100);
        let merged = table.merge_batch(&[behind, same, unknown], t0);
        assert_eq!(
            merged,
            Merged {
                install: vec![unknown],
                answer: vec![ours_ahead],
            }
        );
        assert_eq!(table.get(&ours_ahead.key), Some(&ours_ahead), "kept ours");
        assert_eq!(table.get(&unknown.key), Some(&unknown));
    }

    #[test]
    fn a_bulk_answer_carries_the_time_each_flow_has_left() {
        let t0 = at();
        let mut table = FlowTable::default();
        let mut r = tcp_record(1, TcpPhase::Established, 100);
        r.timeout_s = 120;
        table.hold(r, Origin::Local, t0);
        let later = t0 + Duration::from_secs(100);
        let sent = table.records(later);
        assert_eq!(sent[0].timeout_s, 20);
        // A peer holding it from the bulk on lets it go when this node does.
        let mut peer = FlowTable::default();
        peer.merge(sent[0], later);
        assert!(peer.expire(later + Duration::from_secs(19)).is_empty());
        assert_eq!(peer.expire(later + Duration::from_secs(21)), [r.key]);
        assert_eq!(table.expire(t0 + Duration::from_secs(121)), [r.key]);
        // Never zero: a flow about to expire still arrives.
        let mut last = FlowTable::default();
        last.hold(r, Origin::Local, t0);
        assert_eq!(last.records(t0 + Duration::from_secs(500))[0].timeout_s, 1);
    }

    #[test]
    fn tcp_phases_never_move_backwards() {
        let mut table = FlowTable::default();
        table.merge(tcp_record(1, TcpPhase::FinWait, 100), at());
        let older = tcp_record(1, TcpPhase::Established, 500);
        assert_eq!(table.merge(older, at()), Verdict::Stale);
        assert_eq!(
            table.get(&older.key).unwrap().tcp[0].phase,
            TcpPhase::FinWait as u8,
            "the local copy stays"
        );
        assert_eq!(
            table.merge(tcp_record(1, TcpPhase::TimeWait, 100), at()),
            Verdict::Newer
        );
    }

    #[test]
    fn sequence_windows_never_move_backwards_across_wraparound() {
        let mut table = FlowTable::default();
        table.merge(tcp_record(1, TcpPhase::Established, u32::MAX - 10), at());
        // 20 bytes later the sequence space has wrapped: that is ahead, not behind.
        let mut wrapped = tcp_record(1, TcpPhase::Established, 9);
        wrapped.packets = [11, 10];
        assert_eq!(table.merge(wrapped, at()), Verdict::Newer);
        let mut behind = tcp_record(1, TcpPhase::Established, u32::MAX - 5);
        behind.packets = [12, 11];
        assert_eq!(table.merge(behind, at()), Verdict::Stale);
    }

    #[test]
    fn one_direction_behind_is_stale_even_if_the_other_is_ahead() {
        let mut table = FlowTable::default();
        table.merge(tcp_record(1, TcpPhase::Established, 1000), at());
        let mut mixed = tcp_record(1, TcpPhase::Established, 1000);
        mixed.tcp[0].seqhi = 2000;
        mixed.tcp[1].seqhi = 500;
        assert_eq!(table.merge(mixed, at()), Verdict::Stale);
    }

    /// A UDP flow that has counted `packets`.
    fn udp_with(packets: [u64; 2]) -> FlowRecord {
        let mut udp = tcp_record(1, TcpPhase::None, 0);
        udp.key.proto = 17;
        udp.tcp = Default::default();
        udp.packets = packets;
        udp
    }

    #[test]
    fn udp_goes_by_packet_counts() {
        let mut table = FlowTable::default();
        table.merge(udp_with([10, 10]), at());
        assert_eq!(table.merge(udp_with([1, 1]), at()), Verdict::Stale);
        assert_eq!(table.merge(udp_with([50, 40]), at()), Verdict::Newer);
        assert!(table.remove(&udp_with([0, 0]).key));
        assert!(table.is_empty());
    }

    #[test]
    fn counters_at_the_top_of_their_range_neither_panic_nor_wrap() {
        let mut table = FlowTable::default();
        table.merge(udp_with([u64::MAX, 1]), at());
        // A wrapping sum would make this look like 0 packets, and the small one newer.
        assert_eq!(table.merge(udp_with([5, 5]), at()), Verdict::Stale);
        let top = udp_with([u64::MAX, u64::MAX]);
        assert_eq!(table.merge(top, at()), Verdict::Same);
    }

    proptest! {
        /// Whatever order updates arrive in, the table ends at the most advanced one.
        #[test]
        fn the_most_advanced_update_wins_in_any_order(
            order in Just((0..6u32).collect::<Vec<_>>()).prop_shuffle()
        ) {
            let phases = [
                TcpPhase::SynSent, TcpPhase::SynReceived, TcpPhase::Established,
                TcpPhase::Established, TcpPhase::FinWait, TcpPhase::TimeWait,
            ];
            let mut table = FlowTable::default();
            for i in order {
                let mut r = tcp_record(7, phases[i as usize], 1000 + i * 100);
                r.packets = [u64::from(i) + 1, u64::from(i)];
                table.merge(r, at());
            }
            let last = tcp_record(7, TcpPhase::TimeWait, 1500);
            let kept = table.get(&last.key).unwrap();
            prop_assert_eq!(kept.tcp[0].phase, TcpPhase::TimeWait as u8);
            prop_assert_eq!(kept.tcp[0].seqhi, 1500);
        }

        #[test]
        fn seq_after_is_antisymmetric(a: u32, b: u32) {
            prop_assume!(a != b && a.wrapping_sub(b) != 1 << 31);
            prop_assert_ne!(seq_after(a, b), seq_after(b, a));
        }
    }
}
