//! CNI mode: pods connected by the cluster's CNI plugins instead of the built-in bridge.
//! `conf` picks the network configuration (the first file of the configuration directory,
//! which `watch` follows), `exec` runs one plugin, `args` builds what it is given and reads
//! what it answers, `cache` keeps what each pod was attached with. Here: ADD through the
//! list's plugins in order (each given the previous one's result), DEL in reverse order from
//! the cache, CHECK, and, for lists of CNI 1.1, GC and STATUS.
//! Loopback in the pod is berth's own; host-network pods never come here.

mod args;
mod cache;
mod conf;
mod exec;
mod watch;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use args::{addresses, bandwidth, cni_args, plugin_conf, plugin_type};
use rscni_types::types::Cmd;
use rscni_types::version::SpecVersion;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use cache::{Cache, Entry};
use conf::Loaded;
pub use exec::PluginError;

/// The interface the plugins make in the pod.
const IFNAME: &str = "eth0";
/// How often a CNI 1.1 network's plugins are asked for their STATUS.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// What a pod brings to its attachment.
#[derive(Debug, Clone, Default)]
pub struct PodAttach {
    /// The pod's id (`CNI_CONTAINERID`, `K8S_POD_INFRA_CONTAINER_ID`).
    pub pod_id: String,
    /// Its Kubernetes name, namespace and uid (`CNI_ARGS`).
    pub name: String,
    /// See `name`.
    pub namespace: String,
    /// See `name`.
    pub uid: String,
    /// Its network namespace pin.
    pub netns: PathBuf,
    /// Its hostPorts (capability `portMappings`).
    pub ports: Vec<PortMapping>,
    /// Its annotations (`kubernetes.io/ingress-bandwidth`, `egress-bandwidth`).
    pub annotations: BTreeMap<String, String>,
    /// Its DNS settings (capability `dns`): servers, searches, options.
    pub dns: Option<(Vec<String>, Vec<String>, Vec<String>)>,
}

/// A hostPort as the `portMappings` capability carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    /// The node's port.
    pub host_port: u16,
    /// The pod's port.
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: &'static str,
    /// Only this node address, if given.
    pub host_ip: Option<IpAddr>,
}

/// A pod's CNI network, recorded with the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniNet {
    /// Its addresses from the final result: the first IPv4 first.
    pub ips: Vec<IpAddr>,
}

/// Why a CNI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// No usable network configuration.
    #[error("network plugin not ready: {0}")]
    NotReady(String),
    /// The request cannot be turned into plugin arguments.
    #[error("{0}")]
    Invalid(String),
    /// A plugin failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The result cannot be used.
    #[error("CNI network {network}: {message}")]
    Result {
        /// The network's name.
        network: String,
        /// What is wrong with it.
        message: String,
    },
    /// The cache could not be written or read.
    #[error("CNI cache: {0}")]
    Cache(#[from] crate::store::StoreError),
}

/// The CNI side of the node's network.
pub struct Cni {
    bin_dirs: Vec<PathBuf>,
    timeout: Duration,
    cache: Cache,
    loaded: Arc<RwLock<Result<Loaded, String>>>,
    watcher: tokio::task::JoinHandle<()>,
    /// What the last STATUS round said (`None`: ready, or a network without STATUS).
    status: Arc<RwLock<Option<String>>>,
    status_task: tokio::task::JoinHandle<()>,
    pod_cidr: RwLock<Option<String>>,
    pod_cidr6: RwLock<Option<String>>,
}

impl Drop for Cni {
    fn drop(&mut self) {
        self.watcher.abort();
        self.status_task.abort();
    }
}

