//! Configuration sync, one direction (pfSense's XMLRPC sync): the primary sends the areas it
//! pushes as TOML over the sync link; the secondary takes the areas it accepts, every advskew
//! raised by 100, in place of its own, and keeps them in its state directory so it restarts
//! with them even while the primary is down. Pure: what is sent, how the secondary rewrites
//! it, and what configuration results.

use crate::config::SyncedFile;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// The configuration schema both sides must speak; a peer on another refuses.
pub const SCHEMA: u32 = 1;
/// What a secondary adds to every advskew it receives (pfSense's rule), and the cap.
pub const SECONDARY_SKEW: i64 = 100;
pub const MAX_SKEW: i64 = 254;

/// A part of the configuration that can be synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Area {
    /// `[carp]` and every `[[vip]]`.
    Carp,
    /// The `[[nat]]` rules.
    Nat,
    /// nftables ruleset files, loaded on the secondary as one transaction.
    Nftables,
    /// Declared files, written on the secondary atomically with their mode.
    Files,
    /// The `[[dhcp]]` scopes; each node's role in Kea's pair follows from its own skew.
    Dhcp,
}

impl Area {
    /// The TOML keys the area owns in the configuration (the nftables and files areas own
    /// none: their files travel beside it).
    fn keys(self) -> &'static [&'static str] {
        match self {
            Area::Carp => &["carp", "vip"],
            Area::Nat => &["nat"],
            Area::Dhcp => &["dhcp"],
            Area::Nftables | Area::Files => &[],
        }
    }

    /// The area named `name`.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "carp" => Ok(Area::Carp),
            "nat" => Ok(Area::Nat),
            "nftables" => Ok(Area::Nftables),
            "files" => Ok(Area::Files),
            "dhcp" => Ok(Area::Dhcp),
            other => Err(format!(
                "unknown area `{other}` (carp, nat, nftables, files, dhcp)"
            )),
        }
    }
}

/// Where a secondary keeps what it received: the areas now applied, and the ones before.
pub fn applied_file(state_dir: &Path) -> PathBuf {
    state_dir.join("config-sync").join("areas.toml")
}

pub fn previous_file(state_dir: &Path) -> PathBuf {
    state_dir.join("config-sync").join("areas.prev.toml")
}

