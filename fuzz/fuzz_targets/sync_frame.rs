//! Anything a peer (or an attacker past the transport) can put on the sync port: the
//! streaming decoder, the merge rule and the bulk session must never panic, and whatever
//! decodes must re-encode to the same frame. Records go on through what the installer makes of
//! them: XDP entries and the kernel's TCP state and timeout.
#![no_main]

use carp::{
    conntrack::KernelTcpState,
    sync::{bulk::BulkSync, merge::FlowTable, proto::Frame, view},
};
use libfuzzer_sys::fuzz_target;
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut table = FlowTable::default();
    let mut bulk = BulkSync::new();
    bulk.handle_connected(now);
    let mut rest = data;
    while let Ok(Some((frame, used))) = Frame::decode(rest) {
        assert!(used > 0 && used <= rest.len());
        let mut again = Vec::new();
        frame.encode(&mut again);
        assert_eq!(
            Frame::decode(&again),
            Ok(Some((frame.clone(), again.len())))
        );
        if let Frame::Upsert { records } = &frame {
            for r in records {
                table.merge(*r, now);
                let entries = view::entries_of(r, u64::MAX);
                assert!((1..=2).contains(&entries.len()));
                let _ = (
                    view::ended(r),
                    view::kernel_timeout(r),
                    KernelTcpState::of(r),
                );
            }
        }
        bulk.handle_frame(&frame, now);
        rest = &rest[used..];
    }
    bulk.handle_timeout(now);
});
