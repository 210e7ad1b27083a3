//! `cargo xtask bench`: failover times against ucarp and keepalived on the same lab, planned
//! failover loss, and XDP cost per frame against a bare XDP_PASS program, all in one run.

use crate::syncbench::{ConntrackdFigures, SyncFigures};
use crate::{
    Host, LAN_VIP, Lab, NodeOptions, SERVER_IP, carp_bin,
    cluster::{backup_opts, carp_cli, wait_all, wait_state},
    end_process, kill_hard, ping,
    probe::{self, ArpProbe},
    unix_us, wait_exit, wait_for,
};
use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use carp::{
    carp::fsm::State,
    dataplane::{Dataplane, Role, remove_pin_dir},
    pins,
};
use carp_common::flow::DEFAULT_FLOWS_MAX;
use carp_common::maps::{XDP_PASS_PROGRAM, virtual_mac};
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

/// Kills per system in the unplanned-failover benchmark.
const TRIALS: usize = 3;

fn say(what: &str) {
    println!("\n==> {what}");
}

/// Only the XDP cost figures (`carp-lab bench xdp`).
pub fn run_xdp() -> Result<()> {
    xdp_cost()?.print();
    Ok(())
}

/// Only the state-sync figures (`carp-lab bench sync`).
pub fn run_sync() -> Result<()> {
    let (carp, conntrackd) = measure_sync()?;
    print_sync(&carp, &conntrackd);
    Ok(())
}

fn measure_sync() -> Result<(SyncFigures, ConntrackdFigures)> {
    say("state sync: carp (bulk, live, lag, memory)");
    let carp = crate::syncbench::measure()?;
    say("state sync: conntrackd FTFW on the same workload (bulk, live)");
    let conntrackd = crate::syncbench::measure_conntrackd()?;
    Ok((carp, conntrackd))
}

fn print_sync(s: &SyncFigures, c: &ConntrackdFigures) {
    use crate::syncbench::{BULK_FLOWS, LAG_RATE, LAG_SECONDS, LIVE_FLOWS};
    println!("\nState sync into the peer's kernel conntrack (carp run on gw2, real ctnetlink)");
    println!(
        "  bulk update, {BULK_FLOWS} NATed TCP flows: {:.0} states/s (target >= 200000: {}; {:.1}x conntrackd, target >= 5x: {})",
        s.bulk_per_s,
        verdict(s.bulk_per_s >= 200_000.0),
        s.bulk_per_s / c.bulk_per_s,
        verdict(s.bulk_per_s >= 5.0 * c.bulk_per_s)
    );
    println!(
        "    conntrackd: {:.0} states/s (resync to the external cache {:.2} s + commit {:.2} s)",
        c.bulk_per_s,
        c.bulk_transfer.as_secs_f64(),
        c.bulk_commit.as_secs_f64()
    );
    println!(
        "    the kernel's ceiling: the same creates straight into gw2's ctnetlink, nothing else per state: {:.0} states/s on one socket, {:.0} on two at once",
        s.ctnetlink_create_per_s, s.ctnetlink_two_sockets_per_s
    );
    println!(
        "  live deltas, {LIVE_FLOWS} flows: {:.0} states/s",
        s.live_per_s
    );
    println!(
        "    conntrackd, {BULK_FLOWS} flows created in gw1's kernel: {:.0} states/s (events to the external cache {:.2} s + commit {:.2} s; includes its capture; {} states lost)",
        c.live_per_s,
        c.live_transfer.as_secs_f64(),
        c.live_commit.as_secs_f64(),
        c.live_lost
    );
    println!(
        "  lag send -> peer conntrack at {LAG_RATE} new flows/s for {LAG_SECONDS} s: p50 {:.2} ms, p99 {:.2} ms ({} flows seen; target p99 < 10 ms: {})",
        s.lag_p50.as_secs_f64() * 1e3,
        s.lag_p99.as_secs_f64() * 1e3,
        s.lag_seen,
        verdict(s.lag_p99 < Duration::from_millis(10))
    );
    println!(
        "  memory per flow: daemon {:.0} B (RSS growth / flows), XDP flow map {:.0} B (memlock / max_entries)",
        s.daemon_bytes_per_flow, s.map_bytes_per_flow
    );
}

