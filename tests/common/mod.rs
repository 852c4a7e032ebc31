//! Test harness: a real `berthd` (the built binary) on a temporary root, state directory and
//! socket, reached over gRPC as kubelet reaches it. Everything is torn down on drop, also when
//! the test panics; berthd's log is printed when a test fails.

#![allow(dead_code)]

pub mod churn;
pub mod fake_http;
pub mod node;
pub mod proxy;
pub mod spdy;
pub mod token;
pub mod world;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use berth::cri::v1::image_service_client::ImageServiceClient;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Path of the berthd binary cargo built for the tests.
pub const BERTHD: &str = env!("CARGO_BIN_EXE_berthd");

/// The berthd the tests start: `BERTH_TEST_BERTHD` when set (another build, such as the
/// previous commit's, to show a new test fails there), else cargo's.
pub fn berthd_binary() -> String {
    std::env::var("BERTH_TEST_BERTHD").unwrap_or_else(|_| BERTHD.to_string())
}

/// A running berthd and the temporary directories it owns.
pub struct Berthd {
    /// The temporary directory holding everything below.
    pub dir: tempfile::TempDir,
    /// `--root`.
    pub root: PathBuf,
    /// `--state`.
    pub state: PathBuf,
    /// `--listen`.
    pub socket: PathBuf,
    /// The config file passed with `--config`.
    pub config: PathBuf,
    /// berthd's stderr.
    pub log: PathBuf,
    /// The network namespace it runs in.
    pub netns: Option<PathBuf>,
    /// The cgroup (relative to each hierarchy's root) its pods go under by default; removed
    /// with everything in it on drop.
    pub cgroup_root: String,
    /// Extra environment of the next start (e.g. BERTH_FAILPOINTS).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    /// A namespace made for this berthd when the test gave none (dropped after berthd).
    own_netns: Option<Netns>,
}

/// The runtime handler the tests' pods name: `BERTH_TEST_HANDLER` (runc, say), or "" for the
/// embedded runtime. hack/test runs the lifecycle tests once more under runc this way.
pub fn handler() -> String {
    std::env::var("BERTH_TEST_HANDLER").unwrap_or_default()
}

/// The configuration of `handler()`: its binary from `BERTH_TEST_HANDLER_PATH`, else for runc
/// the one `e2e/tools/build-runc` built (Debian's lacks the 2025 fixes and berthd refuses it),
/// else /usr/sbin/<handler>.
fn handler_config() -> String {
    let h = handler();
    if h.is_empty() {
        return String::new();
    }
    let built = || {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/var/tmp/berth-tools")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("runc-"))
            .map(|e| e.path().join("runc"))
            .filter(|p| p.exists())
            .collect();
        found.sort();
        found.pop().map(|p| p.to_string_lossy().into_owned())
    };
    let path = std::env::var("BERTH_TEST_HANDLER_PATH")
        .ok()
        .or_else(|| if h == "runc" { built() } else { None })
        .unwrap_or_else(|| format!("/usr/sbin/{h}"));
    format!("[runtimes.{h}]\npath = {path:?}\n")
}

/// The cgroup driver the tests' berthd runs with: `BERTH_TEST_CGROUP_DRIVER` (`systemd`, in
/// e2e/vm/run's guest), else cgroupfs.
pub fn systemd_driver() -> bool {
    std::env::var("BERTH_TEST_CGROUP_DRIVER").is_ok_and(|d| d == "systemd")
}

/// The cgroup parent of a pod under a berthd's `cgroup_root`, as kubelet would give it for
/// the driver: a path, or a slice (dashes nest slices, so the uid's become underscores).
pub fn pod_cgroup_parent(cgroup_root: &str, leaf: &str) -> String {
    if systemd_driver() {
        format!("{cgroup_root}-{}.slice", leaf.replace('-', "_"))
    } else {
        format!("/{cgroup_root}/{leaf}")
    }
}

/// Options for starting a berthd.
#[derive(Default, Clone)]
pub struct Options {
    /// Extra TOML appended to the test's config file.
    pub extra_config: String,
    /// Log level (default debug, so failures show every call).
    pub log_level: Option<String>,
    /// The network namespace berthd runs in (by path), if not the test's own.
    pub netns: Option<PathBuf>,
    /// A root directory to use instead of a fresh one under the temp dir.
    pub root: Option<PathBuf>,
    /// Extra environment for berthd.
    pub env: Vec<(String, String)>,
    /// A state directory to use instead of a fresh one under the temp dir.
    pub state: Option<PathBuf>,
}

impl Berthd {
    /// Starts berthd with the default test configuration and waits until it serves.
    pub fn start() -> Berthd {
        Berthd::start_with(Options::default())
    }

