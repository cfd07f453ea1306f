//! Negotiation proper: what a server offers, the session parameters both sides derive, and the
//! server's answer and the client's check of it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    Capabilities, MigrationCaps, TwinSocketCaps, VersionMessage, DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_DMA_MAPS, DEFAULT_MAX_MSG_FDS, DEFAULT_PGSIZES, MAX_MAX_DATA_XFER_SIZE,
    PROTOCOL_MAJOR, PROTOCOL_MINOR,
};
use crate::error::ProtocolError;

/// What a server is able to offer. Its limits go into the reply as they are (they are the
/// server's own receive limits); the other capabilities are intersected with the proposal.
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
///
/// The spec makes `max_msg_fds` and `max_data_xfer_size` one-directional: each side states what
/// *it* can receive ("Maximum number of file descriptors that can be received by the sender in
/// one message"; "the client and server may each specify a `max_data_xfer_size` value";
/// "The `count` field must not exceed the value of `max_data_xfer_size` of the peer" —
/// QEMU `docs/interop/vfio-user.rst`, "Message sizes", "VFIO_USER_VERSION", "Read and Write
/// Operations"). QEMU reads the server's reply the same way (`proxy.c`: the reply's
/// `max_msg_fds` becomes `max_send_fds`, its `max_data_xfer_size` the `max_xfer_size` QEMU sends
/// with), and so does libvfio-user, which replies with its own constants whatever the client
/// proposed. Hence two pairs of fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    /// Minor version in force.
    pub minor: u16,
    /// Most fds the *server* accepts in one message (the reply's value): what a client may send.
    pub max_msg_fds: u32,
    /// Largest data transfer the *server* accepts (the reply's value): the bound on REGION_READ
    /// and REGION_WRITE `count` and on MIG_DATA sizes a client sends.
    pub max_data_xfer_size: u64,
    /// Most fds the *client* accepts in one message (its proposal): what a server may send.
    #[serde(default = "default_max_msg_fds")]
    pub client_max_msg_fds: u32,
    /// Largest data transfer the *client* accepts (its proposal): the bound on the `count` of
    /// the server's DMA_READ/DMA_WRITE.
    #[serde(default = "default_max_data_xfer_size")]
    pub client_max_data_xfer_size: u64,
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

fn default_max_msg_fds() -> u32 {
    DEFAULT_MAX_MSG_FDS
}

fn default_max_data_xfer_size() -> u64 {
    DEFAULT_MAX_DATA_XFER_SIZE
}

impl Default for Negotiated {
    fn default() -> Self {
        Self {
            minor: PROTOCOL_MINOR,
            max_msg_fds: DEFAULT_MAX_MSG_FDS,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            client_max_msg_fds: DEFAULT_MAX_MSG_FDS,
            client_max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
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
/// Only capabilities the client proposed appear in the reply (the spec's "subset" rule is about
/// keys). `max_msg_fds` and `max_data_xfer_size` carry the server's own limits, not the minimum
/// with the client's: each value says what its sender can receive (see [`Negotiated`]), so a
/// client proposing 1 KiB may still write 16 KiB to a server that accepts 1 MiB, and the server
/// sends the client DMA requests of at most the client's 1 KiB. `max_data_xfer_size` is capped
/// at QEMU's 64 MiB, above which QEMU rejects the reply. `twin_socket` only when the client set
/// `supported`. The encoded reply is kept no longer
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
        max_msg_fds: client.max_msg_fds.map(|_| offer.max_msg_fds),
        max_data_xfer_size: client
            .max_data_xfer_size
            .map(|_| offer.max_data_xfer_size.min(MAX_MAX_DATA_XFER_SIZE)),
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
    let negotiated = Negotiated::from_caps(minor, msg.caps.as_ref(), &client);
    Ok((msg, negotiated))
}

impl Negotiated {
    /// Effective parameters from a reply's capabilities and the proposal they answer, spec
    /// defaults for absent keys.
    pub fn from_caps(minor: u16, caps: Option<&Capabilities>, proposal: &Capabilities) -> Self {
        let d = Negotiated::default();
        let client = Negotiated {
            minor,
            client_max_msg_fds: proposal.max_msg_fds.unwrap_or(d.client_max_msg_fds),
            client_max_data_xfer_size: proposal
                .max_data_xfer_size
                .unwrap_or(d.client_max_data_xfer_size),
            ..d.clone()
        };
        let Some(c) = caps else {
            return client;
        };
        Negotiated {
            max_msg_fds: c.max_msg_fds.unwrap_or(d.max_msg_fds),
            max_data_xfer_size: c.max_data_xfer_size.unwrap_or(d.max_data_xfer_size),
            pgsizes: c.pgsizes.unwrap_or(d.pgsizes),
            max_dma_maps: c.max_dma_maps.unwrap_or(d.max_dma_maps),
            migration: c.migration.clone(),
            write_multiple: c.write_multiple.unwrap_or(false),
            twin_socket: c.twin_socket.as_ref().and_then(|t| t.fd_index).is_some(),
            ..client
        }
    }
}

/// Client side: check the server's reply against the proposal (QEMU's rules in
/// `proxy.c vfio_user_validate_version`): same major, minor not above the proposal, no
/// capability that was not proposed, `max_dma_maps` no larger than proposed. The server's
/// `max_msg_fds` and `max_data_xfer_size` are its own receive limits and may be larger or
/// smaller than ours (see [`Negotiated`]); like QEMU, `max_data_xfer_size` above 64 MiB is
/// refused.
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
        // The server's own receive limits: any value, as long as the key was proposed.
        if c.max_msg_fds.is_some() && ours.max_msg_fds.is_none() {
            return Err(ProtocolError::invalid("max_msg_fds", "not proposed"));
        }
        if c.max_data_xfer_size.is_some() && ours.max_data_xfer_size.is_none() {
            return Err(ProtocolError::invalid("max_data_xfer_size", "not proposed"));
        }
        if let Some(x) = c.max_data_xfer_size.filter(|x| *x > MAX_MAX_DATA_XFER_SIZE) {
            return Err(ProtocolError::invalid(
                "max_data_xfer_size",
                format!("{x} is above the 64 MiB a client accepts"),
            ));
        }
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
    Ok(Negotiated::from_caps(
        reply.minor,
        reply.caps.as_ref(),
        &ours,
    ))
}
