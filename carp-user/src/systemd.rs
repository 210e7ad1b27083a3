//! systemd's service protocol, spoken directly: READY once the election is armed,
//! RELOADING around a reload, STOPPING, and the watchdog pinged from the main loop (a hung
//! daemon stops pinging and systemd restarts it). Nothing happens outside systemd.

use std::{
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};

/// Sends `state` (`READY=1`, ...) to systemd; false when not run by it or the send failed.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return false;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        None => socket.send_to(state.as_bytes(), &path),
    };
    sent.is_ok()
}

/// The watchdog: systemd's interval (WATCHDOG_USEC, for this process), pinged at half of it.
#[derive(Debug)]
pub struct Watchdog {
    every: Duration,
    last: Instant,
}

impl Watchdog {
    /// The watchdog systemd asks for, if any.
    pub fn from_env() -> Option<Self> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        (for_us && usec > 0).then(|| Self {
            every: Duration::from_micros(usec) / 2,
            last: Instant::now() - Duration::from_micros(usec),
        })
    }

    /// Pings if half the interval has passed since the last ping.
    pub fn tick(&mut self, now: Instant) {
        if now.duration_since(self.last) >= self.every {
            notify("WATCHDOG=1");
            self.last = now;
        }
    }
}

/// Whether stderr goes to the journal (systemd sets JOURNAL_STREAM for a service).
pub fn logs_to_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The datagrams reach a socket named as systemd names it (a path, or abstract with @).
    #[test]
    fn notifications_reach_the_socket_systemd_names() {
        let dir = std::env::temp_dir().join(format!("carp-sd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        // SAFETY: this test's own variables, read in this thread only.
        unsafe {
            std::env::set_var("NOTIFY_SOCKET", &path);
            std::env::set_var("WATCHDOG_USEC", "2000000");
            std::env::remove_var("WATCHDOG_PID");
        }
        assert!(notify("READY=1"));
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let mut watchdog = Watchdog::from_env().expect("a watchdog");
        let now = Instant::now();
        watchdog.tick(now);
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        watchdog.tick(now + Duration::from_millis(500));
        listener.set_nonblocking(true).unwrap();
        assert!(
            listener.recv(&mut buf).is_err(),
            "not before half the interval"
        );
        unsafe {
            std::env::set_var("NOTIFY_SOCKET", "@carp-test-abstract");
        }
        let abstract_listener = {
            use std::os::linux::net::SocketAddrExt;
            let addr =
                std::os::unix::net::SocketAddr::from_abstract_name(b"carp-test-abstract").unwrap();
            UnixDatagram::bind_addr(&addr).unwrap()
        };
        assert!(notify("STOPPING=1"));
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::remove_var("WATCHDOG_USEC");
        }
        assert!(!notify("READY=1"), "outside systemd nothing is sent");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
