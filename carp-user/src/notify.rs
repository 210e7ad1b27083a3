//! Notify hooks, keepalived's notify_master/backup/fault: `[[notify]]` commands run on a
//! state change, with what changed in their environment. Each runs on its own task with a
//! timeout, so a hook that hangs never holds up the state machine; failures are logged,
//! counted and published as events.

use crate::{
    carp::fsm::{State, Transition},
    config::Problem,
    events::{EventKind, Events},
};
use serde::Deserialize;
use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};
use tracing::{info, warn};

/// A `[[notify]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    pub on: Vec<String>,
    pub exec: Vec<String>,
    /// Seconds before the hook is killed and counted as failed.
    pub timeout: Option<u64>,
}

/// What a hook runs for: the new state (`fault` is INIT after the interface went down,
/// `stop` is INIT because the daemon stops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Master,
    Backup,
    Fault,
    Stop,
}

impl Trigger {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "master" => Trigger::Master,
            "backup" => Trigger::Backup,
            "fault" => Trigger::Fault,
            "stop" => Trigger::Stop,
            _ => return None,
        })
    }

    /// The trigger of a transition.
    pub fn of(transition: &Transition) -> Self {
        match transition.new {
            State::Master => Trigger::Master,
            State::Backup => Trigger::Backup,
            State::Init if transition.reason == crate::carp::fsm::SHUTDOWN_REASON => Trigger::Stop,
            State::Init => Trigger::Fault,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub on: Vec<Trigger>,
    pub exec: Vec<String>,
    pub timeout: Duration,
}

const DEFAULT_TIMEOUT: u64 = 10;
const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const MAX_TIMEOUT: u64 = 3600;

/// Checks every hook; each refusal names its field (`notify[0].on: ...`).
pub fn validate(raw: &[RawNotify], problems: &mut Vec<Problem>) -> Vec<Hook> {
    let mut hooks = Vec::new();
    for (i, notify) in raw.iter().enumerate() {
        let mut problem = |name: &str, message: String| {
            problems.push(Problem {
                field: format!("notify[{i}].{name}"),
                message,
            });
        };
        let mut on = Vec::new();
        for name in &notify.on {
            match Trigger::parse(name) {
                Some(trigger) if !on.contains(&trigger) => on.push(trigger),
                Some(_) => problem("on", format!("`{name}` twice")),
                None => problem(
                    "on",
                    format!("unknown state `{name}` (master, backup, fault, stop)"),
                ),
            }
        }
        if notify.on.is_empty() {
            problem("on", "no state named (master, backup, fault, stop)".into());
        }
        match notify.exec.first() {
            None => problem("exec", "no command (program, then its arguments)".into()),
            Some(program) if !program.starts_with('/') => problem(
                "exec",
                format!("`{program}` must be an absolute path (hooks run with no PATH search)"),
            ),
            Some(_) => {}
        }
        let timeout = notify.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if !(1..=MAX_TIMEOUT).contains(&timeout) {
            problem(
                "timeout",
                format!("{timeout} is not 1..={MAX_TIMEOUT} seconds"),
            );
        }
        hooks.push(Hook {
            on,
            exec: notify.exec.clone(),
            timeout: Duration::from_secs(timeout),
        });
    }
    hooks
}

/// What a hook is told, in its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub node: String,
    pub vhid: u8,
    pub interface: String,
    pub vip: String,
    pub transition: Transition,
}

impl Change {
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CARP_NODE", self.node.clone()),
            ("CARP_VHID", self.vhid.to_string()),
            ("CARP_INTERFACE", self.interface.clone()),
            ("CARP_VIP", self.vip.clone()),
            ("CARP_OLD_STATE", self.transition.old.to_string()),
            ("CARP_NEW_STATE", self.transition.new.to_string()),
            ("CARP_REASON", self.transition.reason.to_owned()),
        ]
    }
}

/// Runs, each on its own task, every hook that wants this change's trigger; their tasks,
/// for a daemon that stops to wait for its stop hooks.
pub fn run(
    hooks: &[Hook],
    change: &Change,
    failures: &Arc<AtomicU64>,
    events: &Events,
) -> Vec<tokio::task::JoinHandle<()>> {
    let trigger = Trigger::of(&change.transition);
    let mut tasks = Vec::new();
    for hook in hooks.iter().filter(|h| h.on.contains(&trigger)) {
        let (hook, env) = (hook.clone(), change.env());
        let (failures, events) = (failures.clone(), events.clone());
        tasks.push(tokio::spawn(async move {
            let name = hook.exec.join(" ");
            match run_one(&hook, &env).await {
                Ok(()) => info!(hook = %name, ?trigger, "notify hook done"),
                Err(message) => {
                    warn!(hook = %name, %message, "notify hook failed");
                    failures.fetch_add(1, Ordering::Relaxed);
                    events.publish(EventKind::NotifyFailed {
                        hook: name,
                        message,
                    });
                }
            }
        }));
    }
    tasks
}

