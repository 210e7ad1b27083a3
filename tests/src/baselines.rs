//! The peers carp is measured against, run in the lab: ucarp and keepalived (VRRP), each with
//! an up-script or config that puts the VIP on the LAN interface as their users do.

use crate::{Host, LAN_VIP, Lab};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// A started baseline daemon: the pids we started and how to tell if it holds the VIP.
pub struct Baseline {
    pub host: Host,
    pub pids: Vec<u32>,
    pub pid_files: Vec<PathBuf>,
    /// ucarp's up/down scripts write MASTER or BACKUP here.
    pub state_file: Option<PathBuf>,
}

impl Baseline {
    /// What the up/down scripts last recorded (`MASTER`, `BACKUP`), or "" before either ran.
    pub fn recorded_state(&self) -> String {
        self.state_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// The pids to kill for a crash, children first: the children recorded in pid files
    /// (keepalived's VRRP process), then the ones we started. Killing keepalived's parent
    /// first would hand its child a SIGTERM (parent-death signal) and a graceful priority-0
    /// exit, which is not a crash.
    pub fn crash_order_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .pid_files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok()?.trim().parse().ok())
            .collect();
        pids.extend(
            self.pids
                .iter()
                .filter(|p| !pids.contains(p))
                .collect::<Vec<_>>(),
        );
        pids
    }
}

impl Lab {
    /// Whether `host` has the LAN VIP on its `lan` interface.
    pub fn holds_lan_vip(&self, host: Host) -> bool {
        self.sh(host, "ip -4 addr show dev lan")
            .is_ok_and(|out| out.contains(&format!("{LAN_VIP}/")))
    }

    /// ucarp on `host`'s LAN for vhid 1, preempting, with the lab passphrase. Its up/down
    /// scripts move the VIP, as ucarp's users do, and record the state.
    pub fn start_ucarp(&self, host: Host, advskew: u8) -> Result<Baseline> {
        let tag = format!("{host:?}").to_lowercase();
        let up = self.dir.join(format!("ucarp-up-{tag}.sh"));
        let down = self.dir.join(format!("ucarp-down-{tag}.sh"));
        let state = self.dir.join(format!("ucarp-{tag}.state"));
        let _ = std::fs::remove_file(&state);
        let script = |op: &str, recorded: &str| {
            format!(
                "#!/bin/sh\nip addr {op} \"$2\"/24 dev \"$1\"\necho {recorded} > {}\n",
                state.display()
            )
        };
        std::fs::write(&up, script("add", "MASTER"))?;
        std::fs::write(&down, script("del", "BACKUP"))?;
        for script in [&up, &down] {
            std::process::Command::new("chmod")
                .arg("+x")
                .arg(script)
                .status()?;
        }
        let src = format!("198.18.1.{}", if host == Host::Gw1 { 2 } else { 3 });
        let pid = self.spawn(
            host,
            &[
                "ucarp",
                "-i",
                "lan",
                "-s",
                &src,
                "-v",
                "1",
                "-p",
                "labsecret",
                "-a",
                LAN_VIP,
                "-b",
                "1",
                "-k",
                &advskew.to_string(),
                "-P",
                "-u",
                &up.to_string_lossy(),
                "-d",
                &down.to_string_lossy(),
            ],
            &self.dir.join(format!("ucarp-{tag}.log")),
        )?;
        Ok(Baseline {
            host,
            pids: vec![pid],
            pid_files: vec![],
            state_file: Some(state),
        })
    }

    /// keepalived (VRRP only) on `host`'s LAN, advert_int 1, the LAN VIP.
    pub fn start_keepalived(&self, host: Host, priority: u8) -> Result<Baseline> {
        let tag = format!("{host:?}").to_lowercase();
        let conf = self.dir.join(format!("keepalived-{tag}.conf"));
        std::fs::write(
            &conf,
            format!(
                "global_defs {{\n  router_id {tag}\n  vrrp_garp_master_delay 0\n}}\n\
                 vrrp_instance lab {{\n  state BACKUP\n  interface lan\n  virtual_router_id 1\n  \
                 priority {priority}\n  advert_int 1\n  virtual_ipaddress {{\n    {LAN_VIP}/24 dev lan\n  }}\n}}\n"
            ),
        )?;
        let pid_file = |what: &str| self.dir.join(format!("keepalived-{tag}-{what}.pid"));
        let (main, vrrp) = (pid_file("main"), pid_file("vrrp"));
        let pid = self.spawn(
            host,
            &[
                "keepalived",
                "--dont-fork",
                "--log-console",
                "--vrrp",
                &format!("--use-file={}", conf.display()),
                &format!("--pid={}", main.display()),
                &format!("--vrrp_pid={}", vrrp.display()),
                &format!("--checkers_pid={}", pid_file("checkers").display()),
            ],
            &self.dir.join(format!("keepalived-{tag}.log")),
        )?;
        Ok(Baseline {
            host,
            pids: vec![pid],
            pid_files: vec![vrrp],
            state_file: None,
        })
    }
}

