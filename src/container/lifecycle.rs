//! StartContainer, StopContainer (the stop signal, then SIGKILL), RemoveContainer and
//! ReopenContainerLog: each asks the pod's monitor and records what changed.

use std::time::Duration;

use super::{Containers, CtrState, EventKind, mon_err, name_key, now_ns};
use crate::error::{Error, Result};
use crate::monitor::client::MonitorError;
use crate::monitor::proto::{self, request};

impl Containers {
    /// StartContainer.
    pub async fn start(&self, id: &str) -> Result<()> {
        let ctr = self.get(id)?;
        let _op = ctr.op.lock().await;
        let rec = ctr.record();
        // Whoever starts it knows its id: an unclaimed container is claimed.
        self.names.claim(
            &name_key(&rec.pod_id, &rec.spec.name, rec.spec.attempt),
            &rec.id,
        );
        match rec.state {
            CtrState::Created => {}
            CtrState::Running => {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is already running",
                    rec.id
                )));
            }
            s => {
                return Err(Error::FailedPrecondition(format!(
                    "container {} is {s:?}, not created",
                    rec.id
                )));
            }
        }
        let mut exited = ctr.exited.subscribe();
        // Until the outcome is recorded (an exit handled before that is of a started container).
        let starting = Starting::begin(&ctr.starting);
        let r = self
            .monitor(&rec.pod_id)
            .call(
                request::Op::Start(proto::Start {
                    container_id: rec.id.clone(),
                }),
                Some(Duration::from_secs(60)),
            )
            .await;
        match r {
            Ok(_) => {
                crate::failpoint::hit("start:started").await;
                let _order = ctr.publishing.lock().expect("container events poisoned");
                let mut r = ctr.record.write().expect("container record poisoned");
                // An exit that came first was recorded, and published after a Started of its
                // own (see `exits`).
                let now_running = r.state == CtrState::Created;
                if now_running {
                    r.state = CtrState::Running;
                    r.started_at = now_ns();
                }
                // Written under the record's lock: an exit recorded meanwhile is never
                // overwritten by this older state.
                let persisted = self.persist(&r);
                drop(r);
                drop(starting);
                persisted?;
                tracing::info!(container = %rec.id, "container started");
                if now_running {
                    self.publish(&rec.id, &rec.pod_id, EventKind::Started, None);
                }
                Ok(())
            }
            Err(MonitorError::Failed {
                kind: proto::ErrorKind::StartFailed,
                message,
            }) => {
                {
                    let mut r = ctr.record.write().expect("container record poisoned");
                    r.started_at = now_ns();
                }
                // The process exits at once; its exit (code 128, StartError) is recorded before
                // the answer, so a status right after shows it.
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await;
                Err(Error::Internal(format!(
                    "starting container {}: {message}",
                    rec.id
                )))
            }
            Err(e) => Err(mon_err(e)),
        }
    }
}

