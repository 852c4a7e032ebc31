//! The daemon's life: lock the root and state directories, bind the CRI socket, serve until
//! SIGTERM/SIGINT, then let in-flight calls finish (bounded) and remove the socket.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::Config;
use crate::cri::Cri;
use crate::runtime::Runtime;

/// Why the daemon could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another berthd holds the lock.
    #[error(
        "another berthd{pid} is already running with {what} directory {dir} (lock {lock} is held)"
    )]
    AlreadyRunning {
        /// "state" or "root".
        what: &'static str,
        /// The directory.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// " (pid N)" when the lock file names one.
        pid: String,
    },
    /// The socket path is served by a live process.
    #[error("socket {0} is in use by another process; refusing to replace it")]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A filesystem step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What berthd was doing.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The runtime core could not start.
    #[error(transparent)]
    Runtime(#[from] crate::error::Error),
    /// The metrics endpoint could not be opened.
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::ServeError),
    /// The streaming server could not be opened.
    #[error(transparent)]
    Streaming(#[from] crate::streaming::StreamingError),
    /// The gRPC server failed.
    #[error("serving the CRI: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DaemonError + 'a {
    move |source| DaemonError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// An exclusive lock on a directory, held for the daemon's lifetime; it names our pid.
struct DirLock {
    _lock: Flock<File>,
}

impl DirLock {
    fn acquire(dir: &Path, what: &'static str) -> Result<DirLock, DaemonError> {
        let path = dir.join("berthd.lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("opening lock file", &path))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(DaemonError::AlreadyRunning {
                    what,
                    dir: dir.to_owned(),
                    lock: path,
                    pid: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    },
                });
            }
        };
        // The pid is informational (for the message above); the flock is what excludes.
        let write_pid = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            writeln!(f, "{}", std::process::id())
        };
        write_pid(&mut lock).map_err(io_err("writing lock file", &path))?;
        Ok(DirLock { _lock: lock })
    }
}

/// Creates `dir` (and parents) with mode `mode` if missing.
fn ensure_dir(dir: &Path, mode: u32) -> Result<(), DaemonError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io_err("creating directory", dir))
}

/// Binds the CRI socket: mode 0660, owned by root. A stale socket (nobody listening) is
/// replaced; a live one or a non-socket file is left alone and reported.
fn bind_socket(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(parent) = path.parent() {
        ensure_dir(parent, 0o711)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(DaemonError::SocketInUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io_err("removing stale socket", path))?;
            tracing::info!(socket = %path.display(), "replaced a stale socket");
        }
        Ok(_) => return Err(DaemonError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspecting socket path", path)(e)),
    }
    // Bind under a umask that leaves the socket no wider than 0660 from its first instant, so no
    // other user can connect between bind and chmod. Startup is the only place umask changes.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o117));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(io_err("binding socket", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_err("setting socket mode", path))?;
    std::os::unix::fs::chown(path, Some(0), Some(0)).map_err(io_err("chowning socket", path))?;
    Ok(listener)
}

/// Removes the socket if it is still ours (same inode as bound), so a successor's socket is
/// never removed by a predecessor that is shutting down late.
fn remove_socket(path: &Path, ino: u64) {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.ino() == ino => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(socket = %path.display(), error = %e, "could not remove socket");
            }
        }
        _ => {}
    }
}

