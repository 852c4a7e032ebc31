//! The zygote: a small single-threaded helper (our binary in `zygote` mode) started once by
//! berthd, which forks the per-pod processes on request. Forking a tiny single-threaded process
//! costs a fraction of a millisecond and leaves the child clean, where exec'ing the daemon's
//! binary costs milliseconds and forking the multi-threaded daemon is unsafe.
//!
//! Protocol: berthd writes one request per datagram on a SOCK_SEQPACKET socket pair, the
//! zygote answers one datagram `ok <pid>` or `err <message>`. When berthd goes away the socket
//! reads EOF and the zygote exits; what it forked lives on (reparented, as with any daemon).
//!
//! What the zygote's children inherit is chosen with pods in mind, because a pod can see some
//! of them (the pod init is PID 1 of a shared PID namespace; containers are forked from the
//! monitor): the zygote runs from a read-only, detached mount of berthd's binary (so
//! `/proc/PID/exe` never opens a writable node file), with an empty environment and no open
//! file but its socket.

pub mod pod_init;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;

use tokio::sync::Mutex;

/// The fd the zygote finds its end of the socket pair on.
const ZYGOTE_FD: RawFd = 3;
/// The largest request: a pod id and a few paths under the state directory.
const MAX_REQUEST: usize = 8192;

/// What berthd can ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A pod init: PID 1 of a new PID namespace, joining the pod's pinned namespaces.
    PodInit {
        /// The pod (for the process title).
        pod_id: String,
        /// The pod's namespaces to join: kind (`net`, `ipc`, `uts`, and `user` for a pod
        /// with a user namespace of its own, whose PID namespace it then owns) and pin path;
        /// with `user`, kind `init-id` gives the uid/gid the init takes (its "path").
        pins: Vec<(String, PathBuf)>,
    },
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
        let parts: Vec<String> = match self {
            Request::PodInit { pod_id, pins } => {
                let mut v = vec!["pod-init".to_string(), pod_id.clone()];
                for (kind, path) in pins {
                    v.push(kind.clone());
                    v.push(path.to_string_lossy().into_owned());
                }
                v
            }
            Request::Monitor {
                pod_id,
                socket,
                lc_root,
            } => vec![
                "monitor".into(),
                pod_id.clone(),
                socket.clone(),
                lc_root.clone(),
            ],
        };
        parts.join("\0").into_bytes()
    }

    fn decode(b: &[u8]) -> Option<Request> {
        let s = std::str::from_utf8(b).ok()?;
        let mut parts = s.split('\0');
        match parts.next()? {
            "pod-init" => {
                let pod_id = parts.next()?.to_string();
                let rest: Vec<&str> = parts.collect();
                if !rest.len().is_multiple_of(2) {
                    return None;
                }
                let pins = rest
                    .chunks(2)
                    .map(|c| (c[0].to_string(), PathBuf::from(c[1])))
                    .collect();
                Some(Request::PodInit { pod_id, pins })
            }
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
    crate::proctitle::set(c"berth-zygote", "berth-zygote");
    let _ = nix::unistd::setsid();
    // The zygote never waits for its children: the kernel reaps them when they exit.
    // SAFETY: installing SIG_IGN has no handler code to be unsound; single-threaded process.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
    }
    // The copy base of every pod init's mount namespace; without it (an older kernel, say)
    // each init copies the node's tree instead, which is slower but as empty in the end.
    let template = match pod_init::template_namespace() {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("berth-zygote: no template mount namespace for pod inits: {e}");
            None
        }
    };
    let mut buf = vec![0u8; MAX_REQUEST];
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
            Some(Request::PodInit { pod_id, pins }) => {
                spawn_pod_init(&pod_id, &pins, template.as_ref())
            }
            Some(Request::Monitor {
                pod_id,
                socket,
                lc_root,
            }) => spawn_monitor(pod_id, &socket, lc_root, template.as_ref()),
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

/// Forks a child in a new PID namespace (it is PID 1 there) that confines itself and runs the
/// pod init; answers once the child reported that its confinement is complete. With a `user`
/// pin the PID namespace is made inside that user namespace (`pod_init::run_in_user_namespace`).
fn spawn_pod_init(
    pod_id: &str,
    pins: &[(String, PathBuf)],
    template: Option<&OwnedFd>,
) -> io::Result<i32> {
    let user = pins
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, p)| p.clone());
    if let Some(user) = user {
        let id = pins
            .iter()
            .find(|(k, _)| k == "init-id")
            .and_then(|(_, v)| v.to_str()?.parse().ok())
            .unwrap_or(pod_init::INIT_ID);
        let joined: Vec<(String, PathBuf)> = pins
            .iter()
            .filter(|(k, _)| k != "user" && k != "init-id")
            .cloned()
            .collect();
        return spawn_pod_init_in_user_ns(pod_id, &joined, &user, id, template);
    }
    let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // The init is PID 1 of its namespace: signals without a handler would be dropped, so the
    // ones it waits for are blocked from its first instant (the mask is inherited).
    let waited = pod_init::waited_signals();
    let _ = waited.thread_block();
    let pid = pod_init::fork_with(libc::CLONE_NEWPID);
    if pid != 0 {
        let _ = waited.thread_unblock();
    }
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(status_r);
            pod_init::run(pod_id, pins, template, status_w)
        }
        pid => {
            drop(status_w);
            confined(status_r).map(|()| pid as i32)
        }
    }
}

/// Waits for an init's report: `CONFINED`, or why it could not.
fn confined(status: OwnedFd) -> io::Result<()> {
    let mut msg = Vec::new();
    let _ = io::Read::read_to_end(&mut std::fs::File::from(status), &mut msg);
    if msg == pod_init::CONFINED {
        Ok(())
    } else {
        // The child exits after reporting a failure (or died without a word).
        let why = String::from_utf8_lossy(&msg);
        Err(io::Error::other(format!(
            "the pod init could not confine itself: {}",
            if why.is_empty() { "it died" } else { &why }
        )))
    }
}

