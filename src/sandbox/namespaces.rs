//! A pod's namespaces without a pause process: a short-lived thread unshares the network, IPC
//! and UTS namespaces, sets the hostname and the namespaced sysctls from inside them, and pins
//! each one with a bind mount of `/proc/thread-self/ns/<kind>`. The pins keep the namespaces
//! alive after the thread exits; unmounting them lets the kernel free them (asynchronously).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};

/// The namespaces a pod gets of its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wanted {
    /// A network namespace (not host network).
    pub net: bool,
    /// An IPC namespace (not host IPC).
    pub ipc: bool,
    /// A UTS namespace (not host network).
    pub uts: bool,
}

/// What was made.
pub struct Made {
    /// The network namespace, open (for moving the veth peer into it), if one was made.
    pub netns: Option<OwnedFd>,
    /// An rtnetlink handle whose socket lives in the new network namespace.
    pub net_handle: Option<rtnetlink::Handle>,
}

/// Why a step failed, naming it.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct NsError {
    /// Which step.
    pub step: String,
    /// Why.
    pub source: std::io::Error,
    /// True when the request itself was at fault (a bad sysctl value).
    pub invalid: bool,
}

fn step(step: impl Into<String>) -> impl FnOnce(nix::Error) -> NsError {
    let step = step.into();
    move |e| NsError {
        step,
        source: e.into(),
        invalid: false,
    }
}

/// Where the pin of namespace `kind` of a pod lives.
pub fn pin_path(dir: &Path, kind: &str) -> PathBuf {
    dir.join(kind)
}

/// Makes `dir` a shared mount point (like iproute2's /run/netns), so that unmounting a pin here
/// also unmounts the copies other mount namespaces took: otherwise such a copy would keep a
/// pod's network namespace alive.
pub fn prepare_pin_root(dir: &Path) -> std::io::Result<()> {
    crate::layout::private_dir(dir)?;
    let shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if is_mount_point(dir) {
        shared()?;
        return Ok(());
    }
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    shared()?;
    Ok(())
}

/// Whether `p` is a mount point (per /proc/self/mountinfo).
pub fn is_mount_point(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(&*want))
}

/// Mount points in mountinfo escape space, tab, newline and backslash as octal.
pub fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Creates the namespaces in `want`, sets `hostname` (in the new UTS namespace) and `sysctls`,
/// and pins them under `dir` (which must exist). On failure nothing is left pinned.
pub async fn create(
    dir: &Path,
    want: Wanted,
    hostname: &str,
    sysctls: &[(String, String)],
) -> Result<Made, NsError> {
    let dir = dir.to_owned();
    let hostname = hostname.to_string();
    let sysctls = sysctls.to_vec();
    let rt = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A fresh thread: unshare(2) changes the calling thread's namespaces, and this one exits
    // when done, so no thread of the daemon is ever left in a pod's namespace.
    std::thread::Builder::new()
        .name("berth-ns".into())
        .spawn(move || {
            let r = in_thread(&dir, want, &hostname, &sysctls, rt);
            if r.is_err() {
                unpin_all(&dir);
            }
            let _ = tx.send(r);
        })
        .map_err(|e| NsError {
            step: "starting the namespace thread".into(),
            source: e,
            invalid: false,
        })?;
    rx.await.unwrap_or_else(|_| {
        Err(NsError {
            step: "namespace thread".into(),
            source: std::io::Error::other("ended without an answer"),
            invalid: false,
        })
    })
}

fn in_thread(
    dir: &Path,
    want: Wanted,
    hostname: &str,
    sysctls: &[(String, String)],
    rt: tokio::runtime::Handle,
) -> Result<Made, NsError> {
    let mut flags = CloneFlags::empty();
    if want.net {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if want.ipc {
        flags |= CloneFlags::CLONE_NEWIPC;
    }
    if want.uts {
        flags |= CloneFlags::CLONE_NEWUTS;
    }
    if flags.is_empty() {
        return Ok(Made {
            netns: None,
            net_handle: None,
        });
    }
    unshare(flags).map_err(step("creating namespaces"))?;
    if want.uts {
        nix::unistd::sethostname(hostname)
            .map_err(step(format!("setting hostname {hostname:?}")))?;
    }
    for (key, value) in sysctls {
        let invalid = |source: std::io::Error| NsError {
            step: format!("setting sysctl {key}={value}"),
            invalid: matches!(
                source.raw_os_error(),
                Some(libc::EINVAL) | Some(libc::ENOENT) | Some(libc::ELOOP) | Some(libc::EXDEV)
            ),
            source,
        };
        // Checked when the pod was validated; checked again here, where it is written.
        let s = super::sysctl::parse(key)
            .map_err(|e| invalid(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        super::sysctl::write(&s.path, value).map_err(invalid)?;
    }
    for (kind, on) in [("net", want.net), ("ipc", want.ipc), ("uts", want.uts)] {
        if on {
            pin(
                &format!("/proc/thread-self/ns/{kind}"),
                &pin_path(dir, kind),
            )?;
        }
    }
    let (netns, net_handle) = if want.net {
        let f = File::open("/proc/thread-self/ns/net").map_err(|source| NsError {
            step: "opening the network namespace".into(),
            source,
            invalid: false,
        })?;
        // The socket's namespace is fixed when it is made: this one lives in the pod's.
        let _enter = rt.enter();
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NsError {
            step: "netlink socket in the pod's namespace".into(),
            source,
            invalid: false,
        })?;
        rt.spawn(conn);
        (Some(OwnedFd::from(f)), Some(handle))
    } else {
        (None, None)
    };
    Ok(Made { netns, net_handle })
}

/// Bind-mounts the namespace file `src` onto a new file `dst`.
pub fn pin(src: &str, dst: &Path) -> Result<(), NsError> {
    File::create(dst).map_err(|source| NsError {
        step: format!("creating pin {}", dst.display()),
        source,
        invalid: false,
    })?;
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(step(format!("pinning {src} at {}", dst.display())))
}

/// Unmounts and removes a pin; a missing one is fine.
pub fn unpin(p: &Path) {
    // MNT_DETACH: the namespace's teardown (slow for a network namespace) happens in the
    // kernel's own time, not the caller's.
    let _ = umount2(p, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(p);
}

/// Unpins every namespace of a pod.
pub fn unpin_all(dir: &Path) {
    for kind in ["net", "ipc", "uts", "pid"] {
        unpin(&pin_path(dir, kind));
    }
}
