//! ecs executor (in progress).
