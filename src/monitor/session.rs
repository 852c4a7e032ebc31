//! Streamed sessions in the monitor, for the streaming server's exec and attach: an exec whose
//! stdio berthd copies to a client (pipes, or a terminal of the container's own devpts), and
//! attachments to a container's own stdio (its output copied to each session's pipes as it is
//! logged, its stdin shared). The descriptors go to berthd with the answer (SCM_RIGHTS).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use super::cri_log::Stream;
use super::enter;
use super::helper::in_helper;
use super::io::{pipe, receive_fd, set_nonblocking};
use super::proto;
use super::state::{Attachment, CtrStatus, Failure, Monitor, Owner};

/// How much of a container's output may wait for a slow attached client before its chunks are
/// dropped for that client (never for the log, never by stalling the container).
const ATTACH_PIPE_BYTES: libc::c_int = 1 << 20;

impl Monitor {
    /// Starts a streamed exec; answered with its descriptors, and again when it exits.
    pub fn exec_stream(
        &mut self,
        conn: u64,
        req: u64,
        s: proto::ExecStream,
    ) -> Result<(), Failure> {
        use proto::ErrorKind as K;
        let e = s
            .exec
            .ok_or((K::Invalid, "exec stream without a command".into()))?;
        self.can_exec(&e)?;
        let target = self
            .exec_target(&e.container_id)
            .map_err(|m| (K::Invalid, m))?;
        let title = format!("berth-exec {}", e.container_id);
        let cmd = enter::Command::of(&e);
        let failed = |m: String| (K::Failed, m);
        let (pid, fds) = if s.tty {
            let (ours, theirs) = UnixStream::pair().map_err(|e| failed(format!("socket: {e}")))?;
            let to = theirs.as_raw_fd();
            let pid = in_helper(&title, &[to], (self.procfs, e.shielded), move || {
                enter::exec_in(&target, &cmd, enter::Stdio::Terminal { to })
            })
            .map_err(|m| (K::Invalid, m))?;
            drop(theirs);
            let master = receive_fd(&ours).map_err(|e| failed(format!("the terminal: {e}")))?;
            (pid, vec![("terminal", OwnedFd::from(master))])
        } else {
            let mut passed: Vec<(&str, OwnedFd)> = Vec::new();
            let mut child: Vec<OwnedFd> = Vec::new();
            for (name, wanted, input) in [
                ("stdin", s.stdin, true),
                ("stdout", s.stdout, false),
                ("stderr", s.stderr, false),
            ] {
                if !wanted {
                    let null = File::open("/dev/null").map_err(|e| failed(format!("{e}")))?;
                    child.push(null.into());
                    continue;
                }
                let (r, w) = pipe().map_err(|e| failed(format!("{name} pipe: {e}")))?;
                let (theirs, ours): (OwnedFd, OwnedFd) =
                    if input { (r.into(), w) } else { (w, r.into()) };
                child.push(theirs);
                passed.push((name, ours));
            }
            let stdio = [
                child[0].as_raw_fd(),
                child[1].as_raw_fd(),
                child[2].as_raw_fd(),
            ];
            let pid = in_helper(&title, &stdio, (self.procfs, e.shielded), move || {
                let r = enter::exec_in(&target, &cmd, enter::Stdio::Fds(stdio));
                drop(child);
                r
            })
            .map_err(|m| (K::Invalid, m))?;
            (pid, passed)
        };
        let sid = self.next_exec;
        self.next_exec += 1;
        self.pids.insert(pid, Owner::Stream(sid));
        self.streams.insert(sid, (conn, req));
        self.answer_with_fds(conn, req, pid, fds);
        Ok(())
    }

    /// A streamed exec's process was reaped: its second answer.
    pub fn stream_exited(&mut self, sid: u64, code: i32) {
        if let Some((conn, req)) = self.streams.remove(&sid) {
            let exited = proto::Exited { exit_code: code };
            self.respond(conn, req, Ok(Some(proto::response::Result::Exited(exited))));
        }
    }

    /// Attaches a session to a running container's stdio.
    pub fn attach(&mut self, conn: u64, req: u64, a: proto::Attach) -> Result<(), Failure> {
        use proto::ErrorKind as K;
        let id = &a.container_id;
        let c = self.ctrs.get_mut(id).ok_or((
            K::NotFound,
            format!("container {id} is not in this pod's monitor"),
        ))?;
        if c.status != CtrStatus::Running {
            return Err((K::Invalid, format!("container {id} is not running")));
        }
        let failed = |m: String| (K::Failed, m);
        let mut fds: Vec<(&str, OwnedFd)> = Vec::new();
        if a.stdin || c.tty {
            // With a terminal its master is passed even without stdin: the window size is
            // set on it.
            let name = if c.tty { "terminal" } else { "stdin" };
            let Some(stdin) = c.stdin.as_ref() else {
                return Err((
                    K::Invalid,
                    format!(
                        "container {id} was not created with stdin (or its stdin was closed by an earlier attach)"
                    ),
                ));
            };
            let dup = stdin
                .try_clone()
                .map_err(|e| failed(format!("stdin: {e}")))?;
            fds.push((name, dup.into()));
            if a.stdin && c.stdin_once && !c.tty {
                // Its stdin closes when this session lets go of it.
                c.stdin = None;
            }
        }
        let mut att = Attachment {
            out: None,
            err: None,
        };
        let streams = [
            (Stream::Stdout, a.stdout, c.stdout.is_some()),
            (Stream::Stderr, a.stderr && !c.tty, c.stderr.is_some()),
        ];
        for (s, wanted, open) in streams {
            if !wanted {
                continue;
            }
            let (r, w) = pipe().map_err(|e| failed(format!("output pipe: {e}")))?;
            let w = File::from(w);
            set_nonblocking(&w);
            // SAFETY: F_SETPIPE_SZ takes an int and only resizes the pipe's buffer.
            unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, ATTACH_PIPE_BYTES) };
            fds.push((s.name(), r.into()));
            // An output that already ended is passed closed: the session sees its end.
            if open {
                match s {
                    Stream::Stdout => att.out = Some(w),
                    Stream::Stderr => att.err = Some(w),
                }
            }
        }
        if att.out.is_some() || att.err.is_some() {
            c.attached.push(att);
        }
        let pid = c.pid;
        self.answer_with_fds(conn, req, pid, fds);
        Ok(())
    }

    fn answer_with_fds(&mut self, conn: u64, req: u64, pid: i32, fds: Vec<(&str, OwnedFd)>) {
        let names = fds.iter().map(|(n, _)| n.to_string()).collect();
        let streams = proto::Streams { fds: names, pid };
        let fds = fds.into_iter().map(|(_, f)| f).collect();
        self.respond_with_fds(
            conn,
            req,
            Some(proto::response::Result::Streams(streams)),
            fds,
        );
    }
}
