//! A container's output copied to the attach sessions that take it, as the monitor logs it:
//! never by stalling the container or its log for a slow client.

use super::cri_log::Stream;
use super::state::Attachment;

/// Copies a chunk of a container's output to every attached session that takes it; a session
/// whose pipe is full misses the chunk, one whose reader is gone is dropped.
pub(super) fn fan_out(attached: &mut Vec<Attachment>, s: Stream, data: &[u8]) {
    attached.retain_mut(|a| {
        let slot = match s {
            Stream::Stdout => &mut a.out,
            Stream::Stderr => &mut a.err,
        };
        if let Some(w) = slot.as_ref() {
            match rustix::io::write(w, data) {
                Ok(_) | Err(rustix::io::Errno::AGAIN) => {}
                Err(_) => *slot = None,
            }
        }
        a.out.is_some() || a.err.is_some()
    });
}

/// A container's output stream ended: so does it for every attached session.
pub(super) fn end_stream(attached: &mut Vec<Attachment>, s: Stream) {
    for a in attached.iter_mut() {
        match s {
            Stream::Stdout => a.out = None,
            Stream::Stderr => a.err = None,
        }
    }
    attached.retain(|a| a.out.is_some() || a.err.is_some());
}
