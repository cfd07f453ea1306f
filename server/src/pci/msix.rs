//! The MSI-X table as typed server-side state (PCI Local Bus 3.0 §6.8.2).
//!
//! QEMU emulates MSI-X itself for the guest but still forwards table writes to the server, and
//! a client may read the table back, so the server keeps it. Each vector's mask bit decides
//! whether the vector's interrupts are delivered or latched in the PBA. Writes report which
//! vectors' Vector Control words they touched, as values ([`MaskChange`]), so the caller updates
//! the interrupt state for every vector a write spans, not just the first.

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Vector Control bit 0: masked.
const CTRL_MASKED: u32 = 1;

/// One table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl MsixEntry {
    /// Power-on value: every vector masked (§6.8.2.9).
    const RESET: Self = Self {
        addr: 0,
        data: 0,
        control: CTRL_MASKED,
    };

    /// Whether the vector is masked.
    pub fn masked(&self) -> bool {
        self.control & CTRL_MASKED != 0
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.data.to_le_bytes());
        b[12..].copy_from_slice(&self.control.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; 16]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Self {
            addr: u64::from(u32_at(0)) | (u64::from(u32_at(4)) << 32),
            data: u32_at(8),
            control: u32_at(12),
        }
    }
}

/// A vector whose Vector Control a table write set (to masked or unmasked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskChange {
    /// Vector.
    pub vector: u32,
    /// New mask state.
    pub masked: bool,
}

/// The table of one function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsixTable {
    entries: Vec<MsixEntry>,
}

impl MsixTable {
    /// A table of `vectors` entries, all masked.
    pub fn new(vectors: u32) -> Self {
        Self {
            entries: vec![MsixEntry::RESET; vectors as usize],
        }
    }

    /// Size in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Entry `vector`.
    pub fn entry(&self, vector: u32) -> Option<MsixEntry> {
        self.entries.get(vector as usize).copied()
    }

    /// Back to power-on state.
    pub fn reset(&mut self) {
        self.entries.fill(MsixEntry::RESET);
    }

    /// Read table bytes at `offset` (the caller checked the range against [`Self::len_bytes`]).
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let o = offset + i as u64;
            let e = self.entries[(o / ENTRY_SIZE) as usize].to_bytes();
            *b = e[(o % ENTRY_SIZE) as usize];
        }
    }

    /// Write table bytes at `offset`; returns the mask of every vector whose Vector Control
    /// the write touched.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Vec<MaskChange> {
        let mut changes = Vec::new();
        let first = offset / ENTRY_SIZE;
        let last = (offset + data.len() as u64 - 1) / ENTRY_SIZE;
        for v in first..=last {
            let e = &mut self.entries[v as usize];
            let mut bytes = e.to_bytes();
            let base = v * ENTRY_SIZE;
            for (i, x) in data.iter().enumerate() {
                let o = offset + i as u64;
                if (base..base + ENTRY_SIZE).contains(&o) {
                    bytes[(o - base) as usize] = *x;
                }
            }
            *e = MsixEntry::from_bytes(&bytes);
            // Report every vector whose Vector Control the write touched, changed or not:
            // the interrupt state follows what the client last wrote there.
            let ctrl = base + 12..base + ENTRY_SIZE;
            let touched = ctrl.start < offset + data.len() as u64 && offset < ctrl.end;
            if touched {
                changes.push(MaskChange {
                    vector: v as u32,
                    masked: e.masked(),
                });
            }
        }
        changes
    }

    /// The whole table as bytes (migration and handover).
    pub fn image(&self) -> Vec<u8> {
        self.entries.iter().flat_map(|e| e.to_bytes()).collect()
    }

    /// Replace the table from [`Self::image`] bytes (peer input: the size must match).
    pub fn restore(&mut self, image: &[u8]) -> Result<(), String> {
        if image.len() as u64 != self.len_bytes() {
            return Err(format!(
                "MSI-X table of {} bytes, the device has {}",
                image.len(),
                self.len_bytes()
            ));
        }
        for (e, b) in self.entries.iter_mut().zip(image.chunks_exact(16)) {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            *e = MsixEntry::from_bytes(&a);
        }
        Ok(())
    }

    /// Mask bits of every vector, in order.
    pub fn masks(&self) -> impl Iterator<Item = bool> + '_ {
        self.entries.iter().map(MsixEntry::masked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_start_masked() {
        let t = MsixTable::new(4);
        assert!(t.masks().all(|m| m));
        let mut b = [0u8; 4];
        t.read(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
    }

    #[test]
    fn a_write_spanning_vectors_reports_each_mask_change() {
        let mut t = MsixTable::new(4);
        // Two whole entries (vectors 1 and 2), both unmasked.
        let mut data = Vec::new();
        for v in 1..3u32 {
            data.extend(0xfee0_0000u64.to_le_bytes());
            data.extend((0x40 + v).to_le_bytes());
            data.extend(0u32.to_le_bytes());
        }
        let changes = t.write(16, &data);
        assert_eq!(
            changes,
            vec![
                MaskChange {
                    vector: 1,
                    masked: false
                },
                MaskChange {
                    vector: 2,
                    masked: false
                }
            ]
        );
        assert_eq!(t.entry(2).unwrap().data, 0x42);
        assert!(t.entry(0).unwrap().masked());
    }

    #[test]
    fn writing_vector_control_reports_the_mask_even_unchanged() {
        let mut t = MsixTable::new(2);
        let c = t.write(12, &1u32.to_le_bytes());
        assert_eq!(
            c,
            vec![MaskChange {
                vector: 0,
                masked: true
            }]
        );
        assert!(
            t.write(0, &[0; 8]).is_empty(),
            "address only: no mask change"
        );
    }

    #[test]
    fn partial_writes_keep_other_bytes() {
        let mut t = MsixTable::new(1);
        t.write(8, &0xabcdu32.to_le_bytes());
        t.write(0, &0xfee0_1000u32.to_le_bytes());
        let e = t.entry(0).unwrap();
        assert_eq!((e.addr, e.data, e.masked()), (0xfee0_1000, 0xabcd, true));
    }

    #[test]
    fn image_round_trips_and_size_is_checked() {
        let mut t = MsixTable::new(2);
        t.write(12, &0u32.to_le_bytes());
        let img = t.image();
        let mut u = MsixTable::new(2);
        u.restore(&img).unwrap();
        assert_eq!(t, u);
        assert!(u.restore(&img[..16]).is_err());
    }
}
