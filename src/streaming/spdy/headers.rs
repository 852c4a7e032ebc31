//! SPDY/3 name/value header blocks: the block format (a count, then length-prefixed names and
//! values) and its compression — one zlib stream per direction for the whole connection,
//! primed with the protocol's dictionary, each block ending in a sync flush.

use std::sync::LazyLock;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// A header block that cannot be read: the connection's compression state is then unknown
/// and the connection must end.
#[derive(Debug, thiserror::Error)]
#[error("SPDY header block: {0}")]
pub struct HeaderError(pub String);

/// A block's header pairs in their order. Names are lowercase on the wire; a value may hold
/// several values separated by NUL, kept as sent.
pub type Headers = Vec<(String, String)>;

/// The largest header block berth inflates (a stream's headers are a few short pairs; this
/// bounds what a hostile peer can make us allocate).
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// The zlib dictionary of SPDY/3 (draft-mbelshe-httpbis-spdy-00, 2.6.10.1): the listed
/// words, each after its length as a 32-bit big-endian number, then the listed tail.
static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
        "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
        "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error",
        "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct ",
        "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,",
        "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,",
        "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8",
        "charset=iso-8859-1,utf-,*,enq=0.",
    );
    let mut d = Vec::with_capacity(1423);
    for w in WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(TAIL.as_bytes());
    d
});

/// The sending side's compressor.
pub struct Encoder {
    z: Compress,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    /// A compressor primed with the dictionary.
    pub fn new() -> Encoder {
        let mut z = Compress::new(Compression::default(), true);
        // Only fails on a compressor that has already started: this one has not.
        z.set_dictionary(&DICTIONARY)
            .expect("priming a new zlib stream");
        Encoder { z }
    }

    /// `headers` as a compressed block, appended to `out`.
    pub fn encode(&mut self, headers: &[(String, String)], out: &mut Vec<u8>) {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (k, v) in headers {
            for s in [k.as_bytes(), v.as_bytes()] {
                raw.extend_from_slice(&(s.len() as u32).to_be_bytes());
                raw.extend_from_slice(s);
            }
        }
        let mut input = &raw[..];
        loop {
            out.reserve(input.len() + 64);
            let before = self.z.total_in();
            // Compressing into a Vec with room cannot fail; the status says whether it needs
            // more room, which the loop gives.
            self.z
                .compress_vec(input, out, FlushCompress::Sync)
                .expect("compressing a header block");
            input = &input[(self.z.total_in() - before) as usize..];
            // A sync flush is complete when all input is taken and the output had room left.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
    }
}

/// The receiving side's decompressor.
pub struct Decoder {
    z: Decompress,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decompressor that takes the dictionary when the stream asks for it.
    pub fn new() -> Decoder {
        Decoder {
            z: Decompress::new(true),
        }
    }

    /// The pairs of one compressed block. After an error the stream's state is unknown: the
    /// connection must end (SPDY has no way to resynchronise).
    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, HeaderError> {
        let raw = self.inflate(block)?;
        parse_block(&raw)
    }

    fn inflate(&mut self, block: &[u8]) -> Result<Vec<u8>, HeaderError> {
        let too_big = || HeaderError(format!("inflates beyond {MAX_HEADER_BLOCK} bytes"));
        let mut out = Vec::with_capacity(512);
        let mut input = block;
        loop {
            if out.len() == out.capacity() {
                if out.len() > MAX_HEADER_BLOCK {
                    return Err(too_big());
                }
                out.reserve(out.len());
            }
            let (in0, out0) = (self.z.total_in(), out.len());
            let status = match self
                .z
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
            {
                Ok(s) => s,
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(&DICTIONARY)
                        .map_err(|e| HeaderError(format!("dictionary: {e}")))?;
                    Status::Ok
                }
                Err(e) => return Err(HeaderError(e.to_string())),
            };
            input = &input[(self.z.total_in() - in0) as usize..];
            if out.len() > MAX_HEADER_BLOCK {
                return Err(too_big());
            }
            let room_left = out.len() < out.capacity();
            if status == Status::StreamEnd || (input.is_empty() && room_left) {
                return Ok(out);
            }
            // No progress with room to write and input left: the stream is broken.
            if room_left && self.z.total_in() == in0 && out.len() == out0 && status != Status::Ok {
                return Err(HeaderError("truncated or corrupt".into()));
            }
        }
    }
}

