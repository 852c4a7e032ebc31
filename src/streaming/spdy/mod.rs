//! SPDY/3.1 framing, written for berth: no maintained Rust crate speaks it, and kubelet and
//! kubectl still use it for exec, attach and port-forward. A `Codec` turns bytes into
//! `Frame`s and back (a `tokio_util` codec); `headers` compresses their header blocks.
//! Every length from the wire is checked before anything is allocated for it.

pub mod headers;

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use headers::Headers;

/// The protocol version in every control frame.
pub const VERSION: u16 = 3;
/// The largest frame berth takes: what the 24-bit length field allows.
pub const MAX_FRAME: usize = (1 << 24) - 1;

/// SYN_STREAM, SYN_REPLY, HEADERS and DATA: the last frame from this side on the stream.
pub const FLAG_FIN: u8 = 0x01;
/// SYN_STREAM: the receiver may not send on this stream.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// SETTINGS: forget persisted settings.
pub const FLAG_CLEAR_SETTINGS: u8 = 0x01;

/// SETTINGS id: the initial window of new streams.
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;
/// SETTINGS id: how many streams the sender lets the receiver open at once.
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u32 = 4;

/// RST_STREAM status codes.
pub mod rst {
    /// The peer broke the protocol on this stream.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// A frame for a stream that is not open.
    pub const INVALID_STREAM: u32 = 2;
    /// Refused before any processing.
    pub const REFUSED_STREAM: u32 = 3;
    /// The stream is no longer needed.
    pub const CANCEL: u32 = 5;
    /// A failure of this side.
    pub const INTERNAL_ERROR: u32 = 6;
    /// The peer sent more than its window.
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    /// A SYN_STREAM for a stream already open.
    pub const STREAM_IN_USE: u32 = 8;
    /// Data after the peer's FIN.
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    /// A frame larger than this side takes.
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status codes.
pub mod goaway {
    /// A normal end.
    pub const OK: u32 = 0;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// A failure of this side.
    pub const INTERNAL_ERROR: u32 = 2;
}

/// Why a connection's bytes could not be framed.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    /// The peer broke the protocol; the connection must end (with GOAWAY PROTOCOL_ERROR).
    #[error("SPDY protocol error: {0}")]
    Protocol(String),
    /// A control frame of another version.
    #[error("SPDY version {0} is not supported (only 3)")]
    Version(u16),
    /// A header block could not be read.
    #[error("{0}")]
    Header(#[from] headers::HeaderError),
    /// A frame longer than this side takes.
    #[error("SPDY frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLarge(usize),
    /// The transport failed.
    #[error("SPDY connection: {0}")]
    Io(#[from] std::io::Error),
}

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// PERSIST_VALUE (1) / PERSISTED (2).
    pub flags: u8,
    /// Which setting (24 bits).
    pub id: u32,
    /// Its value.
    pub value: u32,
}

/// A SPDY/3.1 frame. Stream ids are 31-bit; the codec masks the reserved bit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Bytes of a stream.
    Data {
        /// The stream.
        stream: u32,
        /// The sender's last frame on it.
        fin: bool,
        /// The bytes.
        data: Bytes,
    },
    /// A new stream.
    SynStream {
        /// Its id (odd from the client, even from the server).
        stream: u32,
        /// The stream it belongs to (server push), or 0.
        associated: u32,
        /// 0 (highest) to 7.
        priority: u8,
        /// FIN and UNIDIRECTIONAL.
        flags: u8,
        /// Its headers (for Kubernetes: `streamtype`, `port`, `requestid`).
        headers: Headers,
    },
    /// The answer to a SYN_STREAM.
    SynReply {
        /// The stream.
        stream: u32,
        /// The replier's last frame on it.
        fin: bool,
        /// Its headers.
        headers: Headers,
    },
    /// A stream ends abnormally.
    RstStream {
        /// The stream.
        stream: u32,
        /// Why (`rst::*`).
        status: u32,
    },
    /// Connection settings.
    Settings {
        /// CLEAR_SETTINGS.
        clear: bool,
        /// The entries.
        entries: Vec<Setting>,
    },
    /// A liveness check; the receiver echoes it.
    Ping {
        /// Odd from the client, even from the server.
        id: u32,
    },
    /// The connection ends; streams above `last_good` were not processed.
    GoAway {
        /// The last stream the sender processed.
        last_good: u32,
        /// Why (`goaway::*`).
        status: u32,
    },
    /// More headers of a stream.
    Headers {
        /// The stream.
        stream: u32,
        /// The sender's last frame on it.
        fin: bool,
        /// The headers.
        headers: Headers,
    },
    /// The sender may send `delta` more bytes on `stream` (0: the whole connection).
    WindowUpdate {
        /// The stream, or 0.
        stream: u32,
        /// 1 to 2^31-1.
        delta: u32,
    },
}

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// Frames from and to bytes, for one connection (it holds both header compression streams).
#[derive(Default)]
pub struct Codec {
    inflate: headers::Decoder,
    deflate: headers::Encoder,
}

