//! The control socket between the daemon and the CLI: one JSON request per connection, one
//! JSON response back (or, for `carp events`, one line per event until the reader goes). The types here are also the `carp status --json` format.

use crate::{
    carp::fsm::State,
    dhcp::{LeaseRow, supervisor::DhcpStatus},
    events::{Event, EventKind, Events},
    sync::service::{FlowRow, SyncStatus},
};
use serde::{Deserialize, Serialize};
use std::{
    io::{BufRead, BufReader, Write},
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::{
            fs::{FileTypeExt, PermissionsExt},
            net::UnixStream,
        },
    },
    path::{Path, PathBuf},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{broadcast, mpsc, oneshot},
};
use tracing::{debug, warn};

/// Longest request line the daemon reads; anything longer is refused.
const MAX_REQUEST: u64 = 4096;

/// What the CLI asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Status,
    Maintenance {
        enable: bool,
    },
    /// The synced flow table (`carp flows`).
    Flows,
    /// Re-execute the daemon's binary in place, keeping its VIPs, XDP and sockets.
    Upgrade,
    /// Apply the configuration file again (also SIGHUP).
    Reload,
    /// A primary: push the configuration now (or show what it would change) and wait for
    /// the secondary's answer.
    #[serde(rename = "config-push")]
    ConfigPush {
        dry_run: bool,
        force: bool,
    },
    /// A secondary: apply the configuration received before the last one again.
    #[serde(rename = "config-rollback")]
    ConfigRollback,
    /// Kea's leases (`carp leases`).
    Leases,
    /// Every event from now on, one JSON line each, until the reader goes (`carp events`).
    Events,
    /// Fault injection for the tests; refused unless the daemon runs with
    /// `CARP_TEST_HOOKS=1` in its environment.
    TestHook {
        hook: TestHook,
    },
}

/// The faults a test can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TestHook {
    /// Panics the sync installer thread.
    PanicInstaller,
    /// The sync session reads and throws away every frame from the peer, as if lost in
    /// flight, until `AcceptSyncFrames`.
    DiscardSyncFrames,
    AcceptSyncFrames,
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<Vec<FlowRow>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leases: Option<Vec<LeaseRow>>,
    /// What a reload did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// A refused configuration: `field: problem` lines, as `carp check` prints them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problems: Option<Vec<String>>,
}

/// The node as `carp status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub maintenance: bool,
    /// Node-wide demotion added to every vhid's advskew.
    pub demotion: u32,
    pub vips: Vec<VipStatus>,
    pub counters: Counters,
    /// State sync, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncStatus>,
    /// Kea, when this node serves DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpStatus>,
    /// The demotion's parts: links_down, send_errors, maintenance, unsynced.
    #[serde(default)]
    pub demotion_by_source: std::collections::BTreeMap<String, u32>,
    /// Told to stop and handing its VIPs over: changes are refused until it exits.
    #[serde(default)]
    pub stopping: bool,
}

/// One VIP's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    pub interface: String,
    pub vhid: u8,
    pub address: String,
    pub state: State,
    pub advbase: u8,
    /// Configured skew.
    pub advskew: u8,
    /// Skew on the wire: configured plus demotion, capped at 240.
    pub effective_advskew: u8,
    pub demotion: u32,
    /// RFC 3339 time the current state was entered.
    pub since: String,
    pub mac: String,
    /// State changes since the daemon started.
    #[serde(default)]
    pub transitions: u64,
}

/// Protocol and data-plane counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub adverts_sent: u64,
    pub adverts_received: u64,
    pub send_errors: u64,
    pub garps_sent: u64,
    pub bad_auth: u64,
    pub bad_ttl: u64,
    pub malformed: u64,
    pub unknown_vhid: u64,
    pub dropped_backlog: u64,
    pub xdp_arp_replied: u64,
    pub xdp_arp_dropped_backup: u64,
    pub xdp_arp_dropped_stale: u64,
    pub xdp_vmac_accepted: u64,
    /// Notify hooks that failed or timed out.
    #[serde(default)]
    pub notify_failures: u64,
}

