//! Syntropism's wire contracts.
//!
//! This crate is the only place that knows subject names, header names, error codes and message
//! types. It also carries the one generic, typed request/reply layer over NATS ([`rpc`]), so no
//! service writes decode → handle → encode boilerplate again.

pub mod attention;
pub mod economy;
pub mod error;
pub mod events;
pub mod headers;
pub mod ids;
pub mod market;
pub mod orchestrator;
pub mod rpc;
pub mod sandbox;
pub mod scheduler;
pub mod social;
pub mod subjects;
pub mod time;
pub mod trace;

/// Generated protobuf messages (`proto/syntropism/v1/*.proto`).
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    missing_debug_implementations
)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/syntropism.v1.rs"));
}

pub use error::{ErrorCode, RpcError};
pub use ids::{AgentId, Credits, HoldId, IdError, IdempotencyId};
pub use rpc::{Endpoint, Method, RequestContext, RpcClient, RpcServer, Scope};

/// Every message and enum of `proto/` as an encoded `google.protobuf.FileDescriptorSet`
/// (compiled with protox at build time). The Python SDK builds its classes from a copy of it
/// (`sdk/python/syntropism/descriptor.bin`, kept equal by a test; `just sdk-descriptor`).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/file_descriptor_set.bin"));
