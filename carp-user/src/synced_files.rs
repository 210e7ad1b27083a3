//! The files area on a secondary: received files staged beside their paths with their mode,
//! renamed into place only once the whole sync is taken, and the secondary's own
//! `reload_after` commands run for the ones whose content or mode changed.

use crate::config_sync::SentFile;
use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};
use tracing::{info, warn};

/// The largest file config sync carries (a 10,000-rule ruleset is 350 KB).
pub const MAX_FILE: u64 = 4 << 20;

/// A synced path's text and permission bits, read only if it is a regular file of at most
/// [`MAX_FILE`] bytes: a device or FIFO named by a peer or a typo (`/dev/zero`) never
/// wedges the daemon. `Ok(None)`: nothing there.
pub fn read_regular(path: &Path) -> std::io::Result<Option<(String, u32)>> {
    use std::io::{Error, ErrorKind};
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    if meta.len() > MAX_FILE {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{} bytes, more than the {MAX_FILE} config sync carries",
                meta.len()
            ),
        ));
    }
    let bytes = std::fs::read(path)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::new(ErrorKind::InvalidData, "not UTF-8 text"))?;
    Ok(Some((text, meta.permissions().mode() & 0o7777)))
}

/// How long a `reload_after` command may run before it is killed and reported.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Received files written to temporary files beside their paths, not yet in place. Dropped
/// without [`Staged::commit`], it removes them: the sync was not taken.
#[derive(Debug, Default)]
pub struct Staged {
    files: Vec<StagedFile>,
}

#[derive(Debug)]
struct StagedFile {
    tmp: PathBuf,
    path: PathBuf,
    changed: bool,
}

/// Stages `files`; refuses, naming the path, one that would overwrite what carp itself
/// lives on (`protected`: the node's configuration and state directory) or that cannot be
/// written. Nothing is left behind on a refusal.
pub fn stage(files: &[SentFile], protected: &[&Path]) -> Result<Staged, String> {
    let mut staged = Staged::default();
    for file in files {
        if let Some(own) = protected.iter().find(|p| file.path.starts_with(p)) {
            return Err(format!(
                "files: {} is this node's own {} and is never synced",
                file.path.display(),
                own.display()
            ));
        }
        let mode = file.mode.unwrap_or(0o644);
        let changed = match read_regular(&file.path) {
            Ok(Some((content, found))) => content != file.content || found != mode,
            Ok(None) => true,
            Err(e) => {
                return Err(format!("files: {}: {e}", file.path.display()));
            }
        };
        let tmp = temporary(&file.path);
        let written = (|| {
            if let Some(dir) = file.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&tmp, &file.content)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        })();
        staged.files.push(StagedFile {
            tmp,
            path: file.path.clone(),
            changed,
        });
        if let Err(e) = written {
            return Err(format!("files: writing {}: {e}", file.path.display()));
        }
    }
    Ok(staged)
}

impl Staged {
    /// Renames every staged file into place; returns the paths whose content or mode changed.
    pub fn commit(mut self) -> Result<Vec<PathBuf>, String> {
        let mut changed = Vec::new();
        for file in std::mem::take(&mut self.files) {
            std::fs::rename(&file.tmp, &file.path)
                .map_err(|e| format!("files: putting {} in place: {e}", file.path.display()))?;
            if file.changed {
                changed.push(file.path);
            }
        }
        Ok(changed)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = std::fs::remove_file(&file.tmp);
        }
    }
}

/// The temporary file beside `path` (same filesystem, so the rename is atomic).
fn temporary(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".carp-tmp");
    PathBuf::from(tmp)
}

/// Writes `path` through a temporary file beside it and a rename.
pub fn write_atomically(path: &Path, content: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = temporary(path);
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}

/// Runs, in the background, the secondary's own command for each changed file that its
/// `reload_after` names, one after the other; the last failure (or `None` once all passed)
/// goes to `outcome` for `carp status`.
pub fn run_reload_after(
    commands: &BTreeMap<PathBuf, Vec<String>>,
    changed: &[PathBuf],
    outcome: Arc<Mutex<Option<String>>>,
) {
    let due: Vec<(PathBuf, Vec<String>)> = changed
        .iter()
        .filter_map(|path| commands.get(path).map(|c| (path.clone(), c.clone())))
        .collect();
    if due.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut failure = None;
        for (path, command) in due {
            match run(&command).await {
                Ok(()) => info!(file = %path.display(), ?command, "reload_after command done"),
                Err(e) => {
                    let message = format!("reload_after for {}: {e}", path.display());
                    warn!(%message);
                    failure = Some(message);
                }
            }
        }
        *outcome.lock().unwrap_or_else(|e| e.into_inner()) = failure;
    });
}

