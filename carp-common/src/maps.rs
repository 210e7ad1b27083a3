//! Keys and values of the maps between the daemon and the XDP data plane.

use core::mem::size_of;

/// Name of the VIP table: an array of [`VipSlot`], one per IPv4 virtual IP, open addressing
/// from [`vip_home`].
pub const VIP_MAP: &str = "CARP_VIPS";
/// Name of the virtual-MAC map: [`VmacKey`] -> [`VmacEntry`], one entry per (interface, vhid).
pub const VMAC_MAP: &str = "CARP_VMACS";
/// Name of the one-slot array holding the daemon's [`Heartbeat`].
pub const HEARTBEAT_MAP: &str = "CARP_HEARTBEAT";
/// Name of the per-CPU counter array indexed by the `STAT_*` constants.
pub const STATS_MAP: &str = "CARP_STATS";
/// Name of the XDP program in the object file.
pub const XDP_PROGRAM: &str = "carp_xdp";
/// Name of the pass-everything XDP program (benchmark baseline, lab veth peers).
pub const XDP_PASS_PROGRAM: &str = "xdp_pass";
/// Every map of the object, each pinned under its own name in the node's pin directory.
pub const ALL_MAPS: [&str; 7] = [
    VIP_MAP,
    VMAC_MAP,
    HEARTBEAT_MAP,
    STATS_MAP,
    crate::flow::FLOW_MAP,
    crate::flow::DELTA_RING,
    crate::flow::FLOW_CACHE_MAP,
];

/// Most virtual MACs one node can hold (CARP_MAXVHID per interface, a few interfaces).
pub const MAX_VIPS: u32 = 1024;

/// Slots of the VIP table. An array, not a hash map: XDP finds a VIP with the verifier's
/// inlined array lookups instead of a jhash helper call, which halves the cost of an ARP
/// answer. A power of two, so the home slot is a mask away.
pub const VIP_SLOTS: u32 = 512;
/// How many slots after its home a VIP may sit (linear probing). The daemon refuses a VIP
/// that finds no room that close; with a few hundred VIPs at most that does not happen.
pub const VIP_PROBES: u32 = 8;

/// `VipEntry::role` / `VmacEntry::role`: this node is not master for the vhid.
pub const ROLE_BACKUP: u8 = 0;
/// `VipEntry::role` / `VmacEntry::role`: this node is master for the vhid.
pub const ROLE_MASTER: u8 = 1;

/// ARP requests for a VIP answered by XDP (XDP_TX).
pub const STAT_ARP_REPLIED: u32 = 0;
/// ARP requests for a VIP dropped because this node is backup.
pub const STAT_ARP_DROPPED_BACKUP: u32 = 1;
/// ARP requests for a VIP dropped because the daemon's heartbeat is stale.
pub const STAT_ARP_DROPPED_STALE: u32 = 2;
/// Frames to a virtual MAC handed to the stack with the interface's own MAC.
pub const STAT_VMAC_ACCEPTED: u32 = 3;
/// Frames to a virtual MAC left alone (backup or stale heartbeat).
pub const STAT_VMAC_IGNORED: u32 = 4;
/// Frames too short or malformed to classify, passed untouched.
pub const STAT_MALFORMED: u32 = 5;
/// Packets the flow capture tracked (those summed in a CPU's flow cache count once written back).
pub const STAT_FLOW_PACKETS: u32 = 6;
/// Deltas lost because the ring buffer was full (repaired by the next refresh).
pub const STAT_DELTA_LOST: u32 = 7;
/// IPv4 fragments and IPv6 packets with extension headers, not tracked.
pub const STAT_FLOW_UNTRACKED: u32 = 8;
/// Flows the LRU map could not take.
pub const STAT_FLOW_INSERT_FAILED: u32 = 9;
/// Number of slots in the stats map.
pub const STAT_SLOTS: u32 = 16;

/// Key of the VIP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    /// Interface the VIP lives on (the XDP `ingress_ifindex`).
    pub ifindex: u32,
    /// The IPv4 VIP, network byte order (the bytes as on the wire).
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<VipKey>() == 8);

/// Value of the VIP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipEntry {
    /// MAC put in ARP replies for the VIP: the virtual MAC or the interface's own.
    pub mac: [u8; 6],
    /// [`ROLE_MASTER`] or [`ROLE_BACKUP`].
    pub role: u8,
    /// The vhid the VIP belongs to (for bpftool readers).
    pub vhid: u8,
}
const _: () = assert!(size_of::<VipEntry>() == 8);

