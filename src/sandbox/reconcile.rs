//! Opening the pod store at start: what a previous berthd left is finished or undone. Pods
//! whose creation was interrupted are undone, pods whose init or monitor died are stopped,
//! namespace pins and cgroups nothing refers to are removed.

use std::collections::HashMap;

use std::sync::{Arc, RwLock};

use super::stop_remove::remove_pod_dirs;
use super::{Pod, PodRecord, PodState, Sandboxes, init, internal, namespaces};
use crate::cgroup::Cgroups;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::network::{Network, PodNet};
use crate::store;

/// After a reboot (or any loss of `--state`): each pod whose copy in `--root` has no record
/// any more gets its record back as a stopped pod, nothing of it running or connected, so
/// kubelet sees it NotReady and removes it. One that was still being created is dropped.
fn restore_from_copies(layout: &Layout, copies: &store::Copies) -> Result<usize> {
    let mut restored = 0;
    let refuse = |e: store::StoreError| Error::Internal(store::refusal(&e));
    for (id, mut r) in copies.read_all::<PodRecord>().map_err(refuse)? {
        let dir = layout.pods().join(&id);
        if dir.join("pod.json").exists() {
            continue;
        }
        if r.id != id {
            return Err(refuse(store::StoreError::Inconsistent {
                path: layout.pod_copies().join(format!("{id}.json")),
                message: format!("it records pod {}", r.id),
            }));
        }
        if r.state == PodState::Creating {
            copies.remove(&id).map_err(refuse)?;
            continue;
        }
        if r.state == PodState::Ready {
            tracing::info!(pod = %id, "the node restarted while the pod ran: listing it NotReady");
        }
        r.state = PodState::NotReady;
        r.net = None;
        r.init = None;
        r.monitor = None;
        r.shm = false;
        crate::layout::private_dir(&dir).map_err(super::internal("restoring a pod directory"))?;
        store::write_json_volatile(&dir.join("pod.json"), &r).map_err(crate::error::from_store)?;
        copies
            .write(&id, "made", &r)
            .map_err(crate::error::from_store)?;
        restored += 1;
    }
    Ok(restored)
}

