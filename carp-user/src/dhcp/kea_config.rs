//! The Kea DHCPv4 configuration carp generates from `[[dhcp]]`: the scopes, the lease file,
//! control socket and log in carp's own directory (or where the Kea service keeps them), and
//! the HA hook in hot-standby with its peers on the sync link. Pure: the same input gives the same JSON on both nodes but for
//! `this-server-name`.

use super::scope::DhcpScope;
use crate::config::KeaService;
use serde_json::{Value, json};
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// This node's part in Kea's hot-standby pair: the CARP primary's Kea serves, the other
/// receives every lease and takes over when the primary stops answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaRole {
    Primary,
    Standby,
}

impl HaRole {
    /// Also the server's name in Kea: both configurations name the pair alike.
    pub fn name(self) -> &'static str {
        match self {
            HaRole::Primary => "primary",
            HaRole::Standby => "standby",
        }
    }

    fn other(self) -> Self {
        match self {
            HaRole::Primary => HaRole::Standby,
            HaRole::Standby => HaRole::Primary,
        }
    }
}

/// What a node's Kea configuration is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeaSetup {
    pub scopes: Vec<DhcpScope>,
    pub role: HaRole,
    /// This node's and the peer's address on the sync link, where the HA hook listens.
    pub this: Ipv4Addr,
    pub peer: Ipv4Addr,
    pub port: u16,
    /// Kea's files: lease file, control socket, log.
    pub dir: PathBuf,
    pub hooks_dir: PathBuf,
    /// How long the peer may stay silent before it counts as down: CARP's own master-down
    /// interval, so Kea serves about when CARP moves the VIPs.
    pub failure_ms: u32,
    /// Kea run by a service manager, with its files where the service has them.
    pub service: Option<KeaService>,
}

impl KeaSetup {
    pub fn config_file(&self) -> PathBuf {
        match &self.service {
            Some(service) => service.config.clone(),
            None => config_file(&self.dir),
        }
    }

    pub fn control_socket(&self) -> PathBuf {
        match &self.service {
            Some(service) => service.control_socket.clone(),
            None => control_socket(&self.dir),
        }
    }

    fn lease_file(&self) -> PathBuf {
        match &self.service {
            Some(service) => service.lease_file.clone(),
            None => lease_file(&self.dir),
        }
    }
}

/// Kea's heartbeat to its partner: often enough that a silence of `failure_ms` is noticed.
const HEARTBEAT_MS: u32 = 1000;

fn config_file(dir: &Path) -> PathBuf {
    dir.join("kea-dhcp4.json")
}

fn control_socket(dir: &Path) -> PathBuf {
    dir.join("kea4.sock")
}

fn lease_file(dir: &Path) -> PathBuf {
    dir.join("leases4.csv")
}

pub fn log_file(dir: &Path) -> PathBuf {
    dir.join("kea-dhcp4.log")
}

/// Kea's subnet id for a scope: its network address, so it stays the same whatever the
/// order of the scopes (leases are stored by subnet id).
pub fn subnet_id(scope: &DhcpScope) -> u32 {
    u32::from(scope.subnet.addr)
}

/// Where Debian and source builds put Kea's hook libraries.
pub const HOOK_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/kea/hooks",
    "/usr/lib/aarch64-linux-gnu/kea/hooks",
    "/usr/lib/kea/hooks",
    "/usr/local/lib/kea/hooks",
];

/// The first directory that holds the HA hook, if Kea is installed.
pub fn find_hooks_dir() -> Option<PathBuf> {
    HOOK_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|dir| dir.join("libdhcp_ha.so").exists())
}

