//! `BPF_MAP_UPDATE_BATCH`: many entries of a map in one system call (aya wraps only the
//! single-entry update, a system call and a value allocation in the kernel per entry).

use aya::{
    Pod,
    maps::{HashMap, IterableMap, MapData},
};
use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `union bpf_attr`'s member for the batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `keys[i] -> values[i]` into `map` for every `i`, in order. On failure, the error
/// and how many entries were written before it.
pub fn update_batch<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(keys.len()).expect("fewer than 2^32 entries");
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` names `count` keys and values laid out back to back; aya checked when
    // it opened `map` that K and V have the map's key and value sizes, and both slices
    // outlive the call. The kernel writes only `attr.count`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        let error = io::Error::last_os_error();
        Err(((attr.count as usize).min(keys.len()), error))
    }
}