/// Runs `command` (program, then arguments) to its end, within [`COMMAND_TIMEOUT`].
async fn run(command: &[String]) -> Result<(), String> {
    let (program, args) = command.split_first().ok_or("an empty command")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("`{program}` cannot start: {e}"))?;
    let mut stderr = child.stderr.take();
    let waited = tokio::time::timeout(COMMAND_TIMEOUT, child.wait()).await;
    let status = match waited {
        Ok(status) => status.map_err(|e| e.to_string())?,
        Err(_) => {
            return Err(format!(
                "`{program}` still running after {COMMAND_TIMEOUT:?}"
            ));
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut said = String::new();
    if let Some(stderr) = stderr.as_mut() {
        use tokio::io::AsyncReadExt;
        let _ = stderr.read_to_string(&mut said).await;
    }
    Err(format!("`{program}` {status}: {}", said.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("carp-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn sent(path: &Path, mode: u32, content: &str) -> SentFile {
        SentFile {
            path: path.to_owned(),
            mode: Some(mode),
            content: content.into(),
        }
    }

    #[test]
    fn only_regular_files_are_read_so_a_device_never_wedges_the_daemon() {
        let err = read_regular(Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert!(read_regular(Path::new("/")).is_err(), "a directory");
        assert_eq!(read_regular(Path::new("/nonexistent/carp")).unwrap(), None);
        let refused = stage(&[sent(Path::new("/dev/null"), 0o644, "x")], &[]).unwrap_err();
        assert!(refused.contains("not a regular file"), "{refused}");
    }

    #[test]
    fn staged_files_land_with_their_mode_only_on_commit() {
        let dir = dir("commit");
        let (a, b) = (dir.join("a"), dir.join("sub/b"));
        std::fs::write(&a, "old\n").unwrap();
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();
        let staged = stage(&[sent(&a, 0o644, "old\n"), sent(&b, 0o600, "new\n")], &[]).unwrap();
        assert!(!b.exists(), "not in place before the commit");
        let changed = staged.commit().unwrap();
        assert_eq!(changed, std::slice::from_ref(&b), "a was already so");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "new\n");
        let mode = std::fs::metadata(&b).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 2, "a and sub/, no temporary file");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_abandoned_stage_leaves_nothing_and_carps_own_files_are_refused() {
        let dir = dir("abandon");
        let a = dir.join("a");
        drop(stage(&[sent(&a, 0o644, "x")], &[]).unwrap());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let state = dir.join("state");
        let refused = stage(
            &[
                sent(&a, 0o644, "x"),
                sent(&state.join("config-sync/areas.toml"), 0o644, "x"),
            ],
            &[&state],
        )
        .unwrap_err();
        assert!(refused.contains("never synced"), "{refused}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "a's staging gone too"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn reload_after_runs_only_for_named_changed_files_and_reports_failure() {
        let dir = dir("reload");
        let (a, b) = (dir.join("a"), dir.join("b"));
        let marker = dir.join("ran");
        let commands = BTreeMap::from([
            (
                a.clone(),
                vec!["touch".to_owned(), marker.display().to_string()],
            ),
            (b.clone(), vec!["false".to_owned()]),
        ]);
        let outcome = Arc::new(Mutex::new(Some("stale".to_owned())));
        run_reload_after(&commands, &[dir.join("unnamed")], outcome.clone());
        assert_eq!(
            outcome.lock().unwrap().as_deref(),
            Some("stale"),
            "nothing due"
        );
        run_reload_after(&commands, std::slice::from_ref(&a), outcome.clone());
        for _ in 0..100 {
            if outcome.lock().unwrap().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(marker.exists() && outcome.lock().unwrap().is_none());
        run_reload_after(&commands, &[b], outcome.clone());
        for _ in 0..100 {
            if outcome.lock().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let failure = outcome.lock().unwrap().clone().unwrap_or_default();
        assert!(failure.contains("`false` exit status: 1"), "{failure}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
