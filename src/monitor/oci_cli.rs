//! Containers of a runtime handler whose runtime is a binary speaking the OCI runtime command
//! line (runc): `create`, `start` and `delete`, each a short-lived child of the monitor (the
//! create in a helper, like the embedded runtime's, so the container's processes hold nothing
//! of the monitor). The runtime hands the container its own standard descriptors (our pipes)
//! or, with a terminal, sends the master over the console socket. Its state lives under the
//! container's directory in the monitor's state root, its log (JSON) beside it; the container
//! init it leaves behind is re-parented to the monitor (a subreaper), which reaps and signals
//! it as any other.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// One container under an OCI runtime binary.
#[derive(Clone)]
pub(super) struct OciCli {
    /// The runtime binary.
    pub binary: PathBuf,
    /// Its `--root` (state) directory, this container's alone.
    pub root: PathBuf,
    /// The container's id for the runtime.
    pub id: String,
    /// `--systemd-cgroup`: systemd makes the container's cgroup (a scope).
    pub systemd_cgroup: bool,
}

/// What the container's stdio is.
pub(super) enum CliIo {
    /// These descriptors as its 0, 1 and 2.
    Fds([OwnedFd; 3]),
    /// A terminal, whose master the runtime sends over this socket.
    Console(PathBuf),
}

impl OciCli {
    fn log(&self) -> PathBuf {
        self.root.join("runtime.log")
    }

    fn command(&self) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(&self.binary);
        // The monitor blocks SIGCHLD and SIGPIPE for its signalfd; a child inherits the mask
        // through exec, and the runtime passes what it does not handle itself on to the
        // container's process (runc 1.1 left SIGPIPE blocked in it).
        // SAFETY: between fork and exec only sigprocmask runs, which is async-signal-safe,
        // and it touches no memory of the parent's.
        unsafe {
            c.pre_exec(|| {
                nix::sys::signal::SigSet::empty()
                    .thread_set_mask()
                    .map_err(std::io::Error::from)
            });
        }
        if self.systemd_cgroup {
            c.arg("--systemd-cgroup");
        }
        c.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(self.log())
            .arg("--log-format")
            .arg("json");
        c
    }

    /// `create`: the container's init waits for `start`; its pid.
    pub fn create(&self, bundle: &Path, io: CliIo) -> Result<i32, String> {
        std::fs::create_dir_all(&self.root).map_err(|e| format!("{}: {e}", self.root.display()))?;
        let pid_file = self.root.join("init.pid");
        let mut c = self.command();
        c.arg("create")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file);
        match io {
            CliIo::Fds([i, o, e]) => {
                c.stdin(Stdio::from(i))
                    .stdout(Stdio::from(o))
                    .stderr(Stdio::from(e));
            }
            CliIo::Console(sock) => {
                c.arg("--console-socket")
                    .arg(sock)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
            }
        }
        c.arg(&self.id);
        self.run(c, "create")?;
        let pid = std::fs::read_to_string(&pid_file)
            .map_err(|e| format!("{}: {e}", pid_file.display()))?;
        pid.trim()
            .parse()
            .map_err(|_| format!("{}: not a pid: {pid:?}", pid_file.display()))
    }

    /// `start`: the init execs the container's command.
    pub fn start(&self) -> Result<(), String> {
        let mut c = self.command();
        c.arg("start").arg(&self.id);
        quiet(&mut c);
        self.run(c, "start")
    }

    /// `delete --force`: the runtime's state and the container's cgroups go; a container the
    /// runtime no longer knows is already deleted.
    pub fn delete(&self) -> Result<(), String> {
        if !self.root.join(&self.id).exists() {
            let _ = std::fs::remove_dir_all(&self.root);
            return Ok(());
        }
        let mut c = self.command();
        c.arg("delete").arg("--force").arg(&self.id);
        quiet(&mut c);
        self.run(c, "delete")?;
        let _ = std::fs::remove_dir_all(&self.root);
        Ok(())
    }

    /// Runs `c` to its end; a failure carries what the runtime logged.
    fn run(&self, mut c: Command, what: &str) -> Result<(), String> {
        let _ = std::fs::remove_file(self.log());
        let status = c
            .status()
            .map_err(|e| format!("{} {what}: {e}", self.binary.display()))?;
        if status.success() {
            return Ok(());
        }
        let logged = errors_logged(&self.log());
        Err(format!(
            "{} {what} failed ({status}){}",
            self.binary.display(),
            if logged.is_empty() {
                String::new()
            } else {
                format!(": {logged}")
            }
        ))
    }
}

fn quiet(c: &mut Command) {
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
}

/// The error lines of the runtime's JSON log, their messages joined.
fn errors_logged(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let msgs: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
        .filter_map(|v| v["msg"].as_str().map(str::to_string))
        .collect();
    msgs.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtimes_json_log_gives_its_errors() {
        let dir = std::env::temp_dir().join(format!("berth-ocicli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("runtime.log");
        std::fs::write(
            &log,
            "{\"level\":\"info\",\"msg\":\"x\"}\nnot json\n\
             {\"level\":\"error\",\"msg\":\"exec: \\\"nope\\\": executable file not found in $PATH\"}\n",
        )
        .unwrap();
        assert_eq!(
            errors_logged(&log),
            "exec: \"nope\": executable file not found in $PATH"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