pub fn run() -> Result<()> {
    say("XDP cost per frame (BPF_PROG_TEST_RUN)");
    let xdp = xdp_cost()?;
    say(&format!("unplanned failover: carp, {TRIALS} kills"));
    let carp = unplanned_carp()?;
    say(&format!("unplanned failover: ucarp, {TRIALS} kills"));
    let ucarp = unplanned_baseline(System::Ucarp)?;
    say(&format!(
        "unplanned failover: keepalived at the same skew (backup priority {KEEPALIVED_SAME_SKEW}), {TRIALS} kills"
    ));
    let keepalived = unplanned_baseline(System::Keepalived {
        backup_priority: KEEPALIVED_SAME_SKEW,
    })?;
    say(&format!(
        "unplanned failover: keepalived at backup priority {KEEPALIVED_DEFAULT} (its skew 0.21 s longer), {TRIALS} kills"
    ));
    let keepalived_default = unplanned_baseline(System::Keepalived {
        backup_priority: KEEPALIVED_DEFAULT,
    })?;
    say("planned failover: carp, ping 100/s through the gateways");
    let planned = planned_carp()?;
    say("restart of the master's daemon: ping 1,000/s through the gateways");
    let restarted = restarts()?;
    let (sync, conntrackd) = measure_sync()?;
    say("state sync: a bulk update over a lossy sync link");
    let lossy = crate::syncbench::bulk_under_loss()?;
    say("configuration sync: one reload with 100 VIPs and a 10,000-rule ruleset");
    let config = config_sync_reload()?;
    say("DHCP failover: the primary gateway dies under a client with a lease");
    let dhcp = crate::dhcpbench::measure()?;
    say("forwarding through one gateway: carp off, on, with capture");
    let forwarding = crate::fwdbench::measure()?;
    say("live sync on the same work: connections opened through gw1, carp and conntrackd");
    let same_work = crate::samework::measure()?;

    println!("\n==================== carp benchmark results ====================");
    xdp.print();
    println!(
        "\nUnplanned failover: master SIGKILLed -> backup answers ARP for {LAN_VIP}\n\
         (advbase 1; backup advskew 100, ucarp's too; keepalived's backup priority {KEEPALIVED_SAME_SKEW},\n\
         the same skew of 100/256 s, and {KEEPALIVED_DEFAULT} as earlier runs had it; client ARP probe every 10 ms)"
    );
    println!(
        "  {:<22} {:<26} {:>8}  requests answered twice after the kill",
        "system", "trials (s)", "mean (s)"
    );
    let keepalived_default_name = format!("keepalived prio {KEEPALIVED_DEFAULT}");
    for (name, t) in [
        ("carp", &carp),
        ("ucarp", &ucarp),
        ("keepalived same skew", &keepalived),
        (keepalived_default_name.as_str(), &keepalived_default),
    ] {
        println!(
            "  {:<22} {:<26} {:>8.3}  {}",
            name,
            t.trials_text(),
            t.mean(),
            t.double_answers
        );
    }
    let target = 3.0 + 100.0 / 256.0 + 0.1;
    println!(
        "  target: carp within 3 x advbase + skew/256 + 100 ms = {target:.3} s: {}",
        verdict(carp.max() <= target)
    );
    println!(
        "  ratios (mean): carp/ucarp {:.2}, carp/keepalived at the same skew {:.2}",
        carp.mean() / ucarp.mean(),
        carp.mean() / keepalived.mean()
    );
    print_planned(&planned);
    print_restarts(&restarted);
    print_sync(&sync, &conntrackd);
    print_loss(lossy);
    print_config_sync(&config);
    crate::dhcpbench::print(&dhcp);
    crate::fwdbench::print(&forwarding);
    crate::samework::print(&same_work);
    Ok(())
}

/// Targets printed as not met in this run, for `bench --check`.
static NOT_MET: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A target's verdict as printed; a miss is counted.
pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        NOT_MET.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        "NOT met"
    }
}

/// `bench --check`: fails when a target printed so far was not met.
pub fn check_targets() -> Result<()> {
    let missed = NOT_MET.load(std::sync::atomic::Ordering::Relaxed);
    if missed > 0 {
        bail!("{missed} target(s) not met (marked NOT met above)");
    }
    println!("\nevery target met");
    Ok(())
}

/// Nanoseconds per frame of each path.
struct XdpCost {
    calls: u32,
    repeats: u32,
    bare_single: f64,
    arp_single: f64,
    pass_single: f64,
    bare_repeat: f64,
    pass_repeat: f64,
    arp_backup_repeat: f64,
    arp_backup_single: f64,
    /// Flow capture on: an established TCP segment (repeat loop, summed in the per-CPU flow
    /// cache, against the bare program in the same rounds), a segment that takes the flow
    /// map path every time (repeat loop), and a new flow (single runs).
    capture_bare_repeat: f64,
    capture_established_repeat: f64,
    capture_map_path_repeat: f64,
    capture_new_single: f64,
    /// A realistic mix: [`MIX_FLOWS`] flows with Zipf popularity, interleaved, single runs
    /// of carp and of the bare program on the same packet, median ns of each.
    mix_carp_single: f64,
    mix_bare_single: f64,
    /// The means of the same runs: the slow map path of quiet flows weighs in here.
    mix_carp_mean: f64,
    mix_bare_mean: f64,
    /// Percentiles [`MIX_TAIL`] of the same runs, carp and bare.
    mix_carp_tail: [f64; 3],
    mix_bare_tail: [f64; 3],
}

/// The mix's tail, where its quiet flows' map path shows.
const MIX_TAIL: [f64; 3] = [0.75, 0.9, 0.99];

/// The realistic capture mix: flows, packets, Zipf exponent.
const MIX_FLOWS: u32 = 10_000;
const MIX_PACKETS: usize = 200_000;
const MIX_ZIPF: f64 = 1.0;

