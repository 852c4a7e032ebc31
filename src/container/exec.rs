//! ExecSync: a command run in a running container by its monitor, output capped, a timeout
//! killing the command's process tree, never the container.

use std::time::Duration;

use super::{Containers, EXEC_OUTPUT_LIMIT, ExecOutput, mon_err};
use crate::error::{Error, Result};
use crate::monitor::proto::{self, request};

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
}