/// The whole `Dhcp4` configuration.
pub fn generate(setup: &KeaSetup) -> Value {
    let url = |ip: Ipv4Addr| format!("http://{ip}:{}/", setup.port);
    let (this_url, peer_url) = (url(setup.this), url(setup.peer));
    let (primary_url, standby_url) = match setup.role {
        HaRole::Primary => (this_url, peer_url),
        HaRole::Standby => (peer_url, this_url),
    };
    let interfaces: Vec<&str> = setup.scopes.iter().map(|s| s.interface.as_str()).collect();
    let subnets: Vec<Value> = setup.scopes.iter().map(subnet).collect();
    let hook = |name: &str| setup.hooks_dir.join(name).display().to_string();
    json!({
        "Dhcp4": {
            "interfaces-config": { "interfaces": interfaces },
            "control-socket": {
                "socket-type": "unix",
                "socket-name": setup.control_socket(),
            },
            "lease-database": {
                "type": "memfile",
                "persist": true,
                "name": setup.lease_file(),
                "lfc-interval": 3600,
            },
            // The HA hook's own listener needs Kea's multi-threading; no control agent then.
            "multi-threading": {
                "enable-multi-threading": true,
                "thread-pool-size": 2,
                "packet-queue-size": 64,
            },
            "hooks-libraries": [
                { "library": hook("libdhcp_lease_cmds.so") },
                {
                    "library": hook("libdhcp_ha.so"),
                    "parameters": { "high-availability": [{
                        "this-server-name": setup.role.name(),
                        "mode": "hot-standby",
                        "heartbeat-delay": HEARTBEAT_MS,
                        "max-response-delay": setup.failure_ms.max(2 * HEARTBEAT_MS),
                        // No wait for clients' retries once the heartbeat is lost: the
                        // sync link is the pair's own, and CARP has judged the peer by then.
                        "max-ack-delay": 1000,
                        "max-unacked-clients": 0,
                        "sync-timeout": 30000,
                        "multi-threading": {
                            "enable-multi-threading": true,
                            "http-dedicated-listener": true,
                            "http-listener-threads": 1,
                            "http-client-threads": 1,
                        },
                        "peers": [
                            { "name": HaRole::Primary.name(), "url": primary_url,
                              "role": "primary", "auto-failover": true },
                            { "name": HaRole::Standby.name(), "url": standby_url,
                              "role": "standby", "auto-failover": true },
                        ],
                    }]},
                },
            ],
            "subnet4": subnets,
            "loggers": [{
                "name": "kea-dhcp4",
                "output_options": [match setup.service {
                    // A service's output goes to its journal.
                    Some(_) => json!({ "output": "stdout" }),
                    None => json!({
                        "output": log_file(&setup.dir),
                        "maxsize": 10_485_760,
                        "maxver": 2,
                    }),
                }],
                "severity": "INFO",
            }],
        }
    })
}

fn subnet(scope: &DhcpScope) -> Value {
    let dns: Vec<String> = scope.dns.iter().map(ToString::to_string).collect();
    let pools: Vec<Value> = scope
        .pools
        .iter()
        .map(|(lo, hi)| json!({ "pool": format!("{lo} - {hi}") }))
        .collect();
    let reservations: Vec<Value> = scope
        .reservations
        .iter()
        .map(|r| {
            json!({
                "hw-address": crate::daemon::format_mac(&r.mac),
                "ip-address": r.address.to_string(),
            })
        })
        .collect();
    let mut options = vec![json!({ "name": "routers", "data": scope.router.to_string() })];
    if !dns.is_empty() {
        options.push(json!({ "name": "domain-name-servers", "data": dns.join(", ") }));
    }
    json!({
        "id": subnet_id(scope),
        "subnet": scope.subnet.to_string(),
        "interface": scope.interface,
        "pools": pools,
        "option-data": options,
        "reservations": reservations,
        "valid-lifetime": scope.lease_seconds,
    })
}

