//! The sync service in the daemon: the capture thread (XDP deltas -> records), the session
//! task (the authenticated link to the peer: bulk updates, live deltas, merges) and the
//! installer thread (peer flows -> flow map and conntrack). The capture never waits for the
//! link: a full queue is counted and the next refresh repairs it.

use super::{
    bulk::{BulkSync, Event},
    capture::{Capture, Local},
    config_link::{Answer, ConfigLink, ConfigSyncStatus, Explicit, Received},
    flow_writer::FlowMap,
    install::{self, Job, Workers},
    install_stats::InstallStats,
    lag::LagHistogram,
    merge::{FlowTable, Merged, Origin},
    proto::{Frame, delete_frames, upsert_frames},
    recent_deletes::{self, RecentDeletes},
    transport::{self, SharedKey, SyncStream, TransportError},
    unsent::{MAX_UNSENT_DELETES, UnsentDeletes},
    worker::{Worker, WorkerStatus, lock},
};
use crate::{
    conntrack::{Conntrack, KernelTcpState},
    dataplane::read_delta,
    error::Chain,
    flow::{FlowKey, FlowRecord},
};
use aya::maps::{MapData, RingBuf};
use carp_common::flow::IPPROTO_TCP;
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

/// Records between the capture thread and the session; more are dropped and counted.
const LOCAL_QUEUE: usize = 1 << 16;
/// Local events folded into one send.
const SEND_BATCH: usize = 8192;
/// Keepalives go out this often; a session silent for [`DEAD_AFTER`] is dropped.
const KEEPALIVE: Duration = Duration::from_secs(1);
const DEAD_AFTER: Duration = Duration::from_secs(4);
// Deletes sent before a dead link is noticed must still be told again after it.
const _: () = assert!(recent_deletes::RESEND_WITHIN.as_secs() > DEAD_AFTER.as_secs());
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The `[sync]` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    pub interface: String,
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    pub key: SharedKey,
    pub flows_max: u32,
}

/// The sync part of `carp status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub interface: String,
    pub listen: String,
    pub peer: String,
    /// The peer's node name, from its hello.
    pub peer_node: Option<String>,
    pub connected: bool,
    /// idle, requested, receiving, done or gave up.
    pub bulk: String,
    /// Whether CARP is demoted until the first bulk update completes.
    pub demoted: bool,
    pub flows_held: u64,
    pub flows_local: u64,
    pub deltas_sent: u64,
    pub deltas_received: u64,
    /// Deltas the capture could not queue for the link (repaired by refreshes).
    pub deltas_dropped: u64,
    /// Deltas XDP could not put on its full ring buffer.
    pub deltas_lost_in_xdp: u64,
    /// Updates older than ours, answered with our copy.
    pub stale_answered: u64,
    /// Flows that ended while the peer was away, kept (in the state directory too) until it
    /// is back.
    pub deletes_waiting: u64,
    pub sessions: u64,
    /// Connections dropped for a failed handshake, garbage or a bad frame.
    pub refused: u64,
    pub last_error: Option<String>,
    /// Whether synced flows reach the kernel's conntrack (ctnetlink could be opened).
    pub conntrack: bool,
    /// The sync threads: alive, and jobs that panicked (each restarted with fresh state).
    pub workers: Vec<WorkerStatus>,
    pub conntrack_lookups: u64,
    /// Mean cost of one conntrack lookup (the price of taking NAT from the kernel).
    pub conntrack_lookup_ns: u64,
    pub install: InstallStats,
    /// From reading a change off XDP's ring to having it on the sync link, per batch sent
    /// (its oldest change).
    pub send_lag: LagHistogram,
    /// Configuration sync over this link.
    pub config: ConfigSyncStatus,
}

/// One row of `carp flows`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRow {
    pub proto: u8,
    pub state: String,
    pub src: String,
    pub dst: String,
    pub sport: u16,
    pub dport: u16,
    pub reply_src: String,
    pub reply_dst: String,
    pub reply_sport: u16,
    pub reply_dport: u16,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub timeout_s: u32,
    pub origin: Origin,
}

