//! A TCP proxy inside a test's namespace that passes a registry's answers through at full speed
//! up to a point, then slows them down or stops them: a registry that stalls, or a slow one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Netns;

/// What the proxy does to server-to-client bytes after `after` bytes of a connection.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Sends nothing more (the connection stays open).
    Stall {
        /// Bytes passed before stalling.
        after: u64,
    },
    /// Sends `bytes_per_sec` at most.
    Throttle {
        /// Bytes passed at full speed first.
        after: u64,
        /// The rate after that.
        bytes_per_sec: u64,
    },
}

/// A running proxy; stops on drop.
pub struct Proxy {
    /// `127.0.0.1:PORT` inside the namespace.
    pub addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listens on 127.0.0.1:`port` in `ns`, forwarding to `upstream` (also in `ns`).
    pub fn start(ns: &Netns, port: u16, upstream: &str, mode: Mode) -> Proxy {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let upstream = upstream.to_string();
        let path = ns.path.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .unwrap();
                ready_tx.send(()).unwrap();
                loop {
                    if stop2.load(Ordering::Relaxed) {
                        return;
                    }
                    let accepted =
                        tokio::time::timeout(Duration::from_millis(50), l.accept()).await;
                    let Ok(Ok((client, _))) = accepted else {
                        continue;
                    };
                    let upstream = upstream.clone();
                    let stop3 = stop2.clone();
                    tokio::spawn(async move {
                        let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let (mut cr, mut cw) = client.into_split();
                        let (mut sr, mut sw) = server.into_split();
                        tokio::spawn(async move {
                            let _ = tokio::io::copy(&mut cr, &mut sw).await;
                        });
                        let mut sent: u64 = 0;
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            if stop3.load(Ordering::Relaxed) {
                                return;
                            }
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let mut off = 0;
                            while off < n {
                                let chunk = match mode {
                                    Mode::Stall { after } if sent >= after => {
                                        while !stop3.load(Ordering::Relaxed) {
                                            tokio::time::sleep(Duration::from_millis(50)).await;
                                        }
                                        return;
                                    }
                                    Mode::Stall { after } => ((after - sent) as usize).min(n - off),
                                    Mode::Throttle {
                                        after,
                                        bytes_per_sec,
                                    } if sent >= after => {
                                        let c = ((bytes_per_sec / 10) as usize).max(1).min(n - off);
                                        tokio::time::sleep(Duration::from_millis(100)).await;
                                        c
                                    }
                                    Mode::Throttle { after, .. } => {
                                        ((after - sent) as usize).min(n - off)
                                    }
                                };
                                if cw.write_all(&buf[off..off + chunk]).await.is_err() {
                                    return;
                                }
                                off += chunk;
                                sent += chunk as u64;
                            }
                        }
                    });
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("proxy did not start");
        Proxy {
            addr: format!("127.0.0.1:{port}"),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
