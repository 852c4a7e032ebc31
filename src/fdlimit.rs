//! Ground floor: berthd's descriptor limit. At start berthd raises its soft RLIMIT_NOFILE to
//! the hard limit (the usual soft 1024 is a few hundred pods' worth of sockets, pins and
//! sessions); every process it starts gets the limit berthd was given back before it executes,
//! as Go does for its children, so containers see the node's usual limit, not berthd's.

use std::sync::OnceLock;

/// The limit berthd was started with, once it raised its own.
static ORIGINAL: OnceLock<libc::rlimit> = OnceLock::new();

fn get() -> std::io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim)
}

/// Raises the soft RLIMIT_NOFILE to the hard one and remembers the limit it replaced; returns
/// (was, now). Called once, at berthd's start, before it starts any process.
pub fn raise() -> std::io::Result<(u64, u64)> {
    let original = get()?;
    if original.rlim_cur >= original.rlim_max {
        return Ok((original.rlim_cur, original.rlim_cur));
    }
    let raised = libc::rlimit {
        rlim_cur: original.rlim_max,
        rlim_max: original.rlim_max,
    };
    // Remembered before raising: a child started in between must not miss it.
    let _ = ORIGINAL.set(original);
    // SAFETY: setrlimit reads the struct it is given, nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((original.rlim_cur, raised.rlim_cur))
}

/// The soft RLIMIT_NOFILE now: what berthd's descriptor table may hold.
pub fn soft() -> u64 {
    get().map_or(1024, |l| l.rlim_cur)
}

/// Has the child of `cmd` take back the limit berthd was started with before it executes (a
/// no-op when berthd never raised its own). Every process berthd starts is made through this.
pub fn for_child(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let Some(&original) = ORIGINAL.get() else {
        return;
    };
    // SAFETY: between fork and exec only setrlimit(2) runs, an async-signal-safe system call
    // on a struct copied into the closure before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &original) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// A process berthd starts without `for_child` would run with berthd's raised limit: every
    /// file of berthd's side that makes a Command must call it. The monitor and the pod init
    /// run in processes the zygote made, which already took the original limit back.
    #[test]
    fn every_command_berthd_starts_takes_back_the_original_limit() {
        fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push(p);
                }
            }
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src, &mut files);
        let mut missing = Vec::new();
        for f in files {
            let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            if rel.starts_with("monitor/") || rel == "zygote/pod_init.rs" || rel == "fdlimit.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            if code.contains("Command::new(") && !code.contains("fdlimit::for_child(") {
                missing.push(rel);
            }
        }
        assert!(
            missing.is_empty(),
            "these start processes without fdlimit::for_child: {missing:?}"
        );
    }
}
