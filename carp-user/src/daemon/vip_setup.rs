//! A VIP brought up at start or by a reload: XDP on its interface, its entries in XDP's maps,
//! its state machine, or the mastership the previous run held adopted.

use super::{DaemonError, VhidRuntime};
use crate::{
    carp::{
        demotion::SendHealth,
        fsm::{State, Vhid},
    },
    config::{Config, MacMode, Vip, XdpModeChoice},
    dataplane::{Dataplane, Role},
    interfaces,
    netlink::Addresses,
    reload,
};
use aya::programs::XdpMode;
use carp_common::maps::virtual_mac;
use std::{
    net::Ipv4Addr,
    time::{Instant, SystemTime},
};
use tracing::info;

/// What setting up a VIP needs to know.
pub(super) struct VipSetup<'a> {
    pub(super) host: &'a [interfaces::Interface],
    /// Every configured VIP, so none is taken for the interface's own address.
    pub(super) vip_addrs: &'a [Ipv4Addr],
    pub(super) config: &'a Config,
}

impl VipSetup<'_> {
    /// XDP on the VIP's interface, its entries in XDP's maps and its state machine. With
    /// `predecessor_alive`, a VIP the previous run held as master (XDP says so, the address
    /// is on the interface) is adopted; otherwise it starts from a clean slate: nothing
    /// answered, no address held (a crash may have left them).
    pub(super) async fn run(
        &self,
        vip: &Vip,
        dataplane: &mut Dataplane,
        addresses: &Addresses,
        predecessor_alive: bool,
        now: Instant,
    ) -> Result<VhidRuntime, DaemonError> {
        let iface = self
            .host
            .iter()
            .find(|i| i.name == vip.interface)
            .ok_or_else(|| DaemonError::NoInterface {
                name: vip.interface.clone(),
            })?;
        let source = iface
            .addrs
            .iter()
            .find(|a| !self.vip_addrs.contains(&a.addr) && a.contains(vip.address.addr))
            .ok_or_else(|| DaemonError::NoSource {
                name: iface.name.clone(),
                vip: vip.address,
            })?
            .addr;
        if !dataplane.is_attached(&vip.interface) {
            let mode = match self.config.node.xdp_mode {
                XdpModeChoice::Native => XdpMode::Driver,
                XdpModeChoice::Generic => XdpMode::Skb,
                XdpModeChoice::Auto if addresses.is_veth(iface.index).await? => XdpMode::Skb,
                XdpModeChoice::Auto => XdpMode::Driver,
            };
            info!(interface = %vip.interface, ?mode, "attaching XDP");
            dataplane.attach(&vip.interface, mode)?;
        }
        let mac = match self.config.carp.mac {
            MacMode::Virtual => virtual_mac(vip.vhid),
            MacMode::Interface => iface.mac,
        };
        let params = reload::params(self.config, vip);
        let held = predecessor_alive
            && iface.addrs.iter().any(|a| a.addr == vip.address.addr)
            && dataplane.vip_role(iface.index, vip.address.addr) == Some(Role::Master);
        let role = if held { Role::Master } else { Role::Backup };
        dataplane.set_vip(iface.index, vip.address.addr, vip.vhid, mac, role)?;
        dataplane.set_vmac(iface.index, vip.vhid, iface.mac, role)?;
        let fsm = if held {
            Vhid::adopted_master(vip.vhid, params, source, now)
        } else {
            addresses.remove(iface.index, vip.address).await?;
            Vhid::new(vip.vhid, params, source, now)
        };
        Ok(VhidRuntime {
            fsm,
            interface: vip.interface.clone(),
            ifindex: iface.index,
            if_mac: iface.mac,
            address: vip.address,
            mac,
            counter: rand::random(),
            link_up: false,
            reported_state: State::Init,
            since: SystemTime::now(),
            transitions: 0,
            garp: None,
            send: SendHealth::default(),
        })
    }
}