/// `Ctr::starting` set while it lives.
struct Starting<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> Starting<'a> {
    fn begin(flag: &'a std::sync::atomic::AtomicBool) -> Starting<'a> {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        Starting(flag)
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Containers {
    /// StopContainer: the stop signal, then SIGKILL after `timeout`. Unknown or stopped: fine.
    pub async fn stop(&self, id: &str, timeout: Duration) -> Result<()> {
        let Some(ctr) = crate::error::optional(self.get(id))? else {
            return Ok(());
        };
        let _op = ctr.op.lock().await;
        let rec = ctr.record();
        if !matches!(rec.state, CtrState::Created | CtrState::Running) {
            return Ok(());
        }
        let mon = self.monitor(&rec.pod_id);
        let mut exited = ctr.exited.subscribe();
        let kill = |sig: i32| {
            let mon = mon.clone();
            let id = rec.id.clone();
            async move {
                mon.call(
                    request::Op::Kill(proto::Kill {
                        container_id: id,
                        signal: sig,
                    }),
                    Some(Duration::from_secs(10)),
                )
                .await
            }
        };
        if rec.state == CtrState::Running && !timeout.is_zero() {
            let sig = signal_number(&rec.stop_signal).unwrap_or(libc::SIGTERM);
            tracing::info!(container = %rec.id, signal = sig, timeout_s = timeout.as_secs(), "stopping container");
            kill(sig).await.map_err(mon_err)?;
            if tokio::time::timeout(timeout, exited.wait_for(|e| *e))
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        kill(libc::SIGKILL).await.map_err(mon_err)?;
        crate::failpoint::hit("stop:killed").await;
        match tokio::time::timeout(Duration::from_secs(30), exited.wait_for(|e| *e)).await {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "container {} did not exit after SIGKILL",
                rec.id
            ))),
        }
    }

    /// RemoveContainer: stops it if it runs, then removes everything of it. Unknown: fine.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let Some(ctr) = crate::error::optional(self.get(id))? else {
            return Ok(());
        };
        self.stop(&ctr.id, Duration::ZERO).await?;
        let _op = ctr.op.lock().await;
        let rec = ctr.record();
        if !self
            .ctrs
            .read()
            .expect("containers poisoned")
            .contains_key(&rec.id)
        {
            return Ok(());
        }
        match self
            .monitor(&rec.pod_id)
            .call(
                request::Op::Delete(proto::Delete {
                    container_id: rec.id.clone(),
                    force: false,
                }),
                Some(Duration::from_secs(30)),
            )
            .await
        {
            // The monitor answers Ok for a container it no longer holds (a RemoveContainer
            // interrupted after its delete, then retried).
            Ok(_) | Err(MonitorError::Unreachable { .. }) => {}
            Err(e) => return Err(mon_err(e)),
        }
        crate::failpoint::hit("remove:deleted").await;
        self.remove_files(&rec.id).await;
        self.ctrs
            .write()
            .expect("containers poisoned")
            .remove(&rec.id);
        self.names.release(
            &name_key(&rec.pod_id, &rec.spec.name, rec.spec.attempt),
            &rec.id,
        );
        tracing::info!(container = %rec.id, "container removed");
        self.publish(&rec.id, &rec.pod_id, EventKind::Deleted, None);
        Ok(())
    }

    /// ReopenContainerLog: only for a running container.
    pub async fn reopen_log(&self, id: &str) -> Result<()> {
        let rec = self.running(id)?;
        if rec.log_path.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "container {} has no log path",
                rec.id
            )));
        }
        self.monitor(&rec.pod_id)
            .call(
                request::Op::ReopenLog(proto::ReopenLog {
                    container_id: rec.id,
                }),
                Some(Duration::from_secs(10)),
            )
            .await
            .map(|_| ())
            .map_err(mon_err)
    }
}

/// A signal by name (`SIGTERM`, `TERM`, `SIGRTMIN+3`, `SIGCLD`) or number (`15`), as an
/// image's STOPSIGNAL or a CRI stop_signal gives it; none for anything else.
pub fn signal_number(s: &str) -> Option<i32> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(n) = s.parse::<i32>() {
        return (1..=libc::SIGRTMAX()).contains(&n).then_some(n);
    }
    let upper = s.to_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    // Real-time signals are counted from either end of their range.
    let rt = |base: i32, off: &str, sign: i32| {
        let off: i32 = if off.is_empty() { 0 } else { off.parse().ok()? };
        let n = base + sign * off;
        (libc::SIGRTMIN()..=libc::SIGRTMAX())
            .contains(&n)
            .then_some(n)
    };
    if let Some(off) = name.strip_prefix("RTMIN") {
        return match off.strip_prefix('+') {
            Some(off) => rt(libc::SIGRTMIN(), off, 1),
            None => rt(libc::SIGRTMIN(), off, 1).filter(|_| off.is_empty()),
        };
    }
    if let Some(off) = name.strip_prefix("RTMAX") {
        return match off.strip_prefix('-') {
            Some(off) => rt(libc::SIGRTMAX(), off, -1),
            None => rt(libc::SIGRTMAX(), off, -1).filter(|_| off.is_empty()),
        };
    }
    // Old names of the same signals, which the CRI lists too.
    let name = match name {
        "CLD" => "CHLD",
        "IOT" => "ABRT",
        "POLL" => "IO",
        n => n,
    };
    format!("SIG{name}")
        .parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_of_every_spelling() {
        assert_eq!(signal_number("SIGRTMIN+3"), Some(libc::SIGRTMIN() + 3));
        assert_eq!(signal_number("SIGRTMAX-2"), Some(libc::SIGRTMAX() - 2));
        assert_eq!(signal_number("SIGRTMIN"), Some(libc::SIGRTMIN()));
        assert_eq!(signal_number("SIGCLD"), Some(libc::SIGCHLD));
        assert_eq!(signal_number("SIGIOT"), Some(libc::SIGABRT));
        assert_eq!(signal_number("SIGPOLL"), Some(libc::SIGIO));
        assert_eq!(signal_number("SIGRTMAX+1"), None);
        assert_eq!(signal_number("0"), None);
        assert_eq!(signal_number("SIGNOPE"), None);
    }

    #[test]
    fn stop_signals_by_name_or_number() {
        assert_eq!(signal_number("SIGQUIT"), Some(libc::SIGQUIT));
        assert_eq!(signal_number("term"), Some(libc::SIGTERM));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number(""), None);
        assert_eq!(signal_number("NOPE"), None);
    }
}