/// The pod records under `layout`; pod directories without a readable record and pin
/// directories of no pod are removed.
fn read_records(layout: &Layout) -> Result<Vec<PodRecord>> {
    let mut records = Vec::new();
    if let Ok(rd) = std::fs::read_dir(layout.pods()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path().join("pod.json");
            match store::read_json::<PodRecord>(&path) {
                Ok(Some(r)) if r.id == name => records.push(r),
                Ok(Some(r)) => {
                    return Err(Error::Internal(store::refusal(
                        &store::StoreError::Inconsistent {
                            path,
                            message: format!("it records pod {} but lies in {name}", r.id),
                        },
                    )));
                }
                // The directory is made just before its record: nothing else of it exists.
                Ok(None) => {
                    tracing::warn!(pod = %name, "removing a pod directory without a record");
                    remove_pod_dirs(&e.path(), &layout.ns().join(&name));
                }
                Err(e) => return Err(Error::Internal(store::refusal(&e))),
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(layout.ns()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !records.iter().any(|r| r.id == name) {
                namespaces::unpin_all(&e.path());
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    Ok(records)
}

impl Sandboxes {
    /// Opens the pod store under `layout`, starts the network and reconciles what a previous
    /// berthd left: half-made pods are undone, pods whose init died are stopped, leftovers
    /// nothing refers to are removed.
    pub async fn open(
        layout: &Layout,
        net_cfg: &crate::network::NetworkConfig,
        default_cgroup_parent: &str,
        cgroups: Cgroups,
        favor_dynmods: bool,
        handlers: crate::handlers::Handlers,
        unclaimed_timeout: std::time::Duration,
    ) -> Result<Arc<Sandboxes>> {
        crate::layout::traversable_dir(&layout.pods())
            .map_err(internal("creating the pods directory"))?;
        namespaces::prepare_pin_root(&layout.ns())
            .map_err(internal("preparing the namespace pin directory"))?;
        let copies = store::Copies::open(&layout.pod_copies());
        let restored = restore_from_copies(layout, &copies)?;
        let records = read_records(layout)?;
        let live_nets: Vec<PodNet> = records
            .iter()
            .filter(|r| r.state == PodState::Ready)
            .filter_map(|r| r.net.clone())
            .collect();
        let network = Arc::new(
            Network::start(
                net_cfg,
                &layout.ipam(),
                &net_cfg
                    .cni
                    .cache_dir
                    .clone()
                    .unwrap_or_else(|| layout.cni_cache()),
                &live_nets,
            )
            .await
            .map_err(Error::Internal)?,
        );
        if favor_dynmods {
            match cgroups.favor_dynmods() {
                Ok(()) => tracing::info!(
                    "cgroup2 hierarchy uses favordynmods: task migrations skip an RCU grace period"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot enable favordynmods"),
            }
        }
        let s = Arc::new(Sandboxes {
            layout: layout.clone(),
            pods: RwLock::new(HashMap::new()),
            names: Default::default(),
            unclaimed_timeout,
            network,
            cgroups,
            default_cgroup_parent: default_cgroup_parent.to_string(),
            handlers,
            zygote: crate::zygote::Zygote::default(),
            pod_cgroups: super::cgroups::PodCgroups::load(layout.cgroups_record())
                .map_err(|e| Error::Internal(store::refusal(&e)))?,
            reconciled: Default::default(),
            copies,
            own_endpoints: Default::default(),
        });
        for _ in 0..restored {
            store::Tally::add(&s.reconciled.restored);
        }
        for r in records {
            s.adopt(r).await;
        }
        let live: Vec<String> = s
            .pods
            .read()
            .expect("pods poisoned")
            .values()
            .filter(|p| p.state() == PodState::Ready)
            .map(|p| p.id.clone())
            .collect();
        s.network.reconcile(&live).await;
        s.remove_unused_cgroups();
        Ok(s)
    }

    /// Takes a pod a previous berthd recorded: undone if it was being created, stopped if its
    /// init or monitor is gone, kept as it is otherwise. A pod to stop is recorded NotReady at
    /// once and stopped in the background (killing an init can wait seconds for its PID
    /// namespace to empty): berthd serves without waiting for it.
    async fn adopt(self: &Arc<Self>, mut r: PodRecord) {
        let mut stop = false;
        match r.state {
            PodState::Creating => {
                tracing::info!(pod = %r.id, "undoing a pod whose creation was interrupted");
                store::Tally::add(&self.reconciled.undone);
                self.undo(&mut r).await;
                return;
            }
            PodState::Ready => {
                let dead = |p: Option<(i32, u64)>| {
                    p.is_some_and(|(pid, start)| init::start_time(pid) != Some(start))
                };
                if dead(r.init) || dead(r.monitor) {
                    tracing::info!(pod = %r.id, "the pod's init or monitor is gone: stopping the pod");
                    r.state = PodState::NotReady;
                    let _ = self.persist(&r);
                    stop = true;
                    store::Tally::add(&self.reconciled.finished);
                }
            }
            // Stopped, or being stopped when berthd died: finish whatever is left.
            PodState::NotReady => stop = r.init.is_some() || r.net.is_some() || r.cni.is_some(),
        }
        if !stop {
            store::Tally::add(&self.reconciled.adopted);
        }
        if !stop && r.state == PodState::NotReady {
            namespaces::unpin(&namespaces::pin_path(&self.ns_dir(&r.id), "net"));
        }
        self.names.insert(&r.spec.name_key(), &r.id);
        self.pod_cgroups.adopt(&r.id, &r.cgroup);
        let pod = Arc::new(Pod {
            id: r.id.clone(),
            record: RwLock::new(r),
            op: tokio::sync::Mutex::new(()),
        });
        self.pods
            .write()
            .expect("pods poisoned")
            .insert(pod.id.clone(), pod.clone());
        if stop {
            let this = self.clone();
            tokio::spawn(async move {
                let _op = pod.lock().await;
                let mut rec = pod.record();
                if let Err(e) = this.teardown(&mut rec).await {
                    tracing::warn!(pod = %rec.id, error = %e, "stopping a pod at start");
                }
                let _ = this.persist(&rec);
                *pod.record.write().expect("pod record poisoned") = rec;
            });
        }
    }

    /// Removes the cgroup directories berth made for pods that are gone.
    fn remove_unused_cgroups(&self) {
        self.pod_cgroups.remove_unused(&self.cgroups);
    }
}
