//! The monitor's wire format (proto/monitor.proto) and its framing: a 4-byte big-endian length,
//! then the encoded message.

#![allow(missing_docs)]

include!(concat!(env!("OUT_DIR"), "/berth.monitor.rs"));

/// Messages larger than this are refused (exec output is capped well below).
pub const MAX_FRAME: usize = 64 << 20;

/// Appends `msg` to `buf` as one frame.
pub fn frame(msg: &impl prost::Message, buf: &mut Vec<u8>) {
    let len = msg.encoded_len();
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(buf).expect("a Vec grows as needed");
}

/// Takes one complete frame off the front of `buf`, if there is one.
pub fn unframe<M: prost::Message + Default>(buf: &mut Vec<u8>) -> Result<Option<M>, String> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(format!("frame of {len} bytes is too large"));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let msg = M::decode(&buf[4..4 + len]).map_err(|e| format!("malformed message: {e}"));
    buf.drain(..4 + len);
    msg.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_and_wait_for_whole_messages() {
        let req = Request {
            id: 7,
            op: Some(request::Op::Start(Start {
                container_id: "abc".into(),
            })),
        };
        let mut buf = Vec::new();
        frame(&req, &mut buf);
        frame(&req, &mut buf);
        let mut partial = buf[..5].to_vec();
        assert!(unframe::<Request>(&mut partial).unwrap().is_none());
        assert_eq!(unframe::<Request>(&mut buf).unwrap(), Some(req.clone()));
        assert_eq!(unframe::<Request>(&mut buf).unwrap(), Some(req));
        assert!(buf.is_empty());
    }
}
