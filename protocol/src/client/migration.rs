//! DEVICE_FEATURE, dirty logging and MIG_DATA_READ/WRITE: the client methods a migration uses.

use zerocopy::FromBytes;

use super::Client;
use crate::error::ProtocolError;
use crate::header::Command;
use crate::messages::feature::{
    DeviceFeature, DmaLoggingControl, DmaLoggingReport, MigData, MigDeviceState, MigState,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP,
    FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE, FEATURE_MIG_DEVICE_STATE,
};
use crate::wire::put;

impl Client {
    /// DEVICE_FEATURE with arbitrary flags; returns the reply.
    pub fn device_feature(&mut self, f: &DeviceFeature) -> Result<DeviceFeature, ProtocolError> {
        let r = self.request(Command::DeviceFeature, &f.encode(), &[])?;
        let mut r = DeviceFeature::decode(&r.payload)?;
        if r.feature != f.feature {
            return Err(ProtocolError::UnexpectedReply(
                "feature index changed".into(),
            ));
        }
        r.get = f.get;
        Ok(r)
    }

    /// GET a feature's data.
    pub fn feature_get(
        &mut self,
        feature: u16,
        data: &[u8],
        room: usize,
    ) -> Result<Vec<u8>, ProtocolError> {
        let f = DeviceFeature {
            argsz: (8 + room.max(data.len())) as u32,
            feature,
            get: true,
            set: false,
            probe: false,
            data: data.to_vec(),
        };
        Ok(self.device_feature(&f)?.data)
    }

    /// SET a feature.
    pub fn feature_set(&mut self, feature: u16, data: &[u8]) -> Result<(), ProtocolError> {
        let f = DeviceFeature {
            argsz: (8 + data.len()) as u32,
            feature,
            get: false,
            set: true,
            probe: false,
            data: data.to_vec(),
        };
        self.device_feature(&f).map(|_| ())
    }

    /// PROBE whether `feature` supports GET and/or SET.
    pub fn feature_probe(
        &mut self,
        feature: u16,
        get: bool,
        set: bool,
    ) -> Result<(), ProtocolError> {
        let f = DeviceFeature {
            argsz: 8,
            feature,
            get,
            set,
            probe: true,
            data: Vec::new(),
        };
        self.device_feature(&f).map(|_| ())
    }

    /// GET the MIGRATION feature's flags.
    pub fn migration_flags(&mut self) -> Result<u64, ProtocolError> {
        let d = self.feature_get(FEATURE_MIGRATION, &[], 8)?;
        read_u64(&d)
    }

    /// GET the migration state.
    pub fn mig_state(&mut self) -> Result<MigState, ProtocolError> {
        let d = self.feature_get(FEATURE_MIG_DEVICE_STATE, &[], 8)?;
        let (s, _) = MigDeviceState::read_from_prefix(&d)
            .map_err(|_| ProtocolError::UnexpectedReply("short MIG_DEVICE_STATE".into()))?;
        MigState::try_from(s.device_state)
    }

    /// SET the migration state (the server walks the arcs before replying).
    pub fn set_mig_state(&mut self, state: MigState) -> Result<(), ProtocolError> {
        let mut p = Vec::new();
        put(
            &mut p,
            &MigDeviceState {
                device_state: state as u32,
                data_fd: u32::MAX,
            },
        );
        self.feature_set(FEATURE_MIG_DEVICE_STATE, &p)
    }

    /// GET the stop-copy size estimate.
    pub fn mig_data_size(&mut self) -> Result<u64, ProtocolError> {
        let d = self.feature_get(FEATURE_MIG_DATA_SIZE, &[], 8)?;
        read_u64(&d)
    }

    /// Start dirty logging.
    pub fn dma_logging_start(&mut self, ctl: &DmaLoggingControl) -> Result<(), ProtocolError> {
        self.feature_set(FEATURE_DMA_LOGGING_START, &ctl.encode())
    }

    /// Stop dirty logging.
    pub fn dma_logging_stop(&mut self) -> Result<(), ProtocolError> {
        self.feature_set(FEATURE_DMA_LOGGING_STOP, &[])
    }

