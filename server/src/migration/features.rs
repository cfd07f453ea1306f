//! DEVICE_FEATURE (spec "VFIO_USER_DEVICE_FEATURE"): migration v2 (MIGRATION,
//! MIG_DEVICE_STATE, MIG_DATA_SIZE), dirty logging (DMA_LOGGING_START/STOP/REPORT) and vfud's
//! own features (precopy info, migration ordering).

use vfud_protocol::messages::feature::{
    vfud, DeviceFeature, DmaLoggingControl, DmaLoggingReport, MigDeviceState,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP,
    FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE, FEATURE_MIG_DEVICE_STATE, MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
};
use vfud_protocol::messages::MigState;
use vfud_protocol::wire::{encode, put};
use zerocopy::FromBytes;

use super::session::{MigrationSession, Parts};
use crate::error::{DmaError, RequestError};

/// Which operations a feature allows: (GET, SET), or `None` when the device lacks it.
fn operations(feature: u16, migratable: bool) -> Option<(bool, bool)> {
    let m = migratable;
    Some(match feature {
        FEATURE_MIGRATION if m => (true, false),
        FEATURE_MIG_DEVICE_STATE if m => (true, true),
        FEATURE_MIG_DATA_SIZE if m => (true, false),
        FEATURE_DMA_LOGGING_START | FEATURE_DMA_LOGGING_STOP => (false, true),
        FEATURE_DMA_LOGGING_REPORT => (true, false),
        vfud::FEATURE_PRECOPY_INFO if m => (true, false),
        vfud::FEATURE_MIGRATION_ORDERING if m => (true, false),
        _ => return None,
    })
}

impl MigrationSession {
    /// Handle a DEVICE_FEATURE request; returns the reply payload.
    pub fn device_feature(
        &mut self,
        f: DeviceFeature,
        parts: &mut Parts<'_>,
    ) -> Result<Vec<u8>, RequestError> {
        let (can_get, can_set) = operations(f.feature, self.migratable())
            .ok_or(RequestError::UnsupportedFeature(u32::from(f.feature)))?;
        if (f.get && !can_get) || (f.set && !can_set) {
            return Err(RequestError::FeatureOperation(u32::from(f.feature)));
        }
        if f.probe {
            return Ok(f.encode());
        }
        let too_short = |what: &str| RequestError::invalid(format!("{what} payload too short"));
        let data: Vec<u8> = match f.feature {
            FEATURE_MIGRATION => (MIGRATION_STOP_COPY | MIGRATION_PRE_COPY)
                .to_le_bytes()
                .to_vec(),
            FEATURE_MIG_DEVICE_STATE => {
                if f.set {
                    let (req, _) = MigDeviceState::read_from_prefix(&f.data)
                        .map_err(|_| too_short("MIG_DEVICE_STATE"))?;
                    self.set_state(MigState::try_from(req.device_state)?, parts)?;
                }
                encode(&MigDeviceState {
                    device_state: self.state() as u32,
                    data_fd: u32::MAX,
                })
            }
            FEATURE_MIG_DATA_SIZE => self.data_size(parts.function).to_le_bytes().to_vec(),
            FEATURE_DMA_LOGGING_START => {
                let ctl = DmaLoggingControl::decode(&f.data)?;
                let ranges: Vec<(u64, u64)> =
                    ctl.ranges.iter().map(|r| (r.iova, r.length)).collect();
                let page = parts.dma.start_logging(ctl.page_size, &ranges)?;
                DmaLoggingControl {
                    page_size: page,
                    ranges: ctl.ranges,
                }
                .encode()
            }
            FEATURE_DMA_LOGGING_STOP => {
                if !parts.dma.logging() {
                    return Err(DmaError::LoggingInactive.into());
                }
                parts.dma.stop_logging();
                f.data.clone()
            }
            FEATURE_DMA_LOGGING_REPORT => {
                let (rep, _) = DmaLoggingReport::read_from_prefix(&f.data)
                    .map_err(|_| too_short("DMA_LOGGING_REPORT"))?;
                let need = 8 + 24 + rep.bitmap_len()?;
                if (f.argsz as usize) < need {
                    return Err(RequestError::invalid(format!(
                        "argsz {} too small for the bitmap ({need})",
                        f.argsz
                    )));
                }
                let bitmap = parts
                    .dma
                    .report_dirty(rep.iova, rep.length, rep.page_size)?;
                let mut p = Vec::with_capacity(24 + bitmap.len());
                put(&mut p, &rep);
                p.extend(bitmap);
                p
            }
            vfud::FEATURE_PRECOPY_INFO => {
                let (initial_bytes, dirty_bytes) =
                    self.precopy_info(parts.function).ok_or_else(|| {
                        RequestError::invalid("precopy info is only valid in PRE_COPY")
                    })?;
                encode(&vfud::PrecopyInfo {
                    initial_bytes,
                    dirty_bytes,
                })
            }
            _ => encode(&vfud::MigrationOrdering {
                flags: self.ordering_flags(),
                reserved: 0,
            }),
        };
        Ok(DeviceFeature {
            argsz: (8 + data.len()) as u32,
            data,
            ..f
        }
        .encode())
    }
}
