//! Starting a process in a running container (ExecSync and streamed exec), done by berth rather than by
//! libcontainer's tenant builder, which drops the container's seccomp filter for exec'd
//! processes. Run in a helper: it joins the container init's cgroups and namespaces, forks the
//! process into its PID namespace, and that process takes the container's limits, identity,
//! capabilities, no_new_privs and seccomp filter from the container's OCI spec before it
//! execs. Its pid is the helper's answer; it becomes the monitor's child when the helper exits.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use libcontainer::syscall::syscall::SyscallType;
use nix::sched::CloneFlags;
use nix::unistd::ForkResult;
use oci_spec::runtime::Spec;

/// What to run, as the exec request has it.
pub(super) struct Command {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

impl Command {
    /// The command of an exec request.
    pub fn of(e: &super::proto::Exec) -> Command {
        Command {
            args: e.args.clone(),
            env: e.env.clone(),
            cwd: e.cwd.clone(),
            uid: e.uid,
            gid: e.gid,
            additional_gids: e.additional_gids.clone(),
        }
    }
}

/// Where the process's 0-2 come from.
pub(super) enum Stdio {
    /// These descriptors.
    Fds([RawFd; 3]),
    /// A new terminal of the container's own devpts (so `tty` and job control work inside
    /// it): its master is sent over the unix socket `to` with SCM_RIGHTS, and the process
    /// gets the other end as its controlling terminal.
    Terminal { to: RawFd },
}

/// The namespaces an exec'd process shares with the container's init, with their
/// /proc/PID/ns names.
const NAMESPACES: [(&str, CloneFlags); 8] = [
    ("user", CloneFlags::CLONE_NEWUSER),
    ("mnt", CloneFlags::CLONE_NEWNS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("time", CloneFlags::from_bits_retain(libc::CLONE_NEWTIME)),
];

/// The running container an exec enters.
#[derive(Clone)]
pub(super) struct Target {
    /// Its init's pid (the monitor's child: it cannot be reused while the container runs).
    pub init: i32,
    /// Its OCI bundle (config.json there).
    pub bundle: PathBuf,
}

/// Starts `cmd` in the container `t` with `stdio` as its 0, 1 and 2; its pid. Called in a
/// helper: it changes this process's namespaces.
pub(super) fn exec_in(t: &Target, cmd: &Command, stdio: Stdio) -> Result<i32, String> {
    let init = t.init;
    let spec_path = t.bundle.join("config.json");
    let spec = Spec::load(&spec_path).map_err(|e| format!("{}: {e}", spec_path.display()))?;
    // Nothing of the pod may trace this process while it is still the monitor's binary.
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("prctl: {e}"))?;
    join_cgroups(init)?;
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(init).ok_or("bad init pid")?,
        rustix::process::PidfdFlags::empty(),
    )
    .map_err(|e| format!("pidfd_open {init}: {e}"))?;
    let flags = namespaces_to_join(init)?;
    nix::sched::setns(&pidfd, flags)
        .map_err(|e| format!("joining the container's namespaces: {e}"))?;
    drop(pidfd);
    let (stdio, terminal) = match stdio {
        Stdio::Fds(fds) => (fds, None),
        Stdio::Terminal { to } => {
            let slave = open_terminal(to)?;
            ([slave.as_raw_fd(); 3], Some(slave))
        }
    };
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the helper is single-threaded, so the child's copy of its memory is consistent;
    // the child only makes system calls and exits or execs.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(err_r);
            // Until the descriptors are in place the pipe is at its own number; then at 3.
            let ready = only_stdio(stdio, err_w.as_raw_fd()).and_then(|()| {
                if terminal.is_some() {
                    take_terminal()
                } else {
                    Ok(())
                }
            });
            let (e, at) = match ready {
                Err(e) => (e, err_w.as_raw_fd()),
                Ok(()) => match setup(&spec, cmd) {
                    Ok(never) => match never {},
                    Err(e) => (e, 3),
                },
            };
            // SAFETY: `at` is the error pipe's write end, open in this process.
            let at = unsafe { std::os::fd::BorrowedFd::borrow_raw(at) };
            let _ = rustix::io::write(at, e.as_bytes());
            // SAFETY: _exit ends the child without running the helper's destructors.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(err_w);
            drop(terminal);
            let mut msg = String::new();
            let _ = std::fs::File::from(err_r).read_to_string(&mut msg);
            if msg.is_empty() {
                Ok(child.as_raw())
            } else {
                let _ = nix::sys::wait::waitpid(child, None);
                Err(msg)
            }
        }
    }
}

