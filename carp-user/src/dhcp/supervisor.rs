//! Runs kea-dhcp4 for carp: writes its configuration, checks it with `kea-dhcp4 -t`, starts
//! it, restarts it with backoff when it dies, hands it a changed configuration without a
//! restart (`config-reload`), and reads its HA state and lease counts every second for
//! `carp status`. Where a service manager runs Kea instead, carp writes the configuration
//! where the service reads it, has the service reloaded and reads it alike. A Kea that is
//! missing or refuses its configuration shows as failed with Kea's own words; CARP and sync
//! go on regardless.

use super::{
    kea::{self, HaStatus, KEA_DHCP4, Lease},
    kea_config::{self, KeaSetup},
    served_by::{self, ServedBy, Server},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{process::Child, sync::watch, task::JoinHandle};
use tracing::{error, info, warn};

/// DHCP in `carp status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhcpStatus {
    /// primary or standby in Kea's hot-standby pair.
    pub role: String,
    pub running: bool,
    pub pid: Option<u32>,
    /// Why Kea is not serving: missing, its configuration refused, exited.
    pub failure: Option<String>,
    /// Kea's HA state here and the partner's, from Kea's control channel.
    pub ha: Option<HaStatus>,
    pub scopes: Vec<ScopeStatus>,
    /// The last planned-failover command to the partner's Kea and how it went.
    pub maintenance: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeStatus {
    pub interface: String,
    pub subnet: String,
    pub leases: u64,
}

/// The first restart waits this long, doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A configuration Kea refused is tried again this often (the host may change under it).
const RECHECK: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_secs(1);
/// How long a Kea service's reload command may take.
const RELOAD_LIMIT: Duration = Duration::from_secs(30);
/// How long Kea gets to stop on SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running supervision of kea-dhcp4.
pub struct Supervisor {
    setup: KeaSetup,
    status: Arc<Mutex<DhcpStatus>>,
    served_by: Arc<Mutex<ServedBy>>,
    stop: watch::Sender<bool>,
    /// The configuration Kea should run; a new one is handed over without a restart.
    setups: watch::Sender<KeaSetup>,
    task: JoinHandle<()>,
}

impl Supervisor {
    pub fn start(setup: KeaSetup) -> Self {
        let status = Arc::new(Mutex::new(DhcpStatus::default()));
        show_setup(&mut lock(&status), &setup);
        let (stop, stopped) = watch::channel(false);
        let (setups, latest) = watch::channel(setup.clone());
        let served_by = Arc::new(Mutex::new(ServedBy::default()));
        let task = tokio::spawn(supervise(
            latest,
            status.clone(),
            served_by.clone(),
            stopped,
        ));
        Self {
            setup,
            status,
            served_by,
            stop,
            setups,
            task,
        }
    }

    pub fn setup(&self) -> &KeaSetup {
        &self.setup
    }

    /// Whether the running Kea can take `new` without a restart: the same files, control
    /// socket and way of running it (what differs is in the configuration file Kea reads).
    pub fn can_reconfigure(&self, new: &KeaSetup) -> bool {
        new.dir == self.setup.dir && new.service == self.setup.service
    }

    /// Hands `new` to the running Kea: written once `kea-dhcp4 -t` accepts it, then read
    /// again by Kea (`config-reload`, or the service's reload command), so DHCP, its leases
    /// and the HA pair's connection go on. A refused one leaves Kea on the last good one, with
    /// the reason in `carp status`.
    pub fn reconfigure(&mut self, new: KeaSetup) {
        show_setup(&mut lock(&self.status), &new);
        self.setup = new.clone();
        let _ = self.setups.send(new);
    }

    pub fn status(&self) -> DhcpStatus {
        lock(&self.status).clone()
    }

    /// Stops Kea (SIGTERM, then SIGKILL after a grace) and the supervision.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            error!(error = %e, "the Kea supervisor ended badly");
        }
    }

    /// Every lease Kea holds here, with who served when (a future that owns what it needs,
    /// to run on its own).
    pub fn leases(
        &self,
    ) -> impl Future<Output = Result<(Vec<Lease>, ServedBy), String>> + Send + 'static {
        let socket = self.setup.control_socket();
        let served_by = self.served_by.clone();
        async move {
            let answer = kea::command(&socket, "lease4-get-all", None).await?;
            let served_by = lock(&served_by).clone();
            Ok((kea::parse_leases(&answer), served_by))
        }
    }

    /// Planned failover: the partner's Kea (the one that stays) takes this one into
    /// maintenance, so no lease is lost or handed out twice; `false` cancels it. A future
    /// that owns what it needs, to run on its own: an unreachable partner takes Kea's
    /// command timeout to give up.
    pub fn partner_maintenance(
        &self,
        on: bool,
    ) -> impl Future<Output = Result<String, String>> + Send + 'static {
        let partner = SocketAddr::from((self.setup.peer, self.setup.port));
        let status = self.status.clone();
        async move {
            let name = if on {
                "ha-maintenance-start"
            } else {
                "ha-maintenance-cancel"
            };
            let outcome = kea::peer_command(partner, name)
                .await
                .map(|_| format!("{name}: done by the partner"));
            let shown = match &outcome {
                Ok(done) => done.clone(),
                Err(e) => e.clone(),
            };
            lock(&status).maintenance = Some(shown);
            outcome
        }
    }
}

