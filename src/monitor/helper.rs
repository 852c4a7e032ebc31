//! Where libcontainer runs: a short-lived child of the monitor holding only what the
//! container's processes may inherit, and pathrs's procfs cache disabled. Both keep what a pod
//! can trace (a container waiting for Start, a process ExecSync is starting) from holding
//! anything of the monitor or the node.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::wait::waitpid;

use super::io::pipe;

/// Runs `build` (a libcontainer create or exec, which forks the container's processes) in a
/// short-lived child of the monitor whose descriptors are only 0-2 and `keep`, and returns the
/// pid it reports. A process libcontainer forks holds a copy of its parent's descriptor table
/// until it execs the container's command (close-on-exec acts only then); a container created
/// but not started waits in the pod's PID namespace for that long. Forked from the monitor
/// itself, it would hold the monitor's socket, berthd's connections, and the other containers'
/// logs and pipes for any process of the pod allowed to trace it. The child also takes
/// libcontainer's parsing and allocations with it when it exits.
pub(super) fn in_helper(
    title: &str,
    keep: &[RawFd],
    procfs: (RawFd, bool),
    build: impl FnOnce() -> Result<i32, String>,
) -> Result<i32, String> {
    let (result_r, result_w) = pipe().map_err(|e| format!("helper pipe: {e}"))?;
    let (errors_r, errors_w) = pipe().map_err(|e| format!("helper pipe: {e}"))?;
    // SAFETY: the monitor is single-threaded, so the child's copy of its memory is consistent.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("forking a helper: {e}"))? {
        nix::unistd::ForkResult::Child => {
            let (cached, shielded) = procfs;
            if shielded && let Err(e) = shield(cached) {
                let _ = rustix::io::write(&result_w, format!("err shielding: {e}\n").as_bytes());
                // SAFETY: _exit ends the child without running the monitor's destructors.
                unsafe { libc::_exit(0) }
            }
            let mut fds: Vec<RawFd> = keep.to_vec();
            fds.extend([
                0,
                1,
                2,
                cached,
                result_w.as_raw_fd(),
                errors_r.as_raw_fd(),
                errors_w.as_raw_fd(),
            ]);
            close_all_but(&mut fds);
            let mut errors_r = errors_r;
            log_errors_to(errors_w);
            // What the processes it forks show until they exec.
            crate::proctitle::set(c"berth-helper", title);
            // The helper is not the processes' parent for long: they are reparented to the
            // monitor (the subreaper) when it exits.
            let answer = match build() {
                Ok(pid) => format!("ok {pid}\n"),
                Err(e) => {
                    let detail = logged_errors(&mut errors_r);
                    let e = if detail.is_empty() {
                        e
                    } else {
                        format!("{e} ({detail})")
                    };
                    format!("err {}\n", e.replace('\n', " "))
                }
            };
            let _ = rustix::io::write(&result_w, answer.as_bytes());
            // SAFETY: _exit ends the child without running the monitor's destructors.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(result_w);
            drop((errors_r, errors_w));
            // Up to the newline, not to the end of file: the processes libcontainer forked
            // hold the write end (close-on-exec) until they exec.
            let mut answer = Vec::new();
            let mut r = result_r;
            let mut b = [0u8; 512];
            while !answer.ends_with(b"\n") {
                match r.read(&mut b) {
                    Ok(0) => break,
                    Ok(n) => answer.extend_from_slice(&b[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = waitpid(child, None);
            let answer = String::from_utf8_lossy(&answer).trim_end().to_string();
            match answer.split_once(' ') {
                Some(("ok", pid)) => pid
                    .parse()
                    .map_err(|_| format!("the helper answered {answer:?}")),
                Some(("err", e)) => Err(e.to_string()),
                _ => Err("the helper died without an answer".into()),
            }
        }
    }
}

/// libcontainer's forked processes say why they failed only in a log event (their error
/// crosses back to the caller as its top-level message, "failed to prepare rootfs"): the
/// helper sends error events to a pipe, from which a failure takes its detail. Non-blocking,
/// so a full pipe drops events rather than stalling a container's setup.
fn log_errors_to(w: std::os::fd::OwnedFd) {
    let _ = nix::fcntl::fcntl(
        &w,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(File::from(w)))
        .with_max_level(tracing::Level::ERROR)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_level(false)
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// What the error events in the pipe say, on one line, the latest kept when too long.
fn logged_errors(r: &mut File) -> String {
    let _ = nix::fcntl::fcntl(
        &*r,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut all = Vec::new();
    let mut b = [0u8; 4096];
    while let Ok(n) = r.read(&mut b) {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&b[..n]);
        if all.len() > 64 * 1024 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&all);
    let line = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    const MAX: usize = 2048;
    if line.len() > MAX {
        let mut start = line.len() - MAX;
        while !line.is_char_boundary(start) {
            start += 1;
        }
        format!("…{}", &line[start..])
    } else {
        line
    }
}

/// pathrs (libcontainer's path library) caches one handle on a procfs of the node's PID
/// namespace for the life of a process, and every process libcontainer forks holds it until it
/// execs: a container created but not yet started, or a process ExecSync is starting. Whoever
/// can trace such a process could take `/proc/<node pid>/root`, the node's root. The monitor
/// makes the cache once (`procfs_cache`); a helper that is `shielded` replaces its descriptor
/// by /dev/null, which pathrs then refuses (and opens a handle per operation, closed after
/// it: slower, ~5 ms a create); an unshielded one keeps it, for processes nothing of the pod
/// can trace before they exec.
pub fn procfs_cache() -> std::io::Result<RawFd> {
    let handle = pathrs::procfs::ProcfsHandle::new().map_err(std::io::Error::other)?;
    Ok(handle.as_fd().as_raw_fd())
}

/// In a helper that must be shielded: the cached procfs descriptor becomes /dev/null
/// (close-on-exec), and pathrs is checked to have let go of it.
fn shield(cached: RawFd) -> std::io::Result<()> {
    let null = File::open("/dev/null")?;
    // SAFETY: `cached` is pathrs's cache slot, which it only ever borrows (and validates
    // before each use); putting another open file at that number cannot make any owner in
    // this process close or misuse a descriptor it does not own.
    unsafe { nix::unistd::dup3_raw(&null, cached, nix::fcntl::OFlag::O_CLOEXEC) }?;
    let probe = pathrs::procfs::ProcfsHandle::new().map_err(std::io::Error::other)?;
    if probe.as_fd().as_raw_fd() == cached {
        return Err(std::io::Error::other(
            "pathrs kept using its cached procfs handle",
        ));
    }
    Ok(())
}

/// Closes every descriptor of this process but those in `keep`.
fn close_all_but(keep: &mut Vec<RawFd>) {
    keep.sort_unstable();
    keep.dedup();
    let mut next: u32 = 0;
    for &k in keep.iter() {
        let k = k as u32;
        if k > next {
            // SAFETY: close_range only closes descriptors, none of which is used afterwards
            // in this (forked, about to run libcontainer) process but those kept.
            unsafe {
                libc::syscall(libc::SYS_close_range, next, k - 1, 0u32);
            }
        }
        next = k + 1;
    }
    // SAFETY: as above.
    unsafe {
        libc::syscall(libc::SYS_close_range, next, u32::MAX, 0u32);
    }
}
