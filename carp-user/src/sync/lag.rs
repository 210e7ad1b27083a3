//! How long synced flows wait, as histograms for `carp status` and the metrics: on the
//! sending node, from reading a change off XDP's ring to having it on the sync link; on the
//! receiving node, from a frame's arrival to its flows being in conntrack and the XDP map.
//! Each is measured on one node's clock; the link's own delay is between the two.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Bucket upper bounds in seconds (Prometheus's `le`); one more bucket counts the rest.
pub const BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Waits counted by bucket (not cumulative), with their sum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagHistogram {
    /// One count per bound in [`BOUNDS`], then the waits above the last.
    pub counts: Vec<u64>,
    pub sum_ns: u64,
}

impl LagHistogram {
    pub fn observe(&mut self, wait: Duration) {
        if self.counts.len() != BOUNDS.len() + 1 {
            self.counts = vec![0; BOUNDS.len() + 1];
        }
        let seconds = wait.as_secs_f64();
        let bucket = BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BOUNDS.len());
        self.counts[bucket] += 1;
        self.sum_ns = self
            .sum_ns
            .saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The bound of the bucket that holds the `q` quantile (infinite past the last bound);
    /// `None` before anything was counted.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let wanted = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        self.buckets().into_iter().find_map(|(bound, n)| {
            seen += n;
            (seen >= wanted).then_some(bound)
        })
    }

    /// (upper bound, count in that bucket), the last bound infinite: Prometheus's classic
    /// buckets.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts.iter().copied().chain(std::iter::repeat(0)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_land_in_the_first_bucket_that_holds_them() {
        let mut h = LagHistogram::default();
        assert_eq!(h.count(), 0);
        assert_eq!(
            h.buckets().len(),
            BOUNDS.len() + 1,
            "empty, still every bucket"
        );
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(9));
        let b = h.buckets();
        assert_eq!(b[0], (0.0005, 1));
        assert_eq!(b[1], (0.001, 1), "a bound holds its own value");
        assert_eq!(b[6], (0.05, 1));
        assert_eq!(b[12], (f64::INFINITY, 1));
        assert_eq!(h.count(), 4);
        assert_eq!(h.quantile_bound(0.5), Some(0.001));
        assert_eq!(h.quantile_bound(0.99), Some(f64::INFINITY));
        assert_eq!(LagHistogram::default().quantile_bound(0.5), None);
        assert_eq!(h.sum_ns, 9_031_300_000);
    }
}
