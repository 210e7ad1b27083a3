//! Pings through the lab in the background (`ping -D -O`) and reads what got lost.

use crate::{Host, Lab};
use anyhow::Result;
use std::path::Path;

/// What a ping run saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PingReport {
    pub sent: u64,
    pub received: u64,
    /// The longest time between two consecutive replies, in seconds.
    pub longest_gap_s: f64,
}

impl PingReport {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }
}

/// Parses `ping -D -O` output: `[unix.frac] 64 bytes from ...: icmp_seq=N ...` per reply.
pub fn parse(output: &str) -> PingReport {
    let mut replies: Vec<(u64, f64)> = Vec::new();
    let mut highest_seq = 0;
    for line in output.lines() {
        let seq = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("icmp_seq="))
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(seq) = seq {
            highest_seq = highest_seq.max(seq);
            let stamp = line
                .strip_prefix('[')
                .and_then(|l| l.split(']').next())
                .and_then(|t| t.parse::<f64>().ok());
            if let (Some(t), true) = (stamp, line.contains("bytes from")) {
                replies.push((seq, t));
            }
        }
    }
    let longest_gap_s = replies
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .fold(0.0, f64::max);
    PingReport {
        sent: highest_seq,
        received: replies.len() as u64,
        longest_gap_s,
    }
}

impl Lab {
    /// Starts `count` pings from `host` to `target` every `interval_s`; returns the pid.
    pub fn ping_background(
        &self,
        host: Host,
        target: &str,
        interval_s: f64,
        count: u32,
        log: &Path,
    ) -> Result<u32> {
        self.spawn(
            host,
            &[
                "ping",
                "-D",
                "-O",
                "-n",
                "-W",
                "1",
                "-i",
                &interval_s.to_string(),
                "-c",
                &count.to_string(),
                target,
            ],
            log,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_losses_and_the_longest_gap() {
        let out = "PING 198.18.2.100 (198.18.2.100) 56(84) bytes of data.\n\
[100.000] 64 bytes from 198.18.2.100: icmp_seq=1 ttl=63 time=0.1 ms\n\
[100.010] 64 bytes from 198.18.2.100: icmp_seq=2 ttl=63 time=0.1 ms\n\
[100.030] no answer yet for icmp_seq=3\n\
[100.040] 64 bytes from 198.18.2.100: icmp_seq=4 ttl=63 time=0.1 ms\n";
        let r = parse(out);
        assert_eq!((r.sent, r.received, r.lost()), (4, 3, 1));
        assert!((r.longest_gap_s - 0.030).abs() < 1e-9);
    }
}
