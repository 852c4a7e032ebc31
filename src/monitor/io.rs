//! Small I/O pieces of the monitor: pipes, non-blocking reads, the exit file, the terminal
//! libcontainer hands over a console socket, and the monitor's own socket.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::proto;

/// Nanoseconds since the epoch.
pub(super) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub(super) fn set_nonblocking(f: &impl AsRawFd) {
    // SAFETY: fcntl on an fd this process owns.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

pub(super) fn pipe() -> std::io::Result<(File, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((File::from(r), w))
}

/// Reads what is available; `Ok(None)` at end of file.
pub(super) fn read_some(f: &mut File, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    match f.read(buf) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::Interrupted =>
        {
            Ok(Some(0))
        }
        Err(e) => Err(e),
    }
}

pub(super) fn write_exit_file(path: &Path, exit: &proto::Exit) {
    let body = format!(
        "{{\"code\":{},\"signal\":{},\"exited_at_ns\":{},\"start_failed\":{},\"message\":{}}}",
        exit.code,
        exit.signal,
        exit.exited_at_ns,
        exit.start_failed,
        serde_json::Value::String(exit.message.clone())
    );
    let _ = crate::store::write_atomic_volatile(path, body.as_bytes());
}

/// Accepts libcontainer's connection on the console socket and takes the pty master it sends.
pub(super) fn receive_pty_master(console: &UnixListener) -> std::io::Result<File> {
    // libcontainer connected during create and sent the fd before create returned: the
    // connection and the message are queued already.
    let (stream, _) = console.accept()?;
    receive_fd(&stream)
}

/// Takes the first descriptor of the next message on `stream` (SCM_RIGHTS).
pub(super) fn receive_fd(stream: &UnixStream) -> std::io::Result<File> {
    let mut buf = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!(RawFd);
    let msg = nix::sys::socket::recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for c in msg.cmsgs()? {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c
            && let Some(fd) = fds.first()
        {
            // SAFETY: the kernel just installed this fd in our table for us; nothing else owns it.
            return Ok(unsafe { File::from_raw_fd(*fd) });
        }
    }
    Err(std::io::Error::other("no descriptor was sent"))
}

/// Binds the monitor's socket at `path` (replacing a stale one): done in the zygote, before
/// the fork, so berthd can connect as soon as the zygote answers.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    UnixListener::bind(path)
}