/// Joins every cgroup the container's init is in (the paths /proc/PID/cgroup gives, under
/// each hierarchy's mount), so the process is limited and accounted as the container.
fn join_cgroups(init: i32) -> Result<(), String> {
    let cgroups = crate::cgroup::Cgroups::detect();
    let text = std::fs::read_to_string(format!("/proc/{init}/cgroup"))
        .map_err(|e| format!("/proc/{init}/cgroup: {e}"))?;
    // A move costs the kernel an RCU grace period (milliseconds) even when it changes nothing,
    // so hierarchies where this process already is where the init is (the unmanaged ones, on
    // a hybrid host) are left alone.
    let mine = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let me = std::process::id().to_string();
    for line in text.lines() {
        if mine.lines().any(|m| m == line) {
            continue;
        }
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next().unwrap_or(""), parts.next());
        let Some(path) = path else { continue };
        let wanted: Vec<&str> = ctrls.split(',').filter(|c| !c.is_empty()).collect();
        let Some(h) = cgroups.hierarchies.iter().find(|h| {
            if wanted.is_empty() {
                h.v2
            } else {
                let mut have: Vec<&str> = h.controllers.iter().map(String::as_str).collect();
                let mut want = wanted.clone();
                have.sort_unstable();
                want.sort_unstable();
                have == want
            }
        }) else {
            continue;
        };
        let procs = h
            .mount
            .join(path.trim_start_matches('/'))
            .join("cgroup.procs");
        std::fs::write(&procs, &me).map_err(|e| format!("{}: {e}", procs.display()))?;
    }
    Ok(())
}

/// The namespaces of `init` this process is not already in.
fn namespaces_to_join(init: i32) -> Result<CloneFlags, String> {
    use std::os::unix::fs::MetadataExt;
    let mut flags = CloneFlags::empty();
    for (name, flag) in NAMESPACES {
        let theirs = PathBuf::from(format!("/proc/{init}/ns/{name}"));
        let Ok(theirs) = std::fs::metadata(&theirs) else {
            continue; // a kernel without this namespace type
        };
        let ours = std::fs::metadata(format!("/proc/self/ns/{name}"))
            .map_err(|e| format!("/proc/self/ns/{name}: {e}"))?;
        if (theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino()) {
            flags |= flag;
        }
    }
    Ok(flags)
}

