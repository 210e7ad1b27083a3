//! The TOML configuration: parsed strictly (unknown keys are errors), then validated against
//! the host's interfaces. Every problem is reported, one line each, naming its field.

use crate::{
    carp::packet::{AuthKey, MAX_PASSPHRASE_LEN},
    config_sync::{self, Area},
    dhcp::scope::{self as dhcp_scope, DhcpScope, RawDhcp},
    interfaces::{Interface, Ipv4Net},
    nat::{self, NatRule, RawNat},
    notify::{self, Hook, RawNotify},
    sync::{
        service::SyncConfig,
        transport::{MIN_SECRET_LEN, SharedKey},
    },
};
use carp_common::flow::DEFAULT_FLOWS_MAX;
use serde::Deserialize;
use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field, as a TOML path: `carp.advbase`, `vip[2].address`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid { problems: Vec<Problem> },
}

/// Which MAC answers for the VIPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MacMode {
    /// `00:00:5e:00:01:<vhid>`, as FreeBSD/pfSense.
    #[default]
    Virtual,
    /// The interface's own MAC, for networks that forbid MAC changes (ucarp's way).
    Interface,
}

/// How XDP attaches to the CARP interfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeChoice {
    /// Native (driver) mode, except generic on veth: veth's native path leaves a frame whose
    /// destination XDP rewrote marked OTHERHOST, and its XDP_TX needs XDP on the peer.
    #[default]
    Auto,
    Native,
    Generic,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node: Node,
    pub carp: Carp,
    pub vips: Vec<Vip>,
    /// Connection-state sync; `None` leaves flow capture off.
    pub sync: Option<SyncConfig>,
    /// Outbound NAT to the VIPs, in carp's own nftables table.
    pub nat: Vec<NatRule>,
    /// What this node sends to its sync peer, or takes from it.
    pub config_sync: ConfigSync,
    /// DHCP scopes Kea serves, as a hot-standby pair with the sync peer.
    pub dhcp: Vec<DhcpScope>,
    /// Commands run on state changes.
    pub notify: Vec<Hook>,
    /// Where the Prometheus endpoint listens, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Kea run by a service manager (`[kea] run_by = "service"`); `None`: carp runs it.
    pub kea_service: Option<KeaService>,
}

/// Kea as a service (systemd's kea-dhcp4-server): carp writes its configuration, has the
/// service manager reload it, and drives it through its control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeaService {
    pub config: PathBuf,
    pub control_socket: PathBuf,
    pub lease_file: PathBuf,
    /// Run after a new configuration is written (and at start): reloads or starts Kea.
    pub reload: Vec<String>,
}

/// The `[config_sync]` section: a primary pushes areas, a secondary accepts them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSync {
    pub push: Vec<Area>,
    pub accept: Vec<Area>,
    /// The primary's nftables area: ruleset files, loaded on the secondary as one
    /// transaction.
    pub nftables: Vec<PathBuf>,
    /// The primary's files area: files written on the secondary with their mode.
    pub files: Vec<SyncedFile>,
    /// The secondary's own commands to run after a synced file changed (the primary never
    /// sends a command).
    pub reload_after: BTreeMap<PathBuf, Vec<String>>,
}

