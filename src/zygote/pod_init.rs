//! The pod init: PID 1 of a pod's shared PID namespace, forked by the zygote. Every container
//! of the pod sees it as its PID 1, and one allowed to trace it (CAP_SYS_PTRACE, or the same
//! credentials) reaches whatever it holds through `/proc/1/{root,cwd,fd,environ,exe,mem}`. So
//! before it reports for duty it lets go of everything of the node: it joins the pod's
//! namespaces, takes an empty read-only root of its own (the node's detached), closes every
//! file, becomes uid/gid 65535 with no capability in any set and no_new_privs, and installs a
//! seccomp filter allowing only the few calls its loop makes. Its binary is berthd's on a
//! read-only mount (see `super::sealed_binary`); its environment is empty.
//!
//! Its life: the kernel reaps the orphans reparented to it (SIGCHLD ignored); it waits up to
//! 60 s for berthd's SIGUSR1, sent once the pod is recorded, so a berthd crash in between never
//! orphans it; then it waits forever. Signals from inside the pod change nothing: only SIGKILL
//! from outside (berthd at StopPodSandbox) ends it, taking the namespace's processes along.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::SigSet;

/// What the init reports on its status pipe once confined.
pub const CONFINED: &[u8] = b"confined";
/// The uid and gid it runs as (those of the pause image's user).
pub const INIT_ID: u32 = 65535;
/// How long an unconfirmed init waits for berthd.
const CONFIRM_WITHIN_S: libc::time_t = 60;
/// The size of the kernel's sigset_t, which rt_sigtimedwait(2) wants.
const KERNEL_SIGSET: usize = 8;

/// The signals the init waits for (all of them); the zygote blocks them before forking it, so
/// none can act before the init masks them itself.
pub fn waited_signals() -> SigSet {
    SigSet::all()
}

/// The init's life, in the zygote's forked child (PID 1 of a new PID namespace). `status` is
/// the pipe the zygote waits on: the init writes `CONFINED`, or why it failed and exits.
pub fn run(
    pod_id: &str,
    pins: &[(String, PathBuf)],
    template: Option<&OwnedFd>,
    status: OwnedFd,
) -> ! {
    crate::proctitle::set(c"berth-init", &format!("berth-init {pod_id}"));
    let entered = enter(pins, template);
    serve_confined(entered, status, INIT_ID)
}

/// An init for a pod with a user namespace of its own (`user`, its pin): its PID namespace
/// must belong to that user namespace, or the pod's containers could not mount their /proc.
/// A user namespace can only be joined by a process that has no PID namespace to make yet,
/// so this child of the zygote makes the root and joins the namespaces (the mounts while it
/// still has the node's privileges, then the user namespace), makes the PID namespace, and
/// forks the init into it as the zygote's child (CLONE_PARENT). It writes the init's pid on
/// `pid_out` and exits; the init runs as `id` (mapped in the user namespace).
pub fn run_in_user_namespace(
    pod_id: &str,
    pins: &[(String, PathBuf)],
    user: &std::path::Path,
    id: u32,
    template: Option<&OwnedFd>,
    status: OwnedFd,
    pid_out: OwnedFd,
) -> ! {
    // Titled while /proc is still there to find the argument area; the init inherits it.
    crate::proctitle::set(c"berth-init", &format!("berth-init {pod_id}"));
    // Ok(None) in the init, Ok(Some(pid)) in this process.
    let made = (|| -> Result<Option<i32>, String> {
        let open = |p: &std::path::Path| {
            std::fs::File::open(p)
                .map_err(|e| format!("opening namespace pin {}: {e}", p.display()))
        };
        // Opened before the root is emptied: the pins are not reachable after.
        let user_ns = open(user)?;
        let others = pins
            .iter()
            .map(|(kind, p)| Ok((ns_flag(kind)?, open(p)?)))
            .collect::<Result<Vec<_>, String>>()?;
        empty_root(template)?;
        nix::sched::setns(user_ns.as_fd(), CloneFlags::CLONE_NEWUSER)
            .map_err(|e| format!("joining the pod's user namespace: {e}"))?;
        for (flag, f) in &others {
            nix::sched::setns(f.as_fd(), *flag)
                .map_err(|e| format!("joining the pod's namespace ({flag:?}): {e}"))?;
        }
        drop((user_ns, others));
        nix::sched::unshare(CloneFlags::CLONE_NEWPID)
            .map_err(|e| format!("unshare(NEWPID) in the user namespace: {e}"))?;
        let pid = fork_with(libc::CLONE_PARENT);
        match pid {
            -1 => Err(format!(
                "forking the init: {}",
                std::io::Error::last_os_error()
            )),
            0 => Ok(None),
            pid => Ok(Some(pid as i32)),
        }
    })();
    match made {
        Ok(None) => {
            // `pid_out` closes with every other file as the init lets go.
            serve_confined(Ok(()), status, id)
        }
        Ok(Some(pid)) => report(&pid_out, pid.to_string().as_bytes()),
        Err(e) => report(&status, e.as_bytes()),
    }
    exit(0)
}

