//! berthd's side of a streamed session (exec or attach for the streaming server): a
//! connection of its own to the pod's monitor, whose first answer brings the session's
//! descriptors (SCM_RIGHTS) and, for an exec, whose second brings the exit code. Dropping the
//! session closes the connection and every descriptor berthd holds of it.

use std::collections::VecDeque;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use super::client::MonitorError;
use super::proto::{self, message, request};

/// The descriptors a session was given, by name ("stdin", "stdout", "stderr", "terminal").
#[derive(Debug, Default)]
pub struct SessionFds {
    /// Each descriptor and what it is.
    pub fds: Vec<(String, OwnedFd)>,
    /// The process (an exec's, or the attached container's init).
    pub pid: i32,
}

impl SessionFds {
    /// Takes the descriptor named `name`.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.fds.iter().position(|(n, _)| n == name)?;
        Some(self.fds.remove(i).1)
    }
}

/// An open session with a pod's monitor.
pub struct StreamSession {
    pod_id: String,
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl StreamSession {
    /// Opens a connection to the monitor of `pod_id` at `socket` and sends `op`; its first
    /// answer's descriptors.
    pub async fn open(
        pod_id: &str,
        socket: &Path,
        op: request::Op,
    ) -> Result<(StreamSession, SessionFds), MonitorError> {
        let unreachable = |m: String| MonitorError::Unreachable {
            pod: pod_id.to_string(),
            message: m,
        };
        let mut stream = UnixStream::connect(socket)
            .await
            .map_err(|e| unreachable(format!("connecting to {}: {e}", socket.display())))?;
        let mut out = Vec::new();
        let hello = request::Op::Hello(proto::Hello {
            pod_id: pod_id.to_string(),
        });
        proto::frame(
            &proto::Request {
                id: 0,
                op: Some(hello),
            },
            &mut out,
        );
        proto::frame(
            &proto::Request {
                id: 1,
                op: Some(op),
            },
            &mut out,
        );
        stream
            .write_all(&out)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut s = StreamSession {
            pod_id: pod_id.to_string(),
            stream,
            buf: Vec::new(),
            fds: VecDeque::new(),
        };
        let (hello, _) = s.answer().await?;
        if hello.id != 0 {
            return Err(unreachable(
                "the monitor did not answer the greeting".into(),
            ));
        }
        let (r, fds) = s.answer().await?;
        match r.result {
            Some(proto::response::Result::Streams(st)) if st.fds.len() == fds.len() => {
                let fds = st.fds.into_iter().zip(fds).collect();
                Ok((s, SessionFds { fds, pid: st.pid }))
            }
            _ => Err(unreachable(format!(
                "the monitor answered a session without its descriptors ({} passed)",
                fds.len()
            ))),
        }
    }

    /// Waits for the exec's exit code (the session's second answer).
    pub async fn exited(&mut self) -> Result<i32, MonitorError> {
        let (r, _) = self.answer().await?;
        match r.result {
            Some(proto::response::Result::Exited(e)) => Ok(e.exit_code),
            _ => Err(MonitorError::Unreachable {
                pod: self.pod_id.clone(),
                message: "the monitor answered without the exit code".into(),
            }),
        }
    }

    /// The next answer and the descriptors that came for it (an error answer is an `Err`).
    async fn answer(&mut self) -> Result<(proto::Response, Vec<OwnedFd>), MonitorError> {
        loop {
            match proto::unframe::<proto::Message>(&mut self.buf) {
                Ok(Some(proto::Message {
                    kind: Some(message::Kind::Response(r)),
                })) => {
                    if !r.error.is_empty() {
                        return Err(MonitorError::Failed {
                            kind: proto::ErrorKind::try_from(r.error_kind)
                                .unwrap_or(proto::ErrorKind::Failed),
                            message: r.error,
                        });
                    }
                    let n = match &r.result {
                        Some(proto::response::Result::Streams(s)) => s.fds.len(),
                        _ => 0,
                    };
                    let n = n.min(self.fds.len());
                    return Ok((r, self.fds.drain(..n).collect()));
                }
                // Exit events of the pod's containers are not this session's business.
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => {
                    return Err(MonitorError::Unreachable {
                        pod: self.pod_id.clone(),
                        message: e,
                    });
                }
            }
            if self.read().await? == 0 {
                return Err(MonitorError::Unreachable {
                    pod: self.pod_id.clone(),
                    message: "the monitor closed the session".into(),
                });
            }
        }
    }

    /// One read of bytes and whatever descriptors came with them.
    async fn read(&mut self) -> Result<usize, MonitorError> {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            self.stream
                .readable()
                .await
                .map_err(|e| MonitorError::Unreachable {
                    pod: self.pod_id.clone(),
                    message: e.to_string(),
                })?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&self.stream);
            let got = self.stream.try_io(Interest::READABLE, || {
                recv_with_fds(fd, &mut chunk).map_err(std::io::Error::from)
            });
            match got {
                Ok((n, fds)) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.fds.extend(fds);
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    return Err(MonitorError::Unreachable {
                        pod: self.pod_id.clone(),
                        message: e.to_string(),
                    });
                }
            }
        }
    }
}

/// recvmsg of up to `buf.len()` bytes and up to 16 descriptors (close-on-exec).
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> nix::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 16]);
    let msg = nix::sys::socket::recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(got) = c {
            // SAFETY: the kernel just installed these descriptors for this process; nothing
            // else owns them.
            fds.extend(got.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    Ok((msg.bytes, fds))
}
