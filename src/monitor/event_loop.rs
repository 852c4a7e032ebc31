//! The monitor's event loop: one poll(2) over the sources registered with a handler (a
//! descriptor and what to do when it is ready) and timers (an instant and what to do then). A
//! feature joins by registering its sources where it makes them — berthd's connections, the
//! SIGCHLD signalfd, container output, exec output, start-status pipes; later attach streams,
//! port-forward helpers, OOM events — with no central list to keep in step. Generic over the
//! state `M` the handlers get, so it knows none of the features.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::time::Instant;

/// What runs when a registered descriptor is ready; it gets the poll events.
type OnReady<M> = Box<dyn FnMut(&mut M, i16)>;
/// What runs when a timer is due.
type OnTime<M> = Box<dyn FnOnce(&mut M)>;

struct Watch<M> {
    events: i16,
    /// Taken out while it runs (it gets the state mutably, sources included).
    on_ready: Option<OnReady<M>>,
}

/// The registered sources and timers.
pub(super) struct Sources<M> {
    watches: BTreeMap<RawFd, Watch<M>>,
    timers: BTreeMap<(Instant, u64), OnTime<M>>,
    next_timer: u64,
}

impl<M> Default for Sources<M> {
    fn default() -> Self {
        Sources {
            watches: BTreeMap::new(),
            timers: BTreeMap::new(),
            next_timer: 0,
        }
    }
}

impl<M> Sources<M> {
    /// Registers `fd`: `on_ready` runs when poll reports one of `events` (or an error) on it.
    /// The handler stays until `unwatch`; whoever closes the descriptor unwatches it.
    pub fn watch(&mut self, fd: RawFd, events: i16, on_ready: impl FnMut(&mut M, i16) + 'static) {
        self.watches.insert(
            fd,
            Watch {
                events,
                on_ready: Some(Box::new(on_ready)),
            },
        );
    }

    /// Forgets `fd` (about to be closed).
    pub fn unwatch(&mut self, fd: RawFd) {
        self.watches.remove(&fd);
    }

    /// Changes what `fd` is polled for (a connection with output waiting wants POLLOUT).
    pub fn set_events(&mut self, fd: RawFd, events: i16) {
        if let Some(w) = self.watches.get_mut(&fd) {
            w.events = events;
        }
    }

    /// Runs `f` once at `at` (or at the first loop pass after it).
    pub fn after(&mut self, at: Instant, f: impl FnOnce(&mut M) + 'static) {
        self.next_timer += 1;
        self.timers.insert((at, self.next_timer), Box::new(f));
    }

    /// Milliseconds until the next timer, or -1.
    fn poll_timeout(&self) -> i32 {
        match self.timers.keys().next() {
            None => -1,
            Some((t, _)) => {
                t.saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(i32::MAX as u128 - 1) as i32
                    + 1
            }
        }
    }
}

/// A state the loop can serve.
pub(super) trait Serve: Sized + 'static {
    /// Its sources.
    fn sources(&mut self) -> &mut Sources<Self>;
    /// Whether it is done (the loop then exits the process).
    fn finished(&self) -> bool;
}

/// Serves `m` until it is finished, then exits the process.
pub(super) fn serve<M: Serve>(m: &mut M) -> ! {
    loop {
        if m.finished() {
            std::process::exit(0);
        }
        let mut fds: Vec<libc::pollfd> = m
            .sources()
            .watches
            .iter()
            .map(|(fd, w)| libc::pollfd {
                fd: *fd,
                events: w.events,
                revents: 0,
            })
            .collect();
        let timeout = m.sources().poll_timeout();
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n > 0 {
            for pfd in fds.iter().filter(|p| p.revents != 0) {
                dispatch(m, pfd.fd, pfd.revents);
            }
        }
        run_due_timers(m);
    }
}

fn dispatch<M: Serve>(m: &mut M, fd: RawFd, revents: i16) {
    if revents & libc::POLLNVAL != 0 {
        // Closed without being unwatched: nothing to read there any more.
        m.sources().unwatch(fd);
        return;
    }
    let Some(mut on_ready) = m
        .sources()
        .watches
        .get_mut(&fd)
        .and_then(|w| w.on_ready.take())
    else {
        return;
    };
    on_ready(m, revents);
    // Back in place unless the handler unwatched the fd (or registered a new handler there).
    if let Some(w) = m.sources().watches.get_mut(&fd)
        && w.on_ready.is_none()
    {
        w.on_ready = Some(on_ready);
    }
}

fn run_due_timers<M: Serve>(m: &mut M) {
    let now = Instant::now();
    loop {
        let Some(entry) = m.sources().timers.first_entry() else {
            return;
        };
        if entry.key().0 > now {
            return;
        }
        let f = entry.remove();
        f(m);
    }
}
