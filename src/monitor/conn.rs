//! berthd's connections to the monitor: accepted from the listening socket, read into
//! length-prefixed requests, answered (possibly out of order: ExecSync answers when its
//! process is done), and sent every container exit as an event.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use super::proto::{self, message, request};
use super::state::{Conn, CtrStatus, Failure, Monitor};

impl Monitor {
    /// Takes every pending connection and registers it.
    pub fn accept(&mut self, listener: &UnixListener) {
        while let Ok((stream, _)) = listener.accept() {
            let _ = stream.set_nonblocking(true);
            let id = self.next_conn;
            self.next_conn += 1;
            let fd = stream.as_raw_fd();
            self.conns.insert(
                id,
                Conn {
                    stream,
                    rbuf: Vec::new(),
                    wbuf: Vec::new(),
                    fds: Vec::new(),
                    closed: false,
                },
            );
            self.watch(fd, libc::POLLIN, move |m, revents| {
                m.conn_ready(id, revents)
            });
        }
    }

    fn conn_ready(&mut self, id: u64, revents: i16) {
        let mut requests = Vec::new();
        {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if revents & libc::POLLOUT != 0 {
                c.flush();
            }
            if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !c.closed {
                c.read_requests(&mut requests);
            }
        }
        for r in requests {
            self.handle(id, r);
        }
        self.update_conn(id);
    }

    /// Polls a connection for what it waits for; forgets it once closed and flushed.
    fn update_conn(&mut self, id: u64) {
        let Some(c) = self.conns.get(&id) else {
            return;
        };
        let fd = c.stream.as_raw_fd();
        if c.closed && c.wbuf.is_empty() {
            self.unwatch(fd);
            self.conns.remove(&id);
            return;
        }
        let mut events = 0;
        if !c.closed {
            events |= libc::POLLIN;
        }
        if !c.wbuf.is_empty() {
            events |= libc::POLLOUT;
        }
        self.ev.set_events(fd, events);
    }

    /// Sends `msg` on a connection (what does not fit waits for POLLOUT).
    pub fn send(&mut self, conn: u64, msg: proto::Message) {
        if let Some(c) = self.conns.get_mut(&conn)
            && !c.closed
        {
            proto::frame(&msg, &mut c.wbuf);
            c.flush();
        }
        self.update_conn(conn);
    }

    /// Answers request `id` on `conn`.
    pub fn respond(
        &mut self,
        conn: u64,
        id: u64,
        result: Result<Option<proto::response::Result>, Failure>,
    ) {
        let r = match result {
            Ok(result) => proto::Response {
                id,
                result,
                ..Default::default()
            },
            Err((kind, error)) => proto::Response {
                id,
                error,
                error_kind: kind as i32,
                result: None,
            },
        };
        self.send(
            conn,
            proto::Message {
                kind: Some(message::Kind::Response(r)),
            },
        );
    }

    /// Answers request `id` on `conn` with `fds` passed along (SCM_RIGHTS); the monitor's
    /// copies close once they are sent.
    pub fn respond_with_fds(
        &mut self,
        conn: u64,
        id: u64,
        result: Option<proto::response::Result>,
        fds: Vec<OwnedFd>,
    ) {
        if let Some(c) = self.conns.get_mut(&conn)
            && !c.closed
        {
            c.fds.extend(fds);
        }
        self.respond(conn, id, Ok(result));
    }

    /// Sends an event to every connection.
    pub fn broadcast(&mut self, ev: proto::Event) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.send(
                id,
                proto::Message {
                    kind: Some(message::Kind::Event(ev.clone())),
                },
            );
        }
    }

    /// Dispatches one request to the feature that serves it.
    fn handle(&mut self, conn: u64, r: proto::Request) {
        use proto::ErrorKind as K;
        let id = r.id;
        match r.op {
            Some(request::Op::Hello(h)) => {
                if h.pod_id != self.pod_id {
                    let why = format!("this is the monitor of pod {}", self.pod_id);
                    return self.respond(conn, id, Err((K::Invalid, why)));
                }
                self.greeted = true;
                let hello = proto::Hello {
                    pod_id: self.pod_id.clone(),
                };
                self.respond(conn, id, Ok(Some(proto::response::Result::Hello(hello))));
            }
            Some(request::Op::Create(c)) => {
                let t = std::time::Instant::now();
                let r = self.create(c).map(|pid| {
                    let micros = t.elapsed().as_micros() as u64;
                    Some(proto::response::Result::Created(proto::Created {
                        pid,
                        micros,
                    }))
                });
                self.respond(conn, id, r.map_err(|e| (K::Failed, e)));
            }
            Some(request::Op::Start(s)) => {
                if let Err(e) = self.start(conn, id, &s.container_id) {
                    self.respond(conn, id, Err(e));
                }
            }
            Some(request::Op::Kill(k)) => {
                let r = self.kill(&k.container_id, k.signal);
                self.respond(conn, id, r);
            }
            Some(request::Op::Exec(e)) => {
                if let Err(err) = self.exec(conn, id, e) {
                    self.respond(conn, id, Err(err));
                }
            }
            Some(request::Op::ExecStream(e)) => {
                if let Err(err) = self.exec_stream(conn, id, e) {
                    self.respond(conn, id, Err(err));
                }
            }
            Some(request::Op::Attach(a)) => {
                if let Err(err) = self.attach(conn, id, a) {
                    self.respond(conn, id, Err(err));
                }
            }
            Some(request::Op::ReopenLog(rl)) => {
                let r = self.reopen_log(&rl.container_id);
                self.respond(conn, id, r);
            }
            Some(request::Op::Delete(d)) => {
                let r = self.delete(&d.container_id, d.force);
                self.respond(conn, id, r);
            }
            Some(request::Op::List(_)) => {
                let states = self.states();
                self.respond(conn, id, Ok(Some(proto::response::Result::States(states))));
            }
            Some(request::Op::Shutdown(_)) => {
                if self.ctrs.values().any(|c| c.status != CtrStatus::Exited) {
                    return self.respond(
                        conn,
                        id,
                        Err((K::Invalid, "containers still run".into())),
                    );
                }
                self.shutdown = true;
                self.respond(conn, id, Ok(None));
            }
            None => self.respond(conn, id, Err((K::Invalid, "empty request".into()))),
        }
    }
}

impl Conn {
    fn flush(&mut self) {
        if self.wbuf.is_empty() {
            return;
        }
        let written = if self.fds.is_empty() {
            self.stream.write(&self.wbuf)
        } else {
            // The descriptors ride on the first byte still unsent, which is at or before the
            // answer they belong to: berthd has them by the time it reads that answer.
            let raw: Vec<RawFd> = self.fds.iter().map(|f| f.as_raw_fd()).collect();
            let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
            nix::sys::socket::sendmsg::<()>(
                self.stream.as_raw_fd(),
                &[std::io::IoSlice::new(&self.wbuf)],
                &cmsg,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(std::io::Error::from)
            .inspect(|_| self.fds.clear())
        };
        match written {
            Ok(n) => {
                self.wbuf.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {
                self.wbuf.clear();
                self.fds.clear();
                self.closed = true;
            }
        }
    }

    fn read_requests(&mut self, out: &mut Vec<proto::Request>) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.closed = true;
                    self.wbuf.clear();
                    break;
                }
                Ok(n) => self.rbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.closed = true;
                    self.wbuf.clear();
                    break;
                }
            }
        }
        loop {
            match proto::unframe::<proto::Request>(&mut self.rbuf) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => break,
                Err(_) => {
                    self.closed = true;
                    self.wbuf.clear();
                    break;
                }
            }
        }
    }
}
