//! The `carp` command line: `run`, `check`, `status`, `maintenance`, `flows`.

use crate::{
    config::{Config, ConfigError},
    control::{self, Request, Response, Status},
    dhcp::{LeaseRow, supervisor::DhcpStatus},
    error::Chain,
    sync::{
        lag::{self, LagHistogram},
        merge::Origin,
        service::FlowRow,
        service::SyncStatus,
    },
};
use carp_common::flow::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};

/// Where the CLI looks for a daemon when it is given neither --socket nor -c.
const SOCKET_DIR: &str = "/run/carp";

#[derive(Debug, Parser)]
#[command(name = "carp", version, about = "CARP virtual IPs for Linux gateways")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (logs to stderr; RUST_LOG sets the level).
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a configuration: exit 0, or 2 with one line per problem.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show every VIP's state, like pfSense's Status > CARP.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Demote this node by 240 (kept across restarts) so the peer takes the VIPs, or undo it.
    Maintenance {
        mode: OnOff,
        #[command(flatten)]
        target: Target,
    },
    /// List the synced connection table, like `conntrack -L` / `pfctl -ss`.
    Flows {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// List Kea's DHCP leases, like pfSense's Status > DHCP Leases.
    Leases {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Follow state changes and sync events as they happen (Ctrl-C to stop).
    Events {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Write the man page and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Configuration sync.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// carp's outbound NAT table (`ip carp`), which outlives the daemon.
    Nat {
        #[command(subcommand)]
        action: NatAction,
    },
    /// Apply the daemon's configuration file again (as SIGHUP does): exit 2 with one line
    /// per problem if it is refused, and the running configuration stays.
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Re-execute the daemon's binary in place (after installing a new one): VIPs, XDP,
    /// connections and sockets are kept; returns once the new run answers.
    Upgrade {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// On the primary: push now; exit non-zero with the secondary's reason if it refuses.
    Push {
        /// Show what the push would change on the secondary, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Overwrite what was changed by hand on the secondary.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: Target,
    },
    /// On the primary: a unified diff per area of what a push would change on the
    /// secondary, read over the link.
    Diff {
        #[command(flatten)]
        target: Target,
    },
    /// On a secondary: apply the version received before the last one again.
    Rollback {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, Subcommand)]
pub enum NatAction {
    /// Remove the table: NATed traffic stops being translated (run in the gateway's namespace).
    Flush,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// Which daemon to talk to.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The daemon's control socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Take the control socket from this configuration.
    #[arg(short, long)]
    config: Option<PathBuf>,
}

/// Exit code for an invalid configuration.
pub const EXIT_INVALID_CONFIG: i32 = 2;

impl Target {
    /// --socket, else the config's control_socket, else the only socket in /run/carp.
    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        if let Some(config) = &self.config {
            return socket_of_config(config);
        }
        let sockets: Vec<PathBuf> = std::fs::read_dir(SOCKET_DIR)
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "sock"))
                    .collect()
            })
            .unwrap_or_default();
        match sockets.as_slice() {
            [one] => Ok(one.clone()),
            [] => anyhow::bail!(
                "no daemon socket in {SOCKET_DIR}: is `carp run` running? (or pass --socket / -c)"
            ),
            many => anyhow::bail!(
                "several daemons in {SOCKET_DIR} ({}): pick one with --socket or -c",
                many.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// The control socket a config names, read leniently (only `[node]`), so the CLI works
/// from any namespace.
fn socket_of_config(path: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let value: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
    let node = value.get("node").and_then(|n| n.as_table());
    if let Some(socket) = node
        .and_then(|n| n.get("control_socket"))
        .and_then(|s| s.as_str())
    {
        return Ok(PathBuf::from(socket));
    }
    let name = node
        .and_then(|n| n.get("name"))
        .and_then(|s| s.as_str())
        .ok_or_else(|| anyhow::anyhow!("{}: node.name is missing", path.display()))?;
    Ok(Config::default_socket(name))
}

/// `carp check`: the process exit code.
pub fn check(path: &Path) -> i32 {
    match Config::load(path) {
        Ok(config) => {
            println!(
                "{}: OK (node {}, {} VIPs)",
                path.display(),
                config.node.name,
                config.vips.len()
            );
            0
        }
        Err(ConfigError::Invalid { problems }) => {
            for problem in problems {
                eprintln!("{}: {problem}", path.display());
            }
            EXIT_INVALID_CONFIG
        }
        Err(e) => {
            eprintln!("{}", Chain(&e));
            EXIT_INVALID_CONFIG
        }
    }
}

/// Sends `request`; an answer that is not ok becomes the error.
fn request(target: &Target, request: &Request) -> anyhow::Result<Response> {
    let socket = target.socket()?;
    let response = control::call(&socket, request)?;
    if response.ok {
        Ok(response)
    } else {
        anyhow::bail!(
            "daemon refused: {}",
            response.error.unwrap_or_else(|| "no reason given".into())
        )
    }
}

/// Sends `request` and returns the status it answers with.
pub fn request_status(target: &Target, req: &Request) -> anyhow::Result<Status> {
    request(target, req)?
        .status
        .ok_or_else(|| anyhow::anyhow!("the daemon answered without a status"))
}

/// `carp reload`: what the daemon did and its status, or the problems that refused the file.
pub fn reload(target: &Target) -> anyhow::Result<Result<(String, Status), Vec<String>>> {
    let socket = target.socket()?;
    let response = control::call(&socket, &Request::Reload)?;
    if let Some(problems) = response.problems {
        return Ok(Err(problems));
    }
    if !response.ok {
        anyhow::bail!(
            "{}",
            response
                .error
                .unwrap_or_else(|| "the daemon refused".into())
        );
    }
    let message = response.message.unwrap_or_default();
    let status = response
        .status
        .ok_or_else(|| anyhow::anyhow!("the daemon answered without a status"))?;
    if message == control::REEXECUTING {
        // [sync] changed: the new run answers once it is up.
        return Ok(Ok((message, wait_for_new_run(target)?)));
    }
    Ok(Ok((message, status)))
}

/// `carp config push` / `diff`: what the secondary said; an error with its reason when it
/// refused.
pub fn config_push(target: &Target, dry_run: bool, force: bool) -> anyhow::Result<String> {
    let response = request(target, &Request::ConfigPush { dry_run, force })?;
    Ok(response.message.unwrap_or_default())
}

/// `carp config rollback`: what the daemon did and its status.
pub fn config_rollback(target: &Target) -> anyhow::Result<(String, Status)> {
    let response = request(target, &Request::ConfigRollback)?;
    let status = response
        .status
        .ok_or_else(|| anyhow::anyhow!("the daemon answered without a status"))?;
    Ok((response.message.unwrap_or_default(), status))
}

/// `carp upgrade`: asks for the re-exec, then waits for the new run's first status.
pub fn upgrade(target: &Target) -> anyhow::Result<Status> {
    request_status(target, &Request::Upgrade)?;
    wait_for_new_run(target)
}

/// After a re-exec: the first status of the new run.
fn wait_for_new_run(target: &Target) -> anyhow::Result<Status> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        // The socket was handed over: this call waits in its queue for the new run.
        match request_status(target, &Request::Status) {
            Ok(status) => return Ok(status),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(e.context("the upgraded daemon did not answer within 15 s"));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// `carp generate-docs DIR`: carp.8 (man page) and completions for bash, zsh and fish,
/// from the CLI's own definition.
pub fn generate_docs(dir: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let command = Cli::command().name("carp");
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section("8")
        .render(&mut page)?;
    std::fs::write(dir.join("carp.8"), page)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut command.clone(), "carp", dir)?;
    }
    Ok(())
}

/// Asks for Kea's leases.
pub fn request_leases(target: &Target) -> anyhow::Result<Vec<LeaseRow>> {
    request(target, &Request::Leases)?
        .leases
        .ok_or_else(|| anyhow::anyhow!("the daemon answered without leases"))
}

/// `carp leases`: a table of address, MAC, hostname, expiry, state and serving node.
pub fn format_leases(leases: &[LeaseRow]) -> String {
    let header = [
        "INTERFACE",
        "ADDRESS",
        "MAC",
        "HOSTNAME",
        "EXPIRES",
        "STATE",
        "SERVER",
    ];
    let rows: Vec<[&str; 7]> = leases
        .iter()
        .map(|l| {
            [
                l.interface.as_str(),
                &l.address,
                &l.mac,
                &l.hostname,
                &l.expires,
                &l.state,
                &l.server,
            ]
        })
        .collect();
    table(&header, &rows)
}

/// Left-aligned columns two spaces apart, as wide as their widest cell.
fn table<const N: usize>(header: &[&str; N], rows: &[[&str; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let parts: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// DHCP in `carp status`: Kea's state here and at the partner, leases per scope.
fn format_dhcp(d: &DhcpStatus) -> String {
    let mut out = format!(
        "dhcp: kea {}{} ({})  {}\n",
        if d.running { "running" } else { "NOT RUNNING" },
        d.pid.map_or_else(String::new, |pid| format!(", pid {pid}")),
        d.role,
        match &d.ha {
            Some(ha) => format!(
                "HA here {}  partner {}  unacked clients {}{}",
                ha.local_state,
                if ha.partner_state.is_empty() {
                    "-"
                } else {
                    &ha.partner_state
                },
                ha.unacked_clients,
                if ha.communication_interrupted {
                    "  (partner not answering)"
                } else {
                    ""
                }
            ),
            None => "HA state unknown".into(),
        }
    );
    for scope in &d.scopes {
        out.push_str(&format!(
            "  {} {}: {} leases\n",
            scope.interface, scope.subnet, scope.leases
        ));
    }
    if let Some(failure) = &d.failure {
        out.push_str(&format!("  failed: {failure}\n"));
    }
    if let Some(maintenance) = &d.maintenance {
        out.push_str(&format!("  last maintenance: {maintenance}\n"));
    }
    out
}

/// Asks for the flow table.
pub fn request_flows(target: &Target) -> anyhow::Result<Vec<FlowRow>> {
    request(target, &Request::Flows)?
        .flows
        .ok_or_else(|| anyhow::anyhow!("the daemon answered without flows"))
}

/// `carp flows`: one line per connection, in conntrack's `-L` shape.
pub fn format_flows(flows: &[FlowRow]) -> String {
    let mut out = String::new();
    for f in flows {
        let name = match f.proto {
            IPPROTO_TCP => "tcp".to_string(),
            IPPROTO_UDP => "udp".to_string(),
            IPPROTO_ICMP => "icmp".to_string(),
            IPPROTO_ICMPV6 => "icmpv6".to_string(),
            n => n.to_string(),
        };
        let origin = match f.origin {
            Origin::Local => "local",
            Origin::Peer => "peer",
        };
        out.push_str(&format!(
            "{name:<6} {:<3} {:<7} {:<11} src={} dst={} sport={} dport={} packets={} bytes={} src={} dst={} sport={} dport={} packets={} bytes={} [{origin}]\n",
            f.proto,
            f.timeout_s,
            f.state,
            f.src,
            f.dst,
            f.sport,
            f.dport,
            f.packets[0],
            f.bytes[0],
            f.reply_src,
            f.reply_dst,
            f.reply_sport,
            f.reply_dport,
            f.packets[1],
            f.bytes[1],
        ));
    }
    out.push_str(&format!("{} flows\n", flows.len()));
    out
}

/// The sync lines under the `carp status` table.
fn format_sync(s: &SyncStatus) -> String {
    format!(
        "sync {} -> {} ({})  peer {}  {}  bulk {}{}\n\
         flows {} held ({} local)  deltas sent {} received {} dropped {} lost-in-xdp {}  \
         deletes waiting for the peer {}  \
         sessions {} refused {}  conntrack created {} updated {} deleted {} errors {}\n{}",
        s.listen,
        s.peer,
        s.interface,
        s.peer_node.as_deref().unwrap_or("?"),
        if s.connected {
            "connected"
        } else {
            "NOT CONNECTED"
        },
        s.bulk,
        if s.demoted {
            "  (demoted until bulk completes)"
        } else {
            ""
        },
        s.flows_held,
        s.flows_local,
        s.deltas_sent,
        s.deltas_received,
        s.deltas_dropped,
        s.deltas_lost_in_xdp,
        s.deletes_waiting,
        s.sessions,
        s.refused,
        s.install.conntrack_created,
        s.install.conntrack_updated,
        s.install.conntrack_deleted,
        s.install.conntrack_errors,
        s.last_error
            .as_ref()
            .map(|e| format!("last error: {e}\n"))
            .unwrap_or_default(),
    ) + &format_lag(s)
        + &format_sync_health(s)
}

/// Where half and 99% of the sync lag fall, by histogram bucket.
fn format_lag(s: &SyncStatus) -> String {
    let bound = |h: &LagHistogram, q: f64| match h.quantile_bound(q) {
        None => "-".to_owned(),
        Some(b) if b.is_infinite() => {
            format!("> {:.0} ms", lag::BOUNDS[lag::BOUNDS.len() - 1] * 1e3)
        }
        Some(b) => format!("<= {} ms", (b * 1e4).round() / 10.0),
    };
    let (send, install) = (&s.send_lag, &s.install.install_lag);
    if send.count() == 0 && install.count() == 0 {
        return String::new();
    }
    format!(
        "lag: to the link p50 {} p99 {}  into conntrack p50 {} p99 {}\n",
        bound(send, 0.5),
        bound(send, 0.99),
        bound(install, 0.5),
        bound(install, 0.99)
    )
}

/// What is wrong with sync's threads or its reach into the kernel, one line each, and
/// configuration sync when it is on.
fn format_sync_health(s: &SyncStatus) -> String {
    let mut out = String::new();
    let c = &s.config;
    if c.role != "off" && !c.role.is_empty() {
        out.push_str(&format!(
            "config sync: {}  {}  here {}  peer {}  last push {}  last answer {}{}\n",
            c.role,
            if c.in_step { "in step" } else { "NOT IN STEP" },
            c.local_hash.as_deref().unwrap_or("-"),
            c.peer_hash.as_deref().unwrap_or("-"),
            c.last_push.as_deref().unwrap_or("-"),
            c.last_result.as_deref().unwrap_or("-"),
            c.last_error
                .as_ref()
                .map(|e| format!("\n  last error: {}", e.replace('\n', "\n    ")))
                .unwrap_or_default()
        ));
        if let Some(failure) = &c.reload_after_failure {
            out.push_str(&format!("  {failure}\n"));
        }
    }
    if !s.conntrack {
        out.push_str("conntrack NOT AVAILABLE: synced flows reach XDP only, not the kernel\n");
    }
    for w in s.workers.iter().filter(|w| !w.alive || w.panics > 0) {
        out.push_str(&format!(
            "thread {}: {}, {} panics{}\n",
            w.name,
            if w.alive { "running" } else { "DEAD" },
            w.panics,
            w.last_panic
                .as_ref()
                .map(|p| format!(" (last: {p})"))
                .unwrap_or_default()
        ));
    }
    out
}

/// The `carp status` table.
pub fn format_status(status: &Status) -> String {
    let mut out = format!(
        "node {}  maintenance {}  demotion {}{}\n",
        status.node,
        if status.maintenance { "ON" } else { "off" },
        status.demotion,
        if status.stopping {
            "  STOPPING (handing the VIPs over)"
        } else {
            ""
        }
    );
    let header = [
        "INTERFACE",
        "VHID",
        "VIP",
        "STATE",
        "ADVBASE",
        "ADVSKEW",
        "DEMOTION",
        "SINCE",
    ];
    let rows: Vec<[String; 8]> = status
        .vips
        .iter()
        .map(|v| {
            [
                v.interface.clone(),
                v.vhid.to_string(),
                v.address.clone(),
                v.state.to_string(),
                v.advbase.to_string(),
                v.advskew.to_string(),
                v.demotion.to_string(),
                v.since.clone(),
            ]
        })
        .collect();
    let cells: Vec<[&str; 8]> = rows
        .iter()
        .map(|r| r.each_ref().map(String::as_str))
        .collect();
    out.push_str(&table(&header, &cells));
    if let Some(sync) = &status.sync {
        out.push_str(&format_sync(sync));
    }
    if let Some(dhcp) = &status.dhcp {
        out.push_str(&format_dhcp(dhcp));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        carp::fsm::State,
        control::{Counters, VipStatus},
    };

    #[test]
    fn sync_lag_shows_as_bucket_bounds() {
        let mut s = SyncStatus::default();
        assert_eq!(format_lag(&s), "", "nothing counted, nothing shown");
        for ms in [0.3, 0.4, 40.0] {
            s.send_lag
                .observe(std::time::Duration::from_secs_f64(ms / 1e3));
        }
        s.install
            .install_lag
            .observe(std::time::Duration::from_secs(9));
        assert_eq!(
            format_lag(&s),
            "lag: to the link p50 <= 0.5 ms p99 <= 50 ms  into conntrack p50 > 5000 ms p99 > 5000 ms\n"
        );
    }

    #[test]
    fn dhcp_line_names_keas_pid_when_known() {
        let mut d = DhcpStatus {
            role: "primary".into(),
            running: true,
            pid: Some(4242),
            ..DhcpStatus::default()
        };
        assert!(
            format_dhcp(&d).starts_with("dhcp: kea running, pid 4242 (primary)"),
            "{}",
            format_dhcp(&d)
        );
        d.pid = None;
        assert!(format_dhcp(&d).starts_with("dhcp: kea running (primary)"));
    }

    #[test]
    fn status_table_has_a_row_per_vip() {
        let status = Status {
            node: "gw1".into(),
            maintenance: true,
            demotion: 240,
            vips: vec![VipStatus {
                interface: "lan".into(),
                vhid: 1,
                address: "198.18.1.1/24".into(),
                state: State::Backup,
                advbase: 1,
                advskew: 0,
                effective_advskew: 240,
                demotion: 240,
                since: "2026-11-23T16:00:00Z".into(),
                mac: "00:00:5e:00:01:01".into(),
                transitions: 0,
            }],
            counters: Counters::default(),
            sync: None,
            dhcp: None,
            demotion_by_source: Default::default(),
            stopping: false,
        };
        let table = format_status(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "node gw1  maintenance ON  demotion 240");
        let stopping = format_status(&Status {
            stopping: true,
            ..status.clone()
        });
        assert_eq!(
            stopping.lines().next(),
            Some("node gw1  maintenance ON  demotion 240  STOPPING (handing the VIPs over)")
        );
        assert!(lines[1].starts_with("INTERFACE  VHID  VIP"));
        assert_eq!(
            lines[2],
            "lan        1     198.18.1.1/24  BACKUP  1        0        240       2026-11-23T16:00:00Z"
        );
    }

    #[test]
    fn socket_comes_from_config_name_or_control_socket() {
        let dir = std::env::temp_dir().join(format!("carp-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[node]\nname = \"gw9\"\n").unwrap();
        assert_eq!(
            socket_of_config(&file).unwrap(),
            PathBuf::from("/run/carp/gw9.sock")
        );
        std::fs::write(
            &file,
            "[node]\nname = \"gw9\"\ncontrol_socket = \"/tmp/x.sock\"\n",
        )
        .unwrap();
        assert_eq!(
            socket_of_config(&file).unwrap(),
            PathBuf::from("/tmp/x.sock")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
