//! VFIO_USER_VERSION and capability negotiation (spec "VFIO_USER_VERSION").
//!
//! The payload is `u16 major, u16 minor` followed by a NUL-terminated JSON object
//! `{"capabilities": {...}}`. The server answers with a subset of what the client proposed,
//! never a larger value, and — because QEMU's reply buffer is exactly the size of its request —
//! never a longer message than the request.

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

/// What a server is able to offer; negotiation takes the intersection with the proposal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerOffer {
    /// Most fds the server accepts in one message.
    pub max_msg_fds: u32,
    /// Largest data transfer the server accepts.
    pub max_data_xfer_size: u64,
    /// Page sizes the server supports.
    pub pgsizes: u64,
    /// Most DMA mappings the server keeps.
    pub max_dma_maps: u32,
    /// Dirty-page size supported, if migration is supported at all.
    pub migration_pgsize: Option<u64>,
    /// Whether REGION_WRITE_MULTI is implemented.
    pub write_multiple: bool,
    /// Whether twin-socket mode is implemented.
    pub twin_socket: bool,
}

impl Default for ServerOffer {
    fn default() -> Self {
        Self {
            max_msg_fds: 16,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            pgsizes: DEFAULT_PGSIZES,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            migration_pgsize: Some(4096),
            write_multiple: true,
            twin_socket: false,
        }
    }
}

/// Effective session parameters after negotiation, defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    /// Minor version in force.
    pub minor: u16,
    /// Most fds in one message, either direction.
    pub max_msg_fds: u32,
    /// Largest data transfer.
    pub max_data_xfer_size: u64,
    /// Page sizes.
    pub pgsizes: u64,
    /// Most DMA mappings.
    pub max_dma_maps: u32,
    /// Migration parameters, when both sides agreed on them.
    pub migration: Option<MigrationCaps>,
    /// REGION_WRITE_MULTI enabled.
    pub write_multiple: bool,
    /// Twin-socket mode enabled.
    pub twin_socket: bool,
}

impl Default for Negotiated {
    fn default() -> Self {
        Self {
            minor: PROTOCOL_MINOR,
            max_msg_fds: DEFAULT_MAX_MSG_FDS,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            pgsizes: DEFAULT_PGSIZES,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            migration: None,
            write_multiple: false,
            twin_socket: false,
        }
    }
}

fn validate_proposal(c: &Capabilities) -> Result<(), ProtocolError> {
    if let Some(x) = c.max_data_xfer_size {
        if x == 0 {
            return Err(ProtocolError::invalid("max_data_xfer_size", "zero"));
        }
    }
    if let Some(p) = c.pgsizes {
        if p == 0 || p % 4096 != 0 {
            return Err(ProtocolError::invalid(
                "pgsizes",
                format!("{p:#x} is not a multiple of 4 KiB"),
            ));
        }
    }
    if let Some(m) = &c.migration {
        if !m.pgsize.is_power_of_two() {
            return Err(ProtocolError::invalid(
                "migration.pgsize",
                format!("{} is not a power of two", m.pgsize),
            ));
        }
    }
    Ok(())
}

/// Server side: answer a client's proposal. Returns the reply and the session parameters.
///
/// Only capabilities the client proposed appear in the reply, each no larger than proposed;
/// `twin_socket` only when the client set `supported`. The encoded reply is kept no longer
/// than `request_len` (QEMU reads the reply into a buffer of its request's size) by dropping
/// optional keys, which then take their defaults on both sides.
pub fn negotiate(
    proposal: &VersionMessage,
    offer: &ServerOffer,
    request_len: usize,
) -> Result<(VersionMessage, Negotiated), ProtocolError> {
    if proposal.major != PROTOCOL_MAJOR {
        return Err(ProtocolError::UnsupportedVersion {
            major: proposal.major,
            minor: proposal.minor,
        });
    }
    #[allow(clippy::unnecessary_min_or_max)] // PROTOCOL_MINOR may grow
    let minor = proposal.minor.min(PROTOCOL_MINOR);
    let client = proposal.caps.clone().unwrap_or_default();
    validate_proposal(&client)?;
    if !client.unknown.is_empty() {
        tracing::debug!(keys = ?client.unknown.keys().collect::<Vec<_>>(), "ignoring unknown capabilities");
    }
    let mut reply = Capabilities {
        max_msg_fds: client.max_msg_fds.map(|v| v.min(offer.max_msg_fds)),
        max_data_xfer_size: client
            .max_data_xfer_size
            .map(|v| v.min(offer.max_data_xfer_size)),
        pgsizes: client.pgsizes.and_then(|v| {
            let common = v & offer.pgsizes;
            (common != 0).then_some(common)
        }),
        max_dma_maps: client.max_dma_maps.map(|v| v.min(offer.max_dma_maps)),
        migration: match (&client.migration, offer.migration_pgsize) {
            (Some(m), Some(pg)) if m.pgsize == pg => Some(MigrationCaps {
                pgsize: pg,
                max_bitmap_size: m.max_bitmap_size,
            }),
            _ => None,
        },
        write_multiple: match client.write_multiple {
            Some(true) if offer.write_multiple => Some(true),
            _ => None,
        },
        twin_socket: None,
        unknown: BTreeMap::new(),
    };
    if client.pgsizes.is_some() && reply.pgsizes.is_none() {
        return Err(ProtocolError::invalid("pgsizes", "no page size in common"));
    }
    // Twin sockets are never enabled unless offered (and supported here).
    if offer.twin_socket
        && client
            .twin_socket
            .as_ref()
            .and_then(|t| t.supported)
            .unwrap_or(false)
    {
        reply.twin_socket = Some(TwinSocketCaps {
            supported: None,
            fd_index: Some(0),
        });
    }
    let mut msg = VersionMessage {
        major: PROTOCOL_MAJOR,
        minor,
        caps: Some(reply),
    };
    // Keep the reply within the request's size: drop least important keys first.
    let droppers: [fn(&mut Capabilities); 5] = [
        |c| c.write_multiple = None,
        |c| {
            if let Some(m) = &mut c.migration {
                m.max_bitmap_size = None
            }
        },
        |c| c.migration = None,
        |c| c.pgsizes = None,
        |c| c.max_dma_maps = None,
    ];
    for drop in droppers {
        if msg.encode().len() <= request_len {
            break;
        }
        if let Some(c) = &mut msg.caps {
            drop(c);
        }
    }
    if msg.encode().len() > request_len {
        msg.caps = None;
    }
    let negotiated = Negotiated::from_caps(minor, msg.caps.as_ref());
    Ok((msg, negotiated))
}

