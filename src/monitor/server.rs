//! The monitor process: one per pod, forked by the zygote, single-threaded. It is the parent
//! (as child subreaper) of the pod's containers, which it creates with youki's libcontainer in
//! process; it reaps them, writes each exit status to disk before reporting it, pumps their
//! output into CRI log files, and runs ExecSync processes. It outlives berthd: berthd
//! reconnects after a restart and asks for the state of every container.
//!
//! One poll(2) loop serves everything: the listening socket, berthd's connections, a signalfd
//! for SIGCHLD, container output pipes, exec output pipes and start-status pipes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::cri_log::{LogWriter, Stream};
use super::proto::{self, message, request};

/// A monitor that berthd never greets exits after this long (berthd died before recording it).
const HELLO_WITHIN: Duration = Duration::from_secs(60);
/// After an exec'd process exits, how long its output pipes may stay open (held by something
/// it left running) before the answer goes out anyway.
const EXEC_DRAIN: Duration = Duration::from_secs(1);
/// The exit code a container gets when its process could not be started (as containerd).
const START_ERROR_CODE: i32 = 128;

/// Where libcontainer keeps a container's state: a short id keeps unix socket paths under the
/// kernel's limit.
pub fn lc_id(container_id: &str) -> &str {
    &container_id[..20.min(container_id.len())]
}

/// Runs `exec` for a container's process and reports a failure through `status_fd` (which
/// closes at a successful exec, being close-on-exec): so StartContainer can tell "started"
/// from "could not start", and the message names the command.
#[derive(Clone)]
struct StatusExecutor {
    status_fd: RawFd,
}

