//! Sync benchmarks: how fast flows reach the peer's kernel conntrack through a real carp
//! daemon (bulk, live, lag at 10,000 new flows/s) and what a flow costs in memory. The
//! sending side is this process on gw1's end of the sync link, speaking the real protocol
//! with the real key; the receiving side is `carp run` on gw2, installing through ctnetlink.

use crate::{
    Host, Lab, NodeOptions, SYNC_SECRET, WAN_VIP, carp_bin, cluster::backup_opts,
    impair::Impairment,
};
use anyhow::{Context, Result};
use carp::{
    conntrack::{Change, Conntrack},
    flow::{FlowKey, FlowRecord, TcpPeer},
    sync::{
        proto::{Frame, upsert_frames},
        transport::{self, SharedKey, SyncStream},
    },
};
use carp_common::flow::{IPPROTO_TCP, tcp_phase};
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// Flows in the bulk transfer and in the live burst.
pub const BULK_FLOWS: u32 = 100_000;
pub const LIVE_FLOWS: u32 = 50_000;
/// The lag test: new flows per second, for how long.
pub const LAG_RATE: u32 = 10_000;
pub const LAG_SECONDS: u32 = 2;

/// The figures.
#[derive(Debug, Clone)]
pub struct SyncFigures {
    pub bulk_per_s: f64,
    pub live_per_s: f64,
    pub lag_p50: Duration,
    pub lag_p99: Duration,
    pub lag_seen: usize,
    pub daemon_bytes_per_flow: f64,
    pub map_bytes_per_flow: f64,
    /// The kernel's ceiling: the bulk's creates sent straight to ctnetlink on one socket in
    /// gw2's namespace (no daemon, no listener), before carp starts there.
    pub ctnetlink_create_per_s: f64,
    /// The same split over two sockets on two threads at once.
    pub ctnetlink_two_sockets_per_s: f64,
}

/// Flow `i` of a synthetic workload: an established TCP connection from the LAN, source
/// NATed to the WAN VIP (unique tuples both ways, all inside 198.18.0.0/15).
pub fn synthetic(i: u32) -> FlowRecord {
    let client = Ipv4Addr::new(198, 19, (i / 250 % 250) as u8, (i % 250 + 1) as u8);
    let server = Ipv4Addr::new(198, 18, 2, 100 + (i / 60_000) as u8);
    let port = 1024 + (i % 60_000) as u16;
    let peer = TcpPeer {
        phase: tcp_phase::ESTABLISHED,
        wscale: 7,
        max_win: 502,
        seqlo: i,
        seqhi: i + 64_000,
    };
    FlowRecord {
        key: FlowKey {
            proto: IPPROTO_TCP,
            src: IpAddr::V4(client),
            dst: IpAddr::V4(server),
            src_port: 40_000 + (i / 62_500) as u16,
            dst_port: 5001,
        },
        reply: FlowKey {
            proto: IPPROTO_TCP,
            src: IpAddr::V4(server),
            dst: WAN_VIP.parse().expect("valid"),
            src_port: 5001,
            dst_port: port,
        },
        tcp: [peer; 2],
        packets: [10, 10],
        bytes: [1000, 1000],
        timeout_s: 432_000,
    }
}

/// Runs `f` on a thread inside `ns` (sockets it opens live there).
pub(crate) fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).with_context(|| path.clone())?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(f())
    })
}

/// Connections in the calling thread's namespace.
pub(crate) fn read_count() -> Result<u64> {
    Ok(
        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")?
            .trim()
            .parse()?,
    )
}

