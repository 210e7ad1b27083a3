//! Sync's threads must not die quietly: a job that panics is caught, logged as an error,
//! counted in `carp status`, and the thread goes on with fresh state. Locks they share are
//! taken poison-tolerant, so one panic never takes the other threads down with it.

use serde::{Deserialize, Serialize};
use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{Mutex, MutexGuard, PoisonError},
};
use tracing::error;

/// A thread as `carp status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub name: String,
    /// Whether the thread still takes work.
    pub alive: bool,
    /// Jobs that panicked; the thread went on after each.
    pub panics: u64,
    pub last_panic: Option<String>,
}

/// A thread's health, shared with the status.
#[derive(Debug)]
pub struct Worker {
    status: Mutex<WorkerStatus>,
}

impl Worker {
    pub fn new(name: &str) -> Self {
        Self {
            status: Mutex::new(WorkerStatus {
                name: name.to_owned(),
                alive: true,
                ..WorkerStatus::default()
            }),
        }
    }

    /// Runs one job; `None` if it panicked (logged and counted): the caller starts afresh.
    pub fn guard<R>(&self, job: impl FnOnce() -> R) -> Option<R> {
        match catch_unwind(AssertUnwindSafe(job)) {
            Ok(result) => Some(result),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                let mut status = lock(&self.status);
                status.panics += 1;
                error!(thread = %status.name, panic = %message, "sync thread panicked: restarting it with fresh state");
                status.last_panic = Some(message);
                None
            }
        }
    }

    /// The thread ended (its inbox closed).
    pub fn exited(&self) {
        lock(&self.status).alive = false;
    }

    pub fn status(&self) -> WorkerStatus {
        lock(&self.status).clone()
    }
}

/// Locks `mutex` even if a thread panicked while holding it: the data are counters and
/// tables that stay usable, and stopping here would stop sync altogether.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_panicking_job_is_counted_and_the_next_one_runs() {
        let worker = Worker::new("test");
        assert_eq!(worker.guard(|| 1), Some(1));
        assert_eq!(worker.guard(|| -> i32 { panic!("boom") }), None);
        assert_eq!(worker.guard(|| 2), Some(2));
        let status = worker.status();
        assert_eq!(status.panics, 1);
        assert_eq!(status.last_panic.as_deref(), Some("boom"));
        assert!(status.alive);
        worker.exited();
        assert!(!worker.status().alive);
    }

    #[test]
    fn a_lock_poisoned_by_a_panic_is_still_usable() {
        let shared = Arc::new(Mutex::new(5));
        let held = shared.clone();
        let _ = std::thread::spawn(move || {
            let _guard = held.lock().unwrap();
            panic!("while holding the lock");
        })
        .join();
        assert!(shared.is_poisoned());
        *lock(&shared) += 1;
        assert_eq!(*lock(&shared), 6);
    }
}