/// What the daemon and the tasks share.
struct Shared {
    table: Mutex<FlowTable>,
    status: Mutex<SyncStatus>,
    install: Arc<Mutex<InstallStats>>,
    dropped: AtomicU64,
    lookups: AtomicU64,
    lookup_ns: AtomicU64,
    stop: AtomicBool,
    /// Test hook: frames from the peer are thrown away as if lost in flight.
    discard_frames: AtomicBool,
    workers: Workers,
    capture: Arc<Worker>,
}

/// The daemon's handle on the running service.
pub struct SyncHandle {
    shared: Arc<Shared>,
    demoted: watch::Receiver<bool>,
    jobs: std_mpsc::Sender<Job>,
    session: JoinHandle<()>,
    /// The sync listener, valid while the session runs (handed over by `carp upgrade`).
    listener_fd: RawFd,
    /// When [`SyncHandle::prepare_takeover`] last marked this node's connections.
    last_takeover: Mutex<Option<Instant>>,
    /// A primary's areas for the session to push.
    config_out: watch::Sender<Option<(String, String)>>,
    /// A secondary's pushes from the peer, for the daemon (taken once).
    config_in: Mutex<Option<mpsc::Receiver<Received>>>,
    /// A primary's operator pushes (`carp config push`, `diff`).
    config_explicit: mpsc::Sender<Explicit>,
    /// The daemon's answers to them.
    config_answers: mpsc::Sender<Answer>,
}

/// This node's part in configuration sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigRole {
    Off,
    /// Pushes its areas.
    Primary,
    /// Accepts the peer's.
    Secondary,
}

/// Starts capture, session and installer. `deltas` and `flows` are the XDP maps; `listener`
/// is the sync socket a previous run handed over, if any.
pub fn start(
    config: SyncConfig,
    node: String,
    state_dir: &Path,
    deltas: RingBuf<MapData>,
    flows: FlowMap,
    listener: Option<OwnedFd>,
    role: ConfigRole,
) -> std::io::Result<SyncHandle> {
    let conntrack = |what: &str| match Conntrack::open() {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, what, "no ctnetlink: flows sync without the kernel's conntrack");
            None
        }
    };
    let listener = match listener {
        Some(fd) => {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)?
        }
        None => bind(&config)?,
    };
    let listener_fd = listener.as_raw_fd();
    let installer_conntrack = conntrack("installing");
    let unsent = UnsentDeletes::load(state_dir);
    let shared = Arc::new(Shared {
        table: Mutex::new(FlowTable::default()),
        status: Mutex::new(SyncStatus {
            interface: config.interface.clone(),
            listen: config.listen.to_string(),
            peer: config.peer.to_string(),
            bulk: "idle".into(),
            demoted: true,
            // Shown from the first status on, not only once the session has run.
            deletes_waiting: unsent.len() as u64,
            conntrack: installer_conntrack.is_some(),
            config: ConfigSyncStatus {
                role: match role {
                    ConfigRole::Off => "off",
                    ConfigRole::Primary => "primary",
                    ConfigRole::Secondary => "secondary",
                }
                .into(),
                ..ConfigSyncStatus::default()
            },
            ..SyncStatus::default()
        }),
        install: Arc::new(Mutex::new(InstallStats::default())),
        dropped: AtomicU64::new(0),
        lookups: AtomicU64::new(0),
        lookup_ns: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        discard_frames: AtomicBool::new(false),
        workers: Workers::default(),
        capture: Arc::new(Worker::new("capture")),
    });
    let (jobs, jobs_rx) = std_mpsc::channel();
    install::spawn(
        installer_conntrack,
        Some(flows),
        jobs_rx,
        shared.install.clone(),
        &shared.workers,
    )?;
    let (local_tx, local_rx) = mpsc::channel(LOCAL_QUEUE);
    let lookups = conntrack("NAT lookups");
    let capture_shared = shared.clone();
    std::thread::Builder::new()
        .name("carp-capture".into())
        .spawn(move || capture_loop(deltas, lookups, local_tx, &capture_shared))?;
    let (demoted_tx, demoted) = watch::channel(true);
    let (config_out, outgoing) = watch::channel(None);
    let (pushes, config_in) = mpsc::channel(1);
    let (config_answers, answers) = mpsc::channel(4);
    let (config_explicit, explicit) = mpsc::channel(4);
    let config_link = ConfigLink {
        outgoing,
        explicit,
        to_daemon: (role == ConfigRole::Secondary).then_some(pushes),
        answers,
        partial: Vec::new(),
        sent: 0,
        answered: 0,
        waiter: None,
    };
    let session = tokio::spawn(
        Session {
            config_link,
            config,
            node,
            shared: shared.clone(),
            jobs: jobs.clone(),
            demoted: demoted_tx,
            bulk: BulkSync::new(),
            stream: None,
            last_rx: Instant::now(),
            generation: 0,
            outbox: Vec::new(),
            unsent,
            last_persist_error: None,
            recent_deletes: RecentDeletes::default(),
            pending_since: None,
        }
        .run(listener, local_rx),
    );
    Ok(SyncHandle {
        shared,
        demoted,
        jobs,
        session,
        listener_fd,
        last_takeover: Mutex::new(None),
        config_out,
        config_in: Mutex::new(Some(config_in)),
        config_explicit,
        config_answers,
    })
}

