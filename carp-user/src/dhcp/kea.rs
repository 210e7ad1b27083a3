//! Talking to Kea: `kea-dhcp4 -t` to check a configuration, its control socket for status,
//! leases and maintenance, and the partner's HA listener on the sync link for the commands
//! that must reach the other server (`ha-maintenance-start` goes to the one that stays).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::{net::SocketAddr, path::Path, process::Command, time::Duration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The server binary; Debian's `kea-dhcp4-server` puts it in /usr/sbin.
pub const KEA_DHCP4: &str = "kea-dhcp4";

/// How long a command to Kea may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// The environment Kea needs to run outside its service: PID and lock files in `dir`.
pub fn env(dir: &Path) -> [(&'static str, &Path); 2] {
    [("KEA_PIDFILE_DIR", dir), ("KEA_LOCKFILE_DIR", dir)]
}

/// `kea-dhcp4 -t FILE`: Ok, or Kea's own reason (its error lines).
pub fn check(file: &Path, dir: &Path) -> Result<(), String> {
    let out = Command::new(KEA_DHCP4)
        .arg("-t")
        .arg(file)
        .envs(env(dir))
        .output()
        .map_err(|e| format!("{KEA_DHCP4} cannot run (is kea-dhcp4-server installed?): {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Kea sums its refusal up in one line; its log lines say the same at more length.
    let summary: Vec<&str> = said
        .lines()
        .filter(|l| l.starts_with("Error encountered"))
        .collect();
    let errors: Vec<&str> = if summary.is_empty() {
        said.lines()
            .filter(|l| l.contains("ERROR") || l.contains("FATAL"))
            .collect()
    } else {
        summary
    };
    let reason = if errors.is_empty() {
        said.lines().last().unwrap_or("no output").to_owned()
    } else {
        errors.join("\n")
    };
    Err(format!("Kea refuses its configuration: {reason}"))
}

/// One command on Kea's control socket; the answer's `arguments` (null if none). A result
/// other than success (0) or empty (3) is an error carrying Kea's text.
pub async fn command(socket: &Path, name: &str, arguments: Option<Value>) -> Result<Value, String> {
    let request = request(name, arguments);
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("Kea's control socket {}: {e}", socket.display()))?;
        stream
            .write_all(request.to_string().as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        read_json(&mut stream).await
    };
    let answer = tokio::time::timeout(COMMAND_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("Kea did not answer `{name}` within {COMMAND_TIMEOUT:?}"))??;
    result(name, answer)
}

/// One command to the partner's HA listener (HTTP on the sync link).
pub async fn peer_command(peer: SocketAddr, name: &str) -> Result<Value, String> {
    let body = request(name, None).to_string();
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(peer)
            .await
            .map_err(|e| format!("the partner's Kea at {peer}: {e}"))?;
        let head = format!(
            "POST / HTTP/1.1\r\nHost: {peer}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream
            .write_all(format!("{head}{body}").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .await
            .map_err(|e| e.to_string())?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body)
            .ok_or("no HTTP body from the partner's Kea")?;
        serde_json::from_str::<Value>(body).map_err(|e| format!("the partner's answer: {e}"))
    };
    let answer = tokio::time::timeout(COMMAND_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            format!("the partner's Kea did not answer `{name}` within {COMMAND_TIMEOUT:?}")
        })??;
    // Over HTTP, Kea answers with a list: one entry per service.
    let answer = match answer {
        Value::Array(mut list) if !list.is_empty() => list.remove(0),
        other => other,
    };
    result(name, answer)
}

fn request(name: &str, arguments: Option<Value>) -> Value {
    let mut request = json!({ "command": name });
    if let Some(arguments) = arguments {
        request["arguments"] = arguments;
    }
    request
}

/// Reads until the bytes form one JSON value (Kea may keep the socket open).
async fn read_json(stream: &mut tokio::net::UnixStream) -> Result<Value, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        buf.extend_from_slice(&chunk[..n]);
        match serde_json::from_slice::<Value>(&buf) {
            Ok(value) => return Ok(value),
            Err(e) if n == 0 => return Err(format!("Kea's answer: {e}")),
            Err(_) => {}
        }
    }
}

fn result(name: &str, answer: Value) -> Result<Value, String> {
    match answer["result"].as_i64() {
        Some(0 | 3) => Ok(answer["arguments"].clone()),
        _ => Err(format!(
            "Kea refused `{name}`: {}",
            answer["text"].as_str().unwrap_or("no reason given")
        )),
    }
}

