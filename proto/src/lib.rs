//! Generated types of the agent protocol (`proto/agent.proto`).
//!
//! This crate holds the wire schema only: no behaviour, no dependency on other Stella crates.
//! Besides the protobuf session it holds the other formats that cross between plane and agents:
//! [`framing`] (the session over QUIC) and [`airgap`] (the files carried to and from relays).

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("stella.agent.v1");
}

pub use v1::*;

pub mod airgap;
pub mod framing;