/// A reload's answer when `[sync]` changed: the daemon re-executes in place to apply it.
pub const REEXECUTING: &str = "sync settings changed: re-executing in place";

/// A request waiting for the daemon's answer.
pub type Pending = (Request, oneshot::Sender<Response>);

/// Why the control socket could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} exists and is not a socket: refusing to replace it (check node.control_socket)"
    )]
    NotASocket { path: PathBuf },
    #[error("another daemon answers on {path}")]
    InUse { path: PathBuf },
    #[error("bad answer from {path}")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Binds `path` (replacing a stale socket), or takes over the socket a previous run handed
/// over (`carp upgrade`), and forwards each request to `requests`. Returns the listening
/// socket's descriptor, valid while the daemon runs, for the next upgrade.
pub fn serve(
    path: &Path,
    requests: mpsc::Sender<Pending>,
    events: Events,
    inherited: Option<OwnedFd>,
) -> Result<RawFd, ControlError> {
    let error = |source| ControlError::Socket {
        path: path.to_owned(),
        source,
    };
    let listener = match inherited {
        Some(fd) => {
            let listener = std::os::unix::net::UnixListener::from(fd);
            listener.set_nonblocking(true).map_err(error)?;
            UnixListener::from_std(listener).map_err(error)?
        }
        None => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(error)?;
            }
            remove_stale_socket(path)?;
            let listener = UnixListener::bind(path).map_err(error)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                .map_err(error)?;
            listener
        }
    };
    let fd = listener.as_raw_fd();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(handle_connection(stream, requests.clone(), events.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(fd)
}

/// Writes every event to a `carp events` reader until it goes away.
async fn stream_events(mut write: tokio::net::unix::OwnedWriteHalf, events: Events) {
    let mut receiver = events.subscribe();
    loop {
        let event = match receiver.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(count)) => Event {
                time: String::new(),
                node: String::new(),
                kind: EventKind::Missed { count },
            },
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Ok(mut json) = serde_json::to_string(&event) else {
            continue;
        };
        json.push('\n');
        if write.write_all(json.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Follows the daemon's events (`carp events`), calling `each` per event until it says
/// stop or the daemon goes.
pub fn follow(path: &Path, mut each: impl FnMut(Event) -> bool) -> Result<(), ControlError> {
    let error = |source| ControlError::Socket {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(error)?;
    let mut json = serde_json::to_string(&Request::Events).expect("requests serialize");
    json.push('\n');
    stream.write_all(json.as_bytes()).map_err(error)?;
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(error)?;
        let event = serde_json::from_str(&line).map_err(|source| ControlError::Decode {
            path: path.to_owned(),
            source,
        })?;
        if !each(event) {
            break;
        }
    }
    Ok(())
}

/// Removes what a dead daemon left at `path`: a socket nobody answers on. Anything else, a
/// file that is not a socket or a daemon still serving, is refused and left alone.
fn remove_stale_socket(path: &Path) -> Result<(), ControlError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::Socket {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_owned(),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ControlError::InUse {
            path: path.to_owned(),
        });
    }
    std::fs::remove_file(path).map_err(|source| ControlError::Socket {
        path: path.to_owned(),
        source,
    })?;
    debug!(path = %path.display(), "removed stale control socket");
    Ok(())
}

async fn handle_connection(
    stream: tokio::net::UnixStream,
    requests: mpsc::Sender<Pending>,
    events: Events,
) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST));
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    let response = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(Request::Events) => return stream_events(write, events).await,
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                if requests.send((request, tx)).await.is_err() {
                    return;
                }
                match rx.await {
                    Ok(response) => response,
                    Err(_) => return,
                }
            }
            Err(e) => Response::error(format!("bad request: {e}")),
        },
        _ => Response::error("no request line within 5 s".into()),
    };
    if let Ok(mut json) = serde_json::to_string(&response) {
        json.push('\n');
        let _ = write.write_all(json.as_bytes()).await;
    }
}

