//! The runtime core: the state one berthd owns and the operations the CRI façade calls. It knows
//! nothing of protobuf; `cri/` translates to and from it.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Config;
use crate::container::EventKind;
use crate::error::{Error, Result, optional};
use crate::image::{ImageStore, Usage};
use crate::network::cidr::Ipv4Cidr;
use crate::sandbox::Sandboxes;
use std::sync::Arc;

/// The name berthd reports as its runtime.
pub const RUNTIME_NAME: &str = "berth";
/// The CRI API version berthd serves.
pub const RUNTIME_API_VERSION: &str = "v1";

/// One readiness condition, as `Status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    /// Ready or not.
    pub ready: bool,
    /// A CamelCase reason when not ready.
    pub reason: String,
    /// A human explanation when not ready.
    pub message: String,
}

impl Condition {
    fn ready() -> Self {
        Condition {
            ready: true,
            reason: String::new(),
            message: String::new(),
        }
    }

    fn not_ready(reason: &str, message: String) -> Self {
        Condition {
            ready: false,
            reason: reason.into(),
            message,
        }
    }
}

/// How long a measured container-filesystem usage is reused: kubelet asks every few seconds
/// and walking every writable layer each time would cost more than the answer is worth.
const CONTAINER_FS_CACHE: Duration = Duration::from_secs(10);

/// The runtime core shared by every RPC.
pub struct Runtime {
    config: Config,
    /// The pod CIDR kubelet last sent with UpdateRuntimeConfig.
    pod_cidr: RwLock<Option<Ipv4Cidr>>,
    /// Images, their content and snapshots.
    pub images: Arc<ImageStore>,
    /// Containers.
    pub containers: Arc<crate::container::Containers>,
    /// Pod sandboxes and their network.
    pub pods: Arc<Sandboxes>,
    /// The streaming server's tokens and address (served by the daemon).
    pub streaming: Arc<crate::streaming::Streaming>,
    container_fs: Mutex<Option<(Instant, Usage)>>,
}

impl Runtime {
    /// Opens the core over an already-locked root and state directory: loads images and pods
    /// and reconciles what a previous run left.
    pub async fn open(config: Config) -> Result<Self> {
        for dir in [&config.root, &config.state] {
            crate::store::check_schema(dir)
                .map_err(|e| Error::Internal(crate::store::refusal(&e)))?;
        }
        let images = Arc::new(
            tokio::task::block_in_place(|| ImageStore::open(&config))
                .map_err(|e| Error::Internal(format!("opening the image store: {e}")))?,
        );
        // The hierarchies and the driver; a systemd driver without a systemd stops berthd here.
        let cgroups = tokio::task::block_in_place(|| {
            crate::cgroup::Cgroups::detect().with_driver(config.cgroup_driver)
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        tracing::info!(
            cgroups = cgroups.version_name(),
            driver = ?cgroups.driver,
            "cgroup hierarchies and driver"
        );
        let hybrid_v2 = cgroups.hybrid_v2_controllers();
        let handlers = tokio::task::block_in_place(|| {
            crate::handlers::Handlers::probe(&config.runtimes, hybrid_v2.as_deref())
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        for h in handlers.all().iter().filter(|h| h.binary.is_some()) {
            tracing::info!(
                handler = %h.name,
                version = %h.version,
                recursive_read_only = h.features.recursive_read_only,
                user_namespaces = h.features.user_namespaces,
                "runtime handler ready"
            );
        }
        let layout = crate::layout::Layout::new(&config.root, &config.state);
        let pods = Sandboxes::open(
            &layout,
            &config.network,
            &config.pod_cgroup_parent(),
            cgroups,
            config.cgroup_favor_dynmods,
            handlers,
            std::time::Duration::from_secs(config.unclaimed_timeout_seconds),
        )
        .await?;
        let containers = crate::container::Containers::open(
            &layout,
            images.clone(),
            pods.clone(),
            std::time::Duration::from_secs(config.unclaimed_timeout_seconds),
        )
        .await?;
        // A pull killed after some of its layers were unpacked left them held by nothing
        // (its hold lived in memory): collected now that every container's hold is known.
        images.gc().await;
        let [pa, pf, pu, pr, pt] = pods.reconciled.counts();
        let [ca, cf, cu, cr, ct] = containers.reconciled.counts();
        tracing::info!(
            pods_restored = pt,
            containers_restored = ct,
            pods_adopted = pa,
            pods_stopped = pf,
            pods_undone = pu,
            containers_adopted = ca,
            containers_undone = cu,
            leftovers_removed = pr + cf + cr,
            "reconciled what the previous berthd left"
        );
        Ok(Runtime {
            config,
            pod_cidr: RwLock::new(None),
            images,
            pods,
            containers,
            streaming: Arc::default(),
            container_fs: Mutex::new(None),
        })
    }

    /// Where containers' writable layers live.
    pub fn containers_dir(&self) -> PathBuf {
        self.config.root.join("containers")
    }

    /// Bytes and inodes used by containers' writable layers (measured at most every 10 s).
    pub fn container_fs_usage(&self) -> Usage {
        let mut cache = self
            .container_fs
            .lock()
            .expect("container fs cache poisoned");
        if let Some((at, u)) = cache.as_ref()
            && at.elapsed() < CONTAINER_FS_CACHE
        {
            return u.clone();
        }
        let dir = self.containers_dir();
        let (bytes, inodes) = crate::fsutil::disk_usage(&dir);
        let u = Usage {
            mountpoint: dir,
            bytes,
            inodes,
        };
        *cache = Some((Instant::now(), u.clone()));
        u
    }

    /// Pods and containers by state and the monitors alive, for the metrics endpoint. Every
    /// state is named, with 0 when none is in it, so a gauge falls back when its last one goes.
    pub fn census(&self) -> crate::telemetry::Census {
        use crate::container::CtrState;
        use crate::sandbox::PodState;
        let pods = self.pods.list(&Default::default());
        let ctrs = self.containers.states();
        let count_pods = |s| pods.iter().filter(|p| p.state == s).count() as i64;
        let count_ctrs = |s| ctrs.iter().filter(|&&c| c == s).count() as i64;
        let monitors_alive = pods
            .iter()
            .filter_map(|p| p.monitor)
            .filter(|&(pid, start)| crate::sandbox::init::start_time(pid) == Some(start))
            .count() as i64;
        crate::telemetry::Census {
            pods: vec![
                ("creating", count_pods(PodState::Creating)),
                ("ready", count_pods(PodState::Ready)),
                ("notready", count_pods(PodState::NotReady)),
            ],
            containers: vec![
                ("creating", count_ctrs(CtrState::Creating)),
                ("created", count_ctrs(CtrState::Created)),
                ("running", count_ctrs(CtrState::Running)),
                ("exited", count_ctrs(CtrState::Exited)),
            ],
            monitors_alive,
        }
    }

    /// A single-use URL forwarding ports of a ready pod: inside its network namespace, or
    /// the node's for a host-network pod.
    pub fn port_forward_url(&self, pod_id: &str, ports: Vec<u16>) -> Result<String> {
        use crate::sandbox::{NsMode, PodState};
        let r = self.pods.get(pod_id)?.record();
        if r.state != PodState::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {} is not ready: its ports cannot be forwarded",
                r.id
            )));
        }
        let netns = (r.spec.namespaces.network != NsMode::Node)
            .then(|| crate::sandbox::namespaces::pin_path(&self.pods.ns_dir(&r.id), "net"));
        let session = crate::streaming::Session::PortForward {
            pod_id: r.id,
            netns,
            ports,
        };
        self.streaming.url(session).map_err(streaming_err)
    }