    /// Fetch and clear the dirty bitmap of a range; returns the bitmap bytes.
    pub fn dma_logging_report(&mut self, rep: &DmaLoggingReport) -> Result<Vec<u8>, ProtocolError> {
        let mut p = Vec::new();
        put(&mut p, rep);
        let room = 24 + rep.bitmap_len()?;
        let d = self.feature_get(FEATURE_DMA_LOGGING_REPORT, &p, room)?;
        Ok(d.get(24..).unwrap_or_default().to_vec())
    }

    /// MIG_DATA_READ of up to `size` bytes. A shorter answer means nothing more for now.
    ///
    /// Only the first `size` bytes the reply announces are data: a reply padded to the requested
    /// size (libvfio-user servers do this) is accepted, the padding ignored and logged once per
    /// connection at debug level; [`Client::saw_padded_mig_data`] tells whether it happened.
    pub fn mig_data_read(&mut self, size: u32) -> Result<Vec<u8>, ProtocolError> {
        let mut data = Vec::new();
        self.mig_data_read_into(size, &mut data)?;
        Ok(data)
    }

    /// [`Client::mig_data_read`] appending to `out`; returns how many bytes came. A loop that
    /// reuses `out` (and so the reply buffer this recycles) allocates nothing per read.
    pub fn mig_data_read_into(
        &mut self,
        size: u32,
        out: &mut Vec<u8>,
    ) -> Result<usize, ProtocolError> {
        let data = self.mig_data_read_buf(size)?;
        out.extend_from_slice(&data);
        let n = data.len();
        self.recycle_mig_data(data);
        Ok(n)
    }

    /// MIG_DATA_READ of up to `size` bytes, the data left in the buffer the reply was
    /// received into (no copy: large replies are received straight into a recycled buffer).
    /// Give it back with [`Client::recycle_mig_data`] so the next read reuses it.
    pub fn mig_data_read_buf(&mut self, size: u32) -> Result<MigDataBuf, ProtocolError> {
        let mut p = Vec::new();
        put(
            &mut p,
            &MigData {
                argsz: 8 + size,
                size,
            },
        );
        let r = self.request(Command::MigDataRead, &p, &[])?;
        let (data, padding) = MigData::decode_read_reply(&r.payload, size)?;
        if padding > 0 && !self.padded_mig_data {
            self.padded_mig_data = true;
            tracing::debug!(
                data = data.len(),
                padding,
                "MIG_DATA_READ reply padded to the requested size; using the announced bytes"
            );
        }
        let end = 8 + data.len();
        Ok(MigDataBuf {
            buf: r.payload,
            start: 8,
            end,
        })
    }

    /// Give the buffer of a [`MigDataBuf`] back for the next read.
    pub fn recycle_mig_data(&mut self, data: MigDataBuf) {
        self.reader.recycle(data.buf);
    }

    /// Whether a MIG_DATA_READ reply on this connection carried padding after its data.
    pub fn saw_padded_mig_data(&self) -> bool {
        self.padded_mig_data
    }

    /// MIG_DATA_WRITE.
    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<(), ProtocolError> {
        let mut head = Vec::with_capacity(8);
        put(
            &mut head,
            &MigData {
                argsz: (8 + data.len()) as u32,
                size: data.len() as u32,
            },
        );
        let r = self.request_parts(Command::MigDataWrite, &[&head, data])?;
        self.reader.recycle(r.payload);
        Ok(())
    }
}

fn read_u64(d: &[u8]) -> Result<u64, ProtocolError> {
    d.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| ProtocolError::UnexpectedReply("feature data shorter than 8 bytes".into()))
}

/// The data of one MIG_DATA_READ reply where it was received (see
/// [`Client::mig_data_read_buf`]), or any bytes of the stream read otherwise.
#[derive(Debug, Default)]
pub struct MigDataBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl From<Vec<u8>> for MigDataBuf {
    fn from(buf: Vec<u8>) -> Self {
        let end = buf.len();
        Self { buf, start: 0, end }
    }
}

impl std::ops::Deref for MigDataBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

impl std::ops::DerefMut for MigDataBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }
}
