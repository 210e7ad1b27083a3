//! Deletes the peer has not heard of: flows that ended here while it was away. A bulk update
//! carries what exists, not what ended, so these must outlive the session, and a restart of
//! this daemon too: they are kept in a file of delete frames in the node's state directory,
//! appended to as they come and rewritten only when one is taken back. Sent on reconnect,
//! they stay kept until the peer has shown it read them, so a session or daemon that dies
//! right after the send loses none.

use super::proto::{Frame, delete_frames};
use crate::flow::FlowKey;
use std::{
    collections::HashSet,
    fs::{self, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
};
use tracing::{info, warn};

/// Deletes kept; beyond this, ended flows linger on the peer until their timeout.
pub const MAX_UNSENT_DELETES: usize = 1 << 18;

/// The file in the state directory.
pub const UNSENT_FILE: &str = "sync-unsent-deletes";

#[derive(Debug)]
pub struct UnsentDeletes {
    path: PathBuf,
    keys: HashSet<FlowKey>,
    /// Kept since the file was last written, not in it yet.
    to_append: Vec<FlowKey>,
    /// Sent to the peer, not yet acknowledged.
    in_flight: Vec<FlowKey>,
    /// The file holds keys no longer kept: write it whole.
    rewrite: bool,
    /// Ended flows beyond [`MAX_UNSENT_DELETES`].
    overflow: u64,
}

impl UnsentDeletes {
    /// The deletes kept in `state_dir` by an earlier run, if any. A file that cannot be read
    /// or decoded is reported; what decodes before the damage is kept.
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(UNSENT_FILE);
        let mut keys = HashSet::new();
        match fs::read(&path) {
            Ok(bytes) => {
                if let Err(e) = decode_into(&bytes, &mut keys) {
                    warn!(file = %path.display(), error = %e, "unsent deletes partly unreadable");
                }
                if !keys.is_empty() {
                    info!(
                        flows = keys.len(),
                        "deletes for the peer kept from the last run"
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %path.display(), error = %e, "cannot read unsent deletes"),
        }
        Self {
            path,
            keys,
            to_append: Vec::new(),
            in_flight: Vec::new(),
            rewrite: false,
            overflow: 0,
        }
    }

    /// Keeps `key` for the peer, unless [`MAX_UNSENT_DELETES`] are kept already.
    pub fn insert(&mut self, key: FlowKey) {
        if self.keys.len() >= MAX_UNSENT_DELETES {
            self.overflow += 1;
        } else if self.keys.insert(key) {
            self.to_append.push(key);
        }
    }

    /// The flow is alive again (its tuple reused): the peer must keep it.
    pub fn remove(&mut self, key: &FlowKey) {
        if self.keys.remove(key) {
            self.rewrite = true;
        }
    }

    /// Every kept delete, to send now. They stay kept, on disk too, until
    /// [`Self::acknowledged`].
    pub fn send_all(&mut self) -> Vec<FlowKey> {
        self.in_flight = self.keys.iter().copied().collect();
        self.in_flight.clone()
    }

    /// The peer has read what [`Self::send_all`] returned: those are no longer kept, and the
    /// file goes at the next [`Self::persist`].
    pub fn acknowledged(&mut self) {
        for key in self.in_flight.drain(..) {
            if self.keys.remove(&key) {
                self.rewrite = true;
            }
        }
    }

    /// The session ended before the peer acknowledged: everything stays for the next one.
    pub fn unacknowledged(&mut self) {
        self.in_flight.clear();
    }

    /// Ended flows that could not be kept since the last call.
    pub fn take_overflow(&mut self) -> u64 {
        std::mem::take(&mut self.overflow)
    }

    /// Brings the file up to date: new keys appended, or all rewritten (atomically) after
    /// one was taken back; no file when nothing is kept.
    pub fn persist(&mut self) -> io::Result<()> {
        if self.rewrite {
            self.to_append.clear();
            if self.keys.is_empty() {
                match fs::remove_file(&self.path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            } else {
                let keys: Vec<FlowKey> = self.keys.iter().copied().collect();
                let tmp = self.path.with_extension("tmp");
                self.create_dir()?;
                fs::write(&tmp, encode(&keys))?;
                fs::rename(&tmp, &self.path)?;
            }
            self.rewrite = false;
        } else if !self.to_append.is_empty() {
            self.create_dir()?;
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?
                .write_all(&encode(&self.to_append))?;
            self.to_append.clear();
        }
        Ok(())
    }

    fn create_dir(&self) -> io::Result<()> {
        match self.path.parent() {
            Some(dir) => fs::create_dir_all(dir),
            None => Ok(()),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn encode(keys: &[FlowKey]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in delete_frames(keys) {
        frame.encode(&mut out);
    }
    out
}

/// Decodes delete frames until the end of `bytes` or the first damage (a write cut short
/// by a crash ends in a partial frame).
fn decode_into(mut bytes: &[u8], keys: &mut HashSet<FlowKey>) -> Result<(), String> {
    while !bytes.is_empty() {
        match Frame::decode(bytes) {
            Ok(Some((Frame::Delete { keys: found }, used))) => {
                keys.extend(found);
                bytes = &bytes[used..];
            }
            Ok(Some((other, _))) => return Err(format!("unexpected frame {other:?}")),
            Ok(None) => return Err(format!("{} bytes of a cut-off frame", bytes.len())),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use carp_common::flow::IPPROTO_TCP;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            proto: IPPROTO_TCP,
            src: "198.18.1.100".parse().unwrap(),
            dst: "198.18.2.100".parse().unwrap(),
            src_port: port,
            dst_port: 443,
        }
    }

    /// A state directory of the test's own, removed afterwards.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("carp-unsent-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sorted(mut keys: Vec<FlowKey>) -> Vec<u16> {
        keys.sort_by_key(|k| k.src_port);
        keys.iter().map(|k| k.src_port).collect()
    }

    #[test]
    fn deletes_survive_a_restart_appended_and_rewritten() {
        let dir = Dir::new("restart");
        let mut unsent = UnsentDeletes::load(&dir.0);
        assert!(unsent.is_empty());
        unsent.insert(key(1));
        unsent.insert(key(2));
        unsent.persist().unwrap();
        unsent.insert(key(3));
        unsent.insert(key(2));
        unsent.persist().unwrap();
        // Appended twice: three frames' worth of keys, no duplicate kept.
        let mut again = UnsentDeletes::load(&dir.0);
        assert_eq!(again.len(), 3);
        // One alive again: the file is rewritten without it.
        again.remove(&key(2));
        again.persist().unwrap();
        let mut third = UnsentDeletes::load(&dir.0);
        assert_eq!(sorted(third.send_all()), [1, 3]);
        // Acknowledged by the peer: the file goes.
        third.acknowledged();
        third.persist().unwrap();
        assert!(!dir.0.join(UNSENT_FILE).exists());
        assert!(UnsentDeletes::load(&dir.0).is_empty());
    }

    #[test]
    fn sent_deletes_stay_on_disk_until_the_peer_acknowledges_them() {
        let dir = Dir::new("inflight");
        let mut unsent = UnsentDeletes::load(&dir.0);
        unsent.insert(key(1));
        unsent.insert(key(2));
        unsent.persist().unwrap();
        assert_eq!(sorted(unsent.send_all()), [1, 2]);
        unsent.persist().unwrap();
        // The daemon dies here, before the peer read them: a restart still has them.
        assert_eq!(sorted(UnsentDeletes::load(&dir.0).send_all()), [1, 2]);
        // The session dies instead: the next one sends them again.
        unsent.unacknowledged();
        unsent.insert(key(3));
        assert_eq!(sorted(unsent.send_all()), [1, 2, 3]);
        unsent.insert(key(4));
        unsent.acknowledged();
        unsent.persist().unwrap();
        assert_eq!(unsent.len(), 1, "one ended after the send");
        assert_eq!(sorted(UnsentDeletes::load(&dir.0).send_all()), [4]);
    }

    #[test]
    fn a_write_cut_short_keeps_what_came_before_it() {
        let dir = Dir::new("cut");
        let mut unsent = UnsentDeletes::load(&dir.0);
        unsent.insert(key(7));
        unsent.persist().unwrap();
        unsent.insert(key(8));
        unsent.persist().unwrap();
        let file = dir.0.join(UNSENT_FILE);
        let bytes = fs::read(&file).unwrap();
        fs::write(&file, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(sorted(UnsentDeletes::load(&dir.0).send_all()), [7]);
        fs::write(&file, b"garbage that is no frame").unwrap();
        assert!(UnsentDeletes::load(&dir.0).is_empty());
    }

    #[test]
    fn beyond_the_limit_deletes_are_counted_not_kept() {
        let dir = Dir::new("limit");
        let mut unsent = UnsentDeletes::load(&dir.0);
        for port in 0..=u16::MAX {
            for dst_port in 0..4u16 {
                unsent.insert(FlowKey {
                    dst_port,
                    ..key(port)
                });
            }
        }
        unsent.insert(key(1));
        assert_eq!(unsent.len(), MAX_UNSENT_DELETES);
        assert_eq!(unsent.take_overflow(), 1);
        assert_eq!(unsent.take_overflow(), 0);
    }
}
