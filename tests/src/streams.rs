//! Long-lived connections through the gateways for the state-sync tests: the WAN server
//! pushes data to dozens of LAN client connections (and echoes a UDP flow), and the report
//! tells which connections were still receiving at the end.

use crate::{Host, Lab, SERVER_IP, traffic_bin, wait_exit};
use anyhow::{Context, Result};
use std::{fs, path::PathBuf, time::Duration};

/// The server's port.
pub const PORT: u16 = 5001;

/// One TCP connection's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    pub bytes: u64,
    pub last_rx_us: u128,
    /// `-` when the connection was never reset or closed.
    pub error: String,
}

/// The client's report.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub tcp: Vec<Stream>,
    pub udp_sent: u64,
    pub udp_received: u64,
    pub udp_last_rx_us: u128,
    /// When the client was started and when it was due to stop (unix µs).
    pub started_us: u128,
    pub ends_us: u128,
}

/// Starts the pushing server in the WAN server's namespace; returns its pid.
pub fn start_server(lab: &Lab) -> Result<u32> {
    let bin = traffic_bin()?.to_string_lossy().into_owned();
    let log = lab.dir.join("traffic-server.log");
    let pid = lab.spawn(
        Host::Server,
        &[&bin, "serve", &format!("0.0.0.0:{PORT}")],
        &log,
    )?;
    std::thread::sleep(Duration::from_millis(200));
    Ok(pid)
}

/// A running client.
pub struct Client {
    pid: u32,
    log: PathBuf,
    seconds: u64,
    started_us: u128,
}

/// Opens `conns` connections from the LAN client for `seconds`.
pub fn start_client(lab: &Lab, conns: usize, seconds: u64) -> Result<Client> {
    start(lab, conns, seconds, None)
}

/// Opens `conns` connections from the LAN client's ports `first_port..` for `seconds`; they
/// end with a reset, so the next such client reuses their tuples at once.
pub fn start_client_from(lab: &Lab, conns: usize, seconds: u64, first_port: u16) -> Result<Client> {
    start(lab, conns, seconds, Some(first_port))
}

fn start(lab: &Lab, conns: usize, seconds: u64, first_port: Option<u16>) -> Result<Client> {
    let bin = traffic_bin()?.to_string_lossy().into_owned();
    let log = lab
        .dir
        .join(format!("traffic-client-{}.log", crate::unix_us()));
    let started_us = crate::unix_us();
    let mut args = vec![
        bin,
        "streams".into(),
        format!("{SERVER_IP}:{PORT}"),
        conns.to_string(),
        seconds.to_string(),
    ];
    args.extend(first_port.map(|p| p.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let pid = lab.spawn(Host::Client, &args, &log)?;
    Ok(Client {
        pid,
        log,
        seconds,
        started_us,
    })
}

impl Client {
    /// Waits for the client to finish and parses its report.
    pub fn finish(self) -> Result<Report> {
        anyhow::ensure!(
            wait_exit(self.pid, Duration::from_secs(self.seconds + 20)),
            "the traffic client did not finish"
        );
        let text = fs::read_to_string(&self.log)?;
        let mut report = parse(&text).with_context(|| format!("traffic client report:\n{text}"))?;
        report.started_us = self.started_us;
        report.ends_us = self.started_us + u128::from(self.seconds) * 1_000_000;
        Ok(report)
    }
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

/// Parses the `carp-traffic streams` report.
pub fn parse(text: &str) -> Result<Report> {
    let mut report = Report::default();
    for line in text.lines() {
        if line.starts_with("tcp ") {
            report.tcp.push(Stream {
                bytes: field(line, "bytes").context("bytes")?.parse()?,
                last_rx_us: field(line, "last_rx_us").context("last_rx_us")?.parse()?,
                error: field(line, "error").context("error")?.to_string(),
            });
        } else if line.starts_with("udp ") {
            report.udp_sent = field(line, "sent").context("sent")?.parse()?;
            report.udp_received = field(line, "received").context("received")?.parse()?;
            report.udp_last_rx_us = field(line, "last_rx_us").context("last_rx_us")?.parse()?;
        }
    }
    anyhow::ensure!(!report.tcp.is_empty(), "no connections in the report");
    Ok(report)
}

impl Report {
    /// Connections that were reset/closed, or received nothing after `after_us`.
    pub fn broken_after(&self, after_us: u128) -> Vec<(usize, &Stream)> {
        self.tcp
            .iter()
            .enumerate()
            .filter(|(_, s)| s.error != "-" || s.last_rx_us <= after_us)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_parse_and_tell_broken_streams() {
        let r = parse(
            "tcp 0 bytes=10 last_rx_us=500 error=-\n\
             tcp 1 bytes=5 last_rx_us=90 error=-\n\
             tcp 2 bytes=9 last_rx_us=600 error=connection_reset\n\
             udp sent=100 received=90 last_rx_us=700\n",
        )
        .unwrap();
        assert_eq!(r.udp_received, 90);
        let broken: Vec<usize> = r.broken_after(100).into_iter().map(|(i, _)| i).collect();
        assert_eq!(broken, [1, 2]);
    }
}