impl Executor for StatusExecutor {
    fn exec(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorError> {
        let args: Vec<String> = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .unwrap_or_default();
        let Some(first) = args.first() else {
            report_and_exit(self.status_fd, "no command given");
        };
        let c_args: Vec<std::ffi::CString> = args
            .iter()
            .map(|a| std::ffi::CString::new(a.as_bytes()).unwrap_or_default())
            .collect();
        let path = std::ffi::CString::new(first.as_bytes()).unwrap_or_default();
        let err = nix::unistd::execvp(&path, &c_args).unwrap_err();
        let what = match err {
            nix::errno::Errno::ENOENT => "executable file not found in $PATH".to_string(),
            nix::errno::Errno::EACCES => "permission denied".to_string(),
            e => e.to_string(),
        };
        report_and_exit(self.status_fd, &format!("exec: {first:?}: {what}"))
    }

    fn validate(&self, _spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorValidationError> {
        // Checked at start, not at create: a missing command fails StartContainer, as with
        // other runtimes, and the container ends Exited.
        Ok(())
    }
}

fn report_and_exit(fd: RawFd, msg: &str) -> ! {
    // SAFETY: fd is the status pipe's write end, open in this (init) process; msg is valid.
    unsafe {
        libc::write(fd, msg.as_ptr().cast(), msg.len());
        libc::_exit(127);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CtrStatus {
    Created,
    Running,
    Exited,
}

struct Ctr {
    pid: i32,
    /// The container's cgroup.procs, for killing what its init leaves behind.
    cgroup_procs: PathBuf,
    status: CtrStatus,
    exit: Option<proto::Exit>,
    exit_file: PathBuf,
    log: Option<LogWriter>,
    stdout: Option<File>,
    stderr: Option<File>,
    /// Kept for attach; holding it open keeps the container's stdin open.
    _stdin: Option<File>,
    start_error: Option<String>,
}

struct ExecOp {
    conn: u64,
    req: u64,
    pid: i32,
    out: Option<File>,
    err: Option<File>,
    out_buf: Vec<u8>,
    err_buf: Vec<u8>,
    max: usize,
    deadline: Option<Instant>,
    timed_out: bool,
    exited: Option<i32>,
    drain_until: Option<Instant>,
}

/// A container's start-status pipe: watched from Create on (an end of file before Start means
/// the init died), answered at Start.
struct PendingStart {
    /// The StartContainer request waiting for the outcome, once there is one.
    waiting: Option<(u64, u64)>,
    ctr: String,
    pipe: File,
    msg: Vec<u8>,
    done: bool,
}

struct Conn {
    stream: UnixStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    closed: bool,
}

/// How a container's process talks: pipes, or a terminal whose master comes over a socket.
enum Io {
    Pipes {
        out: File,
        err: File,
        stdin: Option<File>,
    },
    Terminal {
        console: UnixListener,
        sock: PathBuf,
    },
}

/// Runs `build` (a libcontainer create or exec, which forks the container's processes) in a
/// short-lived child of the monitor whose descriptors are only 0-2 and `keep`, and returns the
/// pid it reports. A process libcontainer forks holds a copy of its parent's descriptor table
/// until it execs the container's command (close-on-exec acts only then); a container created
/// but not started waits in the pod's PID namespace for that long. Forked from the monitor
/// itself, it would hold the monitor's socket, berthd's connections, and the other containers'
/// logs and pipes for any process of the pod allowed to trace it. The child also takes
/// libcontainer's parsing and allocations with it when it exits.
fn in_helper(
    title: &str,
    keep: &[RawFd],
    build: impl FnOnce() -> Result<i32, String>,
) -> Result<i32, String> {
    let (result_r, result_w) = pipe().map_err(|e| format!("helper pipe: {e}"))?;
    // SAFETY: the monitor is single-threaded, so the child's copy of its memory is consistent.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("forking a helper: {e}"))? {
        nix::unistd::ForkResult::Child => {
            let mut fds: Vec<RawFd> = keep.to_vec();
            fds.extend([0, 1, 2, result_w.as_raw_fd()]);
            close_all_but(&mut fds);
            // What the processes it forks show until they exec.
            crate::proctitle::set(c"berth-helper", title);
            // The helper is not the processes' parent for long: they are reparented to the
            // monitor (the subreaper) when it exits.
            let answer = match build() {
                Ok(pid) => format!("ok {pid}\n"),
                Err(e) => format!("err {}\n", e.replace('\n', " ")),
            };
            let _ = rustix::io::write(&result_w, answer.as_bytes());
            // SAFETY: _exit ends the child without running the monitor's destructors.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(result_w);
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

/// Keeps libcontainer's path library (pathrs) from caching a procfs handle for the life of
/// this process and its forks. The cached handle is a procfs of the node's PID namespace, and
/// every process libcontainer forks holds it until it execs: a container created but not yet
/// started, or a process ExecSync is starting, would hand any process of the pod allowed to
/// trace it `/proc/<node pid>/root`, the node's root. pathrs refuses a cached descriptor that
/// no longer is a procfs and falls back to a handle per operation, closed after it: so the
/// cache is filled once here, and its descriptor replaced by /dev/null (close-on-exec).
pub fn disable_procfs_cache() -> std::io::Result<()> {
    let handle = pathrs::procfs::ProcfsHandle::new().map_err(std::io::Error::other)?;
    let cached = handle.as_fd().as_raw_fd();
    drop(handle);
    let null = File::open("/dev/null")?;
    // SAFETY: `cached` is pathrs's cache slot, which it only ever borrows (and validates
    // before each use); putting another open file at that number cannot make any owner in
    // this process close or misuse a descriptor it does not own.
    unsafe { nix::unistd::dup3_raw(&null, cached, nix::fcntl::OFlag::O_CLOEXEC) }?;
    // The one that probes it now marks the cache bad for this process and its children.
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

/// Who a reaped pid belonged to.
enum Owner {
    Container(String),
    Exec(u64),
}

struct Monitor {
    pod_id: String,
    lc_root: PathBuf,
    listener: UnixListener,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    sigfd: SignalFd,
    ctrs: HashMap<String, Ctr>,
    pids: HashMap<i32, Owner>,
    execs: HashMap<u64, ExecOp>,
    next_exec: u64,
    starts: Vec<PendingStart>,
    greeted: bool,
    born: Instant,
    shutdown: bool,
}

/// Entry point of a monitor, in the zygote's forked child. `listener` is already bound.
pub fn run(pod_id: String, listener: UnixListener, lc_root: PathBuf) -> ! {
    let _ = nix::sys::prctl::set_name(c"berth-monitor");
    // Containers' inits are grandchildren (libcontainer forks an intermediate): they are
    // reparented here, so this process reaps them and learns their exit status.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let _ = std::fs::create_dir_all(&lc_root);
    if disable_procfs_cache().is_err() {
        // Containers would hold a handle on the node's /proc until they exec: none are made.
        std::process::exit(1);
    }
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
    let mut m = Monitor {
        pod_id,
        lc_root,
        listener,
        conns: HashMap::new(),
        next_conn: 0,
        sigfd,
        ctrs: HashMap::new(),
        pids: HashMap::new(),
        execs: HashMap::new(),
        next_exec: 0,
        starts: Vec::new(),
        greeted: false,
        born: Instant::now(),
        shutdown: false,
    };
    m.run()
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn set_nonblocking(f: &impl AsRawFd) {
    // SAFETY: fcntl on an fd this process owns.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

fn pipe() -> std::io::Result<(File, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((File::from(r), w))
}

/// Reads what is available; `Ok(None)` at end of file.
fn read_some(f: &mut File, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    match f.read(buf) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::Interrupted =>
        {
            Ok(Some(0))
        }
        Err(e) => Err(e),
    }
}

fn write_exit_file(path: &Path, exit: &proto::Exit) {
    let body = format!(
        "{{\"code\":{},\"signal\":{},\"exited_at_ns\":{},\"start_failed\":{},\"message\":{}}}",
        exit.code,
        exit.signal,
        exit.exited_at_ns,
        exit.start_failed,
        serde_json::Value::String(exit.message.clone())
    );
    let _ = crate::store::write_atomic_volatile(path, body.as_bytes());
}

/// What the loop polls, and which object each entry stands for.
enum Slot {
    Listener,
    Signals,
    Conn(u64),
    CtrOut(String, Stream),
    ExecOut(u64, Stream),
    Start(usize),
}

impl Monitor {
    fn run(&mut self) -> ! {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if self.shutdown && self.conns.values().all(|c| c.wbuf.is_empty()) {
                std::process::exit(0);
            }
            if !self.greeted && self.born.elapsed() > HELLO_WITHIN && self.ctrs.is_empty() {
                std::process::exit(0);
            }
            let (mut fds, slots) = self.poll_set();
            let timeout = self.poll_timeout();
            // SAFETY: fds is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                continue;
            }
            for (pfd, slot) in fds.iter().zip(slots) {
                if pfd.revents == 0 {
                    continue;
                }
                match slot {
                    Slot::Listener => self.accept(),
                    Slot::Signals => self.reap(),
                    Slot::Conn(id) => self.conn_ready(id, pfd.revents, &mut buf),
                    Slot::CtrOut(id, s) => self.pump_ctr(&id, s, &mut buf),
                    Slot::ExecOut(id, s) => self.pump_exec(id, s, &mut buf),
                    Slot::Start(i) => self.start_ready(i),
                }
            }
            self.starts.retain(|s| !s.done);
            self.expire_execs();
            self.finish_execs();
            self.conns.retain(|_, c| !(c.closed && c.wbuf.is_empty()));
        }
    }

    fn poll_set(&self) -> (Vec<libc::pollfd>, Vec<Slot>) {
        let mut fds = Vec::new();
        let mut slots = Vec::new();
        let mut add = |fd: RawFd, events: i16, slot: Slot| {
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
            slots.push(slot);
        };
        add(self.listener.as_raw_fd(), libc::POLLIN, Slot::Listener);
        add(self.sigfd.as_fd().as_raw_fd(), libc::POLLIN, Slot::Signals);
        for (id, c) in &self.conns {
            let mut ev = 0;
            if !c.closed {
                ev |= libc::POLLIN;
            }
            if !c.wbuf.is_empty() {
                ev |= libc::POLLOUT;
            }
            add(c.stream.as_raw_fd(), ev, Slot::Conn(*id));
        }
        for (id, c) in &self.ctrs {
            if let Some(f) = &c.stdout {
                add(
                    f.as_raw_fd(),
                    libc::POLLIN,
                    Slot::CtrOut(id.clone(), Stream::Stdout),
                );
            }
            if let Some(f) = &c.stderr {
                add(
                    f.as_raw_fd(),
                    libc::POLLIN,
                    Slot::CtrOut(id.clone(), Stream::Stderr),
                );
            }
        }
        for (id, e) in &self.execs {
            if let Some(f) = &e.out {
                add(
                    f.as_raw_fd(),
                    libc::POLLIN,
                    Slot::ExecOut(*id, Stream::Stdout),
                );
            }
            if let Some(f) = &e.err {
                add(
                    f.as_raw_fd(),
                    libc::POLLIN,
                    Slot::ExecOut(*id, Stream::Stderr),
                );
            }
        }
        for (i, s) in self.starts.iter().enumerate() {
            add(s.pipe.as_raw_fd(), libc::POLLIN, Slot::Start(i));
        }
        (fds, slots)
    }

    /// Milliseconds until the next deadline (exec timeouts, exec drains, the greeting), or -1.
    fn poll_timeout(&self) -> i32 {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for e in self.execs.values() {
            if let Some(d) = e.deadline
                && e.exited.is_none()
            {
                consider(d);
            }
            if let Some(d) = e.drain_until {
                consider(d);
            }
        }
        if !self.greeted {
            consider(self.born + HELLO_WITHIN);
        }
        match next {
            None => -1,
            Some(t) => {
                t.saturating_duration_since(now)
                    .as_millis()
                    .min(i32::MAX as u128) as i32
                    + 1
            }
        }
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let _ = stream.set_nonblocking(true);
            let id = self.next_conn;
            self.next_conn += 1;
            self.conns.insert(
                id,
                Conn {
                    stream,
                    rbuf: Vec::new(),
                    wbuf: Vec::new(),
                    closed: false,
                },
            );
        }
    }

    fn conn_ready(&mut self, id: u64, revents: i16, buf: &mut [u8]) {
        let mut requests = Vec::new();
        {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if revents & libc::POLLOUT != 0 && !c.wbuf.is_empty() {
                match c.stream.write(&c.wbuf) {
                    Ok(n) => {
                        c.wbuf.drain(..n);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        c.wbuf.clear();
                        c.closed = true;
                    }
                }
            }
            if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !c.closed {
                loop {
                    match c.stream.read(buf) {
                        Ok(0) => {
                            c.closed = true;
                            c.wbuf.clear();
                            break;
                        }
                        Ok(n) => c.rbuf.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            c.closed = true;
                            c.wbuf.clear();
                            break;
                        }
                    }
                }
                loop {
                    match proto::unframe::<proto::Request>(&mut c.rbuf) {
                        Ok(Some(r)) => requests.push(r),
                        Ok(None) => break,
                        Err(_) => {
                            c.closed = true;
                            c.wbuf.clear();
                            break;
                        }
                    }
                }
            }
        }
        for r in requests {
            self.handle(id, r);
        }
    }

    fn send(&mut self, conn: u64, msg: proto::Message) {
        if let Some(c) = self.conns.get_mut(&conn)
            && !c.closed
        {
            proto::frame(&msg, &mut c.wbuf);
            // Try at once; what does not fit waits for POLLOUT.
            if let Ok(n) = c.stream.write(&c.wbuf) {
                c.wbuf.drain(..n);
            }
        }
    }

    fn respond(
        &mut self,
        conn: u64,
        id: u64,
        result: Result<Option<proto::response::Result>, (proto::ErrorKind, String)>,
    ) {
        let r = match result {
            Ok(result) => proto::Response {
                id,
                result,
                ..Default::default()
            },
            Err((kind, error)) => proto::Response {
                id,
                error,
                error_kind: kind as i32,
                result: None,
            },
        };
        self.send(
            conn,
            proto::Message {
                kind: Some(message::Kind::Response(r)),
            },
        );
    }

    fn broadcast(&mut self, ev: proto::Event) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.send(
                id,
                proto::Message {
                    kind: Some(message::Kind::Event(ev.clone())),
                },
            );
        }
    }

    fn handle(&mut self, conn: u64, r: proto::Request) {
        use proto::ErrorKind as K;
        let id = r.id;
        let not_found = |c: &str| {
            (
                K::NotFound,
                format!("container {c} is not in this pod's monitor"),
            )
        };
        match r.op {
            Some(request::Op::Hello(h)) => {
                if h.pod_id != self.pod_id {
                    return self.respond(
                        conn,
                        id,
                        Err((
                            K::Invalid,
                            format!("this is the monitor of pod {}", self.pod_id),
                        )),
                    );
                }
                self.greeted = true;
                let hello = proto::Hello {
                    pod_id: self.pod_id.clone(),
                };
                self.respond(conn, id, Ok(Some(proto::response::Result::Hello(hello))));
            }
            Some(request::Op::Create(c)) => {
                let t = Instant::now();
                let r = self.create(c).map(|pid| {
                    let micros = t.elapsed().as_micros() as u64;
                    Some(proto::response::Result::Created(proto::Created {
                        pid,
                        micros,
                    }))
                });
                self.respond(conn, id, r.map_err(|e| (K::Failed, e)));
            }
            Some(request::Op::Start(s)) => {
                if let Err(e) = self.start(conn, id, &s.container_id) {
                    self.respond(conn, id, Err(e));
                }
            }
            Some(request::Op::Kill(k)) => {
                let r = match self.ctrs.get(&k.container_id) {
                    None => Err(not_found(&k.container_id)),
                    Some(c) if c.status == CtrStatus::Exited => Ok(None),
                    Some(c) => {
                        let sig = Signal::try_from(k.signal).unwrap_or(Signal::SIGKILL);
                        if sig == Signal::SIGKILL {
                            crate::cgroup::kill_procs(&c.cgroup_procs);
                        }
                        // The init is our child until reaped, so its pid cannot be reused.
                        match nix::sys::signal::kill(Pid::from_raw(c.pid), sig) {
                            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(None),
                            Err(e) => Err((
                                K::Failed,
                                format!("signalling container {}: {e}", k.container_id),
                            )),
                        }
                    }
                };
                self.respond(conn, id, r);
            }
            Some(request::Op::Exec(e)) => {
                if let Err(err) = self.exec(conn, id, e) {
                    self.respond(conn, id, Err(err));
                }
            }
            Some(request::Op::ReopenLog(rl)) => {
                let r = match self.ctrs.get_mut(&rl.container_id) {
                    None => Err(not_found(&rl.container_id)),
                    Some(c) => match c.log.as_mut() {
                        None => Err((K::Invalid, "the container has no log file".into())),
                        Some(l) => l
                            .reopen()
                            .map(|()| None)
                            .map_err(|e| (K::Failed, format!("reopening the log: {e}"))),
                    },
                };
                self.respond(conn, id, r);
            }
            Some(request::Op::Delete(d)) => {
                let r = self.delete(&d.container_id, d.force);
                self.respond(conn, id, r);
            }
            Some(request::Op::List(_)) => {
                let states = self.states();
                self.respond(conn, id, Ok(Some(proto::response::Result::States(states))));
            }
            Some(request::Op::Shutdown(_)) => {
                if self.ctrs.values().any(|c| c.status != CtrStatus::Exited) {
                    return self.respond(
                        conn,
                        id,
                        Err((K::Invalid, "containers still run".into())),
                    );
                }
                self.shutdown = true;
                self.respond(conn, id, Ok(None));
            }
            None => self.respond(conn, id, Err((K::Invalid, "empty request".into()))),
        }
    }

    fn states(&self) -> proto::States {
        proto::States {
            containers: self
                .ctrs
                .iter()
                .map(|(id, c)| proto::ContainerState {
                    container_id: id.clone(),
                    pid: c.pid,
                    status: match c.status {
                        CtrStatus::Created => proto::Status::Created,
                        CtrStatus::Running => proto::Status::Running,
                        CtrStatus::Exited => proto::Status::Exited,
                    } as i32,
                    exit: c.exit.clone(),
                })
                .collect(),
        }
    }

    /// Creates a container (libcontainer forks its init, which waits for Start).
    fn create(&mut self, c: proto::Create) -> Result<i32, String> {
        if self.ctrs.contains_key(&c.container_id) {
            return Err(format!("container {} exists already", c.container_id));
        }
        let log = if c.log_path.is_empty() {
            None
        } else {
            Some(
                LogWriter::open(Path::new(&c.log_path))
                    .map_err(|e| format!("opening log {}: {e}", c.log_path))?,
            )
        };
        let (status_r, status_w) = pipe().map_err(|e| format!("status pipe: {e}"))?;
        let lcid = lc_id(&c.container_id).to_string();
        // What the container's processes may hold: the status pipe and their stdio.
        let mut keep = vec![status_w.as_raw_fd()];
        let builder = ContainerBuilder::new(lcid.clone(), SyscallType::Linux)
            .with_root_path(&self.lc_root)
            .and_then(|b| b.validate_id())
            .map_err(|e| format!("creating container: {e}"))?
            .with_executor(StatusExecutor {
                status_fd: status_w.as_raw_fd(),
            });
        // Output: pipes, or with a terminal the pty master libcontainer's init makes and hands
        // over a console socket (the runc protocol); it carries output (logged as stdout) and
        // input.
        let (builder, io) = if c.tty {
            let sock = self.lc_root.join(format!("{lcid}.tty"));
            let _ = std::fs::remove_file(&sock);
            let console = UnixListener::bind(&sock).map_err(|e| format!("console socket: {e}"))?;
            (
                builder.with_console_socket(Some(&sock)),
                Io::Terminal { console, sock },
            )
        } else {
            let (out_r, out_w) = pipe().map_err(|e| format!("stdout pipe: {e}"))?;
            let (err_r, err_w) = pipe().map_err(|e| format!("stderr pipe: {e}"))?;
            let (stdin_keep, stdin_fd): (Option<File>, OwnedFd) = if c.stdin {
                let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                    .map_err(|e| format!("stdin pipe: {e}"))?;
                (Some(File::from(w)), r)
            } else {
                let null = File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
                (None, OwnedFd::from(null))
            };
            keep.extend([stdin_fd.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()]);
            let b = builder
                .with_stdin(stdin_fd)
                .with_stdout(out_w)
                .with_stderr(err_w);
            (
                b,
                Io::Pipes {
                    out: out_r,
                    err: err_r,
                    stdin: stdin_keep,
                },
            )
        };
        let bundle = c.bundle.clone();
        let title = format!("berth-create {}", c.container_id);
        let built = in_helper(&title, &keep, move || {
            let container = builder
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| format!("creating container: {e}"))?;
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| "libcontainer reported no pid".to_string())
        });
        // Our copy of the status pipe's write end must go, or its end of file would never come.
        drop(status_w);
        let pid = built?;
        let finish = || -> Result<(File, Option<File>, Option<File>), String> {
            if c.set_oom_score_adj {
                std::fs::write(
                    format!("/proc/{pid}/oom_score_adj"),
                    c.oom_score_adj.to_string(),
                )
                .map_err(|e| format!("setting oom_score_adj {}: {e}", c.oom_score_adj))?;
            }
            match io {
                Io::Pipes { out, err, stdin } => Ok((out, Some(err), stdin)),
                Io::Terminal { console, sock } => {
                    let _ = std::fs::remove_file(&sock);
                    let master = receive_pty_master(&console)
                        .map_err(|e| format!("receiving the container's terminal: {e}"))?;
                    let reader = master.try_clone().map_err(|e| format!("terminal: {e}"))?;
                    Ok((reader, None, Some(master)))
                }
            }
        };
        let (stdout, stderr, stdin) = match finish() {
            Ok(s) => s,
            Err(e) => {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                if let Ok(mut lc) = Container::load(self.lc_root.join(&lcid)) {
                    let _ = lc.delete(true);
                }
                return Err(e);
            }
        };
        set_nonblocking(&stdout);
        if let Some(e) = &stderr {
            set_nonblocking(e);
        }
        set_nonblocking(&status_r);
        self.pids
            .insert(pid, Owner::Container(c.container_id.clone()));
        self.ctrs.insert(
            c.container_id.clone(),
            Ctr {
                pid,
                cgroup_procs: PathBuf::from(&c.cgroup_procs),
                status: CtrStatus::Created,
                exit: None,
                exit_file: PathBuf::from(c.exit_file),
                log,
                stdout: Some(stdout),
                stderr,
                _stdin: stdin,
                start_error: None,
            },
        );
        // The status pipe is watched from now on and answered at Start.
        self.starts.push(PendingStart {
            waiting: None,
            ctr: c.container_id,
            pipe: status_r,
            msg: Vec::new(),
            done: false,
        });
        Ok(pid)
    }