/// The listening socket, on the sync interface only.
fn bind(config: &SyncConfig) -> std::io::Result<TcpListener> {
    let socket = match config.listen {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind_device(Some(config.interface.as_bytes()))?;
    socket.bind(config.listen)?;
    socket.listen(16)
}

impl SyncHandle {
    /// Whether CARP must stay demoted: the first bulk update is not complete.
    pub fn demoted(&self) -> bool {
        *self.demoted.borrow()
    }

    /// Before claiming VIPs: the TCP connections this node captured itself may have been
    /// carried by the peer meanwhile, their windows moved past what this kernel saw, so the
    /// kernel stops checking their sequence numbers (the peer's flows were installed so
    /// already); then waits until all of it, and every flow received so far, is installed.
    /// False if that took longer than `limit`.
    pub async fn prepare_takeover(&self, limit: Duration) -> bool {
        // The VIPs of one takeover come one after another: once is enough.
        let now = Instant::now();
        let due = {
            let mut last = lock(&self.last_takeover);
            let due = last.is_none_or(|at| now.duration_since(at) > limit);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            let own: Vec<FlowKey> = lock(&self.shared.table)
                .held()
                .filter(|h| h.origin == Origin::Local && h.record.key.proto == IPPROTO_TCP)
                .map(|h| h.record.key)
                .collect();
            if !own.is_empty() {
                let _ = self.jobs.send(Job::Liberal(own));
            }
        }
        self.barrier(limit).await
    }

    /// Waits until every flow received so far is installed; false if that took longer than
    /// `limit`.
    pub async fn barrier(&self, limit: Duration) -> bool {
        let (done, wait) = oneshot::channel();
        if self.jobs.send(Job::Barrier(done)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(limit, wait).await, Ok(Ok(())))
    }

    pub fn status(&self) -> SyncStatus {
        let mut status = lock(&self.shared.status).clone();
        status.deltas_dropped = self.shared.dropped.load(Ordering::Relaxed);
        let lookups = self.shared.lookups.load(Ordering::Relaxed);
        status.conntrack_lookups = lookups;
        status.conntrack_lookup_ns = self
            .shared
            .lookup_ns
            .load(Ordering::Relaxed)
            .checked_div(lookups)
            .unwrap_or(0);
        status.install = lock(&self.shared.install).clone();
        status.workers = [
            &self.shared.workers.installer,
            &self.shared.workers.flow_writer,
            &self.shared.capture,
        ]
        .iter()
        .map(|w| w.status())
        .collect();
        let table = lock(&self.shared.table);
        status.flows_held = table.len() as u64;
        status.flows_local = table.held().filter(|h| h.origin == Origin::Local).count() as u64;
        status
    }

    /// The flow table, as `carp flows` lists it.
    pub fn flows(&self) -> Vec<FlowRow> {
        let table = lock(&self.shared.table);
        let mut rows: Vec<FlowRow> = table
            .held()
            .map(|h| flow_row(&h.record, h.origin))
            .collect();
        rows.sort_by(|a, b| (&a.src, a.sport, &a.dst).cmp(&(&b.src, b.sport, &b.dst)));
        rows
    }

    /// A primary's areas to push now and on every reconnect, with their content hash.
    pub fn push_config(&self, areas: String, hash: String) {
        self.config_out.send_replace(Some((areas, hash)));
    }

    /// An operator's push of `areas` with `flags`; the receiver gets the secondary's answer.
    pub fn push_config_now(
        &self,
        areas: String,
        hash: String,
        flags: u8,
    ) -> oneshot::Receiver<Answer> {
        let (answer, answered) = oneshot::channel();
        let _ = self.config_explicit.try_send(Explicit {
            areas,
            hash,
            flags,
            answer,
        });
        answered
    }

    /// A secondary's pushes from the peer (the daemon takes them once).
    pub fn take_config_pushes(&self) -> Option<mpsc::Receiver<Received>> {
        lock(&self.config_in).take()
    }

    /// What this node holds now, changed here (a rollback): no longer in step with the peer.
    pub fn config_held(&self, hash: String) {
        let mut status = lock(&self.shared.status);
        status.config.in_step = status.config.peer_hash.as_ref() == Some(&hash);
        status.config.local_hash = Some(hash);
    }

    /// The daemon's answer to a push, for the peer.
    pub fn answer_config(&self, answer: Answer) {
        let _ = self.config_answers.try_send(answer);
    }

    /// The sync listener, for `carp upgrade` to hand over before it stops the session.
    pub fn listener(&self) -> BorrowedFd<'_> {
        // SAFETY: the session task owns the listener and runs until `stop`, which takes self.
        unsafe { BorrowedFd::borrow_raw(self.listener_fd) }
    }

    /// Whether the session task still runs; it ends only by a panic (logged by tokio).
    /// Whether a session with the peer is up (it answered within the dead-peer time).
    pub fn connected(&self) -> bool {
        lock(&self.shared.status).connected
    }

    pub fn session_alive(&self) -> bool {
        !self.session.is_finished()
    }

    /// The test hook: panics the installer thread.
    pub fn panic_installer(&self) {
        let _ = self.jobs.send(Job::Panic);
    }

    /// The test hook: throw away every frame from the peer (or stop doing so).
    pub fn discard_frames(&self, discard: bool) {
        self.shared.discard_frames.store(discard, Ordering::Relaxed);
    }

    /// Stops the tasks and threads.
    pub fn stop(self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.session.abort();
    }
}

