//! The Stella control plane: REST API, agent endpoint, storage and the domain modules
//! (agents, environments, targets, releases, deployments). The `stella` binary is both the
//! server (`serve`, `dev`) and the CLI that talks to the REST API.
//!
//! The control plane never links an executor plugin: agents run plugins, the plane only signs
//! and records work.

pub mod agents;
pub mod airgap;
pub mod api;
pub mod audit;
pub mod client;
pub mod components;
pub mod deployments;
pub mod drift;
pub mod duration;
pub mod environments;
pub mod error;
pub mod evidence;
pub mod gates;
pub mod group_commit;
pub mod handshakes;
pub mod hub;
pub mod keys;
pub mod metrics;
pub mod promotions;
pub mod quic;
pub mod relays;
pub mod releases;
pub mod replicas;
pub mod runs;
pub mod sealed_keys;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod targets;
pub mod tokens;
pub mod trust;
pub mod users;
