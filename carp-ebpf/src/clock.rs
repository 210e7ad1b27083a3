//! The coarse monotonic clock at the price of a memory read: `bpf_ktime_get_coarse_ns` is a
//! helper call (tens of ns per frame here), while `bpf_jiffies64` is inlined by the verifier.
//! Both advance on the same tick, so each CPU reads the coarse clock once per jiffy and keeps
//! it; within a jiffy the coarse clock would return the same value anyway.

use aya_ebpf::{
    btf_maps::PerCpuArray,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::btf_map,
};

/// One CPU's last reading: the jiffy it was taken in and CLOCK_MONOTONIC_COARSE then.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ClockMemo {
    jiffies: u64,
    coarse_ns: u64,
}

/// Per-CPU scratch, not pinned: losing it costs one helper call.
#[btf_map]
static CARP_CLOCK: PerCpuArray<ClockMemo, 1> = PerCpuArray::new();

/// CLOCK_MONOTONIC_COARSE in nanoseconds, the clock the daemon writes its heartbeat with.
#[inline(always)]
pub fn coarse_now_ns() -> u64 {
    coarse_ns_at(jiffies())
}

/// The tick counter: a plain load once the verifier inlines it.
#[inline(always)]
pub fn jiffies() -> u64 {
    // SAFETY: bpf_jiffies64 has no preconditions.
    unsafe { bpf_jiffies64() }
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds during tick `jiffies` (the current one).
#[inline(always)]
pub fn coarse_ns_at(jiffies: u64) -> u64 {
    let Some(memo) = CARP_CLOCK.get_ptr_mut(0) else {
        // SAFETY: as below.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot; XDP runs without preemption, so nobody else writes it now.
    let memo = unsafe { &mut *memo };
    if memo.jiffies != jiffies {
        // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
        memo.coarse_ns = unsafe { bpf_ktime_get_coarse_ns() };
        memo.jiffies = jiffies;
    }
    memo.coarse_ns
}