async fn run_one(hook: &Hook, env: &[(&'static str, String)]) -> Result<(), String> {
    let (program, args) = hook.exec.split_first().ok_or("no command")?;
    // Only what the hook is told, and a PATH: nothing of the daemon's own environment
    // (systemd's NOTIFY_SOCKET among it) leaks into it.
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", HOOK_PATH)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    match tokio::time::timeout(hook.timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(status.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!("killed after {:?}", hook.timeout))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> (Vec<Hook>, Vec<String>) {
        #[derive(Deserialize)]
        struct File {
            notify: Vec<RawNotify>,
        }
        let file: File = toml::from_str(text).unwrap();
        let mut problems = Vec::new();
        let hooks = validate(&file.notify, &mut problems);
        (hooks, problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn hooks_are_checked_field_by_field() {
        let (hooks, problems) = check(
            "[[notify]]\non = [\"master\", \"fault\"]\nexec = [\"/usr/local/bin/on-master\", \"x\"]\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(hooks[0].on, [Trigger::Master, Trigger::Fault]);
        assert_eq!(hooks[0].timeout, Duration::from_secs(10));
        let (_, problems) = check(
            "[[notify]]\non = [\"master\", \"master\", \"gone\"]\nexec = [\"relative\"]\ntimeout = 0\n[[notify]]\non = []\nexec = []\n",
        );
        let fields: Vec<&str> = problems
            .iter()
            .map(|p| p.split(": ").next().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "notify[0].on",
                "notify[0].on",
                "notify[0].exec",
                "notify[0].timeout",
                "notify[1].on",
                "notify[1].exec"
            ],
            "{problems:#?}"
        );
    }

    fn change(new: State, reason: &'static str) -> Change {
        Change {
            node: "gw2".into(),
            vhid: 1,
            interface: "lan".into(),
            vip: "198.18.1.1/24".into(),
            transition: Transition {
                old: State::Backup,
                new,
                reason,
            },
        }
    }

    #[test]
    fn the_trigger_follows_the_new_state_and_why() {
        assert_eq!(
            Trigger::of(&change(State::Master, "x").transition),
            Trigger::Master
        );
        assert_eq!(
            Trigger::of(&change(State::Init, "interface down").transition),
            Trigger::Fault
        );
        assert_eq!(
            Trigger::of(&change(State::Init, crate::carp::fsm::SHUTDOWN_REASON).transition),
            Trigger::Stop
        );
    }

    #[tokio::test]
    async fn a_hook_gets_the_change_in_its_environment_and_a_hanging_one_is_killed() {
        let dir = std::env::temp_dir().join(format!("carp-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("env");
        let hooks = [
            Hook {
                on: vec![Trigger::Master],
                exec: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!("env | grep ^CARP_ | sort > {}", out.display()),
                ],
                timeout: Duration::from_secs(5),
            },
            Hook {
                on: vec![Trigger::Master],
                exec: vec!["/bin/sleep".into(), "30".into()],
                timeout: Duration::from_millis(200),
            },
            Hook {
                on: vec![Trigger::Backup],
                exec: vec!["/bin/false".into()],
                timeout: Duration::from_secs(5),
            },
        ];
        let failures = Arc::new(AtomicU64::new(0));
        let events = Events::new("gw2");
        let mut seen = events.subscribe();
        let started = std::time::Instant::now();
        run(
            &hooks,
            &change(State::Master, "master down timer expired"),
            &failures,
            &events,
        );
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "run never waits"
        );
        let failed = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(&failed.kind, EventKind::NotifyFailed { hook, message } if hook == "/bin/sleep 30" && message.contains("killed after")),
            "{failed:?}"
        );
        assert_eq!(
            failures.load(Ordering::Relaxed),
            1,
            "/bin/false is for backup only"
        );
        let mut written = String::new();
        for _ in 0..100 {
            written = std::fs::read_to_string(&out).unwrap_or_default();
            if written.ends_with("CARP_VIP=198.18.1.1/24\n") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            written,
            "CARP_INTERFACE=lan\nCARP_NEW_STATE=MASTER\nCARP_NODE=gw2\nCARP_OLD_STATE=BACKUP\nCARP_REASON=master down timer expired\nCARP_VHID=1\nCARP_VIP=198.18.1.1/24\n"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