/// A file of the files area, as the primary declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedFile {
    pub path: PathBuf,
    /// Permission bits, as `chmod` takes them.
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub control_socket: PathBuf,
    pub state_dir: PathBuf,
    pub xdp_mode: XdpModeChoice,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carp {
    pub advbase: u8,
    pub advskew: u8,
    pub preempt: bool,
    pub key: AuthKey,
    pub mac: MacMode,
    /// Unicast peer for adverts, for networks that block multicast.
    pub peer: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub interface: String,
    pub vhid: u8,
    pub address: Ipv4Net,
    pub advskew: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    /// Optional on a secondary that accepts the carp area (it comes with the first sync).
    carp: Option<RawCarp>,
    #[serde(default)]
    vip: Vec<RawVip>,
    sync: Option<RawSync>,
    #[serde(default)]
    nat: Vec<RawNat>,
    config_sync: Option<RawConfigSync>,
    #[serde(default)]
    dhcp: Vec<RawDhcp>,
    #[serde(default)]
    notify: Vec<RawNotify>,
    metrics: Option<RawMetrics>,
    kea: Option<RawKea>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKea {
    run_by: String,
    config: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    lease_file: Option<PathBuf>,
    reload: Option<Vec<String>>,
}

/// Debian's kea-dhcp4-server: its configuration file, control socket (in the unit's
/// RuntimeDirectory) and lease file, and the unit to reload.
const KEA_SERVICE_CONFIG: &str = "/etc/kea/kea-dhcp4.conf";
const KEA_SERVICE_SOCKET: &str = "/run/kea/kea4-ctrl-socket";
const KEA_SERVICE_LEASES: &str = "/var/lib/kea/kea-leases4.csv";
const KEA_SERVICE_RELOAD: [&str; 3] = ["systemctl", "reload-or-restart", "kea-dhcp4-server"];

/// `[kea]`: who runs Kea, and where the service's files are.
fn kea_service(raw: Option<RawKea>, problems: &mut Vec<Problem>) -> Option<KeaService> {
    let raw = raw?;
    let mut problem = |field: &str, message: String| {
        problems.push(Problem {
            field: format!("kea.{field}"),
            message,
        })
    };
    match raw.run_by.as_str() {
        "service" => {}
        "carp" => {
            let named = [
                ("config", raw.config.is_some()),
                ("control_socket", raw.control_socket.is_some()),
                ("lease_file", raw.lease_file.is_some()),
                ("reload", raw.reload.is_some()),
            ];
            for (field, _) in named.iter().filter(|(_, set)| *set) {
                problem(field, "only with run_by = \"service\" (carp keeps Kea's files in its state directory)".into());
            }
            return None;
        }
        other => {
            problem(
                "run_by",
                format!("`{other}` is neither \"carp\" nor \"service\""),
            );
            return None;
        }
    }
    let mut path = |field: &str, given: Option<PathBuf>, default: &str| {
        let path = given.unwrap_or_else(|| default.into());
        if !path.is_absolute() {
            problem(
                field,
                format!("`{}` is not an absolute path", path.display()),
            );
        }
        path
    };
    let config = path("config", raw.config, KEA_SERVICE_CONFIG);
    let control_socket = path("control_socket", raw.control_socket, KEA_SERVICE_SOCKET);
    let lease_file = path("lease_file", raw.lease_file, KEA_SERVICE_LEASES);
    let reload = raw
        .reload
        .unwrap_or_else(|| KEA_SERVICE_RELOAD.map(String::from).to_vec());
    if reload.first().is_none_or(String::is_empty) {
        problem("reload", "names no command".into());
    }
    Some(KeaService {
        config,
        control_socket,
        lease_file,
        reload,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfigSync {
    #[serde(default)]
    push: Vec<String>,
    #[serde(default)]
    accept: Vec<String>,
    #[serde(default)]
    nftables: Vec<PathBuf>,
    #[serde(default)]
    files: Vec<RawSyncedFile>,
    #[serde(default)]
    reload_after: BTreeMap<PathBuf, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSyncedFile {
    path: PathBuf,
    mode: Option<String>,
}

/// A synced file's mode when the primary names none.
const DEFAULT_FILE_MODE: u32 = 0o644;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    interface: String,
    listen: String,
    peer: String,
    key_file: PathBuf,
    flows_max: Option<i64>,
}

/// Largest flow map accepted (each entry is about 200 bytes of kernel memory).
const MAX_FLOWS: i64 = 1 << 24;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    control_socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    xdp_mode: XdpModeChoice,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCarp {
    #[serde(default = "default_advbase")]
    advbase: i64,
    #[serde(default)]
    advskew: i64,
    #[serde(default = "default_preempt")]
    preempt: bool,
    passphrase: Option<String>,
    passphrase_file: Option<PathBuf>,
    #[serde(default)]
    mac: MacMode,
    peer: Option<Ipv4Addr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    interface: String,
    vhid: i64,
    address: String,
    advskew: Option<i64>,
}

fn default_advbase() -> i64 {
    1
}

/// pfSense turns preemption on (FreeBSD's default is off): operators expect the primary to
/// take its VIPs back.
fn default_preempt() -> bool {
    true
}

impl Config {
    /// Reads and validates `path` against the host's current interfaces; on a secondary, with
    /// the areas it last received from the primary in place of its own.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, None)
    }

    /// [`Config::load`], with `received` (areas from the primary, rewritten for this node) in
    /// place of the ones kept in the state directory.
    pub fn load_with(path: &Path, received: Option<&str>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let interfaces = crate::interfaces::list().map_err(|e| ConfigError::Read {
            path: "getifaddrs".into(),
            source: e.into(),
        })?;
        let own = Self::parse(&text, &interfaces)?;
        if own.config_sync.accept.is_empty() {
            return Ok(own);
        }
        let kept = config_sync::applied_file(&own.node.state_dir);
        let received = match received {
            Some(received) => received.to_owned(),
            None => match std::fs::read_to_string(&kept) {
                Ok(received) => received,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(own),
                Err(source) => return Err(ConfigError::Read { path: kept, source }),
            },
        };
        let composed =
            config_sync::compose(&text, &received, &own.config_sync.accept).map_err(|message| {
                ConfigError::Invalid {
                    problems: vec![Problem {
                        field: "config_sync".into(),
                        message,
                    }],
                }
            })?;
        Self::parse(&composed, &interfaces)
    }

    /// Parses and validates `text`; `interfaces` is what the host has.
    pub fn parse(text: &str, interfaces: &[Interface]) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            problems: vec![toml_problem(text, &e)],
        })?;
        let mut problems = Vec::new();
        let config = validate(raw, interfaces, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    /// The default control socket of a node.
    pub fn default_socket(name: &str) -> PathBuf {
        PathBuf::from(format!("/run/carp/{name}.sock"))
    }
}

/// A TOML syntax or shape error as one line: `line L: message`, with the key serde names.
fn toml_problem(text: &str, error: &toml::de::Error) -> Problem {
    let line = error
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let message = error.message().replace('\n', " ");
    Problem {
        field: line.map_or_else(|| "config".to_owned(), |l| format!("line {l}")),
        message,
    }
}

fn validate(raw: RawConfig, interfaces: &[Interface], problems: &mut Vec<Problem>) -> Config {
    let mut problem = |field: String, message: String| problems.push(Problem { field, message });

    let name = raw.node.name;
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name.starts_with('.')
    {
        problem(
            "node.name".into(),
            format!("`{name}` must be 1-64 characters of A-Z a-z 0-9 - _ . (it names a directory)"),
        );
    }

    let config_sync = validate_config_sync(raw.config_sync, raw.sync.is_some(), &mut problem);
    let waiting_for_sync = config_sync.accept.contains(&Area::Carp);
    let carp = match raw.carp {
        Some(carp) => carp,
        // A secondary waits for the primary's [carp]: nothing is advertised meanwhile.
        None if waiting_for_sync => RawCarp::waiting(),
        None => {
            problem("carp".into(), "missing: a [carp] section is needed".into());
            RawCarp::waiting()
        }
    };
    let advbase = in_range(carp.advbase, 1, 255, "carp.advbase", &mut problem);
    let advskew = in_range(carp.advskew, 0, 254, "carp.advskew", &mut problem);
    let passphrase = match (carp.passphrase, carp.passphrase_file) {
        (Some(p), None) => Some(p.into_bytes()),
        (None, Some(path)) => match read_secret(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                problem(
                    "carp.passphrase_file".into(),
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        },
        (Some(_), Some(_)) => {
            problem(
                "carp.passphrase".into(),
                "set either passphrase or passphrase_file, not both".into(),
            );
            None
        }
        (None, None) => {
            problem(
                "carp.passphrase".into(),
                "missing: set passphrase or passphrase_file".into(),
            );
            None
        }
    };
    let key = passphrase.and_then(|p| {
        let key = AuthKey::new(&p);
        if key.is_none() {
            problem(
                "carp.passphrase".into(),
                format!(
                    "{} bytes, at most {MAX_PASSPHRASE_LEN} (the CARP key is 20 bytes, NUL-terminated)",
                    p.len()
                ),
            );
        }
        key
    });

    let vip_addresses: Vec<Ipv4Addr> = raw
        .vip
        .iter()
        .filter_map(|v| v.address.parse::<Ipv4Net>().ok().map(|n| n.addr))
        .collect();
    let mut vips = Vec::new();
    let mut seen_vhids = HashSet::new();
    let mut seen_addrs = HashSet::new();
    for (i, v) in raw.vip.iter().enumerate() {
        let field = |name: &str| format!("vip[{i}].{name}");
        let vhid = in_range(v.vhid, 1, 255, &field("vhid"), &mut problem);
        let vip_skew = v.advskew.map_or(advskew, |s| {
            in_range(s, 0, 254, &field("advskew"), &mut problem)
        });
        if !seen_vhids.insert((v.interface.as_str(), v.vhid)) {
            problem(
                field("vhid"),
                format!(
                    "vhid {} is used twice on interface `{}`",
                    v.vhid, v.interface
                ),
            );
        }
        let address = match v.address.parse::<Ipv4Net>() {
            Ok(a) => Some(a),
            Err(e) => {
                problem(field("address"), e);
                None
            }
        };
        if let Some(address) = address
            && !seen_addrs.insert(address.addr)
        {
            problem(
                field("address"),
                format!("{} is configured twice", address.addr),
            );
        }
        match interfaces.iter().find(|iface| iface.name == v.interface) {
            None => problem(
                field("interface"),
                format!("no interface `{}` on this host", v.interface),
            ),
            Some(iface) => {
                if let Some(address) = address {
                    // The VIP itself may be on the interface already (a restart after a crash).
                    let inside = iface
                        .addrs
                        .iter()
                        .filter(|real| !vip_addresses.contains(&real.addr))
                        .any(|real| real.contains(address.addr));
                    if !inside {
                        problem(
                            field("address"),
                            format!(
                                "{} is not inside the subnet of a real address on `{}`",
                                address.addr, v.interface
                            ),
                        );
                    }
                }
            }
        }
        vips.push(Vip {
            interface: v.interface.clone(),
            vhid,
            address: address.unwrap_or(Ipv4Net {
                addr: Ipv4Addr::UNSPECIFIED,
                prefix_len: 0,
            }),
            advskew: vip_skew,
        });
    }
    if raw.vip.is_empty() && !waiting_for_sync {
        problem("vip".into(), "no [[vip]] configured".into());
    }
    let sync = raw
        .sync
        .and_then(|raw| validate_sync(raw, interfaces, &mut problem));
    let nat = nat::validate(
        &raw.nat,
        &nat::Cluster {
            interfaces,
            vips: &vips,
            sync: sync.as_ref().map(|s| s.listen.ip()),
        },
        problems,
    );
    let dhcp = dhcp_scope::validate(&raw.dhcp, interfaces, &vips, problems);
    let notify = notify::validate(&raw.notify, problems);
    let metrics = raw
        .metrics
        .and_then(|m| match m.listen.parse::<SocketAddr>() {
            Ok(listen) => Some(listen),
            Err(_) => {
                problems.push(Problem {
                    field: "metrics.listen".into(),
                    message: format!("`{}` is not ADDRESS:PORT", m.listen),
                });
                None
            }
        });
    let kea_service = kea_service(raw.kea, problems);
    match &sync {
        _ if raw.dhcp.is_empty() => {}
        None => problems.push(Problem {
            field: "dhcp".into(),
            message: "needs [sync]: Kea's pair talks over the sync link".into(),
        }),
        Some(sync) if !(sync.listen.is_ipv4() && sync.peer.is_ipv4()) => problems.push(Problem {
            field: "dhcp".into(),
            message: "needs IPv4 addresses on the sync link ([sync] listen and peer): Kea's pair talks there".into(),
        }),
        Some(_) => {}
    }

    Config {
        node: Node {
            control_socket: raw
                .node
                .control_socket
                .unwrap_or_else(|| Config::default_socket(&name)),
            state_dir: raw
                .node
                .state_dir
                .unwrap_or_else(|| PathBuf::from(format!("/var/lib/carp/{name}"))),
            xdp_mode: raw.node.xdp_mode,
            name,
        },
        carp: Carp {
            advbase,
            advskew,
            preempt: carp.preempt,
            key: key.unwrap_or_else(|| AuthKey::new(b"").expect("empty key fits")),
            mac: carp.mac,
            peer: carp.peer,
        },
        vips,
        sync,
        nat,
        config_sync,
        dhcp,
        notify,
        metrics,
        kea_service,
    }
}

impl RawCarp {
    /// The `[carp]` of a secondary before its first sync: defaults, and no VIP to use them.
    fn waiting() -> Self {
        Self {
            advbase: default_advbase(),
            advskew: 0,
            preempt: default_preempt(),
            passphrase: Some(String::new()),
            passphrase_file: None,
            mac: MacMode::default(),
            peer: None,
        }
    }
}

fn validate_config_sync(
    raw: Option<RawConfigSync>,
    has_sync: bool,
    problem: &mut impl FnMut(String, String),
) -> ConfigSync {
    let Some(raw) = raw else {
        return ConfigSync::default();
    };
    let mut areas = |names: &[String], field: &str| -> Vec<Area> {
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            match Area::parse(name) {
                Ok(area) if !out.contains(&area) => out.push(area),
                Ok(_) => problem(
                    format!("config_sync.{field}[{i}]"),
                    format!("`{name}` twice"),
                ),
                Err(message) => problem(format!("config_sync.{field}[{i}]"), message),
            }
        }
        out
    };
    let mut sync = ConfigSync {
        push: areas(&raw.push, "push"),
        accept: areas(&raw.accept, "accept"),
        nftables: raw.nftables,
        files: Vec::new(),
        reload_after: raw.reload_after,
    };
    sync.files = validate_synced_files(raw.files, problem);
    if sync.push.contains(&Area::Files) && sync.files.is_empty() {
        problem(
            "config_sync.files".into(),
            "the files area is pushed but names no file".into(),
        );
    }
    for (path, command) in &sync.reload_after {
        let field = format!("config_sync.reload_after.\"{}\"", path.display());
        if !sync.accept.contains(&Area::Files) {
            problem(
                field,
                "runs after a synced file changed: needs `files` in accept".into(),
            );
        } else if !path.is_absolute() {
            problem(field, "the file's path must be absolute".into());
        } else if command.first().is_none_or(String::is_empty) {
            problem(
                field,
                "an empty command (program, then its arguments)".into(),
            );
        }
    }
    for (i, file) in sync.nftables.iter().enumerate() {
        let message = match crate::synced_files::read_regular(file) {
            Ok(Some(_)) => continue,
            Ok(None) => "not found".to_owned(),
            Err(e) => e.to_string(),
        };
        problem(
            format!("config_sync.nftables[{i}]"),
            format!("cannot read {}: {message}", file.display()),
        );
    }
    if sync.push.contains(&Area::Nftables) && sync.nftables.is_empty() {
        problem(
            "config_sync.nftables".into(),
            "the nftables area is pushed but names no ruleset file".into(),
        );
    }
    if !sync.push.is_empty() && !sync.accept.is_empty() {
        problem(
            "config_sync".into(),
            "a node pushes or accepts, not both: the secondary follows the primary".into(),
        );
    }
    if !has_sync && (!sync.push.is_empty() || !sync.accept.is_empty()) {
        problem(
            "config_sync".into(),
            "needs [sync]: the configuration travels on the sync link".into(),
        );
    }
    sync
}

/// The files area's `files = [{ path, mode }]`: absolute paths, each once, readable as text
/// here (the content travels), with an octal mode.
fn validate_synced_files(
    raw: Vec<RawSyncedFile>,
    problem: &mut impl FnMut(String, String),
) -> Vec<SyncedFile> {
    let mut files: Vec<SyncedFile> = Vec::new();
    for (i, file) in raw.into_iter().enumerate() {
        let field = format!("config_sync.files[{i}]");
        let mode = match file.mode.as_deref() {
            None => DEFAULT_FILE_MODE,
            Some(text) => match u32::from_str_radix(text, 8) {
                Ok(mode) if mode <= 0o7777 => mode,
                _ => {
                    problem(
                        format!("{field}.mode"),
                        format!("`{text}` is not an octal mode such as \"0644\""),
                    );
                    continue;
                }
            },
        };
        if !file.path.is_absolute() {
            problem(
                format!("{field}.path"),
                format!("`{}` must be absolute", file.path.display()),
            );
            continue;
        }
        if files.iter().any(|f| f.path == file.path) {
            problem(
                format!("{field}.path"),
                format!("`{}` twice", file.path.display()),
            );
            continue;
        }
        match crate::synced_files::read_regular(&file.path) {
            Err(e) => problem(
                format!("{field}.path"),
                format!("{}: {e}", file.path.display()),
            ),
            Ok(None) => problem(
                format!("{field}.path"),
                format!("cannot read {}: not found", file.path.display()),
            ),
            Ok(Some(_)) => {}
        }
        files.push(SyncedFile {
            path: file.path,
            mode,
        });
    }
    files
}

/// A secret file's bytes without the trailing newline an editor leaves.
fn read_secret(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(path)?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(bytes)
}

fn validate_sync(
    raw: RawSync,
    interfaces: &[Interface],
    problem: &mut impl FnMut(String, String),
) -> Option<SyncConfig> {
    let address = |field: &str, text: &str, problem: &mut dyn FnMut(String, String)| {
        text.parse::<SocketAddr>()
            .map_err(|_| {
                problem(
                    format!("sync.{field}"),
                    format!("`{text}` is not an address:port like 198.18.3.1:8370"),
                );
            })
            .ok()
    };
    let listen = address("listen", &raw.listen, problem);
    let peer = address("peer", &raw.peer, problem);
    match interfaces.iter().find(|i| i.name == raw.interface) {
        None => problem(
            "sync.interface".into(),
            format!("no interface `{}` on this host", raw.interface),
        ),
        Some(iface) => {
            if let Some(listen) = listen
                && !iface
                    .addrs
                    .iter()
                    .any(|a| IpAddr::V4(a.addr) == listen.ip())
            {
                problem(
                    "sync.listen".into(),
                    format!("{} is not an address of `{}`", listen.ip(), raw.interface),
                );
            }
        }
    }
    if let (Some(l), Some(p)) = (listen, peer)
        && l.ip() == p.ip()
    {
        problem(
            "sync.peer".into(),
            "the peer cannot be this node's own address".into(),
        );
    }
    let key = match read_secret(&raw.key_file) {
        Ok(secret) => SharedKey::from_secret(&secret)
            .map_err(|_| {
                problem(
                    "sync.key_file".into(),
                    format!(
                        "{} holds {} bytes, at least {MIN_SECRET_LEN} are needed",
                        raw.key_file.display(),
                        secret.len()
                    ),
                );
            })
            .ok(),
        Err(e) => {
            problem(
                "sync.key_file".into(),
                format!("cannot read {}: {e}", raw.key_file.display()),
            );
            None
        }
    };
    let flows_max = raw.flows_max.unwrap_or(i64::from(DEFAULT_FLOWS_MAX));
    if !(1..=MAX_FLOWS).contains(&flows_max) {
        problem(
            "sync.flows_max".into(),
            format!("{flows_max} is outside 1..={MAX_FLOWS}"),
        );
    }
    Some(SyncConfig {
        interface: raw.interface,
        listen: listen?,
        peer: peer?,
        key: key?,
        flows_max: u32::try_from(flows_max).ok()?,
    })
}

/// `value` as a u8 when within `lo..=hi`, else a problem naming `field` (and 0).
fn in_range(
    value: i64,
    lo: u8,
    hi: u8,
    field: &str,
    problem: &mut impl FnMut(String, String),
) -> u8 {
    if (i64::from(lo)..=i64::from(hi)).contains(&value) {
        value as u8
    } else {
        problem(field.to_owned(), format!("{value} is outside {lo}..={hi}"));
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Vec<Interface> {
        vec![Interface {
            name: "lan".into(),
            index: 2,
            mac: [2, 0, 0, 0, 0, 1],
            link_up: true,
            addrs: vec!["198.18.1.2/24".parse().unwrap()],
        }]
    }

    const GOOD: &str = r#"
[node]
name = "gw1"

[carp]
advbase = 1
advskew = 0
passphrase = "secret"

[[vip]]
interface = "lan"
vhid = 1
address = "198.18.1.1/24"
"#;

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text, &host()) {
            Ok(_) => vec![],
            Err(ConfigError::Invalid { problems }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn good_config_has_defaults() {
        let c = Config::parse(GOOD, &host()).unwrap();
        assert_eq!(c.node.control_socket, PathBuf::from("/run/carp/gw1.sock"));
        assert_eq!(c.node.state_dir, PathBuf::from("/var/lib/carp/gw1"));
        assert!(c.carp.preempt);
        assert_eq!(c.carp.mac, MacMode::Virtual);
        assert_eq!(c.vips[0].vhid, 1);
        assert_eq!(c.vips[0].address.to_string(), "198.18.1.1/24");
    }

    #[test]
    fn each_problem_names_its_field() {
        let text = r#"
[node]
name = "gw/1"
[carp]
advbase = 0
advskew = 255
passphrase = "this passphrase is too long"
[[vip]]
interface = "lan"
vhid = 0
address = "198.18.9.1/24"
[[vip]]
interface = "lan"
vhid = 0
address = "198.18.1.5/24"
advskew = 300
[[vip]]
interface = "wan"
vhid = 256
address = "198.18.1.5"
"#;
        let got = problems(text);
        let expect = [
            "node.name: `gw/1` must be",
            "carp.advbase: 0 is outside 1..=255",
            "carp.advskew: 255 is outside 0..=254",
            "carp.passphrase: 27 bytes, at most 19",
            "vip[0].vhid: 0 is outside 1..=255",
            "vip[0].address: 198.18.9.1 is not inside the subnet of a real address on `lan`",
            "vip[1].vhid: 0 is outside 1..=255",
            "vip[1].advskew: 300 is outside 0..=254",
            "vip[1].vhid: vhid 0 is used twice on interface `lan`",
            "vip[2].vhid: 256 is outside 1..=255",
            "vip[2].address: `198.18.1.5` is not ADDRESS/PREFIX",
            "vip[2].interface: no interface `wan` on this host",
        ];
        for e in expect {
            assert!(
                got.iter().any(|g| g.starts_with(e)),
                "missing `{e}` in {got:#?}"
            );
        }
        assert_eq!(got.len(), expect.len(), "{got:#?}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let got = problems(&GOOD.replace("advskew = 0", "advskw = 0"));
        assert_eq!(got.len(), 1);
        assert!(
            got[0].starts_with("line 7: unknown field `advskw`"),
            "{got:?}"
        );
    }

    #[test]
    fn unknown_section_is_refused() {
        let got = problems(&format!("{GOOD}\n[bogus]\nx = 1\n"));
        assert!(got[0].contains("unknown field `bogus`"), "{got:?}");
    }

    #[test]
    fn bad_mac_mode_and_peer_are_refused() {
        let got = problems(&GOOD.replace("advskew = 0", "mac = \"random\""));
        assert!(got[0].contains("unknown variant `random`"), "{got:?}");
        let got = problems(&GOOD.replace("advskew = 0", "peer = \"gw2\""));
        assert!(got[0].contains("line 7"), "{got:?}");
    }

    #[test]
    fn passphrase_file_is_read_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("carp-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pass");
        std::fs::write(&file, "secret\n").unwrap();
        let text = GOOD.replace(
            "passphrase = \"secret\"",
            &format!("passphrase_file = {:?}", file.display().to_string()),
        );
        let c = Config::parse(&text, &host()).unwrap();
        let from_literal = Config::parse(GOOD, &host()).unwrap();
        assert_eq!(
            c.carp.key.digest(1, &[], 1),
            from_literal.carp.key.digest(1, &[], 1)
        );
        std::fs::remove_dir_all(dir).unwrap();
        assert!(problems(&text)[0].starts_with("carp.passphrase_file: cannot read"));
    }

    #[test]
    fn missing_or_double_passphrase_is_refused() {
        let got = problems(&GOOD.replace("passphrase = \"secret\"", ""));
        assert_eq!(
            got,
            ["carp.passphrase: missing: set passphrase or passphrase_file"]
        );
        let got = problems(&GOOD.replace(
            "passphrase = \"secret\"",
            "passphrase = \"a\"\npassphrase_file = \"/x\"",
        ));
        assert!(got[0].contains("not both"));
    }

    #[test]
    fn vip_already_on_the_interface_does_not_count_as_real() {
        let mut h = host();
        h[0].addrs = vec!["198.18.1.1/24".parse().unwrap()];
        let got = Config::parse(GOOD, &h).unwrap_err().to_string();
        assert!(
            got.contains("not inside the subnet of a real address"),
            "{got}"
        );
    }

    #[test]
    fn duplicate_address_is_refused() {
        let text = format!(
            "{GOOD}\n[[vip]]\ninterface = \"lan\"\nvhid = 2\naddress = \"198.18.1.1/24\"\n"
        );
        assert_eq!(
            problems(&text),
            ["vip[1].address: 198.18.1.1 is configured twice"]
        );
    }

    fn sync_host() -> Vec<Interface> {
        let mut h = host();
        h.push(Interface {
            name: "sync".into(),
            index: 3,
            mac: [2, 0, 0, 0, 0, 2],
            link_up: true,
            addrs: vec!["198.18.3.1/24".parse().unwrap()],
        });
        h
    }

    fn sync_problems(section: &str) -> Result<Config, Vec<String>> {
        match Config::parse(&format!("{GOOD}\n[sync]\n{section}"), &sync_host()) {
            Ok(c) => Ok(c),
            Err(ConfigError::Invalid { problems }) => {
                Err(problems.iter().map(ToString::to_string).collect())
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn a_kea_service_defaults_to_debians_and_is_validated_field_by_field() {
        let c = Config::parse(&format!("{GOOD}[kea]\nrun_by = \"service\"\n"), &host()).unwrap();
        let service = c.kea_service.unwrap();
        assert_eq!(service.config, PathBuf::from("/etc/kea/kea-dhcp4.conf"));
        assert_eq!(
            service.control_socket,
            PathBuf::from("/run/kea/kea4-ctrl-socket")
        );
        assert_eq!(
            service.reload,
            ["systemctl", "reload-or-restart", "kea-dhcp4-server"]
        );
        let own = Config::parse(&format!("{GOOD}[kea]\nrun_by = \"carp\"\n"), &host()).unwrap();
        assert_eq!(own.kea_service, None);
        assert_eq!(Config::parse(GOOD, &host()).unwrap().kea_service, None);
        let got = problems(&format!(
            "{GOOD}[kea]\nrun_by = \"service\"\nconfig = \"kea.conf\"\nreload = []\n"
        ));
        assert_eq!(
            got,
            [
                "kea.config: `kea.conf` is not an absolute path",
                "kea.reload: names no command"
            ]
        );
        let got = problems(&format!(
            "{GOOD}[kea]\nrun_by = \"carp\"\nlease_file = \"/var/lib/kea/l.csv\"\n"
        ));
        assert!(
            got[0].starts_with("kea.lease_file: only with run_by"),
            "{got:?}"
        );
        let got = problems(&format!("{GOOD}[kea]\nrun_by = \"systemd\"\n"));
        assert_eq!(
            got,
            ["kea.run_by: `systemd` is neither \"carp\" nor \"service\""]
        );
    }

    #[test]
    fn dhcp_needs_an_ipv4_sync_link() {
        let dir = std::env::temp_dir().join(format!("carp-dhcp-sync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "a shared secret of some length\n").unwrap();
        let section = |peer: &str| {
            format!(
                "interface = \"sync\"\nlisten = \"198.18.3.1:8370\"\npeer = \"{peer}\"\nkey_file = \"{}\"\n\
                 [[dhcp]]\ninterface = \"lan\"\npool = \"198.18.1.150-198.18.1.199\"\n",
                key.display()
            )
        };
        let c = sync_problems(&section("198.18.3.2:8370")).unwrap();
        assert_eq!(c.dhcp.len(), 1);
        let got = sync_problems(&section("[fd00::2]:8370")).unwrap_err();
        assert_eq!(
            got,
            [
                "dhcp: needs IPv4 addresses on the sync link ([sync] listen and peer): Kea's pair talks there"
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_files_area_and_reload_after_are_validated_field_by_field() {
        let dir = std::env::temp_dir().join(format!("carp-files-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "a shared secret of some length\n").unwrap();
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "198.18.1.5 printer\n").unwrap();
        std::fs::write(dir.join("binary"), [0xff, 0xfe, 0]).unwrap();
        let sync = format!(
            "interface = \"sync\"\nlisten = \"198.18.3.1:8370\"\npeer = \"198.18.3.2:8370\"\nkey_file = \"{}\"\n[config_sync]\n",
            key.display()
        );
        let good = format!(
            "{sync}push = [\"carp\", \"files\"]\nfiles = [{{ path = \"{}\", mode = \"0600\" }}, {{ path = \"{}/other\" }}]\n",
            hosts.display(),
            dir.display()
        );
        std::fs::write(dir.join("other"), "x\n").unwrap();
        let c = sync_problems(&good).unwrap();
        assert_eq!(c.config_sync.files[0].mode, 0o600);
        assert_eq!(c.config_sync.files[1].mode, 0o644, "the default");
        let bad = format!(
            "{sync}push = [\"files\"]\nfiles = [{{ path = \"etc/hosts\" }}, {{ path = \"{h}\", mode = \"rw\" }}, {{ path = \"{d}/missing\" }}, {{ path = \"{d}/binary\" }}, {{ path = \"{h}\" }}, {{ path = \"{h}\" }}]\nreload_after = {{ \"{h}\" = [\"true\"] }}\n",
            h = hosts.display(),
            d = dir.display()
        );
        let got = sync_problems(&bad).unwrap_err();
        let fields: Vec<&str> = got.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "config_sync.files[0].path",
                "config_sync.files[1].mode",
                "config_sync.files[2].path",
                "config_sync.files[3].path",
                "config_sync.files[5].path",
                &format!("config_sync.reload_after.\"{}\"", hosts.display()),
            ],
            "{got:?}"
        );
        assert!(
            got[3].contains("not UTF-8") && got[4].contains("twice"),
            "{got:?}"
        );
        assert!(got[5].contains("needs `files` in accept"), "{got:?}");
        let secondary = format!(
            "{sync}accept = [\"files\"]\nreload_after = {{ \"{}\" = [], \"relative\" = [\"true\"] }}\n",
            hosts.display()
        );
        let got = sync_problems(&secondary).unwrap_err();
        assert!(got[0].contains("empty command"), "{got:?}");
        assert!(got[1].contains("absolute"), "{got:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sync_section_is_validated_field_by_field() {
        let dir = std::env::temp_dir().join(format!("carp-sync-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good_key = dir.join("good");
        std::fs::write(&good_key, "a shared secret of some length\n").unwrap();
        let short_key = dir.join("short");
        std::fs::write(&short_key, "short\n").unwrap();
        let good = format!(
            "interface = \"sync\"\nlisten = \"198.18.3.1:8370\"\npeer = \"198.18.3.2:8370\"\nkey_file = \"{}\"\n",
            good_key.display()
        );
        let c = sync_problems(&good).unwrap();
        let sync = c.sync.expect("sync configured");
        assert_eq!(sync.flows_max, DEFAULT_FLOWS_MAX);
        assert_eq!(sync.peer.to_string(), "198.18.3.2:8370");

        let bad = good
            .replace("\"sync\"", "\"nope\"")
            .replace("198.18.3.2:8370", "198.18.3.2")
            .replace(
                &good_key.display().to_string(),
                &short_key.display().to_string(),
            )
            + "flows_max = 0\n";
        let got = sync_problems(&bad).unwrap_err();
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got[0].starts_with("sync.peer: `198.18.3.2` is not an address:port"));
        assert!(got[1].starts_with("sync.interface: no interface `nope`"));
        assert!(got[2].starts_with("sync.key_file:") && got[2].contains("5 bytes, at least 16"));
        assert!(got[3].starts_with("sync.flows_max: 0 is outside"));

        let foreign = good.replace("198.18.3.1:8370", "198.18.9.1:8370");
        assert_eq!(
            sync_problems(&foreign).unwrap_err(),
            ["sync.listen: 198.18.9.1 is not an address of `sync`"]
        );
        let missing = good.replace(&good_key.display().to_string(), "/nonexistent/key");
        assert!(sync_problems(&missing).unwrap_err()[0].starts_with("sync.key_file: cannot read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