/// The role and scopes `carp status` shows for `setup` (lease counts from the next look).
fn show_setup(status: &mut DhcpStatus, setup: &KeaSetup) {
    status.role = setup.role.name().into();
    status.scopes = setup
        .scopes
        .iter()
        .map(|s| ScopeStatus {
            interface: s.interface.clone(),
            subnet: s.subnet.to_string(),
            leases: 0,
        })
        .collect();
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn supervise(
    mut setups: watch::Receiver<KeaSetup>,
    status: Arc<Mutex<DhcpStatus>>,
    served_by: Arc<Mutex<ServedBy>>,
    mut stopped: watch::Receiver<bool>,
) {
    if setups.borrow().service.is_some() {
        return drive_service(&mut setups, &status, &served_by, &mut stopped).await;
    }
    let mut backoff = FIRST_BACKOFF;
    loop {
        // A Kea started (again) runs the latest configuration.
        let mut setup = setups.borrow_and_update().clone();
        let wait = match prepare(&setup) {
            Err(failure) => {
                warn!(%failure, "DHCP not served");
                set_failed(&status, failure);
                RECHECK
            }
            Ok(file) => match spawn(&file, &setup.dir) {
                Err(failure) => {
                    set_failed(&status, failure);
                    RECHECK
                }
                Ok(child) => {
                    info!(
                        pid = child.id(),
                        role = setup.role.name(),
                        "kea-dhcp4 started"
                    );
                    let ran_for = tokio::time::Instant::now();
                    let watched = watch_child(
                        child,
                        &mut setup,
                        &mut setups,
                        &status,
                        &served_by,
                        &mut stopped,
                    );
                    match watched.await {
                        Ended::Stopped => return,
                        Ended::Exited(failure) => {
                            error!(%failure, "kea-dhcp4 died; restarting it");
                            set_failed(&status, failure);
                        }
                    }
                    if ran_for.elapsed() > MAX_BACKOFF {
                        backoff = FIRST_BACKOFF;
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            },
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // A new configuration is tried at once.
            Ok(()) = setups.changed() => {}
            _ = stopped.changed() => return,
        }
    }
}

/// Kea run by a service manager: carp's configuration written where the service reads it
/// (only once `kea-dhcp4 -t` accepts it), the service reloaded, then Kea read every second.
/// Kea stays up when carp stops: it is the service manager's.
async fn drive_service(
    setups: &mut watch::Receiver<KeaSetup>,
    status: &Mutex<DhcpStatus>,
    served_by: &Mutex<ServedBy>,
    stopped: &mut watch::Receiver<bool>,
) {
    let Some(service) = setups.borrow().service.clone() else {
        return;
    };
    let mut setup = loop {
        let setup = setups.borrow_and_update().clone();
        match install_in_service(&setup).await {
            Ok(()) => break setup,
            Err(failure) => {
                warn!(%failure, "DHCP not served");
                set_failed(status, failure);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RECHECK) => {}
            _ = stopped.changed() => return,
        }
    };
    info!(config = %service.config.display(), "the Kea service runs carp's configuration");
    let mut poll = tokio::time::interval(POLL);
    let mut refused = None;
    loop {
        tokio::select! {
            _ = poll.tick() => {
                poll_kea(&setup, status, served_by).await;
                let mut status = lock(status);
                status.running = status.ha.is_some();
                status.failure = if status.running {
                    refused.clone()
                } else {
                    Some(format!("the Kea service does not answer on {}", service.control_socket.display()))
                };
            }
            Ok(()) = setups.changed() => {
                let new = setups.borrow_and_update().clone();
                let outcome = install_in_service(&new).await;
                refused = adopt(&mut setup, new, outcome);
            }
            _ = stopped.changed() => return,
        }
    }
}

/// carp's configuration installed where the service reads it, and the service reloaded.
async fn install_in_service(setup: &KeaSetup) -> Result<(), String> {
    let Some(service) = &setup.service else {
        return Err("Kea is not run by a service".into());
    };
    install_config(setup)?;
    reload_service(&service.reload).await
}

/// How handing `new` to the running Kea went: taken, it becomes `setup` (what Kea runs);
/// logged either way, and `Some` reason to show in `carp status` while Kea runs on the last
/// good one.
fn adopt(setup: &mut KeaSetup, new: KeaSetup, outcome: Result<(), String>) -> Option<String> {
    match outcome {
        Ok(()) => {
            info!(
                scopes = new.scopes.len(),
                "Kea runs the new configuration (no restart)"
            );
            *setup = new;
            None
        }
        Err(failure) => {
            warn!(%failure, "Kea keeps its last good configuration");
            Some(format!("the new configuration is not in use: {failure}"))
        }
    }
}

/// carp's configuration for Kea, accepted by `kea-dhcp4 -t` before it replaces the file Kea
/// reads: a refused one never reaches it (the last good one stays). Returns that file.
fn install_config(setup: &KeaSetup) -> Result<PathBuf, String> {
    std::fs::create_dir_all(&setup.dir)
        .map_err(|e| format!("creating {}: {e}", setup.dir.display()))?;
    let text =
        serde_json::to_string_pretty(&kea_config::generate(setup)).map_err(|e| e.to_string())?;
    let candidate = setup.dir.join("kea-dhcp4.candidate.json");
    std::fs::write(&candidate, &text)
        .map_err(|e| format!("writing {}: {e}", candidate.display()))?;
    kea::check(&candidate, &setup.dir)?;
    let file = setup.config_file();
    crate::synced_files::write_atomically(&file, &text)
        .map_err(|e| format!("writing {}: {e}", file.display()))?;
    Ok(file)
}

/// Runs the service's reload command; its own words if it fails.
async fn reload_service(argv: &[String]) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("no reload command".into());
    };
    let run = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(RELOAD_LIMIT, run).await {
        Err(_) => Err(format!(
            "`{}` took longer than {RELOAD_LIMIT:?}",
            argv.join(" ")
        )),
        Ok(Err(e)) => Err(format!("`{}` cannot run: {e}", argv.join(" "))),
        Ok(Ok(out)) if !out.status.success() => Err(format!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Ok(_)) => Ok(()),
    }
}

fn set_failed(status: &Mutex<DhcpStatus>, failure: String) {
    let mut status = lock(status);
    status.running = false;
    status.pid = None;
    status.ha = None;
    status.failure = Some(failure);
}

/// A Kea left from an earlier run of carp ended, the configuration installed.
fn prepare(setup: &KeaSetup) -> Result<PathBuf, String> {
    end_stale(&setup.dir);
    install_config(setup)
}

/// Kea's PID file for our configuration file (Kea names it after the file).
fn pid_file(dir: &Path) -> PathBuf {
    dir.join("kea-dhcp4.kea-dhcp4.pid")
}

/// A kea-dhcp4 that an earlier run of carp started on this directory (carp killed, or
/// re-executed by `carp upgrade`) holds the sockets: it is ended first.
fn end_stale(dir: &Path) {
    use nix::{sys::signal, unistd::Pid};
    let Some(pid) = std::fs::read_to_string(pid_file(dir))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    else {
        return;
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !comm.trim().starts_with(KEA_DHCP4) {
        return;
    }
    info!(pid, "ending the kea-dhcp4 an earlier run left");
    let pid = Pid::from_raw(pid);
    let _ = signal::kill(pid, signal::Signal::SIGTERM);
    for _ in 0..50 {
        if signal::kill(pid, None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = signal::kill(pid, signal::Signal::SIGKILL);
}

fn spawn(file: &Path, dir: &Path) -> Result<Child, String> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("kea-dhcp4.out"))
        .map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    tokio::process::Command::new(KEA_DHCP4)
        .arg("-c")
        .arg(file)
        .envs(kea::env(dir))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("{KEA_DHCP4} cannot start (is kea-dhcp4-server installed?): {e}"))
}

enum Ended {
    Stopped,
    Exited(String),
}

/// Polls a running Kea until it exits or carp stops it, and hands it each new
/// configuration (`setup` is the one it runs).
async fn watch_child(
    mut child: Child,
    setup: &mut KeaSetup,
    setups: &mut watch::Receiver<KeaSetup>,
    status: &Mutex<DhcpStatus>,
    served_by: &Mutex<ServedBy>,
    stopped: &mut watch::Receiver<bool>,
) -> Ended {
    {
        let mut status = lock(status);
        status.running = true;
        status.pid = child.id();
        status.failure = None;
    }
    let mut poll = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            exited = child.wait() => {
                let how = exited.map_or_else(|e| e.to_string(), |s| s.to_string());
                return Ended::Exited(format!("kea-dhcp4 {how}: {}", last_words(&setup.dir)));
            }
            _ = stopped.changed() => {
                terminate(&mut child).await;
                let mut status = lock(status);
                status.running = false;
                status.pid = None;
                return Ended::Stopped;
            }
            _ = poll.tick() => poll_kea(setup, status, served_by).await,
            Ok(()) = setups.changed() => {
                let new = setups.borrow_and_update().clone();
                let outcome = reload_child(&new).await;
                lock(status).failure = adopt(setup, new, outcome);
            }
        }
    }
}

