//! How a run ends: a planned stop hands the VIPs over before it lets go and cleans up after
//! itself; `carp upgrade` re-executes the binary, which adopts what this run held.

use super::{Daemon, DaemonError, vip_io::INSTALL_BARRIER};
use crate::{carp::fsm::State, control::Request, dhcp, error::Chain, inherit, nft};
use std::{
    os::fd::{BorrowedFd, RawFd},
    time::{Duration, Instant},
};
use tracing::{info, warn};

/// Longest a stopping master keeps its VIPs waiting for the peer to take over from its
/// bow-out; on a LAN the peer's advert comes back within milliseconds. Alone, a node stops
/// this much later (with state sync, plus [`INSTALL_BARRIER`]: the peer advertises once it
/// holds the VIPs, which it claims once our flows are in its kernel).
const HANDOVER_GRACE: Duration = Duration::from_millis(500);

/// The answer to a change asked of a daemon in its hand-over window.
pub(super) const STOPPING: &str =
    "carp is stopping (handing its VIPs over to the peer): nothing can be changed now";

impl Daemon {
    /// `carp upgrade`: hands the listening sockets over (the sync one only if
    /// `keep_sync_listener`) and re-executes the binary, leaving VIPs, XDP and maps as they
    /// are; the new run adopts them (its heartbeat is fresh). Returns only if the exec failed.
    pub(super) async fn reexec(
        mut self,
        control_fd: RawFd,
        keep_sync_listener: bool,
    ) -> DaemonError {
        // The connection task writes the answer to `carp upgrade` meanwhile.
        tokio::time::sleep(Duration::from_millis(50)).await;
        // SAFETY: the control task owns this listener and runs until the exec.
        let control = unsafe { BorrowedFd::borrow_raw(control_fd) };
        let handed = inherit::hand_over(control).and_then(|control| {
            let sync = self
                .sync
                .as_ref()
                .filter(|_| keep_sync_listener)
                .map(|s| inherit::hand_over(s.listener()))
                .transpose()?;
            Ok((control, sync))
        });
        let (control, sync) = match handed {
            Ok(sockets) => sockets,
            Err(source) => return DaemonError::Upgrade { source },
        };
        if let Some(sync) = self.sync.take() {
            sync.stop();
        }
        self.refresh_heartbeat();
        info!("re-executing in place: the new run adopts the VIPs");
        let mut sockets = vec![(inherit::CONTROL, &control)];
        if let Some(sync) = &sync {
            sockets.push((inherit::SYNC, sync));
        }
        DaemonError::Upgrade {
            source: inherit::exec_self(&sockets),
        }
    }

    /// The first step of a planned stop, make before break: every master bows out and keeps
    /// its VIPs until the peer's advert shows it took over, so no packet meets a gateway that
    /// has let go of the VIP while the peer has not yet claimed it. True when there is
    /// nothing to wait for: no master, or a second signal.
    pub(super) fn hand_over(&mut self, now: Instant) -> bool {
        if self.stopping.is_some() {
            return true;
        }
        let grace = match self.sync {
            Some(_) => HANDOVER_GRACE + INSTALL_BARRIER,
            None => HANDOVER_GRACE,
        };
        self.stopping = Some(now + grace);
        for v in &mut self.vhids {
            v.fsm.handle_bow_out(now);
        }
        self.handed_over(now)
    }

    /// Whether `request` must be refused because the daemon is stopping: a reload, rollback,
    /// maintenance switch or configuration push would change a node on its way out, and an
    /// upgrade would re-execute it into a daemon that runs on as if never told to stop.
    pub(super) fn refuses_while_stopping(&self, request: &Request) -> bool {
        self.stopping.is_some()
            && matches!(
                request,
                Request::Reload
                    | Request::Upgrade
                    | Request::ConfigRollback
                    | Request::ConfigPush { .. }
                    | Request::Maintenance { .. }
            )
    }

    /// A planned stop may go on: no master is left, or the grace is over.
    pub(super) fn handed_over(&self, now: Instant) -> bool {
        self.stopping.is_some_and(|until| {
            now >= until || self.vhids.iter().all(|v| v.fsm.state() != State::Master)
        })
    }

    pub(super) async fn shutdown(mut self) {
        // Planned failover for DHCP too: the partner's Kea takes ours into maintenance
        // before it stops, so no lease is lost or handed out twice.
        if let Some(dhcp) = self.dhcp.take() {
            if let Err(e) = dhcp.partner_maintenance(true).await {
                warn!(error = %e, "the partner's Kea did not take over DHCP");
            }
            dhcp.stop().await;
        }
        if self.dhcp_fenced
            && let Err(e) = dhcp::fence::lift()
        {
            warn!(error = %Chain(&e), "cannot lift the DHCP fence");
        }
        if let Some(sync) = self.sync.take() {
            sync.stop();
        }
        let now = Instant::now();
        for v in &mut self.vhids {
            v.fsm.handle_shutdown(now);
        }
        self.settle().await;
        for hook in std::mem::take(&mut self.stop_hooks) {
            let _ = hook.await;
        }
        if let Err(e) = self.dataplane.clear_heartbeat() {
            warn!(error = %Chain(&e), "cannot clear the XDP heartbeat");
        }
        self.dataplane.detach_and_unpin();
        // The VIPs are released: nothing left for the kernel to answer.
        if let Err(e) = nft::remove_arp_guard() {
            warn!(error = %Chain(&e), "cannot remove the ARP guard table");
        }
        let _ = std::fs::remove_file(&self.config.node.control_socket);
        info!("stopped: VIPs released, XDP detached");
    }
}