    /// Starts berthd with `opts` and waits until it serves.
    pub fn start_with(opts: Options) -> Berthd {
        let dir = tempfile::Builder::new()
            .prefix("berth-test-")
            .tempdir()
            .expect("creating temp dir");
        let root = opts.root.clone().unwrap_or_else(|| dir.path().join("root"));
        // berthd always runs in a namespace a test made: its bridge, veths, nft table and
        // sysctls never touch the machine's own network.
        let own_netns = if opts.netns.is_none() {
            Some(Netns::new())
        } else {
            None
        };
        let netns_path = opts
            .netns
            .clone()
            .or_else(|| own_netns.as_ref().map(|n| n.path.clone()));
        let state = opts
            .state
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let socket = dir.path().join("berth.sock");
        let config = dir.path().join("config.toml");
        let log = dir.path().join("berthd.log");
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // With the systemd driver a top-level slice (no dashes: they would nest it).
        let (cgroup_root, parent) = if systemd_driver() {
            let root = format!("berth_test_{}_{n}", std::process::id());
            let parent = format!("cgroup_driver = \"systemd\"\ncgroup_parent = \"{root}.slice\"");
            (root, parent)
        } else {
            let root = format!("berth-test-{}-{n}", std::process::id());
            let parent = format!("cgroup_parent = \"/{root}\"");
            (root, parent)
        };
        std::fs::write(
            &config,
            format!("{parent}\n{}\n{}", opts.extra_config, handler_config()),
        )
        .expect("writing config");
        let mut b = Berthd {
            dir,
            root,
            state,
            socket,
            config,
            log,
            netns: netns_path,
            cgroup_root,
            env: opts.env.clone(),
            child: None,
            own_netns,
        };
        b.spawn(opts.log_level.as_deref().unwrap_or("debug"));
        b
    }

    /// The command line this berthd runs with (inside its network namespace, if any).
    pub fn command(&self, log_level: &str) -> Command {
        let mut cmd = Command::new(berthd_binary());
        if let Some(ns) = &self.netns {
            in_netns(&mut cmd, ns);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--root")
            .arg(&self.root)
            .arg("--state")
            .arg(&self.state)
            .arg("--listen")
            .arg(&self.socket)
            .arg("--log-level")
            .arg(log_level);
        cmd
    }

    /// Starts berthd again (after it exited) on the same directories.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "berthd still running");
        self.spawn("debug");
    }

    fn spawn(&mut self, log_level: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening log");
        let child = self
            .command(log_level)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning berthd");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the socket accepts connections; panics with the log if berthd exits first.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("berthd exited early with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "berthd did not serve within 30s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether berthd is running (started and not yet seen to exit).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// berthd's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("berthd not running").id()
    }

    /// What berthd logged so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Sends `sig` to berthd.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig)
            .expect("signalling berthd");
    }

    /// Sends SIGTERM and waits (up to 30 s) for berthd to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
    }

    /// Waits for berthd to exit; SIGKILLs it after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("berthd not running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let st = child.wait().unwrap();
                self.child = None;
                panic!("berthd did not exit within {timeout:?} ({st})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A gRPC channel to berthd, with `:authority` localhost as kubelet sends it.
    pub async fn channel(&self) -> Channel {
        connect(&self.socket).await
    }

    /// A RuntimeService client.
    pub async fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel().await)
    }

    /// An ImageService client.
    pub async fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel().await)
    }
}

/// Connects a tonic channel to a unix socket.
pub async fn connect(path: &Path) -> Channel {
    let path = path.to_owned();
    Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connecting to berthd")
}

impl Drop for Berthd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- berthd log ({}) ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        kill_pod_processes(&self.state);
        cleanup_cgroups(&self.cgroup_root);
        unmount_under(self.dir.path());
    }
}

/// Kills the monitors and inits of the pods recorded under `state` (a test that failed may
/// not have removed its pods): by the pid each record names, if its start time still matches.
pub fn kill_pod_processes(state: &Path) {
    let Ok(rd) = std::fs::read_dir(state.join("pods")) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path().join("pod.json")) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        for key in ["monitor", "init"] {
            let (Some(pid), Some(start)) = (v[key][0].as_i64(), v[key][1].as_u64()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let started = stat
                .rfind(')')
                .and_then(|i| stat[i + 2..].split(' ').nth(19))
                .and_then(|s| s.parse::<u64>().ok());
            if started == Some(start) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Every cgroup hierarchy mount point on this host.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

/// Kills whatever runs in cgroups under `root` and removes them, deepest first; with the
/// systemd driver stops the slice `root` names first (its units go with it).
pub fn cleanup_cgroups(root: &str) {
    let top_name = if systemd_driver() {
        let slice = format!("{root}.slice");
        let _ = Command::new("systemctl")
            .args(["stop", &slice])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("systemctl")
            .args(["reset-failed", &slice])
            .stderr(std::process::Stdio::null())
            .status();
        slice
    } else {
        root.to_string()
    };
    for m in cgroup_mounts() {
        let top = m.join(&top_name);
        if !top.exists() {
            continue;
        }
        let mut dirs = Vec::new();
        let mut stack = vec![top.clone()];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        stack.push(e.path());
                    }
                }
            }
            dirs.push(d);
        }
        for d in &dirs {
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Mount points under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    v.dedup();
    v
}

