//! Live migration, server half: the v2 state machine ([`fsm`]), vfud's checked stream
//! format with its saver and loader ([`stream`]), the per-device [`MigrationSession`], the v1
//! migration region ([`v1`]), DEVICE_FEATURE handling ([`features`]) and the versioned device
//! state envelope.
//!
//! The same core is reached three ways: DEVICE_FEATURE MIG_DEVICE_STATE with
//! MIG_DATA_READ/WRITE (v2), the v1 migration region (index 9, type 3 / subtype 1), and — for
//! the ordering facts — vfud's own features and region capability
//! (`vfud_protocol::messages::feature::vfud`).

pub mod features;
pub mod fsm;
pub mod session;
pub mod stream;
pub mod v1;

use serde::de::DeserializeOwned;
use serde::Serialize;
pub use session::{MigrationSession, Parts};

use crate::error::DeviceError;

/// A device's saved state: its own struct, serialized, with the struct's version.
///
/// Devices keep a `<Name>State` serde struct separate from the live struct. Load accepts
/// the current version and the one before it; fields added later carry `#[serde(default)]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    /// Version of the device's state struct.
    pub version: u16,
    /// The struct as JSON.
    pub payload: Vec<u8>,
}

impl DeviceState {
    /// Serialize `state` at `version`.
    pub fn encode<T: Serialize>(version: u16, state: &T) -> Result<Self, DeviceError> {
        let payload = serde_json::to_vec(state)
            .map_err(|e| DeviceError::Other(format!("cannot serialize device state: {e}")))?;
        Ok(Self { version, payload })
    }

    /// Deserialize, accepting `current` and `current - 1` (restored bytes are peer input).
    pub fn decode<T: DeserializeOwned>(&self, current: u16) -> Result<T, DeviceError> {
        if self.version != current && self.version.checked_add(1) != Some(current) {
            return Err(DeviceError::InvalidState(format!(
                "state version {} not supported (this build reads {} and {})",
                self.version,
                current,
                current.saturating_sub(1)
            )));
        }
        serde_json::from_slice(&self.payload)
            .map_err(|e| DeviceError::InvalidState(format!("device state does not parse: {e}")))
    }
}
