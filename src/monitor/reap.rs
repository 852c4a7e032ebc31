//! Reaping: the monitor is the parent (as child subreaper) of every container init, exec'd
//! process and orphan of its pod; each exit is routed to its owner. A container's exit goes to
//! disk before it is reported, after the output still in its pipes is logged.

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::cri_log::Stream;
use super::fanout::fan_out;
use super::io::{now_ns, read_some, write_exit_file};
use super::proto;
use super::state::{Ctr, CtrStatus, Monitor, Owner};

/// The exit code a container gets when its process could not be started (as containerd).
const START_ERROR_CODE: i32 = 128;

impl Monitor {
    /// Reaps every exited child: containers (exit status to disk, then reported), exec'd
    /// processes, and the orphans a subreaper inherits.
    pub fn reap(&mut self) {
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
                Some(Owner::Exec(eid)) => self.exec_exited(eid, code),
                Some(Owner::Stream(sid)) => self.stream_exited(sid, code),
                None => {}
            }
        }
    }

    fn container_exited(&mut self, id: &str, code: i32, signal: i32) {
        // A failed exec writes its reason and exits at once: read the reason before the exit
        // is recorded, whichever the poll reported first.
        if self.starts.iter().any(|s| s.ctr == id) {
            self.start_ready(id);
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
        drain(c);
        // Attached clients see the end of the output now, whoever else still holds the pipes.
        c.attached.clear();
        self.broadcast(proto::Event {
            container_id: id.to_string(),
            exit: Some(exit),
        });
    }
}

/// Logs what a dead container wrote before it died (writers in the same PID namespace are
/// gone with it; output still buffered in the pipes goes to the log).
fn drain(c: &mut Ctr) {
    let mut buf = vec![0u8; 64 * 1024];
    for s in [Stream::Stdout, Stream::Stderr] {
        for _ in 0..64 {
            let f = match s {
                Stream::Stdout => &mut c.stdout,
                Stream::Stderr => &mut c.stderr,
            };
            match f.as_mut().map(|f| read_some(f, &mut buf)) {
                Some(Ok(Some(n))) if n > 0 => {
                    if let Some(l) = c.log.as_mut() {
                        let _ = l.write(s, &buf[..n]);
                    }
                    fan_out(&mut c.attached, s, &buf[..n]);
                }
                _ => break,
            }
        }
    }
}
