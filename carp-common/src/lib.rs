//! Plain-old-data types shared by the XDP programs and the daemon: map keys, map values and
//! the names under which the maps are pinned. Kernel and user space read the same bytes, so
//! every type is `#[repr(C)]`, fixed-width, explicitly padded and size-checked.
#![no_std]

pub mod flow;
pub mod maps;

#[cfg(feature = "user")]
mod user;
