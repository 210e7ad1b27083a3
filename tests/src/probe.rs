//! Runs `carp-probe` in a lab host and reads its report: ARP requests and the replies each
//! one got, with timestamps.

use crate::{Host, Lab, probe_bin};
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

/// An ARP probe: which host asks, out of which interface, for what, how often, how long.
#[derive(Debug, Clone, Copy)]
pub struct ArpProbe<'a> {
    pub host: Host,
    pub iface: &'a str,
    pub target: &'a str,
    pub interval_ms: u32,
    pub duration_ms: u32,
}

impl ArpProbe<'_> {
    /// A probe from the LAN client for `target`.
    pub fn from_client(target: &str, interval_ms: u32, duration_ms: u32) -> ArpProbe<'_> {
        ArpProbe {
            host: Host::Client,
            iface: "eth0",
            target,
            interval_ms,
            duration_ms,
        }
    }

    fn command(&self) -> Result<Vec<String>> {
        Ok(vec![
            probe_bin()?.to_string_lossy().into_owned(),
            "arp".into(),
            self.iface.into(),
            self.target.into(),
            self.interval_ms.to_string(),
            self.duration_ms.to_string(),
        ])
    }
}

impl Lab {
    /// Runs `probe` to its end and returns what it saw.
    pub fn arp_probe(&self, probe: &ArpProbe) -> Result<Vec<Exchange>> {
        let command = probe.command()?;
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        let out = self.output(probe.host, &args)?;
        if !out.status.success() {
            bail!(
                "carp-probe failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(parse(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Starts `probe` in the background writing its report to `log`; returns its pid.
    pub fn arp_probe_background(&self, probe: &ArpProbe, log: &Path) -> Result<u32> {
        let command = probe.command()?;
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        self.spawn(probe.host, &args, log)
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
