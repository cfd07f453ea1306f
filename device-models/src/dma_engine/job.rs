//! Executing a dma-engine job in slices that never block on the client.

use serde::{Deserialize, Serialize};
use vfud_server::dma::Iova;
use vfud_server::mmap::SharedMemory;
use vfud_server::{DeviceCtx, DeviceError, DmaError};

use super::{Opcode, Registers, BAR_MEM, CHUNK, MAX_LEN};

/// Progress of the job in flight; part of the migrated state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Bytes done.
    pub done: u64,
    /// CRC32 of the bytes done so far (CRC opcodes).
    pub crc: u32,
    /// Every byte was moved; waiting for posted socket writes to be acknowledged.
    pub settling: bool,
}

/// What one slice achieved.
pub(crate) enum Progress {
    /// The job ended (successfully or not).
    Done(Result<(), DeviceError>),
    /// The slice is used up; more next turn.
    More,
    /// Waiting for the client to answer socket DMA; run again when it does.
    Waiting,
}

fn device_mem<'a>(cx: &'a DeviceCtx<'_>) -> Result<&'a SharedMemory, DeviceError> {
    cx.bar_memory(BAR_MEM)
        .ok_or_else(|| DeviceError::Other("device memory missing".into()))
}

/// Move one chunk at `done`; `Err(Pending)` leaves `regs.job` as it was.
fn chunk(
    regs: &mut Registers,
    op: Opcode,
    buf: &mut [u8],
    cx: &mut DeviceCtx<'_>,
) -> Result<(), DeviceError> {
    let done = regs.job.done;
    let (s, d) = (regs.src + done, regs.dst + done);
    match op {
        Opcode::Copy => {
            cx.mem().read(Iova(s), buf)?;
            cx.mem().write(Iova(d), buf)?;
        }
        Opcode::Fill => {
            buf.fill(regs.pattern as u8);
            cx.mem().write(Iova(d), buf)?;
        }
        Opcode::Crc32 | Opcode::Crc32Device => {
            match op {
                Opcode::Crc32 => cx.mem().read(Iova(s), buf)?,
                _ => device_mem(cx)?.read(s, buf)?,
            }
            let mut h = crc32fast::Hasher::new_with_initial(regs.job.crc);
            h.update(buf);
            regs.job.crc = h.finalize();
        }
        Opcode::CopyToDevice => {
            cx.mem().read(Iova(s), buf)?;
            device_mem(cx)?.write(d, buf)?;
        }
        Opcode::CopyFromDevice => {
            device_mem(cx)?.read(s, buf)?;
            cx.mem().write(Iova(d), buf)?;
        }
        Opcode::FillDevice => device_mem(cx)?.fill(d, buf.len(), regs.pattern as u8)?,
    }
    regs.job.done += buf.len() as u64;
    Ok(())
}

/// Advance the job in flight by at most `slice` bytes.
pub(crate) fn advance(regs: &mut Registers, slice: u32, cx: &mut DeviceCtx<'_>) -> Progress {
    let Some(op) = Opcode::from_u32(regs.opcode) else {
        let e = DeviceError::BadAccess(format!("unknown opcode {}", regs.opcode));
        return Progress::Done(Err(e));
    };
    if regs.len > MAX_LEN {
        return Progress::Done(Err(DeviceError::BadAccess(format!(
            "length {} too large",
            regs.len
        ))));
    }
    let len = u64::from(regs.len);
    let mut moved = 0u64;
    let mut buf = vec![0u8; CHUNK.min(regs.len as usize)];
    while regs.job.done < len && !regs.job.settling {
        if moved >= u64::from(slice) {
            return Progress::More;
        }
        let n = (len - regs.job.done).min(CHUNK as u64) as usize;
        match chunk(regs, op, &mut buf[..n], cx) {
            Ok(()) => moved += n as u64,
            Err(DeviceError::Dma(DmaError::Pending)) => return Progress::Waiting,
            Err(e) => return Progress::Done(Err(e)),
        }
    }
    // Every byte is out; a guest that sees DONE must also see the data.
    regs.job.settling = true;
    match cx.mem().settle() {
        Err(DmaError::Pending) => return Progress::Waiting,
        Err(e) => return Progress::Done(Err(e.into())),
        Ok(()) => {}
    }
    if matches!(op, Opcode::Crc32 | Opcode::Crc32Device) {
        regs.result = regs.job.crc;
    }
    Progress::Done(Ok(()))
}
