//! The monitor process's life: what it sets up when the zygote forks it (subreaper, signals,
//! the procfs cache off), the sources it starts with (its socket, SIGCHLD, the greeting
//! deadline), then the event loop.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::event_loop::serve;
use super::state::Monitor;

/// A monitor that berthd never greets exits after this long (berthd died before recording it).
const HELLO_WITHIN: Duration = Duration::from_secs(60);

/// Entry point of a monitor, in the zygote's forked child. `listener` is already bound.
pub fn run(pod_id: String, listener: UnixListener, lc_root: PathBuf) -> ! {
    // Containers' inits are grandchildren (libcontainer forks an intermediate): they are
    // reparented here, so this process reaps them and learns their exit status.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let _ = std::fs::create_dir_all(&lc_root);
    let Ok(procfs) = super::helper::procfs_cache() else {
        // libcontainer cannot work without a procfs handle: no container can be made.
        std::process::exit(1);
    };
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.add(Signal::SIGPIPE);
    let _ = mask.thread_block();
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let sigfd = match SignalFd::with_flags(&chld, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
        Ok(s) => s,
        Err(_) => std::process::exit(1),
    };
    let _ = listener.set_nonblocking(true);
    let mut m = Monitor::new(pod_id, lc_root, procfs);
    m.watch(listener.as_raw_fd(), libc::POLLIN, move |m, _| {
        m.accept(&listener)
    });
    m.watch(sigfd.as_fd().as_raw_fd(), libc::POLLIN, move |m, _| {
        while let Ok(Some(_)) = sigfd.read_signal() {}
        m.reap();
    });
    m.after(Instant::now() + HELLO_WITHIN, |m| {
        if !m.greeted && m.ctrs.is_empty() {
            std::process::exit(0);
        }
    });
    serve(&mut m)
}