impl Cni {
    /// Loads the network of `conf_dir` (if any yet) and watches the directory; plugins come
    /// from `bin_dirs` and may each take `timeout`; the cache lives in `cache_dir`.
    pub fn open(
        conf_dir: &Path,
        bin_dirs: &[PathBuf],
        timeout: Duration,
        cache_dir: &Path,
    ) -> Result<Cni, String> {
        let cache = Cache::open(cache_dir)
            .map_err(|e| format!("CNI cache {}: {e}", cache_dir.display()))?;
        let loaded = Arc::new(RwLock::new(conf::load(conf_dir)));
        let (dir, shared) = (conf_dir.to_path_buf(), loaded.clone());
        let watcher = watch::spawn(dir.clone(), move || {
            let now = conf::load(&dir);
            let mut cur = shared.write().expect("CNI configuration poisoned");
            let before = cur.as_ref().map(|l| (l.file.clone(), l.raw.clone())).ok();
            let after = now.as_ref().map(|l| (l.file.clone(), l.raw.clone())).ok();
            if before != after {
                match &now {
                    Ok(l) => {
                        tracing::info!(file = %l.file.display(), network = %l.name, "CNI network configuration loaded")
                    }
                    Err(e) => tracing::warn!(error = %e, "no usable CNI network configuration"),
                }
            }
            *cur = now;
        });
        let status = Arc::new(RwLock::new(None));
        let status_task = tokio::spawn(ask_status(
            loaded.clone(),
            status.clone(),
            bin_dirs.to_vec(),
            timeout,
        ));
        Ok(Cni {
            bin_dirs: bin_dirs.to_vec(),
            timeout,
            status,
            status_task,
            cache,
            loaded,
            watcher,
            pod_cidr: RwLock::new(None),
            pod_cidr6: RwLock::new(None),
        })
    }

    fn current(&self) -> Result<Loaded, CniError> {
        self.loaded
            .read()
            .expect("CNI configuration poisoned")
            .clone()
            .map_err(CniError::NotReady)
    }

    /// `None` when a network configuration is loaded (and, for CNI 1.1, its plugins' last
    /// STATUS succeeded), else why not.
    pub fn not_ready(&self) -> Option<String> {
        if let Err(e) = self.current() {
            return Some(match e {
                CniError::NotReady(m) => m,
                e => e.to_string(),
            });
        }
        self.status.read().expect("CNI status poisoned").clone()
    }

    /// The pod CIDR kubelet gave (capability `ipRanges` from now on).
    pub fn set_pod_cidr(&self, cidr: String) {
        *self.pod_cidr.write().expect("pod CIDR poisoned") = Some(cidr);
    }

    /// The IPv6 half of a dual-stack pod CIDR (a second `ipRanges` range).
    pub fn set_pod_cidr6(&self, cidr: String) {
        *self.pod_cidr6.write().expect("pod CIDR poisoned") = Some(cidr);
    }

    /// ADD: the pod attached through every plugin of the network, recorded (configuration
    /// first, then the result) before this returns. A failure runs DEL for what the chain
    /// may have made and leaves no cache entry.
    pub async fn add(&self, p: &PodAttach) -> Result<CniNet, CniError> {
        let l = self.current()?;
        let mut entry = Entry {
            pod_id: p.pod_id.clone(),
            netns: p.netns.clone(),
            ifname: IFNAME.into(),
            args: cni_args(&p.namespace, &p.name, &p.pod_id, &p.uid).map_err(CniError::Invalid)?,
            capability_args: self.capability_args(p)?,
            config_file: l.file.clone(),
            config: l.raw.clone(),
            result: None,
        };
        self.cache.put(&entry)?;
        let added = async {
            let result = self.add_chain(&l, &entry).await?;
            let net = CniNet {
                ips: addresses(&result).map_err(|message| CniError::Result {
                    network: l.name.clone(),
                    message,
                })?,
            };
            entry.result = Some(result);
            self.cache.put(&entry)?;
            Ok::<_, CniError>(net)
        }
        .await;
        match added {
            Ok(net) => Ok(net),
            Err(e) => {
                if let Err(d) = self.del_entry(&entry).await {
                    tracing::warn!(pod = %p.pod_id, error = %d, "CNI DEL after a failed ADD");
                }
                let _ = self.cache.remove(&p.pod_id);
                Err(e)
            }
        }
    }

