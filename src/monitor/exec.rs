//! ExecSync in the monitor: the command started in the container (by `enter`, in a helper), its output collected up to a cap, the answer sent once it
//! exited and its pipes closed (or a second later, if something it started holds them), and on
//! timeout its process tree killed, never the container.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::cri_log::Stream;
use super::enter;
use super::helper::in_helper;
use super::io::{pipe, read_some, set_nonblocking};
use super::proto;
use super::state::{CtrStatus, ExecOp, Failure, Monitor, Owner};

/// After an exec'd process exits, how long its output pipes may stay open (held by something
/// it left running) before the answer goes out anyway.
const EXEC_DRAIN: Duration = Duration::from_secs(1);

impl Monitor {
    /// Starts `e` in its container; the answer goes out when it is done.
    pub fn exec(&mut self, conn: u64, req: u64, e: proto::Exec) -> Result<(), Failure> {
        use proto::ErrorKind as K;
        self.can_exec(&e)?;
        let (out_r, out_w) = pipe().map_err(|err| (K::Failed, format!("pipe: {err}")))?;
        let (err_r, err_w) = pipe().map_err(|err| (K::Failed, format!("pipe: {err}")))?;
        let built = self.start_exec(&e, out_w, err_w);
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
        let eid = self.next_exec;
        self.next_exec += 1;
        set_nonblocking(&out_r);
        set_nonblocking(&err_r);
        for (f, s) in [(&out_r, Stream::Stdout), (&err_r, Stream::Stderr)] {
            self.watch(f.as_raw_fd(), libc::POLLIN, move |m, _| m.pump_exec(eid, s));
        }
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
                max: e.max_output_bytes.max(1) as usize,
                timed_out: false,
                exited: None,
            },
        );
        if e.timeout_ms > 0 {
            let at = Instant::now() + Duration::from_millis(e.timeout_ms);
            self.after(at, move |m| m.exec_timed_out(eid));
        }
        // It may already have exited (SIGCHLD pending): the next loop pass reaps it.
        Ok(())
    }

    /// Whether `e` can run: its container runs here, and it names a command.
    pub fn can_exec(&self, e: &proto::Exec) -> Result<(), Failure> {
        use proto::ErrorKind as K;
        match self.ctrs.get(&e.container_id) {
            None => {
                return Err((
                    K::NotFound,
                    format!("container {} is not in this pod's monitor", e.container_id),
                ));
            }
            Some(c) if c.status == CtrStatus::Exited => {
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
        Ok(())
    }

    /// The exec'd process, started by `enter` in a helper (stdin /dev/null, output to the
    /// pipes given); its pid.
    fn start_exec(&self, e: &proto::Exec, out_w: OwnedFd, err_w: OwnedFd) -> Result<i32, String> {
        let null = File::open("/dev/null").map_err(|err| format!("/dev/null: {err}"))?;
        let stdio = [null.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
        let target = self.exec_target(&e.container_id)?;
        let title = format!("berth-exec {}", e.container_id);
        let cmd = enter::Command::of(e);
        in_helper(&title, &stdio, (self.procfs, e.shielded), move || {
            let r = enter::exec_in(&target, &cmd, enter::Stdio::Fds(stdio));
            drop((null, out_w, err_w));
            r
        })
    }

    fn pump_exec(&mut self, eid: u64, s: Stream) {
        let Some(e) = self.execs.get_mut(&eid) else {
            return;
        };
        let (f, b) = match s {
            Stream::Stdout => (&mut e.out, &mut e.out_buf),
            Stream::Stderr => (&mut e.err, &mut e.err_buf),
        };
        let Some(file) = f.as_mut() else { return };
        let mut buf = [0u8; 64 * 1024];
        for _ in 0..16 {
            match read_some(file, &mut buf) {
                Ok(Some(0)) => return,
                Ok(Some(n)) => {
                    // Output past the cap is read (so the process never blocks) and dropped.
                    let room = (e.max + 1).saturating_sub(b.len());
                    b.extend_from_slice(&buf[..n.min(room)]);
                }
                Ok(None) | Err(_) => {
                    let fd = file.as_raw_fd();
                    *f = None;
                    let done = e.exited.is_some() && e.out.is_none() && e.err.is_none();
                    self.unwatch(fd);
                    if done {
                        self.finish_exec(eid);
                    }
                    return;
                }
            }
        }
    }

    /// The exec'd process was reaped: answered once its pipes close, at the latest after
    /// `EXEC_DRAIN`.
    pub fn exec_exited(&mut self, eid: u64, code: i32) {
        let Some(e) = self.execs.get_mut(&eid) else {
            return;
        };
        e.exited = Some(code);
        if e.out.is_none() && e.err.is_none() {
            self.finish_exec(eid);
        } else {
            self.after(Instant::now() + EXEC_DRAIN, move |m| m.finish_exec(eid));
        }
    }

    /// Kills the process tree of an exec past its deadline (never the container).
    fn exec_timed_out(&mut self, eid: u64) {
        if let Some(e) = self.execs.get_mut(&eid)
            && e.exited.is_none()
        {
            e.timed_out = true;
            kill_tree(e.pid);
        }
    }

    fn finish_exec(&mut self, eid: u64) {
        let Some(mut e) = self.execs.remove(&eid) else {
            return;
        };
        for f in [e.out.take(), e.err.take()].into_iter().flatten() {
            self.unwatch(f.as_raw_fd());
        }
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
