//! The XDP data plane as the daemon sees it: load (reusing pinned maps), attach to the CARP
//! interfaces through pinned bpf_links, and the map writes that tell XDP which VIPs to answer.

use crate::pins;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    pin::PinError,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use carp_common::flow::{
    CAPTURE_ON_GLOBAL, CAPTURE_REFRESH_GLOBAL, DELTA_RING, FLOW_CACHE_MAP, FLOW_MAP, FlowCacheSlot,
    FlowDelta, FlowEntry, FlowKey,
};
use carp_common::maps::{
    ALL_MAPS, HEARTBEAT_MAP, Heartbeat, ROLE_BACKUP, ROLE_MASTER, STAT_SLOTS, STATS_MAP, VIP_MAP,
    VIP_PROBES, VIP_SLOTS, VMAC_MAP, VipEntry, VipKey, VipSlot, VmacEntry, VmacKey, XDP_PROGRAM,
    vip_probe_slots,
};
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};
use tracing::{info, warn};

/// Why the data plane could not be set up or updated.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("cannot prepare pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "bpffs is not mounted at {}: mount it with `mount -t bpf bpf {}`",
        pins::BPFFS,
        pins::BPFFS
    )]
    NoBpffs,
    #[error("loading the XDP object failed")]
    Load {
        #[from]
        source: aya::EbpfError,
    },
    #[error("XDP program {XDP_PROGRAM}")]
    Program {
        #[from]
        source: ProgramError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "no room for VIP {addr} in the XDP VIP table: {VIP_PROBES} slots after its home are taken ({VIP_SLOTS} slots in all)"
    )]
    VipTableFull { addr: Ipv4Addr },
    #[error("the XDP object has no {name}")]
    Missing { name: &'static str },
    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("reusing pinned link {path}")]
    PinnedLink {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
}

/// Role of a VIP or vhid in the maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Backup,
    Master,
}

impl Role {
    fn as_u8(self) -> u8 {
        match self {
            Role::Backup => ROLE_BACKUP,
            Role::Master => ROLE_MASTER,
        }
    }
}

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    links: Vec<(String, PinnedLink)>,
    vips: Array<MapData, VipSlot>,
    vmacs: HashMap<MapData, VmacKey, VmacEntry>,
    heartbeat: Array<MapData, Heartbeat>,
    stats: PerCpuArray<MapData, u64>,
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    flow_cache: PerCpuArray<MapData, FlowCacheSlot>,
    /// Handed to the sync service when sync is configured.
    deltas: Option<RingBuf<MapData>>,
}

impl Dataplane {
    /// Loads the embedded XDP object with its maps pinned in `pin_dir`. Maps already pinned
    /// there (a daemon restarting after a crash) are reused, so XDP keeps its state. With
    /// `capture`, XDP tracks flows and sends a delta for each at least that often; it is fixed
    /// for the program's life ([`CAPTURE_ON_GLOBAL`]).
    pub fn load(
        pin_dir: &Path,
        flows_max: u32,
        capture: Option<Duration>,
    ) -> Result<Self, DataplaneError> {
        ensure_bpffs()?;
        std::fs::create_dir_all(pin_dir).map_err(|source| DataplaneError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        let pin_paths: Vec<(&str, PathBuf)> = ALL_MAPS
            .iter()
            .map(|name| (*name, pin_dir.join(name)))
            .collect();
        let capture_on = u32::from(capture.is_some());
        let refresh_ns = capture.map_or(u64::MAX, |r| r.as_nanos() as u64);
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(FLOW_MAP, flows_max);
        loader.override_global(CAPTURE_ON_GLOBAL, &capture_on, true);
        loader.override_global(CAPTURE_REFRESH_GLOBAL, &refresh_ns, true);
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(crate::EBPF_OBJECT)?;
        let program: &mut Xdp = program_mut(&mut ebpf)?;
        program.load()?;
        let vips = take_map(&mut ebpf, VIP_MAP, Array::try_from)?;
        let vmacs = take_map(&mut ebpf, VMAC_MAP, HashMap::try_from)?;
        let heartbeat = take_map(&mut ebpf, HEARTBEAT_MAP, Array::try_from)?;
        let stats = take_map(&mut ebpf, STATS_MAP, PerCpuArray::try_from)?;
        let flows = take_map(&mut ebpf, FLOW_MAP, HashMap::try_from)?;
        let flow_cache = take_map(&mut ebpf, FLOW_CACHE_MAP, PerCpuArray::try_from)?;
        let deltas = take_map(&mut ebpf, DELTA_RING, RingBuf::try_from)?;
        Ok(Self {
            flows,
            flow_cache,
            deltas: Some(deltas),
            ebpf,
            pin_dir: pin_dir.to_owned(),
            links: Vec::new(),
            vips,
            vmacs,
            heartbeat,
            stats,
        })
    }

    /// The loaded XDP program (for BPF_PROG_TEST_RUN).
    pub fn program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        program_mut(&mut self.ebpf)
    }

