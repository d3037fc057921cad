//! winrm executor (in progress).