/// fork(2) with clone flags (CLONE_NEWPID, CLONE_PARENT): the child's pid, 0 in the child,
/// -1 on failure. Only for the zygote and its single-threaded children.
pub fn fork_with(flags: libc::c_int) -> libc::c_long {
    // SAFETY: raw clone(2) without CLONE_VM is fork with flags; the caller has one thread, so
    // the child's copy of its memory is consistent.
    unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    }
}

/// Finishes confining an init that has `entered` its namespaces and root, reports, and serves.
fn serve_confined(entered: Result<(), String>, status: OwnedFd, id: u32) -> ! {
    match entered.and_then(|()| let_go(&status, id)) {
        Ok(()) => {
            report(&status, CONFINED);
            // close(2) itself: std's drop of an OwnedFd also calls fcntl in debug builds,
            // which the filter does not allow.
            // SAFETY: the descriptor is ours and is not used again.
            unsafe {
                libc::close(std::os::fd::IntoRawFd::into_raw_fd(status));
            }
        }
        Err(e) => {
            report(&status, e.as_bytes());
            exit(1);
        }
    }
    serve()
}

/// Letting go of the node, in the order each step needs: the namespaces and the new root
/// need capabilities (`enter`), closing files comes before dropping them, the filter last
/// (`let_go`).
fn enter(pins: &[(String, PathBuf)], template: Option<&OwnedFd>) -> Result<(), String> {
    join_namespaces(pins)?;
    empty_root(template)
}

fn let_go(status: &OwnedFd, id: u32) -> Result<(), String> {
    let _ = waited_signals().thread_block();
    // SAFETY: SIG_IGN installs no handler code; this process has one thread.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
    }
    close_files_but(status.as_raw_fd())?;
    drop_privileges(id)?;
    install_filter()
}

/// The flag of a namespace kind an init joins.
fn ns_flag(kind: &str) -> Result<CloneFlags, String> {
    match kind {
        "net" => Ok(CloneFlags::CLONE_NEWNET),
        "ipc" => Ok(CloneFlags::CLONE_NEWIPC),
        "uts" => Ok(CloneFlags::CLONE_NEWUTS),
        other => Err(format!("unknown namespace kind {other:?}")),
    }
}

fn join_namespaces(pins: &[(String, PathBuf)]) -> Result<(), String> {
    for (kind, path) in pins {
        let flag = ns_flag(kind)?;
        let f = std::fs::File::open(path)
            .map_err(|e| format!("opening namespace pin {}: {e}", path.display()))?;
        nix::sched::setns(f.as_fd(), flag)
            .map_err(|e| format!("joining namespace {}: {e}", path.display()))?;
    }
    Ok(())
}

