//! What `carp reload` changes: the running configuration against the file's, as a plan the
//! daemon carries out. Pure, so every rule is unit-tested: VIPs are known by interface and
//! vhid; one whose address or MAC changes is released and taken anew; one whose timing or
//! preemption changes is retuned in place; everything else is left alone.

use crate::{
    carp::fsm::Params,
    config::{Config, Problem, Vip},
};

/// The changes a reload makes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Indexes into the running configuration's VIPs: released and forgotten.
    pub removed: Vec<usize>,
    /// Indexes into the new configuration's VIPs: set up as at start.
    pub added: Vec<usize>,
    /// Kept VIPs whose parameters change: (index in the running configuration, new ones).
    pub retuned: Vec<(usize, Params)>,
    /// Kept VIPs nothing touches.
    pub unchanged: usize,
    /// `[sync]` or `[config_sync]` changed: applied by re-executing in place (the session
    /// starts anew).
    pub sync_changed: bool,
    /// The `[[nat]]` rules changed: carp's NAT table is replaced.
    pub nat_changed: bool,
}

impl Plan {
    /// Whether the reload changes anything at all.
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty()
            && self.added.is_empty()
            && self.retuned.is_empty()
            && !self.sync_changed
            && !self.nat_changed
    }
}

/// What it takes to go from `running` to `new`; the problems if `new` cannot be applied
/// while the daemon runs.
pub fn plan(running: &Config, new: &Config) -> Result<Plan, Vec<Problem>> {
    let mut problems = Vec::new();
    let node = [
        ("name", running.node.name != new.node.name),
        (
            "control_socket",
            running.node.control_socket != new.node.control_socket,
        ),
        ("state_dir", running.node.state_dir != new.node.state_dir),
        ("xdp_mode", running.node.xdp_mode != new.node.xdp_mode),
    ];
    for (field, changed) in node {
        if changed {
            problems.push(Problem {
                field: format!("node.{field}"),
                message: "cannot change while carp runs: restart it to apply".into(),
            });
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut plan = Plan {
        // The session is set up for its part in configuration sync too.
        sync_changed: running.sync != new.sync || running.config_sync != new.config_sync,
        nat_changed: running.nat != new.nat,
        ..Plan::default()
    };
    // A different MAC mode changes the MAC every VIP answers with.
    let mac_changed = running.carp.mac != new.carp.mac;
    for (i, vip) in running.vips.iter().enumerate() {
        match new.vips.iter().position(|n| same_vip(n, vip)) {
            Some(j) if mac_changed || new.vips[j].address != vip.address => {
                plan.removed.push(i);
                plan.added.push(j);
            }
            Some(j) => {
                let params = params(new, &new.vips[j]);
                if params == self::params(running, vip) {
                    plan.unchanged += 1;
                } else {
                    plan.retuned.push((i, params));
                }
            }
            None => plan.removed.push(i),
        }
    }
    for (j, vip) in new.vips.iter().enumerate() {
        if !running.vips.iter().any(|r| same_vip(r, vip)) {
            plan.added.push(j);
        }
    }
    plan.added.sort_unstable();
    Ok(plan)
}

/// A VIP is known by its interface and vhid.
fn same_vip(a: &Vip, b: &Vip) -> bool {
    a.interface == b.interface && a.vhid == b.vhid
}

/// The state machine's parameters for `vip` under `config`.
pub fn params(config: &Config, vip: &Vip) -> Params {
    Params {
        advbase: config.carp.advbase,
        advskew: vip.advskew,
        preempt: config.carp.preempt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interfaces::{Interface, Ipv4Net};

    fn host() -> Vec<Interface> {
        let iface = |name: &str, index: u32, addr: [u8; 4]| Interface {
            name: name.into(),
            index,
            mac: [2, 0, 0, 0, 0, index as u8],
            link_up: true,
            addrs: vec![Ipv4Net {
                addr: addr.into(),
                prefix_len: 24,
            }],
        };
        vec![
            iface("lan", 2, [198, 18, 1, 2]),
            iface("wan", 3, [198, 18, 2, 2]),
        ]
    }

    const BASE: &str = r#"
[node]
name = "gw1"
[carp]
passphrase = "secret"
[[vip]]
interface = "lan"
vhid = 1
address = "198.18.1.1/24"
[[vip]]
interface = "wan"
vhid = 2
address = "198.18.2.1/24"
"#;

    fn config(text: &str) -> Config {
        Config::parse(text, &host()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let c = config(BASE);
        let plan = plan(&c, &c).unwrap();
        assert!(plan.is_empty());
        assert_eq!(plan.unchanged, 2);
    }

    #[test]
    fn a_new_vip_is_added_and_the_others_left_alone() {
        let new = format!(
            "{BASE}\n[[vip]]\ninterface = \"lan\"\nvhid = 3\naddress = \"198.18.1.5/24\"\n"
        );
        let plan = plan(&config(BASE), &config(&new)).unwrap();
        assert_eq!(plan.added, [2]);
        assert!(plan.removed.is_empty() && plan.retuned.is_empty());
        assert_eq!(plan.unchanged, 2);
    }

    #[test]
    fn a_vip_gone_from_the_file_is_removed() {
        let new = BASE.replace(
            "[[vip]]\ninterface = \"wan\"\nvhid = 2\naddress = \"198.18.2.1/24\"\n",
            "",
        );
        let plan = plan(&config(BASE), &config(&new)).unwrap();
        assert_eq!(plan.removed, [1]);
        assert!(plan.added.is_empty());
        assert_eq!(plan.unchanged, 1);
    }

    #[test]
    fn a_new_skew_retunes_in_place_and_a_new_address_replaces() {
        let new = BASE
            .replace(
                "passphrase = \"secret\"",
                "passphrase = \"secret\"\nadvskew = 100",
            )
            .replace("198.18.2.1/24", "198.18.2.9/24");
        let plan = plan(&config(BASE), &config(&new)).unwrap();
        assert_eq!(
            plan.retuned,
            [(
                0,
                Params {
                    advbase: 1,
                    advskew: 100,
                    preempt: true
                }
            )]
        );
        assert_eq!(
            (plan.removed.clone(), plan.added.clone()),
            (vec![1], vec![1])
        );
    }

    #[test]
    fn a_new_mac_mode_replaces_every_vip() {
        let new = BASE.replace(
            "passphrase = \"secret\"",
            "passphrase = \"secret\"\nmac = \"interface\"",
        );
        let plan = plan(&config(BASE), &config(&new)).unwrap();
        assert_eq!(plan.removed, [0, 1]);
        assert_eq!(plan.added, [0, 1]);
    }

    #[test]
    fn new_nat_rules_replace_the_table_and_move_no_vip() {
        let new = format!(
            "{BASE}\n[[nat]]\ninterface = \"wan\"\nsource = \"198.18.1.0/24\"\nto = \"198.18.2.1\"\n"
        );
        let plan = plan(&config(BASE), &config(&new)).unwrap();
        assert!(plan.nat_changed);
        assert_eq!(plan.unchanged, 2);
        assert!(plan.added.is_empty() && plan.removed.is_empty());
    }

    #[test]
    fn a_new_passphrase_alone_moves_no_vip() {
        let new = BASE.replace("\"secret\"", "\"other secret\"");
        let plan = plan(&config(BASE), &config(&new)).unwrap();
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn a_new_sync_section_asks_for_a_reexec_and_moves_no_vip() {
        let dir = std::env::temp_dir().join(format!("carp-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("sync.key");
        std::fs::write(&key, "a sync secret of enough bytes\n").unwrap();
        let mut host = host();
        host.push(Interface {
            name: "sync".into(),
            index: 4,
            mac: [2, 0, 0, 0, 0, 4],
            link_up: true,
            addrs: vec![Ipv4Net {
                addr: [198, 18, 3, 1].into(),
                prefix_len: 24,
            }],
        });
        let with_sync = |flows_max: u32| {
            let text = format!(
                "{BASE}\n[sync]\ninterface = \"sync\"\nlisten = \"198.18.3.1:8370\"\n\
                 peer = \"198.18.3.2:8370\"\nkey_file = \"{}\"\nflows_max = {flows_max}\n",
                key.display()
            );
            Config::parse(&text, &host).unwrap_or_else(|e| panic!("{e}"))
        };
        let same = plan(&with_sync(1000), &with_sync(1000)).unwrap();
        assert!(same.is_empty());
        let changed = plan(&with_sync(1000), &with_sync(2000)).unwrap();
        assert!(changed.sync_changed);
        assert_eq!(changed.unchanged, 2);
        assert!(
            plan(&config(BASE), &with_sync(1000)).unwrap().sync_changed,
            "added"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn node_settings_are_refused_naming_the_field() {
        let new = BASE.replace("name = \"gw1\"", "name = \"gw1\"\nxdp_mode = \"generic\"");
        let problems = plan(&config(BASE), &config(&new)).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "node.xdp_mode");
        // The name moves the default socket and state directory with it.
        let new = BASE.replace("name = \"gw1\"", "name = \"gw9\"");
        let fields: Vec<String> = plan(&config(BASE), &config(&new))
            .unwrap_err()
            .into_iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(
            fields,
            ["node.name", "node.control_socket", "node.state_dir"]
        );
    }
}
