//! The client side of a v2 migration stream over a real socket, as the migration tests drive
//! it: guest RAM where they map it, a whole stop-and-copy save, and a restore.

use vfud_protocol::messages::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::MigState;
use vfud_protocol::{Client, ProtocolError};

/// DMA_MAP flags for guest RAM the device may read and write.
pub const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
/// Where the tests map guest RAM: above 4 GiB, so 64-bit addresses are exercised.
pub const RAM_IOVA: u64 = 0x1_0000_0000;
/// Size of that RAM.
pub const RAM_SIZE: u64 = 1 << 20;
/// Bytes per MIG_DATA_READ / MIG_DATA_WRITE.
pub const CHUNK: u32 = 1 << 20;

/// Read the whole stop-copy stream from a source (ends in STOP_COPY).
pub fn save(c: &mut Client) -> Vec<u8> {
    c.set_mig_state(MigState::StopCopy).unwrap();
    let mut out = Vec::new();
    loop {
        let d = c.mig_data_read(CHUNK).unwrap();
        if d.is_empty() {
            return out;
        }
        out.extend(d);
    }
}

/// Write a stream into a destination and bring it to STOP (where the stream is checked).
pub fn restore(c: &mut Client, stream: &[u8]) -> Result<(), ProtocolError> {
    c.set_mig_state(MigState::Resuming)?;
    for chunk in stream.chunks(CHUNK as usize) {
        c.mig_data_write(chunk)?;
    }
    c.set_mig_state(MigState::Stop)
}
