//! Generated types of the agent protocol (`proto/agent.proto`).
//!
//! This crate holds the wire schema only: no behaviour, no dependency on other Stella crates.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("stella.agent.v1");
}

pub use v1::*;

pub mod framing;
