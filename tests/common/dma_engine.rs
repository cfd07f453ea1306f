//! Driving a `dma-engine` device as its guest driver would: BAR0 register access, one
//! operation run to completion, and guest memory served over the socket (no fds).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use vfud_devices::dma_engine::{reg, Opcode, STATUS_DONE, STATUS_ERROR};
use vfud_protocol::client::DmaHandler;
use vfud_protocol::Client;

/// Write a BAR0 register.
pub fn w(c: &mut Client, off: u64, v: u32) {
    c.region_write_u32(0, off, v).unwrap();
}

/// Read a BAR0 register.
pub fn r(c: &mut Client, off: u64) -> u32 {
    c.region_read_u32(0, off).unwrap()
}

/// The register writes, in order, that program an operation and ring the doorbell.
pub fn job_registers(op: Opcode, src: u64, dst: u64, len: u32, pattern: u32) -> [(u64, u32); 8] {
    [
        (reg::SRC_LO, src as u32),
        (reg::SRC_HI, (src >> 32) as u32),
        (reg::DST_LO, dst as u32),
        (reg::DST_HI, (dst >> 32) as u32),
        (reg::LEN, len),
        (reg::OPCODE, op as u32),
        (reg::PATTERN, pattern),
        (reg::DOORBELL, 1),
    ]
}

/// Program and start an operation, then poll STATUS until it leaves BUSY; returns STATUS.
pub fn run_op(c: &mut Client, op: Opcode, src: u64, dst: u64, len: u32, pattern: u32) -> u32 {
    for (o, v) in job_registers(op, src, dst, len, pattern) {
        w(c, o, v);
    }
    for _ in 0..2000 {
        let s = r(c, reg::STATUS);
        if s & (STATUS_DONE | STATUS_ERROR) != 0 {
            return s;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("operation did not finish");
}

/// Guest memory without an fd: a buffer at IOVA `.1`, served to DMA_READ/DMA_WRITE.
pub struct VecMemory(pub Arc<Mutex<Vec<u8>>>, pub u64);

impl DmaHandler for VecMemory {
    fn dma_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let m = self.0.lock().unwrap();
        let off = addr.checked_sub(self.1).ok_or(Errno::EFAULT)? as usize;
        buf.copy_from_slice(m.get(off..off + buf.len()).ok_or(Errno::EFAULT)?);
        Ok(())
    }
    fn dma_write(&mut self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        let mut m = self.0.lock().unwrap();
        let off = addr.checked_sub(self.1).ok_or(Errno::EFAULT)? as usize;
        m.get_mut(off..off + data.len())
            .ok_or(Errno::EFAULT)?
            .copy_from_slice(data);
        Ok(())
    }
}
