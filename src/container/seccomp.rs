//! berth's RuntimeDefault seccomp profile, as an OCI `linux.seccomp` section. An allow list:
//! every syscall ordinary workloads make is allowed, the ones that reach past the container's
//! namespaces (kernel modules, keyrings, new namespaces, mounts, clocks, kexec…) are allowed only
//! when the container holds the capability that makes them meaningful, and anything the list
//! does not name fails with ENOSYS, so programs probing a newer syscall fall back as they would
//! on an older kernel. Written from the x86_64 and arm64 syscall tables.

use serde_json::{Value, json};

/// Allowed for every container: files, memory, signals, processes, sockets, time reading.
#[rustfmt::skip]
const ALLOWED: &[&str] = &[
    // Files and directories.
    "access", "chdir", "chmod", "chown", "close", "close_range", "copy_file_range", "creat",
    "dup", "dup2", "dup3", "faccessat", "faccessat2", "fadvise64", "fallocate", "fchdir",
    "fchmod", "fchmodat", "fchmodat2", "fchown", "fchownat", "fcntl", "fdatasync", "fgetxattr",
    "flistxattr", "flock", "fremovexattr", "fsetxattr", "fstat", "fstatfs", "fsync", "ftruncate",
    "futimesat", "getcwd", "getdents", "getdents64", "getxattr", "lchown", "lgetxattr", "link",
    "linkat", "listxattr", "llistxattr", "lremovexattr", "lseek", "lsetxattr", "lstat", "mkdir",
    "mkdirat", "mknod", "mknodat", "newfstatat", "open", "openat", "openat2", "pread64", "preadv",
    "preadv2", "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink", "readlinkat",
    "readv", "removexattr", "rename", "renameat", "renameat2", "rmdir", "sendfile", "setxattr",
    "splice", "stat", "statfs", "statx", "symlink", "symlinkat", "sync", "sync_file_range",
    "syncfs", "tee", "truncate", "umask", "unlink", "unlinkat", "utime", "utimensat", "utimes",
    "vmsplice", "write", "writev",
    // Polling, events, notifications, asynchronous I/O.
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_pwait", "epoll_pwait2", "epoll_wait",
    "eventfd", "eventfd2", "inotify_add_watch", "inotify_init", "inotify_init1",
    "inotify_rm_watch", "io_cancel", "io_destroy", "io_getevents", "io_pgetevents", "io_setup",
    "io_submit", "ioctl", "pause", "pipe", "pipe2", "poll", "ppoll", "pselect6", "select",
    "signalfd", "signalfd4", "timerfd_create", "timerfd_gettime", "timerfd_settime",
    "fanotify_mark",
    // Memory.
    "brk", "madvise", "membarrier", "memfd_create", "memfd_secret", "mincore", "mlock", "mlock2",
    "mlockall", "mmap", "mprotect", "mremap", "msync", "munlock", "munlockall", "munmap",
    "pkey_alloc", "pkey_free", "pkey_mprotect", "process_madvise", "process_mrelease",
    "remap_file_pages", "map_shadow_stack", "cachestat",
    // Processes, threads, scheduling.
    "arch_prctl", "capget", "capset", "execve", "execveat", "exit", "exit_group", "fork", "futex",
    "futex_waitv", "futex_wake", "futex_wait", "futex_requeue", "get_robust_list",
    "get_thread_area", "getcpu", "getpgid", "getpgrp", "getpid", "getppid", "getpriority",
    "getrusage", "getsid", "gettid", "ioprio_get", "ioprio_set", "kill", "pidfd_getfd",
    "pidfd_open", "pidfd_send_signal", "prctl", "prlimit64", "getrlimit", "setrlimit",
    "restart_syscall", "rseq", "sched_get_priority_max", "sched_get_priority_min",
    "sched_getaffinity", "sched_getattr", "sched_getparam", "sched_getscheduler",
    "sched_rr_get_interval", "sched_setaffinity", "sched_setattr", "sched_setparam",
    "sched_setscheduler", "sched_yield", "seccomp", "set_robust_list", "set_thread_area",
    "set_tid_address", "setpgid", "setpriority", "setsid", "tgkill", "tkill", "vfork", "wait4",
    "waitid", "ptrace", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    // Identity.
    "getegid", "geteuid", "getgid", "getgroups", "getresgid", "getresuid", "getuid", "setfsgid",
    "setfsuid", "setgid", "setgroups", "setregid", "setresgid", "setresuid", "setreuid", "setuid",
    // Signals.
    "rt_sigaction", "rt_sigpending", "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn",
    "rt_sigsuspend", "rt_sigtimedwait", "rt_tgsigqueueinfo", "sigaltstack",
    // Time (reading it; setting it needs SYS_TIME below).
    "alarm", "clock_getres", "clock_gettime", "clock_nanosleep", "getitimer", "gettimeofday",
    "nanosleep", "setitimer", "time", "timer_create", "timer_delete", "timer_getoverrun",
    "timer_gettime", "timer_settime", "times", "adjtimex", "clock_adjtime",
    // Sockets.
    "accept", "accept4", "bind", "connect", "getpeername", "getsockname", "getsockopt", "listen",
    "recvfrom", "recvmmsg", "recvmsg", "sendmmsg", "sendmsg", "sendto", "setsockopt", "shutdown",
    "socket", "socketpair",
    // System V and POSIX IPC (the pod's IPC namespace).
    "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive", "mq_timedsend", "mq_unlink",
    "msgctl", "msgget", "msgrcv", "msgsnd", "semctl", "semget", "semop", "semtimedop", "shmat",
    "shmctl", "shmdt", "shmget",
    // System information.
    "getrandom", "sysinfo", "uname",
    // 32-bit (x86, arm) names of the above.
    "_llseek", "_newselect", "chown32", "fchown32", "lchown32", "fcntl64", "fstat64", "fstatat64",
    "fstatfs64", "ftruncate64", "truncate64", "getegid32", "geteuid32", "getgid32", "getgroups32",
    "getresgid32", "getresuid32", "getuid32", "setfsgid32", "setfsuid32", "setgid32",
    "setgroups32", "setregid32", "setresgid32", "setresuid32", "setreuid32", "setuid32", "ipc",
    "lstat64", "stat64", "statfs64", "mmap2", "recv", "send", "sendfile64", "sigaction", "signal",
    "sigpending", "sigprocmask", "sigreturn", "sigsuspend", "socketcall", "ugetrlimit", "waitpid",
    "arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint", "cacheflush",
    "set_tls", "fadvise64_64", "clock_gettime64", "clock_getres_time64", "clock_nanosleep_time64",
    "futex_time64", "io_pgetevents_time64", "mq_timedreceive_time64", "mq_timedsend_time64",
    "ppoll_time64", "pselect6_time64", "recvmmsg_time64", "rt_sigtimedwait_time64",
    "sched_rr_get_interval_time64", "semtimedop_time64", "timer_gettime64", "timer_settime64",
    "timerfd_gettime64", "timerfd_settime64", "utimensat_time64",
];