impl Negotiated {
    /// Effective parameters from a reply's capabilities, spec defaults for absent keys.
    pub fn from_caps(minor: u16, caps: Option<&Capabilities>) -> Self {
        let d = Negotiated::default();
        let Some(c) = caps else {
            return Negotiated { minor, ..d };
        };
        Negotiated {
            minor,
            max_msg_fds: c.max_msg_fds.unwrap_or(d.max_msg_fds),
            max_data_xfer_size: c.max_data_xfer_size.unwrap_or(d.max_data_xfer_size),
            pgsizes: c.pgsizes.unwrap_or(d.pgsizes),
            max_dma_maps: c.max_dma_maps.unwrap_or(d.max_dma_maps),
            migration: c.migration.clone(),
            write_multiple: c.write_multiple.unwrap_or(false),
            twin_socket: c.twin_socket.as_ref().and_then(|t| t.fd_index).is_some(),
        }
    }
}

/// Client side: check the server's reply against the proposal (QEMU's rules in
/// `proxy.c vfio_user_validate_version`): same major, minor not above the proposal,
/// values no larger than proposed, no capability that was not proposed.
pub fn accept_reply(
    proposal: &VersionMessage,
    reply: &VersionMessage,
) -> Result<Negotiated, ProtocolError> {
    if reply.major != proposal.major {
        return Err(ProtocolError::UnsupportedVersion {
            major: reply.major,
            minor: reply.minor,
        });
    }
    if reply.minor > proposal.minor {
        return Err(ProtocolError::invalid(
            "minor",
            format!(
                "server minor {} above proposed {}",
                reply.minor, proposal.minor
            ),
        ));
    }
    let ours = proposal.caps.clone().unwrap_or_default();
    if let Some(c) = &reply.caps {
        fn le<T: PartialOrd + Copy + core::fmt::Debug>(
            field: &'static str,
            got: Option<T>,
            proposed: Option<T>,
        ) -> Result<(), ProtocolError> {
            match (got, proposed) {
                (Some(g), Some(p)) if g > p => Err(ProtocolError::invalid(
                    field,
                    format!("server chose {g:?}, above proposed {p:?}"),
                )),
                (Some(_), None) => Err(ProtocolError::invalid(field, "not proposed")),
                _ => Ok(()),
            }
        }
        le("max_msg_fds", c.max_msg_fds, ours.max_msg_fds)?;
        le(
            "max_data_xfer_size",
            c.max_data_xfer_size,
            ours.max_data_xfer_size,
        )?;
        le("max_dma_maps", c.max_dma_maps, ours.max_dma_maps)?;
        if let (Some(g), Some(p)) = (c.pgsizes, ours.pgsizes) {
            if g & !p != 0 {
                return Err(ProtocolError::invalid(
                    "pgsizes",
                    "not a subset of proposed",
                ));
            }
        }
        if c.migration.is_some() && ours.migration.is_none() {
            return Err(ProtocolError::invalid("migration", "not proposed"));
        }
        if c.write_multiple == Some(true) && ours.write_multiple != Some(true) {
            return Err(ProtocolError::invalid("write_multiple", "not proposed"));
        }
        if c.twin_socket.is_some() && ours.twin_socket.is_none() {
            return Err(ProtocolError::invalid("twin_socket", "not proposed"));
        }
    }
    Ok(Negotiated::from_caps(reply.minor, reply.caps.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_JSON: &str = r#"{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, "max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, "pgsize": 4096}, "write_multiple": true}}"#;

    fn qemu_payload() -> Vec<u8> {
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(QEMU_JSON.as_bytes());
        p.push(0);
        p
    }

    #[test]
    fn parses_qemu_proposal() {
        let v = VersionMessage::decode(&qemu_payload()).unwrap();
        assert_eq!(v, VersionMessage::qemu_proposal());
    }

    #[test]
    fn reply_to_qemu_fits_in_its_request() {
        let p = qemu_payload();
        let v = VersionMessage::decode(&p).unwrap();
        let (reply, n) = negotiate(&v, &ServerOffer::default(), p.len()).unwrap();
        assert!(reply.encode().len() <= p.len());
        assert_eq!(n.max_msg_fds, 16);
        assert!(n.write_multiple);
        assert_eq!(accept_reply(&v, &reply).unwrap(), n);
    }

    #[test]
    fn reply_is_trimmed_to_a_short_request() {
        let v = VersionMessage::qemu_proposal();
        let (reply, n) = negotiate(&v, &ServerOffer::default(), 60).unwrap();
        assert!(reply.encode().len() <= 60, "{}", reply.encode().len());
        assert_eq!(accept_reply(&v, &reply).unwrap(), n);
    }

    #[test]
    fn different_major_is_rejected() {
        let v = VersionMessage {
            major: 1,
            ..VersionMessage::qemu_proposal()
        };
        assert!(matches!(
            negotiate(&v, &ServerOffer::default(), 4096),
            Err(ProtocolError::UnsupportedVersion { major: 1, .. })
        ));
    }

    #[test]
    fn higher_minor_is_answered_with_ours() {
        let v = VersionMessage {
            minor: 9,
            ..VersionMessage::qemu_proposal()
        };
        let (reply, _) = negotiate(&v, &ServerOffer::default(), 4096).unwrap();
        assert_eq!(reply.minor, PROTOCOL_MINOR);
    }

    #[test]
    fn values_never_exceed_the_proposal_nor_the_offer() {
        let mut v = VersionMessage::qemu_proposal();
        v.caps.as_mut().unwrap().max_msg_fds = Some(4);
        let offer = ServerOffer {
            max_data_xfer_size: 4096,
            ..ServerOffer::default()
        };
        let (_, n) = negotiate(&v, &offer, 4096).unwrap();
        assert_eq!(n.max_msg_fds, 4);
        assert_eq!(n.max_data_xfer_size, 4096);
    }

    #[test]
    fn absent_caps_take_defaults() {
        let v = VersionMessage::decode(&[0, 0, 0, 0]).unwrap();
        let (reply, n) = negotiate(&v, &ServerOffer::default(), 4096).unwrap();
        assert_eq!(n, Negotiated::default());
        assert_eq!(reply.caps.unwrap(), Capabilities::default());
    }

    #[test]
    fn twin_socket_only_when_offered_and_supported() {
        let mut v = VersionMessage::qemu_proposal();
        let offer = ServerOffer {
            twin_socket: true,
            ..ServerOffer::default()
        };
        let (_, n) = negotiate(&v, &offer, 4096).unwrap();
        assert!(!n.twin_socket);
        v.caps.as_mut().unwrap().twin_socket = Some(TwinSocketCaps {
            supported: Some(true),
            fd_index: None,
        });
        let (_, n) = negotiate(&v, &offer, 4096).unwrap();
        assert!(n.twin_socket);
        let (_, n) = negotiate(&v, &ServerOffer::default(), 4096).unwrap();
        assert!(!n.twin_socket);
    }

    #[test]
    fn json_without_nul_is_rejected() {
        let mut p = qemu_payload();
        p.pop();
        assert!(VersionMessage::decode(&p).is_err());
    }

    #[test]
    fn malformed_json_is_rejected() {
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(b"{\"capabilities\": [}\0");
        assert!(matches!(
            VersionMessage::decode(&p),
            Err(ProtocolError::InvalidJson(_))
        ));
    }

    #[test]
    fn bad_pgsizes_is_rejected() {
        let mut v = VersionMessage::qemu_proposal();
        v.caps.as_mut().unwrap().pgsizes = Some(100);
        assert!(negotiate(&v, &ServerOffer::default(), 4096).is_err());
    }

    #[test]
    fn client_rejects_unproposed_or_larger_caps() {
        let v = VersionMessage {
            major: 0,
            minor: 0,
            caps: Some(Capabilities {
                max_msg_fds: Some(4),
                ..Capabilities::default()
            }),
        };
        let mut r = v.clone();
        r.caps.as_mut().unwrap().max_msg_fds = Some(8);
        assert!(accept_reply(&v, &r).is_err());
        let mut r = v.clone();
        r.caps.as_mut().unwrap().write_multiple = Some(true);
        assert!(accept_reply(&v, &r).is_err());
        let mut r = v.clone();
        r.minor = 1;
        assert!(accept_reply(&v, &r).is_err());
    }

    #[test]
    fn unknown_keys_survive_a_round_trip() {
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(br#"{"capabilities":{"frobnicate":3}}"#);
        p.push(0);
        let v = VersionMessage::decode(&p).unwrap();
        assert_eq!(v.caps.as_ref().unwrap().unknown.len(), 1);
        assert_eq!(VersionMessage::decode(&v.encode()).unwrap(), v);
    }
}