impl XdpCost {
    fn print(&self) {
        println!(
            "\nXDP cost per frame (BPF_PROG_TEST_RUN, bare XDP_PASS program loaded in the same run)"
        );
        println!("  one fresh frame per run, median of {} runs:", self.calls);
        println!(
            "    bare XDP_PASS                {:>7.1} ns",
            self.bare_single
        );
        println!(
            "    carp, ARP answer (XDP_TX)    {:>7.1} ns  {:.2}x bare  (target <= 2x: {})",
            self.arp_single,
            self.arp_single / self.bare_single,
            verdict(self.arp_single <= 2.0 * self.bare_single)
        );
        println!(
            "    carp, ARP as backup (DROP)   {:>7.1} ns  {:.2}x bare  (the VIP lookup alone)",
            self.arp_backup_single,
            self.arp_backup_single / self.bare_single
        );
        println!(
            "    carp, pass-through (IPv4)    {:>7.1} ns  {:.2}x bare  (target <= 2x: {})",
            self.pass_single,
            self.pass_single / self.bare_single,
            verdict(self.pass_single <= 2.0 * self.bare_single)
        );
        println!(
            "  {} runs in the kernel loop, median of 5 (paths that leave the frame as it is):",
            self.repeats
        );
        println!(
            "    bare XDP_PASS                {:>7.1} ns",
            self.bare_repeat
        );
        println!(
            "    carp, pass-through (IPv4)    {:>7.1} ns  {:.2}x bare",
            self.pass_repeat,
            self.pass_repeat / self.bare_repeat
        );
        println!(
            "    carp, ARP for a VIP as backup (XDP_DROP) {:>5.1} ns  {:.2}x bare",
            self.arp_backup_repeat,
            self.arp_backup_repeat / self.bare_repeat
        );
        println!(
            "  flow capture on (issue 3's data plane), {} runs in the kernel loop, median of 5:",
            self.repeats
        );
        println!(
            "    bare XDP_PASS, same rounds            {:>6.1} ns",
            self.capture_bare_repeat
        );
        println!(
            "    established TCP segment (flow cache)  {:>6.1} ns  {:.2}x bare  (target <= 2x: {})",
            self.capture_established_repeat,
            self.capture_established_repeat / self.capture_bare_repeat,
            verdict(self.capture_established_repeat <= 2.0 * self.capture_bare_repeat)
        );
        println!(
            "    segment taking the flow-map path      {:>6.1} ns  {:.2}x bare  (quiet flows, SYN/FIN/RST)",
            self.capture_map_path_repeat,
            self.capture_map_path_repeat / self.capture_bare_repeat
        );
        println!(
            "    new flow (birth + delta), single runs  {:>6.1} ns  {:.2}x bare (single runs)",
            self.capture_new_single,
            self.capture_new_single / self.bare_single
        );
        println!(
            "  flow capture on a realistic mix: {MIX_FLOWS} established flows, Zipf({MIX_ZIPF}) popularity,\n  \
             {MIX_PACKETS} packets interleaved (most flows well under one packet per jiffy), single runs,\n  \
             carp and the bare program on each packet in turn:"
        );
        println!(
            "    medians: bare XDP_PASS {:>6.1} ns, carp {:>6.1} ns: {:.2}x bare, +{:.1} ns  (target <= 2x: {})",
            self.mix_bare_single,
            self.mix_carp_single,
            self.mix_carp_single / self.mix_bare_single,
            self.mix_carp_single - self.mix_bare_single,
            verdict(self.mix_carp_single <= 2.0 * self.mix_bare_single)
        );
        println!(
            "    means:   bare XDP_PASS {:>6.1} ns, carp {:>6.1} ns: {:.2}x bare, +{:.1} ns  (target <= 2x: {})",
            self.mix_bare_mean,
            self.mix_carp_mean,
            self.mix_carp_mean / self.mix_bare_mean,
            self.mix_carp_mean - self.mix_bare_mean,
            verdict(self.mix_carp_mean <= 2.0 * self.mix_bare_mean)
        );
        let tail = |ns: &[f64; 3]| {
            let shown: Vec<String> = MIX_TAIL
                .iter()
                .zip(ns)
                .map(|(p, ns)| format!("p{} {ns:.0}", p * 100.0))
                .collect();
            shown.join(", ")
        };
        println!(
            "    tail:    bare {} ns; carp {} ns (quiet flows take the map path: a cold hash lookup)",
            tail(&self.mix_bare_tail),
            tail(&self.mix_carp_tail)
        );
    }
}

/// Packet `n`'s flow in the mix: Zipf-distributed over [`MIX_FLOWS`] (inverse CDF on a
/// fixed-seed xorshift, so every run times the same sequence).
fn zipf_sequence() -> Vec<usize> {
    let weights: Vec<f64> = (1..=MIX_FLOWS)
        .map(|k| 1.0 / f64::from(k).powf(MIX_ZIPF))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(weights.len());
    let mut sum = 0.0;
    for w in weights {
        sum += w / total;
        cumulative.push(sum);
    }
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..MIX_PACKETS)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            cumulative
                .partition_point(|c| *c < u)
                .min(cumulative.len() - 1)
        })
        .collect()
}

fn xdp_cost() -> Result<XdpCost> {
    // One data plane without capture and one with: capture is fixed when XDP is loaded.
    let dirs = ["bench", "bench-capture"]
        .map(|name| pins::node_dir(&format!("{name}-{}", std::process::id())));
    let result = measure_xdp(&dirs);
    for dir in &dirs {
        remove_pin_dir(dir);
    }
    result
}