/// One slot of the VIP table. `key.ifindex == 0` marks a slot never used; a used slot is
/// never emptied again (a released VIP keeps its slot as backup), so probe chains stay whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipSlot {
    pub key: VipKey,
    pub entry: VipEntry,
}
const _: () = assert!(size_of::<VipSlot>() == 16);

/// `VipKey::ifindex` of a slot whose VIP was removed: no interface has it, so no lookup
/// matches, and lookups probe on past it as past any used slot.
pub const VIP_REMOVED_IFINDEX: u32 = u32::MAX;

impl VipSlot {
    /// A removed VIP's slot.
    pub const REMOVED: VipSlot = VipSlot {
        key: VipKey {
            ifindex: VIP_REMOVED_IFINDEX,
            addr: [0; 4],
        },
        entry: VipEntry {
            mac: [0; 6],
            role: ROLE_BACKUP,
            vhid: 0,
        },
    };

    /// Whether the slot was ever used (a removed VIP's slot counts: lookups probe past it).
    #[inline(always)]
    pub fn is_used(&self) -> bool {
        self.key.ifindex != 0
    }

    /// Whether a new VIP may take the slot: never used, or its VIP removed.
    #[inline(always)]
    pub fn is_free(&self) -> bool {
        self.key.ifindex == 0 || self.key.ifindex == VIP_REMOVED_IFINDEX
    }
}

/// The slot a VIP's probe sequence starts at (Fibonacci hashing of interface and address).
#[inline(always)]
pub fn vip_home(key: &VipKey) -> u32 {
    const GOLDEN: u32 = 0x9e37_79b9;
    let mixed = u32::from_be_bytes(key.addr) ^ key.ifindex.wrapping_mul(GOLDEN);
    mixed.wrapping_mul(GOLDEN) >> (32 - VIP_SLOTS.trailing_zeros())
}

/// The slots a VIP may sit in, in probe order: the daemon places VIPs and XDP finds them
/// along this one sequence.
#[inline(always)]
pub fn vip_probe_slots(key: &VipKey) -> impl Iterator<Item = u32> {
    let home = vip_home(key);
    (0..VIP_PROBES).map(move |probe| (home + probe) & (VIP_SLOTS - 1))
}

/// Key of the virtual-MAC map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VmacKey {
    /// Interface the vhid runs on.
    pub ifindex: u32,
    /// The vhid: the last byte of `00:00:5e:00:01:<vhid>`.
    pub vhid: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<VmacKey>() == 8);

/// Value of the virtual-MAC map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmacEntry {
    /// The interface's own MAC: frames to the virtual MAC are rewritten to it so the stack
    /// takes them as its own.
    pub if_mac: [u8; 6],
    /// [`ROLE_MASTER`] or [`ROLE_BACKUP`].
    pub role: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<VmacEntry>() == 8);

/// The daemon's liveness, written by the daemon, read by XDP on every VIP decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Heartbeat {
    /// CLOCK_MONOTONIC_COARSE nanoseconds (`bpf_ktime_get_coarse_ns`) of the last refresh.
    pub refreshed_ns: u64,
    /// How long a refresh stays valid: the master-down interval. Past it, XDP answers nothing.
    pub lifetime_ns: u64,
}
const _: () = assert!(size_of::<Heartbeat>() == 16);

impl Heartbeat {
    /// Whether the daemon counts as alive at `now_ns` (same clock as `refreshed_ns`).
    #[inline(always)]
    pub fn is_fresh(&self, now_ns: u64) -> bool {
        self.refreshed_ns != 0 && now_ns.wrapping_sub(self.refreshed_ns) <= self.lifetime_ns
    }
}

/// The virtual MAC of a vhid, `00:00:5e:00:01:<vhid>` (FreeBSD/pfSense, RFC 5798's range).
#[inline(always)]
pub const fn virtual_mac(vhid: u8) -> [u8; 6] {
    [0x00, 0x00, 0x5e, 0x00, 0x01, vhid]
}

/// The vhid of a virtual MAC, or `None` when `mac` is not one.
#[inline(always)]
pub fn vhid_of_virtual_mac(mac: &[u8; 6]) -> Option<u8> {
    if mac[0] == 0 && mac[1] == 0 && mac[2] == 0x5e && mac[3] == 0 && mac[4] == 1 {
        Some(mac[5])
    } else {
        None
    }
}