pub(crate) fn conntrack_count(ns: &str) -> Result<u64> {
    in_netns(ns, read_count).join().expect("no panic")?
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// Waits until `ns` holds `target` connections; the time it took from `since`.
fn wait_count(ns: &str, target: u64, since: Instant) -> Result<Duration> {
    wait_count_within(ns, target, since, Duration::from_secs(60))
}

/// [`wait_count`], giving up after `limit`.
fn wait_count_within(ns: &str, target: u64, since: Instant, limit: Duration) -> Result<Duration> {
    let ns = ns.to_string();
    in_netns(&ns, move || -> Result<Duration> {
        let deadline = Instant::now() + limit;
        loop {
            let n = read_count()?;
            if n >= target {
                return Ok(since.elapsed());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {n} of {target} connections arrived"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
    })
    .join()
    .expect("no panic")?
}

/// A bulk transfer of [`BULK_FLOWS`] synthetic flows: start, every record, end.
fn bulk_frames() -> Vec<Frame> {
    let records: Vec<FlowRecord> = (0..BULK_FLOWS).map(synthetic).collect();
    let mut frames = vec![Frame::BulkStart { generation: 1 }];
    frames.extend(upsert_frames(&records));
    frames.push(Frame::BulkEnd {
        generation: 1,
        count: u64::from(BULK_FLOWS),
    });
    frames
}

/// The receiving side: `carp run` on gw2 with state sync on, its peer this process.
fn start_receiver(lab: &Lab) -> Result<crate::Node> {
    lab.start_carp(
        &carp_bin()?,
        Host::Gw2,
        &NodeOptions {
            sync_key: Some(SYNC_SECRET.into()),
            ..backup_opts()
        },
    )
}

/// Connects to gw2's sync port as its peer and waits for its bulk request.
async fn connect_as_peer() -> Result<SyncStream> {
    let key = SharedKey::from_secret(SYNC_SECRET.as_bytes())?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("198.18.3.1:0".parse()?)?;
    let stream = socket
        .connect(SocketAddr::new([198, 18, 3, 2].into(), crate::SYNC_PORT))
        .await?;
    let mut session = transport::initiate(stream, &key).await?;
    session
        .send(&[Frame::Hello {
            node: "bench".into(),
        }])
        .await?;
    loop {
        if session.recv().await? == Frame::BulkRequest {
            return Ok(session);
        }
    }
}

/// A session over the lossy link; the handshake itself may lose a message, so it dials
/// again, as the daemon does.
async fn dial_over_loss() -> Result<SyncStream> {
    for _ in 0..10 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(20), connect_as_peer()).await {
            return Ok(s);
        }
    }
    anyhow::bail!("no session over the lossy link")
}

pub fn measure() -> Result<SyncFigures> {
    let lab = Lab::up()?;
    lab.enable_nat()?;
    let (ctnetlink_create_per_s, ctnetlink_two_sockets_per_s) = ctnetlink_ceiling(&lab)?;
    let gw2 = start_receiver(&lab)?;
    let gw1_ns = lab.ns(Host::Gw1);
    let gw2_ns = lab.ns(Host::Gw2);
    let rss_before = rss_bytes(gw2.pid)?;
    let base = conntrack_count(&gw2_ns)?;

    // Events of the lag phase, stamped as the kernel announces them.
    let seen: Arc<Mutex<HashMap<FlowKey, Instant>>> = Arc::default();
    let listening = Arc::new(AtomicBool::new(true));
    // Subscribed only for the lag phase: the bulk's 100,000 events would overflow it.
    let lag_phase = Arc::new(AtomicBool::new(false));
    let (events_seen, events_on, events_start) =
        (seen.clone(), listening.clone(), lag_phase.clone());
    let events = in_netns(&gw2_ns, move || -> Result<()> {
        while !events_start.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut conntrack = Conntrack::subscribe_new()?;
        while events_on.load(Ordering::Relaxed) {
            // A burst may overflow the socket (ENOBUFS): those flows just go unmeasured.
            let Ok(batch) = conntrack.next_events() else {
                continue;
            };
            let now = Instant::now();
            let mut seen = events_seen.lock().expect("not poisoned");
            for entry in batch {
                seen.entry(entry.orig).or_insert(now);
            }
        }
        Ok(())
    });

    let ns = gw2_ns.clone();
    let lag_phase_sender = lag_phase.clone();
    let sender = in_netns(
        &gw1_ns,
        move || -> Result<(Duration, Duration, HashMap<FlowKey, Instant>)> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut session = connect_as_peer().await?;
                // Bulk: start, every record, end; timed until all are in gw2's kernel.
                let frames = bulk_frames();
                let started = Instant::now();
                session.send(&frames).await?;
                let ns2 = ns.clone();
                let bulk = tokio::task::spawn_blocking(move || {
                    wait_count(&ns2, base + u64::from(BULK_FLOWS), started)
                })
                .await??;
                // Live: the same volume as deltas outside a bulk transfer.
                let live: Vec<FlowRecord> = (BULK_FLOWS..BULK_FLOWS + LIVE_FLOWS)
                    .map(synthetic)
                    .collect();
                let frames: Vec<Frame> = upsert_frames(&live).collect();
                let started = Instant::now();
                session.send(&frames).await?;
                let ns3 = ns.clone();
                let target = base + u64::from(BULK_FLOWS + LIVE_FLOWS);
                let live_time =
                    tokio::task::spawn_blocking(move || wait_count(&ns3, target, started))
                        .await??;
                // Lag: 10 new flows every millisecond.
                lag_phase_sender.store(true, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                let first = BULK_FLOWS + LIVE_FLOWS;
                let mut sent = HashMap::new();
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                let per_tick = LAG_RATE / 1000;
                for t in 0..LAG_SECONDS * 1000 {
                    tick.tick().await;
                    let batch: Vec<FlowRecord> = (0..per_tick)
                        .map(|j| synthetic(first + t * per_tick + j))
                        .collect();
                    let now = Instant::now();
                    for r in &batch {
                        sent.insert(r.key, now);
                    }
                    session.send(&[Frame::Upsert { records: batch }]).await?;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok((bulk, live_time, sent))
            })
        },
    );
    let (bulk, live, sent) = sender.join().expect("no panic")??;
    listening.store(false, Ordering::Relaxed);
    // One more event wakes the listener: the sync session's own connection ending would
    // do, but a short flow is simpler.
    let _ = lab.output(
        Host::Gw2,
        &[
            "conntrack",
            "-I",
            "-p",
            "udp",
            "-s",
            "198.18.3.9",
            "-d",
            "198.18.3.8",
            "--sport",
            "1",
            "--dport",
            "2",
            "-t",
            "5",
        ],
    );
    let _ = events.join();
    let seen = seen.lock().expect("not poisoned");
    let mut lags: Vec<Duration> = sent
        .iter()
        .filter_map(|(key, at)| {
            seen.get(key)
                .map(|landed| landed.saturating_duration_since(*at))
        })
        .collect();
    lags.sort();
    let pick = |q: f64| {
        lags.get(((lags.len() as f64 * q) as usize).min(lags.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let total = BULK_FLOWS + LIVE_FLOWS + LAG_RATE * LAG_SECONDS;
    let rss_after = rss_bytes(gw2.pid)?;
    let map_bytes = map_memlock(&gw2.name)?;
    Ok(SyncFigures {
        bulk_per_s: f64::from(BULK_FLOWS) / bulk.as_secs_f64(),
        live_per_s: f64::from(LIVE_FLOWS) / live.as_secs_f64(),
        lag_p50: pick(0.50),
        lag_p99: pick(0.99),
        lag_seen: lags.len(),
        daemon_bytes_per_flow: rss_after.saturating_sub(rss_before) as f64 / f64::from(total),
        map_bytes_per_flow: map_bytes.0 as f64 / map_bytes.1 as f64,
        ctnetlink_create_per_s,
        ctnetlink_two_sockets_per_s,
    })
}

/// The bulk's creates straight into gw2's conntrack, in states/s: on one socket, and split
/// over two sockets on two threads at once (ctnetlink serializes creates on one mutex, so
/// this shows whether more installer threads could help). gw2's table is flushed after each.
fn ctnetlink_ceiling(lab: &Lab) -> Result<(f64, f64)> {
    let ns = lab.ns(Host::Gw2);
    let one = create_in(&ns, 0..BULK_FLOWS).join().expect("no panic")??;
    lab.output(Host::Gw2, &["conntrack", "-F"])?;
    let started = Instant::now();
    let halves = [0..BULK_FLOWS / 2, BULK_FLOWS / 2..BULK_FLOWS].map(|half| create_in(&ns, half));
    for half in halves {
        half.join().expect("no panic")??;
    }
    let two = started.elapsed();
    lab.output(Host::Gw2, &["conntrack", "-F"])?;
    let rate = |took: Duration| f64::from(BULK_FLOWS) / took.as_secs_f64();
    Ok((rate(one), rate(two)))
}

/// Creates the synthetic flows `range` in `ns`'s conntrack through one ctnetlink socket, on a
/// thread of its own; how long the kernel took.
fn create_in(
    ns: &str,
    range: std::ops::Range<u32>,
) -> std::thread::JoinHandle<Result<Result<Duration>>> {
    let ns_name = ns.to_string();
    in_netns(ns, move || -> Result<Duration> {
        let records: Vec<FlowRecord> = range.map(synthetic).collect();
        let changes: Vec<Change> = records.iter().map(Change::Create).collect();
        let mut conntrack = Conntrack::open()?;
        let started = Instant::now();
        let results = conntrack.apply(&changes)?;
        let took = started.elapsed();
        let failed = results.iter().filter(|r| r.is_err()).count();
        anyhow::ensure!(failed == 0, "{failed} creates failed in {ns_name}");
        Ok(took)
    })
}

/// The flow map's locked memory and its capacity, from bpftool.
fn map_memlock(node: &str) -> Result<(u64, u64)> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(format!("/sys/fs/bpf/carp/{node}/CARP_FLOWS"))
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool map show")?;
    let bytes = v["bytes_memlock"].as_u64().context("bytes_memlock")?;
    let entries = v["max_entries"].as_u64().context("max_entries")?;
    Ok((bytes, entries))
}

/// conntrackd's figures on the same workload, each split into its two steps: the states
/// reaching the peer's external cache, and `conntrackd -c` committing them to its kernel
/// (conntrackd's states are in the kernel only after the commit, which its users run at
/// failover from a keepalived notify script).
#[derive(Debug, Clone)]
pub struct ConntrackdFigures {
    pub bulk_per_s: f64,
    pub bulk_transfer: Duration,
    pub bulk_commit: Duration,
    pub live_per_s: f64,
    pub live_transfer: Duration,
    pub live_commit: Duration,
    /// States created on gw1 that never reached gw2 in the live phase (kernel events lost
    /// to conntrackd's netlink socket; FTFW only makes the link reliable).
    pub live_lost: u64,
}

/// Two conntrackd (FTFW over the sync link) in a lab of their own. Live: the synthetic flows
/// are created in gw1's kernel (the events conntrackd listens to) and timed until gw2 has
/// committed what arrived. Bulk: gw2 forgets them all (external cache and kernel) and asks
/// gw1 for a resync (`conntrackd -n`, FTFW's bulk), timed until committed again.
pub fn measure_conntrackd() -> Result<ConntrackdFigures> {
    let lab = Lab::up()?;
    lab.enable_nat()?;
    let gw1 = lab.start_conntrackd(Host::Gw1)?;
    let gw2 = lab.start_conntrackd(Host::Gw2)?;
    let gw2_ns = lab.ns(Host::Gw2);
    let flows = u64::from(BULK_FLOWS);

    let started = Instant::now();
    create_in(&lab.ns(Host::Gw1), 0..BULK_FLOWS)
        .join()
        .expect("no panic")??;
    let (arrived, live_transfer) = wait_external(&lab, &gw2, flows, started)?;
    let live_commit = commit(&lab, &gw2, &gw2_ns, arrived)?;

    // The bulk carries what gw1's conntrackd holds.
    let held = lab.conntrackd_cache(&gw1, "internal")?;
    lab.output(Host::Gw2, &["conntrack", "-F"])?;
    lab.conntrackd(&gw2, &["-f", "external"])?;
    let started = Instant::now();
    lab.conntrackd(&gw2, &["-n"])?;
    let (resynced, bulk_transfer) = wait_external(&lab, &gw2, held, started)?;
    anyhow::ensure!(
        resynced == held,
        "conntrackd's resync brought {resynced} of {held} states"
    );
    let bulk_commit = commit(&lab, &gw2, &gw2_ns, resynced)?;
    Ok(ConntrackdFigures {
        bulk_per_s: resynced as f64 / (bulk_transfer + bulk_commit).as_secs_f64(),
        bulk_transfer,
        bulk_commit,
        live_per_s: arrived as f64 / (live_transfer + live_commit).as_secs_f64(),
        live_transfer,
        live_commit,
        live_lost: flows - arrived.min(flows),
    })
}

/// Waits until `daemon`'s external cache holds `target` states, or stops growing for 5 s;
/// how many it holds and when the last of them arrived, counted from `since`.
pub(crate) fn wait_external(
    lab: &Lab,
    daemon: &crate::baselines::Conntrackd,
    target: u64,
    since: Instant,
) -> Result<(u64, Duration)> {
    let (mut held, mut last_growth) = (0, since.elapsed());
    loop {
        let n = lab.conntrackd_cache(daemon, "external")?;
        if n != held {
            (held, last_growth) = (n, since.elapsed());
        }
        if held >= target || since.elapsed() > last_growth + Duration::from_secs(5) {
            return Ok((held, last_growth));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
/// `conntrackd -c`, timed until the kernel in `ns` holds `target` more connections than
/// before it.
pub(crate) fn commit(
    lab: &Lab,
    daemon: &crate::baselines::Conntrackd,
    ns: &str,
    target: u64,
) -> Result<Duration> {
    let base = conntrack_count(ns)?;
    let started = Instant::now();
    lab.conntrackd(daemon, &["-c"])?;
    wait_count(ns, base + target, started)
}

/// The sync link's bad spell for [`bulk_under_loss`]: 20% of frames lost and 50 ms of delay,
/// each way.
pub const LOSSY_LINK: Impairment = Impairment {
    loss_pct: 20,
    delay: Duration::from_millis(50),
    jitter: Duration::ZERO,
    reorder_pct: 0,
};

/// A bulk update of [`BULK_FLOWS`] over the impaired sync link into a real `carp run` on
/// gw2: the time from the first byte sent until all are in gw2's kernel conntrack, and how
/// many sessions it took. TCP's backoff over such a link can leave the session silent past
/// gw2's dead interval; gw2 then drops it, and the sender dials again and sends the whole
/// bulk again, as a daemon answers a new bulk request (installs are idempotent).
pub fn bulk_under_loss() -> Result<(Duration, u32)> {
    let lab = Lab::up()?;
    lab.enable_nat()?;
    let _gw2 = start_receiver(&lab)?;
    let gw2_ns = lab.ns(Host::Gw2);
    let base = conntrack_count(&gw2_ns)?;
    let forwarder = lab.impair_sync(&LOSSY_LINK)?;
    let took = in_netns(&lab.ns(Host::Gw1), move || -> Result<(Duration, u32)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let frames = bulk_frames();
            let mut session = dial_over_loss().await?;
            let started = Instant::now();
            let waiting = tokio::task::spawn_blocking(move || {
                wait_count_within(
                    &gw2_ns,
                    base + u64::from(BULK_FLOWS),
                    started,
                    Duration::from_secs(1200),
                )
            });
            let mut sessions = 1;
            while let Err(e) = session.send(&frames).await {
                anyhow::ensure!(sessions < 10, "{sessions} sessions dropped: {e}");
                println!(
                    "    (the session dropped after {:.0} s: {e}; dialing again)",
                    started.elapsed().as_secs_f64()
                );
                session = dial_over_loss().await?;
                sessions += 1;
            }
            Ok((waiting.await??, sessions))
        })
    })
    .join()
    .expect("no panic");
    lab.heal_sync(forwarder)?;
    took?
}