const BENCH_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const BENCH_IF_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// XDP loaded into `dir`, master for [`BENCH_VIP`] and alive. BPF_PROG_TEST_RUN runs as if
/// received on loopback (ifindex 1).
fn bench_dataplane(dir: &std::path::Path, capture: Option<Duration>) -> Result<Dataplane> {
    let mut dataplane = Dataplane::load(dir, DEFAULT_FLOWS_MAX, capture)?;
    dataplane.set_vip(1, BENCH_VIP, 1, virtual_mac(1), Role::Master)?;
    dataplane.set_vmac(1, 1, BENCH_IF_MAC, Role::Master)?;
    dataplane.refresh_heartbeat(Duration::from_secs(600))?;
    Ok(dataplane)
}

fn measure_xdp(dirs: &[std::path::PathBuf; 2]) -> Result<XdpCost> {
    let mut dataplane = bench_dataplane(&dirs[0], None)?;
    let mut bare_object = aya::Ebpf::load(carp::EBPF_OBJECT)?;
    let bare = loaded_bare(&mut bare_object)?;

    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 0x50, 0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 0x50, 198, 18, 1, 100, 0, 0, 0, 0, 0, 0]);
    arp.extend_from_slice(&BENCH_VIP.octets());
    let mut tcp = BENCH_IF_MAC.to_vec();
    tcp.extend_from_slice(&[2, 0, 0, 0, 0, 0x50, 0x08, 0x00]);
    tcp.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 198, 18, 1, 100]);
    tcp.extend_from_slice(&[198, 18, 2, 100, 0x9c, 0x40, 0, 80]);
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0, 0xfa, 0xf0, 0, 0, 0, 0]);

    const CALLS: u32 = 20_000;
    const REPEATS: u32 = 1_000_000;
    let carp_program = dataplane.program()?;
    // Interleaved call by call (and round by round) so drift in CPU speed hits all alike.
    let [bare_single, arp_single, pass_single] = median_single(
        [
            (&*bare, &tcp[..]),
            (&*carp_program, &arp[..]),
            (&*carp_program, &tcp[..]),
        ],
        CALLS,
    )?;
    let [bare_repeat, pass_repeat] =
        median_repeat([(&*bare, &tcp[..]), (&*carp_program, &tcp[..])], REPEATS)?;
    // The drop path reads the VIP entry but leaves the frame alone, so the kernel loop can
    // time it precisely.
    dataplane.set_vip(1, BENCH_VIP, 1, virtual_mac(1), Role::Backup)?;
    let [arp_backup_repeat] = median_repeat([(&*dataplane.program()?, &arp[..])], REPEATS)?;
    let [arp_backup_single] = median_single([(&*dataplane.program()?, &arp[..])], CALLS)?;
    // Flow capture on: the same established segment again and again (no delta within the
    // refresh time), interleaved with the bare program; a reset on a closed flow, which takes
    // the flow-map path every time without a delta; and a new flow each call (a fresh source
    // port). The VIP in backup, as for the drop path above.
    let mut dataplane = bench_dataplane(&dirs[1], Some(Duration::from_secs(3600)))?;
    dataplane.set_vip(1, BENCH_VIP, 1, virtual_mac(1), Role::Backup)?;
    let mut established = tcp.clone();
    established[47] = 0x10; // ACK
    test_run(dataplane.program()?, &established, 1)?;
    let mut reset = tcp.clone();
    reset[34..36].copy_from_slice(&40_001u16.to_be_bytes());
    reset[47] = 0x14; // RST + ACK
    test_run(dataplane.program()?, &reset, 1)?;
    let program = dataplane.program()?;
    let [
        capture_bare_repeat,
        capture_established_repeat,
        capture_map_path_repeat,
    ] = median_repeat(
        [
            (&*bare, &tcp[..]),
            (&*program, &established[..]),
            (&*program, &reset[..]),
        ],
        REPEATS,
    )?;
    let mut births = Vec::with_capacity(CALLS as usize);
    for call in 0..CALLS {
        let mut syn = tcp.clone();
        syn[34..36].copy_from_slice(&(call as u16).to_be_bytes());
        syn[47] = 0x02; // SYN
        births.push(test_run(program, &syn, 1)?.1.as_nanos());
    }
    births.sort_unstable();
    let capture_new_single = births[births.len() / 2] as f64;
    while dataplane.next_delta().is_some() {}
    // The mix: each flow born once, then Zipf-popular packets interleaved, carp and bare in
    // turn on the same packet; deltas drained as the daemon would.
    let flows: Vec<Vec<u8>> = (0..MIX_FLOWS)
        .map(|f| {
            let mut frame = established.clone();
            frame[29] = 10 + (f / 250 % 200) as u8; // source address
            frame[34..36].copy_from_slice(&(1024 + (f % 60_000) as u16).to_be_bytes());
            frame
        })
        .collect();
    for frame in &flows {
        test_run(dataplane.program()?, frame, 1)?;
        while dataplane.next_delta().is_some() {}
    }
    let mut carp_ns = Vec::with_capacity(MIX_PACKETS);
    let mut bare_ns = Vec::with_capacity(MIX_PACKETS);
    for (n, flow) in zipf_sequence().into_iter().enumerate() {
        carp_ns.push(
            test_run(dataplane.program()?, &flows[flow], 1)?
                .1
                .as_nanos(),
        );
        bare_ns.push(test_run(bare, &flows[flow], 1)?.1.as_nanos());
        if n % 1024 == 0 {
            while dataplane.next_delta().is_some() {}
        }
    }
    while dataplane.next_delta().is_some() {}
    let mean = |v: &[u128]| v.iter().sum::<u128>() as f64 / v.len() as f64;
    let (mix_carp_mean, mix_bare_mean) = (mean(&carp_ns), mean(&bare_ns));
    carp_ns.sort_unstable();
    bare_ns.sort_unstable();
    let at = |sorted: &[u128], p: f64| sorted[(sorted.len() as f64 * p) as usize] as f64;
    let (mix_carp_single, mix_bare_single) = (at(&carp_ns, 0.5), at(&bare_ns, 0.5));
    let (mix_carp_tail, mix_bare_tail) = (
        MIX_TAIL.map(|p| at(&carp_ns, p)),
        MIX_TAIL.map(|p| at(&bare_ns, p)),
    );
    Ok(XdpCost {
        capture_bare_repeat,
        capture_established_repeat,
        capture_map_path_repeat,
        capture_new_single,
        mix_carp_single,
        mix_bare_single,
        mix_carp_mean,
        mix_bare_mean,
        mix_carp_tail,
        mix_bare_tail,
        arp_backup_repeat,
        arp_backup_single,
        calls: CALLS,
        repeats: REPEATS,
        bare_single,
        arp_single,
        pass_single,
        bare_repeat,
        pass_repeat,
    })
}

