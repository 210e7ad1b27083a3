//! Listening sockets handed from one run of the daemon to the next across `carp upgrade`, an
//! exec of the (new) binary in place, as nginx and HAProxy upgrade: the CLI and the sync
//! peer queue on the same sockets instead of finding none.

use nix::{
    fcntl::{FcntlArg, FdFlag, fcntl},
    sys::socket::{getsockopt, sockopt::AcceptConn},
};
use std::{
    ffi::OsString,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    path::PathBuf,
    process::Command,
};
use tracing::warn;

/// The control socket's descriptor, in the new run's environment.
pub const CONTROL: &str = "CARP_INHERITED_CONTROL_FD";
/// The sync listener's descriptor.
pub const SYNC: &str = "CARP_INHERITED_SYNC_FD";

/// The listening socket the previous run left under `var`, if any; it is closed on any
/// later exec (a child such as `nft` never gets it).
pub fn take(var: &str) -> Option<OwnedFd> {
    let raw: RawFd = std::env::var(var).ok()?.parse().ok()?;
    // SAFETY: only borrowed for the check; nothing closes it meanwhile.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    if !getsockopt(&borrowed, AcceptConn).unwrap_or(false) {
        warn!(
            var,
            fd = raw,
            "inherited descriptor is no listening socket: ignored"
        );
        return None;
    }
    // SAFETY: the previous run handed this listening socket over (checked above), and this
    // process opened nothing at that number before taking it: it is ours to own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if let Err(e) = fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
        warn!(var, error = %e, "cannot mark the inherited socket close-on-exec");
    }
    Some(fd)
}

/// Copies `socket` for the next run: the copy is not close-on-exec.
pub fn hand_over(socket: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let copy = nix::unistd::dup(socket)?;
    Ok(copy)
}

/// Replaces this process with the binary at its own path (the new one after a package
/// upgrade) and the same arguments, handing over `sockets` as `(variable, descriptor)`.
/// Returns only if the exec failed.
pub fn exec_self(sockets: &[(&str, &OwnedFd)]) -> std::io::Error {
    let exe = match own_binary() {
        Ok(exe) => exe,
        Err(e) => return e,
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut command = Command::new(exe);
    command.args(args);
    for (var, fd) in sockets {
        command.env(var, fd.as_raw_fd().to_string());
    }
    command.exec()
}

/// This binary's path; after a package replaced the file, /proc/self/exe reads
/// `PATH (deleted)`, and PATH is the new binary.
fn own_binary() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_over_listener_is_taken_and_anything_else_is_ignored() {
        let path = std::env::temp_dir().join(format!("carp-inherit-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let copy = hand_over(listener.as_fd()).unwrap();
        let flags = fcntl(copy.as_fd(), FcntlArg::F_GETFD).unwrap();
        assert_eq!(
            flags & FdFlag::FD_CLOEXEC.bits(),
            0,
            "the copy survives exec"
        );
        let var = "CARP_TEST_INHERIT_FD";
        // SAFETY: this test alone reads or writes this variable.
        unsafe { std::env::set_var(var, copy.as_raw_fd().to_string()) };
        let raw = copy.as_raw_fd();
        std::mem::forget(copy);
        let taken = take(var).expect("a listening socket");
        assert_eq!(taken.as_raw_fd(), raw);
        let flags = fcntl(taken.as_fd(), FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & FdFlag::FD_CLOEXEC.bits(),
            0,
            "not passed to children"
        );
        // A file is no listening socket.
        let file = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: as above.
        unsafe { std::env::set_var(var, file.as_raw_fd().to_string()) };
        assert!(take(var).is_none());
        drop(file);
        std::fs::remove_file(path).unwrap();
    }
}
