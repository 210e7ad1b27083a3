//! `[metrics] listen = "127.0.0.1:9721"`: a Prometheus endpoint (`GET /metrics`, OpenMetrics
//! text from the `prometheus-client` crate). Each scrape asks the daemon for its status over
//! the same channel as the control socket, so it shows exactly what `carp status` would.

use crate::{
    carp::fsm::State,
    control::{Pending, Request, Status},
    sync::lag::LagHistogram,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, text::encode},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use std::{net::SocketAddr, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

/// The longest request head read.
const MAX_HEAD: usize = 8192;
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `listen` now (a taken port fails the start) and serves scrapes on its own task.
pub async fn serve(listen: SocketAddr, requests: mpsc::Sender<Pending>) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    info!(%listen, "metrics endpoint");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(scrape(stream, requests.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn scrape(mut stream: TcpStream, requests: mpsc::Sender<Pending>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let line = String::from_utf8_lossy(&head);
    let wanted = line.lines().next().unwrap_or("");
    let (code, content_type, body) = if wanted.starts_with("GET /metrics ") {
        match status(&requests).await {
            Some(status) => ("200 OK", CONTENT_TYPE, render(&status)),
            None => (
                "503 Service Unavailable",
                "text/plain",
                "the daemon did not answer\n".into(),
            ),
        }
    } else {
        ("404 Not Found", "text/plain", "only /metrics here\n".into())
    };
    let answer = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
}

async fn status(requests: &mpsc::Sender<Pending>) -> Option<Status> {
    let (tx, rx) = oneshot::channel();
    requests.send((Request::Status, tx)).await.ok()?;
    tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .ok()?
        .ok()?
        .status
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipLabels {
    vhid: String,
    interface: String,
    vip: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipStateLabels {
    vhid: String,
    interface: String,
    vip: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceLabels {
    interface: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// A histogram the daemon has counted, encoded as Prometheus's classic one.
#[derive(Debug)]
struct Buckets(LagHistogram);

impl EncodeMetric for Buckets {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(
            self.0.sum_ns as f64 / 1e9,
            self.0.count(),
            &self.0.buckets(),
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A gauge already set.
fn gauge(value: i64) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(value);
    gauge
}

/// A counter at the daemon's running total.
fn counter(value: u64) -> Counter {
    let counter = Counter::default();
    counter.inc_by(value);
    counter
}

/// The status as OpenMetrics text.
pub fn render(status: &Status) -> String {
    let mut registry = Registry::with_prefix("carp");
    let vip_state = Family::<VipStateLabels, Gauge>::default();
    let transitions = Family::<VipLabels, Counter>::default();
    let skew = Family::<VipLabels, Gauge>::default();
    for v in &status.vips {
        let labels = VipLabels {
            vhid: v.vhid.to_string(),
            interface: v.interface.clone(),
            vip: v.address.clone(),
        };
        for state in [State::Init, State::Backup, State::Master] {
            vip_state
                .get_or_create(&VipStateLabels {
                    vhid: labels.vhid.clone(),
                    interface: labels.interface.clone(),
                    vip: labels.vip.clone(),
                    state: state.to_string(),
                })
                .set(i64::from(v.state == state));
        }
        transitions.get_or_create(&labels).inc_by(v.transitions);
        skew.get_or_create(&labels)
            .set(i64::from(v.effective_advskew));
    }
    registry.register("vip_state", "1 for the VIP's current state", vip_state);
    registry.register("vip_transitions", "State changes of the VIP", transitions);
    registry.register(
        "vip_effective_advskew",
        "Skew on the wire: configured plus demotion",
        skew,
    );
    let c = &status.counters;
    registry.register("adverts_sent", "CARP adverts sent", counter(c.adverts_sent));
    registry.register(
        "adverts_received",
        "CARP adverts accepted",
        counter(c.adverts_received),
    );
    let rejected = Family::<ReasonLabels, Counter>::default();
    for (reason, n) in [
        ("bad_auth", c.bad_auth),
        ("bad_ttl", c.bad_ttl),
        ("malformed", c.malformed),
        ("unknown_vhid", c.unknown_vhid),
        ("backlog_full", c.dropped_backlog),
    ] {
        rejected
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc_by(n);
    }
    registry.register(
        "adverts_rejected",
        "CARP adverts dropped, by reason",
        rejected,
    );
    registry.register(
        "advert_send_errors",
        "Adverts that failed to send",
        counter(c.send_errors),
    );
    registry.register("garps_sent", "Gratuitous ARPs sent", counter(c.garps_sent));
    registry.register(
        "notify_failures",
        "Notify hooks that failed or timed out",
        counter(c.notify_failures),
    );
    for (name, help, n) in [
        (
            "xdp_arp_replied",
            "ARP requests XDP answered for a VIP",
            c.xdp_arp_replied,
        ),
        (
            "xdp_arp_dropped_backup",
            "ARP requests for a VIP dropped as backup",
            c.xdp_arp_dropped_backup,
        ),
        (
            "xdp_arp_dropped_stale",
            "ARP requests dropped: the daemon's heartbeat went stale",
            c.xdp_arp_dropped_stale,
        ),
        (
            "xdp_vmac_accepted",
            "Frames to the virtual MAC taken in",
            c.xdp_vmac_accepted,
        ),
    ] {
        registry.register(name, help, counter(n));
    }
    let demotion = Family::<SourceLabels, Gauge>::default();
    for (source, d) in &status.demotion_by_source {
        demotion
            .get_or_create(&SourceLabels {
                source: source.clone(),
            })
            .set(i64::from(*d));
    }
    registry.register(
        "demotion",
        "Demotion added to every skew, by source",
        demotion,
    );
    registry.register(
        "maintenance",
        "1 in maintenance mode",
        gauge(i64::from(status.maintenance)),
    );
    if let Some(sync) = &status.sync {
        registry.register(
            "sync_connected",
            "1 while the sync session is up",
            gauge(i64::from(sync.connected)),
        );
        registry.register(
            "sync_bulk_demoted",
            "1 while demoted until the first bulk update",
            gauge(i64::from(sync.demoted)),
        );
        let held = i64::try_from(sync.flows_held).unwrap_or(i64::MAX);
        registry.register("sync_flows_held", "Flows in the synced table", gauge(held));
        for (name, help, n) in [
            (
                "sync_deltas_sent",
                "Flow deltas sent to the peer",
                sync.deltas_sent,
            ),
            (
                "sync_deltas_received",
                "Flow deltas from the peer",
                sync.deltas_received,
            ),
            (
                "sync_deltas_dropped",
                "Deltas the capture could not queue",
                sync.deltas_dropped,
            ),
            (
                "sync_deltas_lost_in_xdp",
                "Deltas XDP could not queue",
                sync.deltas_lost_in_xdp,
            ),
            ("sync_sessions", "Sync sessions established", sync.sessions),
            ("sync_refused", "Sync connections refused", sync.refused),
            (
                "sync_conntrack_errors",
                "Conntrack installs that failed",
                sync.install.conntrack_errors,
            ),
            (
                "sync_map_errors",
                "Flow map installs that failed",
                sync.install.map_errors,
            ),
        ] {
            registry.register(name, help, counter(n));
        }
        registry.register(
            "sync_send_lag_seconds",
            "From reading a flow change off XDP's ring to having it on the sync link, per batch",
            Buckets(sync.send_lag.clone()),
        );
        registry.register(
            "sync_install_lag_seconds",
            "From a sync frame's arrival to its flows being in conntrack",
            Buckets(sync.install.install_lag.clone()),
        );
        let c = &sync.config;
        if c.role != "off" && !c.role.is_empty() {
            registry.register(
                "config_sync_in_step",
                "1 when both nodes hold the same configuration",
                gauge(i64::from(c.in_step)),
            );
        }
    }
    if let Some(dhcp) = &status.dhcp {
        registry.register(
            "dhcp_kea_running",
            "1 while kea-dhcp4 runs",
            gauge(i64::from(dhcp.running)),
        );
        let leases = Family::<InterfaceLabels, Gauge>::default();
        for scope in &dhcp.scopes {
            leases
                .get_or_create(&InterfaceLabels {
                    interface: scope.interface.clone(),
                })
                .set(i64::try_from(scope.leases).unwrap_or(i64::MAX));
        }
        registry.register("dhcp_leases", "Active leases, by interface", leases);
        if let Some(ha) = &dhcp.ha {
            let state = Family::<StateLabels, Gauge>::default();
            state
                .get_or_create(&StateLabels {
                    state: ha.local_state.clone(),
                })
                .set(1);
            registry.register("dhcp_ha_state", "1 for Kea's HA state here", state);
            registry.register(
                "dhcp_unacked_clients",
                "Clients the partner seems not to answer",
                gauge(i64::try_from(ha.unacked_clients).unwrap_or(i64::MAX)),
            );
        }
    }
    let mut out = String::new();
    if encode(&mut out, &registry).is_err() {
        out = "# the metrics could not be encoded\n".into();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        control::{Counters, VipStatus},
        sync::service::SyncStatus,
    };

    #[test]
    fn the_status_becomes_openmetrics_text() {
        let mut send_lag = LagHistogram::default();
        send_lag.observe(Duration::from_micros(700));
        send_lag.observe(Duration::from_millis(3));
        let status = Status {
            node: "gw1".into(),
            maintenance: false,
            demotion: 0,
            vips: vec![VipStatus {
                interface: "lan".into(),
                vhid: 1,
                address: "198.18.1.1/24".into(),
                state: State::Master,
                advbase: 1,
                advskew: 0,
                effective_advskew: 0,
                demotion: 0,
                since: String::new(),
                mac: String::new(),
                transitions: 2,
            }],
            counters: Counters {
                adverts_sent: 7,
                bad_auth: 3,
                ..Counters::default()
            },
            sync: Some(SyncStatus {
                send_lag,
                ..SyncStatus::default()
            }),
            dhcp: None,
            demotion_by_source: [("maintenance".to_owned(), 240)].into(),
            stopping: false,
        };
        let text = render(&status);
        for line in [
            "carp_vip_state{vhid=\"1\",interface=\"lan\",vip=\"198.18.1.1/24\",state=\"MASTER\"} 1",
            "carp_vip_state{vhid=\"1\",interface=\"lan\",vip=\"198.18.1.1/24\",state=\"BACKUP\"} 0",
            "carp_vip_transitions_total{vhid=\"1\",interface=\"lan\",vip=\"198.18.1.1/24\"} 2",
            "carp_adverts_sent_total 7",
            "carp_adverts_rejected_total{reason=\"bad_auth\"} 3",
            "carp_demotion{source=\"maintenance\"} 240",
            "# TYPE carp_sync_send_lag_seconds histogram",
            "carp_sync_send_lag_seconds_bucket{le=\"0.0005\"} 0",
            "carp_sync_send_lag_seconds_bucket{le=\"0.001\"} 1",
            "carp_sync_send_lag_seconds_bucket{le=\"0.005\"} 2",
            "carp_sync_send_lag_seconds_bucket{le=\"+Inf\"} 2",
            "carp_sync_send_lag_seconds_count 2",
            "carp_sync_install_lag_seconds_count 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
