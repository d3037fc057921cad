//! The agent session over QUIC: the same `AgentMessage`/`PlaneMessage` as the gRPC stream, each
//! one a protobuf message behind a 4-byte big-endian length, on one bidirectional QUIC stream.
//!
//! Sans I/O: [`encode`] produces a frame, [`FrameDecoder`] takes bytes as they arrive (in any
//! split) and yields whole messages, so both ends and the fuzzer share one decoder.

use prost::Message;

/// ALPN protocol of the agent session over QUIC (TLS 1.3 inside QUIC requires one).
pub const QUIC_ALPN: &[u8] = b"stella-agent/1";

/// Largest message either side accepts: the limit tonic applies to the gRPC stream by default,
/// so a message that passes on one transport passes on the other.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// QUIC application close codes of the agent session.
pub mod close {
    /// The session ended normally (drain, shutdown, replaced by a newer session).
    pub const DONE: u32 = 0;
    /// The plane refuses this identity (unknown, revoked, certificate not the enrolled one); the
    /// close reason says why. Retrying fast cannot help.
    pub const REFUSED: u32 = 1;
    /// The peer sent something that is not the protocol (bad frame, undecodable message).
    pub const PROTOCOL: u32 = 2;
    /// The plane failed internally while setting the session up; retry later.
    pub const INTERNAL: u32 = 3;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("stream ended inside a frame ({0} bytes pending)")]
    Truncated(usize),
}

/// One frame: the length of the encoded message (u32, big-endian) and the message.
pub fn encode<M: Message>(message: &M) -> Result<Vec<u8>, FrameError> {
    let len = message.encoded_len();
    if len > MAX_MESSAGE_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    message
        .encode(&mut out)
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    Ok(out)
}

/// Reassembles frames from bytes received in arbitrary pieces.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` when more bytes are needed. A length over the limit
    /// is refused before any of its body is buffered.
    pub fn next_message<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        let Some(header) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let message =
            M::decode(&self.buf[4..4 + len]).map_err(|e| FrameError::Decode(e.to_string()))?;
        self.buf.drain(..4 + len);
        Ok(Some(message))
    }

    /// Called at the end of the stream: an error if a frame was cut off.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_message::Body;
    use crate::{AgentMessage, Heartbeat, JobAccepted};

    fn heartbeat(at: i64) -> AgentMessage {
        AgentMessage {
            body: Some(Body::Heartbeat(Heartbeat {
                sent_at_unix_ms: at,
            })),
        }
    }

    #[test]
    fn messages_split_at_every_byte_come_out_whole_and_in_order() {
        let accepted = AgentMessage {
            body: Some(Body::Accepted(JobAccepted {
                job_id: "job_1".to_string(),
            })),
        };
        let mut wire = encode(&heartbeat(42)).unwrap();
        wire.extend(encode(&accepted).unwrap());
        wire.extend(encode(&AgentMessage::default()).unwrap());
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        for byte in &wire {
            decoder.push(std::slice::from_ref(byte));
            while let Some(m) = decoder.next_message::<AgentMessage>().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, vec![heartbeat(42), accepted, AgentMessage::default()]);
        decoder.finish().unwrap();
    }

    #[test]
    fn an_oversized_length_is_refused_before_its_body_arrives() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&((MAX_MESSAGE_BYTES as u32) + 1).to_be_bytes());
        assert_eq!(
            decoder.next_message::<AgentMessage>(),
            Err(FrameError::TooLarge(MAX_MESSAGE_BYTES + 1))
        );
    }

    #[test]
    fn garbage_is_a_decode_error_and_a_cut_frame_is_truncated() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&[0, 0, 0, 2, 0xff, 0xff]);
        assert!(matches!(
            decoder.next_message::<AgentMessage>(),
            Err(FrameError::Decode(_))
        ));
        let mut cut = FrameDecoder::new();
        cut.push(&encode(&heartbeat(7)).unwrap()[..5]);
        assert_eq!(cut.next_message::<AgentMessage>(), Ok(None));
        assert!(matches!(cut.finish(), Err(FrameError::Truncated(5))));
    }
}
