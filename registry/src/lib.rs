//! OCI Distribution v2 client: tag listing, tag to digest resolution, version rules.
//!
//! This is where tags end: a component's versions are its registry tags resolved once, here,
//! to manifest digests; everything downstream of a release uses those digests only.
//!
//! ```no_run
//! # async fn demo() -> Result<(), stella_registry::RegistryError> {
//! use stella_registry::{Credentials, RegistryClient, RegistryConfig, VersionRules};
//!
//! let client = RegistryClient::new(
//!     RegistryConfig::new("https://registry.example.com").with_credentials(Credentials::Basic {
//!         username: "ci".into(),
//!         password: "…".into(),
//!     }),
//! )?;
//! let report = client.sync("demo/app", &VersionRules::semver()).await?;
//! for v in &report.versions {
//!     println!("{} {} {}", v.tag, v.digest, v.channel);
//! }
//! # Ok(()) }
//! ```

mod auth;
mod client;
mod config;
mod error;
mod reference;
mod versions;

pub use client::{
    MANIFEST_MEDIA_TYPES, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST, RegistryClient, ResolvedTag,
};
pub use config::{Credentials, DEFAULT_TAGS_PAGE_SIZE, DEFAULT_TIMEOUT, RegistryConfig};
pub use error::RegistryError;
pub use reference::{is_sha256_digest, validate_repository, validate_tag};
pub use versions::{
    ChannelMatch, ChannelRule, ComponentVersion, DEFAULT_CHANNEL, DEFAULT_TAG_PATTERN, SkippedTag,
    SyncReport, VersionRules,
};
