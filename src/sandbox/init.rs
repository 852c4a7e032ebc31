//! The infra init of a pod that shares one PID namespace: PID 1 of that namespace, forked by
//! the zygote (see `crate::zygote`). It lets the kernel reap the orphans reparented to it and
//! exits on SIGTERM. It first waits (60 s at most) for berthd's SIGUSR1, sent once the pod is
//! recorded: if berthd dies before that, the init exits by itself and is never orphaned.

use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

use crate::zygote::{Request, Zygote};

/// How long an unconfirmed init waits for berthd.
const CONFIRM_WITHIN: Duration = Duration::from_secs(60);

/// The signals the init waits for; the zygote blocks them before forking it.
pub fn waited_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGUSR1, Signal::SIGTERM, Signal::SIGINT] {
        set.add(s);
    }
    set
}

/// The init's life, in the zygote's forked child.
pub fn run() -> ! {
    let _ = nix::sys::prctl::set_name(c"berth-init");
    // Orphans reparented to this PID 1 are reaped by the kernel: no zombies, no wait loop.
    // SAFETY: SIG_IGN installs no handler code; this process has one thread.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
    }
    let set = waited_signals();
    let ts = libc::timespec {
        tv_sec: CONFIRM_WITHIN.as_secs() as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: `set` is a valid sigset_t; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    if sig != libc::SIGUSR1 {
        std::process::exit(1);
    }
    loop {
        if let Ok(Signal::SIGTERM | Signal::SIGINT) = set.wait() {
            std::process::exit(0);
        }
    }
}

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

/// Starts a pod init.
pub async fn launch(zygote: &Zygote) -> std::io::Result<Launched> {
    let pid = zygote.spawn(Request::PodInit).await?;
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
    if start_time(pid) != Some(start) {
        return;
    }
    let Some(rpid) = rustix::process::Pid::from_raw(pid) else {
        return;
    };
    // A pidfd names this process for good: signals and the wait cannot hit a reused pid.
    let Ok(fd) = rustix::process::pidfd_open(rpid, rustix::process::PidfdFlags::empty()) else {
        return;
    };
    if start_time(pid) != Some(start) {
        return;
    }
    let _ = rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL);
    // A pidfd turns readable when its process exits.
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and the same for
    // the AsyncFd's whole life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    };
    if let Ok(afd) = registered {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), afd.readable()).await;
    }
}

/// Kills a process (if `pid` is still it) without waiting for it.
pub fn kill_now(pid: i32, start: u64) {
    if start_time(pid) == Some(start) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
}
