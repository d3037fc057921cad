//! Protocol frames of the agent session as they come off the wire: `prost` decoding of
//! `AgentMessage` (what the plane reads) and `PlaneMessage` (what the agent reads). Never panics;
//! whatever decodes re-encodes to bytes that decode to an equal message, of the announced length,
//! and re-encoding that is a fixed point.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use stella_proto::{AgentMessage, PlaneMessage};

fn roundtrip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let Ok(first) = M::decode(data) else {
        return;
    };
    let encoded = first.encode_to_vec();
    assert_eq!(encoded.len(), first.encoded_len());
    let second = M::decode(encoded.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(first, second);
    // Length-delimited framing (as on a stream) carries the same message.
    let delimited = first.encode_length_delimited_to_vec();
    let third = M::decode_length_delimited(delimited.as_slice()).expect("delimited decodes");
    assert_eq!(first, third);
    // Merging the encoding into an empty message gives the message.
    let mut merged = M::default();
    merged.merge(encoded.as_slice()).expect("merge decodes");
    assert_eq!(first, merged);
}

fuzz_target!(|data: &[u8]| {
    roundtrip::<AgentMessage>(data);
    roundtrip::<PlaneMessage>(data);
});
