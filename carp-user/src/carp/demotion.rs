//! Node-wide demotion, pfSense's way: 240 for each CARP interface without link, for advert
//! send errors, for maintenance mode and while the first bulk sync is missing, added to every
//! vhid's skew so that all VIPs move together. Sans-IO; the daemon feeds it.

use super::fsm::DEMOTION_STEP;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Consecutive send errors that demote a vhid, and successes that undo it (FreeBSD's
/// `CARP_SENDAD_MAX_ERRORS` and `CARP_SENDAD_MIN_SUCCESS`).
pub const SEND_ERROR_LIMIT: u32 = 3;

/// What demotes the node right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sources {
    /// Distinct CARP interfaces without link.
    pub links_down: u32,
    /// Some vhid's adverts fail to go out.
    pub send_errors: bool,
    pub maintenance: bool,
    /// State sync is on and the first bulk update is not in.
    pub unsynced: bool,
}

impl Sources {
    /// The demotion added to every vhid's advskew.
    pub fn total(&self) -> u32 {
        self.by_source().iter().map(|(_, d)| d).sum()
    }

    /// Each source's part of the demotion (metrics, `carp status --json`).
    pub fn by_source(&self) -> [(&'static str, u32); 4] {
        [
            ("links_down", DEMOTION_STEP * self.links_down),
            ("send_errors", DEMOTION_STEP * u32::from(self.send_errors)),
            ("maintenance", DEMOTION_STEP * u32::from(self.maintenance)),
            ("unsynced", DEMOTION_STEP * u32::from(self.unsynced)),
        ]
    }
}

/// The CARP interfaces without link, each counted once however many VIPs it carries and
/// wherever those VIPs stand in the config.
pub fn links_down(vhids: impl IntoIterator<Item = (u32, bool)>) -> u32 {
    let mut down: Vec<u32> = vhids
        .into_iter()
        .filter(|(_, up)| !up)
        .map(|(ifindex, _)| ifindex)
        .collect();
    down.sort_unstable();
    down.dedup();
    down.len() as u32
}

/// One vhid's advert send record. FreeBSD counts successes only from adverts, which a backup
/// does not send: a node demoted for send errors that lost its VIPs stayed demoted for good.
/// So while demoted and not advertising, the send path is probed every advert interval
/// instead (a frame that reaches nobody), and its results count as adverts would.
#[derive(Debug, Clone, Default)]
pub struct SendHealth {
    errors_in_a_row: u32,
    ok_in_a_row: u32,
    demoted: bool,
    last_probe: Option<Instant>,
}

impl SendHealth {
    /// Whether this vhid's send errors demote the node.
    pub fn demoted(&self) -> bool {
        self.demoted
    }

    /// The outcome of one advert or probe sent for `vhid`.
    pub fn record(&mut self, vhid: u8, sent: bool) {
        if sent {
            self.errors_in_a_row = 0;
            self.ok_in_a_row += 1;
            if self.demoted && self.ok_in_a_row >= SEND_ERROR_LIMIT {
                info!(vhid, "frames go out again: send-error demotion removed");
                self.demoted = false;
            }
        } else {
            self.ok_in_a_row = 0;
            self.errors_in_a_row += 1;
            if !self.demoted && self.errors_in_a_row >= SEND_ERROR_LIMIT {
                warn!(
                    vhid,
                    "{SEND_ERROR_LIMIT} advert send errors in a row: demoting by {DEMOTION_STEP}"
                );
                self.demoted = true;
            }
        }
    }

    /// Whether to probe the send path now: demoted, sending no adverts (not master), and
    /// the last probe at least `interval` ago.
    pub fn probe_due(&mut self, advertising: bool, interval: Duration, now: Instant) -> bool {
        if !self.demoted || advertising {
            self.last_probe = None;
            return false;
        }
        let due = self
            .last_probe
            .is_none_or(|last| now.duration_since(last) >= interval);
        if due {
            self.last_probe = Some(now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_is_counted_once_wherever_its_vips_stand() {
        // lan (2) carries vhids 1 and 3, wan (3) vhid 2: lan's VIPs are not adjacent.
        let vhids = [(2, false), (3, true), (2, false)];
        assert_eq!(links_down(vhids), 1);
        let sources = Sources {
            links_down: links_down(vhids),
            ..Sources::default()
        };
        assert_eq!(sources.total(), 240, "not 480");
        assert_eq!(links_down([(2, false), (3, false), (2, false)]), 2);
        assert_eq!(links_down([(2, true), (3, true)]), 0);
    }

    #[test]
    fn every_source_adds_one_step() {
        let all = Sources {
            links_down: 2,
            send_errors: true,
            maintenance: true,
            unsynced: true,
        };
        assert_eq!(all.total(), 5 * 240);
        assert_eq!(Sources::default().total(), 0);
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn three_errors_demote_and_three_successes_heal() {
        let mut health = SendHealth::default();
        health.record(1, false);
        health.record(1, false);
        health.record(1, true);
        health.record(1, false);
        health.record(1, false);
        assert!(!health.demoted(), "errors must come in a row");
        health.record(1, false);
        assert!(health.demoted());
        health.record(1, true);
        health.record(1, true);
        assert!(health.demoted());
        health.record(1, true);
        assert!(!health.demoted());
    }

    #[test]
    fn a_demoted_backup_probes_each_interval_and_heals_without_adverts() {
        let t0 = Instant::now();
        let interval = ms(1000);
        let mut health = SendHealth::default();
        assert!(
            !health.probe_due(false, interval, t0),
            "not demoted: no probe"
        );
        for _ in 0..SEND_ERROR_LIMIT {
            health.record(1, false);
        }
        assert!(health.demoted());
        assert!(
            !health.probe_due(true, interval, t0),
            "a master's adverts count"
        );
        // Now a backup: the queue is still broken for the first probe.
        assert!(health.probe_due(false, interval, t0));
        health.record(1, false);
        assert!(!health.probe_due(false, interval, t0 + ms(999)));
        let mut at = t0 + interval;
        let mut probes = 0;
        while health.demoted() {
            assert!(health.probe_due(false, interval, at), "due at {probes}");
            health.record(1, true);
            probes += 1;
            at += interval;
        }
        assert_eq!(probes, SEND_ERROR_LIMIT, "healed after three good probes");
        assert!(
            !health.probe_due(false, interval, at),
            "healed: no more probes"
        );
    }
}