/// Pairs of an inflated block; every length is checked against what is left before anything
/// is allocated for it.
fn parse_block(raw: &[u8]) -> Result<Headers, HeaderError> {
    let bad = |what: &str| HeaderError(what.to_string());
    let mut rest = raw;
    let take_u32 = |rest: &mut &[u8]| -> Result<usize, HeaderError> {
        let (n, r) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("truncated"))?;
        *rest = r;
        Ok(u32::from_be_bytes(*n) as usize)
    };
    let count = take_u32(&mut rest)?;
    // Each pair takes at least 8 bytes of lengths: a larger count is a lie.
    if count > rest.len() / 8 {
        return Err(bad("more pairs than bytes"));
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let mut pair = [String::new(), String::new()];
        for (i, s) in pair.iter_mut().enumerate() {
            let n = take_u32(&mut rest)?;
            if n > rest.len() {
                return Err(bad("a length beyond the block"));
            }
            if i == 0 && n == 0 {
                return Err(bad("an empty name"));
            }
            let (bytes, r) = rest.split_at(n);
            rest = r;
            *s = String::from_utf8(bytes.to_vec())
                .map_err(|_| bad("a name or value is not UTF-8"))?;
        }
        let [k, v] = pair;
        headers.push((k, v));
    }
    Ok(headers)
}

/// The value of header `name` (case-insensitive), if present.
pub fn get<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_the_protocols() {
        // Its length and the Adler-32 id a zlib stream primed with it names.
        assert_eq!(DICTIONARY.len(), 1423);
        let mut z = Compress::new(Compression::default(), true);
        assert_eq!(z.set_dictionary(&DICTIONARY).unwrap(), 0xe3c6_a7c2);
    }

    #[test]
    fn blocks_round_trip_through_one_stream_each_way() {
        let mut enc = Encoder::new();
        let mut dec = Decoder::new();
        let blocks: Vec<Headers> = vec![
            vec![("streamtype".into(), "error".into())],
            vec![
                ("streamtype".into(), "stdout".into()),
                ("port".into(), "8080".into()),
                ("requestid".into(), "0".into()),
            ],
            vec![],
            vec![
                ("x".into(), "a\0b".into()),
                ("big".into(), "v".repeat(5000)),
            ],
        ];
        for b in &blocks {
            let mut wire = Vec::new();
            enc.encode(b, &mut wire);
            assert_eq!(&dec.decode(&wire).unwrap(), b);
        }
        assert_eq!(get(&blocks[1], "Port"), Some("8080"));
    }

    #[test]
    fn hostile_blocks_are_refused_without_big_allocations() {
        for raw in [
            vec![0xff, 0xff, 0xff, 0xff],                   // 4 billion pairs
            vec![0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff, b'a'], // a 2 GiB name
            vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],       // an empty name
            vec![0, 0, 0, 1, 0, 0, 0, 1, 0xff, 0, 0, 0, 0], // not UTF-8
            vec![0, 0],
        ] {
            assert!(parse_block(&raw).is_err(), "{raw:?}");
        }
        // A block that inflates past the bound.
        let mut enc = Encoder::new();
        let mut wire = Vec::new();
        enc.encode(&[("a".into(), "z".repeat(MAX_HEADER_BLOCK * 2))], &mut wire);
        assert!(Decoder::new().decode(&wire).is_err());
        // Garbage that is not zlib at all.
        assert!(Decoder::new().decode(&[1, 2, 3, 4, 5, 6]).is_err());
    }
}
