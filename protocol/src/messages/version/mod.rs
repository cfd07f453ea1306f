//! VFIO_USER_VERSION and capability negotiation (spec "VFIO_USER_VERSION").
//!
//! The payload is `u16 major, u16 minor` followed by a NUL-terminated JSON object
//! `{"capabilities": {...}}`. The server answers with a subset of the capability *keys* the
//! client proposed and — because QEMU's reply buffer is exactly the size of its request — never
//! a longer message than the request. `max_msg_fds` and `max_data_xfer_size` are each side's own
//! receive limit, not a shared minimum: see [`negotiate()`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::ProtocolError;
use crate::wire::{put, WireReader};

/// The only major version defined by the spec.
pub const PROTOCOL_MAJOR: u16 = 0;
/// The minor version this implementation speaks.
pub const PROTOCOL_MINOR: u16 = 0;

/// Default `max_msg_fds` when the capability is absent.
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// Default `max_data_xfer_size` when absent (1 MiB).
pub const DEFAULT_MAX_DATA_XFER_SIZE: u64 = 1 << 20;
/// QEMU's upper bound for `max_data_xfer_size` (`VFIO_USER_MAX_MAX_XFER`, 64 MiB).
pub const MAX_MAX_DATA_XFER_SIZE: u64 = 64 << 20;
/// Default and maximum `max_dma_maps`.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// Default `pgsizes` (4 KiB).
pub const DEFAULT_PGSIZES: u64 = 4096;

/// Fixed part of the VERSION payload.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct VersionHeader {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
}

/// The `migration` capability object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCaps {
    /// Page size for dirty bitmaps.
    pub pgsize: u64,
    /// Largest dirty bitmap the client accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bitmap_size: Option<u64>,
}

/// The `twin_socket` capability object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinSocketCaps {
    /// Client: it supports a second socket for server→client requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported: Option<bool>,
    /// Server: index of the twin socket in the reply's fd array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_index: Option<u32>,
}

/// The `capabilities` object. Absent keys take the spec defaults (see [`Negotiated`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Maximum fds per message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msg_fds: Option<u32>,
    /// Maximum bytes in one data transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_data_xfer_size: Option<u64>,
    /// Supported page sizes (bitmask of sizes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsizes: Option<u64>,
    /// Maximum concurrent DMA mappings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_dma_maps: Option<u32>,
    /// Migration (dirty-page) parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationCaps>,
    /// REGION_WRITE_MULTI support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_multiple: Option<bool>,
    /// Twin-socket mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_socket: Option<TwinSocketCaps>,
    /// Keys this implementation does not know (QEMU only warns about them).
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct CapsDocument {
    #[serde(default)]
    capabilities: Capabilities,
}

/// A VERSION message (request or reply): version plus capabilities.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VersionMessage {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// Capabilities; `None` when the JSON part was empty.
    pub caps: Option<Capabilities>,
}

impl VersionMessage {
    /// Decode a VERSION payload. The JSON must be NUL-terminated UTF-8 (spec "VFIO_USER_VERSION").
    pub fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = WireReader::new(payload, "VERSION");
        let h = r.read::<VersionHeader>()?;
        let json = r.rest();
        let caps = if json.is_empty() {
            None
        } else {
            let Some((&0, body)) = json.split_last() else {
                return Err(ProtocolError::invalid(
                    "version data",
                    "capabilities JSON is not NUL-terminated",
                ));
            };
            if body.contains(&0) {
                return Err(ProtocolError::invalid(
                    "version data",
                    "embedded NUL in capabilities JSON",
                ));
            }
            let doc: CapsDocument =
                serde_json::from_slice(body).map_err(ProtocolError::InvalidJson)?;
            Some(doc.capabilities)
        };
        Ok(Self {
            major: h.major,
            minor: h.minor,
            caps,
        })
    }

    /// Encode as a payload (JSON compact, NUL-terminated).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put(
            &mut out,
            &VersionHeader {
                major: self.major,
                minor: self.minor,
            },
        );
        if let Some(caps) = &self.caps {
            let doc = CapsDocument {
                capabilities: caps.clone(),
            };
            // Serializing plain maps of numbers and bools cannot fail.
            out.extend_from_slice(serde_json::to_string(&doc).unwrap_or_default().as_bytes());
            out.push(0);
        }
        out
    }

    /// The client's proposal as QEMU 11.1 sends it (`hw/vfio-user/proxy.c caps_json`).
    pub fn qemu_proposal() -> Self {
        Self {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            caps: Some(Capabilities {
                max_msg_fds: Some(16),
                max_data_xfer_size: Some(DEFAULT_MAX_DATA_XFER_SIZE),
                pgsizes: Some(4096),
                max_dma_maps: Some(DEFAULT_MAX_DMA_MAPS),
                migration: Some(MigrationCaps {
                    pgsize: 4096,
                    max_bitmap_size: Some(256 << 20),
                }),
                write_multiple: Some(true),
                ..Capabilities::default()
            }),
        }
    }
}

mod negotiate;
#[cfg(test)]
mod tests;

pub use negotiate::{accept_reply, negotiate, Negotiated, ServerOffer};
