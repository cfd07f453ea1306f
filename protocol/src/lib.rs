//! Wire format of the vfio-user protocol (QEMU `docs/interop/vfio-user.rst`).
//!
//! This crate knows bytes, not devices: the 16-byte [`header::Header`], one typed
//! struct per command in [`messages`], capability negotiation in [`messages::version`],
//! framing with `SCM_RIGHTS` file descriptors in [`codec`], and a blocking [`client::Client`].
//! Byte order is host-native (little-endian on every supported host), as the spec says.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod codec;
pub mod error;
pub mod header;
pub mod messages;
pub mod wire;

pub use client::Client;
pub use codec::{Frame, FrameReader, Limits, ReadOutcome};
pub use error::ProtocolError;
pub use header::{Command, Header, MessageKind};