/// The HA part of Kea's `status-get`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaStatus {
    /// This server's HA state (`hot-standby`, `partner-down`, `in-maintenance`, ...).
    pub local_state: String,
    /// The partner's last known state.
    pub partner_state: String,
    /// Clients the partner seems not to answer (Kea's failure detection).
    pub unacked_clients: u64,
    pub communication_interrupted: bool,
    /// The HA scopes served here and by the partner: in hot-standby, one of them serves.
    pub local_scopes: Vec<String>,
    pub partner_scopes: Vec<String>,
}

pub fn parse_status(arguments: &Value) -> Option<HaStatus> {
    let servers = &arguments["high-availability"][0]["ha-servers"];
    let names = |scopes: &Value| -> Vec<String> {
        scopes.as_array().map_or_else(Vec::new, |all| {
            all.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
    };
    Some(HaStatus {
        local_state: servers["local"]["state"].as_str()?.to_owned(),
        partner_state: servers["remote"]["last-state"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
        unacked_clients: servers["remote"]["unacked-clients"].as_u64().unwrap_or(0),
        communication_interrupted: servers["remote"]["communication-interrupted"]
            .as_bool()
            .unwrap_or(false),
        local_scopes: names(&servers["local"]["scopes"]),
        partner_scopes: names(&servers["remote"]["last-scopes"]),
    })
}

/// The process answering, from `status-get`: how carp knows the PID of a Kea a service
/// manager runs.
pub fn parse_pid(arguments: &Value) -> Option<u32> {
    arguments["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
}

/// One lease, as `carp leases` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub address: String,
    pub mac: String,
    pub hostname: String,
    /// Unix time of the client's last transaction.
    pub cltt: u64,
    /// Unix time the lease ends.
    pub expires: u64,
    pub subnet_id: u32,
    /// Kea's lease state: 0 assigned, 1 declined, 2 expired-reclaimed.
    pub state: u32,
}

pub fn parse_leases(arguments: &Value) -> Vec<Lease> {
    let Some(leases) = arguments["leases"].as_array() else {
        return Vec::new();
    };
    leases
        .iter()
        .filter_map(|l| {
            Some(Lease {
                address: l["ip-address"].as_str()?.to_owned(),
                mac: l["hw-address"].as_str().unwrap_or("").to_owned(),
                hostname: l["hostname"].as_str().unwrap_or("").to_owned(),
                cltt: l["cltt"].as_u64()?,
                expires: l["cltt"].as_u64()? + l["valid-lft"].as_u64().unwrap_or(0),
                subnet_id: u32::try_from(l["subnet-id"].as_u64()?).ok()?,
                state: u32::try_from(l["state"].as_u64().unwrap_or(0)).unwrap_or(0),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_leases_parse_from_keas_own_answers() {
        // As Kea 2.2 answered in the lab.
        let status: Value = serde_json::from_str(r#"{ "high-availability": [ { "ha-mode": "hot-standby", "ha-servers": { "local": { "role": "standby", "scopes": [  ], "state": "hot-standby" }, "remote": { "age": 0, "analyzed-packets": 0, "communication-interrupted": false, "connecting-clients": 0, "in-touch": true, "last-scopes": [ "primary" ], "last-state": "hot-standby", "role": "primary", "unacked-clients": 2, "unacked-clients-left": 0 } } } ], "pid": 28154 }"#).unwrap();
        assert_eq!(
            parse_status(&status),
            Some(HaStatus {
                local_state: "hot-standby".into(),
                partner_state: "hot-standby".into(),
                unacked_clients: 2,
                communication_interrupted: false,
                local_scopes: vec![],
                partner_scopes: vec!["primary".into()],
            })
        );
        assert_eq!(parse_status(&json!({})), None);
        assert_eq!(parse_pid(&status), Some(28154));
        assert_eq!(parse_pid(&json!({})), None);
        let leases: Value = serde_json::from_str(r#"{ "leases": [ { "cltt": 1796171850, "fqdn-fwd": false, "fqdn-rev": false, "hostname": "vm", "hw-address": "36:c7:df:d2:33:fa", "ip-address": "198.18.1.150", "state": 0, "subnet-id": 1, "valid-lft": 600 } ] }"#).unwrap();
        let parsed = parse_leases(&leases);
        assert_eq!(parsed[0].address, "198.18.1.150");
        assert_eq!(parsed[0].expires, 1_796_172_450);
        assert!(parse_leases(&json!({"leases": [{"hostname": 1}]})).is_empty());
        assert!(
            result("x", json!({"result": 1, "text": "no"}))
                .unwrap_err()
                .contains("no")
        );
        assert_eq!(result("x", json!({"result": 3})), Ok(Value::Null));
    }
}
