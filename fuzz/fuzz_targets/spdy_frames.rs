//! The SPDY/3.1 frame parser on hostile bytes, fed in pieces as a socket delivers them (the
//! first byte picks the piece size): it must never panic, and never allocate more than the
//! bytes that arrived justify (libFuzzer's -malloc_limit_mb, set by hack/fuzz, catches that).
//! Every frame it accepts is encoded again, which must not panic either.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

// The module itself, not the berth crate: the target builds in seconds, without the daemon.
#[path = "../../src/streaming/spdy/mod.rs"]
#[allow(dead_code)]
mod spdy;

fuzz_target!(|data: &[u8]| {
    let mut codec = spdy::Codec::new();
    let step = data.first().map_or(1, |b| usize::from(*b % 64) + 1);
    let mut buf = BytesMut::new();
    for piece in data.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let mut out = BytesMut::new();
                    let _ = codec.encode(&frame, &mut out);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
