//! The daemon's side of configuration sync: what a primary pushes and when, and how a
//! secondary takes a push (rewritten, checked whole, drift refused unless forced, applied
//! as one transaction), rolls back, and answers a dry run.

use super::{Daemon, PUSH_ANSWER};
use crate::{
    config::{Config, ConfigError},
    config_sync::{self, Area},
    control::Response,
    error::Chain,
    nat, nft,
    sync::config_link::{Answer, Received},
    synced_files::{self, write_atomically},
};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

impl Daemon {
    /// A primary hands its areas to the session, which pushes them now if connected and on
    /// every reconnect.
    pub(super) fn push_config(&self) {
        let (Some(sync), false) = (&self.sync, self.config.config_sync.push.is_empty()) else {
            return;
        };
        match self.payload() {
            Ok((areas, hash)) => sync.push_config(areas, hash),
            Err(e) => error!(error = %e, "cannot build the configuration to push"),
        }
    }

    /// The areas this node pushes, and the hash of what the secondary will hold of them
    /// (so both sides compare alike).
    pub(super) fn payload(&self) -> Result<(String, String), String> {
        let own = std::fs::read_to_string(&self.config_path).map_err(|e| e.to_string())?;
        let areas = config_sync::payload(
            &own,
            &self.config.config_sync.push,
            &self.config.config_sync.nftables,
            &self.config.config_sync.files,
        )?;
        let held = config_sync::received_for_secondary(&areas)?;
        Ok((areas, config_sync::hash(&held)))
    }

    /// Answers `carp config push` once the secondary has; the daemon goes on meanwhile.
    pub(super) fn config_push_request(
        &self,
        dry_run: bool,
        force: bool,
        reply: tokio::sync::oneshot::Sender<Response>,
    ) {
        let flags = if dry_run { config_sync::DRY_RUN } else { 0 }
            | if force { config_sync::FORCE } else { 0 };
        let answered = match self.push_now(flags) {
            Ok(answered) => answered,
            Err(e) => {
                let _ = reply.send(Response::error(e));
                return;
            }
        };
        tokio::spawn(async move {
            let response = match tokio::time::timeout(PUSH_ANSWER, answered).await {
                Ok(Ok(answer)) if answer.ok => Response::taken(answer.message),
                Ok(Ok(answer)) => Response::error(answer.message),
                Ok(Err(_)) => Response::error("the sync session ended".into()),
                Err(_) => {
                    Response::error(format!("no answer from the peer within {PUSH_ANSWER:?}"))
                }
            };
            let _ = reply.send(response);
        });
    }

    /// `carp config push` and `carp config diff` on the primary: a push with these flags
    /// now; the receiver gets the secondary's answer.
    pub(super) fn push_now(
        &self,
        flags: u8,
    ) -> Result<tokio::sync::oneshot::Receiver<Answer>, String> {
        if self.config.config_sync.push.is_empty() {
            return Err("this node pushes no configuration ([config_sync] push)".into());
        }
        let sync = self
            .sync
            .as_ref()
            .ok_or("state sync is not configured ([sync])")?;
        let (areas, hash) = self.payload()?;
        Ok(sync.push_config_now(areas, hash, flags))
    }

    /// A secondary applies what the primary pushed: rewritten (every advskew +100), checked
    /// as a whole against this host with its own `[node]` and `[sync]`, kept in the state
    /// directory (the previous version beside it) and applied like a reload. A push that
    /// does not fit this host changes nothing and its reason goes back.
    pub(super) async fn apply_pushed(&mut self, pushed: &str, flags: u8) -> Answer {
        let received = match config_sync::received_for_secondary(pushed) {
            Ok(received) => received,
            Err(e) => return refused_push(e),
        };
        let state_dir = &self.config.node.state_dir;
        let held =
            std::fs::read_to_string(config_sync::applied_file(state_dir)).unwrap_or_default();
        // Drift: what was changed here by hand since the last sync is not overwritten
        // silently (pfSense does); the operator forces it.
        let mut drift = std::fs::read_to_string(config_sync::sealed_file(state_dir))
            .map(|sealed| config_sync::drift(&sealed, &held))
            .unwrap_or_default();
        // carp's own NAT table, touched by hand.
        if let Ok(sealed) = std::fs::read_to_string(config_sync::sealed_nat_file(state_dir)) {
            drift.push_str(&config_sync::unified(
                &sealed,
                &nat::listing(),
                "ip carp table (as applied)",
                "ip carp table (as found)",
            ));
        }
        if flags & config_sync::DRY_RUN != 0 {
            return self.dry_run(&received, &held, &drift);
        }
        if !drift.is_empty() && flags & config_sync::FORCE == 0 {
            return refused_push(format!(
                "changed by hand on the secondary since the last sync (push with --force to overwrite):\n{drift}"
            ));
        }
        self.apply_received(&received).await
    }

