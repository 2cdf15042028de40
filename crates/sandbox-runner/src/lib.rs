//! The sandbox runner (DESIGN.md §4 "Execution windows"): agent containers with hard limits.
//!
//! [`sandbox`] runs one execution's container through the Docker API: the workspace read-write
//! at `/workspace` and nothing else of the host, a read-only root filesystem, a size-capped
//! `/tmp`, a non-root user, cpu and memory limits without swap, a pids limit, no capabilities,
//! no privilege escalation, Docker's default seccomp, bounded logs; killed at the deadline and
//! always removed, with the outcome reported.

pub mod sandbox;
