//! Descriptor exhaustion (issue 28): a node user (uid 65534) holding thousands of idle TCP
//! connections to berthd's streaming and metrics ports must not cut kubelet off from the CRI.
//! berthd raises its soft RLIMIT_NOFILE (what it starts keeps the limit berthd was given), caps
//! each listener's connections and closes a connection that sends no request head in seconds.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use common::world::*;
use common::{Berthd, Env, Netns, Options, Registry};

const STREAMING_PORT: u16 = 10350;
const METRICS_PORT: u16 = 10351;
/// Connections the node user opens to each port: together well past a limit of 1024.
const CONNECTIONS: usize = 3000;

/// The node user's side: opens non-blocking connections on command, never sends a byte, and
/// dials again whenever berthd closes one (as an attacker would), until told to let go.
const NODE_USER: &str = r#"
import os, resource, selectors, socket
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
held = set()
redialed = 0
def dial(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    sel.register(s, selectors.EVENT_READ, port)
    held.add(s)
def drop(s):
    sel.unregister(s)
    held.discard(s)
    s.close()
def established():
    n = 0
    for s in held:
        try:
            s.getpeername()
            n += 1
        except OSError:
            pass
    return n
def answer(words):
    global redialed
    if words[0] == "hold":
        for _ in range(int(words[2])):
            dial(int(words[1]))
        return "ok"
    if words[0] == "status":
        return "open=%d established=%d redialed=%d" % (len(held), established(), redialed)
    if words[0] == "release":
        for s in list(held):
            drop(s)
        redialed = 0
        return "ok"
    return "unknown"
sel.register(0, selectors.EVENT_READ, None)
buf = b""
while True:
    for key, _ in sel.select(timeout=1):
        if key.data is None:
            chunk = os.read(0, 4096)
            if not chunk:
                raise SystemExit(0)
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                os.write(1, (answer(line.decode().split()) + "\n").encode())
            continue
        s = key.fileobj
        if s not in held:
            continue
        try:
            data = s.recv(4096)
        except OSError:
            drop(s)
            continue
        if not data:
            drop(s)
            redialed += 1
            dial(key.data)
"#;

/// The node user's process (uid/gid 65534, no groups) inside the test's namespace; killed by
/// its pid on drop.
struct NodeUser {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl NodeUser {
    fn spawn(netns: &Netns) -> NodeUser {
        // Forked from a thread inside the namespace, so the child is born in it (setns after
        // setuid would be refused).
        let mut child = netns.run_in(|| {
            // Debian's python: root's own may live under /root, which uid 65534 cannot read.
            Command::new("/usr/bin/python3")
                .args(["-c", NODE_USER])
                .uid(65534)
                .gid(65534)
                .current_dir("/")
                .env_clear()
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("starting python3 as uid 65534")
        });
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        NodeUser {
            child,
            stdin,
            stdout,
        }
    }

    fn ask(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("writing to the node user");
        let mut answer = String::new();
        self.stdout
            .read_line(&mut answer)
            .expect("reading the node user");
        assert!(!answer.is_empty(), "the node user's process ended");
        answer.trim().to_string()
    }
}

impl Drop for NodeUser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sets this process's RLIMIT_NOFILE, which the berthd it starts inherits.
fn set_nofile(soft: u64, hard: u64) {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(r, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

fn hard_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_max
}

/// (soft, hard) "Max open files" of a `/proc/PID/limits` text.
fn max_open_files(limits: &str) -> (String, String) {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no Max open files in\n{limits}"));
    let w: Vec<&str> = line.split_whitespace().collect();
    (w[3].to_string(), w[4].to_string())
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Opens a connection to `port` inside `netns` and sends nothing: how long berthd took to
/// close it, or `None` if it was still open after `patience`.
fn silent_connection_closed_after(
    netns: &Netns,
    port: u16,
    patience: Duration,
) -> Option<Duration> {
    netns.run_in(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting");
        s.set_read_timeout(Some(patience)).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => Some(started.elapsed()),
            Ok(n) => panic!("berthd sent {n} bytes to a silent connection"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(started.elapsed()),
            Err(_) => None,
        }
    })
}

fn config(tls: bool) -> String {
    format!(
        "[streaming]\nport = {STREAMING_PORT}\ntls = {tls}\n\
         [metrics]\naddress = \"127.0.0.1:{METRICS_PORT}\"\n"
    )
}

/// One berthd under attack: started with the test's current limits, checked for its own limit,
/// for serving a fresh CRI client a new pod while the node user holds thousands of connections
/// to its ports (holding fewer than `max_fds` descriptors itself), and for closing a silent
/// connection within `close_within`.
async fn under_attack(
    env: Env,
    user: &mut NodeUser,
    close_within: Duration,
    max_fds: usize,
    container_limit: Option<(&str, &str)>,
) -> Env {
    let pid = env.berthd.pid();

    assert_eq!(
        user.ask(&format!("hold {STREAMING_PORT} {CONNECTIONS}")),
        "ok"
    );
    assert_eq!(
        user.ask(&format!("hold {METRICS_PORT} {CONNECTIONS}")),
        "ok"
    );
    // Time for berthd to take what it will (all it can, before the fix: its whole table) and
    // for the kernel to queue or drop the rest.
    std::thread::sleep(Duration::from_secs(3));
    let held = user.ask("status");
    assert!(
        held.starts_with(&format!("open={} ", 2 * CONNECTIONS)),
        "the node user does not hold its connections: {held}"
    );

    // kubelet, meanwhile: a new connection and a new pod, in bounded time.
    let logs = env.berthd.dir.path().join("logs");
    let c = pod_config_for(
        &logs,
        &env.berthd.cgroup_root,
        "fd-exhaustion",
        cri::NamespaceMode::Container,
    );
    let socket = env.berthd.socket.clone();
    let started = Instant::now();
    let made = tokio::time::timeout(Duration::from_secs(30), async {
        let mut rt =
            cri::runtime_service_client::RuntimeServiceClient::new(common::connect(&socket).await);
        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(c.clone()),
                runtime_handler: common::handler(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id);
        (rt, pod)
    })
    .await;
    let (rt, pod) = made.unwrap_or_else(|_| {
        panic!(
            "no answer to a new CRI connection within 30 s while the node user holds its \
             connections ({held}); berthd holds {} descriptors",
            open_fds(pid)
        )
    });
    let pod = pod.unwrap_or_else(|e| {
        panic!(
            "RunPodSandbox failed while the node user holds its connections ({held}); berthd \
             holds {} descriptors: {e}",
            open_fds(pid)
        )
    });
    eprintln!(
        "RunPodSandbox answered in {:?} while the node user held its connections ({held}, \
         now {}); berthd holds {} descriptors",
        started.elapsed(),
        user.ask("status"),
        open_fds(pid)
    );
    let mut w = World { env, rt };

    if let Some((soft, hard)) = container_limit {
        // What berthd starts keeps the limit berthd was given: the container's init and an
        // exec'd process (from the monitor) alike.
        let ctr = w
            .run(
                &(pod.clone(), c.clone()),
                container("limits", &["sleep", "3600"]),
            )
            .await;
        for path in ["/proc/1/limits", "/proc/self/limits"] {
            let text = w.out(&ctr, &["cat", path]).await;
            assert_eq!(
                max_open_files(&text),
                (soft.to_string(), hard.to_string()),
                "{path} in the container"
            );
        }
    }

    // berthd's share of the connections stays within its caps, whatever the node user holds.
    let fds = open_fds(pid);
    assert!(fds < max_fds, "berthd holds {fds} descriptors");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let (soft, hard) = max_open_files(&limits);
    assert_eq!(
        soft, hard,
        "berthd kept a soft RLIMIT_NOFILE below its hard one"
    );

    assert_eq!(user.ask("release"), "ok");
    // Both checks at once: each waits for a timeout.
    let (streaming, metrics) = std::thread::scope(|s| {
        let netns = &w.env.netns;
        let patience = close_within + Duration::from_secs(10);
        let a = s.spawn(move || silent_connection_closed_after(netns, STREAMING_PORT, patience));
        let b = s.spawn(move || silent_connection_closed_after(netns, METRICS_PORT, patience));
        (a.join().unwrap(), b.join().unwrap())
    });
    for (what, closed) in [("streaming", streaming), ("metrics", metrics)] {
        let closed = closed.unwrap_or_else(|| panic!("a silent {what} connection stayed open"));
        eprintln!("berthd closed a silent {what} connection after {closed:?}");
        assert!(
            closed <= close_within,
            "a silent {what} connection was closed only after {closed:?}"
        );
    }

    // The endpoints serve again once the node user lets go (its queued connections drain).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = w.env.netns.run_in(|| {
            let addr = format!("127.0.0.1:{METRICS_PORT}");
            std::net::TcpStream::connect(&addr).is_ok()
                && common::fake_http::get(&addr, "GET", "/metrics", &[]).status == 200
        });
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "metrics did not serve again");
        std::thread::sleep(Duration::from_millis(200));
    }
    w.remove_pod(&pod).await;
    w.env
}