    /// Attaches to `ifname` through a pinned bpf_link. A link pinned by an earlier run is
    /// taken over atomically (bpf_link_update), so there is no moment without XDP.
    pub fn attach(&mut self, ifname: &str, mode: XdpMode) -> Result<(), DataplaneError> {
        if self.is_attached(ifname) {
            return Ok(());
        }
        let path = pins::link(&self.pin_dir, ifname);
        let program = program_mut(&mut self.ebpf)?;
        let link_id = match PinnedLink::from_pin(&path) {
            Ok(pinned) => {
                let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|source| {
                    DataplaneError::PinnedLink {
                        path: path.clone(),
                        source,
                    }
                })?;
                info!(ifname, "taking over the pinned XDP link");
                program.attach_to_link(link)?
            }
            Err(_) => program.attach(ifname, mode)?,
        };
        let link = program.take_link(link_id)?;
        let fd_link = FdLink::try_from(link).map_err(|source| DataplaneError::PinnedLink {
            path: path.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(&path);
        let pinned = fd_link
            .pin(&path)
            .map_err(|source| DataplaneError::Pin { path, source })?;
        self.links.push((ifname.to_owned(), pinned));
        let program_path = pins::program(&self.pin_dir);
        let _ = std::fs::remove_file(&program_path);
        program_mut(&mut self.ebpf)?
            .pin(&program_path)
            .map_err(|source| DataplaneError::Pin {
                path: program_path,
                source,
            })
    }

    /// Whether this run attached XDP to `ifname`.
    pub fn is_attached(&self, ifname: &str) -> bool {
        self.links.iter().any(|(name, _)| name == ifname)
    }

    /// Tells XDP whether to answer ARP for `addr` on `ifindex`, and with which MAC.
    pub fn set_vip(
        &mut self,
        ifindex: u32,
        addr: Ipv4Addr,
        vhid: u8,
        mac: [u8; 6],
        role: Role,
    ) -> Result<(), DataplaneError> {
        let key = VipKey {
            ifindex,
            addr: addr.octets(),
        };
        let entry = VipEntry {
            mac,
            role: role.as_u8(),
            vhid,
        };
        let index = self.vip_slot(&key)?;
        self.vips
            .set(index, VipSlot { key, entry }, 0)
            .map_err(map_error(VIP_MAP))
    }

    /// The VIP table slot `key` holds, else the first free one on its probe sequence (a
    /// removed VIP's slot is reused; XDP stops probing only at a never-used one).
    fn vip_slot(&self, key: &VipKey) -> Result<u32, DataplaneError> {
        if let Some(index) = self.held_vip_slot(key)? {
            return Ok(index);
        }
        for index in vip_probe_slots(key) {
            let slot = self.vips.get(&index, 0).map_err(map_error(VIP_MAP))?;
            if slot.is_free() {
                return Ok(index);
            }
        }
        Err(DataplaneError::VipTableFull {
            addr: Ipv4Addr::from(key.addr),
        })
    }

    /// The slot holding `key`, if any.
    fn held_vip_slot(&self, key: &VipKey) -> Result<Option<u32>, DataplaneError> {
        for index in vip_probe_slots(key) {
            let slot = self.vips.get(&index, 0).map_err(map_error(VIP_MAP))?;
            if slot.key == *key {
                return Ok(Some(index));
            }
            if !slot.is_used() {
                break;
            }
        }
        Ok(None)
    }

    /// Forgets a VIP (removed from the configuration): XDP no longer knows the address, nor
    /// the vhid's virtual MAC on `ifindex`.
    pub fn remove_vip(
        &mut self,
        ifindex: u32,
        addr: Ipv4Addr,
        vhid: u8,
    ) -> Result<(), DataplaneError> {
        let key = VipKey {
            ifindex,
            addr: addr.octets(),
        };
        if let Some(index) = self.held_vip_slot(&key)? {
            self.vips
                .set(index, VipSlot::REMOVED, 0)
                .map_err(map_error(VIP_MAP))?;
        }
        let vmac = VmacKey {
            ifindex,
            vhid,
            _pad: [0; 3],
        };
        match self.vmacs.remove(&vmac) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DataplaneError::Map {
                name: VMAC_MAP,
                source,
            }),
        }
    }

    /// Tells XDP whether frames to vhid's virtual MAC on `ifindex` are ours.
    pub fn set_vmac(
        &mut self,
        ifindex: u32,
        vhid: u8,
        if_mac: [u8; 6],
        role: Role,
    ) -> Result<(), DataplaneError> {
        let key = VmacKey {
            ifindex,
            vhid,
            _pad: [0; 3],
        };
        let entry = VmacEntry {
            if_mac,
            role: role.as_u8(),
            _pad: 0,
        };
        self.vmacs
            .insert(key, entry, 0)
            .map_err(map_error(VMAC_MAP))
    }

    /// Marks the daemon alive for `lifetime` from now (CLOCK_MONOTONIC_COARSE, XDP's clock).
    pub fn refresh_heartbeat(&mut self, lifetime: Duration) -> Result<(), DataplaneError> {
        let heartbeat = Heartbeat {
            refreshed_ns: monotonic_ns(),
            lifetime_ns: lifetime.as_nanos() as u64,
        };
        self.heartbeat
            .set(0, heartbeat, 0)
            .map_err(map_error(HEARTBEAT_MAP))
    }

    /// Whether XDP still counts a daemon alive: one ran here within its heartbeat lifetime
    /// (read at start, to adopt a crashed or restarted master's VIPs).
    pub fn heartbeat_fresh(&self) -> bool {
        self.heartbeat
            .get(&0, 0)
            .is_ok_and(|heartbeat| heartbeat.is_fresh(monotonic_ns()))
    }

    /// The role XDP holds for `addr` on `ifindex`, if the VIP table has it.
    pub fn vip_role(&self, ifindex: u32, addr: Ipv4Addr) -> Option<Role> {
        let key = VipKey {
            ifindex,
            addr: addr.octets(),
        };
        let index = self.held_vip_slot(&key).ok()??;
        let slot = self.vips.get(&index, 0).ok()?;
        let role = match slot.entry.role {
            ROLE_MASTER => Role::Master,
            _ => Role::Backup,
        };
        (slot.is_used() && slot.key == key).then_some(role)
    }

    /// Marks the daemon dead at once: XDP stops answering for every VIP.
    pub fn clear_heartbeat(&mut self) -> Result<(), DataplaneError> {
        self.heartbeat
            .set(0, Heartbeat::default(), 0)
            .map_err(map_error(HEARTBEAT_MAP))
    }

    /// The flow map's entry for `key`, with what XDP's per-CPU caches still hold for it (a
    /// read racing XDP's write-back may count those packets twice; the next read is right).
    pub fn flow(&self, key: &FlowKey) -> Option<FlowEntry> {
        let mut entry = self.flows.get(key, 0).ok()?;
        if let Ok(slots) = self.flow_cache.get(&key.cache_slot(), 0) {
            for slot in slots.iter().filter(|slot| slot.holds(key)) {
                slot.fold_into(&mut entry);
            }
        }
        Some(entry)
    }

    /// How many flows the map holds.
    pub fn flow_count(&self) -> usize {
        self.flows.keys().filter(Result::is_ok).count()
    }

    /// The next delta XDP put on the ring buffer, if any.
    pub fn next_delta(&mut self) -> Option<FlowDelta> {
        read_delta(&self.deltas.as_mut()?.next()?)
    }

    /// The ring buffer of deltas, for the sync service (once).
    pub fn take_deltas(&mut self) -> Option<RingBuf<MapData>> {
        self.deltas.take()
    }

    /// A second handle on the flow map, for the thread that installs the peer's flows.
    pub fn open_flow_map(&self) -> Result<HashMap<MapData, FlowKey, FlowEntry>, DataplaneError> {
        let data = MapData::from_pin(self.pin_dir.join(FLOW_MAP)).map_err(map_error(FLOW_MAP))?;
        HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_error(FLOW_MAP))
    }

    /// The XDP counters summed over CPUs, indexed by `carp_common::maps::STAT_*`.
    pub fn stats(&self) -> Result<[u64; STAT_SLOTS as usize], DataplaneError> {
        let mut out = [0u64; STAT_SLOTS as usize];
        for (slot, total) in out.iter_mut().enumerate() {
            let per_cpu = self
                .stats
                .get(&(slot as u32), 0)
                .map_err(map_error(STATS_MAP))?;
            *total = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Clean shutdown: detaches from every interface and removes the pins, leaving nothing
    /// behind in bpffs.
    pub fn detach_and_unpin(mut self) {
        for (ifname, pinned) in self.links.drain(..) {
            match pinned.unpin() {
                Ok(link) => drop(link),
                Err(e) => warn!(ifname, error = %e, "cannot unpin XDP link"),
            }
        }
        remove_pin_dir(&self.pin_dir);
    }
}

/// Removes a node's pin directory and everything pinned in it.
pub fn remove_pin_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(path = %dir.display(), error = %e, "cannot remove pin directory");
    }
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    let program = ebpf
        .program_mut(XDP_PROGRAM)
        .ok_or(DataplaneError::Missing { name: XDP_PROGRAM })?;
    Ok(program.try_into()?)
}

fn take_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, MapError>,
) -> Result<T, DataplaneError> {
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::Missing { name })?;
    convert(map).map_err(map_error(name))
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// A delta as XDP wrote it into a ring-buffer item.
pub fn read_delta(item: &[u8]) -> Option<FlowDelta> {
    (item.len() >= std::mem::size_of::<FlowDelta>())
        // SAFETY: XDP writes whole FlowDelta records; read unaligned from the ring.
        .then(|| unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowDelta>()) })
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock `bpf_ktime_get_coarse_ns` reads.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Mounts bpffs at /sys/fs/bpf when it is missing (as iproute2 does); pins need it.
fn ensure_bpffs() -> Result<(), DataplaneError> {
    let is_bpffs = |p: &str| {
        nix::sys::statfs::statfs(p)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
    };
    if is_bpffs(pins::BPFFS) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        pins::BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|_| DataplaneError::NoBpffs)?;
    if is_bpffs(pins::BPFFS) {
        Ok(())
    } else {
        Err(DataplaneError::NoBpffs)
    }
}
