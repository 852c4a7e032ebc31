//! CNI mode against the real plugins of Debian's containernetworking-plugins (bridge,
//! host-local, portmap) and small script plugins of the tests' own: a pod's address from
//! the plugins, reachable from the node, its hostPort answering, everything given back at
//! removal (host-local's leases included); NetworkReady following the configuration
//! directory; prevResult chaining; a failing plugin named and leaving nothing; a kill between
//! ADD and the pod's record; DEL from the cache after the configuration is gone; GC for a
//! CNI 1.1 network.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth::cri::v1 as cri;
use common::world::*;
use tonic::Code;

/// Where Debian's plugins are.
const PLUGINS: &str = "/usr/lib/cni";

/// A CNI world: the configuration, script plugins and host-local's leases under `dir`.
struct Cni {
    dir: tempfile::TempDir,
}

impl Cni {
    fn new() -> Cni {
        let dir = tempfile::tempdir().unwrap();
        for d in ["net.d", "bin", "leases", "cache"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        Cni { dir }
    }

    fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("net.d")
    }

    fn leases(&self) -> PathBuf {
        self.dir.path().join("leases")
    }

    /// berthd's configuration for CNI mode.
    fn config(&self) -> String {
        format!(
            "[network]\nmode = \"cni\"\n[network.cni]\nconf_dir = {:?}\nbin_dirs = [{:?}, {:?}]\n\
             cache_dir = {:?}\nplugin_timeout_seconds = 20\n",
            self.conf_dir().display().to_string(),
            PLUGINS,
            self.dir.path().join("bin").display().to_string(),
            self.dir.path().join("cache").display().to_string(),
        )
    }