    /// The URL of a streamed exec (`cmd` given) or attach session of container `id`.
    pub fn remote_command_url(
        &self,
        id: &str,
        cmd: Option<Vec<String>>,
        io: crate::streaming::Io,
    ) -> Result<String> {
        let session = self.containers.remote_command(id, cmd, io)?;
        self.streaming
            .url(crate::streaming::Session::Remote(session))
            .map_err(streaming_err)
    }

    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This build's version.
    pub fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    /// Whether containers can be run: the root and state directories are usable.
    pub fn runtime_condition(&self) -> Condition {
        for dir in [&self.config.root, &self.config.state] {
            if let Err(e) = writable_dir(dir) {
                return Condition::not_ready(
                    "RuntimeDirectoryUnusable",
                    format!("{} is not a writable directory: {e}", dir.display()),
                );
            }
        }
        Condition::ready()
    }

    /// Whether pods can get a network.
    pub fn network_condition(&self) -> Condition {
        match self.pods.network.not_ready() {
            None => Condition::ready(),
            Some((reason, why)) => Condition::not_ready(reason, why),
        }
    }

    /// The pod CIDR from UpdateRuntimeConfig, if any.
    pub fn pod_cidr(&self) -> Option<Ipv4Cidr> {
        *self.pod_cidr.read().expect("pod_cidr lock poisoned")
    }

    /// Records the pod CIDR kubelet assigned to this node (new pods get addresses from it); an
    /// empty string leaves it unchanged. A dual-stack node's is two, comma-separated: the IPv6
    /// one becomes the subnet of new pods' IPv6 addresses.
    pub async fn update_pod_cidr(&self, cidr: &str) -> Result<()> {
        if cidr.is_empty() {
            return Ok(());
        }
        let parts: Vec<String> = cidr.split(',').map(|s| s.trim().to_string()).collect();
        let both = crate::network::cidr::Subnets::parse(&parts)
            .map_err(|e| Error::InvalidArgument(format!("pod CIDR {cidr:?}: {e}")))?;
        if let Some(v6) = both.v6 {
            if v6.prefix_len() > 125 {
                return Err(Error::InvalidArgument(format!(
                    "pod CIDR {v6} is too small to hold pods"
                )));
            }
            self.pods.set_pod_cidr6(v6).await;
        }
        let parsed: Ipv4Cidr = both.v4;
        if parsed.prefix_len() > 30 {
            return Err(Error::InvalidArgument(format!(
                "pod CIDR {parsed} is too small to hold pods"
            )));
        }
        {
            let mut cur = self.pod_cidr.write().expect("pod_cidr lock poisoned");
            if *cur == Some(parsed) {
                return Ok(());
            }
            tracing::info!(pod_cidr = %parsed, "pod CIDR updated");
            *cur = Some(parsed);
        }
        self.pods.set_pod_cidr(parsed).await;
        Ok(())
    }
}

