//! At start: containers are adopted from their pods' monitors, exits that happened while
//! berthd was away are read from the exit files, half-made containers are undone, and layers,
//! image holds and libcontainer state nothing refers to are removed.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::exits::apply_exit;
use super::{ContainerRecord, Containers, Ctr, CtrState, name_key, now_ns};
use crate::error::{Error, Result};
use crate::monitor::proto::{self, request};
use crate::sandbox::PodState;
use crate::store;

/// How long berthd's start waits for a monitor's list of its containers.
const MONITOR_PROBE: Duration = Duration::from_millis(500);

impl Containers {
    /// At start: adopts containers from the monitors, reads the exits that happened while
    /// berthd was away, undoes half-made containers and removes what nothing refers to.
    pub(super) async fn reconcile(&self) -> Result<()> {
        // Volume copies a creation left attached when berthd died: the containers made hold
        // their own binds of them.
        let detached = super::volumes_idmapped::detach_left(&self.layout.idmapped(), None);
        for _ in 0..detached {
            store::Tally::add(&self.reconciled.removed);
        }
        let records = self.read_records().await?;
        let pods: HashMap<String, PodState> = self.pods.ids().into_iter().collect();
        let (held, unanswered) = self.held_by_monitors(&pods).await;
        for r in records {
            if r.state == CtrState::Creating || !pods.contains_key(&r.pod_id) {
                tracing::info!(container = %r.id, "undoing a container whose creation was interrupted or whose pod is gone");
                store::Tally::add(&self.reconciled.undone);
                self.insert(r.clone(), true);
                self.undo(&r).await;
                continue;
            }
            if unanswered.contains(&r.pod_id) {
                // The monitor lives (else the pod would not be ready) but is slow: its
                // containers stay as recorded; their exits reach berthd when it answers.
                tracing::warn!(container = %r.id, "the pod's monitor did not answer at start: keeping the container as recorded");
                self.adopt_recorded(r);
                store::Tally::add(&self.reconciled.adopted);
                continue;
            }
            let h = held.get(&r.id);
            self.adopt(r, h);
            store::Tally::add(&self.reconciled.adopted);
        }
        self.remove_unreferenced(&held).await;
        Ok(())
    }

    /// After a reboot (or any loss of `--state`): each container whose copy in `--root` has
    /// no record any more gets its record back, Exited: one that was created or running is
    /// recorded as ended by the node's restart (exit code 255, reason `NodeRestarted`). Its
    /// image is held again; its writable layer is still in `--root`. One that was still being
    /// created is dropped.
    async fn restore_from_copies(&self) -> Result<()> {
        let refuse = |e: store::StoreError| Error::Internal(store::refusal(&e));
        for (id, mut r) in self.copies.read_all::<ContainerRecord>().map_err(refuse)? {
            let dir = self.ctr_dir(&id);
            if dir.join("container.json").exists() {
                continue;
            }
            if r.id != id {
                return Err(refuse(store::StoreError::Inconsistent {
                    path: self.layout.container_copies().join(format!("{id}.json")),
                    message: format!("it records container {}", r.id),
                }));
            }
            if r.state == CtrState::Creating {
                self.copies.remove(&id).map_err(refuse)?;
                continue;
            }
            if matches!(r.state, CtrState::Created | CtrState::Running) {
                tracing::info!(container = %id, "the node restarted while the container was there: listing it Exited");
                r.state = CtrState::Exited;
                r.finished_at = boot_time_ns().max(r.started_at).max(r.created_at);
                r.exit_code = 255;
                r.reason = "NodeRestarted".into();
                r.message = "the node restarted; the container did not exit on its own".into();
            }
            r.pid = 0;
            crate::layout::private_dir(&dir)
                .map_err(|e| crate::error::from_io("restoring a container directory", e))?;
            self.persist(&r)?;
            // Its own image and its image volumes' (those still here).
            let mut ids = vec![r.image_id.as_str()];
            ids.extend(
                r.spec
                    .mounts
                    .iter()
                    .filter_map(|m| m.image.as_ref())
                    .map(|v| v.image_id.as_str()),
            );
            let images: Vec<_> = ids.iter().filter_map(|i| self.images.find(i)).collect();
            let held: Vec<&crate::image::Image> = images.iter().map(|i| i.as_ref()).collect();
            if !held.is_empty()
                && let Err(e) = self.images.hold(&id, &held).await
            {
                tracing::warn!(container = %id, error = %e, "holding the images of a restored container");
            }
            store::Tally::add(&self.reconciled.restored);
        }
        Ok(())
    }

