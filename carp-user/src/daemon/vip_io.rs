//! What a vhid's state machine asks of the world: adverts on the wire, the VIP on the
//! interface and in XDP's maps, gratuitous ARPs, the heartbeat XDP checks.

use super::Daemon;
use crate::{
    carp::{
        frame::{self, AdvertAddrs},
        fsm::{Action, State},
        packet::{Advert, CARP_GROUP_V4},
    },
    dataplane::Role,
    error::Chain,
};
use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};
use tracing::{debug, error, info, warn};

/// When the gratuitous ARPs after a takeover go out, from the takeover.
const GARP_SCHEDULE: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_millis(2000),
];
/// Longest wait for the peer's flows to reach the kernel before a VIP is claimed anyway.
pub(super) const INSTALL_BARRIER: Duration = Duration::from_secs(1);

impl Daemon {
    /// Carries out one of vhid `i`'s actions.
    pub(super) async fn perform(&mut self, i: usize, action: Action) {
        match action {
            Action::SendAdvert { advbase, advskew } => self.send_advert(i, advbase, advskew),
            Action::TakeVips => self.take_vip(i).await,
            Action::ReleaseVips => self.release_vip(i).await,
            Action::Announce => self.announce(i),
        }
    }

    fn send_advert(&mut self, i: usize, advbase: u8, advskew: u8) {
        let v = &mut self.vhids[i];
        v.counter = v.counter.wrapping_add(1);
        let advert = Advert::signed(
            &self.config.carp.key,
            v.fsm.vhid(),
            &[v.address.addr],
            advbase,
            advskew,
            v.counter,
        )
        .emit();
        let sent = match self.config.carp.peer {
            Some(peer) => self.adverts.send_unicast(peer, &advert),
            None => {
                let addrs = AdvertAddrs {
                    src_mac: v.mac,
                    dst_mac: frame::ipv4_multicast_mac(CARP_GROUP_V4),
                    src_ip: v.fsm.source(),
                    dst_ip: CARP_GROUP_V4,
                };
                let frame = frame::advert_frame(&addrs, rand::random(), &advert);
                self.frames.send(v.ifindex, &frame)
            }
        };
        let vhid = v.fsm.vhid();
        v.send.record(vhid, sent.is_ok());
        match sent {
            Ok(()) => {
                self.counters.adverts_sent += 1;
                self.refresh_heartbeat();
            }
            Err(e) => {
                warn!(vhid, interface = %v.interface, error = %e, "advert send failed");
                self.counters.send_errors += 1;
            }
        }
    }

    /// Tests the send path of vhids demoted for send errors that send no adverts.
    pub(super) fn probe_send_paths(&mut self, now: Instant) {
        for v in &mut self.vhids {
            let advertising = v.fsm.state() == State::Master;
            if v.send.probe_due(advertising, v.fsm.own_interval(), now) {
                let sent = self.frames.send(v.ifindex, &frame::send_probe(v.if_mac));
                if let Err(e) = &sent {
                    debug!(vhid = v.fsm.vhid(), error = %e, "send-path probe failed");
                }
                v.send.record(v.fsm.vhid(), sent.is_ok());
            }
        }
    }

    async fn take_vip(&mut self, i: usize) {
        // The peer's flows must be in the kernel before traffic arrives for the VIP.
        if let Some(sync) = &self.sync
            && !sync.prepare_takeover(INSTALL_BARRIER).await
        {
            warn!(
                "synced flows not all installed within {INSTALL_BARRIER:?}: taking the VIP anyway"
            );
        }
        let v = &self.vhids[i];
        if let Err(e) = self.addresses.add(v.ifindex, v.address).await {
            error!(error = %Chain(&e), "cannot add VIP");
        }
        // XDP takes the virtual MAC's frames only from a live daemon, and the heartbeat of a
        // backup, which sends no adverts, is stale; the advert that refreshes it comes after.
        self.refresh_heartbeat();
        self.set_role(i, Role::Master);
        let v = &self.vhids[i];
        info!(vhid = v.fsm.vhid(), interface = %v.interface, vip = %v.address, "VIP taken");
    }

    async fn release_vip(&mut self, i: usize) {
        if let Some(garp) = self.vhids[i].garp.take() {
            garp.abort();
        }
        // Stop answering first, then drop the address.
        self.set_role(i, Role::Backup);
        let v = &self.vhids[i];
        if let Err(e) = self.addresses.remove(v.ifindex, v.address).await {
            error!(error = %Chain(&e), "cannot remove VIP");
        }
        info!(vhid = v.fsm.vhid(), interface = %v.interface, vip = %v.address, "VIP released");
    }

    /// Tells XDP whether this node answers for vhid `i`'s VIP and virtual MAC.
    fn set_role(&mut self, i: usize, role: Role) {
        let v = &self.vhids[i];
        let result = self
            .dataplane
            .set_vip(v.ifindex, v.address.addr, v.fsm.vhid(), v.mac, role)
            .and_then(|()| {
                self.dataplane
                    .set_vmac(v.ifindex, v.fsm.vhid(), v.if_mac, role)
            });
        if let Err(e) = result {
            error!(vhid = v.fsm.vhid(), ?role, error = %Chain(&e), "cannot update the XDP maps");
        }
    }

    /// Gratuitous ARPs on the takeover schedule; a later release cancels the rest.
    fn announce(&mut self, i: usize) {
        let v = &mut self.vhids[i];
        if let Some(old) = v.garp.take() {
            old.abort();
        }
        let frames = self.frames.clone();
        let sent = self.garps_sent.clone();
        let (ifindex, frame) = (v.ifindex, frame::gratuitous_arp(v.mac, v.address.addr));
        let vhid = v.fsm.vhid();
        v.garp = Some(tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for at in GARP_SCHEDULE {
                tokio::time::sleep_until(start + at).await;
                match frames.send(ifindex, &frame) {
                    Ok(()) => {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => warn!(vhid, error = %e, "gratuitous ARP send failed"),
                }
            }
        }));
    }

    pub(super) fn refresh_heartbeat(&mut self) {
        if let Err(e) = self.dataplane.refresh_heartbeat(self.heartbeat_lifetime) {
            error!(error = %Chain(&e), "cannot refresh the XDP heartbeat");
        }
    }
}