/// A conntrackd started by [`Lab::start_conntrackd`]: its config, for `conntrackd -C` commands.
pub struct Conntrackd {
    pub host: Host,
    pub config: PathBuf,
}

impl Lab {
    /// conntrackd (FTFW, the reliable mode) on `host`, syncing over the dedicated sync link to
    /// the other gateway, as conntrack-tools' own example config sets it up (its own sync
    /// traffic ignored). External cache on:
    /// states from the peer wait there until `conntrackd -c` commits them to the kernel.
    pub fn start_conntrackd(&self, host: Host) -> Result<Conntrackd> {
        self.start_conntrackd_with(host, true)
    }

    /// [`Lab::start_conntrackd`]; without `external_cache` (`DisableExternalCache`) states
    /// from the peer go straight into the kernel, as carp's do.
    pub fn start_conntrackd_with(&self, host: Host, external_cache: bool) -> Result<Conntrackd> {
        let (me, peer) = crate::sync_addresses(host);
        let mode = if external_cache {
            ""
        } else {
            "    DisableExternalCache on\n  "
        };
        let tag = format!("{host:?}").to_lowercase();
        let file = |ext: &str| self.dir.join(format!("conntrackd-{tag}.{ext}"));
        let config = file("conf");
        std::fs::write(
            &config,
            format!(
                "Sync {{\n  Mode FTFW {{\n  {mode}}}\n  UDP {{\n    IPv4_address {me}\n    \
                 IPv4_Destination_Address {peer}\n    Port 3780\n    Interface sync\n    \
                 Checksum on\n  }}\n}}\n\
                 General {{\n  HashSize 65536\n  HashLimit 524288\n  LogFile {log}\n  \
                 LockFile {lock}\n  UNIX {{\n    Path {ctl}\n  }}\n  NetlinkBufferSize 2097152\n  \
                 NetlinkBufferSizeMaxGrowth 67108864\n  NetlinkOverrunResync on\n  \
                 Filter From Userspace {{\n    Address Ignore {{\n      IPv4_address 127.0.0.1\n      \
                 IPv4_address {me}\n      IPv4_address {peer}\n    }}\n  }}\n}}\n",
                log = file("log").display(),
                lock = file("lock").display(),
                ctl = file("ctl").display(),
            ),
        )?;
        let config_arg = config.display().to_string();
        self.spawn(host, &["conntrackd", "-C", &config_arg], &file("out"))?;
        let daemon = Conntrackd { host, config };
        crate::wait_for(std::time::Duration::from_secs(10), || {
            self.conntrackd(&daemon, &["-s", "cache"]).ok()
        })
        .with_context(|| format!("conntrackd on {host:?} did not come up"))?;
        Ok(daemon)
    }

    /// Runs `conntrackd -C <its config> args` in its namespace; its output.
    pub fn conntrackd(&self, daemon: &Conntrackd, args: &[&str]) -> Result<String> {
        let config = daemon.config.display().to_string();
        let mut full = vec!["conntrackd", "-C", &config];
        full.extend_from_slice(args);
        let out = self.output(daemon.host, &full)?;
        anyhow::ensure!(
            out.status.success(),
            "conntrackd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The objects in a conntrackd's `cache`: "internal" (its own kernel's states) or
    /// "external" (the states its peer sent).
    pub fn conntrackd_cache(&self, daemon: &Conntrackd, cache: &str) -> Result<u64> {
        let stats = self.conntrackd(daemon, &["-s", "cache"])?;
        let label = format!("cache:{cache}");
        stats
            .lines()
            .find(|l| l.starts_with(&label))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .with_context(|| format!("no {label} line in conntrackd -s cache"))
    }
}