/// Opens a new terminal in the container's devpts (this process is in its mount namespace, so
/// `/dev/ptmx` is the container's): the master goes over `to`, the slave is returned. The
/// path is the container's to shape: no magic link is followed (one could lead out through a
/// descriptor of this process), and what opens must be the ptmx device itself.
fn open_terminal(to: RawFd) -> Result<OwnedFd, String> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let master = rustix::fs::openat2(
        rustix::fs::CWD,
        "/dev/ptmx",
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
        ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| format!("opening the container's /dev/ptmx: {e}"))?;
    let st = rustix::fs::fstat(&master).map_err(|e| format!("/dev/ptmx: {e}"))?;
    let is_ptmx = st.st_mode & libc::S_IFMT == libc::S_IFCHR
        && rustix::fs::major(st.st_rdev) == 5
        && rustix::fs::minor(st.st_rdev) == 2;
    if !is_ptmx {
        return Err("the container's /dev/ptmx is not the pty multiplexer".into());
    }
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads the int it is given; TIOCGPTPEER makes a new descriptor.
    let slave = unsafe {
        if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) != 0 {
            return Err(format!(
                "unlocking the terminal: {}",
                std::io::Error::last_os_error()
            ));
        }
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(format!(
            "opening the terminal: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: TIOCGPTPEER just made this descriptor for this process.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    let fds = [master.as_raw_fd()];
    let msg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    nix::sys::socket::sendmsg::<()>(
        to,
        &[std::io::IoSlice::new(b"t")],
        &msg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(|e| format!("handing over the terminal: {e}"))?;
    Ok(slave)
}

/// In the forked child, whose 0-2 are a terminal's slave: a new session with it as the
/// controlling terminal.
fn take_terminal() -> Result<(), String> {
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    // SAFETY: TIOCSCTTY on descriptor 0 takes an int argument and touches no memory.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
        return Err(format!("TIOCSCTTY: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Puts `stdio` at 0-2 and closes every other descriptor but `err` (close-on-exec).
fn only_stdio(stdio: [RawFd; 3], err: RawFd) -> Result<(), String> {
    // Above every descriptor in use first, so no move overwrites one still to be moved.
    let high = |fd: RawFd| {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) only makes a new descriptor.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 1000) };
        if n < 0 {
            Err(format!("dup: {}", std::io::Error::last_os_error()))
        } else {
            Ok(n)
        }
    };
    let moved = [
        high(stdio[0])?,
        high(stdio[1])?,
        high(stdio[2])?,
        high(err)?,
    ];
    for (to, from) in moved.iter().enumerate() {
        let flags = if to == 3 { libc::O_CLOEXEC } else { 0 };
        // SAFETY: dup3 onto 0-3, which nothing in this process holds on to as owned.
        if unsafe { libc::dup3(*from, to as RawFd, flags) } < 0 {
            return Err(format!("dup3: {}", std::io::Error::last_os_error()));
        }
    }
    // SAFETY: close_range only closes descriptors; none above 3 is used after this.
    unsafe { libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) };
    Ok(())
}

/// In the forked child, inside the container's namespaces: limits, working directory,
/// identity, capabilities and seccomp, then exec; in the order runc and libcontainer use (a
/// filter loaded without no_new_privs needs CAP_SYS_ADMIN, so before the capabilities are
/// dropped). Returns only on failure, saying why.
fn setup(spec: &Spec, cmd: &Command) -> Result<std::convert::Infallible, String> {
    let syscall = SyscallType::Linux.create_syscall();
    let process = spec.process().as_ref().ok_or("the spec has no process")?;
    for r in process.rlimits().iter().flatten() {
        let lim = libc::rlimit {
            rlim_cur: r.soft(),
            rlim_max: r.hard(),
        };
        let res = rlimit_resource(r.typ());
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
        }
    }
    if let Some(adj) = process.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| format!("oom_score_adj: {e}"))?;
    }
    let cwd = if cmd.cwd.is_empty() { "/" } else { &cmd.cwd };
    nix::unistd::chdir(cwd).map_err(|e| format!("chdir {cwd}: {e}"))?;
    let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
    let nnp = process.no_new_privileges() == Some(true);
    if let Some(s) = seccomp.as_ref().filter(|_| !nnp) {
        load_seccomp(s)?;
    }
    set_identity(cmd)?;
    libcontainer::capabilities::reset_effective(syscall.as_ref())
        .map_err(|e| format!("capabilities: {e}"))?;
    if let Some(caps) = process.capabilities() {
        libcontainer::capabilities::drop_privileges(caps, syscall.as_ref())
            .map_err(|e| format!("capabilities: {e}"))?;
    }
    if nnp {
        rustix::thread::set_no_new_privs(true).map_err(|e| format!("no_new_privs: {e}"))?;
        if let Some(s) = &seccomp {
            load_seccomp(s)?;
        }
    }
    execute(cmd)
}