/// The other node's role, for what a secondary receives (config sync rewrites it per node).
pub fn peer_role(role: HaRole) -> HaRole {
    role.other()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dhcp::scope::Reservation;

    pub(crate) fn setup(role: HaRole) -> KeaSetup {
        KeaSetup {
            // Kea checks that the interface exists: the loopback is on every host.
            scopes: vec![DhcpScope {
                interface: "lo".into(),
                subnet: "198.18.1.0/24".parse().unwrap(),
                pools: vec![(
                    Ipv4Addr::new(198, 18, 1, 150),
                    Ipv4Addr::new(198, 18, 1, 199),
                )],
                router: Ipv4Addr::new(198, 18, 1, 1),
                dns: vec![Ipv4Addr::new(198, 18, 1, 1)],
                lease_seconds: 600,
                reservations: vec![Reservation {
                    mac: [0x52, 0x54, 0, 0, 0, 1],
                    address: Ipv4Addr::new(198, 18, 1, 160),
                }],
            }],
            role,
            this: Ipv4Addr::new(198, 18, 3, 1),
            peer: Ipv4Addr::new(198, 18, 3, 2),
            port: 8371,
            dir: std::env::temp_dir().join(format!("carp-kea-{}", std::process::id())),
            hooks_dir: find_hooks_dir().unwrap_or_else(|| HOOK_DIRS[0].into()),
            failure_ms: 3000,
            service: None,
        }
    }

    /// The Kea service's files where the service keeps them (here, beside the test's).
    fn as_service(mut setup: KeaSetup) -> KeaSetup {
        setup.service = Some(KeaService {
            config: setup.dir.join("service.conf"),
            control_socket: setup.dir.join("service.sock"),
            lease_file: setup.dir.join("service-leases.csv"),
            reload: vec!["true".into()],
        });
        setup
    }

    #[test]
    fn both_nodes_name_the_pair_alike_and_only_this_server_differs() {
        let primary = generate(&setup(HaRole::Primary));
        let mut standby_setup = setup(HaRole::Standby);
        (standby_setup.this, standby_setup.peer) = (standby_setup.peer, standby_setup.this);
        let standby = generate(&standby_setup);
        let ha = |v: &Value| {
            v["Dhcp4"]["hooks-libraries"][1]["parameters"]["high-availability"][0].clone()
        };
        let (mut a, mut b) = (ha(&primary), ha(&standby));
        assert_eq!(a["this-server-name"], "primary");
        assert_eq!(b["this-server-name"], "standby");
        assert_eq!(a["peers"][0]["url"], "http://198.18.3.1:8371/");
        assert_eq!(a["peers"][1]["url"], "http://198.18.3.2:8371/");
        a["this-server-name"] = Value::Null;
        b["this-server-name"] = Value::Null;
        assert_eq!(a, b, "the same pair on both nodes");
        assert_eq!(a["max-response-delay"], 3000);
        let subnet = &primary["Dhcp4"]["subnet4"][0];
        assert_eq!(subnet["id"], u32::from(Ipv4Addr::new(198, 18, 1, 0)));
        assert_eq!(subnet["pools"][0]["pool"], "198.18.1.150 - 198.18.1.199");
        assert_eq!(subnet["option-data"][0]["data"], "198.18.1.1");
        assert_eq!(subnet["reservations"][0]["hw-address"], "52:54:00:00:00:01");
    }

    #[test]
    fn a_kea_service_keeps_its_own_files_and_logs_to_its_journal() {
        let setup = as_service(setup(HaRole::Primary));
        let dhcp4 = &generate(&setup)["Dhcp4"];
        assert_eq!(
            dhcp4["control-socket"]["socket-name"],
            setup.dir.join("service.sock").display().to_string()
        );
        assert_eq!(
            dhcp4["lease-database"]["name"],
            setup.dir.join("service-leases.csv").display().to_string()
        );
        assert_eq!(dhcp4["loggers"][0]["output_options"][0]["output"], "stdout");
        assert_eq!(setup.config_file(), setup.dir.join("service.conf"));
    }

    /// Kea itself accepts what carp generates (`kea-dhcp4 -t`); needs Kea installed, which
    /// `cargo xtask setup` does.
    #[test]
    fn kea_accepts_the_generated_configuration() {
        let setups = [HaRole::Primary, HaRole::Standby]
            .into_iter()
            .flat_map(|role| [setup(role), as_service(setup(role))]);
        for setup in setups {
            let role = (setup.role, setup.service.is_some());
            std::fs::create_dir_all(&setup.dir).unwrap();
            let file = setup.config_file();
            std::fs::write(&file, generate(&setup).to_string()).unwrap();
            let checked = super::super::kea::check(&file, &setup.dir);
            assert_eq!(checked, Ok(()), "{role:?}");
            // And refuses a broken one, with its own words: the check can fail.
            let mut broken = generate(&setup);
            broken["Dhcp4"]["subnet4"][0]["pools"][0]["pool"] = "198.18.9.1 - 198.18.9.9".into();
            std::fs::write(&file, broken.to_string()).unwrap();
            let refused = super::super::kea::check(&file, &setup.dir).unwrap_err();
            assert!(refused.contains("198.18.9.1"), "{refused}");
            std::fs::remove_dir_all(&setup.dir).unwrap();
        }
    }
}
