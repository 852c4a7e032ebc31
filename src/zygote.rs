//! The zygote: a small single-threaded helper (our binary in `zygote` mode) started once by
//! berthd, which forks the per-pod processes on request. Forking a tiny single-threaded process
//! costs a fraction of a millisecond and leaves the child clean, where exec'ing the daemon's
//! binary costs milliseconds and forking the multi-threaded daemon is unsafe.
//!
//! Protocol: berthd writes one request per datagram on a SOCK_SEQPACKET socket pair, the
//! zygote answers one datagram `ok <pid>` or `err <message>`. When berthd goes away the socket
//! reads EOF and the zygote exits; what it forked lives on (reparented, as with any daemon).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Stdio;

use tokio::sync::Mutex;

/// The fd the zygote finds its end of the socket pair on.
const ZYGOTE_FD: RawFd = 3;

/// What berthd can ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A pod init: PID 1 of a new PID namespace.
    PodInit,
    /// A pod's monitor, listening on `socket`, keeping libcontainer state under `lc_root`.
    Monitor {
        /// The pod.
        pod_id: String,
        /// Where it listens.
        socket: String,
        /// libcontainer's state directory.
        lc_root: String,
    },
}

impl Request {
    fn encode(&self) -> Vec<u8> {
        match self {
            Request::PodInit => b"pod-init".to_vec(),
            Request::Monitor {
                pod_id,
                socket,
                lc_root,
            } => format!("monitor\0{pod_id}\0{socket}\0{lc_root}").into_bytes(),
        }
    }

    fn decode(b: &[u8]) -> Option<Request> {
        let s = std::str::from_utf8(b).ok()?;
        let mut parts = s.split('\0');
        match parts.next()? {
            "pod-init" => Some(Request::PodInit),
            "monitor" => Some(Request::Monitor {
                pod_id: parts.next()?.to_string(),
                socket: parts.next()?.to_string(),
                lc_root: parts.next()?.to_string(),
            }),
            _ => None,
        }
    }
}

/// Entry point of `berthd zygote`. Single-threaded: forking is safe here.
pub fn main() -> ! {
    let _ = nix::unistd::setsid();
    // The zygote never waits for its children: the kernel reaps them when they exit.
    // SAFETY: installing SIG_IGN has no handler code to be unsound; single-threaded process.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
    }
    let mut buf = [0u8; 256];
    loop {
        // SAFETY: ZYGOTE_FD is the socket berthd passed; buf is valid for its length.
        let n = unsafe { libc::recv(ZYGOTE_FD, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n == 0 {
            std::process::exit(0);
        }
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            std::process::exit(1);
        }
        let spawned = match Request::decode(&buf[..n as usize]) {
            Some(Request::PodInit) => spawn_pod_init(),
            Some(Request::Monitor {
                pod_id,
                socket,
                lc_root,
            }) => spawn_monitor(pod_id, &socket, lc_root),
            None => Err(io::Error::other("unknown request")),
        };
        let answer = match spawned {
            Ok(pid) => format!("ok {pid}"),
            Err(e) => format!("err {e}"),
        };
        // SAFETY: as above; the answer buffer is valid for its length.
        unsafe {
            libc::send(
                ZYGOTE_FD,
                answer.as_ptr().cast(),
                answer.len(),
                libc::MSG_NOSIGNAL,
            );
        }
    }
}

/// Forks a child in a new PID namespace (it is PID 1 there) that runs the pod init.
fn spawn_pod_init() -> io::Result<i32> {
    // The init is PID 1 of its namespace: signals without a handler would be dropped, so the
    // ones it waits for are blocked from its first instant (the mask is inherited).
    let waited = crate::sandbox::init::waited_signals();
    let _ = waited.thread_block();
    // SAFETY: raw clone(2) without CLONE_VM is fork with flags; the zygote has one thread, so
    // the child's copy of its memory is consistent.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::CLONE_NEWPID | libc::SIGCHLD,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid != 0 {
        let _ = waited.thread_unblock();
    }
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            detach_stdio();
            crate::sandbox::init::run()
        }
        pid => Ok(pid as i32),
    }
}

/// Binds the monitor's socket, then forks the monitor, which inherits it: berthd can connect
/// as soon as this answers.
fn spawn_monitor(pod_id: String, socket: &str, lc_root: String) -> io::Result<i32> {
    let listener = crate::monitor::server::bind(std::path::Path::new(socket))?;
    // SAFETY: a plain fork of this single-threaded process.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Child => {
            detach_stdio();
            let _ = nix::unistd::setsid();
            crate::monitor::server::run(pod_id, listener, lc_root.into())
        }
        nix::unistd::ForkResult::Parent { child } => Ok(child.as_raw()),
    }
}

/// In a forked child: stdio to /dev/null and the zygote's socket closed, so nothing of the
/// zygote or berthd is held open by the child; default signal dispositions.
pub fn detach_stdio() {
    // SAFETY: plain syscalls on fds this process owns; single-threaded child.
    unsafe {
        libc::close(ZYGOTE_FD);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            if null > 2 {
                libc::close(null);
            }
        }
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
    }
}

/// berthd's side: the zygote process and the socket to it; restarted if it dies.
pub struct Zygote {
    chan: Mutex<Option<(OwnedFd, tokio::process::Child)>>,
}

impl Default for Zygote {
    fn default() -> Self {
        Zygote {
            chan: Mutex::new(None),
        }
    }
}

impl Zygote {
    fn start() -> io::Result<(OwnedFd, tokio::process::Child)> {
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )?;
        let theirs_raw = theirs.as_raw_fd();
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        cmd.arg("zygote")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: between fork and exec only dup2(2) runs, which is async-signal-safe; it puts
        // the zygote's end of the socket pair at fd 3 without CLOEXEC.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(theirs_raw, ZYGOTE_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        Ok((ours, child))
    }

    /// Asks the zygote for a process; returns its pid.
    pub async fn spawn(&self, req: Request) -> io::Result<i32> {
        let mut chan = self.chan.lock().await;
        for attempt in 0..2 {
            if chan.is_none() {
                *chan = Some(Zygote::start()?);
            }
            let fd = chan.as_ref().expect("started above").0.as_raw_fd();
            let r = tokio::task::block_in_place(|| exchange(fd, &req));
            match r {
                Ok(answer) => return parse_answer(&answer),
                // The zygote died: start a new one and try once more.
                Err(e) if attempt == 0 => {
                    tracing::warn!(error = %e, "the zygote is gone; starting a new one");
                    *chan = None;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns on its second pass")
    }
}

fn exchange(fd: RawFd, req: &Request) -> io::Result<Vec<u8>> {
    let msg = req.encode();
    // SAFETY: fd is the open socket owned by `Zygote`; the buffers are valid for their lengths.
    let sent = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 512];
    // SAFETY: as above.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    match n {
        0 => Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the zygote closed its socket",
        )),
        n if n < 0 => Err(io::Error::last_os_error()),
        n => {
            buf.truncate(n as usize);
            Ok(buf)
        }
    }
}

fn parse_answer(a: &[u8]) -> io::Result<i32> {
    let s = String::from_utf8_lossy(a);
    if let Some(pid) = s.strip_prefix("ok ") {
        return pid
            .trim()
            .parse()
            .map_err(|_| io::Error::other(format!("zygote answered {s:?}")));
    }
    Err(io::Error::other(format!(
        "zygote: {}",
        s.strip_prefix("err ").unwrap_or(&s)
    )))
}
