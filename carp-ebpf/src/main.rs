//! carp's XDP program: answers ARP for the virtual IPs while this node is master and its
//! daemon is alive, drops ARP for them otherwise, and hands frames sent to a virtual MAC to the
//! stack. Everything else passes untouched.
#![no_std]
#![no_main]

mod flow;

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, PerCpuArray},
    helpers::bpf_ktime_get_coarse_ns,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use carp_common::maps::{
    Heartbeat, MAX_VIPS, ROLE_MASTER, STAT_ARP_DROPPED_BACKUP, STAT_ARP_DROPPED_STALE,
    STAT_ARP_REPLIED, STAT_MALFORMED, STAT_SLOTS, STAT_VMAC_ACCEPTED, STAT_VMAC_IGNORED, VipEntry,
    VipKey, VmacEntry, VmacKey, vhid_of_virtual_mac,
};
use core::mem::size_of;
use network_types::{
    arp::ArpHdr,
    eth::{EthHdr, EtherType},
};

// BTF map definitions, so `bpftool map dump` shows the field names of keys and values.
#[btf_map]
static CARP_VIPS: HashMap<VipKey, VipEntry, { MAX_VIPS as usize }> = HashMap::new();

#[btf_map]
static CARP_VMACS: HashMap<VmacKey, VmacEntry, { MAX_VIPS as usize }> = HashMap::new();

#[btf_map]
static CARP_HEARTBEAT: Array<Heartbeat, 1> = Array::new();

#[btf_map]
static CARP_STATS: PerCpuArray<u64, { STAT_SLOTS as usize }> = PerCpuArray::new();

const ARP_HTYPE_ETHERNET: [u8; 2] = [0, 1];
const ARP_PTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ARP_OP_REQUEST: [u8; 2] = [0, 1];
const ARP_OP_REPLY: [u8; 2] = [0, 2];

/// Passes every frame: the bare baseline the benchmarks compare against, and what the lab
/// attaches to veth peers (native XDP_TX on veth is delivered only to a peer running XDP).
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn carp_xdp(ctx: XdpContext) -> u32 {
    match try_carp_xdp(&ctx) {
        Ok(action) => action,
        Err(()) => {
            count(STAT_MALFORMED);
            xdp_action::XDP_PASS
        }
    }
}

fn try_carp_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked that the whole header lies inside the frame.
    let (dst, ether_type) = unsafe { ((*eth).dst_addr, (*eth).ether_type) };
    if ether_type == EtherType::Arp as u16 {
        return answer_arp(ctx, eth);
    }
    let action = match vhid_of_virtual_mac(&dst) {
        Some(vhid) => accept_virtual_mac(ctx, eth, vhid),
        None => xdp_action::XDP_PASS,
    };
    flow::track(ctx, ether_type)?;
    Ok(action)
}

/// ARP requests for a VIP: answered here while master and alive, dropped otherwise, so that
/// the kernel never answers for a VIP on its own.
fn answer_arp(ctx: &XdpContext, eth: *mut EthHdr) -> Result<u32, ()> {
    let arp: *mut ArpHdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: `ptr_at` checked bounds; ArpHdr is all byte arrays (alignment 1).
    let request = unsafe { &mut *arp };
    if request.htype != ARP_HTYPE_ETHERNET
        || request.ptype != ARP_PTYPE_IPV4
        || request.hlen != 6
        || request.plen != 4
        || request.oper != ARP_OP_REQUEST
    {
        return Ok(xdp_action::XDP_PASS);
    }
    let key = VipKey {
        ifindex: ingress_ifindex(ctx),
        addr: request.tpa,
    };
    // SAFETY: the map value is plain old data, read once.
    let Some(vip) = (unsafe { CARP_VIPS.get(key) }).copied() else {
        return Ok(xdp_action::XDP_PASS);
    };
    if vip.role != ROLE_MASTER {
        count(STAT_ARP_DROPPED_BACKUP);
        return Ok(xdp_action::XDP_DROP);
    }
    if !daemon_alive() {
        count(STAT_ARP_DROPPED_STALE);
        return Ok(xdp_action::XDP_DROP);
    }
    // Turn the request into the reply in place and send it back out of the same port.
    request.oper = ARP_OP_REPLY;
    request.tha = request.sha;
    request.tpa = request.spa;
    request.sha = vip.mac;
    request.spa = key.addr;
    // SAFETY: `eth` was bounds-checked by the caller.
    unsafe {
        (*eth).dst_addr = (*eth).src_addr;
        (*eth).src_addr = vip.mac;
    }
    count(STAT_ARP_REPLIED);
    Ok(xdp_action::XDP_TX)
}

/// Frames to `00:00:5e:00:01:<vhid>`: while master, the destination becomes the interface's
/// own MAC so the stack takes them; otherwise they pass as they are (the stack ignores them).
fn accept_virtual_mac(ctx: &XdpContext, eth: *mut EthHdr, vhid: u8) -> u32 {
    let key = VmacKey {
        ifindex: ingress_ifindex(ctx),
        vhid,
        _pad: [0; 3],
    };
    // SAFETY: the map value is plain old data, read once.
    match unsafe { CARP_VMACS.get(key) }.copied() {
        Some(vmac) if vmac.role == ROLE_MASTER && daemon_alive() => {
            // SAFETY: `eth` was bounds-checked by the caller.
            unsafe { (*eth).dst_addr = vmac.if_mac };
            count(STAT_VMAC_ACCEPTED);
        }
        _ => count(STAT_VMAC_IGNORED),
    }
    xdp_action::XDP_PASS
}

/// Whether the daemon refreshed its heartbeat within the master-down interval.
#[inline(always)]
fn daemon_alive() -> bool {
    // The coarse clock (CLOCK_MONOTONIC_COARSE, jiffy resolution) needs no TSC read, and a
    // few milliseconds are nothing against a heartbeat of seconds.
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    CARP_HEARTBEAT
        .get(0)
        .is_some_and(|heartbeat| heartbeat.is_fresh(now))
}

#[inline(always)]
fn ingress_ifindex(ctx: &XdpContext) -> u32 {
    // SAFETY: `ctx.ctx` is the kernel's xdp_md for this invocation.
    unsafe { (*ctx.ctx).ingress_ifindex }
}

#[inline(always)]
pub(crate) fn count(slot: u32) {
    if let Some(counter) = CARP_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

/// The one bounds check: a pointer to a `T` at `offset`, or `Err` when it would overrun.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