fn flow_row(r: &FlowRecord, origin: Origin) -> FlowRow {
    let state = match r.key.proto {
        IPPROTO_TCP => KernelTcpState::of(r).name().to_string(),
        _ if r.packets[1] > 0 => "REPLIED".into(),
        _ => "UNREPLIED".into(),
    };
    FlowRow {
        proto: r.key.proto,
        state,
        src: r.key.src.to_string(),
        dst: r.key.dst.to_string(),
        sport: r.key.src_port,
        dport: r.key.dst_port,
        reply_src: r.reply.src.to_string(),
        reply_dst: r.reply.dst.to_string(),
        reply_sport: r.reply.src_port,
        reply_dport: r.reply.dst_port,
        packets: r.packets,
        bytes: r.bytes,
        timeout_s: r.timeout_s,
        origin,
    }
}

/// Drains XDP's ring buffer into records for the session, until told to stop.
fn capture_loop(
    mut ring: RingBuf<MapData>,
    mut conntrack: Option<Conntrack>,
    out: mpsc::Sender<(Instant, Local)>,
    shared: &Shared,
) {
    let mut capture = Capture::default();
    let mut deltas = Vec::with_capacity(SEND_BATCH);
    while !shared.stop.load(Ordering::Relaxed) {
        let round = shared.capture.guard(|| {
            capture_round(
                &mut ring,
                conntrack.as_mut(),
                &out,
                shared,
                &mut capture,
                &mut deltas,
            );
        });
        if round.is_none() {
            // Views waiting for conntrack are gone: the next refresh of each flow repairs it.
            capture = Capture::default();
        }
    }
    shared.capture.exited();
}

