//! Test harness: a real `berthd` (the built binary) on a temporary root, state directory and
//! socket, reached over gRPC as kubelet reaches it. Everything is torn down on drop, also when
//! the test panics; berthd's log is printed when a test fails.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Path of the berthd binary cargo built for the tests.
pub const BERTHD: &str = env!("CARGO_BIN_EXE_berthd");

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
    child: Option<Child>,
}

/// Options for starting a berthd.
#[derive(Default, Clone)]
pub struct Options {
    /// Extra TOML appended to the test's config file.
    pub extra_config: String,
    /// Log level (default debug, so failures show every call).
    pub log_level: Option<String>,
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
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let socket = dir.path().join("berth.sock");
        let config = dir.path().join("config.toml");
        let log = dir.path().join("berthd.log");
        std::fs::write(&config, &opts.extra_config).expect("writing config");
        let mut b = Berthd {
            dir,
            root,
            state,
            socket,
            config,
            log,
            child: None,
        };
        b.spawn(opts.log_level.as_deref().unwrap_or("debug"));
        b
    }

    /// The command line this berthd runs with.
    pub fn command(&self, log_level: &str) -> Command {
        let mut cmd = Command::new(BERTHD);
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
    }
}
