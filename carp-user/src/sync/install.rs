//! Puts the peer's flows where a takeover needs them: XDP's flow map (marked learned) and the
//! kernel's conntrack, with the NAT mapping and timeouts. Jobs run in arrival order on their
//! own thread (the map writes on one more), so a barrier answered here means everything
//! received before it is installed.

use super::{
    flow_writer::{FlowMap, FlowWriter},
    install_stats::InstallStats,
    worker::{Worker, lock},
};
use crate::{
    conntrack::{Change, Conntrack},
    flow::{FlowKey, FlowRecord},
};
use std::{
    collections::HashSet,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};
use tracing::warn;

/// Records per conntrack batch.
const JOB_BATCH: usize = 8192;
/// Shortest gap between two warnings about failed installs.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// Work for the installer.
#[derive(Debug)]
pub enum Job {
    /// The peer's flows, from a frame that arrived at `received`.
    Upsert {
        records: Vec<FlowRecord>,
        received: Instant,
    },
    Delete(Vec<FlowKey>),
    /// Answered once every earlier job is done.
    Barrier(tokio::sync::oneshot::Sender<()>),
    /// TCP connections this node carried before the peer did: their windows moved on.
    Liberal(Vec<FlowKey>),
    /// Panics the installer: the test hook that shows a dead installer is noticed.
    Panic,
}

struct Installer {
    conntrack: Option<Conntrack>,
    flows: Option<FlowWriter>,
    /// Connections a create was sent for: later records are updates.
    in_kernel: HashSet<FlowKey>,
    report: Report,
}

/// Counts and logs what the installer does (apart from the handles, so both borrow).
struct Report {
    stats: Arc<Mutex<InstallStats>>,
    last_warning: Option<Instant>,
}

/// The installer's and its map writer's health, for `carp status`.
pub struct Workers {
    pub installer: Arc<Worker>,
    pub flow_writer: Arc<Worker>,
}

impl Default for Workers {
    fn default() -> Self {
        Self {
            installer: Arc::new(Worker::new("installer")),
            flow_writer: Arc::new(Worker::new("flow map writer")),
        }
    }
}

/// Starts the installer thread; it ends when `jobs` closes. A job that panics is logged and
/// counted in `workers`, and the installer goes on with a fresh ctnetlink socket.
pub fn spawn(
    conntrack: Option<Conntrack>,
    flows: Option<FlowMap>,
    jobs: mpsc::Receiver<Job>,
    stats: Arc<Mutex<InstallStats>>,
    workers: &Workers,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let flows = flows
        .map(|flows| FlowWriter::spawn(flows, stats.clone(), workers.flow_writer.clone()))
        .transpose()?;
    let worker = workers.installer.clone();
    let mut installer = Installer {
        conntrack,
        flows,
        in_kernel: HashSet::new(),
        report: Report {
            stats,
            last_warning: None,
        },
    };
    std::thread::Builder::new()
        .name("carp-install".into())
        .spawn(move || {
            while let Ok(job) = jobs.recv() {
                if worker.guard(|| installer.run(job)).is_none() {
                    installer.start_afresh();
                }
            }
            worker.exited();
        })
}

impl Installer {
    /// After a panic: a new ctnetlink socket (the old one may be mid-batch), and every
    /// connection created again (a create that finds one becomes an update).
    fn start_afresh(&mut self) {
        if self.conntrack.is_some() {
            self.conntrack = match Conntrack::open() {
                Ok(conntrack) => Some(conntrack),
                Err(e) => {
                    self.report
                        .failed(0, format!("reopening ctnetlink after a panic: {e}"));
                    None
                }
            };
        }
        self.in_kernel.clear();
    }

