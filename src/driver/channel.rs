//! How the driver reaches a device's migration state: v2 (DEVICE_FEATURE MIG_DEVICE_STATE
//! plus MIG_DATA_READ/WRITE) or the v1 migration region (registers and a data window in
//! region 9), chosen by what the device offers.

use vfud_protocol::client::MigDataBuf;
use vfud_protocol::messages::feature::{v1, vfud, MIGRATION_PRE_COPY};
use vfud_protocol::messages::region::RegionCap;
use vfud_protocol::messages::MigState;
use vfud_protocol::{Client, ProtocolError};

use super::MigrateError;

/// Which interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    /// DEVICE_FEATURE + MIG_DATA_READ/WRITE.
    V2,
    /// The v1 migration region.
    V1,
}

/// A device's migration interface as discovered.
#[derive(Clone, Debug)]
pub struct Channel {
    /// The interface.
    pub kind: ChannelKind,
    precopy: bool,
    region: u32,
    window: u64,
    window_size: u64,
    ordering: u32,
    ordering_advertised: bool,
}

fn read_u64(c: &mut Client, region: u32, off: u64) -> Result<u64, ProtocolError> {
    let b = c.region_read(region, off, 8)?;
    Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
}

impl Channel {
    /// Discover the interface: v2 when DEVICE_FEATURE MIGRATION answers (unless `force_v1`),
    /// else a device-specific region of type MIGRATION/1.
    pub fn open(c: &mut Client, force_v1: bool) -> Result<Self, MigrateError> {
        if !force_v1 {
            if let Ok(flags) = c.migration_flags() {
                // A server that rejects vfud's feature (any foreign one) has no ordering
                // requirement.
                let ordering = c
                    .feature_get(vfud::FEATURE_MIGRATION_ORDERING, &[], 8)
                    .ok()
                    .and_then(|d| {
                        d.get(..4)
                            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    });
                return Ok(Self {
                    kind: ChannelKind::V2,
                    precopy: flags & MIGRATION_PRE_COPY != 0,
                    region: 0,
                    window: 0,
                    window_size: 0,
                    ordering: ordering.unwrap_or(0),
                    ordering_advertised: ordering.is_some(),
                });
            }
        }
        let n = c
            .device_info()
            .map_err(|source| MigrateError::Protocol {
                step: "device info",
                source,
            })?
            .num_regions;
        for i in 9..n.min(100) {
            let Ok((info, _)) = c.region_info(i) else {
                continue;
            };
            let is_mig = info.caps.iter().any(|cap| {
                matches!(cap, RegionCap::Type { region_type, subtype }
                    if *region_type == v1::REGION_TYPE_MIGRATION && *subtype == v1::REGION_SUBTYPE_MIGRATION)
            });
            if !is_mig {
                continue;
            }
            let ordering = info.caps.iter().find_map(|cap| match cap {
                RegionCap::Other { id, data, .. } if *id == vfud::REGION_CAP_MIGRATION_ORDERING => {
                    data.get(..4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                }
                _ => None,
            });
            let window =
                read_u64(c, i, v1::OFF_DATA_OFFSET).map_err(|source| MigrateError::Protocol {
                    step: "v1 data_offset",
                    source,
                })?;
            return Ok(Self {
                kind: ChannelKind::V1,
                precopy: true,
                region: i,
                window,
                window_size: info.info.size.saturating_sub(window),
                ordering: ordering.unwrap_or(0),
                ordering_advertised: ordering.is_some(),
            });
        }
        Err(MigrateError::NotMigratable)
    }

    /// The device's `vfud::ORDERING_*` flags.
    pub fn ordering(&self, _c: &mut Client) -> u32 {
        self.ordering
    }

    /// Whether the device answered vfud's ordering feature (or carries its v1 capability).
    pub fn ordering_advertised(&self) -> bool {
        self.ordering_advertised
    }

    /// Whether PRE_COPY is offered.
    pub fn supports_precopy(&self, _c: &mut Client) -> bool {
        self.precopy
    }

    /// Walk the device to `s`.
    pub fn set_state(&self, c: &mut Client, s: MigState) -> Result<(), ProtocolError> {
        match self.kind {
            ChannelKind::V2 => c.set_mig_state(s),
            ChannelKind::V1 => c.region_write(
                self.region,
                v1::OFF_DEVICE_STATE,
                &v1::bits_for(s).to_le_bytes(),
            ),
        }
    }

    /// Append the next piece of the stream to `out`; how many bytes came (0: nothing more now
    /// / the end in stop-copy). Reusing `out` across calls keeps the loop allocation-free.
    pub fn read(
        &self,
        c: &mut Client,
        max: u32,
        out: &mut Vec<u8>,
    ) -> Result<usize, ProtocolError> {
        match self.kind {
            ChannelKind::V2 => c.mig_data_read_into(max, out),
            ChannelKind::V1 => {
                let pending = read_u64(c, self.region, v1::OFF_PENDING_BYTES)?;
                if pending == 0 {
                    return Ok(0);
                }
                let off = read_u64(c, self.region, v1::OFF_DATA_OFFSET)?;
                let size = read_u64(c, self.region, v1::OFF_DATA_SIZE)?;
                let step = c.negotiated().max_data_xfer_size.min(1 << 20);
                let mut done = 0;
                while done < size {
                    let n = (size - done).min(step) as u32;
                    out.extend(c.region_read(self.region, off + done, n)?);
                    done += u64::from(n);
                }
                Ok(size as usize)
            }
        }
    }

    /// The next piece of the stream where it was received, without copying it (v2; v1 reads
    /// through the region into a new buffer); empty when nothing more now / the end in
    /// stop-copy. Give it back with [`Client::recycle_mig_data`].
    pub fn read_piece(&self, c: &mut Client, max: u32) -> Result<MigDataBuf, ProtocolError> {
        match self.kind {
            ChannelKind::V2 => c.mig_data_read_buf(max),
            ChannelKind::V1 => {
                let mut out = Vec::new();
                self.read(c, max, &mut out)?;
                Ok(out.into())
            }
        }
    }

    /// Write a piece of the stream.
    pub fn write(&self, c: &mut Client, data: &[u8]) -> Result<(), ProtocolError> {
        match self.kind {
            ChannelKind::V2 => {
                let step = c.negotiated().max_data_xfer_size as usize;
                for chunk in data.chunks(step.max(1)) {
                    c.mig_data_write(chunk)?;
                }
                Ok(())
            }
            ChannelKind::V1 => {
                let step = c.negotiated().max_data_xfer_size.min(1 << 20) as usize;
                for piece in data.chunks(self.window_size.max(1) as usize) {
                    for (i, chunk) in piece.chunks(step.max(1)).enumerate() {
                        c.region_write(self.region, self.window + (i * step) as u64, chunk)?;
                    }
                    c.region_write(
                        self.region,
                        v1::OFF_DATA_SIZE,
                        &(piece.len() as u64).to_le_bytes(),
                    )?;
                }
                Ok(())
            }
        }
    }

    /// Pre-copy initial and dirty byte counts (v2 with vfud's feature; `None` otherwise, e.g.
    /// from a foreign server that rejects feature 0x4001).
    pub fn precopy_info(&self, c: &mut Client) -> Option<(u64, u64)> {
        if self.kind != ChannelKind::V2 {
            return None;
        }
        let d = c.feature_get(vfud::FEATURE_PRECOPY_INFO, &[], 16).ok()?;
        let a = u64::from_le_bytes(d.get(..8)?.try_into().ok()?);
        let b = u64::from_le_bytes(d.get(8..16)?.try_into().ok()?);
        Some((a, b))
    }
}