    /// The container records; a directory without one is removed (it was made just before
    /// its record), an unreadable one is an error.
    async fn read_records(&self) -> Result<Vec<ContainerRecord>> {
        self.restore_from_copies().await?;
        let mut records = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.layout.containers()) else {
            return Ok(records);
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path().join("container.json");
            match store::read_json::<ContainerRecord>(&path) {
                Ok(Some(r)) if r.id == name => records.push(r),
                Ok(Some(r)) => {
                    return Err(Error::Internal(store::refusal(
                        &store::StoreError::Inconsistent {
                            path,
                            message: format!("it records container {} but lies in {name}", r.id),
                        },
                    )));
                }
                // The directory is made just before its record: nothing else of it exists.
                Ok(None) => {
                    tracing::warn!(container = %name, "removing a container directory without a record");
                    store::Tally::add(&self.reconciled.removed);
                    super::overlay::unmount(&e.path().join("rootfs"));
                    let _ = std::fs::remove_dir_all(e.path());
                }
                Err(e) => return Err(Error::Internal(store::refusal(&e))),
            }
        }
        Ok(records)
    }

    /// What each ready pod's monitor holds, by container id, and the pods whose monitor did
    /// not answer. All monitors are asked at once, each with a short deadline: one wedged or
    /// dead monitor never holds up berthd's start (a healthy one answers in a millisecond).
    async fn held_by_monitors(
        &self,
        pods: &HashMap<String, PodState>,
    ) -> (
        HashMap<String, proto::ContainerState>,
        std::collections::HashSet<String>,
    ) {
        let asks = pods
            .iter()
            .filter(|(_, st)| **st == PodState::Ready)
            .map(|(pod, _)| {
                let client = self.monitor(pod);
                async move {
                    let listed = client
                        .call(request::Op::List(proto::List {}), Some(MONITOR_PROBE))
                        .await;
                    (pod.clone(), listed)
                }
            });
        let mut held = HashMap::new();
        let mut unanswered = std::collections::HashSet::new();
        for (pod, listed) in futures::future::join_all(asks).await {
            match listed {
                Ok(r) => {
                    if let Some(proto::response::Result::States(s)) = r.result {
                        for c in s.containers {
                            held.insert(c.container_id.clone(), c);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(pod = %pod, error = %e, "the pod's monitor did not answer");
                    unanswered.insert(pod);
                }
            }
        }
        (held, unanswered)
    }

    /// Takes a recorded container as it was recorded.
    fn adopt_recorded(&self, r: ContainerRecord) {
        self.names
            .insert(&name_key(&r.pod_id, &r.spec.name, r.spec.attempt), &r.id);
        let exited = r.state == CtrState::Exited;
        self.insert(r, exited);
    }

    /// Takes a recorded container as its monitor (or its exit file) says it is now.
    fn adopt(&self, mut r: ContainerRecord, held: Option<&proto::ContainerState>) {
        if matches!(r.state, CtrState::Created | CtrState::Running) {
            match held {
                Some(s) if s.status == proto::Status::Exited as i32 => {
                    if let Some(e) = &s.exit {
                        apply_exit(&mut r, e);
                    }
                }
                Some(s) if s.status == proto::Status::Running as i32 => {
                    if r.state == CtrState::Created {
                        r.state = CtrState::Running;
                        r.started_at = now_ns();
                    }
                }
                Some(_) => {}
                None => self.monitor_gone(&mut r),
            }
            let _ = self.persist(&r);
        }
        self.names
            .insert(&name_key(&r.pod_id, &r.spec.name, r.spec.attempt), &r.id);
        let exited = r.state == CtrState::Exited;
        self.insert(r, exited);
    }

    fn insert(&self, r: ContainerRecord, exited: bool) {
        self.ctrs.write().expect("containers poisoned").insert(
            r.id.clone(),
            Arc::new(Ctr {
                id: r.id.clone(),
                record: RwLock::new(r),
                op: tokio::sync::Mutex::new(()),
                exited: watch::channel(exited).0,
                starting: Default::default(),
                publishing: Default::default(),
            }),
        );
    }

    /// Writable layers, image holds and libcontainer state of containers that no longer
    /// exist (a monitor that died with its pod could not be asked to delete them).
    async fn remove_unreferenced(&self, held: &HashMap<String, proto::ContainerState>) {
        let live: Vec<String> = self
            .ctrs
            .read()
            .expect("containers poisoned")
            .keys()
            .cloned()
            .collect();
        if let Ok(rd) = std::fs::read_dir(self.layout.layers()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !live.contains(&name) {
                    let _ = std::fs::remove_dir_all(e.path());
                    store::Tally::add(&self.reconciled.removed);
                }
            }
        }
        for owner in self.images.holders() {
            if !live.contains(&owner) {
                let _ = self.images.release(&owner).await;
            }
        }
        let known: Vec<&str> = live
            .iter()
            .chain(held.keys())
            .map(|id| crate::monitor::lc_id(id))
            .collect();
        if let Ok(rd) = std::fs::read_dir(self.layout.lc_root()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&name.as_str()) {
                    tracing::info!(dir = %e.path().display(), "removing libcontainer state nothing refers to");
                    store::Tally::add(&self.reconciled.removed);
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// When this boot began, ns since the epoch (`btime` of /proc/stat): a container the reboot
/// ended had ended by then. Now if that cannot be read.
fn boot_time_ns() -> i64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<i64>().ok())
        })
        .map(|secs| secs * 1_000_000_000)
        .unwrap_or_else(now_ns)
}
