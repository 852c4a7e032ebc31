//! berthd's side of the monitor protocol: one connection per pod's monitor, requests matched
//! to answers by id, exit events forwarded to the container manager. A lost connection is
//! re-established on the next request (berthd restarts, the monitor does not).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::proto::{self, message, request};

/// What a monitor's connection tells berthd unasked: (pod id, what).
pub type ExitEvent = (String, MonitorEvent);

/// An event of a monitor's connection.
#[derive(Debug)]
pub enum MonitorEvent {
    /// A container exited.
    Exit(proto::Event),
    /// The connection ended: the monitor may have died (berthd checks).
    Lost,
}

/// A failed monitor call.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The monitor could not be reached (dead, or its socket is gone).
    #[error("monitor of pod {pod}: {message}")]
    Unreachable {
        /// The pod.
        pod: String,
        /// Why.
        message: String,
    },
    /// The monitor answered with an error.
    #[error("{message}")]
    Failed {
        /// Its kind.
        kind: proto::ErrorKind,
        /// Its message.
        message: String,
    },
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<proto::Response>>>>;

struct Conn {
    writer: OwnedWriteHalf,
    reader: tokio::task::JoinHandle<()>,
}

/// A pod's monitor as berthd sees it.
pub struct MonitorClient {
    pod_id: String,
    socket: PathBuf,
    conn: Mutex<Option<Conn>>,
    pending: Pending,
    next_id: AtomicU64,
    events: mpsc::UnboundedSender<ExitEvent>,
}

impl MonitorClient {
    /// A client for the monitor of `pod_id` listening at `socket`; exits go to `events`.
    pub fn new(
        pod_id: &str,
        socket: &Path,
        events: mpsc::UnboundedSender<ExitEvent>,
    ) -> MonitorClient {
        MonitorClient {
            pod_id: pod_id.to_string(),
            socket: socket.to_owned(),
            conn: Mutex::new(None),
            pending: Arc::default(),
            next_id: AtomicU64::new(1),
            events,
        }
    }

    fn unreachable(&self, message: impl std::fmt::Display) -> MonitorError {
        MonitorError::Unreachable {
            pod: self.pod_id.clone(),
            message: message.to_string(),
        }
    }

    async fn connect(&self) -> Result<Conn, MonitorError> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            self.unreachable(format!("connecting to {}: {e}", self.socket.display()))
        })?;
        let (mut rd, writer) = stream.into_split();
        let pending = self.pending.clone();
        let events = self.events.clone();
        let pod = self.pod_id.clone();
        let reader = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64 * 1024);
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                loop {
                    match proto::unframe::<proto::Message>(&mut buf) {
                        Ok(Some(m)) => match m.kind {
                            Some(message::Kind::Response(r)) => {
                                if let Some(tx) =
                                    pending.lock().expect("pending poisoned").remove(&r.id)
                                {
                                    let _ = tx.send(r);
                                }
                            }
                            Some(message::Kind::Event(e)) => {
                                let _ = events.send((pod.clone(), MonitorEvent::Exit(e)));
                            }
                            None => {}
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(pod = %pod, error = %e, "bad message from monitor");
                            return;
                        }
                    }
                }
                match rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            // Whoever still waits learns the connection is gone (their senders drop).
            pending.lock().expect("pending poisoned").clear();
            let _ = events.send((pod, MonitorEvent::Lost));
        });
        Ok(Conn { writer, reader })
    }

    /// Sends one request and waits for its answer (`timeout`: how long at most).
    pub async fn call(
        &self,
        op: request::Op,
        timeout: Option<Duration>,
    ) -> Result<proto::Response, MonitorError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending poisoned")
            .insert(id, tx);
        let sent = self.send(proto::Request { id, op: Some(op) }).await;
        if let Err(e) = sent {
            self.pending.lock().expect("pending poisoned").remove(&id);
            return Err(e);
        }
        let answer = match timeout {
            Some(t) => tokio::time::timeout(t, rx).await.map_err(|_| {
                self.pending.lock().expect("pending poisoned").remove(&id);
                self.unreachable(format!("no answer within {t:?}"))
            })?,
            None => rx.await,
        };
        let r = answer.map_err(|_| self.unreachable("the connection closed before the answer"))?;
        if r.error.is_empty() {
            Ok(r)
        } else {
            Err(MonitorError::Failed {
                kind: proto::ErrorKind::try_from(r.error_kind).unwrap_or(proto::ErrorKind::Failed),
                message: r.error,
            })
        }
    }

    async fn send(&self, req: proto::Request) -> Result<(), MonitorError> {
        let mut frame = Vec::new();
        proto::frame(&req, &mut frame);
        let mut conn = self.conn.lock().await;
        for attempt in 0..2 {
            if conn.as_ref().is_none_or(|c| c.reader.is_finished()) {
                let fresh = self.connect().await?;
                *conn = Some(fresh);
                // Every connection starts with the greeting (which also confirms a new monitor).
                let hello = proto::Request {
                    id: 0,
                    op: Some(request::Op::Hello(proto::Hello {
                        pod_id: self.pod_id.clone(),
                    })),
                };
                let mut h = Vec::new();
                proto::frame(&hello, &mut h);
                let c = conn.as_mut().expect("just connected");
                c.writer
                    .write_all(&h)
                    .await
                    .map_err(|e| self.unreachable(e))?;
            }
            let c = conn.as_mut().expect("connected above");
            match c.writer.write_all(&frame).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt == 0 => {
                    tracing::debug!(pod = %self.pod_id, error = %e, "monitor connection lost; reconnecting");
                    *conn = None;
                }
                Err(e) => return Err(self.unreachable(e)),
            }
        }
        unreachable!("the loop returns on its second pass")
    }
}

impl Drop for MonitorClient {
    fn drop(&mut self) {
        if let Ok(mut c) = self.conn.try_lock()
            && let Some(c) = c.take()
        {
            c.reader.abort();
        }
    }
}
