//! User-space only: lets aya read and write the shared types as map keys and values.

use crate::{
    flow::{FlowCacheSlot, FlowDelta, FlowEntry, FlowKey},
    maps::{Heartbeat, VipSlot, VmacEntry, VmacKey},
};

// SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers and byte arrays, with
// explicit padding, so every bit pattern is valid.
unsafe impl aya::Pod for VipSlot {}
unsafe impl aya::Pod for VmacKey {}
unsafe impl aya::Pod for VmacEntry {}
unsafe impl aya::Pod for Heartbeat {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for FlowEntry {}
unsafe impl aya::Pod for FlowDelta {}
unsafe impl aya::Pod for FlowCacheSlot {}
