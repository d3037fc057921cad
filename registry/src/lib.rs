//! OCI Distribution v2 client: tag listing, tag to digest resolution, version rules.