    /// Tells the container's init to exec its command; the answer waits for the status pipe.
    fn start(&mut self, conn: u64, req: u64, id: &str) -> Result<(), (proto::ErrorKind, String)> {
        use proto::ErrorKind as K;
        let Some(c) = self.ctrs.get(id) else {
            return Err((
                K::NotFound,
                format!("container {id} is not in this pod's monitor"),
            ));
        };
        if c.status != CtrStatus::Created {
            return Err((
                K::Invalid,
                format!("container {id} is not in the created state"),
            ));
        }
        let mut lc = Container::load(self.lc_root.join(lc_id(id)))
            .map_err(|e| (K::Failed, format!("loading container state: {e}")))?;
        lc.start()
            .map_err(|e| (K::Failed, format!("starting container: {e}")))?;
        if let Some(c) = self.ctrs.get_mut(id) {
            c.status = CtrStatus::Running;
        }
        match self.starts.iter_mut().find(|s| s.ctr == id && !s.done) {
            Some(s) => s.waiting = Some((conn, req)),
            // The init died before it could be told to start: the exit is reported as usual.
            None => self.respond(conn, req, Ok(None)),
        }
        Ok(())
    }

    fn start_ready(&mut self, i: usize) {
        let Some(s) = self.starts.get_mut(i) else {
            return;
        };
        let mut b = [0u8; 1024];
        loop {
            match s.pipe.read(&mut b) {
                Ok(0) => break,
                Ok(n) => s.msg.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        // End of file: the init exec'd its command (nothing written) or failed to (the
        // message), or died before Start.
        s.done = true;
        let msg = String::from_utf8_lossy(&s.msg).into_owned();
        let (waiting, ctr) = (s.waiting, s.ctr.clone());
        if !msg.is_empty()
            && let Some(c) = self.ctrs.get_mut(&ctr)
        {
            c.start_error = Some(msg.clone());
        }
        if let Some((conn, req)) = waiting {
            if msg.is_empty() {
                self.respond(conn, req, Ok(None));
            } else {
                self.respond(conn, req, Err((proto::ErrorKind::StartFailed, msg)));
            }
        }
    }

    fn pump_ctr(&mut self, id: &str, s: Stream, buf: &mut [u8]) {
        let Some(c) = self.ctrs.get_mut(id) else {
            return;
        };
        let f = match s {
            Stream::Stdout => &mut c.stdout,
            Stream::Stderr => &mut c.stderr,
        };
        let Some(file) = f.as_mut() else { return };
        // A bounded amount per wakeup, so one chatty container cannot starve the rest.
        for _ in 0..16 {
            match read_some(file, buf) {
                Ok(Some(0)) => return,
                Ok(Some(n)) => {
                    if let Some(l) = c.log.as_mut() {
                        let _ = l.write(s, &buf[..n]);
                    }
                }
                Ok(None) | Err(_) => {
                    *f = None;
                    if let Some(l) = c.log.as_mut() {
                        let _ = l.finish(s);
                    }
                    return;
                }
            }
        }
    }

    fn pump_exec(&mut self, id: u64, s: Stream, buf: &mut [u8]) {
        let Some(e) = self.execs.get_mut(&id) else {
            return;
        };
        let (f, b) = match s {
            Stream::Stdout => (&mut e.out, &mut e.out_buf),
            Stream::Stderr => (&mut e.err, &mut e.err_buf),
        };
        let Some(file) = f.as_mut() else { return };
        for _ in 0..16 {
            match read_some(file, buf) {
                Ok(Some(0)) => return,
                Ok(Some(n)) => {
                    // Output past the cap is read (so the process never blocks) and dropped.
                    let room = (e.max + 1).saturating_sub(b.len());
                    b.extend_from_slice(&buf[..n.min(room)]);
                }
                Ok(None) | Err(_) => {
                    *f = None;
                    return;
                }
            }
        }
    }

    /// Reaps every exited child: containers (exit status to disk, then reported), exec'd
    /// processes, and the orphans a subreaper inherits.
    fn reap(&mut self) {
        while let Ok(Some(_)) = self.sigfd.read_signal() {}
        loop {
            let st = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(st) => st,
            };
            let (pid, code, signal) = match st {
                WaitStatus::Exited(p, c) => (p.as_raw(), c, 0),
                WaitStatus::Signaled(p, s, _) => (p.as_raw(), 128 + s as i32, s as i32),
                _ => continue,
            };
            match self.pids.remove(&pid) {
                Some(Owner::Container(id)) => self.container_exited(&id, code, signal),
                Some(Owner::Exec(eid)) => {
                    if let Some(e) = self.execs.get_mut(&eid) {
                        e.exited = Some(code);
                        e.drain_until = Some(Instant::now() + EXEC_DRAIN);
                    }
                }
                None => {}
            }
        }
    }

    fn container_exited(&mut self, id: &str, code: i32, signal: i32) {
        // A failed exec writes its reason and exits at once: read the reason before the exit
        // is recorded, whichever the poll reported first.
        if let Some(i) = self.starts.iter().position(|s| s.ctr == id && !s.done) {
            self.start_ready(i);
        }
        let Some(c) = self.ctrs.get_mut(id) else {
            return;
        };
        let mut exit = proto::Exit {
            code,
            signal,
            exited_at_ns: now_ns(),
            message: String::new(),
            start_failed: false,
        };
        if let Some(msg) = c.start_error.take() {
            exit.code = START_ERROR_CODE;
            exit.message = msg;
            exit.start_failed = true;
        }
        // A container is over when its init is: what it left running in its cgroup goes too.
        crate::cgroup::kill_procs(&c.cgroup_procs);
        // On disk first: a berthd that restarts must find it even if it missed the event.
        write_exit_file(&c.exit_file, &exit);
        c.status = CtrStatus::Exited;
        c.exit = Some(exit.clone());
        // Drain what the process wrote before it died (writers in the same PID namespace are
        // gone with it; output still buffered in the pipes goes to the log).
        let mut buf = vec![0u8; 64 * 1024];
        for s in [Stream::Stdout, Stream::Stderr] {
            for _ in 0..64 {
                let Some(c) = self.ctrs.get_mut(id) else {
                    break;
                };
                let f = match s {
                    Stream::Stdout => &mut c.stdout,
                    Stream::Stderr => &mut c.stderr,
                };
                match f.as_mut().map(|f| read_some(f, &mut buf)) {
                    Some(Ok(Some(n))) if n > 0 => {
                        if let Some(l) = c.log.as_mut() {
                            let _ = l.write(s, &buf[..n]);
                        }
                    }
                    _ => break,
                }
            }
        }
        self.broadcast(proto::Event {
            container_id: id.to_string(),
            exit: Some(exit),
        });
    }

    fn exec(
        &mut self,
        conn: u64,
        req: u64,
        e: proto::Exec,
    ) -> Result<(), (proto::ErrorKind, String)> {
        use proto::ErrorKind as K;
        match self.ctrs.get(&e.container_id) {
            None => {
                return Err((
                    K::NotFound,
                    format!("container {} is not in this pod's monitor", e.container_id),
                ));
            }
            Some(c) if c.status != CtrStatus::Running => {
                return Err((
                    K::Invalid,
                    format!("container {} is not running", e.container_id),
                ));
            }
            Some(_) => {}
        }
        if e.args.is_empty() {
            return Err((K::Invalid, "exec needs a command".into()));
        }
        let (out_r, out_w) = pipe().map_err(|err| (K::Failed, format!("pipe: {err}")))?;
        let (err_r, err_w) = pipe().map_err(|err| (K::Failed, format!("pipe: {err}")))?;
        let null =
            File::open("/dev/null").map_err(|err| (K::Failed, format!("/dev/null: {err}")))?;
        let env: HashMap<String, String> = e
            .env
            .iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        let keep = [null.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
        let (lc_root, lcid) = (self.lc_root.clone(), lc_id(&e.container_id).to_string());
        let (args, cwd, uid, gid, gids) = (
            e.args.clone(),
            e.cwd.clone(),
            e.uid,
            e.gid,
            e.additional_gids.clone(),
        );
        let title = format!("berth-exec {}", e.container_id);
        let built = in_helper(&title, &keep, move || {
            ContainerBuilder::new(lcid, SyscallType::Linux)
                .with_root_path(&lc_root)
                .map(|b| {
                    b.with_stdin(OwnedFd::from(null))
                        .with_stdout(out_w)
                        .with_stderr(err_w)
                        .as_tenant()
                        .with_detach(true)
                        .with_container_args(args)
                        .with_env(env)
                        .with_cwd(if cwd.is_empty() {
                            None
                        } else {
                            Some(PathBuf::from(&cwd))
                        })
                        .with_user(Some(uid))
                        .with_group(Some(gid))
                        .with_additional_gids(gids)
                })
                .and_then(|b| b.build())
                .map(|pid| pid.as_raw())
                .map_err(|e| e.to_string())
        });
        let eid = self.next_exec;
        self.next_exec += 1;
        let max = e.max_output_bytes.max(1) as usize;
        let pid = match built {
            Ok(pid) => pid,
            Err(msg) => {
                // The command could not be started (e.g. not found): answered like a shell
                // would, with 126/127 and the reason on stderr.
                let code = if msg.contains("not found") || msg.contains("No such file") {
                    127
                } else {
                    126
                };
                let r = proto::ExecResult {
                    exit_code: code,
                    stdout: Vec::new(),
                    stderr: format!("{msg}\n").into_bytes(),
                    timed_out: false,
                };
                self.respond(conn, req, Ok(Some(proto::response::Result::Exec(r))));
                return Ok(());
            }
        };
        set_nonblocking(&out_r);
        set_nonblocking(&err_r);
        self.pids.insert(pid, Owner::Exec(eid));
        self.execs.insert(
            eid,
            ExecOp {
                conn,
                req,
                pid,
                out: Some(out_r),
                err: Some(err_r),
                out_buf: Vec::new(),
                err_buf: Vec::new(),
                max,
                deadline: (e.timeout_ms > 0)
                    .then(|| Instant::now() + Duration::from_millis(e.timeout_ms)),
                timed_out: false,
                exited: None,
                drain_until: None,
            },
        );
        // It may already have exited (SIGCHLD pending): the next loop pass reaps it.
        Ok(())
    }

    /// Kills the process trees of execs past their deadline (never the container).
    fn expire_execs(&mut self) {
        let now = Instant::now();
        let expired: Vec<i32> = self
            .execs
            .values_mut()
            .filter(|e| e.exited.is_none() && !e.timed_out && e.deadline.is_some_and(|d| d <= now))
            .map(|e| {
                e.timed_out = true;
                e.pid
            })
            .collect();
        for pid in expired {
            kill_tree(pid);
        }
    }

    fn finish_execs(&mut self) {
        let now = Instant::now();
        let done: Vec<u64> = self
            .execs
            .iter()
            .filter(|(_, e)| {
                e.exited.is_some()
                    && ((e.out.is_none() && e.err.is_none())
                        || e.drain_until.is_some_and(|d| d <= now))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let Some(mut e) = self.execs.remove(&id) else {
                continue;
            };
            let cut = |b: &mut Vec<u8>, max: usize| {
                if b.len() > max {
                    b.truncate(max);
                    b.extend_from_slice(format!("\n[output cut at {max} bytes]\n").as_bytes());
                }
            };
            cut(&mut e.out_buf, e.max);
            cut(&mut e.err_buf, e.max);
            let r = proto::ExecResult {
                exit_code: e.exited.unwrap_or(-1),
                stdout: std::mem::take(&mut e.out_buf),
                stderr: std::mem::take(&mut e.err_buf),
                timed_out: e.timed_out,
            };
            self.respond(e.conn, e.req, Ok(Some(proto::response::Result::Exec(r))));
        }
    }

    fn delete(
        &mut self,
        id: &str,
        force: bool,
    ) -> Result<Option<proto::response::Result>, (proto::ErrorKind, String)> {
        use proto::ErrorKind as K;
        let Some(c) = self.ctrs.get(id) else {
            return Ok(None);
        };
        if c.status != CtrStatus::Exited {
            if !force {
                return Err((
                    K::Invalid,
                    format!("container {id} still runs; stop it first"),
                ));
            }
            // Nobody wants its exit: the reaper drops it once the container is forgotten.
            crate::cgroup::kill_procs(&c.cgroup_procs);
            let _ = nix::sys::signal::kill(Pid::from_raw(c.pid), Signal::SIGKILL);
        }
        let dir = self.lc_root.join(lc_id(id));
        if dir.exists() {
            match Container::load(dir.clone()) {
                Ok(mut lc) => {
                    if let Err(e) = lc.delete(true) {
                        return Err((K::Failed, format!("deleting container {id}: {e}")));
                    }
                }
                Err(_) => {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        self.ctrs.remove(id);
        self.starts.retain(|s| s.ctr != id);
        Ok(None)
    }
}

/// Accepts libcontainer's connection on the console socket and takes the pty master it sends.
fn receive_pty_master(console: &UnixListener) -> std::io::Result<File> {
    // libcontainer connected during create and sent the fd before create returned: the
    // connection and the message are queued already.
    let (stream, _) = console.accept()?;
    let mut buf = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!(RawFd);
    let msg = nix::sys::socket::recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for c in msg.cmsgs()? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c
            && let Some(fd) = fds.first()
        {
            // SAFETY: the kernel just installed this fd in our table for us; nothing else owns it.
            return Ok(unsafe { File::from_raw_fd(*fd) });
        }
    }
    Err(std::io::Error::other("no terminal was sent"))
}

/// Kills a process and every process descended from it (found through /proc).
fn kill_tree(root: i32) {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                continue;
            };
            if let Some(ppid) = rest.split(' ').nth(1).and_then(|s| s.parse::<i32>().ok()) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut stack = vec![root];
    let mut all = Vec::new();
    while let Some(p) = stack.pop() {
        all.push(p);
        if let Some(c) = children.get(&p) {
            stack.extend(c);
        }
    }
    for p in all {
        let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
    }
}

/// Binds the monitor's socket at `path` (replacing a stale one): done in the zygote, before
/// the fork, so berthd can connect as soon as the zygote answers.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    UnixListener::bind(path)
}