impl Codec {
    /// A codec for a new connection.
    pub fn new() -> Codec {
        Codec::default()
    }

    /// Takes one frame off the front of `buf`: `Ok(None)` until a whole frame is there.
    /// Control frames of unknown types are skipped, as the protocol asks.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        loop {
            let Some(head) = buf.first_chunk::<8>() else {
                return Ok(None);
            };
            let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
            let flags = head[4];
            let control = head[0] & 0x80 != 0;
            let word = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            if control {
                let version = ((word >> 16) & 0x7fff) as u16;
                if version != VERSION {
                    return Err(SpdyError::Version(version));
                }
            }
            if buf.len() < 8 + len {
                // Nothing is reserved for what a length claims: the buffer grows only with
                // bytes that arrive, so a header announcing 16 MiB costs nothing by itself.
                return Ok(None);
            }
            buf.advance(8);
            let mut body = buf.split_to(len).freeze();
            if !control {
                return Ok(Some(Frame::Data {
                    stream: word & 0x7fff_ffff,
                    fin: flags & FLAG_FIN != 0,
                    data: body,
                }));
            }
            let kind = (word & 0xffff) as u16;
            if let Some(f) = self.control(kind, flags, &mut body)? {
                return Ok(Some(f));
            }
        }
    }

    fn control(&mut self, kind: u16, flags: u8, b: &mut Bytes) -> Result<Option<Frame>, SpdyError> {
        let need = |b: &Bytes, n: usize, what: &str| {
            if b.len() < n {
                Err(SpdyError::Protocol(format!(
                    "{what} frame of {} bytes is too short",
                    b.len()
                )))
            } else {
                Ok(())
            }
        };
        let fin = flags & FLAG_FIN != 0;
        let frame = match kind {
            SYN_STREAM => {
                need(b, 10, "SYN_STREAM")?;
                let stream = b.get_u32() & 0x7fff_ffff;
                let associated = b.get_u32() & 0x7fff_ffff;
                let priority = b.get_u8() >> 5;
                let _slot = b.get_u8();
                Frame::SynStream {
                    stream,
                    associated,
                    priority,
                    flags,
                    headers: self.inflate.decode(b)?,
                }
            }
            SYN_REPLY | HEADERS => {
                need(b, 4, "SYN_REPLY/HEADERS")?;
                let stream = b.get_u32() & 0x7fff_ffff;
                let headers = self.inflate.decode(b)?;
                if kind == SYN_REPLY {
                    Frame::SynReply {
                        stream,
                        fin,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream,
                        fin,
                        headers,
                    }
                }
            }
            RST_STREAM => {
                need(b, 8, "RST_STREAM")?;
                Frame::RstStream {
                    stream: b.get_u32() & 0x7fff_ffff,
                    status: b.get_u32(),
                }
            }
            SETTINGS => {
                need(b, 4, "SETTINGS")?;
                let n = b.get_u32() as usize;
                if n != b.len() / 8 || !b.len().is_multiple_of(8) {
                    return Err(SpdyError::Protocol(format!(
                        "SETTINGS says {n} entries but holds {} bytes",
                        b.len()
                    )));
                }
                let entries = (0..n)
                    .map(|_| {
                        let w = b.get_u32();
                        Setting {
                            flags: (w >> 24) as u8,
                            id: w & 0x00ff_ffff,
                            value: b.get_u32(),
                        }
                    })
                    .collect();
                Frame::Settings {
                    clear: flags & FLAG_CLEAR_SETTINGS != 0,
                    entries,
                }
            }
            PING => {
                need(b, 4, "PING")?;
                Frame::Ping { id: b.get_u32() }
            }
            GOAWAY => {
                // SPDY/3 added the status; accept a SPDY/2-style short one as OK.
                need(b, 4, "GOAWAY")?;
                let last_good = b.get_u32() & 0x7fff_ffff;
                let status = if b.len() >= 4 {
                    b.get_u32()
                } else {
                    goaway::OK
                };
                Frame::GoAway { last_good, status }
            }
            WINDOW_UPDATE => {
                need(b, 8, "WINDOW_UPDATE")?;
                Frame::WindowUpdate {
                    stream: b.get_u32() & 0x7fff_ffff,
                    delta: b.get_u32() & 0x7fff_ffff,
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(frame))
    }

    /// Appends `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), SpdyError> {
        let mut body = Vec::new();
        let (kind, flags) = match frame {
            Frame::Data { stream, fin, data } => {
                if data.len() > MAX_FRAME {
                    return Err(SpdyError::TooLarge(data.len()));
                }
                out.reserve(8 + data.len());
                out.put_u32(stream & 0x7fff_ffff);
                out.put_u32(u32::from(u8::from(*fin)) << 24 | data.len() as u32);
                out.put_slice(data);
                return Ok(());
            }
            Frame::SynStream {
                stream,
                associated,
                priority,
                flags,
                headers,
            } => {
                body.put_u32(stream & 0x7fff_ffff);
                body.put_u32(associated & 0x7fff_ffff);
                body.put_u8((priority & 7) << 5);
                body.put_u8(0);
                self.deflate.encode(headers, &mut body);
                (SYN_STREAM, *flags)
            }
            Frame::SynReply {
                stream,
                fin,
                headers,
            }
            | Frame::Headers {
                stream,
                fin,
                headers,
            } => {
                body.put_u32(stream & 0x7fff_ffff);
                self.deflate.encode(headers, &mut body);
                let kind = if matches!(frame, Frame::SynReply { .. }) {
                    SYN_REPLY
                } else {
                    HEADERS
                };
                (kind, u8::from(*fin))
            }
            Frame::RstStream { stream, status } => {
                body.put_u32(stream & 0x7fff_ffff);
                body.put_u32(*status);
                (RST_STREAM, 0)
            }
            Frame::Settings { clear, entries } => {
                body.put_u32(entries.len() as u32);
                for e in entries {
                    body.put_u32(u32::from(e.flags) << 24 | (e.id & 0x00ff_ffff));
                    body.put_u32(e.value);
                }
                (SETTINGS, u8::from(*clear))
            }
            Frame::Ping { id } => {
                body.put_u32(*id);
                (PING, 0)
            }
            Frame::GoAway { last_good, status } => {
                body.put_u32(last_good & 0x7fff_ffff);
                body.put_u32(*status);
                (GOAWAY, 0)
            }
            Frame::WindowUpdate { stream, delta } => {
                body.put_u32(stream & 0x7fff_ffff);
                body.put_u32(delta & 0x7fff_ffff);
                (WINDOW_UPDATE, 0)
            }
        };
        if body.len() > MAX_FRAME {
            return Err(SpdyError::TooLarge(body.len()));
        }
        out.reserve(8 + body.len());
        out.put_u16(0x8000 | VERSION);
        out.put_u16(kind);
        out.put_u32(u32::from(flags) << 24 | body.len() as u32);
        out.put_slice(&body);
        Ok(())
    }
}

impl tokio_util::codec::Decoder for Codec {
    type Item = Frame;
    type Error = SpdyError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        Codec::decode(self, src)
    }
}

impl tokio_util::codec::Encoder<Frame> for Codec {
    type Error = SpdyError;

    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), SpdyError> {
        Codec::encode(self, &item, dst)
    }
}

#[cfg(test)]
mod tests;
