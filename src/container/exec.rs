//! ExecSync: a command run in a running container by its monitor, output capped, a timeout
//! killing the command's process tree, never the container. And the sessions the streaming
//! server runs for Exec and Attach, validated here.

use std::time::Duration;

use super::{Containers, EXEC_OUTPUT_LIMIT, ExecOutput, mon_err};
use crate::error::{Error, Result};
use crate::monitor::proto::{self, request};
use crate::streaming::{Io, RemoteCommand};

impl Containers {
    /// ExecSync: runs `cmd` in the container; on timeout only the exec'd process tree dies.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecOutput> {
        let rec = self.running(id)?;
        if cmd.is_empty() {
            return Err(Error::InvalidArgument("ExecSync needs a command".into()));
        }
        let wait = if timeout.is_zero() {
            None
        } else {
            Some(timeout + Duration::from_secs(30))
        };
        let r = self
            .monitor(&rec.pod_id)
            .call(
                request::Op::Exec(proto::Exec {
                    container_id: rec.id.clone(),
                    args: cmd.clone(),
                    env: rec.env.clone(),
                    cwd: rec.cwd.clone(),
                    uid: rec.user.uid,
                    gid: rec.user.gid,
                    additional_gids: rec.user.additional_gids.clone(),
                    timeout_ms: timeout.as_millis() as u64,
                    max_output_bytes: EXEC_OUTPUT_LIMIT,
                    shielded: self.exec_traceable(&rec),
                }),
                wait,
            )
            .await
            .map_err(mon_err)?;
        match r.result {
            Some(proto::response::Result::Exec(e)) if e.timed_out => {
                Err(Error::DeadlineExceeded(format!(
                    "command {cmd:?} timed out after {}s; it was killed (the container was not)",
                    timeout.as_secs()
                )))
            }
            Some(proto::response::Result::Exec(e)) => Ok(ExecOutput {
                stdout: e.stdout,
                stderr: e.stderr,
                exit_code: e.exit_code,
            }),
            _ => Err(Error::Internal(
                "the monitor answered ExecSync without a result".into(),
            )),
        }
    }

    /// The session of a streamed exec (`cmd` given) or an attach: the container runs, the
    /// streams asked for make sense for it.
    pub fn remote_command(
        &self,
        id: &str,
        cmd: Option<Vec<String>>,
        io: Io,
    ) -> Result<RemoteCommand> {
        let call = if cmd.is_some() { "Exec" } else { "Attach" };
        let rec = self.running(id)?;
        if !(io.stdin || io.stdout || io.stderr) {
            return Err(Error::InvalidArgument(format!(
                "{call}: one of stdin, stdout and stderr must be set"
            )));
        }
        if io.tty && io.stderr {
            return Err(Error::InvalidArgument(format!(
                "{call}: tty and stderr cannot both be set (a terminal has one output)"
            )));
        }
        let exec = match cmd {
            Some(c) if c.is_empty() => {
                return Err(Error::InvalidArgument("Exec: cmd is empty".into()));
            }
            Some(args) => Some(proto::Exec {
                container_id: rec.id.clone(),
                args,
                env: rec.env.clone(),
                cwd: rec.cwd.clone(),
                uid: rec.user.uid,
                gid: rec.user.gid,
                additional_gids: rec.user.additional_gids.clone(),
                timeout_ms: 0,
                max_output_bytes: 0,
                shielded: self.exec_traceable(&rec),
            }),
            None => {
                if io.tty != rec.spec.tty {
                    return Err(Error::InvalidArgument(format!(
                        "Attach: tty is {} but container {} was created with tty {}",
                        io.tty, rec.id, rec.spec.tty
                    )));
                }
                if io.stdin && !rec.spec.stdin {
                    return Err(Error::InvalidArgument(format!(
                        "Attach: container {} was not created with stdin",
                        rec.id
                    )));
                }
                None
            }
        };
        Ok(RemoteCommand {
            socket: self.layout.monitor_socket(&rec.pod_id),
            pod_id: rec.pod_id,
            exec,
            container_id: rec.id,
            io,
        })
    }
}
