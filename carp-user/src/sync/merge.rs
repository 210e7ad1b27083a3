//! pfsync's rule: a flow's state never moves backwards. An update whose TCP phase or sequence
//! window is behind the local copy, in either direction, is stale; the receiver keeps its copy
//! (and answers with it). UDP and ICMP flows, which have no phases, go by packet counts.

use super::proto::{FlowKey, FlowRecord};
use std::collections::HashMap;

const IPPROTO_TCP: u8 = 6;

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

/// Whether sequence number `a` comes before `b` (RFC 1982 serial arithmetic, 32 bits).
pub fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
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
            } else if seq_before(theirs.seqhi, ours.seqhi) {
                return Verdict::Stale;
            } else if theirs.seqhi != ours.seqhi {
                ahead = true;
            }
        }
    }
    let ours: u64 = local.packets.iter().sum();
    let theirs: u64 = incoming.packets.iter().sum();
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

/// The user-space copy of the flows: what the peer is sent in a bulk update, and what the
/// merge rule compares against.
#[derive(Debug, Default)]
pub struct FlowTable {
    flows: HashMap<FlowKey, FlowRecord>,
}

impl FlowTable {
    /// Applies `record` if it is new or newer; returns the verdict either way.
    pub fn merge(&mut self, record: FlowRecord) -> Verdict {
        let verdict = judge(self.flows.get(&record.key), &record);
        if matches!(verdict, Verdict::New | Verdict::Newer) {
            self.flows.insert(record.key, record);
        }
        verdict
    }

    /// Forgets an ended flow; returns whether it was known.
    pub fn remove(&mut self, key: &FlowKey) -> bool {
        self.flows.remove(key).is_some()
    }

    pub fn get(&self, key: &FlowKey) -> Option<&FlowRecord> {
        self.flows.get(key)
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Every flow, for a bulk answer.
    pub fn records(&self) -> Vec<FlowRecord> {
        self.flows.values().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::proto::{TcpPhase, tests::tcp_record};
    use proptest::prelude::*;

    #[test]
    fn unknown_flows_are_new_and_repeats_are_same() {
        let r = tcp_record(1, TcpPhase::Established, 100);
        let mut table = FlowTable::default();
        assert_eq!(table.merge(r), Verdict::New);
        assert_eq!(table.merge(r), Verdict::Same);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn tcp_phases_never_move_backwards() {
        let mut table = FlowTable::default();
        table.merge(tcp_record(1, TcpPhase::FinWait, 100));
        let older = tcp_record(1, TcpPhase::Established, 500);
        assert_eq!(table.merge(older), Verdict::Stale);
        assert_eq!(
            table.get(&older.key).unwrap().tcp[0].phase,
            TcpPhase::FinWait as u8,
            "the local copy stays"
        );
        assert_eq!(
            table.merge(tcp_record(1, TcpPhase::TimeWait, 100)),
            Verdict::Newer
        );
    }

    #[test]
    fn sequence_windows_never_move_backwards_across_wraparound() {
        let mut table = FlowTable::default();
        table.merge(tcp_record(1, TcpPhase::Established, u32::MAX - 10));
        // 20 bytes later the sequence space has wrapped: that is ahead, not behind.
        let mut wrapped = tcp_record(1, TcpPhase::Established, 9);
        wrapped.packets = [11, 10];
        assert_eq!(table.merge(wrapped), Verdict::Newer);
        let mut behind = tcp_record(1, TcpPhase::Established, u32::MAX - 5);
        behind.packets = [12, 11];
        assert_eq!(table.merge(behind), Verdict::Stale);
    }

    #[test]
    fn one_direction_behind_is_stale_even_if_the_other_is_ahead() {
        let mut table = FlowTable::default();
        table.merge(tcp_record(1, TcpPhase::Established, 1000));
        let mut mixed = tcp_record(1, TcpPhase::Established, 1000);
        mixed.tcp[0].seqhi = 2000;
        mixed.tcp[1].seqhi = 500;
        assert_eq!(table.merge(mixed), Verdict::Stale);
    }

    #[test]
    fn udp_goes_by_packet_counts() {
        let mut udp = tcp_record(1, TcpPhase::None, 0);
        udp.key.proto = 17;
        udp.tcp = Default::default();
        let mut table = FlowTable::default();
        table.merge(udp);
        let mut fewer = udp;
        fewer.packets = [1, 1];
        assert_eq!(table.merge(fewer), Verdict::Stale);
        let mut more = udp;
        more.packets = [50, 40];
        assert_eq!(table.merge(more), Verdict::Newer);
        assert!(table.remove(&udp.key));
        assert!(table.is_empty());
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
                table.merge(r);
            }
            let last = tcp_record(7, TcpPhase::TimeWait, 1500);
            let kept = table.get(&last.key).unwrap();
            prop_assert_eq!(kept.tcp[0].phase, TcpPhase::TimeWait as u8);
            prop_assert_eq!(kept.tcp[0].seqhi, 1500);
        }

        #[test]
        fn seq_before_is_antisymmetric(a: u32, b: u32) {
            prop_assume!(a != b && a.wrapping_sub(b) != 1 << 31);
            prop_assert_ne!(seq_before(a, b), seq_before(b, a));
        }
    }
}
