//! berthd as a process: configuration errors, the lock, the socket, signals, and the
//! Version/Status/RuntimeConfig answers kubelet relies on.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Stdio;

use berth::cri::v1 as cri;
use common::Berthd;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_names_berth_and_api_v1() {
    let b = Berthd::start();
    let v = b
        .runtime()
        .await
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "berth");
    assert_eq!(v.runtime_api_version, "v1");
    assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_both_conditions_and_verbose_config() {
    let b = Berthd::start();
    let s = b
        .runtime()
        .await
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let conds = s.status.unwrap().conditions;
    let runtime = conds.iter().find(|c| c.r#type == "RuntimeReady").unwrap();
    assert!(runtime.status, "runtime not ready: {runtime:?}");
    let network = conds.iter().find(|c| c.r#type == "NetworkReady").unwrap();
    if !network.status {
        assert!(
            !network.reason.is_empty() && !network.message.is_empty(),
            "{network:?}"
        );
    }
    let config: serde_json::Value = serde_json::from_str(&s.info["config"]).unwrap();
    assert_eq!(config["root"], b.root.to_str().unwrap());
    assert_eq!(config["network"]["bridge"], "berth0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_without_verbose_has_no_info() {
    let b = Berthd::start();
    let s = b
        .runtime()
        .await
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    assert!(s.info.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_config_reports_the_cgroup_driver() {
    let b = Berthd::start();
    let r = b
        .runtime()
        .await
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    let want = if common::systemd_driver() {
        cri::CgroupDriver::Systemd
    } else {
        cri::CgroupDriver::Cgroupfs
    };
    assert_eq!(r.linux.unwrap().cgroup_driver, want as i32);
}

fn pod_cidr_request(cidr: &str) -> cri::UpdateRuntimeConfigRequest {
    cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig {
            network_config: Some(cri::NetworkConfig {
                pod_cidr: cidr.into(),
            }),
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_runtime_config_records_the_pod_cidr() {
    let b = Berthd::start();
    let mut rt = b.runtime().await;
    rt.update_runtime_config(pod_cidr_request("10.244.1.0/24"))
        .await
        .unwrap();
    let s = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.info["podCIDR"], "\"10.244.1.0/24\"");

    let err = rt
        .update_runtime_config(pod_cidr_request("10.244.1.0/99"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("10.244.1.0/99"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_not_done_yet_is_unimplemented_naming_itself() {
    let b = Berthd::start();
    let err = b
        .runtime()
        .await
        .checkpoint_container(cri::CheckpointContainerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(
        err.message().contains("CheckpointContainer"),
        "{}",
        err.message()
    );
}

#[test]
fn socket_is_0660_and_owned_by_root() {
    let b = Berthd::start();
    let meta = std::fs::symlink_metadata(&b.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
}

#[test]
fn sigterm_removes_the_socket_and_exits_zero() {
    let mut b = Berthd::start();
    let status = b.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!b.socket.exists(), "socket left behind");
    assert!(b.log_text().contains("berthd stopped"));
}

#[test]
fn sigint_also_stops_cleanly() {
    let mut b = Berthd::start();
    b.signal(nix::sys::signal::Signal::SIGINT);
    let status = b.wait_exit(std::time::Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    assert!(!b.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_state_dir_refuses_and_the_first_keeps_serving() {
    let b = Berthd::start();
    let out = b
        .command("info")
        .stdin(Stdio::null())
        .output()
        .expect("running second berthd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    assert!(err.contains(&b.state.display().to_string()), "{err}");
    assert!(err.contains(&format!("pid {}", b.pid())), "{err}");
    // The first one still answers, on the same socket.
    let v = b
        .runtime()
        .await
        .version(cri::VersionRequest::default())
        .await
        .unwrap();
    assert_eq!(v.into_inner().runtime_name, "berth");
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let mut b = Berthd::start();
    b.signal(nix::sys::signal::Signal::SIGKILL);
    b.wait_exit(std::time::Duration::from_secs(10));
    assert!(b.socket.exists(), "kill -9 should leave the socket");
    let mut child = b.command("info").stderr(Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&b.socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "restarted berthd did not serve"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "restarted berthd exited"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}

fn run_with_config(text: &str) -> (std::process::Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = std::process::Command::new(common::BERTHD)
        .arg("--config")
        .arg(&cfg)
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--listen")
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    (out, dir)
}

#[test]
fn unknown_config_key_fails_with_file_line_and_key_and_touches_nothing() {
    let (out, dir) = run_with_config("[network]\nbridge = \"b0\"\nbrigde = \"typo\"\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let cfg = dir.path().join("config.toml");
    assert!(err.contains(&format!("{}:3:", cfg.display())), "{err}");
    assert!(err.contains("network.brigde"), "{err}");
    assert!(!dir.path().join("state").exists(), "state dir was created");
    assert!(!dir.path().join("root").exists(), "root dir was created");
}

#[test]
fn wrong_config_type_fails_with_file_line_and_key() {
    let (out, dir) =
        run_with_config("log_level = \"info\"\n[images]\nmax_concurrent_downloads = \"3\"\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let cfg = dir.path().join("config.toml");
    assert!(err.contains(&format!("{}:3:", cfg.display())), "{err}");
    assert!(err.contains("images.max_concurrent_downloads"), "{err}");
}

#[test]
fn config_default_prints_parseable_commented_toml() {
    let out = std::process::Command::new(common::BERTHD)
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with('#'));
    for key in [
        "[network]",
        "bridge = \"berth0\"",
        "subnet = \"10.88.0.0/16\"",
        "[registries.",
    ] {
        assert!(text.contains(key), "missing {key}");
    }
    let parsed = berth::config::Config::parse(&text, std::path::Path::new("<stdout>")).unwrap();
    assert_eq!(parsed, berth::config::Config::default());
}

#[test]
fn a_metrics_address_that_is_not_ip_port_fails_naming_the_key() {
    let (out, dir) = run_with_config("[metrics]\naddress = \"localhost\"\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics.address \"localhost\""), "{err}");
    assert!(!dir.path().join("state").exists(), "state dir was created");
}

#[test]
fn a_runtime_handler_without_a_usable_binary_stops_the_start_naming_it() {
    let (out, dir) = run_with_config("[runtimes.kata]\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("runtimes.kata.path"), "{err}");
    assert!(!dir.path().join("state").exists(), "state dir was created");
    let (out, _dir) = run_with_config("[runtimes.ghost]\npath = \"/nonexistent/ghost-runtime\"\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("runtimes.ghost") && err.contains("/nonexistent/ghost-runtime"),
        "{err}"
    );
}

#[test]
fn the_systemd_driver_takes_slices_and_a_running_systemd_or_stops_the_start() {
    let (out, _dir) =
        run_with_config("cgroup_driver = \"systemd\"\ncgroup_parent = \"/kubepods\"\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cgroup_parent") && err.contains("slice"),
        "{err}"
    );
    let (out, _dir) = run_with_config("cgroup_driver = \"systemd-ish\"\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cgroup_driver"), "{err}");
    if std::path::Path::new("/run/systemd/system").exists() {
        eprintln!("systemd runs here: the refusal without one is not tried");
        return;
    }
    let (out, _dir) = run_with_config("cgroup_driver = \"systemd\"\n");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a running systemd"), "{err}");
}