impl Response {
    fn empty(ok: bool) -> Self {
        Self {
            ok,
            error: None,
            status: None,
            flows: None,
            leases: None,
            message: None,
            problems: None,
        }
    }

    pub fn error(message: String) -> Self {
        Self {
            error: Some(message),
            ..Self::empty(false)
        }
    }

    /// A configuration refused for `problems`.
    pub fn refused(problems: Vec<String>) -> Self {
        Self {
            error: Some("configuration refused; the running one stays".into()),
            problems: Some(problems),
            ..Self::empty(false)
        }
    }

    pub fn flows(flows: Vec<FlowRow>) -> Self {
        Self {
            flows: Some(flows),
            ..Self::empty(true)
        }
    }

    pub fn leases(leases: Vec<LeaseRow>) -> Self {
        Self {
            leases: Some(leases),
            ..Self::empty(true)
        }
    }

    pub fn status(status: Status) -> Self {
        Self {
            status: Some(status),
            ..Self::empty(true)
        }
    }

    /// What the peer said when it took a push (a diff, or what it applied).
    pub fn taken(message: String) -> Self {
        Self {
            message: Some(message),
            ..Self::empty(true)
        }
    }

    /// The status with a word on what was done.
    pub fn done(message: String, status: Status) -> Self {
        Self {
            message: Some(message),
            ..Self::status(status)
        }
    }
}

/// Sends `request` to the daemon at `path` and waits for its answer (the CLI side).
pub fn call(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let error = |source| ControlError::Socket {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(error)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(error)?;
    let mut json = serde_json::to_string(request).expect("requests serialize");
    json.push('\n');
    stream.write_all(json.as_bytes()).map_err(error)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(error)?;
    serde_json::from_str(&line).map_err(|source| ControlError::Decode {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"command":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"maintenance","enable":true}"#).unwrap(),
            Request::Maintenance { enable: true }
        );
    }

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("carp-ctl-{}-{name}", std::process::id()))
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_never_removed() {
        let path = scratch("plain");
        std::fs::write(&path, b"precious").unwrap();
        let (tx, _rx) = mpsc::channel::<Pending>(1);
        let refused = serve(&path, tx, Events::new("test"), None).unwrap_err();
        assert!(
            matches!(refused, ControlError::NotASocket { .. }),
            "{refused}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(path).unwrap();
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_and_a_dead_one_replaced() {
        let path = scratch("live");
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (tx, _rx) = mpsc::channel::<Pending>(1);
        let refused = serve(&path, tx.clone(), Events::new("test"), None).unwrap_err();
        assert!(matches!(refused, ControlError::InUse { .. }), "{refused}");
        drop(live);
        serve(&path, tx, Events::new("test"), None).expect("a socket nobody answers on is stale");
        std::fs::remove_file(path).unwrap();
    }

    #[tokio::test]
    async fn server_answers_and_refuses_garbage() {
        let path = std::env::temp_dir().join(format!("carp-ctl-{}.sock", std::process::id()));
        let (tx, mut rx) = mpsc::channel::<Pending>(4);
        serve(&path, tx, Events::new("test"), None).unwrap();
        tokio::spawn(async move {
            while let Some((request, reply)) = rx.recv().await {
                let _ = reply.send(Response::error(format!("got {request:?}")));
            }
        });
        let p = path.clone();
        let answer = tokio::task::spawn_blocking(move || call(&p, &Request::Status))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer.error.as_deref(), Some("got Status"));
        let p = path.clone();
        let garbage = tokio::task::spawn_blocking(move || {
            let mut s = UnixStream::connect(&p).unwrap();
            s.write_all(b"{not json\n").unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).unwrap();
            line
        })
        .await
        .unwrap();
        assert!(garbage.contains("bad request"), "{garbage}");
        std::fs::remove_file(path).unwrap();
    }
}