/// Unmounts everything under `dir`.
pub fn unmount_under(dir: &Path) {
    for _ in 0..3 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Makes `cmd` enter the network namespace at `ns` before it executes.
pub fn in_netns(cmd: &mut Command, ns: &Path) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let f = std::fs::File::open(ns).expect("opening netns");
    // SAFETY: between fork and exec only setns(2), an async-signal-safe syscall, runs; the
    // file stays open because the closure owns it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A network namespace made for one test (`ip netns add`), with `lo` up; deleted on drop.
pub struct Netns {
    /// Its name.
    pub name: String,
    /// `/run/netns/<name>`.
    pub path: PathBuf,
}

impl Netns {
    /// Creates a fresh namespace with a unique name.
    pub fn new() -> Netns {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "berth-t{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns {
            path: PathBuf::from(format!("/run/netns/{name}")),
            name,
        };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it makes live there).
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path.clone();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("opening netns");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread panicked")
    }

    /// Whether a TCP connection to `addr` succeeds from inside the namespace.
    pub fn can_connect(&self, addr: &str) -> bool {
        let addr = addr.to_string();
        self.run_in(move || std::net::TcpStream::connect(addr).is_ok())
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        in_netns(&mut cmd, &self.path);
        cmd.output().expect("running command in netns")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The prepared test images (see hack/fixtures/build).
pub fn fixtures() -> PathBuf {
    let p = std::env::var_os("BERTH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/berth-fixtures/current"));
    assert!(
        p.join("done").exists(),
        "test images missing at {}: run hack/fixtures/build (hack/test does)",
        p.display()
    );
    p
}

/// One tag of the fixture images.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Tag {
    /// `repo:tag` without a host.
    pub repo_tag: String,
    /// The digest of what the tag points at (manifest or index).
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// The image ID this host gets.
    pub image_id: String,
    /// Layer blob digests.
    pub layers: Vec<String>,
}

/// The fixture tag `repo_tag`.
pub fn tag(repo_tag: &str) -> Tag {
    let text = std::fs::read_to_string(fixtures().join("tags.json")).expect("reading tags.json");
    let tags: Vec<Tag> = serde_json::from_str(&text).expect("parsing tags.json");
    tags.into_iter()
        .find(|t| t.repo_tag == repo_tag)
        .unwrap_or_else(|| panic!("no fixture tag {repo_tag}"))
}

/// A Debian docker-registry serving the fixture images on 127.0.0.1:PORT inside a namespace.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Serves the prepared fixture storage read-only on `port` in `ns`.
    pub fn start(ns: &Netns, port: u16) -> Registry {
        Registry::start_with(ns, port, &fixtures().join("registry"), true, "")
    }

    /// Serves `storage` on `port` in `ns`; `extra` is appended to the registry config.
    pub fn start_with(
        ns: &Netns,
        port: u16,
        storage: &Path,
        readonly: bool,
        extra: &str,
    ) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let template = include_str!("../../hack/fixtures/registry.yml.in");
        let config = template
            .replace("@STORAGE@", storage.to_str().unwrap())
            .replace("@PORT@", &port.to_string())
            .replace("@READONLY@", if readonly { "true" } else { "false" })
            + extra;
        let cfg = dir.path().join("registry.yml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        in_netns(&mut cmd, &ns.path);
        let child = cmd.spawn().expect("starting docker-registry");
        let r = Registry {
            child,
            addr: format!("127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ns.can_connect(&r.addr) {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Config mapping the upstream hosts of the fixture images to the local registry at `addr`.
pub fn mirror_config(addr: &str) -> String {
    let mut s = String::new();
    for host in ["registry.k8s.io", "gcr.io", "docker.io"] {
        s.push_str(&format!(
            "[registries.\"{host}\"]\nmirrors = [\"http://{addr}\"]\n"
        ));
    }
    s.push_str(&format!("[registries.\"{addr}\"]\ninsecure = true\n"));
    s
}

/// A test's world: a namespace, the fixture registry in it, and a berthd in it using the
/// registry as mirror for the upstream hosts.
pub struct Env {
    /// berthd (dropped first).
    pub berthd: Berthd,
    /// The registry.
    pub registry: Registry,
    /// The namespace (dropped last).
    pub netns: Netns,
}

impl Env {
    /// The default world.
    pub fn new() -> Env {
        Env::with(Options::default())
    }

    /// A world with extra berthd options (`extra_config` is added after the mirrors).
    pub fn with(mut opts: Options) -> Env {
        let netns = Netns::new();
        let registry = Registry::start(&netns, 5000);
        // Top-level keys of the test first: after a table header they would belong to it.
        opts.extra_config = format!("{}\n{}", opts.extra_config, mirror_config(&registry.addr));
        opts.netns = Some(netns.path.clone());
        let berthd = Berthd::start_with(opts);
        Env {
            berthd,
            registry,
            netns,
        }
    }
}