/// The bare XDP_PASS program of carp's object, loaded into the kernel: the baseline the
/// benches test-run or attach.
pub(crate) fn loaded_bare(object: &mut aya::Ebpf) -> Result<&mut Xdp> {
    let bare: &mut Xdp = object
        .program_mut(XDP_PASS_PROGRAM)
        .context("no xdp_pass")?
        .try_into()?;
    bare.load()?;
    Ok(bare)
}

fn test_run(program: &Xdp, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    })?;
    Ok((result.return_value, result.duration))
}

/// Median kernel-measured ns of `calls` single runs of each (program, frame), each run on a
/// fresh copy of its frame (the ARP answer rewrites the frame it runs on). The median keeps
/// interrupts that land inside one run from skewing the figure.
fn median_single<const N: usize>(cases: [(&Xdp, &[u8]); N], calls: u32) -> Result<[f64; N]> {
    let mut samples: [Vec<u128>; N] = std::array::from_fn(|_| Vec::with_capacity(calls as usize));
    for _ in 0..calls {
        for (case, (program, frame)) in samples.iter_mut().zip(cases) {
            case.push(test_run(program, frame, 1)?.1.as_nanos());
        }
    }
    Ok(samples.map(|mut s| {
        s.sort_unstable();
        s[s.len() / 2] as f64
    }))
}

/// Median over 5 rounds of the kernel's per-run ns for `repeats` runs on one frame, for each
/// (program, frame).
fn median_repeat<const N: usize>(cases: [(&Xdp, &[u8]); N], repeats: u32) -> Result<[f64; N]> {
    let mut rounds = [[0.0; 5]; N];
    for round in 0..5 {
        for (case, (program, frame)) in rounds.iter_mut().zip(cases) {
            case[round] = test_run(program, frame, repeats)?.1.as_nanos() as f64;
        }
    }
    Ok(rounds.map(|mut r| {
        r.sort_by(f64::total_cmp);
        r[2]
    }))
}

/// Takeover times of one system.
struct Takeovers {
    secs: Vec<f64>,
    double_answers: usize,
}

impl Takeovers {
    fn mean(&self) -> f64 {
        self.secs.iter().sum::<f64>() / self.secs.len().max(1) as f64
    }

    fn max(&self) -> f64 {
        self.secs.iter().copied().fold(0.0, f64::max)
    }

