//! Writes the peer's flows into XDP's flow map (marked learned) on a thread of its own, in
//! batches, while the installer fills the kernel's conntrack with the same records.

use super::{
    install_stats::InstallStats,
    view,
    worker::{Worker, lock},
};
use crate::{
    dataplane::monotonic_ns,
    flow::{FlowKey, FlowRecord},
    map_batch::update_batch,
};
use aya::maps::{HashMap as BpfHashMap, MapData};
use carp_common::flow::{self as xdp, FlowEntry};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, mpsc},
};
use tracing::debug;

/// The flow map as the writer fills it.
pub type FlowMap = BpfHashMap<MapData, xdp::FlowKey, FlowEntry>;

enum Job {
    Write(Arc<Vec<FlowRecord>>),
    /// Ended connections.
    Remove(Vec<FlowKey>),
    /// Answered once every earlier job is done.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// The writer thread's inbox; the thread ends when this is dropped.
pub struct FlowWriter {
    jobs: mpsc::Sender<Job>,
}

struct Writer {
    flows: FlowMap,
    /// The XDP keys written for each connection, to remove them when it ends.
    views: HashMap<FlowKey, Vec<xdp::FlowKey>>,
    stats: Arc<Mutex<InstallStats>>,
}

impl FlowWriter {
    /// Starts the writer thread; failed writes count in `stats.map_errors`, jobs that panic
    /// in `worker`.
    pub fn spawn(
        flows: FlowMap,
        stats: Arc<Mutex<InstallStats>>,
        worker: Arc<Worker>,
    ) -> std::io::Result<Self> {
        let (jobs, inbox) = mpsc::channel();
        let mut writer = Writer {
            flows,
            views: HashMap::new(),
            stats,
        };
        std::thread::Builder::new()
            .name("carp-flowmap".into())
            .spawn(move || {
                while let Ok(job) = inbox.recv() {
                    // The map is the kernel's; what a panic leaves here is at most a view
                    // to remove later, so the writer goes on as it is.
                    worker.guard(|| match job {
                        Job::Write(records) => writer.write(&records),
                        Job::Remove(keys) => writer.remove(&keys),
                        Job::Barrier(done) => {
                            let _ = done.send(());
                        }
                    });
                }
                worker.exited();
            })?;
        Ok(Self { jobs })
    }

    /// Writes the XDP flows of `records`, after everything handed over before.
    pub fn write(&self, records: Arc<Vec<FlowRecord>>) {
        let _ = self.jobs.send(Job::Write(records));
    }

    /// Removes the XDP flows of these connections.
    pub fn remove(&self, keys: Vec<FlowKey>) {
        let _ = self.jobs.send(Job::Remove(keys));
    }

    /// Answers `done` once everything handed over before is in the map.
    pub fn barrier(&self, done: tokio::sync::oneshot::Sender<()>) {
        let _ = self.jobs.send(Job::Barrier(done));
    }
}

impl Writer {
    fn write(&mut self, records: &[FlowRecord]) {
        let now_ns = monotonic_ns();
        let (mut keys, mut entries) = (Vec::new(), Vec::new());
        for record in records {
            let views = self.views.entry(record.key).or_default();
            views.clear();
            for (key, entry) in view::entries_of(record, now_ns) {
                views.push(key);
                keys.push(key);
                entries.push(entry);
            }
        }
        // One system call per batch; past an entry the kernel refuses, the rest goes on.
        let (mut keys, mut entries) = (&keys[..], &entries[..]);
        while let Err((written, error)) = update_batch(&self.flows, keys, entries) {
            lock(&self.stats).map_errors += 1;
            debug!(%error, "flow map batch update failed");
            let past = (written + 1).min(keys.len());
            keys = &keys[past..];
            entries = &entries[past..];
        }
    }

    fn remove(&mut self, connections: &[FlowKey]) {
        for views in connections.iter().filter_map(|c| self.views.remove(c)) {
            // A key XDP's LRU already evicted is no error.
            for key in views {
                let _ = self.flows.remove(&key);
            }
        }
    }
}