/// Groups, gid and uid of the request, keeping the capabilities (dropped to the container's
/// next) across the change from root.
fn set_identity(cmd: &Command) -> Result<(), String> {
    let last = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: these calls read only the arguments given (setgroups the slice, of its length);
    // this process is single-threaded, so changing its ids with raw calls is whole.
    unsafe {
        if libc::setgroups(cmd.additional_gids.len(), cmd.additional_gids.as_ptr()) != 0 {
            return Err(last("setgroups"));
        }
        if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return Err(last("PR_SET_KEEPCAPS"));
        }
        if libc::setresgid(cmd.gid, cmd.gid, cmd.gid) != 0 {
            return Err(last("setresgid"));
        }
        if libc::setresuid(cmd.uid, cmd.uid, cmd.uid) != 0 {
            return Err(last("setresuid"));
        }
        if libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) != 0 {
            return Err(last("PR_SET_KEEPCAPS"));
        }
    }
    // The kernel reads (uid_t)-1 as "leave unchanged": berth never asks for it, but an exec
    // must never run with ids other than the ones asked for, whatever the call did.
    let (uids, gids) = (
        nix::unistd::getresuid().map_err(|e| format!("getresuid: {e}"))?,
        nix::unistd::getresgid().map_err(|e| format!("getresgid: {e}"))?,
    );
    let ok = [uids.real, uids.effective, uids.saved]
        .iter()
        .all(|u| u.as_raw() == cmd.uid)
        && [gids.real, gids.effective, gids.saved]
            .iter()
            .all(|g| g.as_raw() == cmd.gid);
    if !ok {
        return Err(format!(
            "the ids did not change to {}:{} (refused to run as another user)",
            cmd.uid, cmd.gid
        ));
    }
    Ok(())
}

/// Loads the container's filter; a profile that hands the filter to a listener is refused
/// (berth runs none).
fn load_seccomp(s: &oci_spec::runtime::LinuxSeccomp) -> Result<(), String> {
    match libcontainer::seccomp::initialize_seccomp(s) {
        Ok(None) => Ok(()),
        Ok(Some(fd)) => {
            // SAFETY: initialize_seccomp hands over the listener descriptor it made.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            Err("seccomp notify profiles are not supported".into())
        }
        Err(e) => Err(format!("loading the container's seccomp filter: {e}")),
    }
}

/// execve of the command, looked up in the request's PATH when it names no directory.
fn execute(cmd: &Command) -> Result<std::convert::Infallible, String> {
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("{s:?} holds a NUL byte"));
    let argv: Vec<CString> = cmd.args.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let envp: Vec<CString> = cmd.env.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let name = cmd.args.first().ok_or("exec needs a command")?;
    let candidates: Vec<String> = if name.contains('/') {
        vec![name.clone()]
    } else {
        let path = cmd
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        path.split(':')
            .map(|d| format!("{}/{name}", if d.is_empty() { "." } else { d }))
            .collect()
    };
    // The monitor blocks SIGCHLD and SIGPIPE for its signalfd; a mask survives exec.
    let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
    let mut last = nix::errno::Errno::ENOENT;
    for c in candidates {
        let file = cstr(&c)?;
        match nix::unistd::execve(&file, &argv, &envp) {
            Err(e @ (nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR)) => {
                if last == nix::errno::Errno::ENOENT {
                    last = e;
                }
            }
            Err(e) => last = e,
            Ok(never) => match never {},
        }
    }
    if last == nix::errno::Errno::ENOENT || last == nix::errno::Errno::ENOTDIR {
        Err(format!(
            "{name}: executable file not found in $PATH (No such file or directory)"
        ))
    } else {
        Err(format!("{name}: {last}"))
    }
}

/// The setrlimit resource of an OCI rlimit type.
fn rlimit_resource(t: oci_spec::runtime::PosixRlimitType) -> libc::__rlimit_resource_t {
    use oci_spec::runtime::PosixRlimitType as T;
    (match t {
        T::RlimitCpu => libc::RLIMIT_CPU,
        T::RlimitFsize => libc::RLIMIT_FSIZE,
        T::RlimitData => libc::RLIMIT_DATA,
        T::RlimitStack => libc::RLIMIT_STACK,
        T::RlimitCore => libc::RLIMIT_CORE,
        T::RlimitRss => libc::RLIMIT_RSS,
        T::RlimitNproc => libc::RLIMIT_NPROC,
        T::RlimitNofile => libc::RLIMIT_NOFILE,
        T::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        T::RlimitAs => libc::RLIMIT_AS,
        T::RlimitLocks => libc::RLIMIT_LOCKS,
        T::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        T::RlimitNice => libc::RLIMIT_NICE,
        T::RlimitRtprio => libc::RLIMIT_RTPRIO,
        T::RlimitRttime => libc::RLIMIT_RTTIME,
    }) as libc::__rlimit_resource_t
}
