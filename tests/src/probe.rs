//! Runs `carp-probe` in a lab host and reads its report: ARP requests and the replies each
//! one got, with timestamps.

use crate::{Host, Lab};
use anyhow::{Result, bail};
use std::path::Path;

/// One ARP request and the replies that came before the next request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub sent_us: u128,
    /// (when, replying MAC)
    pub replies: Vec<(u128, String)>,
}

/// Parses `carp-probe arp` output.
pub fn parse(report: &str) -> Vec<Exchange> {
    let mut out: Vec<Exchange> = Vec::new();
    for line in report.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["req", t] => out.push(Exchange {
                sent_us: t.parse().unwrap_or(0),
                replies: Vec::new(),
            }),
            ["reply", t, mac] => {
                if let Some(last) = out.last_mut() {
                    last.replies
                        .push((t.parse().unwrap_or(0), (*mac).to_owned()));
                }
            }
            _ => {}
        }
    }
    out
}

impl Lab {
    /// Probes `target` from `host`'s `iface` every `interval_ms` for `duration_ms`, blocking.
    pub fn arp_probe(
        &self,
        probe_bin: &Path,
        host: Host,
        iface: &str,
        target: &str,
        interval_ms: u32,
        duration_ms: u32,
    ) -> Result<Vec<Exchange>> {
        let bin = probe_bin.to_string_lossy().into_owned();
        let out = self.output(
            host,
            &[
                &bin,
                "arp",
                iface,
                target,
                &interval_ms.to_string(),
                &duration_ms.to_string(),
            ],
        )?;
        if !out.status.success() {
            bail!(
                "carp-probe failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(parse(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Starts a probe in the background writing its report to `log`; returns its pid.
    pub fn arp_probe_background(
        &self,
        probe_bin: &Path,
        host: Host,
        iface: &str,
        target: &str,
        interval_ms: u32,
        duration_ms: u32,
        log: &Path,
    ) -> Result<u32> {
        let bin = probe_bin.to_string_lossy().into_owned();
        self.spawn(
            host,
            &[
                &bin,
                "arp",
                iface,
                target,
                &interval_ms.to_string(),
                &duration_ms.to_string(),
            ],
            log,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_belong_to_the_request_before_them() {
        let report = "req 1\nreply 2 aa\nreq 3\nreq 4\nreply 5 bb\nreply 6 cc\n";
        let got = parse(report);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].replies, vec![(2, "aa".to_owned())]);
        assert!(got[1].replies.is_empty());
        assert_eq!(got[2].replies.len(), 2);
    }
}
