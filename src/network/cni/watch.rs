//! Watching the CNI configuration directory with inotify: a CNI DaemonSet writes its
//! configuration after the node (and berthd) started, and the node must turn NetworkReady
//! without a restart. A directory that does not exist yet is looked for every second.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// Raw fd wrapper: tokio's AsyncFd wants `AsRawFd`.
struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// Calls `changed` whenever something in `dir` may have changed (and once the directory
/// appears), until the task is aborted.
pub fn spawn(
    dir: PathBuf,
    changed: impl Fn() + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match watch_once(&dir, &changed).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "watching the CNI configuration directory")
                }
            }
            // The directory went away or is not there yet: look again shortly.
            tokio::time::sleep(Duration::from_secs(1)).await;
            changed();
        }
    })
}

/// Watches `dir` until it is removed or moved (or cannot be watched).
async fn watch_once(dir: &std::path::Path, changed: &impl Fn()) -> std::io::Result<()> {
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    ino.add_watch(
        dir,
        AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF,
    )?;
    // Whatever happened before the watch existed.
    changed();
    // SAFETY: the descriptor is the inotify instance's, owned by `Fd` inside the AsyncFd: it
    // stays open, and is the same one, until the AsyncFd drops it.
    let fd = unsafe { AsyncFd::register_with_interest(Fd(ino), tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    loop {
        let mut ready = fd.readable().await?;
        let events = match ready.get_inner().0.read_events() {
            Ok(ev) => ev,
            Err(nix::errno::Errno::EAGAIN) => {
                ready.clear_ready();
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let gone = events.iter().any(|e| {
            e.mask.intersects(
                AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF
                    | AddWatchFlags::IN_IGNORED,
            )
        });
        changed();
        if gone {
            return Ok(());
        }
    }
}
