//! berthd's side of a pod's infra init (the process itself is `crate::zygote::pod_init`):
//! launching it through the zygote, confirming it once the pod is recorded, killing it at
//! StopPodSandbox, and telling a live init from a reused pid by its start time.

use std::path::PathBuf;

use nix::sys::signal::Signal;

use crate::zygote::{Request, Zygote};

/// A pod init, forked and waiting for its confirmation.
pub struct Launched {
    /// Its pid in berthd's PID namespace.
    pub pid: i32,
    /// Its start time (clock ticks since boot), which tells it apart from a later process that
    /// reuses the pid.
    pub start_time: u64,
}

impl Launched {
    /// Lets the init settle down for good (called once it is recorded).
    pub fn confirm(self) {
        if start_time(self.pid) == Some(self.start_time) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), Signal::SIGUSR1);
        }
    }
}

/// Starts the init of pod `pod_id`, joining the namespaces pinned at `pins` (kind, path).
pub async fn launch(
    zygote: &Zygote,
    pod_id: &str,
    pins: Vec<(String, PathBuf)>,
) -> std::io::Result<Launched> {
    let pid = zygote
        .spawn(Request::PodInit {
            pod_id: pod_id.to_string(),
            pins,
        })
        .await?;
    let start_time =
        start_time(pid).ok_or_else(|| std::io::Error::other(format!("pod init {pid} vanished")))?;
    Ok(Launched { pid, start_time })
}

/// A live process's start time from /proc/PID/stat (field 22); `None` if there is no such
/// process or it is a zombie (dead, waiting for its parent to reap it).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    if matches!(fields.next(), Some("Z") | Some("X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Kills the init (and with it every process of its PID namespace) if `pid` is still it, and
/// waits (up to 2 s) until it has exited, so its cgroup can be removed right after.
pub async fn kill(pid: i32, start: u64) {
    let Some(fd) = pidfd(pid, start) else {
        return;
    };
    let _ = rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL);
    wait_exit(fd, std::time::Duration::from_secs(2)).await;
}

/// Whether process `pid` (started at `start`) is gone or exits within `timeout`. A process
/// whose descriptors just closed may still be exiting: its pidfd turns readable once it has.
pub async fn exits_within(pid: i32, start: u64, timeout: std::time::Duration) -> bool {
    match pidfd(pid, start) {
        Some(fd) => wait_exit(fd, timeout).await,
        None => true,
    }
}

/// A pidfd of `pid` if it is still the process started at `start`. A pidfd names the process
/// for good: signals and waits through it cannot hit a reused pid.
fn pidfd(pid: i32, start: u64) -> Option<std::os::fd::OwnedFd> {
    if start_time(pid) != Some(start) {
        return None;
    }
    let rpid = rustix::process::Pid::from_raw(pid)?;
    let fd = rustix::process::pidfd_open(rpid, rustix::process::PidfdFlags::empty()).ok()?;
    // Checked again: the pid could have been reused between the first check and the open.
    (start_time(pid) == Some(start)).then_some(fd)
}

/// Waits until the pidfd's process has exited (it turns readable); false after `timeout`.
async fn wait_exit(fd: std::os::fd::OwnedFd, timeout: std::time::Duration) -> bool {
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and the same for
    // the AsyncFd's whole life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    };
    match registered {
        Ok(afd) => tokio::time::timeout(timeout, afd.readable()).await.is_ok(),
        Err(_) => false,
    }
}

/// Kills a process (if `pid` is still it) without waiting for it.
pub fn kill_now(pid: i32, start: u64) {
    if start_time(pid) == Some(start) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
}