/// A new configuration for the Kea carp runs: installed, then read again by Kea.
async fn reload_child(setup: &KeaSetup) -> Result<(), String> {
    install_config(setup)?;
    kea::command(&setup.control_socket(), "config-reload", None)
        .await
        .map(|_| ())
}

/// Kea's HA state (and so who serves) and each scope's lease count.
async fn poll_kea(setup: &KeaSetup, status: &Mutex<DhcpStatus>, served_by: &Mutex<ServedBy>) {
    let socket = setup.control_socket();
    let answer = look_at_ha(&socket, served_by).await;
    let ha = answer.as_ref().and_then(kea::parse_status);
    let leases = kea::command(&socket, "lease4-get-all", None)
        .await
        .map(|a| kea::parse_leases(&a));
    let mut status = lock(status);
    status.ha = ha;
    if setup.service.is_some() {
        // Not carp's child: the service's Kea says who it is.
        status.pid = answer.as_ref().and_then(kea::parse_pid);
    }
    if let Ok(leases) = leases {
        for (scope, shown) in setup.scopes.iter().zip(status.scopes.iter_mut()) {
            let id = kea_config::subnet_id(scope);
            shown.leases = leases
                .iter()
                .filter(|l| l.subnet_id == id && l.state == 0)
                .count() as u64;
        }
    }
}

