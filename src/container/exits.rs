//! What the monitors report unasked: a container's exit (recorded, with the OOM killer's
//! verdict), and the end of a monitor's connection, which may be the monitor's death (its
//! containers are then recorded Exited and its pod stopped).

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{ContainerRecord, Containers, CtrState, EventKind, now_ns};
use crate::monitor::client::{ExitEvent, MonitorEvent};
use crate::monitor::proto;

impl Containers {
    /// Follows what the monitors report, for as long as the store exists.
    pub(super) fn follow_monitors(
        self: &std::sync::Arc<Self>,
        rx: mpsc::UnboundedReceiver<ExitEvent>,
    ) {
        tokio::spawn(events_loop(std::sync::Arc::downgrade(self), rx));
    }

    /// A monitor's connection ended. If the monitor died (not merely closed a connection),
    /// nothing watches the pod's containers any more: each that was created or running is
    /// recorded Exited (from its exit file if the monitor wrote one, else with reason Unknown)
    /// and what is left of it killed, and the pod is stopped (NotReady), as kubelet must see.
    async fn monitor_lost(&self, pod_id: &str) {
        let Ok(pod) = self.pods.get(pod_id) else {
            return;
        };
        let Some((pid, start)) = pod.record().monitor else {
            return;
        };
        // Its connection closes while it exits: wait for the exit itself (a monitor that
        // merely closed a connection lives on, and the wait ends without it).
        let dead = crate::sandbox::init::exits_within(pid, start, Duration::from_secs(2)).await;
        tracing::debug!(pod = %pod_id, dead, "the connection to the pod's monitor ended");
        if !dead {
            return;
        }
        // StopPodSandbox and RemovePodSandbox end the monitor themselves, holding the pod's
        // lock until the pod is NotReady or gone: waiting for the lock tells that ending from
        // a death, which alone is warned of and stops the pod. (Not held past the check:
        // stopping the pod below takes it again.) Either way a container still recorded
        // running has lost its watcher and is recorded exited.
        let expected = {
            let _op = pod.lock().await;
            self.pods.get(pod_id).is_err() || pod.record().state != crate::sandbox::PodState::Ready
        };
        if expected {
            tracing::debug!(pod = %pod_id, "the pod's monitor ended with the pod's stop");
        } else {
            tracing::warn!(pod = %pod_id, "the pod's monitor died: its containers are exited, the pod is stopped");
        }
        for id in self.of_pod(pod_id) {
            let Ok(ctr) = self.get(&id) else { continue };
            let _op = ctr.op.lock().await;
            let mut r = ctr.record.write().expect("container record poisoned");
            if !matches!(r.state, CtrState::Created | CtrState::Running) {
                continue;
            }
            self.monitor_gone(&mut r);
            if let Err(e) = self.persist(&r) {
                tracing::warn!(container = %r.id, error = %e, "recording the exit");
            }
            drop(r);
            let _ = ctr.exited.send(true);
            self.publish(&id, pod_id, EventKind::Stopped, None);
        }
        self.drop_monitor(pod_id);
        if expected {
            return;
        }
        let was_ready = pod.record().state == crate::sandbox::PodState::Ready;
        match self.pods.stop(pod_id).await {
            Ok(()) if was_ready => self.publish(pod_id, pod_id, EventKind::Stopped, None),
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(pod = %pod_id, error = %e, "stopping a pod whose monitor died")
            }
        }
    }

    /// Records the end of a container whose monitor is gone: the exit the monitor wrote to its
    /// exit file, else exit code 255 with reason Unknown, and whatever still runs of it killed.
    pub(super) fn monitor_gone(&self, r: &mut ContainerRecord) {
        match read_exit_file(&self.ctr_dir(&r.id).join("exit.json")) {
            Some(e) => apply_exit(r, &e),
            None => {
                self.kill_orphans(r);
                r.state = CtrState::Exited;
                r.exit_code = 255;
                r.finished_at = now_ns();
                r.reason = "Unknown".into();
                r.message = "the pod's monitor is gone; the container's fate is unknown".into();
            }
        }
    }

    /// Records an exit the monitor reported.
    fn exited(&self, ev: proto::Event) {
        let Ok(ctr) = self.get(&ev.container_id) else {
            return;
        };
        let Some(exit) = ev.exit else { return };
        // The cgroup still exists (it goes at RemoveContainer; with systemd, the scope kept what
        // ended it): did the OOM killer strike?
        let oom = exit.signal == libc::SIGKILL && {
            let rec = ctr.record();
            self.pods
                .get(&rec.pod_id)
                .map(|p| {
                    let rel = self
                        .pods
                        .cgroups
                        .container_cgroup(&p.record().cgroup, &rec.id);
                    // With systemd this may ask it over D-Bus and wait for the scope to stop.
                    tokio::task::block_in_place(|| self.pods.cgroups.oom_killed(&rel))
                })
                .unwrap_or(false)
        };
        let _order = ctr.publishing.lock().expect("container events poisoned");
        let (snapshot, started) = {
            let mut r = ctr.record.write().expect("container record poisoned");
            if r.state == CtrState::Exited {
                return;
            }
            // Exited before StartContainer heard back: it did start (unless it could not).
            let started = r.state == CtrState::Created
                && ctr.starting.load(std::sync::atomic::Ordering::SeqCst)
                && !exit.start_failed;
            if started && r.started_at == 0 {
                r.started_at = exit.exited_at_ns;
            }
            apply_exit(&mut r, &exit);
            if oom {
                r.reason = "OOMKilled".into();
            }
            // Under the record's lock, so writes of one record land in the order made.
            if let Err(e) = self.persist(&r) {
                tracing::warn!(container = %r.id, error = %e, "recording the exit");
            }
            (r.clone(), started)
        };
        tracing::info!(container = %snapshot.id, exit_code = snapshot.exit_code, reason = %snapshot.reason, "container exited");
        let _ = ctr.exited.send(true);
        if started {
            self.publish(&snapshot.id, &snapshot.pod_id, EventKind::Started, None);
        }
        self.publish(&snapshot.id, &snapshot.pod_id, EventKind::Stopped, None);
    }
}

/// Applies a reported exit to a record.
pub(super) fn apply_exit(r: &mut ContainerRecord, e: &proto::Exit) {
    r.state = CtrState::Exited;
    r.exit_code = e.code;
    r.finished_at = e.exited_at_ns;
    if e.start_failed {
        r.reason = "StartError".into();
        r.message = e.message.clone();
    } else if e.code == 0 {
        r.reason = "Completed".into();
    } else {
        r.reason = "Error".into();
    }
}

fn read_exit_file(p: &Path) -> Option<proto::Exit> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    Some(proto::Exit {
        code: v["code"].as_i64()? as i32,
        signal: v["signal"].as_i64().unwrap_or(0) as i32,
        exited_at_ns: v["exited_at_ns"].as_i64().unwrap_or(0),
        message: v["message"].as_str().unwrap_or("").to_string(),
        start_failed: v["start_failed"].as_bool().unwrap_or(false),
    })
}

async fn events_loop(c: std::sync::Weak<Containers>, mut rx: mpsc::UnboundedReceiver<ExitEvent>) {
    while let Some((pod, ev)) = rx.recv().await {
        let Some(c) = c.upgrade() else { return };
        match ev {
            MonitorEvent::Exit(ev) => c.exited(ev),
            MonitorEvent::Lost => {
                tokio::spawn(async move { c.monitor_lost(&pod).await });
            }
        }
    }
}