/// The pod init of a pod with its own user namespace: a child joins that namespace and forks
/// the init into a PID namespace owned by it (see `pod_init::run_in_user_namespace`).
fn spawn_pod_init_in_user_ns(
    pod_id: &str,
    pins: &[(String, PathBuf)],
    user: &std::path::Path,
    id: u32,
    template: Option<&OwnedFd>,
) -> io::Result<i32> {
    let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (pid_r, pid_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let waited = pod_init::waited_signals();
    let _ = waited.thread_block();
    // SAFETY: the zygote has one thread, so the child's copy of its memory is consistent.
    let forked = unsafe { nix::unistd::fork() };
    let _ = waited.thread_unblock();
    match forked? {
        nix::unistd::ForkResult::Child => {
            drop((status_r, pid_r));
            pod_init::run_in_user_namespace(pod_id, pins, user, id, template, status_w, pid_w)
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop((status_w, pid_w));
            let mut pid = String::new();
            let _ = io::Read::read_to_string(&mut std::fs::File::from(pid_r), &mut pid);
            let outcome = confined(status_r);
            match pid.trim().parse::<i32>() {
                Ok(pid) => outcome.map(|()| pid),
                Err(_) => outcome.and(Err(io::Error::other("the pod init was not forked"))),
            }
        }
    }
}

/// Binds the monitor's socket, then forks the monitor, which inherits it: berthd can connect
/// as soon as this answers.
fn spawn_monitor(
    pod_id: String,
    socket: &str,
    lc_root: String,
    template: Option<&OwnedFd>,
) -> io::Result<i32> {
    let listener = crate::monitor::bind(std::path::Path::new(socket))?;
    // SAFETY: a plain fork of this single-threaded process.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Child => {
            detach_stdio();
            if let Some(t) = template {
                // SAFETY: the template is the zygote's; this child never uses it.
                unsafe {
                    libc::close(t.as_raw_fd());
                }
            }
            let _ = nix::unistd::setsid();
            crate::proctitle::set(c"berth-monitor", &format!("berth-monitor {pod_id}"));
            crate::monitor::run(pod_id, listener, lc_root.into())
        }
        nix::unistd::ForkResult::Parent { child } => Ok(child.as_raw()),
    }
}

/// In a forked child: stdio to /dev/null and the zygote's socket closed, so nothing of the
/// zygote or berthd is held open by the child; default signal dispositions.
fn detach_stdio() {
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

/// An O_PATH descriptor of berthd's binary on a read-only bind mount of its own that is
/// attached nowhere. A process started from it has `/proc/PID/exe` on that mount: whoever can
/// open the link gets the binary read-only (EROFS for writing), never the node's file to
/// overwrite (the runc CVE-2019-5736 class). Costs no copy: the mount shares the file's pages.
fn sealed_binary() -> io::Result<OwnedFd> {
    use rustix::mount::OpenTreeFlags;
    let fd = rustix::mount::open_tree(
        rustix::fs::CWD,
        "/proc/self/exe",
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(|e| io::Error::other(format!("open_tree of berthd's binary: {e}")))?;
    use crate::fsutil::{MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
    use std::os::fd::AsFd;
    crate::fsutil::mount_setattr(
        fd.as_fd(),
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        None,
    )
    .map_err(|e| io::Error::other(format!("making berthd's binary mount read-only: {e}")))?;
    Ok(fd)
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
        let binary = sealed_binary()?;
        // exec through the descriptor (close-on-exec, but open until the new image is loaded).
        let mut cmd = tokio::process::Command::new(format!("/proc/self/fd/{}", binary.as_raw_fd()));
        // argv[0] leaves room for the titles of the processes the zygote forks.
        cmd.arg0(format!(
            "{:<width$}",
            "berth-zygote",
            width = crate::proctitle::ROOM
        ))
        .arg("zygote")
        .env_clear()
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
        // The zygote, and so every monitor, pod init and container, runs with the limit berthd
        // was given, not the one it raised for itself.
        crate::fdlimit::for_child(cmd.as_std_mut());
        let child = cmd.spawn()?;
        drop(theirs);
        drop(binary);
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

/// Whether this process was started as the zygote (`argv[1] == "zygote"`): checked before the
/// command line is parsed, as the zygote's argv[0] is padding for titles.
pub fn is_zygote_invocation() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == "zygote")
}

fn exchange(fd: RawFd, req: &Request) -> io::Result<Vec<u8>> {
    let msg = req.encode();
    if msg.len() > MAX_REQUEST {
        return Err(io::Error::other("zygote request too long"));
    }
    // SAFETY: fd is the open socket owned by `Zygote`; the buffers are valid for their lengths.
    let sent = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 4096];
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::PodInit {
                pod_id: "ab".repeat(32),
                pins: vec![
                    ("net".into(), PathBuf::from("/run/berth/ns/x/net")),
                    ("ipc".into(), PathBuf::from("/run/berth/ns/x/ipc")),
                ],
            },
            Request::PodInit {
                pod_id: "cd".into(),
                pins: Vec::new(),
            },
            Request::Monitor {
                pod_id: "p".into(),
                socket: "/s".into(),
                lc_root: "/lc".into(),
            },
        ] {
            assert_eq!(Request::decode(&r.encode()), Some(r));
        }
        assert_eq!(Request::decode(b"pod-init\0id\0net"), None);
        assert_eq!(Request::decode(b"fork-bomb"), None);
    }
}