/// The content hash `carp status` shows for each side.
pub fn hash(areas: &str) -> String {
    let digest = Sha256::digest(areas.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys under which the nftables and files areas' files travel:
/// `[[nftables]] path, content` and `[[files]] path, mode, content`.
const NFTABLES_KEY: &str = "nftables";
const FILES_KEY: &str = "files";

/// A file that travels with a push: a ruleset file (no mode), or one of the files area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentFile {
    pub path: PathBuf,
    pub mode: Option<u32>,
    pub content: String,
}

/// What the primary sends: the `areas` of its own configuration text, with a passphrase file
/// read in (its path means nothing on the peer), the nftables area's rulesets and the files
/// area's files with their content. The text parsed already as a configuration.
pub fn payload(
    own: &str,
    areas: &[Area],
    nftables: &[PathBuf],
    files: &[SyncedFile],
) -> Result<String, String> {
    let table: Table = own.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut out = Table::new();
    let travelling = |path: &Path, mode: Option<u32>| -> Result<Value, String> {
        let content = match crate::synced_files::read_regular(path) {
            Ok(Some((content, _))) => content,
            Ok(None) => return Err(format!("reading {}: not found", path.display())),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let mut file = Table::new();
        file.insert("path".into(), Value::String(path.display().to_string()));
        if let Some(mode) = mode {
            file.insert("mode".into(), Value::String(format!("{mode:04o}")));
        }
        file.insert("content".into(), Value::String(content));
        Ok(Value::Table(file))
    };
    if areas.contains(&Area::Nftables) {
        let sent = nftables
            .iter()
            .map(|path| travelling(path, None))
            .collect::<Result<_, _>>()?;
        out.insert(NFTABLES_KEY.into(), Value::Array(sent));
    }
    if areas.contains(&Area::Files) {
        let sent = files
            .iter()
            .map(|file| travelling(&file.path, Some(file.mode)))
            .collect::<Result<_, _>>()?;
        out.insert(FILES_KEY.into(), Value::Array(sent));
    }
    for area in areas {
        for key in area.keys() {
            if let Some(value) = table.get(*key) {
                out.insert((*key).to_owned(), value.clone());
            }
        }
    }
    if let Some(Value::Table(carp)) = out.get_mut("carp")
        && let Some(Value::String(file)) = carp.remove("passphrase_file")
    {
        let secret = std::fs::read(&file).map_err(|e| format!("reading {file}: {e}"))?;
        let secret = String::from_utf8_lossy(&secret)
            .trim_end_matches(['\n', '\r'])
            .to_owned();
        carp.insert("passphrase".into(), Value::String(secret));
    }
    toml::to_string(&out).map_err(|e| e.to_string())
}

/// The secondary's rewrite of what it received: every advskew, the node's and each VIP's
/// override, raised by [`SECONDARY_SKEW`] and capped at [`MAX_SKEW`].
pub fn rewrite_for_secondary(areas: &mut Table) {
    let raise = |value: Option<&Value>| {
        let skew = value.and_then(Value::as_integer).unwrap_or(0);
        Value::Integer((skew + SECONDARY_SKEW).min(MAX_SKEW))
    };
    if let Some(Value::Table(carp)) = areas.get_mut("carp") {
        let raised = raise(carp.get("advskew"));
        carp.insert("advskew".into(), raised);
    }
    if let Some(Value::Array(vips)) = areas.get_mut("vip") {
        for vip in vips.iter_mut().filter_map(Value::as_table_mut) {
            if vip.contains_key("advskew") {
                let raised = raise(vip.get("advskew"));
                vip.insert("advskew".into(), raised);
            }
        }
    }
}

/// The secondary's configuration: its own text with every accepted area replaced by what
/// was received (already rewritten). Its `[node]`, `[sync]` and `[config_sync]` are its own.
pub fn compose(own: &str, received: &str, accept: &[Area]) -> Result<String, String> {
    let mut table: Table = own.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let received: Table = received
        .parse()
        .map_err(|e: toml::de::Error| format!("the received areas: {e}"))?;
    for area in accept {
        for key in area.keys() {
            table.remove(*key);
            if let Some(value) = received.get(*key) {
                table.insert((*key).to_owned(), value.clone());
            }
        }
    }
    toml::to_string(&table).map_err(|e| e.to_string())
}

/// The nftables files in what was received, as (path, content), in order.
pub fn nftables_files(received: &str) -> Result<Vec<(PathBuf, String)>, String> {
    let files = sent_files(&parse_received(received)?, NFTABLES_KEY)?;
    Ok(files.into_iter().map(|f| (f.path, f.content)).collect())
}

/// The files area's files in what was received, in order: absolute paths, each with a mode.
pub fn synced_files(received: &str) -> Result<Vec<SentFile>, String> {
    let files = sent_files(&parse_received(received)?, FILES_KEY)?;
    for file in &files {
        if !file.path.is_absolute() || file.mode.is_none() {
            return Err(format!(
                "files: `{}` needs an absolute path and a mode",
                file.path.display()
            ));
        }
    }
    Ok(files)
}

fn parse_received(received: &str) -> Result<Table, String> {
    received
        .parse()
        .map_err(|e: toml::de::Error| format!("the received areas: {e}"))
}

/// The files travelling under `key` in areas parsed already.
fn sent_files(table: &Table, key: &str) -> Result<Vec<SentFile>, String> {
    let Some(files) = table.get(key) else {
        return Ok(Vec::new());
    };
    files
        .as_array()
        .ok_or(format!("{key}: not a list"))?
        .iter()
        .map(|file| {
            let path = file.get("path").and_then(Value::as_str);
            let content = file.get("content").and_then(Value::as_str);
            let mode = match file.get("mode").map(Value::as_str) {
                None => None,
                Some(Some(mode)) => Some(
                    u32::from_str_radix(mode, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or(format!("{key}: `{mode}` is not an octal mode"))?,
                ),
                Some(None) => return Err(format!("{key}: a mode that is not a string")),
            };
            match (path, content) {
                (Some(path), Some(content)) => Ok(SentFile {
                    path: PathBuf::from(path),
                    mode,
                    content: content.to_owned(),
                }),
                _ => Err(format!("{key}: a file without path or content")),
            }
        })
        .collect()
}

/// A push's flags on the wire.
pub const DRY_RUN: u8 = 1;
pub const FORCE: u8 = 2;

/// Where a secondary seals what it wrote, to tell a hand edit from it (drift).
pub fn sealed_file(state_dir: &Path) -> PathBuf {
    state_dir.join("config-sync").join("areas.sealed")
}

/// Where a secondary seals the NAT table as it loaded it.
pub fn sealed_nat_file(state_dir: &Path) -> PathBuf {
    state_dir.join("config-sync").join("nat.sealed")
}

/// A unified diff per area from `old` to `new` (both areas as received), empty when they
/// hold the same: carp ([carp] and the VIPs), nat, and each nftables file.
pub fn diff(old: &str, new: &str, old_label: &str, new_label: &str) -> String {
    let parse = |text: &str| text.parse::<Table>().unwrap_or_default();
    let (old, new) = (parse(old), parse(new));
    let mut out = String::new();
    for (area, keys) in [
        ("carp", &["carp", "vip"][..]),
        ("nat", &["nat"][..]),
        ("dhcp", &["dhcp"][..]),
    ] {
        let part = |table: &Table| {
            let mut sub = Table::new();
            for key in keys {
                if let Some(value) = table.get(*key) {
                    sub.insert((*key).to_owned(), value.clone());
                }
            }
            toml::to_string(&sub).unwrap_or_default()
        };
        out.push_str(&unified(
            &part(&old),
            &part(&new),
            &format!("{area} ({old_label})"),
            &format!("{area} ({new_label})"),
        ));
    }
    for key in [NFTABLES_KEY, FILES_KEY] {
        let (old_files, new_files) = (
            sent_files(&old, key).unwrap_or_default(),
            sent_files(&new, key).unwrap_or_default(),
        );
        let mut paths: Vec<&PathBuf> = old_files
            .iter()
            .chain(&new_files)
            .map(|f| &f.path)
            .collect();
        paths.sort();
        paths.dedup();
        for path in paths {
            let find = |files: &[SentFile]| files.iter().find(|f| &f.path == path).cloned();
            let (old_file, new_file) = (find(&old_files), find(&new_files));
            out.push_str(&file_diff(
                path,
                old_file.as_ref().map(|f| (f.content.as_str(), f.mode)),
                new_file.as_ref().map(|f| (f.content.as_str(), f.mode)),
                old_label,
                new_label,
            ));
        }
    }
    out
}

/// A file's unified diff, and a line for a changed mode; `None`: the file is not there.
fn file_diff(
    path: &Path,
    old: Option<(&str, Option<u32>)>,
    new: Option<(&str, Option<u32>)>,
    old_label: &str,
    new_label: &str,
) -> String {
    let path = path.display();
    let (old_content, old_mode) = old.unwrap_or_default();
    let (new_content, new_mode) = new.unwrap_or_default();
    let mut out = unified(
        old_content,
        new_content,
        &format!("{path} ({old_label})"),
        &format!("{path} ({new_label})"),
    );
    if let (Some(old_mode), Some(new_mode)) = (old_mode, new_mode)
        && old_mode != new_mode
    {
        out.push_str(&format!(
            "{path}: mode {old_mode:04o} ({old_label}), {new_mode:04o} ({new_label})\n"
        ));
    }
    out
}

/// A file's content and permission bits on this host; `None` if it cannot be read.
fn on_disk(path: &Path) -> Option<(String, u32)> {
    crate::synced_files::read_regular(path).ok().flatten()
}

/// A unified diff, or nothing when the texts agree.
pub fn unified(old: &str, new: &str, old_label: &str, new_label: &str) -> String {
    if old == new {
        return String::new();
    }
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .header(old_label, new_label)
        .to_string()
}

/// What was changed by hand since the secondary applied `sealed`: the areas file it keeps
/// (`current`), and each nftables file on disk against the copy it loaded. Empty: no drift.
pub fn drift(sealed: &str, current: &str) -> String {
    let mut out = diff(sealed, current, "as applied", "as found");
    let Ok(table) = parse_received(sealed) else {
        return out;
    };
    for key in [NFTABLES_KEY, FILES_KEY] {
        for file in sent_files(&table, key).unwrap_or_default() {
            let found = on_disk(&file.path);
            let found = found
                .as_ref()
                .map(|(content, mode)| (content.as_str(), file.mode.map(|_| *mode)));
            out.push_str(&file_diff(
                &file.path,
                Some((&file.content, file.mode)),
                Some(found.unwrap_or_default()),
                "as written",
                "as found",
            ));
        }
    }
    out
}

/// What the secondary makes of a push: the received text rewritten for it.
pub fn received_for_secondary(pushed: &str) -> Result<String, String> {
    let mut areas: Table = pushed
        .parse()
        .map_err(|e: toml::de::Error| format!("the pushed areas: {e}"))?;
    rewrite_for_secondary(&mut areas);
    toml::to_string(&areas).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: &str = r#"
[node]
name = "gw1"
[sync]
interface = "sync"
listen = "198.18.3.1:8370"
peer = "198.18.3.2:8370"
key_file = "/etc/carp/sync.key"
[config_sync]
push = ["carp", "nat"]
[carp]
advskew = 0
passphrase = "secret"
[[vip]]
interface = "lan"
vhid = 1
address = "198.18.1.1/24"
[[vip]]
interface = "wan"
vhid = 2
address = "198.18.2.1/24"
advskew = 200
[[nat]]
interface = "wan"
source = "198.18.1.0/24"
to = "198.18.2.1"
"#;

    const SECONDARY: &str = r#"
[node]
name = "gw2"
[sync]
interface = "sync"
listen = "198.18.3.2:8370"
peer = "198.18.3.1:8370"
key_file = "/etc/carp/sync.key"
[config_sync]
accept = ["carp", "nat"]
"#;

    fn table(text: &str) -> Table {
        text.parse().unwrap()
    }

    #[test]
    fn the_payload_holds_the_pushed_areas_and_nothing_of_the_node() {
        let sent = table(&payload(PRIMARY, &[Area::Carp, Area::Nat], &[], &[]).unwrap());
        let keys: Vec<&String> = sent.keys().collect();
        assert_eq!(keys, ["carp", "nat", "vip"]);
        let carp_only = table(&payload(PRIMARY, &[Area::Carp], &[], &[]).unwrap());
        assert!(!carp_only.contains_key("nat"));
    }

    #[test]
    fn nftables_files_travel_with_their_content_in_order() {
        let dir = std::env::temp_dir().join(format!("carp-cs-nft-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.nft"), dir.join("b.nft"));
        std::fs::write(&a, "table inet a {}\n").unwrap();
        std::fs::write(&b, "table inet b {}\n").unwrap();
        let sent = payload(PRIMARY, &[Area::Nftables], &[a.clone(), b.clone()], &[]).unwrap();
        let files = nftables_files(&received_for_secondary(&sent).unwrap()).unwrap();
        assert_eq!(
            files,
            [
                (a, "table inet a {}\n".to_owned()),
                (b, "table inet b {}\n".to_owned())
            ]
        );
        let composed = table(&compose(SECONDARY, &sent, &[Area::Nftables]).unwrap());
        assert!(
            !composed.contains_key("nftables"),
            "not part of the configuration"
        );
        assert!(
            nftables_files(&payload(PRIMARY, &[Area::Carp], &[], &[]).unwrap())
                .unwrap()
                .is_empty()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_passphrase_file_travels_as_its_content() {
        let dir = std::env::temp_dir().join(format!("carp-cs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pass");
        std::fs::write(&file, "from a file\n").unwrap();
        let own = PRIMARY.replace(
            "passphrase = \"secret\"",
            &format!("passphrase_file = \"{}\"", file.display()),
        );
        let sent = table(&payload(&own, &[Area::Carp], &[], &[]).unwrap());
        assert_eq!(sent["carp"]["passphrase"].as_str(), Some("from a file"));
        assert!(sent["carp"].get("passphrase_file").is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn every_skew_gets_100_more_capped_at_254() {
        let received = table(
            &received_for_secondary(&payload(PRIMARY, &[Area::Carp], &[], &[]).unwrap()).unwrap(),
        );
        assert_eq!(received["carp"]["advskew"].as_integer(), Some(100));
        let vips = received["vip"].as_array().unwrap();
        assert!(vips[0].get("advskew").is_none(), "no override stays none");
        assert_eq!(
            vips[1]["advskew"].as_integer(),
            Some(254),
            "200 + 100 capped"
        );
        // A node skew left out counts as 0.
        let mut no_skew = table("[carp]\npassphrase = \"x\"\n");
        rewrite_for_secondary(&mut no_skew);
        assert_eq!(no_skew["carp"]["advskew"].as_integer(), Some(100));
    }

    #[test]
    fn the_secondary_keeps_its_own_node_sync_and_takes_the_accepted_areas() {
        let received =
            received_for_secondary(&payload(PRIMARY, &[Area::Carp, Area::Nat], &[], &[]).unwrap())
                .unwrap();
        let composed = table(&compose(SECONDARY, &received, &[Area::Carp]).unwrap());
        assert_eq!(composed["node"]["name"].as_str(), Some("gw2"));
        assert_eq!(composed["sync"]["listen"].as_str(), Some("198.18.3.2:8370"));
        assert_eq!(composed["vip"].as_array().unwrap().len(), 2);
        assert!(!composed.contains_key("nat"), "nat is not accepted");
        // Its own [carp] is replaced, not merged.
        let own = format!("{SECONDARY}\n[carp]\npassphrase = \"local\"\nmac = \"interface\"\n");
        let composed = table(&compose(&own, &received, &[Area::Carp]).unwrap());
        assert_eq!(composed["carp"]["passphrase"].as_str(), Some("secret"));
        assert!(composed["carp"].get("mac").is_none());
    }

    #[test]
    fn the_diff_names_each_area_that_changes_and_only_those() {
        let old = payload(PRIMARY, &[Area::Carp, Area::Nat], &[], &[]).unwrap();
        assert_eq!(diff(&old, &old, "secondary", "primary"), "");
        let new = payload(
            &PRIMARY.replace("advskew = 0", "advskew = 7"),
            &[Area::Carp, Area::Nat],
            &[],
            &[],
        )
        .unwrap();
        let shown = diff(&old, &new, "secondary", "primary");
        assert!(shown.contains("--- carp (secondary)"), "{shown}");
        assert!(shown.contains("+++ carp (primary)"), "{shown}");
        assert!(
            shown.contains("-advskew = 0") && shown.contains("+advskew = 7"),
            "{shown}"
        );
        assert!(!shown.contains("nat ("), "nat did not change: {shown}");
    }

    #[test]
    fn drift_shows_a_hand_edit_of_the_areas_and_of_a_loaded_ruleset() {
        let dir = std::env::temp_dir().join(format!("carp-cs-drift-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = dir.join("r.nft");
        std::fs::write(&rules, "table inet a {}\n").unwrap();
        let sealed = payload(
            PRIMARY,
            &[Area::Carp, Area::Nftables],
            std::slice::from_ref(&rules),
            &[],
        )
        .unwrap();
        assert_eq!(drift(&sealed, &sealed), "", "nothing touched");
        let edited = sealed.replace("passphrase = \"secret\"", "passphrase = \"mine\"");
        assert!(drift(&sealed, &edited).contains("+passphrase = \"mine\""));
        std::fs::write(&rules, "table inet a {}\ntable inet b {}\n").unwrap();
        let shown = drift(&sealed, &sealed);
        assert!(
            shown.contains("(as found)") && shown.contains("+table inet b {}"),
            "{shown}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn files_travel_with_their_mode_and_drift_sees_content_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("carp-cs-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "198.18.1.5 printer\n").unwrap();
        let declared = [SyncedFile {
            path: hosts.clone(),
            mode: 0o640,
        }];
        let sent = payload(PRIMARY, &[Area::Files], &[], &declared).unwrap();
        let files = synced_files(&received_for_secondary(&sent).unwrap()).unwrap();
        assert_eq!(
            files,
            [SentFile {
                path: hosts.clone(),
                mode: Some(0o640),
                content: "198.18.1.5 printer\n".into()
            }]
        );
        let composed = table(&compose(SECONDARY, &sent, &[Area::Files]).unwrap());
        assert!(
            !composed.contains_key("files"),
            "not part of the configuration"
        );
        // The diff of a new mode says so even when the content is the same.
        let chmodded = sent.replace("mode = \"0640\"", "mode = \"0600\"");
        let shown = diff(&sent, &chmodded, "secondary", "primary");
        assert!(
            shown.contains("mode 0640 (secondary), 0600 (primary)"),
            "{shown}"
        );
        // Written as sent: no drift; then edited and chmodded by hand: both show.
        std::fs::set_permissions(&hosts, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(drift(&sent, &sent), "");
        std::fs::write(&hosts, "198.18.1.5 printer\n198.18.1.6 nas\n").unwrap();
        std::fs::set_permissions(&hosts, std::fs::Permissions::from_mode(0o666)).unwrap();
        let shown = drift(&sent, &sent);
        assert!(shown.contains("+198.18.1.6 nas"), "{shown}");
        assert!(
            shown.contains("mode 0640 (as written), 0666 (as found)"),
            "{shown}"
        );
        // A relative path or a missing mode from a peer is refused.
        let relative = sent.replace(&hosts.display().to_string(), "etc/hosts");
        assert!(synced_files(&relative).unwrap_err().contains("absolute"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn areas_are_named_and_unknown_ones_refused() {
        assert_eq!(Area::parse("carp"), Ok(Area::Carp));
        assert_eq!(Area::parse("files"), Ok(Area::Files));
        assert_eq!(Area::parse("dhcp"), Ok(Area::Dhcp));
        assert!(Area::parse("bogus").unwrap_err().contains("unknown area"));
        assert_eq!(hash("a"), hash("a"));
        assert_ne!(hash("a"), hash("b"));
    }
}
