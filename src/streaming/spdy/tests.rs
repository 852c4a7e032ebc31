//! Frame sequences through the codec, the wire bytes of frames the protocol fixes, and hostile
//! input (random and mutated frames): errors, never a panic or an unbounded allocation.

use super::*;

fn h(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A connection's worth of frames, as kubelet's exec and port-forward exchange them.
fn sequence() -> Vec<Frame> {
    vec![
        Frame::Settings {
            clear: false,
            entries: vec![Setting {
                flags: 0,
                id: SETTINGS_INITIAL_WINDOW_SIZE,
                value: 1 << 20,
            }],
        },
        Frame::SynStream {
            stream: 1,
            associated: 0,
            priority: 0,
            flags: 0,
            headers: h(&[("streamtype", "error")]),
        },
        Frame::SynReply {
            stream: 1,
            fin: false,
            headers: vec![],
        },
        Frame::SynStream {
            stream: 3,
            associated: 0,
            priority: 0,
            flags: FLAG_UNIDIRECTIONAL,
            headers: h(&[("streamtype", "data"), ("port", "80"), ("requestid", "0")]),
        },
        Frame::Data {
            stream: 3,
            fin: false,
            data: Bytes::from_static(b"GET / HTTP/1.0\r\n\r\n"),
        },
        Frame::WindowUpdate {
            stream: 3,
            delta: 18,
        },
        Frame::Headers {
            stream: 3,
            fin: true,
            headers: h(&[("x", "y")]),
        },
        Frame::Ping { id: 2 },
        Frame::Data {
            stream: 1,
            fin: true,
            data: Bytes::new(),
        },
        Frame::RstStream {
            stream: 3,
            status: rst::CANCEL,
        },
        Frame::GoAway {
            last_good: 3,
            status: goaway::OK,
        },
    ]
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut enc = Codec::new();
    let mut wire = BytesMut::new();
    for f in frames {
        enc.encode(f, &mut wire).unwrap();
    }
    wire
}

#[test]
fn a_sequence_round_trips_whole_and_byte_by_byte() {
    let frames = sequence();
    let wire = encode_all(&frames);
    let mut dec = Codec::new();
    let mut buf = wire.clone();
    let mut got = Vec::new();
    while let Some(f) = dec.decode(&mut buf).unwrap() {
        got.push(f);
    }
    assert_eq!(got, frames);
    assert!(buf.is_empty());
    // The same bytes arriving one at a time give the same frames.
    let mut dec = Codec::new();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in wire.iter() {
        buf.put_u8(*b);
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, frames);
}

#[test]
fn frames_have_the_protocols_bytes() {
    let mut c = Codec::new();
    let mut out = BytesMut::new();
    c.encode(&Frame::Ping { id: 1 }, &mut out).unwrap();
    assert_eq!(&out[..], [0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1]);
    out.clear();
    let data = Frame::Data {
        stream: 5,
        fin: true,
        data: Bytes::from_static(b"hi"),
    };
    c.encode(&data, &mut out).unwrap();
    assert_eq!(&out[..], [0, 0, 0, 5, 1, 0, 0, 2, b'h', b'i']);
    out.clear();
    let rst = Frame::RstStream {
        stream: 7,
        status: rst::REFUSED_STREAM,
    };
    c.encode(&rst, &mut out).unwrap();
    assert_eq!(
        &out[..],
        [0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 7, 0, 0, 0, 3]
    );
    // The reserved bit of a stream id is ignored on the way in.
    let mut wire = BytesMut::from(&[0x80, 3, 0, 9, 0, 0, 0, 8, 0x80, 0, 0, 1, 0, 0, 1, 0][..]);
    let f = Codec::new().decode(&mut wire).unwrap();
    assert_eq!(
        f,
        Some(Frame::WindowUpdate {
            stream: 1,
            delta: 256
        })
    );
}

#[test]
fn unknown_control_frames_are_skipped_and_other_versions_refused() {
    let mut wire = BytesMut::from(&[0x80, 3, 0, 42, 0, 0, 0, 2, 9, 9][..]);
    Codec::new()
        .encode(&Frame::Ping { id: 4 }, &mut wire)
        .unwrap();
    assert_eq!(
        Codec::new().decode(&mut wire).unwrap(),
        Some(Frame::Ping { id: 4 })
    );
    let mut v2 = BytesMut::from(&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1][..]);
    assert!(matches!(
        Codec::new().decode(&mut v2),
        Err(SpdyError::Version(2))
    ));
    let mut short = BytesMut::from(&[0x80, 3, 0, 3, 0, 0, 0, 4, 0, 0, 0, 1][..]);
    assert!(matches!(
        Codec::new().decode(&mut short),
        Err(SpdyError::Protocol(_))
    ));
    let mut lying = BytesMut::from(&[0x80, 3, 0, 4, 0, 0, 0, 4, 0, 0, 1, 0][..]);
    assert!(Codec::new().decode(&mut lying).is_err());
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Decodes until the input is used up or refused; returns the buffer's largest capacity.
fn chew(wire: &[u8]) -> usize {
    let mut dec = Codec::new();
    let mut buf = BytesMut::new();
    let mut biggest = 0;
    for chunk in wire.chunks(7) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return biggest.max(buf.capacity()),
            }
            biggest = biggest.max(buf.capacity());
        }
        biggest = biggest.max(buf.capacity());
    }
    biggest
}

#[test]
fn hostile_bytes_never_panic_nor_allocate_for_what_they_claim() {
    let mut rng = Rng(0x5eed_5eed_1234_5678);
    let valid = encode_all(&sequence());
    for round in 0..3000 {
        let wire: Vec<u8> = if round % 2 == 0 {
            // A valid connection with a few bytes flipped, cut or repeated.
            let mut w = valid.to_vec();
            for _ in 0..=rng.below(4) {
                let i = rng.below(w.len());
                match rng.below(3) {
                    0 => w[i] = rng.next() as u8,
                    1 => w.truncate(i.max(1)),
                    _ => {
                        let dup = w[i..].to_vec();
                        w.extend_from_slice(&dup[..dup.len().min(64)]);
                    }
                }
            }
            w
        } else {
            // Random bytes, often shaped as a control frame header.
            let mut w: Vec<u8> = (0..rng.below(200)).map(|_| rng.next() as u8).collect();
            if w.len() > 4 && rng.below(2) == 0 {
                w[0] = 0x80;
                w[1] = 3;
            }
            w
        };
        // Whatever a frame header claims, the buffer holds only what arrived.
        assert!(chew(&wire) <= 2 * wire.len() + 4096, "round {round}");
    }
}