/// SIGTERM and SIGINT, caught from the moment this is called.
struct Termination {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Termination {
    fn install() -> Termination {
        Termination {
            term: signal(SignalKind::terminate()).expect("installing SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("installing SIGINT handler"),
        }
    }

    /// Waits for either.
    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Runs berthd until a termination signal. Returns after the socket is removed.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    // Before any process is started (they take the original back: crate::fdlimit).
    match crate::fdlimit::raise() {
        Ok((was, now)) if was != now => {
            tracing::info!(was, now, "raised the soft RLIMIT_NOFILE to the hard limit")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the soft RLIMIT_NOFILE"),
    }
    ensure_dir(&config.state, crate::layout::STATE_MODE)?;
    ensure_dir(&config.root, crate::layout::DIR_MODE)?;
    // Lock before anything else touches either directory: a second berthd must change nothing.
    let _state_lock = DirLock::acquire(&config.state, "state")?;
    let _root_lock = DirLock::acquire(&config.root, "root")?;
    // Root's alone, also where an older berthd or an operator left the tree wider.
    crate::layout::Layout::new(&config.root, &config.state)
        .prepare()
        .map_err(io_err("preparing the directories under", &config.state))?;

    let listen = config.listen.clone();
    let metrics_address = config.metrics.address.clone();
    let streaming_config = config.streaming.clone();
    let grace = Duration::from_secs(config.shutdown_timeout_seconds);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "berthd starting: opening the stores"
    );
    let rt = Arc::new(Runtime::open(config).await?);
    let (runtime_svc, image_svc) = Cri::new(rt.clone()).services();

    // Before the socket exists: a client that sees it may stop us at once, and that SIGTERM
    // must find the handler, not the default action.
    let mut termination = Termination::install();
    let listener = bind_socket(&listen)?;
    let ino = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&listen)
            .map_err(io_err("inspecting socket", &listen))?
            .ino()
    };
    tracing::info!(socket = %listen.display(), version = env!("CARGO_PKG_VERSION"), "berthd serving the CRI");

    let tls = match (
        &streaming_config.tls_cert_file,
        &streaming_config.tls_key_file,
    ) {
        _ if !streaming_config.tls => None,
        (Some(cert), Some(key)) => Some(crate::streaming::tls::Certificate::Files {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => Some(crate::streaming::tls::Certificate::SelfSigned),
    };
    let (streaming_at, streaming) = rt
        .streaming
        .serve(
            &streaming_config.address,
            streaming_config.port,
            tls.as_ref(),
            crate::streaming::portforward::Timeouts {
                idle: Duration::from_secs(streaming_config.idle_timeout_seconds),
                creation: Duration::from_secs(streaming_config.stream_creation_timeout_seconds),
            },
            // Stopped by aborting it at the end: its sessions are upgraded connections that a
            // graceful stop would not wait for anyway.
            std::future::pending(),
        )
        .await?;
    // Before the CRI is served: no pod's hostPort may take these addresses' connections.
    rt.pods.reserve_own_endpoint(streaming_at);
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = if metrics_address.is_empty() {
        None
    } else {
        let census_rt = rt.clone();
        let (metrics_at, task) =
            crate::telemetry::serve(&metrics_address, move || census_rt.census(), async {
                let _ = metrics_stopped.await;
            })
            .await?;
        rt.pods.reserve_own_endpoint(metrics_at);
        Some(task)
    };

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(crate::cri::DeadlineLayer)
            .add_service(runtime_svc)
            .add_service(image_svc)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = stop_rx.await;
            }),
    );
    let mut server = server;
    let outcome = tokio::select! {
        sig = termination.wait() => {
            tracing::info!(signal = sig, grace_seconds = grace.as_secs(), "stopping: no new connections, finishing in-flight calls");
            let _ = stop_tx.send(());
            match tokio::time::timeout(grace, &mut server).await {
                Ok(joined) => joined.expect("server task panicked").map_err(DaemonError::from),
                Err(_) => {
                    tracing::warn!("in-flight calls did not finish within the grace period; exiting anyway");
                    server.abort();
                    Ok(())
                }
            }
        }
        joined = &mut server => joined.expect("server task panicked").map_err(DaemonError::from),
    };
    remove_socket(&listen, ino);
    let _ = metrics_stop.send(());
    // Open port-forwards end with berthd (their clients reconnect to the next one).
    streaming.abort();
    if let Some(task) = metrics {
        // A scraper holding its connection open must not hold up the stop.
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    // A clean stop (as before a reboot) leaves every snapshot durable, so none is dropped.
    tokio::task::block_in_place(|| rt.images.sync_snapshots());
    tracing::info!("berthd stopped");
    outcome
}
