//! A containerd (Debian's package) for the benchmarks that set berth beside it: its own root,
//! state and socket in the benchmark's network namespace, mirroring the fixtures registry, so
//! both runtimes do the same work against the same images.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{Netns, in_netns};

/// Whether containerd is installed (the benchmarks' scripts install it).
pub fn installed() -> bool {
    Command::new("sh")
        .arg("-c")
        .arg("command -v containerd")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A running containerd; stopped (SIGTERM) when dropped.
pub struct Containerd {
    child: Child,
    /// Its root, state and socket live here (removed with it).
    _dir: tempfile::TempDir,
    /// Its CRI socket.
    pub socket: PathBuf,
}

impl Containerd {
    /// Starts one in `ns` pulling through `registry`; `cri` is more of the CRI plugin's
    /// table (`[plugins."io.containerd.grpc.v1.cri".cni]`, say).
    pub fn start(ns: &Netns, registry: &str, cri: &str) -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("berth-bench-ctrd-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{registry}/pause:3.9"
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below containerd's
  # own, and fails every sandbox without this.
  restrict_oom_score_adj = true
{cri}
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
"#,
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log);
        in_netns(&mut cmd, &ns.path);
        let child = cmd.spawn().expect("starting containerd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Containerd {
            child,
            _dir: dir,
            socket,
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}
