//! The `carp run` daemon: wires the per-vhid state machines to the sockets, netlink, the XDP
//! maps and the control socket. One task owns all state; socket reads and control requests
//! arrive over bounded channels, so no input can block the others.

mod config_apply;
mod operate;
mod stop;
mod vip_io;
mod vip_setup;

use crate::{
    carp::{
        acceptance::{self, Accepted, AuthWarnings, Refusal},
        demotion::{self, SendHealth, Sources},
        fsm::{DEMOTION_STEP, State, Vhid},
    },
    config::{Config, ConfigError},
    control::{self, Counters, Pending, Request, Response, Status, TestHook, VipStatus},
    dataplane::{Dataplane, DataplaneError},
    dhcp::{self, supervisor::Supervisor},
    error::Chain,
    events::Events,
    inherit,
    interfaces::{self, Ipv4Net},
    metrics, nat,
    netlink::{Addresses, NetlinkError},
    nft::{self, NftError},
    pins, reload,
    sockets::{AdvertSocket, FrameSocket},
    sync::service::{self, ConfigRole, SyncHandle},
    systemd,
};
use carp_common::{
    flow::DEFAULT_FLOWS_MAX,
    maps::{
        STAT_ARP_DROPPED_BACKUP, STAT_ARP_DROPPED_STALE, STAT_ARP_REPLIED, STAT_DELTA_LOST,
        STAT_VMAC_ACCEPTED,
    },
};
use config_apply::recv_push;
use operate::DhcpHandover;
use std::{
    net::Ipv4Addr,
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{debug, error, info, warn};
use vip_setup::VipSetup;

/// How often link state is polled.
const TICK: Duration = Duration::from_millis(100);
/// Received adverts waiting for the state task; more are dropped and counted.
const BACKLOG: usize = 1024;
/// How often XDP re-sends an unchanged flow to the peer (refreshing its timeouts there).
const FLOW_REFRESH: Duration = Duration::from_secs(10);
/// How long `carp config push` waits for the secondary's answer.
const PUSH_ANSWER: Duration = Duration::from_secs(8);
/// The environment variable that lets the control socket inject faults (tests only).
const TEST_HOOKS_ENV: &str = "CARP_TEST_HOOKS";
/// File in state_dir whose presence means maintenance mode (kept across restarts).
const MAINTENANCE_FILE: &str = "maintenance";

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface `{name}` has no IPv4 address in the subnet of VIP {vip}")]
    NoSource { name: String, vip: Ipv4Net },
    #[error("interface `{name}` disappeared")]
    NoInterface { name: String },
    #[error("in-place upgrade failed")]
    Upgrade {
        #[source]
        source: std::io::Error,
    },
    #[error("the sync session task died (a panic: see the log above)")]
    SyncDied,
    #[error("starting state sync")]
    Sync {
        #[source]
        source: std::io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// How long XDP keeps answering after our last advert. A peer may take over 3 x advbase after
/// the last advert it heard, so XDP must have stopped by then: a dead or hung daemon never
/// answers alongside the new master. Adverts come at most every advbase + 240/256 s, well
/// inside this, so a live master never lapses.
fn heartbeat_lifetime(advbase: u8) -> Duration {
    Duration::from_secs(3 * u64::from(advbase)) - HEARTBEAT_MARGIN
}

/// Slack between XDP going quiet and the earliest legal takeover.
const HEARTBEAT_MARGIN: Duration = Duration::from_millis(100);

/// One vhid with everything the I/O needs to act for it.
struct VhidRuntime {
    fsm: Vhid,
    interface: String,
    ifindex: u32,
    if_mac: [u8; 6],
    address: Ipv4Net,
    /// The MAC that answers for the VIP and that adverts leave from.
    mac: [u8; 6],
    counter: u64,
    link_up: bool,
    reported_state: State,
    since: SystemTime,
    /// State changes so far (for metrics).
    transitions: u64,
    garp: Option<JoinHandle<()>>,
    /// Advert (or probe) send results, per vhid as FreeBSD counts them.
    send: SendHealth,
}

struct Daemon {
    config: Config,
    dataplane: Dataplane,
    addresses: Addresses,
    frames: Arc<FrameSocket>,
    adverts: Arc<AdvertSocket>,
    vhids: Vec<VhidRuntime>,
    own_addresses: Vec<Ipv4Addr>,
    maintenance: bool,
    counters: Counters,
    auth_warnings: AuthWarnings,
    heartbeat_lifetime: Duration,
    garps_sent: Arc<AtomicU64>,
    sync: Option<SyncHandle>,
    /// VIPs were adopted at start: this node serves with the kernel's state it kept, so the
    /// first bulk update does not demote it.
    adopted: bool,
    /// The file `carp reload` reads again.
    config_path: PathBuf,
    /// A secondary's last failed `reload_after` command, for `carp status`.
    reload_after_failure: Arc<std::sync::Mutex<Option<String>>>,
    /// kea-dhcp4, when this node serves DHCP.
    dhcp: Option<Supervisor>,
    /// The peer's Kea is fenced off ([`dhcp::fence`]).
    dhcp_fenced: bool,
    /// `carp maintenance` waits for the partner's Kea ([`Daemon::maintenance_request`]).
    dhcp_handover_pending: bool,
    /// State changes and sync events, for notify hooks and `carp events`.
    events: Events,
    notify_failures: Arc<AtomicU64>,
    /// The sync session was up at the last tick (events on a change).
    sync_connected: bool,
    /// Stop hooks still running: a stopping daemon waits for them (each has its timeout).
    stop_hooks: Vec<JoinHandle<()>>,
    /// SIGTERM or SIGINT came: the masters are bowing out, and the daemon stops once none is
    /// left or at this instant ([`Daemon::hand_over`]).
    stopping: Option<Instant>,
}

/// Why the main loop ended.
enum Exit {
    /// SIGTERM or SIGINT: bow out and clean up.
    Stop,
    /// `carp upgrade`, or a reload that changed `[sync]`: hand everything to the binary run
    /// anew in place; the sync listener too unless `[sync]` changed.
    Reexec { keep_sync_listener: bool },
}

/// Runs the daemon until SIGTERM or SIGINT; then hands the VIPs over, releases them and
/// detaches XDP. `carp upgrade` instead re-executes the binary, which adopts what this run held.
pub async fn run(config: Config, config_path: PathBuf) -> Result<(), DaemonError> {
    // Sockets a previous run handed over: taken first, so no child process inherits them.
    let inherited_control = inherit::take(inherit::CONTROL);
    let inherited_sync = inherit::take(inherit::SYNC);
    let (packets_tx, mut packets_rx) = mpsc::channel::<(u32, Vec<u8>)>(BACKLOG);
    let (control_tx, mut control_rx) = mpsc::channel::<Pending>(16);
    let (handovers_tx, mut handovers_rx) = mpsc::unbounded_channel::<DhcpHandover>();
    let mut daemon = Daemon::start(config, config_path, inherited_sync).await?;
    if let Some(listen) = daemon.config.metrics {
        metrics::serve(listen, control_tx.clone())
            .await
            .map_err(io_error(format!("metrics endpoint on {listen}")))?;
    }
    let control_fd = control::serve(
        &daemon.config.node.control_socket,
        control_tx,
        daemon.events.clone(),
        inherited_control,
    )?;
    let dropped = Arc::new(AtomicU64::new(0));
    let receiver = tokio::spawn(receive_adverts(
        daemon.adverts.clone(),
        packets_tx,
        dropped.clone(),
    ));
    let mut terminate = signal(SignalKind::terminate()).map_err(io_error("SIGTERM handler"))?;
    let mut hangup = signal(SignalKind::hangup()).map_err(io_error("SIGHUP handler"))?;
    let mut config_pushes = daemon
        .sync
        .as_ref()
        .and_then(SyncHandle::take_config_pushes);
    daemon.push_config();
    let mut interrupt = signal(SignalKind::interrupt()).map_err(io_error("SIGINT handler"))?;
    let mut tick = tokio::time::interval(TICK);
    let mut watchdog = systemd::Watchdog::from_env();
    daemon.settle().await;
    info!(node = %daemon.config.node.name, vips = daemon.vhids.len(), "carp running");
    // The election is armed: every vhid has its timer.
    systemd::notify("READY=1");
    let exit = loop {
        daemon.settle().await;
        if daemon.handed_over(Instant::now()) {
            break Exit::Stop;
        }
        let deadline = daemon
            .vhids
            .iter()
            .filter_map(|v| v.fsm.poll_timeout())
            .chain(daemon.stopping)
            .min();
        let timer = async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some((ifindex, packet)) = packets_rx.recv() => {
                daemon.on_packet(ifindex, &packet, Instant::now());
            }
            () = timer => {
                let now = Instant::now();
                for v in &mut daemon.vhids {
                    v.fsm.handle_timeout(now);
                }
            }
            _ = tick.tick() => {
                daemon.counters.dropped_backlog = dropped.load(Ordering::Relaxed);
                daemon.poll_links(Instant::now());
                daemon.fence_dhcp_peer();
                daemon.publish_sync_changes();
                if let Some(watchdog) = &mut watchdog {
                    watchdog.tick(Instant::now());
                }
                if daemon.sync.as_ref().is_some_and(|s| !s.session_alive()) {
                    // Exit loudly rather than run on without sync; a restart adopts the VIPs.
                    error!("the sync session task died: exiting");
                    receiver.abort();
                    return Err(DaemonError::SyncDied);
                }
            }
            Some((request, reply)) = control_rx.recv() => {
                if daemon.refuses_while_stopping(&request) {
                    warn!(?request, "refused: the daemon is stopping");
                    let _ = reply.send(Response::error(stop::STOPPING.into()));
                    continue;
                }
                if let Request::ConfigPush { dry_run, force } = request {
                    daemon.config_push_request(dry_run, force, reply);
                    continue;
                }
                if let Request::Leases = request {
                    daemon.leases_request(reply);
                    continue;
                }
                if let Request::Maintenance { enable } = request {
                    if let Some((response, reply)) =
                        daemon.maintenance_request(enable, reply, &handovers_tx)
                    {
                        daemon.settle().await;
                        let _ = reply.send(response);
                    }
                    continue;
                }
                let (response, exit) = match request {
                    Request::Reload => daemon.reload().await,
                    Request::ConfigRollback => (daemon.rollback().await, None),
                    Request::Upgrade => (
                        daemon.on_request(request),
                        Some(Exit::Reexec { keep_sync_listener: true }),
                    ),
                    other => (daemon.on_request(other), None),
                };
                daemon.settle().await;
                let _ = reply.send(response);
                if let Some(exit) = exit { break exit; }
            }
            Some(handover) = handovers_rx.recv() => {
                let (response, reply) = daemon.finish_dhcp_handover(handover);
                daemon.settle().await;
                let _ = reply.send(response);
            }
            Some((pushed, flags)) = recv_push(&mut config_pushes) => {
                let answer = if daemon.stopping.is_some() {
                    config_apply::refused_push(stop::STOPPING.into())
                } else {
                    daemon.apply_pushed(&pushed, flags).await
                };
                daemon.settle().await;
                if let Some(sync) = &daemon.sync {
                    sync.answer_config(answer);
                }
            }
            _ = hangup.recv() => {
                if daemon.stopping.is_some() {
                    warn!("SIGHUP ignored: the daemon is stopping");
                    continue;
                }
                info!("SIGHUP: reloading the configuration");
                systemd::notify("RELOADING=1");
                let (response, exit) = daemon.reload().await;
                systemd::notify("READY=1");
                daemon.settle().await;
                if let Some(problems) = response.problems {
                    for problem in problems {
                        error!(problem, "reload refused");
                    }
                }
                if let Some(exit) = exit { break exit; }
            }
            _ = terminate.recv() => {
                info!("SIGTERM: handing over, then shutting down");
                if daemon.hand_over(Instant::now()) { break Exit::Stop; }
            }
            _ = interrupt.recv() => {
                info!("SIGINT: handing over, then shutting down");
                if daemon.hand_over(Instant::now()) { break Exit::Stop; }
            }
        }
    };
    receiver.abort();
    match exit {
        Exit::Stop => {
            systemd::notify("STOPPING=1");
            daemon.shutdown().await;
            Ok(())
        }
        Exit::Reexec { keep_sync_listener } => {
            Err(daemon.reexec(control_fd, keep_sync_listener).await)
        }
    }
}

/// Reads adverts off the raw socket into the bounded backlog; a flood is dropped, counted.
async fn receive_adverts(
    socket: Arc<AdvertSocket>,
    packets: mpsc::Sender<(u32, Vec<u8>)>,
    dropped: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        match socket.recv(&mut buf).await {
            Ok(received) => {
                let packet = buf[..received.len.min(buf.len())].to_vec();
                if packets.try_send((received.ifindex, packet)).is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                warn!(error = %e, "advert socket receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// This node's own addresses on the CARP interfaces (adverts from them are our own).
fn own_addresses(host: &[interfaces::Interface], config: &Config) -> Vec<Ipv4Addr> {
    let vip_addrs: Vec<Ipv4Addr> = config.vips.iter().map(|v| v.address.addr).collect();
    host.iter()
        .filter(|i| config.vips.iter().any(|v| v.interface == i.name))
        .flat_map(|i| i.addrs.iter().map(|a| a.addr))
        .filter(|a| !vip_addrs.contains(a))
        .collect()
}

impl Daemon {
    async fn start(
        config: Config,
        config_path: PathBuf,
        sync_listener: Option<OwnedFd>,
    ) -> Result<Self, DaemonError> {
        let host = interfaces::list().map_err(|e| DaemonError::Io {
            what: "listing interfaces".into(),
            source: e.into(),
        })?;
        let vip_addrs: Vec<Ipv4Addr> = config.vips.iter().map(|v| v.address.addr).collect();
        // Before anything else: from here on the kernel never answers ARP for a VIP.
        nft::apply_arp_guard(&vip_addrs)?;
        nat::apply(&config.nat)?;
        let pin_dir = pins::node_dir(&config.node.name);
        let flows_max = config
            .sync
            .as_ref()
            .map_or(DEFAULT_FLOWS_MAX, |s| s.flows_max);
        let capture = config.sync.as_ref().map(|_| FLOW_REFRESH);
        let mut dataplane = Dataplane::load(&pin_dir, flows_max, capture)?;
        // A previous run that died (or was restarted, or re-executed itself) moments ago:
        // XDP still answers for its VIPs, and the peer has not taken over yet.
        let predecessor_alive = dataplane.heartbeat_fresh();
        let addresses = Addresses::open()?;
        let now = Instant::now();
        let mut vhids = Vec::new();
        let mut adopted = 0;
        for vip in &config.vips {
            let setup = VipSetup {
                host: &host,
                vip_addrs: &vip_addrs,
                config: &config,
            };
            let runtime = setup
                .run(vip, &mut dataplane, &addresses, predecessor_alive, now)
                .await?;
            adopted += usize::from(runtime.fsm.state() == State::Master);
            vhids.push(runtime);
        }
        let own_addresses = own_addresses(&host, &config);
        if adopted > 0 {
            info!(
                vips = adopted,
                "hitless restart: still master of what the previous run held"
            );
        }
        let ifindexes: Vec<u32> = vhids.iter().map(|v| v.ifindex).collect();
        let adverts = AdvertSocket::open(&ifindexes).map_err(io_error("CARP raw socket"))?;
        let frames = FrameSocket::open().map_err(io_error("AF_PACKET socket"))?;
        let maintenance = config.node.state_dir.join(MAINTENANCE_FILE).exists();
        if maintenance {
            warn!("maintenance mode is on (persisted): demoted by {DEMOTION_STEP}");
        }
        let heartbeat_lifetime = heartbeat_lifetime(config.carp.advbase);
        let sync = match &config.sync {
            Some(sync) => {
                let deltas = dataplane.take_deltas().ok_or(DataplaneError::Missing {
                    name: carp_common::flow::DELTA_RING,
                })?;
                let flows = dataplane.open_flow_map()?;
                let handle = service::start(
                    sync.clone(),
                    config.node.name.clone(),
                    &config.node.state_dir,
                    deltas,
                    flows,
                    sync_listener,
                    config_role(&config),
                )
                .map_err(|source| DaemonError::Sync { source })?;
                info!(peer = %sync.peer, listen = %sync.listen, "state sync on; demoted until the first bulk update");
                Some(handle)
            }
            None => None,
        };
        let dhcp = dhcp::kea_setup(&config).map(Supervisor::start);
        let events = Events::new(&config.node.name);
        let mut daemon = Self {
            config,
            dataplane,
            addresses,
            frames: Arc::new(frames),
            adverts: Arc::new(adverts),
            vhids,
            own_addresses,
            maintenance,
            counters: Counters::default(),
            auth_warnings: AuthWarnings::default(),
            heartbeat_lifetime,
            garps_sent: Arc::default(),
            sync,
            adopted: adopted > 0,
            config_path,
            reload_after_failure: Arc::default(),
            dhcp,
            dhcp_fenced: false,
            dhcp_handover_pending: false,
            events,
            notify_failures: Arc::default(),
            sync_connected: false,
            stop_hooks: Vec::new(),
            stopping: None,
        };
        daemon.poll_links(now);
        Ok(daemon)
    }

    /// Performs every pending action until the machines are quiet (a send error may demote,
    /// and a demotion makes a master advertise).
    async fn settle(&mut self) {
        loop {
            for i in 0..self.vhids.len() {
                while let Some(action) = self.vhids[i].fsm.poll_action() {
                    self.perform(i, action).await;
                }
            }
            self.apply_demotion(Instant::now());
            if self.vhids.iter().all(|v| v.fsm.has_no_actions()) {
                break;
            }
        }
        for v in &mut self.vhids {
            if v.fsm.state() != v.reported_state {
                v.reported_state = v.fsm.state();
                v.since = SystemTime::now();
                v.transitions += 1;
            }
        }
        for i in 0..self.vhids.len() {
            while let Some(transition) = self.vhids[i].fsm.poll_transition() {
                self.on_transition(i, transition);
            }
        }
    }

    fn on_packet(&mut self, ifindex: u32, packet: &[u8], now: Instant) {
        let rules = acceptance::Rules {
            own_addresses: &self.own_addresses,
            key: &self.config.carp.key,
            unicast: self.config.carp.peer.is_some(),
        };
        let listeners = self.vhids.iter().map(|v| acceptance::Listener {
            vhid: v.fsm.vhid(),
            ifindex: v.ifindex,
            vip: v.address.addr,
        });
        match acceptance::accept(packet, ifindex, rules, listeners) {
            Ok(Accepted { index, peer }) => {
                self.counters.adverts_received += 1;
                self.vhids[index].fsm.handle_advert(peer, now);
            }
            Err(refusal) => self.count_refusal(&refusal, now),
        }
    }

    /// Counts a refused packet under its reason (`carp_adverts_rejected_total`).
    fn count_refusal(&mut self, refusal: &Refusal, now: Instant) {
        let c = &mut self.counters;
        match *refusal {
            Refusal::NotFromPeer => {}
            Refusal::Auth { src, vhid } => {
                c.bad_auth += 1;
                if self.auth_warnings.due(now) {
                    warn!(vhid, %src, "advert failed authentication (passphrase or VIP list differ): ignored");
                }
            }
            Refusal::UnknownVhid { .. } => c.unknown_vhid += 1,
            Refusal::Ttl { .. } => {
                c.bad_ttl += 1;
                debug!(error = %Chain(refusal), "packet dropped");
            }
            Refusal::Ipv4 { .. } | Refusal::Advert { .. } => {
                c.malformed += 1;
                debug!(error = %Chain(refusal), "packet dropped");
            }
        }
    }

    fn poll_links(&mut self, now: Instant) {
        let host = match interfaces::list() {
            Ok(host) => host,
            Err(e) => {
                warn!(error = %e, "cannot read interface state");
                return;
            }
        };
        for v in &mut self.vhids {
            let up = host
                .iter()
                .find(|i| i.index == v.ifindex)
                .is_some_and(|i| i.link_up);
            if up != v.link_up {
                if up {
                    info!(interface = %v.interface, "link up");
                } else {
                    warn!(interface = %v.interface, "link down: demoting by {DEMOTION_STEP}");
                }
                v.link_up = up;
                v.fsm.handle_link(up, now);
            }
        }
        self.probe_send_paths(now);
        self.apply_demotion(now);
    }

    /// pfSense-style node demotion: 240 per CARP interface without link, 240 after repeated
    /// send errors, 240 in maintenance mode. Applied to every vhid so all VIPs move together.
    fn demotion(&self) -> u32 {
        self.demotion_sources().total()
    }

    fn demotion_sources(&self) -> Sources {
        Sources {
            links_down: demotion::links_down(self.vhids.iter().map(|v| (v.ifindex, v.link_up))),
            send_errors: self.vhids.iter().any(|v| v.send.demoted()),
            maintenance: self.maintenance,
            // pfsync's rule: no mastership before the first bulk update is in.
            unsynced: !self.adopted && self.sync.as_ref().is_some_and(SyncHandle::demoted),
        }
    }

    fn apply_demotion(&mut self, now: Instant) {
        let demotion = self.demotion();
        for v in &mut self.vhids {
            v.fsm.handle_demotion(demotion, now);
        }
    }

    fn on_request(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response::status(self.status()),
            Request::Flows => match &self.sync {
                Some(sync) => Response::flows(sync.flows()),
                None => Response::error("state sync is not configured ([sync])".into()),
            },
            Request::TestHook { hook } => self.test_hook(hook),
            Request::Upgrade => {
                info!("in-place upgrade requested");
                Response::status(self.status())
            }
            Request::Reload
            | Request::ConfigRollback
            | Request::ConfigPush { .. }
            | Request::Maintenance { .. }
            | Request::Leases
            | Request::Events => Response::error("handled asynchronously".into()),
        }
    }

    fn test_hook(&mut self, hook: TestHook) -> Response {
        if std::env::var_os(TEST_HOOKS_ENV).is_none() {
            return Response::error(format!(
                "test hooks are off (start the daemon with {TEST_HOOKS_ENV}=1)"
            ));
        }
        warn!(?hook, "test hook");
        let Some(sync) = &self.sync else {
            return Response::error("state sync is not configured ([sync])".into());
        };
        match hook {
            TestHook::PanicInstaller => sync.panic_installer(),
            TestHook::DiscardSyncFrames => sync.discard_frames(true),
            TestHook::AcceptSyncFrames => sync.discard_frames(false),
        }
        Response::status(self.status())
    }

    /// `carp reload` and SIGHUP: applies the file's configuration, disturbing nothing it does
    /// not change. A file `carp check` refuses, or one that changes what cannot change while
    /// running, is refused whole and the running configuration stays. A new `[sync]` is
    /// applied by re-executing in place, as `carp upgrade` does.
    async fn reload(&mut self) -> (Response, Option<Exit>) {
        let new = match Config::load(&self.config_path) {
            Ok(config) => config,
            Err(ConfigError::Invalid { problems }) => return (refused(&problems), None),
            Err(e) => return (Response::refused(vec![Chain(&e).to_string()]), None),
        };
        let plan = match reload::plan(&self.config, &new) {
            Ok(plan) => plan,
            Err(problems) => return (refused(&problems), None),
        };
        if plan.sync_changed {
            info!("reload: [sync] or [config_sync] changed, re-executing in place to apply it");
            return (
                Response::done(control::REEXECUTING.to_owned(), self.status()),
                Some(Exit::Reexec {
                    keep_sync_listener: false,
                }),
            );
        }
        let host = match interfaces::list() {
            Ok(host) => host,
            Err(e) => {
                return (Response::error(format!("listing interfaces: {e}")), None);
            }
        };
        let now = Instant::now();
        // Released first, so an address moving to another vhid is free again.
        for &i in &plan.removed {
            let vip = &self.config.vips[i];
            if let Some(k) = self.vhid_index(&vip.interface, vip.vhid) {
                self.remove_vhid(k, now).await;
            }
        }
        for (i, params) in &plan.retuned {
            let vip = &self.config.vips[*i];
            if let Some(k) = self.vhid_index(&vip.interface, vip.vhid) {
                self.vhids[k].fsm.handle_params(*params, now);
            }
        }
        if new.metrics != self.config.metrics {
            warn!("reload: [metrics] changes take effect at the next start");
        }
        self.config = new;
        self.heartbeat_lifetime = heartbeat_lifetime(self.config.carp.advbase);
        let kea = dhcp::kea_setup(&self.config);
        if kea.as_ref() != self.dhcp.as_ref().map(Supervisor::setup) {
            match (&mut self.dhcp, kea) {
                (Some(running), Some(new)) if running.can_reconfigure(&new) => {
                    info!("reload: DHCP configuration changed; Kea reads it again");
                    running.reconfigure(new);
                }
                (_, kea) => {
                    // Kea starts again (or stops) on the new configuration; its lease file
                    // stays.
                    if let Some(old) = self.dhcp.take() {
                        old.stop().await;
                    }
                    self.dhcp = kea.map(Supervisor::start);
                    info!(
                        serving = self.dhcp.is_some(),
                        "reload: DHCP configuration changed"
                    );
                }
            }
        }
        let vip_addrs: Vec<Ipv4Addr> = self.config.vips.iter().map(|v| v.address.addr).collect();
        let mut failed = Vec::new();
        for &j in &plan.added {
            let vip = self.config.vips[j].clone();
            let setup = VipSetup {
                host: &host,
                vip_addrs: &vip_addrs,
                config: &self.config,
            };
            let added = setup
                .run(&vip, &mut self.dataplane, &self.addresses, false, now)
                .await
                .and_then(|runtime| {
                    self.adverts
                        .join(runtime.ifindex)
                        .map_err(io_error("joining the CARP group"))?;
                    Ok(runtime)
                });
            match added {
                Ok(runtime) => self.vhids.push(runtime),
                Err(e) => {
                    error!(vhid = vip.vhid, interface = %vip.interface, error = %Chain(&e), "cannot add VIP");
                    failed.push(format!(
                        "vip {} on {}: {}",
                        vip.vhid,
                        vip.interface,
                        Chain(&e)
                    ));
                }
            }
        }
        self.own_addresses = own_addresses(&host, &self.config);
        if let Err(e) = nft::apply_arp_guard(&vip_addrs) {
            failed.push(Chain(&e).to_string());
        }
        if plan.nat_changed
            && let Err(e) = nat::apply(&self.config.nat)
        {
            failed.push(Chain(&e).to_string());
        }
        self.poll_links(now);
        let message = format!(
            "reloaded: {} VIPs added, {} removed, {} retuned, {} unchanged; NAT {}{}",
            plan.added.len(),
            plan.removed.len(),
            plan.retuned.len(),
            plan.unchanged,
            if plan.nat_changed {
                format!("replaced ({} rules)", self.config.nat.len())
            } else {
                "unchanged".into()
            },
            if failed.is_empty() {
                String::new()
            } else {
                format!("; failed: {}", failed.join("; "))
            }
        );
        info!(%message, "reload");
        self.push_config();
        (Response::done(message, self.status()), None)
    }

    fn vhid_index(&self, interface: &str, vhid: u8) -> Option<usize> {
        self.vhids
            .iter()
            .position(|v| v.interface == interface && v.fsm.vhid() == vhid)
    }

    /// A VIP gone from the configuration: a master bows out for it and releases it, then XDP
    /// and the interface forget it.
    async fn remove_vhid(&mut self, i: usize, now: Instant) {
        self.vhids[i].fsm.handle_shutdown(now);
        while let Some(action) = self.vhids[i].fsm.poll_action() {
            self.perform(i, action).await;
        }
        while let Some(transition) = self.vhids[i].fsm.poll_transition() {
            self.on_transition(i, transition);
        }
        let v = self.vhids.remove(i);
        if let Some(garp) = v.garp {
            garp.abort();
        }
        if let Err(e) = self
            .dataplane
            .remove_vip(v.ifindex, v.address.addr, v.fsm.vhid())
        {
            error!(error = %Chain(&e), "cannot remove the VIP from XDP");
        }
        if let Err(e) = self.addresses.remove(v.ifindex, v.address).await {
            error!(error = %Chain(&e), "cannot remove VIP");
        }
        info!(vhid = v.fsm.vhid(), interface = %v.interface, vip = %v.address, "VIP removed from the configuration");
    }

    fn set_maintenance(&mut self, enable: bool) -> Result<(), DaemonError> {
        let dir = &self.config.node.state_dir;
        let file: PathBuf = dir.join(MAINTENANCE_FILE);
        if enable {
            std::fs::create_dir_all(dir)
                .map_err(io_error(format!("creating {}", dir.display())))?;
            std::fs::write(&file, b"on\n")
                .map_err(io_error(format!("writing {}", file.display())))?;
        } else if let Err(e) = std::fs::remove_file(&file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(io_error(format!("removing {}", file.display()))(e));
        }
        if enable != self.maintenance {
            info!(enable, "maintenance mode changed");
        }
        self.maintenance = enable;
        self.apply_demotion(Instant::now());
        Ok(())
    }

    fn status(&self) -> Status {
        let mut counters = self.counters.clone();
        counters.garps_sent = self.garps_sent.load(Ordering::Relaxed);
        counters.notify_failures = self.notify_failures.load(Ordering::Relaxed);
        let xdp = self.dataplane.stats().ok();
        let sync = self.sync.as_ref().map(|s| {
            let mut status = s.status();
            status.deltas_lost_in_xdp = xdp.map_or(0, |x| x[STAT_DELTA_LOST as usize]);
            status.config.reload_after_failure = self
                .reload_after_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            status
        });
        if let Some(xdp) = xdp {
            counters.xdp_arp_replied = xdp[STAT_ARP_REPLIED as usize];
            counters.xdp_arp_dropped_backup = xdp[STAT_ARP_DROPPED_BACKUP as usize];
            counters.xdp_arp_dropped_stale = xdp[STAT_ARP_DROPPED_STALE as usize];
            counters.xdp_vmac_accepted = xdp[STAT_VMAC_ACCEPTED as usize];
        }
        Status {
            node: self.config.node.name.clone(),
            maintenance: self.maintenance,
            demotion: self.demotion(),
            vips: self
                .vhids
                .iter()
                .map(|v| VipStatus {
                    interface: v.interface.clone(),
                    vhid: v.fsm.vhid(),
                    address: v.address.to_string(),
                    state: v.fsm.state(),
                    advbase: v.fsm.params().advbase,
                    advskew: v.fsm.params().advskew,
                    effective_advskew: v.fsm.effective_advskew(),
                    demotion: v.fsm.demotion(),
                    since: humantime::format_rfc3339_seconds(v.since).to_string(),
                    mac: format_mac(&v.mac),
                    transitions: v.transitions,
                })
                .collect(),
            counters,
            sync,
            dhcp: self.dhcp.as_ref().map(Supervisor::status),
            demotion_by_source: self
                .demotion_sources()
                .by_source()
                .iter()
                .map(|(source, d)| ((*source).to_owned(), *d))
                .collect(),
            stopping: self.stopping.is_some(),
        }
    }
}

/// This node's part in configuration sync.
fn config_role(config: &Config) -> ConfigRole {
    if !config.config_sync.push.is_empty() {
        ConfigRole::Primary
    } else if !config.config_sync.accept.is_empty() {
        ConfigRole::Secondary
    } else {
        ConfigRole::Off
    }
}

/// The answer to a refused configuration.
fn refused(problems: &[crate::config::Problem]) -> Response {
    Response::refused(problems.iter().map(ToString::to_string).collect())
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
