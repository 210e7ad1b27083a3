//! The daemon's side of what operators hook into and of DHCP: notify hooks and events on
//! each transition, planned failover through the partner's Kea, the DHCP fence, leases.

use super::Daemon;
use crate::{
    carp::fsm::{State, Transition},
    control::Response,
    dhcp,
    error::Chain,
    events::EventKind,
    notify,
    sync::service::SyncHandle,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

/// `carp maintenance` once the partner's Kea has answered: its outcome and who asked.
pub(super) struct DhcpHandover {
    enable: bool,
    outcome: Result<String, String>,
    reply: oneshot::Sender<Response>,
}

impl Daemon {
    /// A state change: the notify hooks that want it start (never waited for), and
    /// `carp events` readers hear of it.
    pub(super) fn on_transition(&mut self, i: usize, transition: Transition) {
        let v = &self.vhids[i];
        let change = notify::Change {
            node: self.config.node.name.clone(),
            vhid: v.fsm.vhid(),
            interface: v.interface.clone(),
            vip: v.address.to_string(),
            transition,
        };
        let tasks = notify::run(
            &self.config.notify,
            &change,
            &self.notify_failures,
            &self.events,
        );
        if notify::Trigger::of(&transition) == notify::Trigger::Stop {
            self.stop_hooks.extend(tasks);
        }
        self.events.publish(EventKind::Transition {
            vhid: change.vhid,
            interface: change.interface,
            vip: change.vip,
            old: transition.old,
            new: transition.new,
            reason: transition.reason.to_owned(),
        });
    }

    /// The sync link coming and going, for `carp events`.
    pub(super) fn publish_sync_changes(&mut self) {
        let connected = self.sync.as_ref().is_some_and(SyncHandle::connected);
        if connected != self.sync_connected {
            self.sync_connected = connected;
            self.events.publish(if connected {
                EventKind::SyncConnected
            } else {
                EventKind::SyncLost
            });
        }
    }

    /// `carp maintenance on|off`: DHCP first (the partner's Kea takes over, or hands back),
    /// then CARP's demotion. The partner's Kea may take its whole command timeout to answer
    /// (or not), so that part runs on its own and the loop goes on sending adverts; the
    /// demotion and the answer follow in [`Daemon::finish_dhcp_handover`]. `Some` is the
    /// answer when there is nothing to wait for.
    pub(super) fn maintenance_request(
        &mut self,
        enable: bool,
        reply: oneshot::Sender<Response>,
        handovers: &mpsc::UnboundedSender<DhcpHandover>,
    ) -> Option<(Response, oneshot::Sender<Response>)> {
        let Some(dhcp) = self.dhcp.as_ref().filter(|_| enable != self.maintenance) else {
            return Some((self.maintenance_now(enable), reply));
        };
        if self.dhcp_handover_pending {
            let busy = "a maintenance change is under way: the partner's Kea has not answered yet";
            return Some((Response::error(busy.into()), reply));
        }
        self.dhcp_handover_pending = true;
        let command = dhcp.partner_maintenance(enable);
        let handovers = handovers.clone();
        tokio::spawn(async move {
            let outcome = command.await;
            let _ = handovers.send(DhcpHandover {
                enable,
                outcome,
                reply,
            });
        });
        None
    }

    /// The partner's Kea answered (or gave up): CARP's side of `carp maintenance` now.
    pub(super) fn finish_dhcp_handover(
        &mut self,
        handover: DhcpHandover,
    ) -> (Response, oneshot::Sender<Response>) {
        self.dhcp_handover_pending = false;
        match handover.outcome {
            Ok(done) => info!(%done, "DHCP maintenance"),
            Err(e) => warn!(error = %e, "DHCP maintenance not taken by the partner"),
        }
        (self.maintenance_now(handover.enable), handover.reply)
    }

    fn maintenance_now(&mut self, enable: bool) -> Response {
        match self.set_maintenance(enable) {
            Ok(()) => Response::status(self.status()),
            Err(e) => Response::error(Chain(&e).to_string()),
        }
    }

    /// While master of a VIP on a DHCP interface with the peer gone from the sync link, the
    /// peer's Kea is fenced off so ours serves now; lifted when the peer is back.
    pub(super) fn fence_dhcp_peer(&mut self) {
        let fenced = self.dhcp.as_ref().is_some_and(|dhcp| {
            let scopes = &dhcp.setup().scopes;
            self.vhids.iter().any(|v| {
                v.fsm.state() == State::Master && scopes.iter().any(|s| s.interface == v.interface)
            }) && self.sync.as_ref().is_some_and(|s| !s.connected())
        });
        if fenced == self.dhcp_fenced {
            return;
        }
        let done = match (&self.dhcp, fenced) {
            (Some(dhcp), true) => dhcp::fence::raise(dhcp.setup().peer, dhcp.setup().port),
            _ => dhcp::fence::lift(),
        };
        match done {
            Ok(()) => info!(fenced, "DHCP: the peer's Kea fenced off while it is gone"),
            // Not tried again every tick: Kea's own timeouts still apply.
            Err(e) => error!(error = %Chain(&e), fenced, "cannot change the DHCP fence"),
        }
        self.dhcp_fenced = fenced;
    }

    /// `carp leases`: Kea's leases, answered once Kea has; the daemon goes on meanwhile.
    pub(super) fn leases_request(&self, reply: tokio::sync::oneshot::Sender<Response>) {
        let Some(dhcp) = &self.dhcp else {
            let _ = reply.send(Response::error(
                "this node serves no DHCP ([[dhcp]])".into(),
            ));
            return;
        };
        let leases = dhcp.leases();
        let scopes = dhcp.setup().scopes.clone();
        // The partner is the sync peer: its name as it said hello, kept after it is gone.
        let partner = self
            .sync
            .as_ref()
            .and_then(|s| s.status().peer_node)
            .unwrap_or_else(|| "partner".into());
        let names = dhcp::PairNames {
            here: self.config.node.name.clone(),
            partner,
        };
        tokio::spawn(async move {
            let response = match leases.await {
                Ok((leases, served_by)) => {
                    Response::leases(dhcp::lease_rows(&scopes, leases, &served_by, &names))
                }
                Err(e) => Response::error(e),
            };
            let _ = reply.send(response);
        });
    }
}
