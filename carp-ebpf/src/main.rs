//! carp's XDP program: answers ARP for the virtual IPs while this node is master and its
//! daemon is alive, drops ARP for them otherwise, and hands frames sent to a virtual MAC to the
//! stack. Everything else passes untouched.
#![no_std]
#![no_main]

mod clock;
mod flow;

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, PerCpuArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use carp_common::maps::{
    Heartbeat, MAX_VIPS, ROLE_MASTER, STAT_ARP_DROPPED_BACKUP, STAT_ARP_DROPPED_STALE,
    STAT_ARP_REPLIED, STAT_MALFORMED, STAT_SLOTS, STAT_VMAC_ACCEPTED, STAT_VMAC_IGNORED, VIP_SLOTS,
    VipEntry, VipKey, VipSlot, VmacEntry, VmacKey, vhid_of_virtual_mac, vip_probe_slots,
};
use core::mem::size_of;
use network_types::eth::{EthHdr, EtherType};

// BTF map definitions, so `bpftool map dump` shows the field names of keys and values.
#[btf_map]
static CARP_VIPS: Array<VipSlot, { VIP_SLOTS as usize }> = Array::new();

#[btf_map]
static CARP_VMACS: HashMap<VmacKey, VmacEntry, { MAX_VIPS as usize }> = HashMap::new();

#[btf_map]
static CARP_HEARTBEAT: Array<Heartbeat, 1> = Array::new();

#[btf_map]
static CARP_STATS: PerCpuArray<u64, { STAT_SLOTS as usize }> = PerCpuArray::new();

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
        return answer_arp(ctx);
    }
    if let Some(vhid) = vhid_of_virtual_mac(&dst) {
        accept_virtual_mac(ctx, eth, vhid);
    }
    flow::track(ctx)?;
    Ok(xdp_action::XDP_PASS)
}

/// An Ethernet + ARP request for IPv4 as 16-bit words. Every field the answer touches starts
/// at an even offset, and drivers hand XDP data at least 2-byte aligned, so the rewrite moves
/// words: a third of the instructions of a byte-wise copy.
type ArpFrame = [u16; 21];
const W_ETH_DST: usize = 0;
const W_ETH_SRC: usize = 3;
/// htype, ptype, hlen + plen, oper.
const W_ARP_FIXED: usize = 7;
const W_ARP_OPER: usize = 10;
const W_ARP_SHA: usize = 11;
const W_ARP_SPA: usize = 14;
const W_ARP_THA: usize = 16;
const W_ARP_TPA: usize = 19;
/// Ethernet, IPv4, 6-byte and 4-byte addresses, request; as the words read from the wire.
const ARP_REQUEST_FIXED: [u16; 4] = [
    u16::from_ne_bytes([0, 1]),
    u16::from_ne_bytes([0x08, 0x00]),
    u16::from_ne_bytes([6, 4]),
    u16::from_ne_bytes([0, 1]),
];
const ARP_OPER_REPLY: u16 = u16::from_ne_bytes([0, 2]);

/// ARP requests for a VIP: answered here while master and alive, dropped otherwise, so that
/// the kernel never answers for a VIP on its own.
fn answer_arp(ctx: &XdpContext) -> Result<u32, ()> {
    let frame: *mut ArpFrame = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked that all 42 bytes lie inside the frame.
    let w = unsafe { &mut *frame };
    if w[W_ARP_FIXED..W_ARP_FIXED + 4] != ARP_REQUEST_FIXED {
        return Ok(xdp_action::XDP_PASS);
    }
    let tpa = [w[W_ARP_TPA], w[W_ARP_TPA + 1]];
    let key = VipKey {
        ifindex: ingress_ifindex(ctx),
        // SAFETY: two u16 are four bytes, in wire order either way.
        addr: unsafe { core::mem::transmute::<[u16; 2], [u8; 4]>(tpa) },
    };
    let Some(vip) = find_vip(&key) else {
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
    // SAFETY: array values are 8-byte aligned and `mac` sits at offset 8 of the slot, so it
    // reads as three words.
    let mac = unsafe { *(vip.mac.as_ptr() as *const [u16; 3]) };
    // Turn the request into the reply in place and send it back out of the same port.
    w[W_ARP_OPER] = ARP_OPER_REPLY;
    for i in 0..3 {
        w[W_ARP_THA + i] = w[W_ARP_SHA + i];
        w[W_ARP_SHA + i] = mac[i];
        w[W_ETH_DST + i] = w[W_ETH_SRC + i];
        w[W_ETH_SRC + i] = mac[i];
    }
    w[W_ARP_TPA] = w[W_ARP_SPA];
    w[W_ARP_TPA + 1] = w[W_ARP_SPA + 1];
    w[W_ARP_SPA] = tpa[0];
    w[W_ARP_SPA + 1] = tpa[1];
    count(STAT_ARP_REPLIED);
    Ok(xdp_action::XDP_TX)
}

/// The VIP table entry for `key`: probes from its home slot until the key or a never-used
/// slot turns up, as the daemon placed it.
#[inline(always)]
fn find_vip(key: &VipKey) -> Option<&'static VipEntry> {
    for index in vip_probe_slots(key) {
        let slot = CARP_VIPS.get(index)?;
        if !slot.is_used() {
            return None;
        }
        if slot.key == *key {
            return Some(&slot.entry);
        }
    }
    None
}

/// Frames to `00:00:5e:00:01:<vhid>`: while master, the destination becomes the interface's
/// own MAC so the stack takes them; otherwise they pass as they are (the stack ignores them).
fn accept_virtual_mac(ctx: &XdpContext, eth: *mut EthHdr, vhid: u8) {
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
}

/// Whether the daemon refreshed its heartbeat within the master-down interval.
#[inline(always)]
fn daemon_alive() -> bool {
    // The coarse clock (jiffy resolution): a few milliseconds are nothing against a
    // heartbeat of seconds.
    let now = clock::coarse_now_ns();
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
    count_n(slot, 1);
}

#[inline(always)]
pub(crate) fn count_n(slot: u32, n: u64) {
    if let Some(counter) = CARP_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += n };
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