    fn trials_text(&self) -> String {
        self.secs
            .iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Probes the LAN VIP every 10 ms, runs `kill` after a second, and finds when the new master
/// answered: the first reply from `new_mac`, or (carp, one virtual MAC on both nodes) the
/// first reply after the silence that follows the kill.
fn measure_takeover(
    lab: &Lab,
    new_mac: Option<&str>,
    kill: impl FnOnce() -> Result<()>,
) -> Result<(f64, usize)> {
    let log = lab.dir.join(format!("bench-probe-{}.log", unix_us()));
    let pid = lab.arp_probe_background(&ArpProbe::from_client(LAN_VIP, 10, 7000), &log)?;
    std::thread::sleep(Duration::from_secs(1));
    let killed = unix_us();
    kill()?;
    if !wait_exit(pid, Duration::from_secs(12)) {
        bail!("the ARP probe did not finish");
    }
    let exchanges = probe::parse(&std::fs::read_to_string(&log)?);
    let after: Vec<_> = exchanges.iter().filter(|e| e.sent_us >= killed).collect();
    let doubles = after.iter().filter(|e| e.replies.len() > 1).count();
    let answered_at = match new_mac {
        Some(mac) => after
            .iter()
            .flat_map(|e| &e.replies)
            .find(|(_, m)| m == mac)
            .map(|(t, _)| *t),
        None => {
            let silent = after.iter().position(|e| e.replies.is_empty());
            silent.and_then(|i| {
                after[i..]
                    .iter()
                    .find_map(|e| e.replies.first().map(|(t, _)| *t))
            })
        }
    }
    .context("the new master never answered ARP within the probe")?;
    let secs = (answered_at - killed) as f64 / 1e6;
    println!("    takeover {secs:.3} s, {doubles} requests answered twice");
    Ok((secs, doubles))
}

fn unplanned_carp() -> Result<Takeovers> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let mut gw1 = lab.start_carp(&bin, Host::Gw1, &NodeOptions::default())?;
    let gw2 = lab.start_carp(&bin, Host::Gw2, &backup_opts())?;
    wait_state(&gw1, 1, State::Master, Duration::from_secs(10))?;
    let mut out = Takeovers {
        secs: vec![],
        double_answers: 0,
    };
    for _ in 0..TRIALS {
        wait_state(&gw2, 1, State::Backup, Duration::from_secs(10))?;
        let pid = gw1.pid;
        let (secs, doubles) = measure_takeover(&lab, None, || {
            kill_hard(pid);
            Ok(())
        })?;
        out.secs.push(secs);
        out.double_answers += doubles;
        gw1 = lab.restart_carp(&bin, &gw1)?;
        wait_state(&gw1, 1, State::Master, Duration::from_secs(10))?;
    }
    Ok(out)
}

#[derive(Clone, Copy)]
enum System {
    Ucarp,
    /// keepalived with this backup priority (the master has 200).
    Keepalived {
        backup_priority: u8,
    },
}

/// keepalived's backup priority whose skew, (256 - priority)/256 s, equals carp's advskew 100.
const KEEPALIVED_SAME_SKEW: u8 = 156;
/// The priority earlier runs used: a skew of 156/256 s, 0.21 s longer than carp's.
const KEEPALIVED_DEFAULT: u8 = 100;

fn unplanned_baseline(system: System) -> Result<Takeovers> {
    let lab = Lab::up()?;
    let start = |host: Host, primary: bool| match system {
        System::Ucarp => lab.start_ucarp(host, if primary { 0 } else { 100 }),
        System::Keepalived { backup_priority } => {
            lab.start_keepalived(host, if primary { 200 } else { backup_priority })
        }
    };
    let mut primary = start(Host::Gw1, true)?;
    wait_for(Duration::from_secs(10), || {
        lab.holds_lan_vip(Host::Gw1).then_some(())
    })
    .context("the primary never took the VIP")?;
    let _secondary = start(Host::Gw2, false)?;
    // Let the secondary finish starting (it must hear the primary before the first kill).
    std::thread::sleep(Duration::from_secs(5));
    let gw2_mac = lab.mac(Host::Gw2, "lan")?;
    let mut out = Takeovers {
        secs: vec![],
        double_answers: 0,
    };
    for _ in 0..TRIALS {
        // Settled: the primary holds the VIP, the secondary does not.
        wait_for(Duration::from_secs(12), || {
            (lab.holds_lan_vip(Host::Gw1) && !lab.holds_lan_vip(Host::Gw2)).then_some(())
        })
        .context("the pair did not settle")?;
        std::thread::sleep(Duration::from_secs(1));
        let pids = primary.crash_order_pids();
        let (secs, doubles) = measure_takeover(&lab, Some(&gw2_mac), || {
            for pid in pids {
                kill_hard(pid);
            }
            Ok(())
        })?;
        out.secs.push(secs);
        out.double_answers += doubles;
        // A SIGKILLed ucarp or keepalived leaves its VIP behind; clear it and restart.
        lab.sh(
            Host::Gw1,
            &format!("ip addr del {LAN_VIP}/24 dev lan || true"),
        )?;
        primary = start(Host::Gw1, true)?;
    }
    Ok(out)
}

struct Planned {
    trigger: &'static str,
    switchover: Duration,
    ping: ping::PingReport,
}

fn planned_carp() -> Result<Vec<Planned>> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let mut results = Vec::new();
    for trigger in ["maintenance on", "SIGTERM"] {
        let gw1 = lab.start_carp(&bin, Host::Gw1, &NodeOptions::default())?;
        let gw2 = lab.start_carp(&bin, Host::Gw2, &backup_opts())?;
        wait_all(&gw1, State::Master, Duration::from_secs(10))?;
        wait_all(&gw2, State::Backup, Duration::from_secs(10))?;
        let log = lab.dir.join(format!("bench-ping-{}.log", unix_us()));
        let ping_pid = lab.ping_background(Host::Client, SERVER_IP, 0.01, 300, &log)?;
        std::thread::sleep(Duration::from_secs(1));
        let started = Instant::now();
        match trigger {
            // Signalled, not waited for: the switchover is the backup taking over, which the
            // bow-out's adverts bring about before the old run has finished stopping (the
            // reaping after the measurement waits for that).
            "SIGTERM" => nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(gw1.pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?,
            _ => {
                carp_cli(&[
                    "maintenance",
                    "on",
                    "--socket",
                    &gw1.socket.to_string_lossy(),
                ])?;
            }
        }
        // Polled every millisecond, not at wait_for's 20 ms, which would be the figure.
        let switchover = loop {
            if gw2.state(1) == Some(State::Master) && gw2.state(2) == Some(State::Master) {
                break started.elapsed();
            }
            if started.elapsed() > Duration::from_secs(5) {
                bail!("gw2 did not take over");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if !wait_exit(ping_pid, Duration::from_secs(15)) {
            bail!("ping did not finish");
        }
        let ping = ping::parse(&std::fs::read_to_string(&log)?);
        println!(
            "    {trigger}: switchover {:.1} ms, {} of {} pings lost",
            switchover.as_secs_f64() * 1000.0,
            ping.lost(),
            ping.sent
        );
        results.push(Planned {
            trigger,
            switchover,
            ping,
        });
        end_process(gw1.pid, Duration::from_secs(5));
        end_process(gw2.pid, Duration::from_secs(5));
        // The next round starts from a clean node: no maintenance left behind.
        let _ = std::fs::remove_dir_all(lab.dir.join(format!("{}-state", gw1.name)));
    }
    Ok(results)
}

/// Pings lost across a restart of the master's daemon, one way or another.
struct Restarted {
    how: &'static str,
    /// From the kill or the request to the new run answering.
    took: Duration,
    ping: ping::PingReport,
    backup_moved: bool,
}

/// The master's daemon SIGKILLed and started again at once, and `carp upgrade`, each under
/// pings at 1,000/s through both VIPs, each on a fresh pair.
fn restarts() -> Result<Vec<Restarted>> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    let mut results = Vec::new();
    for how in ["SIGKILL + restart", "carp upgrade"] {
        let gw1 = lab.start_carp(&bin, Host::Gw1, &NodeOptions::default())?;
        let gw2 = lab.start_carp(&bin, Host::Gw2, &backup_opts())?;
        wait_all(&gw1, State::Master, Duration::from_secs(10))?;
        wait_all(&gw2, State::Backup, Duration::from_secs(10))?;
        let backup_since: Vec<String> = gw2.status()?.vips.into_iter().map(|v| v.since).collect();
        let log = lab.dir.join(format!("bench-restart-{}.log", unix_us()));
        let ping_pid = lab.ping_background(Host::Client, SERVER_IP, 0.001, 5000, &log)?;
        std::thread::sleep(Duration::from_secs(1));
        let started = Instant::now();
        let gw1 = if how == "carp upgrade" {
            carp_cli(&["upgrade", "--socket", &gw1.socket.to_string_lossy()])?;
            gw1
        } else {
            kill_hard(gw1.pid);
            lab.restart_carp(&bin, &gw1)?
        };
        let took = started.elapsed();
        if !wait_exit(ping_pid, Duration::from_secs(20)) {
            bail!("ping did not finish");
        }
        let ping = ping::parse(&std::fs::read_to_string(&log)?);
        let after = gw2.status()?;
        let backup_moved = after
            .vips
            .iter()
            .zip(&backup_since)
            .any(|(v, since)| v.state != State::Backup || v.since != *since);
        println!(
            "    {how}: back in {:.0} ms, {} of {} pings lost, backup moved: {backup_moved}",
            took.as_secs_f64() * 1000.0,
            ping.lost(),
            ping.sent
        );
        results.push(Restarted {
            how,
            took,
            ping,
            backup_moved,
        });
        end_process(gw1.pid, Duration::from_secs(5));
        end_process(gw2.pid, Duration::from_secs(5));
    }
    Ok(results)
}

fn print_restarts(restarts: &[Restarted]) {
    println!(
        "
Restart of the master's daemon, ping client -> server every 1 ms through both VIPs"
    );
    println!(
        "  {:<18} {:>12} {:>11} {:>13}",
        "how", "back in", "lost pings", "backup moved"
    );
    for r in restarts {
        println!(
            "  {:<18} {:>9.0} ms {:>5} of {:<4} {:>13}",
            r.how,
            r.took.as_secs_f64() * 1000.0,
            r.ping.lost(),
            r.ping.sent,
            if r.backup_moved { "yes" } else { "no" }
        );
    }
    let ok = restarts
        .iter()
        .all(|r| r.ping.lost() == 0 && !r.backup_moved);
    println!(
        "  target: 0 pings lost, the backup never moves: {}",
        verdict(ok)
    );
}

/// Only the planned failovers (`carp-lab bench planned`).
pub fn run_planned() -> Result<()> {
    print_planned(&planned_carp()?);
    Ok(())
}

fn print_planned(planned: &[Planned]) {
    println!("\nPlanned failover (carp), ping client -> server every 10 ms through both VIPs");
    println!(
        "  {:<16} {:>14} {:>11} {:>16}",
        "trigger", "switchover", "lost pings", "longest gap"
    );
    for p in planned {
        println!(
            "  {:<16} {:>11.1} ms {:>11} {:>13.1} ms",
            p.trigger,
            p.switchover.as_secs_f64() * 1000.0,
            p.ping.lost(),
            p.ping.longest_gap_s * 1000.0
        );
    }
    let ok = planned
        .iter()
        .all(|p| p.switchover < Duration::from_millis(50) && p.ping.lost() <= 1);
    println!(
        "  target: under 50 ms and at most one lost ping: {}",
        verdict(ok)
    );
}

/// Only the restart figures (`carp-lab bench restart`).
pub fn run_restart() -> Result<()> {
    print_restarts(&restarts()?);
    Ok(())
}

/// Only the lossy bulk (`carp-lab bench loss`).
pub fn run_loss() -> Result<()> {
    print_loss(crate::syncbench::bulk_under_loss()?);
    Ok(())
}

fn print_loss((took, sessions): (Duration, u32)) {
    let link = crate::syncbench::LOSSY_LINK;
    println!(
        "
Bulk update of {} flows over a sync link losing {}% of frames with {} ms delay each way: \
         complete in the peer's kernel after {:.1} s ({:.0} states/s, {sessions} session(s))",
        crate::syncbench::BULK_FLOWS,
        link.loss_pct,
        link.delay.as_millis(),
        took.as_secs_f64(),
        f64::from(crate::syncbench::BULK_FLOWS) / took.as_secs_f64()
    );
}

/// VIPs and nftables rules the configuration-sync bench adds in one reload.
const SYNCED_VIPS: u8 = 100;
const SYNCED_RULES: u32 = 10_000;

/// What one reload on the primary took to reach the secondary.
struct ConfigSyncFigures {
    applied: Duration,
    ping: ping::PingReport,
}

/// `carp reload` on the primary adding [`SYNCED_VIPS`] VIPs and a ruleset of
/// [`SYNCED_RULES`] rules, timed until the secondary holds them all (its VIPs in its status,
/// hence the ruleset loaded before them); pings at 100/s through the untouched VIPs.
fn config_sync_reload() -> Result<ConfigSyncFigures> {
    let lab = Lab::up()?;
    let bin = carp_bin()?;
    // gw2 keeps its copy of the ruleset in its own etc/ (lab nodes share a filesystem).
    let (etc, gw2_etc) = (lab.dir.join("etc"), lab.dir.join("gw2-etc"));
    std::fs::create_dir_all(&etc)?;
    std::fs::create_dir_all(&gw2_etc)?;
    let rules = etc.join("bench-rules.nft");
    std::fs::write(&rules, "table inet carp_bench {\n}\n")?;
    let primary = NodeOptions {
        sync_key: Some(crate::SYNC_SECRET.into()),
        nat: true,
        config_sync: crate::ConfigSyncPart::Push,
        nftables: vec![rules.clone()],
        ..NodeOptions::default()
    };
    let gw1 = lab.start_carp(&bin, Host::Gw1, &primary)?;
    let follower = NodeOptions {
        sync_key: Some(crate::SYNC_SECRET.into()),
        config_sync: crate::ConfigSyncPart::Accept,
        ..NodeOptions::default()
    };
    let gw2 = lab.start_carp_with_own_dir(&bin, Host::Gw2, &follower, &etc, &gw2_etc)?;
    let vips = |node: &crate::Node| node.status().map_or(0, |s| s.vips.len());
    wait_for(Duration::from_secs(15), || (vips(&gw2) == 2).then_some(()))
        .context("the secondary never got the first push")?;
    wait_all(&gw1, State::Master, Duration::from_secs(10))?;
    let mut ruleset = String::from(
        "table inet carp_bench {\n  chain c {\n    type filter hook input priority 0; policy accept;\n",
    );
    for i in 0..SYNCED_RULES {
        ruleset.push_str(&format!("    tcp dport {} counter accept\n", 10_000 + i));
    }
    ruleset.push_str("  }\n}\n");
    std::fs::write(&rules, ruleset)?;
    let mut bigger = primary.clone();
    // 198.18.1.120-219: clear of the gateways (.1-.3) and the client (.100).
    for i in 0..SYNCED_VIPS {
        bigger
            .vips
            .push(("lan", 10 + i, format!("198.18.1.{}/24", 120 + u16::from(i))));
    }
    lab.write_config(Host::Gw1, &bigger)?;
    let log = lab.dir.join("bench-config-ping.log");
    let ping_pid = lab.ping_background(Host::Client, SERVER_IP, 0.01, 500, &log)?;
    std::thread::sleep(Duration::from_secs(1));
    let want = 2 + usize::from(SYNCED_VIPS);
    let started = Instant::now();
    carp_cli(&["reload", "--socket", &gw1.socket.to_string_lossy()])?;
    wait_for(Duration::from_secs(30), || {
        (vips(&gw2) == want).then_some(())
    })
    .context("the secondary never held the new configuration")?;
    let applied = started.elapsed();
    anyhow::ensure!(
        lab.sh(Host::Gw2, "nft list chain inet carp_bench c")?
            .contains(&format!("dport {}", 10_000 + SYNCED_RULES - 1)),
        "the ruleset is not on the secondary"
    );
    if !wait_exit(ping_pid, Duration::from_secs(20)) {
        bail!("ping did not finish");
    }
    let ping = ping::parse(&std::fs::read_to_string(&log)?);
    println!(
        "    applied on the secondary {:.0} ms after the reload; {} of {} pings lost",
        applied.as_secs_f64() * 1e3,
        ping.lost(),
        ping.sent
    );
    Ok(ConfigSyncFigures { applied, ping })
}

fn print_config_sync(c: &ConfigSyncFigures) {
    println!(
        "\nConfiguration sync: carp reload on the primary adding {SYNCED_VIPS} VIPs and a {SYNCED_RULES}-rule nftables ruleset"
    );
    println!(
        "  applied on the secondary (VIPs at skew +100, ruleset checked and loaded): {:.0} ms (target < 1 s: {})",
        c.applied.as_secs_f64() * 1e3,
        verdict(c.applied < Duration::from_secs(1))
    );
    println!(
        "  pings lost through the untouched VIPs at 100/s: {} of {} (target 0: {})",
        c.ping.lost(),
        c.ping.sent,
        verdict(c.ping.lost() == 0)
    );
}

/// Only the configuration-sync figures (`carp-lab bench config`).
pub fn run_config() -> Result<()> {
    print_config_sync(&config_sync_reload()?);
    Ok(())
}
