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
    /// A user namespace with these mappings, owning the others.
    pub user: Option<super::UserNs>,
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
    crate::layout::traversable_dir(dir)?;
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
    let owner = match want.user {
        // The namespaces are made by a child inside the new user namespace (so that it owns
        // them); this thread joins them, which a thread of a threaded process may do for
        // every kind but the user namespace, and goes on as if it had made them.
        Some(u) => {
            let child = UsernsChild::make(u, flags)?;
            for (kind, flag) in [
                ("net", CloneFlags::CLONE_NEWNET),
                ("ipc", CloneFlags::CLONE_NEWIPC),
                ("uts", CloneFlags::CLONE_NEWUTS),
            ] {
                if flags.contains(flag) {
                    let f = File::open(child.ns(kind)).map_err(|source| NsError {
                        step: format!("opening the pod's {kind} namespace"),
                        source,
                        invalid: false,
                    })?;
                    nix::sched::setns(&f, flag)
                        .map_err(step(format!("joining the pod's {kind} namespace")))?;
                }
            }
            pin(&child.ns("user"), &pin_path(dir, "user"))?;
            Some(child)
        }
        None => {
            unshare(flags).map_err(step("creating namespaces"))?;
            None
        }
    };
    drop(owner);
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
    for kind in ["net", "ipc", "uts", "pid", "user"] {
        unpin(&pin_path(dir, kind));
    }
}

/// A forked child that makes a user namespace, waits for berthd to write its mappings, then
/// makes the pod's other namespaces inside it; it exits when dropped. It runs only raw system
/// calls between fork and exit, as a child of a threaded process must.
struct UsernsChild {
    pid: libc::pid_t,
    /// Closing it tells the child to exit.
    go: Option<OwnedFd>,
}

impl UsernsChild {
    fn make(u: super::UserNs, flags: CloneFlags) -> Result<UsernsChild, NsError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source: std::io::Error| NsError {
                step: what,
                source,
                invalid: false,
            }
        };
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(step("making the user namespace's pipes"))?;
        let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(step("making the user namespace's pipes"))?;
        let bits = flags.bits();
        // SAFETY: the child only makes raw system calls on descriptors and values prepared
        // before the fork (no allocation, no lock), then _exits: sound in a threaded parent.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io("forking the user namespace's maker")(
                std::io::Error::last_os_error(),
            ));
        }
        if pid == 0 {
            use std::os::fd::AsRawFd;
            let (r, w) = (go_r.as_raw_fd(), ready_w.as_raw_fd());
            let (lo, hi) = (r.min(w) as u32, r.max(w) as u32);
            let mut b = [0u8; 1];
            // SAFETY: raw calls on open descriptors and a stack buffer; see above.
            unsafe {
                // Only its two pipe ends: berthd's copies of the other ends must be the only
                // ones, so that closing `go` ends it.
                for (first, last) in [
                    (3, lo.wrapping_sub(1)),
                    (lo + 1, hi - 1),
                    (hi + 1, u32::MAX),
                ] {
                    if first <= last {
                        libc::syscall(libc::SYS_close_range, first, last, 0u32);
                    }
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                    libc::_exit(1);
                }
                libc::write(w, b"u".as_ptr().cast(), 1);
                if libc::read(r, b.as_mut_ptr().cast(), 1) != 1 {
                    libc::_exit(2);
                }
                if libc::unshare(bits) != 0 {
                    libc::_exit(3);
                }
                libc::write(w, b"n".as_ptr().cast(), 1);
                // Until berthd closes its end.
                libc::read(r, b.as_mut_ptr().cast(), 1);
                libc::_exit(0);
            }
        }
        drop((go_r, ready_w));
        let child = UsernsChild {
            pid,
            go: Some(go_w),
        };
        let mut ready = File::from(ready_r);
        let wait_for = |ready: &mut File, what: &str| -> Result<(), NsError> {
            use std::io::Read;
            let mut b = [0u8; 1];
            match ready.read(&mut b) {
                Ok(1) => Ok(()),
                Ok(_) => Err(io(what)(std::io::Error::other("the child exited"))),
                Err(e) => Err(io(what)(e)),
            }
        };
        wait_for(&mut ready, "creating the pod's user namespace")?;
        for (file, r) in [("uid_map", u.uids), ("gid_map", u.gids)] {
            let path = format!("/proc/{pid}/{file}");
            std::fs::write(&path, format!("{} {} {}\n", r.container, r.host, r.len))
                .map_err(io(&format!("writing {path}")))?;
        }
        {
            use std::io::Write;
            let go = child.go.as_ref().expect("go is open");
            File::from(go.try_clone().map_err(io("go pipe"))?)
                .write_all(b"g")
                .map_err(io("telling the user namespace's maker to go on"))?;
        }
        wait_for(
            &mut ready,
            "creating the pod's namespaces in its user namespace",
        )?;
        Ok(child)
    }

    /// `/proc/<child>/ns/<kind>`.
    fn ns(&self, kind: &str) -> String {
        format!("/proc/{}/ns/{kind}", self.pid)
    }
}

impl Drop for UsernsChild {
    fn drop(&mut self) {
        drop(self.go.take());
        // SAFETY: waits for our own child; a null status pointer is allowed.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
    }
}