    /// What a push would change here, and whether it would be taken; nothing applied.
    pub(super) fn dry_run(&self, received: &str, held: &str, drift: &str) -> Answer {
        let mut message = config_sync::diff(held, received, "secondary", "primary");
        if message.is_empty() {
            message = "no difference\n".into();
        }
        if !drift.is_empty() {
            message.push_str(&format!(
                "\nchanged by hand on the secondary since the last sync (a push needs --force):\n{drift}"
            ));
        }
        let fits = match Config::load_with(&self.config_path, Some(received)) {
            Ok(_) => None,
            Err(ConfigError::Invalid { problems }) => Some(
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            Err(e) => Some(Chain(&e).to_string()),
        };
        match fits {
            None => Answer {
                ok: true,
                hash: config_sync::hash(received),
                message,
            },
            Some(problems) => refused_push(format!("{message}\nwould be refused:\n{problems}")),
        }
    }

    /// `carp config rollback` on a secondary: the version before the last applied again
    /// (the last one becomes the one before).
    pub(super) async fn rollback(&mut self) -> Response {
        if self.config.config_sync.accept.is_empty() {
            return Response::error("this node accepts no configuration to roll back".into());
        }
        let previous = config_sync::previous_file(&self.config.node.state_dir);
        let received = match std::fs::read_to_string(&previous) {
            Ok(received) => received,
            Err(e) => {
                return Response::error(format!(
                    "nothing to roll back to ({}: {e})",
                    previous.display()
                ));
            }
        };
        let answer = self.apply_received(&received).await;
        if let Some(sync) = &self.sync
            && answer.ok
        {
            sync.config_held(answer.hash.clone());
        }
        if answer.ok {
            Response::done(format!("rolled back to {}", answer.hash), self.status())
        } else {
            Response::error(answer.message)
        }
    }

    /// Applies areas received from the primary (rewritten already) as one transaction.
    pub(super) async fn apply_received(&mut self, received: &str) -> Answer {
        let refuse = refused_push;
        let received = received.to_owned();
        match Config::load_with(&self.config_path, Some(&received)) {
            Ok(_) => {}
            Err(ConfigError::Invalid { problems }) => {
                let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
                return refuse(lines.join("\n"));
            }
            Err(e) => return refuse(Chain(&e).to_string()),
        }
        // The files area: staged beside their paths first; in place only if the rest loads.
        let accept = &self.config.config_sync.accept;
        let staged = if accept.contains(&Area::Files) {
            let protected = [self.config_path.as_path(), &self.config.node.state_dir];
            match config_sync::synced_files(&received)
                .and_then(|files| synced_files::stage(&files, &protected))
            {
                Ok(staged) => staged,
                Err(e) => return refuse(e),
            }
        } else {
            synced_files::Staged::default()
        };
        // The nftables area: checked, then loaded as one transaction, before anything else
        // changes; a ruleset the kernel refuses leaves everything as it was.
        if accept.contains(&Area::Nftables) {
            let files = match config_sync::nftables_files(&received) {
                Ok(files) => files,
                Err(e) => return refuse(e),
            };
            if !files.is_empty() {
                let ruleset: String = files.iter().map(|(_, content)| content.as_str()).collect();
                if let Err(e) = nft::check_text(&ruleset) {
                    return refuse(format!("nftables ruleset refused by nft -c: {e}"));
                }
                if let Err(e) = nft::load_text(&ruleset) {
                    return refuse(format!("nftables ruleset failed to load: {e}"));
                }
                for (path, content) in &files {
                    if let Err(e) = write_atomically(path, content) {
                        warn!(path = %path.display(), error = %e, "loaded, but cannot keep the ruleset file");
                    }
                }
            }
        }
        let changed_files = match staged.commit() {
            Ok(changed) => changed,
            Err(e) => return refuse(e),
        };
        if let Err(e) = keep_received(&self.config.node.state_dir, &received) {
            return refuse(format!("keeping the received configuration: {e}"));
        }
        let (response, _) = self.reload().await;
        let hash = config_sync::hash(&received);
        match response.problems {
            Some(problems) => refuse(problems.join("\n")),
            None => {
                info!(%hash, "applied the primary's configuration");
                synced_files::run_reload_after(
                    &self.config.config_sync.reload_after,
                    &changed_files,
                    self.reload_after_failure.clone(),
                );
                // The NAT table as pushed, whatever was done to it here (a forced push
                // overwrites a hand change), then sealed to tell a later one from it.
                if let Err(e) = nat::apply(&self.config.nat) {
                    return refuse(format!("loading the NAT table: {}", Chain(&e)));
                }
                let seal = config_sync::sealed_nat_file(&self.config.node.state_dir);
                if let Err(e) = write_atomically(&seal, &nat::listing()) {
                    warn!(error = %e, "cannot seal the NAT table");
                }
                Answer {
                    ok: true,
                    hash,
                    message: response.message.unwrap_or_default(),
                }
            }
        }
    }
}

/// The answer to a push this node cannot take.
pub(super) fn refused_push(message: String) -> Answer {
    warn!(%message, "configuration push refused");
    Answer {
        ok: false,
        hash: String::new(),
        message,
    }
}

/// Writes what a secondary received, atomically, keeping the version before it.
fn keep_received(state_dir: &std::path::Path, received: &str) -> std::io::Result<()> {
    let applied = config_sync::applied_file(state_dir);
    if let Some(dir) = applied.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if applied.exists() {
        std::fs::rename(&applied, config_sync::previous_file(state_dir))?;
    }
    write_atomically(&applied, received)?;
    // The seal tells a later hand edit of what was applied from what carp wrote.
    write_atomically(&config_sync::sealed_file(state_dir), received)
}

/// The next configuration push from the peer, or never on a node that accepts none.
pub(super) async fn recv_push(pushes: &mut Option<mpsc::Receiver<Received>>) -> Option<Received> {
    match pushes {
        Some(pushes) => pushes.recv().await,
        None => std::future::pending().await,
    }
}
