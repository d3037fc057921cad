//! nomad executor (in progress).