/// One wait on the ring and what it brought.
fn capture_round(
    ring: &mut RingBuf<MapData>,
    conntrack: Option<&mut Conntrack>,
    out: &mpsc::Sender<(Instant, Local)>,
    shared: &Shared,
    capture: &mut Capture,
    deltas: &mut Vec<carp_common::flow::FlowDelta>,
) {
    // Views waiting for conntrack are looked up again soon.
    let timeout_ms = if capture.waiting() { 2 } else { 200 };
    let mut poll = libc::pollfd {
        fd: ring.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut poll, 1, timeout_ms) };
    deltas.clear();
    while deltas.len() < SEND_BATCH {
        let Some(item) = ring.next() else { break };
        if let Some(delta) = read_delta(&item) {
            deltas.push(delta);
        }
    }
    let before = (capture.stats.conntrack_lookups, capture.stats.lookup_ns);
    let read_at = Instant::now();
    for local in capture.handle(deltas, conntrack, read_at) {
        if out.try_send((read_at, local)).is_err() {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
    shared.lookups.fetch_add(
        capture.stats.conntrack_lookups - before.0,
        Ordering::Relaxed,
    );
    shared
        .lookup_ns
        .fetch_add(capture.stats.lookup_ns - before.1, Ordering::Relaxed);
}

/// The session task's state.
struct Session {
    config_link: ConfigLink,
    config: SyncConfig,
    node: String,
    shared: Arc<Shared>,
    jobs: std_mpsc::Sender<Job>,
    demoted: watch::Sender<bool>,
    bulk: BulkSync,
    stream: Option<SyncStream>,
    last_rx: Instant,
    generation: u64,
    /// Frames to send after the current event.
    outbox: Vec<Frame>,
    /// Flows that ended here while the peer was away. A bulk update carries what exists, not
    /// what ended: these go to the peer first thing on reconnect, before its bulk answer to
    /// us could send them back.
    unsent: UnsentDeletes,
    /// The last failure to keep them on disk, reported once until it changes.
    last_persist_error: Option<String>,
    /// Deletes the peer may have missed if the session dies now.
    recent_deletes: RecentDeletes,
    /// When the oldest change waiting in `pending` was read off XDP's ring.
    pending_since: Option<Instant>,
}

type Handshake = Result<(SyncStream, SocketAddr), (SocketAddr, TransportError)>;

impl Session {
    async fn run(mut self, listener: TcpListener, mut local: mpsc::Receiver<(Instant, Local)>) {
        let (handshakes_tx, mut handshakes) = mpsc::channel::<Handshake>(8);
        // One side dials, so the two never race each other into two sessions.
        let dialer = self.config.listen < self.config.peer;
        let mut dialing: Option<JoinHandle<()>> = None;
        let mut tick = tokio::time::interval(KEEPALIVE);
        let mut pending: HashMap<FlowKey, Local> = HashMap::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((stream, from)) = accepted {
                        let key = self.config.key.clone();
                        let tx = handshakes_tx.clone();
                        tokio::spawn(async move {
                            let result = transport::respond(stream, &key).await;
                            let _ = tx.send(result.map(|s| (s, from)).map_err(|e| (from, e))).await;
                        });
                    }
                }
                Some(handshake) = handshakes.recv() => match handshake {
                    Ok((stream, from)) => self.connected(stream, from),
                    Err((from, e)) => self.refused(from, &e),
                },
                frame = recv(&mut self.stream) => match frame {
                    Ok(frame) => self.on_frame(frame),
                    Err(e) => self.disconnected(&e),
                },
                Ok(()) = self.config_link.outgoing.changed() => {
                    if self.stream.is_some() {
                        self.push_config();
                    }
                }
                Some(push) = self.config_link.explicit.recv() => {
                    let connected = self.stream.is_some();
                    let frames = self.config_link.push_explicit(
                        push,
                        connected,
                        &mut lock(&self.shared.status).config,
                    );
                    self.outbox.extend(frames);
                }
                Some(answer) = self.config_link.answers.recv() => {
                    let frame = ConfigLink::answer(answer, &mut lock(&self.shared.status).config);
                    self.outbox.push(frame);
                }
                Some((read_at, event)) = local.recv() => {
                    let now = Instant::now();
                    self.on_local(event, &mut pending, now, read_at);
                    while pending.len() < SEND_BATCH {
                        let Ok((read_at, event)) = local.try_recv() else { break };
                        self.on_local(event, &mut pending, now, read_at);
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.bulk.handle_timeout(now);
                    let expired = lock(&self.shared.table).expire(now);
                    if !expired.is_empty() {
                        let _ = self.jobs.send(Job::Delete(expired));
                    }
                    if let Some(stream) = &self.stream {
                        self.last_rx = self.last_rx.max(stream.last_progress());
                        if now.duration_since(self.last_rx) > DEAD_AFTER {
                            self.disconnected(&TransportError::Silent(DEAD_AFTER));
                        } else {
                            self.outbox.push(Frame::Keepalive);
                        }
                    }
                    self.persist_unsent();
                    if dialer && self.stream.is_none() && dialing.as_ref().is_none_or(|d| d.is_finished()) {
                        dialing = Some(tokio::spawn(dial(self.config.clone(), handshakes_tx.clone())));
                    }
                }
            }
            self.flush(&mut pending).await;
            self.publish();
        }
    }

    fn connected(&mut self, stream: SyncStream, from: SocketAddr) {
        info!(%from, "sync session established");
        self.stream = Some(stream);
        self.last_rx = Instant::now();
        self.outbox.clear();
        self.outbox.push(Frame::Hello {
            node: self.node.clone(),
        });
        self.push_config();
        // Kept until the peer answers the bulk request that follows them.
        let keys = self.unsent.send_all();
        if !keys.is_empty() {
            info!(
                flows = keys.len(),
                "telling the peer of flows that ended while it was away"
            );
            self.outbox.extend(delete_frames(&keys));
        }
        let overflow = self.unsent.take_overflow();
        if overflow > 0 {
            warn!(
                flows = overflow,
                limit = MAX_UNSENT_DELETES,
                "more flows ended while the peer was away than are kept: those linger there until they time out"
            );
        }
        self.bulk.handle_connected(Instant::now());
        let mut status = lock(&self.shared.status);
        status.connected = true;
        status.sessions += 1;
    }

    fn refused(&mut self, from: SocketAddr, e: &TransportError) {
        warn!(%from, error = %Chain(e), "sync connection refused");
        let mut status = lock(&self.shared.status);
        status.refused += 1;
        status.last_error = Some(format!("{from}: {}", Chain(e)));
    }

    fn disconnected(&mut self, e: &TransportError) {
        if self.stream.take().is_none() {
            return;
        }
        warn!(error = %Chain(e), "sync session lost");
        self.bulk.handle_disconnected();
        self.config_link.disconnected();
        self.unsent.unacknowledged();
        self.outbox.clear();
        // The peer may have missed the last deletes: told again on reconnect, unless the flow
        // is alive here again.
        let table = lock(&self.shared.table);
        let resend = self.recent_deletes.lost(|key| table.get(key).is_some());
        drop(table);
        for key in resend {
            self.unsent.insert(key);
        }
        self.persist_unsent();
        let mut status = lock(&self.shared.status);
        status.connected = false;
        if !matches!(e, TransportError::Closed) {
            status.refused += 1;
        }
        status.last_error = Some(Chain(e).to_string());
    }

    fn on_local(
        &mut self,
        event: Local,
        pending: &mut HashMap<FlowKey, Local>,
        now: Instant,
        read_at: Instant,
    ) {
        self.pending_since = Some(self.pending_since.map_or(read_at, |t| t.min(read_at)));
        let mut table = lock(&self.shared.table);
        let key = match event {
            Local::Upsert(record) => {
                table.hold(record, Origin::Local, now);
                // Alive again (the same tuple reused): the bulk update carries it.
                self.unsent.remove(&record.key);
                record.key
            }
            Local::Delete(key) => {
                table.end(&key, now);
                key
            }
        };
        // Coalesced: only the newest state of a flow goes out.
        pending.insert(key, event);
    }

    fn on_frame(&mut self, frame: Frame) {
        if self.shared.discard_frames.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        self.last_rx = now;
        self.bulk.handle_frame(&frame, now);
        match frame {
            Frame::Hello { node } => {
                info!(peer = %node, "sync peer says hello");
                lock(&self.shared.status).peer_node = Some(node);
            }
            Frame::BulkRequest => self.answer_bulk(),
            // The peer reads frames in order: its answer to our bulk request means it read
            // the deletes we sent before that request.
            Frame::BulkStart { .. } => self.unsent.acknowledged(),
            Frame::Upsert { records } => {
                let Merged { install, answer } =
                    lock(&self.shared.table).merge_batch(&records, now);
                let mut status = lock(&self.shared.status);
                status.deltas_received += records.len() as u64;
                status.stale_answered += answer.len() as u64;
                drop(status);
                if !install.is_empty() {
                    let _ = self.jobs.send(Job::Upsert {
                        records: install,
                        received: now,
                    });
                }
                self.outbox.extend(upsert_frames(&answer));
            }
            Frame::Delete { keys } => {
                let mut table = lock(&self.shared.table);
                for key in &keys {
                    table.remove(key);
                }
                drop(table);
                lock(&self.shared.status).deltas_received += keys.len() as u64;
                let _ = self.jobs.send(Job::Delete(keys));
            }
            Frame::ConfigPush {
                schema,
                flags,
                part,
                parts,
                areas,
            } => {
                let refused = self.config_link.on_push(
                    schema,
                    flags,
                    part,
                    parts,
                    areas,
                    &mut lock(&self.shared.status).config,
                );
                self.outbox.extend(refused);
            }
            Frame::ConfigResult {
                schema,
                ok,
                hash,
                message,
            } => self.config_link.on_result(
                schema,
                ok,
                hash,
                message,
                &mut lock(&self.shared.status).config,
            ),
            Frame::BulkEnd { .. } | Frame::Keepalive => {}
        }
        while let Some(event) = self.bulk.poll_event() {
            match event {
                Event::Completed { received } => info!(received, "bulk update from the peer done"),
                Event::GaveUp { attempts } => warn!(attempts, "bulk update given up"),
            }
        }
    }

    /// Our areas, if this node pushes any.
    fn push_config(&mut self) {
        let frame = self.config_link.push(&mut lock(&self.shared.status).config);
        self.outbox.extend(frame);
    }

    /// pfsync's bulk update: start, every flow held, end.
    fn answer_bulk(&mut self) {
        self.generation += 1;
        let records = lock(&self.shared.table).records(Instant::now());
        info!(flows = records.len(), "answering the peer's bulk request");
        self.outbox.push(Frame::BulkStart {
            generation: self.generation,
        });
        self.outbox.extend(upsert_frames(&records));
        self.outbox.push(Frame::BulkEnd {
            generation: self.generation,
            count: records.len() as u64,
        });
    }

    /// Sends what the last event produced: bulk requests, answers, coalesced local deltas.
    async fn flush(&mut self, pending: &mut HashMap<FlowKey, Local>) {
        while let Some(frame) = self.bulk.poll_transmit() {
            self.outbox.push(frame);
        }
        let waiting_since = self.pending_since.take();
        let Some(stream) = &mut self.stream else {
            // No peer: the bulk update on reconnect carries the table, the deletes wait.
            for (key, event) in pending.drain() {
                if matches!(event, Local::Delete(_)) {
                    self.unsent.insert(key);
                }
            }
            self.persist_unsent();
            self.outbox.clear();
            return;
        };
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for (key, event) in pending.drain() {
            match event {
                Local::Upsert(record) => upserts.push(record),
                Local::Delete(_) => deletes.push(key),
            }
        }
        let sent = (upserts.len() + deletes.len()) as u64;
        self.outbox.extend(upsert_frames(&upserts));
        self.outbox.extend(delete_frames(&deletes));
        if self.outbox.is_empty() {
            return;
        }
        let frames = std::mem::take(&mut self.outbox);
        let started = Instant::now();
        let result = stream.send(&frames).await;
        if result.is_ok() && started.elapsed() > KEEPALIVE {
            // Nothing was read while the send waited for the peer to take it; that it did
            // shows the peer alive.
            self.last_rx = Instant::now();
        }
        // Sent or not, the deletes are kept a while: bytes in flight when the link dies are
        // lost without an error, and the session notices only DEAD_AFTER later.
        let now = Instant::now();
        self.recent_deletes.sent(deletes, now);
        match result {
            Ok(()) => {
                let mut status = lock(&self.shared.status);
                status.deltas_sent += sent;
                if let (Some(since), true) = (waiting_since, sent > 0) {
                    status
                        .send_lag
                        .observe(now.saturating_duration_since(since));
                }
            }
            Err(e) => self.disconnected(&e),
        }
    }

    /// Brings the unsent deletes' file up to date; a failure is logged when it first shows.
    fn persist_unsent(&mut self) {
        match self.unsent.persist() {
            Ok(()) => self.last_persist_error = None,
            Err(e) => {
                let message = e.to_string();
                if self.last_persist_error.as_ref() != Some(&message) {
                    warn!(error = %message, "cannot keep the unsent deletes on disk: a restart would lose them");
                }
                self.last_persist_error = Some(message);
            }
        }
    }

    /// Publishes the bulk state and the demotion it implies.
    fn publish(&mut self) {
        let demoted = self.bulk.demoted();
        self.demoted
            .send_if_modified(|d| std::mem::replace(d, demoted) != demoted);
        let mut status = lock(&self.shared.status);
        status.bulk = self.bulk.state().to_string();
        status.demoted = demoted;
        status.deletes_waiting = self.unsent.len() as u64;
    }
}

/// The next frame of the session, or never when there is none.
async fn recv(stream: &mut Option<SyncStream>) -> Result<Frame, TransportError> {
    match stream {
        Some(stream) => stream.recv().await,
        None => std::future::pending().await,
    }
}

/// Connects to the peer from the sync address and runs the initiator's handshake.
async fn dial(config: SyncConfig, done: mpsc::Sender<Handshake>) {
    let attempt = async {
        let socket = match config.peer {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(TransportError::from)?;
        socket.bind(SocketAddr::new(config.listen.ip(), 0))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(config.peer))
            .await
            .map_err(|_| TransportError::HandshakeTimeout)??;
        transport::initiate(stream, &config.key).await
    };
    match attempt.await {
        Ok(stream) => {
            let _ = done.send(Ok((stream, config.peer))).await;
        }
        // An unreachable peer is normal while it is down: not worth a refusal.
        Err(TransportError::Io { .. } | TransportError::HandshakeTimeout) => {}
        Err(e) => {
            let _ = done.send(Err((config.peer, e))).await;
        }
    }
}