/// A berthd in `netns` using `registry` as mirror, with streaming on STREAMING_PORT (`tls` or
/// not) and metrics on METRICS_PORT.
fn start(netns: Netns, registry: Registry, tls: bool) -> Env {
    let berthd = Berthd::start_with(Options {
        extra_config: format!("{}\n{}", common::mirror_config(&registry.addr), config(tls)),
        netns: Some(netns.path.clone()),
        ..Default::default()
    });
    Env {
        berthd,
        registry,
        netns,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_user_holding_idle_connections_never_cuts_kubelet_off() {
    let netns = Netns::new();
    let registry = Registry::start(&netns, 5000);
    // Started before this process's limits are lowered: the node user keeps the machine's.
    let mut user = NodeUser::spawn(&netns);
    let hard = hard_nofile();

    // The usual soft limit of 1024 under a higher hard one: berthd may raise its own.
    set_nofile(1024, hard);
    let env = start(netns, registry, false);
    pull(&env.berthd, BUSYBOX).await;
    let hard_text = if hard == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        hard.to_string()
    };
    let env = under_attack(
        env,
        &mut user,
        Duration::from_secs(8),
        // Caps of 1024 streaming and 32 metrics connections, and berthd's own.
        1024 + 32 + 256,
        Some(("1024", &hard_text)),
    )
    .await;
    let Env {
        berthd,
        registry,
        netns,
    } = env;
    drop(berthd);

    // No higher hard limit (irreversible without CAP_SYS_RESOURCE, so last): only the caps
    // keep the table free; over TLS, whose handshake is bounded at 10 s.
    set_nofile(1024, 1024);
    let env = start(netns, registry, true);
    let env = under_attack(env, &mut user, Duration::from_secs(13), 512, None).await;
    drop(env);
}