/// Allowed only with a capability: without it they fail with EPERM. The kernel checks most of
/// these capabilities itself; the filter keeps the code behind them out of reach too.
#[rustfmt::skip]
const GATED: &[(&str, &[&str])] = &[
    (
        "CAP_SYS_ADMIN",
        &[
            "mount", "umount", "umount2", "pivot_root", "unshare", "setns", "sethostname",
            "setdomainname", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
            "mount_setattr", "quotactl", "quotactl_fd", "swapon", "swapoff", "fanotify_init",
            "lookup_dcookie", "bpf", "perf_event_open", "name_to_handle_at",
        ],
    ),
    ("CAP_SYS_CHROOT", &["chroot"]),
    (
        "CAP_SYS_PTRACE",
        &["kcmp", "process_vm_readv", "process_vm_writev"],
    ),
    (
        "CAP_SYS_MODULE",
        &["init_module", "finit_module", "delete_module"],
    ),
    ("CAP_SYS_BOOT", &["reboot", "kexec_load", "kexec_file_load"]),
    (
        "CAP_SYS_TIME",
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    (
        "CAP_SYS_NICE",
        &[
            "mbind", "set_mempolicy", "get_mempolicy", "migrate_pages", "move_pages",
            "set_mempolicy_home_node",
        ],
    ),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_SYS_PACCT", &["acct"]),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
];

/// Never allowed: kernel-global state no container owns (keyrings are not namespaced),
/// removed or unused interfaces, and attack surface with a history (userfaultfd, io_uring).
#[rustfmt::skip]
const DENIED: &[&str] = &[
    "add_key", "request_key", "keyctl", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "modify_ldt", "vm86", "vm86old", "uselib", "ustat", "sysfs", "_sysctl",
    "nfsservctl", "create_module", "get_kernel_syms", "query_module", "pciconfig_read",
    "pciconfig_write", "pciconfig_iobase",
];

/// The namespace flags of clone(2) (CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID,
/// NEWNET); a container without CAP_SYS_ADMIN may clone only without them.
const CLONE_NS_FLAGS: [u64; 7] = [
    0x0002_0000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
];

/// personality(2) values that only change how the process sees itself (PER_LINUX, its 32-bit
/// form, UNAME26 and the query 0xffffffff).
const PERSONALITIES: &[u64] = &[0x0, 0x0008, 0x0002_0000, 0x0002_0008, 0xffff_ffff];

/// Which argument of clone(2) holds the flags: the first on x86 and arm (s390 would be the
/// second).
const CLONE_FLAGS_ARG: u32 = 0;

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The RuntimeDefault profile for a process holding `caps` (`CAP_` names).
pub fn runtime_default(caps: &[String]) -> Value {
    let has = |c: &str| caps.iter().any(|h| h == c);
    let mut allowed: Vec<&str> = ALLOWED.to_vec();
    let mut refused: Vec<&str> = DENIED.to_vec();
    for (cap, names) in GATED {
        for name in *names {
            if has(cap) {
                allowed.push(name);
            } else {
                refused.push(name);
            }
        }
    }
    // bpf and perf_event_open are gated by two capabilities each: either one allows them.
    refused.retain(|n| !allowed.contains(n));
    allowed.sort_unstable();
    allowed.dedup();
    refused.sort_unstable();
    refused.dedup();
    let mut rules = vec![
        json!({"names": allowed, "action": "SCMP_ACT_ALLOW"}),
        json!({"names": refused, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}),
    ];
    for p in PERSONALITIES {
        rules.push(json!({
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": p, "op": "SCMP_CMP_EQ"}],
        }));
    }
    if has("CAP_SYS_ADMIN") {
        rules.push(json!({"names": ["clone", "clone3"], "action": "SCMP_ACT_ALLOW"}));
    } else {
        let all: u64 = CLONE_NS_FLAGS.iter().sum();
        rules.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": CLONE_FLAGS_ARG, "value": all, "valueTwo": 0,
                      "op": "SCMP_CMP_MASKED_EQ"}],
        }));
        for f in CLONE_NS_FLAGS {
            rules.push(json!({
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": [{"index": CLONE_FLAGS_ARG, "value": f, "valueTwo": f,
                          "op": "SCMP_CMP_MASKED_EQ"}],
            }));
        }
        // clone3 takes its flags in memory a filter cannot read; ENOSYS makes libc fall back
        // to clone, whose flags the rules above check.
        rules.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}));
    }
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": ENOSYS,
        "architectures": architectures(),
        "syscalls": rules,
    })
}