    /// A conflist of the bridge (host-local addresses in 10.99.0.0/24), then `extra`.
    fn write_conflist(&self, file: &str, extra: &[serde_json::Value]) {
        let mut plugins = vec![serde_json::json!({
            "type": "bridge", "bridge": "cnitest0", "isGateway": true, "ipMasq": true,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.0.0/24"}]],
                     "routes": [{"dst": "0.0.0.0/0"}],
                     "dataDir": self.leases().display().to_string()}})];
        plugins.extend(extra.iter().cloned());
        let conf =
            serde_json::json!({"cniVersion": "1.0.0", "name": "testnet", "plugins": plugins});
        // Written aside and renamed, as a DaemonSet installs it: never read half-written.
        let tmp = self.dir.path().join(format!(".{file}"));
        std::fs::write(&tmp, conf.to_string()).unwrap();
        std::fs::rename(tmp, self.conf_dir().join(file)).unwrap();
    }

    fn portmap() -> serde_json::Value {
        serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}})
    }

    /// A script plugin of the test's (python3), in the extra bin dir.
    fn script(&self, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.dir.path().join("bin").join(name);
        std::fs::write(&p, format!("#!/usr/bin/env python3\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// The addresses host-local still has leased.
    fn leased(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.leases().join("testnet"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect();
        v.sort();
        v
    }

    fn cached(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("cache"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .count()
    }
}

async fn world(cni: &Cni) -> World {
    World::with(common::Options {
        extra_config: cni.config(),
        ..Default::default()
    })
    .await
}

async fn network_ready(w: &mut World) -> cri::RuntimeCondition {
    w.rt.status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap()
}

async fn pod_ip(w: &mut World, pod: &str) -> String {
    w.rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: pod.into(),
        verbose: false,
    })
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
    .network
    .unwrap()
    .ip
}

/// GET / from `addr` in the test's network namespace (the node's view).
fn http_get(w: &World, addr: String) -> String {
    w.env.netns.run_in(move || {
        for _ in 0..50 {
            if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                write!(s, "GET / HTTP/1.0\r\n\r\n").unwrap();
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("nothing answers on {addr}");
    })
}

fn web() -> cri::ContainerConfig {
    container(
        "web",
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello-cni > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gets_its_address_from_the_plugins_and_gives_it_back() {
    let cni = Cni::new();
    cni.write_conflist("10-test.conflist", &[Cni::portmap()]);
    let mut w = world(&cni).await;
    let before = w.leftovers();
    let mut c = w.pod_config("cni", cri::NamespaceMode::Container);
    c.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: 18080,
        host_ip: String::new(),
    }];
    let pod = w.run_pod(c).await;
    let ip = pod_ip(&mut w, &pod.0).await;
    assert!(ip.starts_with("10.99.0."), "{ip}");
    assert_eq!(cni.leased(), vec![ip.clone()]);
    assert_eq!(cni.cached(), 1);
    let id = w.run(&pod, web()).await;
    assert!(http_get(&w, format!("{ip}:8080")).contains("hello-cni"));
    // The hostPort, set up by the portmap plugin from the portMappings capability.
    assert!(http_get(&w, "127.0.0.1:18080".into()).contains("hello-cni"));
    // Loopback inside the pod is berth's.
    assert_eq!(
        w.out(&id, &["cat", "/sys/class/net/lo/operstate"]).await,
        "unknown"
    );
    // The plugins' interface is counted in the pod's stats (kubelet's network figures).
    let stats =
        w.rt.pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.0.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let net = stats
        .linux
        .unwrap()
        .network
        .expect("the pod's network figures");
    let eth = net.default_interface.expect("the plugins' interface");
    assert!(eth.rx_bytes.unwrap().value > 0, "{eth:?}");
    w.remove_pod(&pod.0).await;
    assert!(cni.leased().is_empty(), "{:?}", cni.leased());
    assert_eq!(cni.cached(), 0);
    assert_eq!(w.leftovers(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_ready_follows_the_configuration_directory() {
    let cni = Cni::new();
    let mut w = world(&cni).await;
    let c = network_ready(&mut w).await;
    assert!(!c.status);
    assert_eq!(c.reason, "NetworkPluginNotReady");
    assert!(
        c.message.contains(&cni.conf_dir().display().to_string()),
        "{c:?}"
    );
    // A pod cannot be attached yet: refused, nothing made.
    let before = w.leftovers();
    let err =
        w.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(w.pod_config("early", cri::NamespaceMode::Container)),
            runtime_handler: common::handler(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert_eq!(w.leftovers(), before);
    // The DaemonSet installs its configuration while berthd runs.
    cni.write_conflist("10-test.conflist", &[]);
    let mut ready = false;
    for _ in 0..50 {
        if network_ready(&mut w).await.status {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "NetworkReady did not turn true");
    let pod = w.pod("late").await;
    assert!(pod_ip(&mut w, &pod.0).await.starts_with("10.99.0."));
    w.remove_pod(&pod.0).await;
    // And back when it is removed.
    std::fs::remove_file(cni.conf_dir().join("10-test.conflist")).unwrap();
    let mut gone = false;
    for _ in 0..50 {
        if !network_ready(&mut w).await.status {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "NetworkReady stayed true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chained_plugin_sees_the_previous_result_and_a_failing_one_leaves_nothing() {
    let cni = Cni::new();
    let seen = cni.dir.path().join("seen.json");
    // Passes the previous result on, as a chained plugin does, after keeping its input.
    cni.script(
        "recorder",
        &format!(
            "import json, os, sys\nconf = json.load(sys.stdin)\n\
             open({:?} + '.' + os.environ['CNI_COMMAND'], 'w').write(json.dumps(conf))\n\
             print(json.dumps(conf.get('prevResult', {{}})))",
            seen.display().to_string()
        ),
    );
    cni.script(
        "failer",
        "import json, sys\nsys.stdin.read()\nimport os\n\
         if os.environ['CNI_COMMAND'] == 'ADD':\n\
         \x20   print(json.dumps({'code': 11, 'msg': 'try later', 'details': 'the fabric is busy'}))\n\
         \x20   sys.exit(1)\n",
    );
    cni.write_conflist(
        "10-test.conflist",
        &[serde_json::json!({"type": "recorder"})],
    );
    let mut w = world(&cni).await;
    let pod = w.pod("chain").await;
    let ip = pod_ip(&mut w, &pod.0).await;
    let add: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}.ADD", seen.display())).unwrap())
            .unwrap();
    assert_eq!(add["name"], "testnet");
    assert_eq!(add["cniVersion"], "1.0.0");
    assert_eq!(
        add["prevResult"]["ips"][0]["address"],
        format!("{ip}/24"),
        "{add}"
    );
    w.remove_pod(&pod.0).await;
    // DEL got the result the pod was attached with.
    let del: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}.DEL", seen.display())).unwrap())
            .unwrap();
    assert_eq!(del["prevResult"]["ips"][0]["address"], format!("{ip}/24"));

    // A plugin that fails ADD: the call names it and what it said; the bridge's address and
    // veth are given back, no pin, no cache entry is left.
    cni.write_conflist("10-test.conflist", &[serde_json::json!({"type": "failer"})]);
    let before = w.leftovers();
    let err =
        w.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(w.pod_config("fails", cri::NamespaceMode::Container)),
            runtime_handler: common::handler(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("failer") && err.message().contains("the fabric is busy"),
        "{}",
        err.message()
    );
    assert!(cni.leased().is_empty(), "{:?}", cni.leased());
    assert_eq!(cni.cached(), 0);
    assert_eq!(w.leftovers(), before);
    let pins = w.env.berthd.state.join("ns");
    assert_eq!(std::fs::read_dir(&pins).unwrap().count(), 0, "pins left");
    let veths = w.env.netns.run_in(|| {
        std::fs::read_dir("/sys/class/net/cnitest0/brif")
            .map(|d| d.count())
            .unwrap_or(0)
    });
    assert_eq!(veths, 0, "a veth is still on the bridge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_runs_from_the_cache_after_the_configuration_is_gone() {
    let cni = Cni::new();
    cni.write_conflist("10-test.conflist", &[]);
    let mut w = world(&cni).await;
    let pod = w.pod("cached").await;
    assert_eq!(cni.leased().len(), 1);
    std::fs::remove_file(cni.conf_dir().join("10-test.conflist")).unwrap();
    w.remove_pod(&pod.0).await;
    assert!(cni.leased().is_empty(), "{:?}", cni.leased());
    assert_eq!(cni.cached(), 0);
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_add_and_the_pod_record_gives_the_address_back() {
    let cni = Cni::new();
    cni.write_conflist("10-test.conflist", &[]);
    let mut w = World::with(common::Options {
        extra_config: cni.config(),
        env: vec![("BERTH_FAILPOINTS".into(), "run:network=kill".into())],
        ..Default::default()
    })
    .await;
    let c = w.pod_config("killed", cri::NamespaceMode::Container);
    let r =
        w.rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(c),
            runtime_handler: common::handler(),
        })
        .await;
    assert!(r.is_err());
    w.env.berthd.wait_exit(Duration::from_secs(10));
    // ADD happened: the address is leased and the attachment cached.
    assert_eq!(cni.leased().len(), 1);
    assert_eq!(cni.cached(), 1);
    w.env.berthd.env = Vec::new();
    w.env.berthd.restart();
    w.rt = w.env.berthd.runtime().await;
    assert!(cni.leased().is_empty(), "{:?}", cni.leased());
    assert_eq!(cni.cached(), 0);
    // And the retried call works.
    let pod = w.pod("killed").await;
    assert!(pod_ip(&mut w, &pod.0).await.starts_with("10.99.0."));
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cni_1_1_network_is_garbage_collected_with_the_live_attachments() {
    let cni = Cni::new();
    let gc = cni.dir.path().join("gc.json");
    cni.script(
        "gcer",
        &format!(
            "import json, os, sys\nconf = json.load(sys.stdin)\ncmd = os.environ['CNI_COMMAND']\n\
             if cmd == 'GC':\n\x20   open({:?}, 'w').write(json.dumps(conf))\n\
             elif cmd == 'ADD':\n\
             \x20   print(json.dumps({{'cniVersion': '1.1.0', 'ips': [{{'address': '10.123.0.5/24'}}]}}))\n",
            gc.display().to_string()
        ),
    );
    let conf = serde_json::json!({"cniVersion": "1.1.0", "name": "gcnet",
                                  "plugins": [{"type": "gcer"}]});
    std::fs::write(cni.conf_dir().join("10-gc.conflist"), conf.to_string()).unwrap();
    let mut w = world(&cni).await;
    let pod = w.pod("collected").await;
    assert_eq!(pod_ip(&mut w, &pod.0).await, "10.123.0.5");
    w.env.berthd.terminate();
    w.env.berthd.restart();
    w.rt = w.env.berthd.runtime().await;
    let seen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gc).unwrap()).unwrap();
    assert_eq!(
        seen["cni.dev/valid-attachments"],
        serde_json::json!([{"containerID": pod.0, "ifname": "eth0"}]),
        "{seen}"
    );
    w.remove_pod(&pod.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cni_1_1_plugin_that_reports_not_ready_keeps_network_ready_false() {
    let cni = Cni::new();
    let marker = cni.dir.path().join("fabric-down");
    std::fs::write(&marker, "").unwrap();
    cni.script(
        "statuser",
        &format!(
            "import json, os, sys\nsys.stdin.read()\n\
             if os.environ['CNI_COMMAND'] == 'STATUS' and os.path.exists({:?}):\n\
             \x20   print(json.dumps({{'code': 50, 'msg': 'plugin not available', 'details': 'the fabric is down'}}))\n\
             \x20   sys.exit(1)\n",
            marker.display().to_string()
        ),
    );
    let conf = serde_json::json!({"cniVersion": "1.1.0", "name": "statusnet",
                                  "plugins": [{"type": "statuser"}]});
    std::fs::write(cni.conf_dir().join("10-s.conflist"), conf.to_string()).unwrap();
    let mut w = world(&cni).await;
    let mut last = None;
    for _ in 0..60 {
        let c = network_ready(&mut w).await;
        if !c.status && c.message.contains("the fabric is down") {
            last = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = last.expect("NetworkReady never reported the plugin's STATUS");
    assert_eq!(c.reason, "NetworkPluginNotReady");
    assert!(c.message.contains("statuser"), "{c:?}");
    std::fs::remove_file(&marker).unwrap();
    let mut ready = false;
    for _ in 0..60 {
        if network_ready(&mut w).await.status {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready,
        "NetworkReady did not turn true once STATUS succeeded"
    );
}

/// Where the plugins live must exist for these tests to mean anything.
#[test]
fn the_debian_plugins_are_installed() {
    for p in ["bridge", "host-local", "portmap"] {
        assert!(
            Path::new(PLUGINS).join(p).exists(),
            "{PLUGINS}/{p}: install containernetworking-plugins (hack/test does)"
        );
    }
}