/// A mount namespace holding nothing but an empty read-only tmpfs, made once by the zygote.
/// Each pod init copies it (one mount) instead of the node's whole mount tree, which costs
/// milliseconds on a node with many pods. It is a copy base only: every init then mounts a
/// tmpfs of its own, so no two pods share a filesystem.
pub fn template_namespace() -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
        sendmsg, socketpair,
    };
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // SAFETY: the zygote is single-threaded: the child's copy of its memory is consistent.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            drop(ours);
            let made = (|| -> Result<OwnedFd, String> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNS)
                    .map_err(|e| format!("unshare(NEWNS): {e}"))?;
                make_private()?;
                let ns = std::fs::File::open("/proc/self/ns/mnt")
                    .map_err(|e| format!("opening the new mount namespace: {e}"))?;
                pivot_into_empty_tmpfs()?;
                Ok(OwnedFd::from(ns))
            })();
            if let Ok(ns) = made {
                let fds = [ns.as_raw_fd()];
                let _ = sendmsg::<()>(
                    theirs.as_raw_fd(),
                    &[std::io::IoSlice::new(b"ns")],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                );
            }
            // SAFETY: _exit ends the child without running the zygote's destructors.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop(theirs);
            let mut buf = [0u8; 8];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!(std::os::fd::RawFd);
            let msg = recvmsg::<()>(
                ours.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(fds) = c
                    && let Some(fd) = fds.first()
                {
                    // SAFETY: the kernel just installed this descriptor for us; nobody else
                    // owns it.
                    return Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(*fd) });
                }
            }
            Err(std::io::Error::other("the template namespace was not made"))
        }
    }
}

/// Nothing done in this mount namespace may propagate back to the node's mounts.
fn make_private() -> Result<(), String> {
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making the mount tree private: {e}"))
}

/// A mount namespace of its own whose root is an empty read-only tmpfs (one inode, 4 KiB),
/// with the node's tree (or the template's tmpfs) detached: `/proc/1/root` and `/proc/1/cwd`
/// show nothing. From the zygote's template when there is one (a one-mount copy), else from
/// the node's namespace.
fn empty_root(template: Option<&OwnedFd>) -> Result<(), String> {
    if let Some(t) = template {
        nix::sched::setns(t.as_fd(), CloneFlags::CLONE_NEWNS)
            .map_err(|e| format!("entering the template mount namespace: {e}"))?;
    }
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(NEWNS): {e}"))?;
    if template.is_none() {
        make_private()?;
    }
    pivot_into_empty_tmpfs()
}