/// The native architecture and the compat ones its kernel runs.
fn architectures() -> Vec<&'static str> {
    if cfg!(target_arch = "x86_64") {
        vec!["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    } else if cfg!(target_arch = "aarch64") {
        vec!["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_with(profile: &Value, action: &str) -> Vec<String> {
        profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["action"] == action && r.get("args").is_none())
            .flat_map(|r| r["names"].as_array().unwrap().clone())
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn capabilities_open_their_syscalls_and_nothing_is_both_allowed_and_refused() {
        let plain = runtime_default(&["CAP_CHOWN".into()]);
        let admin = runtime_default(&["CAP_SYS_ADMIN".into(), "CAP_PERFMON".into()]);
        let allowed = names_with(&plain, "SCMP_ACT_ALLOW");
        let refused = names_with(&plain, "SCMP_ACT_ERRNO");
        for n in [
            "mount",
            "unshare",
            "setns",
            "keyctl",
            "bpf",
            "init_module",
            "reboot",
        ] {
            assert!(refused.contains(&n.to_string()), "{n} is not refused");
            assert!(!allowed.contains(&n.to_string()), "{n} is allowed");
        }
        for n in ["read", "openat", "execve", "socket", "futex", "statx"] {
            assert!(allowed.contains(&n.to_string()), "{n} is not allowed");
        }
        let allowed = names_with(&admin, "SCMP_ACT_ALLOW");
        let refused = names_with(&admin, "SCMP_ACT_ERRNO");
        for n in [
            "mount",
            "unshare",
            "setns",
            "clone",
            "clone3",
            "bpf",
            "perf_event_open",
        ] {
            assert!(allowed.contains(&n.to_string()), "{n} is not allowed");
        }
        assert!(refused.contains(&"keyctl".to_string()));
        for list in [&plain, &admin] {
            let a = names_with(list, "SCMP_ACT_ALLOW");
            let r = names_with(list, "SCMP_ACT_ERRNO");
            assert!(a.iter().all(|n| !r.contains(n)), "a syscall in both lists");
        }
    }

    #[test]
    fn the_profile_is_a_valid_oci_section() {
        let p = runtime_default(&[]);
        let s: oci_spec::runtime::LinuxSeccomp = serde_json::from_value(p).unwrap();
        assert_eq!(s.default_errno_ret(), Some(ENOSYS));
    }
}