    fn run(&mut self, job: Job) {
        match job {
            Job::Upsert { records, received } => {
                let records = Arc::new(records);
                if let Some(flows) = &self.flows {
                    flows.write(records.clone());
                }
                for batch in records.chunks(JOB_BATCH) {
                    self.upsert(batch);
                }
                lock(&self.report.stats)
                    .install_lag
                    .observe(received.elapsed());
            }
            Job::Delete(keys) => {
                if let Some(flows) = &self.flows {
                    flows.remove(keys.clone());
                }
                self.delete(&keys);
            }
            Job::Barrier(done) => match &self.flows {
                Some(flows) => flows.barrier(done),
                None => {
                    let _ = done.send(());
                }
            },
            Job::Liberal(keys) => self.liberal(&keys),
            Job::Panic => panic!("installer panic requested through the test hook"),
        }
    }

    fn upsert(&mut self, records: &[FlowRecord]) {
        // Create what the kernel lacks; a create that finds one, or an update that finds
        // none (it expired there), is tried once more the other way.
        let mut changes: Vec<Change> = records
            .iter()
            .map(|record| {
                if self.in_kernel.insert(record.key) {
                    Change::Create(record)
                } else {
                    Change::Update(record)
                }
            })
            .collect();
        let Some(conntrack) = &mut self.conntrack else {
            return;
        };
        let (mut ok_created, mut ok_updated) = (0u64, 0u64);
        for retrying in [false, true] {
            if changes.is_empty() {
                break;
            }
            let results = match conntrack.apply(&changes) {
                Ok(results) => results,
                Err(e) => {
                    let count = changes.len() as u64;
                    self.report.failed(count, format!("ctnetlink: {e}"));
                    break;
                }
            };
            let mut again = Vec::new();
            for (change, result) in changes.iter().zip(results) {
                match (result, change) {
                    (Ok(()), Change::Create(_)) => ok_created += 1,
                    (Ok(()), _) => ok_updated += 1,
                    (Err(libc::EEXIST), Change::Create(r)) if !retrying => {
                        again.push(Change::Update(r));
                    }
                    (Err(libc::ENOENT), Change::Update(r)) if !retrying => {
                        again.push(Change::Create(r));
                    }
                    (Err(errno), _) => {
                        let what = std::io::Error::from_raw_os_error(errno);
                        let label = if retrying {
                            "conntrack retry"
                        } else {
                            "conntrack"
                        };
                        self.report.failed(1, format!("{label}: {what}"));
                    }
                }
            }
            changes = again;
        }
        let mut stats = lock(&self.report.stats);
        stats.conntrack_created += ok_created;
        stats.conntrack_updated += ok_updated;
    }

    fn liberal(&mut self, keys: &[FlowKey]) {
        let Some(conntrack) = &mut self.conntrack else {
            return;
        };
        let changes: Vec<Change> = keys.iter().map(Change::Liberal).collect();
        for batch in changes.chunks(JOB_BATCH) {
            match conntrack.apply(batch) {
                // A connection the kernel no longer holds needs nothing.
                Ok(results) => {
                    for errno in results.into_iter().filter_map(Result::err) {
                        if errno != libc::ENOENT {
                            let what = std::io::Error::from_raw_os_error(errno);
                            self.report.failed(1, format!("conntrack liberal: {what}"));
                        }
                    }
                }
                Err(e) => self
                    .report
                    .failed(batch.len() as u64, format!("ctnetlink: {e}")),
            }
        }
    }

    fn delete(&mut self, keys: &[FlowKey]) {
        for key in keys {
            self.in_kernel.remove(key);
        }
        let Some(conntrack) = &mut self.conntrack else {
            return;
        };
        let changes: Vec<Change> = keys.iter().map(Change::Delete).collect();
        match conntrack.apply(&changes) {
            Ok(results) => {
                let deleted = results.iter().filter(|r| r.is_ok()).count() as u64;
                lock(&self.report.stats).conntrack_deleted += deleted;
            }
            Err(e) => self
                .report
                .failed(keys.len() as u64, format!("ctnetlink: {e}")),
        }
    }
}

impl Report {
    fn failed(&mut self, count: u64, message: String) {
        let mut stats = lock(&self.stats);
        stats.conntrack_errors += count;
        stats.last_error = Some(message.clone());
        drop(stats);
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
        {
            self.last_warning = Some(now);
            warn!(error = %message, "installing synced flows failed");
        }
    }
}