/// Kea's `status-get` answer, with who serves noted in `served_by` as of the question.
async fn look_at_ha(socket: &Path, served_by: &Mutex<ServedBy>) -> Option<Value> {
    let asked = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let answer = kea::command(socket, "status-get", None).await.ok();
    let serving = answer
        .as_ref()
        .and_then(kea::parse_status)
        .map_or(Server::Unknown, |ha| {
            served_by::serving(&ha.local_scopes, &ha.partner_scopes)
        });
    lock(served_by).observe(asked, serving);
    answer
}

async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    info!("kea-dhcp4 stopped");
}

/// The last lines Kea wrote before it died, for the status.
fn last_words(dir: &Path) -> String {
    let out = std::fs::read_to_string(dir.join("kea-dhcp4.out")).unwrap_or_default();
    let log = std::fs::read_to_string(kea_config::log_file(dir)).unwrap_or_default();
    [out, log]
        .iter()
        .flat_map(|t| t.lines().rev().take(2).collect::<Vec<_>>())
        .find(|l| l.contains("ERROR") || l.contains("FATAL"))
        .unwrap_or("no error logged")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration Kea refuses leaves DHCP failed with Kea's own words, and the
    /// supervisor (so the daemon) running. Needs Kea installed (`cargo xtask setup`).
    #[tokio::test]
    async fn a_refused_configuration_shows_keas_reason_and_nothing_dies() {
        let mut setup = kea_config::tests::setup(kea_config::HaRole::Primary);
        setup.dir = std::env::temp_dir().join(format!("carp-kea-sup-{}", std::process::id()));
        setup.hooks_dir = PathBuf::from("/nonexistent/kea/hooks");
        let supervisor = Supervisor::start(setup.clone());
        let mut failure = None;
        for _ in 0..100 {
            failure = supervisor.status().failure;
            if failure.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let failure = failure.expect("no failure shown");
        assert!(
            failure.contains("Kea refuses its configuration"),
            "{failure}"
        );
        assert!(failure.contains("/nonexistent/kea/hooks"), "{failure}");
        assert!(!supervisor.status().running);
        supervisor.stop().await;
        std::fs::remove_dir_all(&setup.dir).unwrap();
    }
}
