//! The pod's containers in the monitor: created with libcontainer (in a helper, see
//! `super::helper`), started through the start-status pipe that tells "exec'd" from "could not
//! start", signalled, reaped (exit status to disk before it is reported), their output pumped
//! into CRI logs, deleted.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::cri_log::{LogWriter, Stream};
use super::fanout::{end_stream, fan_out};
use super::helper::in_helper;
use super::io::{pipe, read_some, receive_pty_master, set_nonblocking};
use super::oci_cli::{CliIo, OciCli};
use super::proto;
use super::state::{Ctr, CtrStatus, Failure, Monitor, Owner, PendingStart};

/// How much of a stream one wakeup reads, so one chatty container cannot starve the rest.
const PUMP_ROUNDS: usize = 16;

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
        // The monitor blocks SIGCHLD and SIGPIPE for its signalfd; a mask survives exec.
        let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
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

fn not_found(c: &str) -> Failure {
    (
        proto::ErrorKind::NotFound,
        format!("container {c} is not in this pod's monitor"),
    )
}

impl Monitor {
    /// The state of every container.
    pub fn states(&self) -> proto::States {
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
    pub fn create(&mut self, c: proto::Create) -> Result<i32, String> {
        if self.ctrs.contains_key(&c.container_id) {
            return Err(format!("container {} exists already", c.container_id));
        }
        let log = if c.log_path.is_empty() {
            None
        } else {
            // The pod's log directory is kubelet's; only what lies beneath it is the log's.
            let path = Path::new(&c.log_path);
            let (dir, rel) = match path.strip_prefix(&c.log_directory) {
                Ok(rel) if !c.log_directory.is_empty() => (Path::new(&c.log_directory), rel),
                _ => (
                    path.parent().unwrap_or(Path::new("/")),
                    Path::new(path.file_name().unwrap_or_default()),
                ),
            };
            Some(
                LogWriter::open(dir, rel)
                    .map_err(|e| format!("opening log {}: {e}", c.log_path))?,
            )
        };
        if !c.runtime.is_empty() {
            return self.create_with_cli(c, log);
        }
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
        let (builder, io) = self.container_io(&c, &lcid, builder, &mut keep)?;
        let bundle = c.bundle.clone();
        let title = format!("berth-create {}", c.container_id);
        let systemd = c.systemd_cgroup;
        let built = in_helper(&title, &keep, (self.procfs, c.shielded), move || {
            let container = builder
                .as_init(&bundle)
                .with_systemd(systemd)
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
        let (stdout, stderr, stdin) = match finish_create(&c, pid, io) {
            Ok(s) => s,
            Err(e) => {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                if let Ok(mut lc) = Container::load(self.lc_root.join(&lcid)) {
                    let _ = lc.delete(true);
                }
                return Err(e);
            }
        };
        self.hold(c, pid, log, Some(status_r), stdout, stderr, stdin);
        Ok(pid)
    }

    /// Creates a container with the OCI runtime binary `c.runtime` (see `oci_cli`). A
    /// command that cannot be run fails here, as that runtime checks it at create.
    fn create_with_cli(&mut self, c: proto::Create, log: Option<LogWriter>) -> Result<i32, String> {
        let lcid = lc_id(&c.container_id).to_string();
        let cli = OciCli {
            binary: PathBuf::from(&c.runtime),
            root: self.lc_root.join(&lcid),
            id: lcid.clone(),
            systemd_cgroup: c.systemd_cgroup,
        };
        let mut keep = Vec::new();
        let (cli_io, io) = if c.tty {
            let (console, sock) = self.console_socket(&lcid)?;
            (CliIo::Console(sock.clone()), Io::Terminal { console, sock })
        } else {
            let (out_r, out_w) = pipe().map_err(|e| format!("stdout pipe: {e}"))?;
            let (err_r, err_w) = pipe().map_err(|e| format!("stderr pipe: {e}"))?;
            let (stdin, stdin_fd) = stdin_pipe(c.stdin)?;
            keep.extend([stdin_fd.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()]);
            let io = Io::Pipes {
                out: out_r,
                err: err_r,
                stdin,
            };
            (CliIo::Fds([stdin_fd, out_w, err_w]), io)
        };
        let bundle = PathBuf::from(&c.bundle);
        let title = format!("berth-create {}", c.container_id);
        let creator = cli.clone();
        let built = in_helper(&title, &keep, (self.procfs, c.shielded), move || {
            creator.create(&bundle, cli_io)
        });
        let pid = built.inspect_err(|_| {
            let _ = cli.delete();
        })?;
        let (stdout, stderr, stdin) = match finish_create(&c, pid, io) {
            Ok(s) => s,
            Err(e) => {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = cli.delete();
                return Err(e);
            }
        };
        self.hold(c, pid, log, None, stdout, stderr, stdin);
        Ok(pid)
    }

    /// A listening socket the runtime sends a new container's terminal master to.
    fn console_socket(&self, lcid: &str) -> Result<(UnixListener, PathBuf), String> {
        let sock = self.lc_root.join(format!("{lcid}.tty"));
        let _ = std::fs::remove_file(&sock);
        let console = UnixListener::bind(&sock).map_err(|e| format!("console socket: {e}"))?;
        Ok((console, sock))
    }

    /// The running container an exec enters.
    pub(super) fn exec_target(&self, id: &str) -> Result<super::enter::Target, String> {
        let c = self
            .ctrs
            .get(id)
            .ok_or_else(|| format!("container {id} is not in this pod's monitor"))?;
        Ok(super::enter::Target {
            init: c.pid,
            bundle: c.bundle.clone(),
        })
    }

    /// The OCI runtime command line for container `id`, if it was made with a binary.
    fn cli(&self, id: &str) -> Option<OciCli> {
        let c = self.ctrs.get(id)?;
        let lcid = lc_id(id).to_string();
        Some(OciCli {
            binary: c.runtime.clone()?,
            root: self.lc_root.join(&lcid),
            id: lcid,
            systemd_cgroup: c.systemd_cgroup,
        })
    }

    /// The container's stdio: pipes (their write ends added to `keep`), or with a terminal the
    /// pty master libcontainer's init makes and hands over a console socket (the runc
    /// protocol); it carries output (logged as stdout) and input.
    fn container_io(
        &self,
        c: &proto::Create,
        lcid: &str,
        builder: ContainerBuilder,
        keep: &mut Vec<RawFd>,
    ) -> Result<(ContainerBuilder, Io), String> {
        if c.tty {
            let (console, sock) = self.console_socket(lcid)?;
            Ok((
                builder.with_console_socket(Some(&sock)),
                Io::Terminal { console, sock },
            ))
        } else {
            let (out_r, out_w) = pipe().map_err(|e| format!("stdout pipe: {e}"))?;
            let (err_r, err_w) = pipe().map_err(|e| format!("stderr pipe: {e}"))?;
            let (stdin_keep, stdin_fd) = stdin_pipe(c.stdin)?;
            keep.extend([stdin_fd.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()]);
            let b = builder
                .with_stdin(stdin_fd)
                .with_stdout(out_w)
                .with_stderr(err_w);
            let io = Io::Pipes {
                out: out_r,
                err: err_r,
                stdin: stdin_keep,
            };
            Ok((b, io))
        }
    }

    /// Keeps a created container: its pid, output pumps and start-status pipe registered.
    #[allow(clippy::too_many_arguments)]
    fn hold(
        &mut self,
        c: proto::Create,
        pid: i32,
        log: Option<LogWriter>,
        status: Option<File>,
        stdout: File,
        stderr: Option<File>,
        stdin: Option<File>,
    ) {
        let id = c.container_id.clone();
        set_nonblocking(&stdout);
        let out_fd = stdout.as_raw_fd();
        let err_fd = stderr.as_ref().map(|e| {
            set_nonblocking(e);
            e.as_raw_fd()
        });
        self.pids.insert(pid, Owner::Container(id.clone()));
        self.ctrs.insert(
            id.clone(),
            Ctr {
                pid,
                bundle: PathBuf::from(&c.bundle),
                runtime: (!c.runtime.is_empty()).then(|| PathBuf::from(&c.runtime)),
                systemd_cgroup: c.systemd_cgroup,
                cgroup_procs: PathBuf::from(&c.cgroup_procs),
                status: CtrStatus::Created,
                exit: None,
                exit_file: PathBuf::from(c.exit_file),
                log,
                stdout: Some(stdout),
                stderr,
                stdin,
                tty: c.tty,
                stdin_once: c.stdin_once,
                attached: Vec::new(),
                start_error: None,
            },
        );
        let ctr = id.clone();
        self.watch(out_fd, libc::POLLIN, move |m, _| {
            m.pump_ctr(&ctr, Stream::Stdout)
        });
        if let Some(fd) = err_fd {
            let ctr = id.clone();
            self.watch(fd, libc::POLLIN, move |m, _| {
                m.pump_ctr(&ctr, Stream::Stderr)
            });
        }
        // The status pipe is watched from now on and answered at Start. A runtime binary's
        // start answers for itself.
        if let Some(status) = status {
            set_nonblocking(&status);
            let status_fd = status.as_raw_fd();
            self.starts.push(PendingStart {
                waiting: None,
                ctr: id.clone(),
                pipe: status,
                msg: Vec::new(),
            });
            self.watch(status_fd, libc::POLLIN, move |m, _| m.start_ready(&id));
        }
    }

    /// Tells the container's init to exec its command; the answer waits for the status pipe.
    pub fn start(&mut self, conn: u64, req: u64, id: &str) -> Result<(), Failure> {
        use proto::ErrorKind as K;
        let Some(c) = self.ctrs.get(id) else {
            return Err(not_found(id));
        };
        if c.status != CtrStatus::Created {
            return Err((
                K::Invalid,
                format!("container {id} is not in the created state"),
            ));
        }
        if let Some(cli) = self.cli(id) {
            cli.start().map_err(|e| (K::StartFailed, e))?;
        } else {
            let mut lc = Container::load(self.lc_root.join(lc_id(id)))
                .map_err(|e| (K::Failed, format!("loading container state: {e}")))?;
            lc.start()
                .map_err(|e| (K::Failed, format!("starting container: {e}")))?;
        }
        if let Some(c) = self.ctrs.get_mut(id) {
            c.status = CtrStatus::Running;
        }
        match self.starts.iter_mut().find(|s| s.ctr == id) {
            Some(s) => s.waiting = Some((conn, req)),
            // The init died before it could be told to start: the exit is reported as usual.
            None => self.respond(conn, req, Ok(None)),
        }
        Ok(())
    }

    /// The status pipe has news: the init exec'd (end of file, nothing written), failed to
    /// (the message), or died before Start.
    pub(super) fn start_ready(&mut self, ctr: &str) {
        let Some(i) = self.starts.iter().position(|s| s.ctr == ctr) else {
            return;
        };
        let s = &mut self.starts[i];
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
        let s = self.starts.remove(i);
        self.unwatch(s.pipe.as_raw_fd());
        let msg = String::from_utf8_lossy(&s.msg).into_owned();
        if !msg.is_empty()
            && let Some(c) = self.ctrs.get_mut(ctr)
        {
            c.start_error = Some(msg.clone());
        }
        if let Some((conn, req)) = s.waiting {
            if msg.is_empty() {
                self.respond(conn, req, Ok(None));
            } else {
                self.respond(conn, req, Err((proto::ErrorKind::StartFailed, msg)));
            }
        }
    }

    /// Signals a container's init; SIGKILL takes what else runs in its cgroup too.
    pub fn kill(
        &mut self,
        id: &str,
        signal: i32,
    ) -> Result<Option<proto::response::Result>, Failure> {
        match self.ctrs.get(id) {
            None => Err(not_found(id)),
            Some(c) if c.status == CtrStatus::Exited => Ok(None),
            Some(c) => {
                let sig = Signal::try_from(signal).unwrap_or(Signal::SIGKILL);
                if sig == Signal::SIGKILL {
                    crate::cgroup::kill_procs(&c.cgroup_procs);
                }
                // The init is our child until reaped, so its pid cannot be reused.
                match nix::sys::signal::kill(Pid::from_raw(c.pid), sig) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(None),
                    Err(e) => Err((
                        proto::ErrorKind::Failed,
                        format!("signalling container {id}: {e}"),
                    )),
                }
            }
        }
    }

    /// Reopens a container's log file (kubelet rotated it).
    pub fn reopen_log(&mut self, id: &str) -> Result<Option<proto::response::Result>, Failure> {
        use proto::ErrorKind as K;
        match self.ctrs.get_mut(id) {
            None => Err(not_found(id)),
            Some(c) => match c.log.as_mut() {
                None => Err((K::Invalid, "the container has no log file".into())),
                Some(l) => l
                    .reopen()
                    .map(|()| None)
                    .map_err(|e| (K::Failed, format!("reopening the log: {e}"))),
            },
        }
    }

    fn pump_ctr(&mut self, id: &str, s: Stream) {
        let Some(c) = self.ctrs.get_mut(id) else {
            return;
        };
        let f = match s {
            Stream::Stdout => &mut c.stdout,
            Stream::Stderr => &mut c.stderr,
        };
        let Some(file) = f.as_mut() else { return };
        let mut buf = [0u8; 64 * 1024];
        for _ in 0..PUMP_ROUNDS {
            match read_some(file, &mut buf) {
                Ok(Some(0)) => return,
                Ok(Some(n)) => {
                    if let Some(l) = c.log.as_mut() {
                        let _ = l.write(s, &buf[..n]);
                    }
                    fan_out(&mut c.attached, s, &buf[..n]);
                }
                Ok(None) | Err(_) => {
                    let fd = file.as_raw_fd();
                    *f = None;
                    if let Some(l) = c.log.as_mut() {
                        let _ = l.finish(s);
                    }
                    end_stream(&mut c.attached, s);
                    self.unwatch(fd);
                    return;
                }
            }
        }
    }

    /// Forgets a container: its init killed first when `force`, libcontainer's state removed.
    pub fn delete(
        &mut self,
        id: &str,
        force: bool,
    ) -> Result<Option<proto::response::Result>, Failure> {
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
        if let Some(cli) = self.cli(id) {
            cli.delete()
                .map_err(|e| (K::Failed, format!("deleting container {id}: {e}")))?;
        } else if dir.exists() {
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
        if let Some(c) = self.ctrs.remove(id) {
            for f in [c.stdout.as_ref(), c.stderr.as_ref()].into_iter().flatten() {
                self.unwatch(f.as_raw_fd());
            }
        }
        if let Some(i) = self.starts.iter().position(|s| s.ctr == id) {
            let s = self.starts.remove(i);
            self.unwatch(s.pipe.as_raw_fd());
        }
        Ok(None)
    }
}

/// The container's stdin: a pipe (ours the write end) when it has one, else /dev/null.
fn stdin_pipe(wanted: bool) -> Result<(Option<File>, OwnedFd), String> {
    if wanted {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("stdin pipe: {e}"))?;
        Ok((Some(File::from(w)), r))
    } else {
        let null = File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
        Ok((None, OwnedFd::from(null)))
    }
}

/// After the create: the init's ids checked, oom_score_adj set on it, and the output it will
/// write.
fn finish_create(
    c: &proto::Create,
    pid: i32,
    io: Io,
) -> Result<(File, Option<File>, Option<File>), String> {
    check_ids(pid, c.host_uid, c.host_gid)?;
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
}

/// Both runtimes switch the init's ids before it waits for Start; an init that does not hold
/// exactly the uid and gid berth resolved (real, effective, saved and filesystem) is refused,
/// never started: a runtime that read an id as "leave unchanged" would run it as root.
fn check_ids(pid: i32, uid: u32, gid: u32) -> Result<(), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading the container's ids: {e}"))?;
    for (key, want) in [("Uid:", uid), ("Gid:", gid)] {
        let have: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if have.len() != 4 || have.iter().any(|h| *h != want) {
            return Err(format!(
                "the runtime left the container's init with {key} {have:?}, not {want} (refused)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_init_holding_other_ids_is_refused() {
        let me = std::process::id() as i32;
        let (u, g) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        super::check_ids(me, u, g).unwrap();
        assert!(super::check_ids(me, u + 1, g).is_err());
        assert!(super::check_ids(me, u, 4294967295).is_err());
    }
}
