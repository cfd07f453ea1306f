//! Crash-proof device servers: a device process that dies is replaced under the same client
//! connection, by the machinery of a live handover ([`crate::handover`]).
//!
//! A supervisor process (`vfud serve --supervise`, in the `vfud` binary) never reads client
//! input. It holds what a session needs to survive: the listening socket, and — sent by the
//! device process over a UNIX socket with `SCM_RIGHTS` whenever they change — the client
//! connection, DMA fds, interrupt eventfds and backend fds with their description
//! ([`crate::handover::SessionInfo`]), plus a checkpoint of device state (the migration
//! stream of a stop-copy taken between two messages: config space, interrupts, MSI-X table,
//! BAR memory and the device's own `save`). That pair is a [`kind::SNAPSHOT`]. The device
//! process also keeps the request [`journal`] up to date in shared memory.
//!
//! When the device process dies the supervisor starts a new one and, exactly as the old
//! process of a handover does, sends it HELLO, the checkpoint as DATA and the session as
//! SESSION; the new process answers the request the dead one was handling (see
//! [`Policy`] and the README's "Reliability" section) and reads on from the same socket.
//!
//! This module is the device-process side and the frames both sides share.

pub mod journal;
mod process;

use crate::error::HandoverError;
pub use process::serve_device_process;
pub(crate) use process::Supervised;

use serde::{Deserialize, Serialize};

use crate::handover::SessionInfo;

/// Frame kinds on the supervisor link (besides the handover kinds it reuses).
pub mod kind {
    /// Supervisor → device process, first frame: JSON [`super::Supervise`] with the journal
    /// memfd and the listening socket.
    pub const SUPERVISE: u16 = 0x7f20;
    /// Device process → supervisor: a [`super::Snapshot`] payload with the session's fds.
    pub const SNAPSHOT: u16 = 0x7f21;
}

/// What a restarted device gets as its state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The last checkpoint: what the device did after it is lost (and the guest's view of
    /// the device goes back to that moment).
    #[default]
    Restore,
    /// The last checkpoint's PCI configuration, interrupt wiring and DMA maps, but the device
    /// model itself reset (`Device::reset`), as after a function-level reset the guest did
    /// not ask for: a driver sees registers at their reset values.
    Reset,
}

impl std::str::FromStr for Policy {
    type Err = crate::error::PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "restore" => Ok(Self::Restore),
            "reset" => Ok(Self::Reset),
            _ => Err(crate::error::PolicyError(s.to_string())),
        }
    }
}

/// First frame to a device process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Supervise {
    /// Device state after a crash.
    pub policy: Policy,
    /// Checkpoint interval while the device is active (ms).
    pub checkpoint_ms: u64,
    /// How many device processes came before this one.
    pub generation: u32,
    /// Index of the journal memfd among the frame's fds.
    pub journal: usize,
    /// Index of the listening socket among the frame's fds.
    pub listener: Option<usize>,
    /// The previous device process was killed for hanging in a request: answer that request
    /// with an error even when it could be re-run (it would most likely hang again).
    #[serde(default)]
    pub hung: bool,
}

/// Encode a snapshot payload: a 4-byte length, the session JSON, then the stream bytes.
pub fn encode_snapshot(info: &SessionInfo, stream: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(info)?;
    let mut p = Vec::with_capacity(4 + json.len() + stream.len());
    p.extend_from_slice(&(json.len() as u32).to_le_bytes());
    p.extend_from_slice(&json);
    p.extend_from_slice(stream);
    Ok(p)
}

/// Split a snapshot payload into its session description and checkpoint stream.
pub fn decode_snapshot(p: &[u8]) -> Result<(SessionInfo, &[u8]), HandoverError> {
    let short = || HandoverError::Protocol("snapshot truncated".into());
    let n = p
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(short)? as usize;
    let json = p.get(4..4 + n).ok_or_else(short)?;
    let info = serde_json::from_slice(json)?;
    Ok((info, &p[4 + n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips_and_rejects_truncation() {
        let info = SessionInfo {
            model: "dma-engine".into(),
            negotiated: None,
            maps: Vec::new(),
            irqs: Vec::new(),
            client: Some(0),
            listener: None,
            backend: None,
            stopped_at_unix_ns: 0,
            bar_memory: Vec::new(),
        };
        let p = encode_snapshot(&info, b"stream").unwrap();
        let (i, s) = decode_snapshot(&p).unwrap();
        assert_eq!(
            (i.model.as_str(), i.client, s),
            ("dma-engine", Some(0), &b"stream"[..])
        );
        assert!(decode_snapshot(&p[..6]).is_err());
        assert!("sometimes".parse::<Policy>().is_err());
    }
}
