//! A pipe or terminal descriptor from a pod's monitor as async I/O: made non-blocking and
//! polled by tokio's reactor. A terminal master reads EIO once its last slave is closed; that
//! is the end of its output, as for a pipe.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// One descriptor, read or written asynchronously.
pub struct FdIo(AsyncFd<OwnedFd>);

impl FdIo {
    /// Takes `fd` (set non-blocking).
    pub fn new(fd: OwnedFd) -> io::Result<FdIo> {
        let fl = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, fl | rustix::fs::OFlags::NONBLOCK)?;
        // SAFETY: an OwnedFd is a valid open descriptor, owned by the AsyncFd from here on
        // and closed only when it drops; its as_raw_fd never changes.
        let registered = unsafe { AsyncFd::register(fd) };
        Ok(FdIo(registered.map_err(io::Error::from)?))
    }

    /// Reads what is there (waiting for something); 0 at the end.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready
                .try_io(|fd| rustix::io::read(fd.get_ref(), &mut *buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `buf`.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut ready = self.0.writable().await?;
            match ready.try_io(|fd| rustix::io::write(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// Sets a terminal's window size.
    pub fn resize(&self, width: u16, height: u16) -> io::Result<()> {
        let ws = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads the winsize it is given from this live local.
        if unsafe { libc::ioctl(self.0.get_ref().as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
