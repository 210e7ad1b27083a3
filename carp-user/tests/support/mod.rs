//! Shared by the BPF_PROG_TEST_RUN tests: a data plane loaded with its own pin directory, and
//! running the XDP program on one frame.

use aya::programs::{TestRun, TestRunOptions};
use carp::{
    dataplane::{Dataplane, remove_pin_dir},
    pins,
};
use carp_common::flow::DEFAULT_FLOWS_MAX;
use std::{path::PathBuf, sync::atomic::AtomicU32};

pub const XDP_PASS: u32 = 2;

/// A data plane loaded with its own pin directory, removed on drop.
pub struct Loaded {
    pub dataplane: Dataplane,
    dir: PathBuf,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        remove_pin_dir(&self.dir);
    }
}

/// XDP without flow capture.
pub fn load() -> Loaded {
    load_with(None)
}

/// XDP with flow capture on when `capture` says how often each flow's delta must be sent.
pub fn load_with(capture: Option<std::time::Duration>) -> Loaded {
    assert!(
        nix::unistd::geteuid().is_root(),
        "BPF_PROG_TEST_RUN tests need root: run them through `cargo xtask test` (CI runs as root)"
    );
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = pins::node_dir(&format!("xdptest-{}-{n}", std::process::id()));
    // A load the verifier refuses may already have pinned maps: remove them before failing.
    match Dataplane::load(&dir, DEFAULT_FLOWS_MAX, capture) {
        Ok(dataplane) => Loaded { dataplane, dir },
        Err(e) => {
            remove_pin_dir(&dir);
            panic!("XDP object loads and verifies: {e:?}");
        }
    }
}

/// Runs the program on `frame`; returns the action and the frame as the program left it.
pub fn run(loaded: &mut Loaded, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let result = loaded
        .dataplane
        .program()
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}