/// Stacks a fresh empty read-only tmpfs on `/`, makes it the root and detaches what was there.
fn pivot_into_empty_tmpfs() -> Result<(), String> {
    use rustix::mount::{
        FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, fsconfig_create,
        fsconfig_set_string, fsmount, fsopen, move_mount,
    };
    let step = |what: &'static str| move |e: rustix::io::Errno| format!("{what}: {e}");
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(step("fsopen(tmpfs)"))?;
    for (k, v) in [("size", "4k"), ("nr_inodes", "1"), ("mode", "0555")] {
        fsconfig_set_string(&fs, k, v).map_err(step("configuring the empty root"))?;
    }
    fsconfig_create(&fs).map_err(step("creating the empty root"))?;
    let mnt = fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_RDONLY
            | MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOEXEC,
    )
    .map_err(step("fsmount"))?;
    // Stacked on "/", entered, and made the root; the old root (now on top of it) detached.
    move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        "/",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(step("attaching the empty root"))?;
    rustix::process::fchdir(&mnt).map_err(step("entering the empty root"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    nix::mount::umount2(".", MntFlags::MNT_DETACH)
        .map_err(|e| format!("detaching the old root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// Closes every file descriptor but `keep`.
fn close_files_but(keep: i32) -> Result<(), String> {
    let close_range = |first: u32, last: u32| {
        // SAFETY: close_range(2) only closes descriptors; none of them is used afterwards
        // (this process keeps no Rust object over any of them but `keep`).
        let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        if r != 0 {
            return Err(format!("close_range: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    };
    let keep = keep as u32;
    if keep > 0 {
        close_range(0, keep - 1)?;
    }
    close_range(keep + 1, u32::MAX)
}

/// No supplementary groups, uid/gid `id` (65535 but in a user namespace that maps fewer),
/// every capability set empty (bounding and ambient included), no_new_privs.
fn drop_privileges(id: u32) -> Result<(), String> {
    use nix::unistd::{Gid, Uid};
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    // The bounding set needs CAP_SETPCAP to shrink: before the uid changes.
    for cap in 0..64 {
        // SAFETY: prctl(PR_CAPBSET_DROP) takes an integer and touches no memory of ours;
        // numbers past the kernel's last capability fail with EINVAL, which is fine.
        unsafe {
            libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
        }
    }
    // SAFETY: as above, integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    let (gid, uid) = (Gid::from_raw(id), Uid::from_raw(id));
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
    // Leaving uid 0 clears the permitted and effective sets.
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
    let none = rustix::thread::CapabilitySet::empty();
    rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets {
            effective: none,
            permitted: none,
            inheritable: none,
        },
    )
    .map_err(|e| format!("capset: {e}"))?;
    rustix::thread::set_no_new_privs(true).map_err(|e| format!("no_new_privs: {e}"))?;
    // The root is empty now, so /proc/self/status cannot be read back: capget is the check.
    let sets = rustix::thread::capabilities(None).map_err(|e| format!("capget: {e}"))?;
    if !(sets.effective.is_empty() && sets.permitted.is_empty() && sets.inheritable.is_empty()) {
        return Err("capabilities remain after dropping them".into());
    }
    Ok(())
}

/// A seccomp filter allowing what `serve` and the status report do; anything else kills.
fn install_filter() -> Result<(), String> {
    use libseccomp::{ScmpAction, ScmpFilterContext, ScmpSyscall};
    let err = |e: libseccomp::error::SeccompError| format!("seccomp: {e}");
    let mut f = ScmpFilterContext::new(ScmpAction::KillProcess).map_err(err)?;
    for name in [
        "rt_sigtimedwait",
        "restart_syscall",
        "write",
        "close",
        "exit",
        "exit_group",
    ] {
        let sc = ScmpSyscall::from_name(name).map_err(err)?;
        f.add_rule(ScmpAction::Allow, sc).map_err(err)?;
    }
    f.load().map_err(err)
}

/// Waits for signals and ignores them, but for berthd's confirmation (SIGUSR1 from outside
/// the pod, so with no sender pid in this namespace). Only SIGKILL from outside ends it.
fn serve() -> ! {
    let set = waited_signals();
    let mut confirmed = false;
    let timeout = libc::timespec {
        tv_sec: CONFIRM_WITHIN_S,
        tv_nsec: 0,
    };
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value for the kernel to overwrite.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let wait: *const libc::timespec = if confirmed {
            std::ptr::null()
        } else {
            &timeout
        };
        // SAFETY: the set, the siginfo and the timespec are valid for the call; the kernel
        // reads KERNEL_SIGSET bytes of the set.
        let sig = unsafe {
            libc::syscall(
                libc::SYS_rt_sigtimedwait,
                set.as_ref() as *const libc::sigset_t,
                &mut info as *mut libc::siginfo_t,
                wait,
                KERNEL_SIGSET,
            )
        };
        if sig < 0 {
            if !confirmed && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
                // berthd never confirmed: it died before recording the pod.
                exit(1);
            }
            continue;
        }
        // SAFETY: the kernel filled `info` for the signal it returned.
        let from_outside = unsafe { info.si_pid() } == 0;
        if sig as i32 == libc::SIGUSR1 && from_outside {
            confirmed = true;
        }
    }
}

/// Writes `msg` to the zygote's status pipe, ignoring failures: the init reports once.
fn report(fd: &OwnedFd, msg: &[u8]) {
    let _ = rustix::io::write(fd, msg);
}

/// exit_group(2) directly: nothing to flush, and no call the filter does not allow.
fn exit(code: i32) -> ! {
    // SAFETY: exit_group ends the process; it never returns.
    unsafe {
        libc::syscall(libc::SYS_exit_group, code);
    }
    unreachable!("exit_group returned")
}