    async fn add_chain(&self, l: &Loaded, e: &Entry) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in l.plugins() {
            let conf = plugin_conf(l, &plugin, prev.as_ref(), &e.capability_args);
            let out = self.run(&plugin, "ADD", e, &conf).await?;
            prev = Some(out.ok_or_else(|| PluginError {
                plugin: plugin_type(&plugin),
                command: "ADD".into(),
                message: "it printed no result".into(),
            })?);
        }
        prev.ok_or_else(|| CniError::Result {
            network: l.name.clone(),
            message: "no plugin ran".into(),
        })
    }

    /// DEL from the cache: with the configuration and result the pod was attached with. A
    /// pod with no entry is not attached (DEL is idempotent); the entry goes once DEL worked.
    pub async fn del(&self, pod_id: &str) -> Result<(), CniError> {
        let Some(entry) = self.cache.get(pod_id)? else {
            return Ok(());
        };
        self.del_entry(&entry).await?;
        self.cache.remove(pod_id)?;
        Ok(())
    }

    /// DEL through the plugins in reverse order; every plugin is asked even if one fails
    /// (each releases its own part), and the first failure is returned.
    async fn del_entry(&self, e: &Entry) -> Result<(), CniError> {
        let l = Loaded::from_cached(&e.config_file, e.config.clone()).map_err(|m| {
            CniError::Result {
                network: e.config_file.display().to_string(),
                message: format!("the cached configuration: {m}"),
            }
        })?;
        // prevResult for DEL exists from 0.4.0 on.
        let prev = e
            .result
            .as_ref()
            .filter(|_| l.version >= SpecVersion::new(0, 4, 0));
        let mut first = None;
        for plugin in l.plugins().iter().rev() {
            let conf = plugin_conf(&l, plugin, prev, &e.capability_args);
            if let Err(err) = self.run(plugin, "DEL", e, &conf).await {
                tracing::warn!(pod = %e.pod_id, error = %err, "CNI DEL");
                first.get_or_insert(err);
            }
        }
        match first {
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }

    /// CHECK of an attached pod, where its network's version has CHECK and allows it.
    pub async fn check(&self, pod_id: &str) -> Result<(), CniError> {
        let Some(e) = self.cache.get(pod_id)? else {
            return Ok(());
        };
        let l = Loaded::from_cached(&e.config_file, e.config.clone()).map_err(|m| {
            CniError::Result {
                network: e.config_file.display().to_string(),
                message: m,
            }
        })?;
        if l.version.allows(Cmd::Check).is_err() || e.config["disableCheck"] == json!(true) {
            return Ok(());
        }
        for plugin in l.plugins() {
            let conf = plugin_conf(&l, &plugin, e.result.as_ref(), &e.capability_args);
            self.run(&plugin, "CHECK", &e, &conf).await?;
        }
        Ok(())
    }

    /// After a restart: DEL for every cached attachment whose pod is not `live` (an ADD or
    /// a DEL a crash interrupted, or a pod removed meanwhile), CHECK of the live ones, and,
    /// where the network's version has it, GC with the live attachments as the valid ones.
    pub async fn reconcile(&self, live: &[String]) {
        let entries = match self.cache.all() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "reading the CNI cache");
                return;
            }
        };
        let mut valid = Vec::new();
        for e in entries {
            let e = match e {
                Ok(e) => e,
                Err(err) => {
                    tracing::warn!(error = %err, "an unreadable CNI cache entry is left as it is");
                    continue;
                }
            };
            if live.contains(&e.pod_id) {
                if let Err(err) = self.check(&e.pod_id).await {
                    tracing::warn!(pod = %e.pod_id, error = %err, "CNI CHECK of a pod after the restart");
                }
                valid.push(json!({"containerID": e.pod_id, "ifname": e.ifname}));
                continue;
            }
            tracing::info!(pod = %e.pod_id, "CNI DEL of an attachment whose pod is gone");
            match self.del_entry(&e).await {
                Ok(()) => {
                    let _ = self.cache.remove(&e.pod_id);
                }
                Err(err) => tracing::warn!(pod = %e.pod_id, error = %err, "CNI DEL at start"),
            }
        }
        self.gc(valid).await;
    }

    /// GC (CNI 1.1): each plugin frees what no valid attachment holds.
    async fn gc(&self, valid: Vec<Value>) {
        let Ok(l) = self.current() else { return };
        if l.disable_gc || l.version.allows(Cmd::Gc).is_err() {
            return;
        }
        let none = Entry {
            pod_id: String::new(),
            netns: PathBuf::new(),
            ifname: IFNAME.into(),
            args: String::new(),
            capability_args: json!({}),
            config_file: l.file.clone(),
            config: l.raw.clone(),
            result: None,
        };
        for plugin in l.plugins() {
            let mut conf = plugin_conf(&l, &plugin, None, &json!({}));
            conf["cni.dev/valid-attachments"] = Value::Array(valid.clone());
            if let Err(e) = self.run(&plugin, "GC", &none, &conf).await {
                tracing::warn!(error = %e, "CNI GC");
            }
        }
    }

    async fn run(
        &self,
        plugin: &Value,
        command: &str,
        e: &Entry,
        conf: &Value,
    ) -> Result<Option<Value>, PluginError> {
        let inv = exec::Invocation {
            command,
            container_id: &e.pod_id,
            netns: (!e.netns.as_os_str().is_empty()).then_some(e.netns.as_path()),
            ifname: &e.ifname,
            args: &e.args,
        };
        exec::run(
            &self.bin_dirs,
            &plugin_type(plugin),
            &inv,
            conf,
            self.timeout,
        )
        .await
    }

    /// The capability arguments berth offers; each plugin gets those it declares.
    fn capability_args(&self, p: &PodAttach) -> Result<Value, CniError> {
        let mut caps = serde_json::Map::new();
        let ports: Vec<Value> = p
            .ports
            .iter()
            .filter(|m| m.host_port != 0)
            .map(|m| {
                json!({
                    "hostPort": m.host_port,
                    "containerPort": m.container_port,
                    "protocol": m.protocol,
                    "hostIP": m.host_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                })
            })
            .collect();
        caps.insert("portMappings".into(), Value::Array(ports));
        if let Some(bw) = bandwidth(&p.annotations).map_err(CniError::Invalid)? {
            caps.insert("bandwidth".into(), bw);
        }
        let ranges: Vec<Value> = [&self.pod_cidr, &self.pod_cidr6]
            .into_iter()
            .filter_map(|c| c.read().expect("pod CIDR poisoned").clone())
            .map(|cidr| json!([{"subnet": cidr}]))
            .collect();
        if !ranges.is_empty() {
            caps.insert("ipRanges".into(), Value::Array(ranges));
        }
        if let Some((servers, searches, options)) = &p.dns {
            caps.insert(
                "dns".into(),
                json!({"servers": servers, "searches": searches, "options": options}),
            );
        }
        Ok(Value::Object(caps))
    }
}

/// Asks the plugins of a CNI 1.1 network for their STATUS every `STATUS_EVERY`, recording the
/// first failure (a plugin that cannot serve ADD yet: NetworkReady is false until it can).
async fn ask_status(
    loaded: Arc<RwLock<Result<Loaded, String>>>,
    status: Arc<RwLock<Option<String>>>,
    bin_dirs: Vec<PathBuf>,
    timeout: Duration,
) {
    loop {
        let l = loaded.read().expect("CNI configuration poisoned").clone();
        let mut said = None;
        if let Some(l) = l.ok().filter(|l| l.version.allows(Cmd::Status).is_ok()) {
            let inv = exec::Invocation {
                command: "STATUS",
                container_id: "",
                netns: None,
                ifname: IFNAME,
                args: "",
            };
            for plugin in l.plugins() {
                let conf = plugin_conf(&l, &plugin, None, &json!({}));
                if let Err(e) =
                    exec::run(&bin_dirs, &plugin_type(&plugin), &inv, &conf, timeout).await
                {
                    said = Some(e.to_string());
                    break;
                }
            }
        }
        *status.write().expect("CNI status poisoned") = said;
        tokio::time::sleep(STATUS_EVERY).await;
    }
}
