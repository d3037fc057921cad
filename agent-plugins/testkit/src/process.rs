//! Waiting for a process that is not the caller's child to end.
//!
//! A test that kills a process group (a script and what it started) cannot `wait` for the
//! grandchildren, and SIGKILL is delivered asynchronously: right after `kill` a loaded machine
//! can still show the process running. A pidfd becomes readable when the process terminates,
//! whoever its parent is, so waiting on it is an event rather than a poll of `/proc`.

use std::time::Duration;

/// Whether process `pid` has terminated (or never existed) within `timeout`. A zombie counts as
/// terminated: it runs no code, its parent just has not reaped it yet.
pub fn exits_within(pid: i32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open(2) takes plain integers and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        // ESRCH: no such process (already reaped), the strongest form of "gone".
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ESRCH),
            "pidfd_open({pid}): {err}"
        );
        return true;
    }
    let fd = fd as libc::c_int;
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `poll` points at one valid pollfd for the duration of the call; `fd` is ours and
    // closed exactly once.
    let ready = unsafe { libc::poll(&mut poll, 1, millis) };
    unsafe { libc::close(fd) };
    assert!(
        ready >= 0,
        "poll on pidfd of {pid}: {}",
        std::io::Error::last_os_error()
    );
    ready == 1
}

/// What `/proc/<pid>/stat` says of the process, for failure messages.
pub fn describe(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|_| format!("{pid}: no such process"))
}

/// Panics unless process `pid` (named `what` in the message) terminates within `timeout`.
pub fn assert_exits(pid: i32, timeout: Duration, what: &str) {
    assert!(
        exits_within(pid, timeout),
        "{what} (pid {pid}) still runs after {timeout:?}: {}",
        describe(pid)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_is_seen_running_and_its_end_is_seen() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        assert!(!exits_within(pid, Duration::from_millis(100)));
        child.kill().unwrap();
        // Not reaped yet: a zombie has ended.
        assert!(
            exits_within(pid, Duration::from_secs(10)),
            "{}",
            describe(pid)
        );
        child.wait().unwrap();
        // Reaped: no such process.
        assert!(exits_within(pid, Duration::from_millis(1)));
    }
}
