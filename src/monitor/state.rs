//! What the monitor holds: berthd's connections, the pod's containers, the ExecSync
//! processes in flight, and its registered sources. The features (`conn`, `containers`,
//! `exec`) act on it; this module only says what there is.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use super::cri_log::LogWriter;
use super::event_loop::{Serve, Sources};
use super::proto;

/// The monitor's state.
pub(super) struct Monitor {
    /// Registered descriptors and timers.
    pub ev: Sources<Monitor>,
    /// The pod this monitor holds.
    pub pod_id: String,
    /// libcontainer's state directory.
    pub lc_root: PathBuf,
    /// pathrs's cached procfs descriptor (see `helper::procfs_cache`).
    pub procfs: RawFd,
    /// berthd's connections.
    pub conns: HashMap<u64, Conn>,
    pub next_conn: u64,
    /// The pod's containers.
    pub ctrs: HashMap<String, Ctr>,
    /// Who each child pid is.
    pub pids: HashMap<i32, Owner>,
    /// ExecSync processes running.
    pub execs: HashMap<u64, ExecOp>,
    pub next_exec: u64,
    /// Streamed execs running: the connection and request their exit is answered on.
    pub streams: HashMap<u64, (u64, u64)>,
    /// Containers whose start-status pipe is still open.
    pub starts: Vec<PendingStart>,
    /// berthd has said hello.
    pub greeted: bool,
    /// Asked to exit once every answer is sent.
    pub shutdown: bool,
}

impl Serve for Monitor {
    fn sources(&mut self) -> &mut Sources<Monitor> {
        &mut self.ev
    }

    fn finished(&self) -> bool {
        self.shutdown && self.conns.values().all(|c| c.wbuf.is_empty())
    }
}

impl Monitor {
    /// A monitor for `pod_id` with nothing registered yet.
    pub fn new(pod_id: String, lc_root: PathBuf, procfs: RawFd) -> Monitor {
        Monitor {
            ev: Sources::default(),
            pod_id,
            lc_root,
            procfs,
            conns: HashMap::new(),
            next_conn: 0,
            ctrs: HashMap::new(),
            pids: HashMap::new(),
            execs: HashMap::new(),
            next_exec: 0,
            streams: HashMap::new(),
            starts: Vec::new(),
            greeted: false,
            shutdown: false,
        }
    }

    /// See `Sources::watch`.
    pub fn watch(&mut self, fd: RawFd, events: i16, f: impl FnMut(&mut Monitor, i16) + 'static) {
        self.ev.watch(fd, events, f);
    }

    /// See `Sources::unwatch`.
    pub fn unwatch(&mut self, fd: RawFd) {
        self.ev.unwatch(fd);
    }

    /// See `Sources::after`.
    pub fn after(&mut self, at: Instant, f: impl FnOnce(&mut Monitor) + 'static) {
        self.ev.after(at, f);
    }
}

/// One connection from berthd.
pub(super) struct Conn {
    pub stream: UnixStream,
    pub rbuf: Vec<u8>,
    pub wbuf: Vec<u8>,
    /// Descriptors to pass (SCM_RIGHTS) with the next bytes written.
    pub fds: Vec<OwnedFd>,
    pub closed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CtrStatus {
    Created,
    Running,
    Exited,
}

/// A container the monitor holds.
pub(super) struct Ctr {
    pub pid: i32,
    /// Its OCI bundle (config.json there).
    pub bundle: PathBuf,
    /// The OCI runtime binary it was made with; `None`: the embedded runtime.
    pub runtime: Option<PathBuf>,
    /// Whether systemd made its cgroup (the runtime is told so at every call).
    pub systemd_cgroup: bool,
    /// The container's cgroup.procs, for killing what its init leaves behind.
    pub cgroup_procs: PathBuf,
    pub status: CtrStatus,
    pub exit: Option<proto::Exit>,
    pub exit_file: PathBuf,
    pub log: Option<LogWriter>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    /// The container's stdin (a pipe's write end, or with a terminal its master): handed to
    /// attach sessions; holding it keeps the stdin open.
    pub stdin: Option<File>,
    pub tty: bool,
    /// The stdin closes when the first attach session that took it ends.
    pub stdin_once: bool,
    /// Attach sessions its output is copied to.
    pub attached: Vec<Attachment>,
    pub start_error: Option<String>,
}

/// One attach session's output pipes (write ends, non-blocking).
pub(super) struct Attachment {
    pub out: Option<File>,
    pub err: Option<File>,
}

/// Who a reaped pid belonged to.
pub(super) enum Owner {
    Container(String),
    Exec(u64),
    Stream(u64),
}

/// A container's start-status pipe: watched from Create on (an end of file before Start means
/// the init died), answered at Start.
pub(super) struct PendingStart {
    /// The StartContainer request waiting for the outcome, once there is one.
    pub waiting: Option<(u64, u64)>,
    pub ctr: String,
    pub pipe: File,
    pub msg: Vec<u8>,
}

/// One ExecSync in flight.
pub(super) struct ExecOp {
    pub conn: u64,
    pub req: u64,
    pub pid: i32,
    pub out: Option<File>,
    pub err: Option<File>,
    pub out_buf: Vec<u8>,
    pub err_buf: Vec<u8>,
    pub max: usize,
    pub timed_out: bool,
    pub exited: Option<i32>,
}

/// What a request's answer carries when it fails.
pub(super) type Failure = (proto::ErrorKind, String);