/// Pod and container lifecycle: the order of work across pods, their containers and images.
impl Runtime {
    /// RunPodSandbox: the pod, then a first word with its monitor. A pod whose caller left
    /// before the answer was never greeted, and its monitor gives up waiting after a minute: a
    /// retry that claims such a pod finds the monitor gone, removes the pod and makes it anew.
    pub async fn run_pod(&self, spec: crate::sandbox::PodSpec) -> Result<String> {
        let mut attempt = 0;
        loop {
            let id = self.pods.run(spec.clone()).await?;
            match self.containers.greet(&id).await {
                Ok(()) => {
                    self.containers.publish(&id, &id, EventKind::Created, None);
                    self.containers.publish(&id, &id, EventKind::Started, None);
                    return Ok(id);
                }
                Err(e) => {
                    let _ = self.pods.remove(&id).await;
                    self.containers.drop_monitor(&id);
                    attempt += 1;
                    if attempt == 2 {
                        return Err(Error::Internal(format!(
                            "the pod's monitor does not answer: {e}"
                        )));
                    }
                    tracing::info!(pod = %id, error = %e, "the claimed pod's monitor is gone: making the pod anew");
                }
            }
        }
    }

    /// StopPodSandbox: its containers are killed, then the pod is stopped. Idempotent.
    pub async fn stop_pod(&self, id: &str) -> Result<()> {
        let Some(pod) = optional(self.pods.get(id))? else {
            return Ok(());
        };
        for c in self.containers.of_pod(&pod.id) {
            self.containers.stop(&c, std::time::Duration::ZERO).await?;
        }
        let was_ready = pod.record().state == crate::sandbox::PodState::Ready;
        self.pods.stop(&pod.id).await?;
        if was_ready {
            self.containers
                .publish(&pod.id, &pod.id, EventKind::Stopped, None);
        }
        Ok(())
    }

    /// RemovePodSandbox: its containers are removed, then the pod. Idempotent.
    pub async fn remove_pod(&self, id: &str) -> Result<()> {
        let Some(pod) = optional(self.pods.get(id))? else {
            return Ok(());
        };
        for c in self.containers.of_pod(&pod.id) {
            self.containers.remove(&c).await?;
        }
        self.pods.remove(&pod.id).await?;
        self.containers.drop_monitor(&pod.id);
        // Told with its last record: kubelet ignores an event without the pod's status.
        let mut last = pod.record();
        last.state = crate::sandbox::PodState::NotReady;
        self.containers
            .publish(&pod.id, &pod.id, EventKind::Deleted, Some(last));
        Ok(())
    }

    /// CreateContainer in a ready pod from an image that is here.
    pub async fn create_container(
        &self,
        pod_id: &str,
        spec: crate::container::ContainerSpec,
    ) -> Result<String> {
        let pod = self.pods.get(pod_id)?;
        // Whoever makes a container in it knows the pod: an unclaimed pod is claimed.
        self.pods.claim(&pod);
        let image = self.images.find(&spec.image).ok_or_else(|| {
            Error::NotFound(format!("image {:?} not found (pull it first)", spec.image))
        })?;
        // Image volumes name images pulled on the node, as the container's own image does.
        let mut spec = spec;
        let mut volumes: Vec<Arc<crate::image::Image>> = Vec::new();
        for m in &mut spec.mounts {
            let Some(v) = m.image.as_mut() else { continue };
            let img = self.images.find(&v.image).ok_or_else(|| {
                Error::NotFound(format!(
                    "mount {}: image volume {:?} not found (pull it first)",
                    m.container_path, v.image
                ))
            })?;
            v.image_id = img.record.id.clone();
            if !volumes.iter().any(|i| i.record.id == img.record.id) {
                volumes.push(img);
            }
        }
        self.containers.create(pod, spec, image, volumes).await
    }
}

fn writable_dir(dir: &Path) -> nix::Result<()> {
    nix::unistd::access(
        dir,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
}

/// A streaming URL that could not be made, as the CRI reports it.
fn streaming_err(e: crate::streaming::StreamingError) -> Error {
    match e {
        crate::streaming::StreamingError::Token(crate::streaming::tokens::TokenError::Full) => {
            Error::ResourceExhausted(e.to_string())
        }
        e => Error::Unavailable(e.to_string()),
    }
}
