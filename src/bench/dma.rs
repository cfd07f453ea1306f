//! DMA: a device reading and writing guest RAM.
//!
//! **fd-mapped RAM** (`dma-mmap`): the client's usual case — guest RAM is a memfd passed with
//! DMA_MAP and mapped by the server. Measured in this process with the server's own types: a
//! [`DmaTable`] holding one 64 MiB mapping of a memfd and [`GuestMem`] reads and writes in
//! 64 KiB pieces (dma-engine's chunk), as a device model does them. The baseline copies the
//! same bytes between the same memfd pages (through a second plain mapping,
//! [`SharedMemory`], whose `read`/`write` are one `memcpy` each) and the same buffer. What the
//! ratio shows is the accessor: lookup, bounds and permission checks, `vm-memory`'s volatile
//! copy and, on writes, dirty-page logging.
//!
//! **Socket fallback** (`dma-socket`): guest RAM mapped without an fd, so the server must ask
//! the client with DMA_READ/DMA_WRITE (64 KiB each). dma-engine computes a CRC32 of 16 MiB
//! (256 DMA_READs, each a 32-byte request and a 64 KiB + 32-byte reply) and fills 16 MiB
//! (256 DMA_WRITEs of 64 KiB + 32 bytes answered with 32 bytes), against `vfud serve` in
//! another process, timed from the doorbell write to STATUS.DONE. The baseline is the same
//! number of exchanges of the same sizes with the raw peer.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nix::errno::Errno;
use vfud_devices::dma_engine::{reg, Opcode, STATUS_DONE, STATUS_ERROR};
use vfud_protocol::client::DmaHandler;
use vfud_protocol::messages::dma::{DmaMap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::Client;
use vfud_server::dma::{DmaTable, GuestMem, Iova};
use vfud_server::mmap::SharedMemory;

use super::harness::{median, seconds, Ctx, Goal, Row, Unit};
use super::raw;

const IOVA: u64 = 0x1_0000_0000;
const RAM: usize = 64 << 20;
const PIECE: usize = 64 * 1024;

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ 0xa5)
        .collect()
}

/// Scenario `dma-mmap`.
pub fn mmap(_ctx: &mut Ctx) -> Result<Vec<Row>> {
    let mem = SharedMemory::new("vfud-bench-guest-ram", RAM)?;
    mem.write(0, &pattern(RAM))?;
    let mut table = DmaTable::new(16);
    table.map(
        &DmaMap {
            argsz: 32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset: 0,
            addr: IOVA,
            size: RAM as u64,
        },
        Some(mem.fd().try_clone_to_owned()?),
    )?;
    let mut gm = GuestMem::new(&table, None);
    let mut buf = vec![0u8; PIECE];
    let offsets = || (0..RAM).step_by(PIECE);
    let gbps = |s: f64| RAM as f64 / s / 1e9;
    let mut pass = |which: u8, buf: &mut [u8]| -> Result<f64> {
        let s = seconds(|| {
            for off in offsets() {
                let iova = Iova(IOVA + off as u64);
                match which {
                    0 => gm.read(iova, buf)?,
                    1 => mem.read(off as u64, buf)?,
                    2 => gm.write(iova, buf)?,
                    _ => mem.write(off as u64, buf)?,
                }
            }
            anyhow::Ok(())
        })?;
        std::hint::black_box(&buf);
        Ok(gbps(s))
    };
    let mut r = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for rep in 0..9 {
        for (which, v) in r.iter_mut().enumerate() {
            let x = pass(which as u8, &mut buf)?;
            if rep > 0 {
                v.push(x);
            }
        }
    }
    let [gr, mr, gw, mw] = r;
    const BASE: &str = "memcpy between the same memfd pages and the same buffer";
    Ok(vec![
        Row::new(
            "dma-mmap read (64 KiB pieces)",
            Unit::GBps,
            median(gr),
            median(mr),
            BASE,
            Goal::RatioMin(0.8),
        ),
        Row::new(
            "dma-mmap write (64 KiB pieces)",
            Unit::GBps,
            median(gw),
            median(mw),
            BASE,
            Goal::RatioMin(0.8),
        ),
    ])
}

/// Guest RAM the client serves DMA_READ/DMA_WRITE from.
struct VecRam {
    base: u64,
    mem: Vec<u8>,
}

impl VecRam {
    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, Errno> {
        let off = addr
            .checked_sub(self.base)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or(Errno::EFAULT)?;
        let end = off.checked_add(len).ok_or(Errno::EFAULT)?;
        if end > self.mem.len() {
            return Err(Errno::EFAULT);
        }
        Ok(off..end)
    }
}

impl DmaHandler for VecRam {
    fn dma_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.mem[r]);
        Ok(())
    }

    fn dma_write(&mut self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        let r = self.range(addr, data.len())?;
        self.mem[r].copy_from_slice(data);
        Ok(())
    }
}

const JOB: usize = 16 << 20;

/// Program and run one dma-engine operation; returns seconds from doorbell to DONE.
fn job(c: &mut Client, op: Opcode, src: u64, dst: u64, len: usize) -> Result<f64> {
    for (o, v) in [
        (reg::SRC_LO, src as u32),
        (reg::SRC_HI, (src >> 32) as u32),
        (reg::DST_LO, dst as u32),
        (reg::DST_HI, (dst >> 32) as u32),
        (reg::LEN, len as u32),
        (reg::OPCODE, op as u32),
        (reg::PATTERN, 0x3c),
    ] {
        c.region_write_u32(0, o, v)?;
    }
    let t = Instant::now();
    c.region_write_u32(0, reg::DOORBELL, 1)?;
    let status = loop {
        let s = c.region_read_u32(0, reg::STATUS)?;
        if s & (STATUS_DONE | STATUS_ERROR) != 0 {
            break s;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("dma-engine operation did not finish");
        }
    };
    let secs = t.elapsed().as_secs_f64();
    if status & STATUS_ERROR != 0 {
        bail!(
            "dma-engine operation failed with code {}",
            c.region_read_u32(0, reg::ERROR_CODE)?
        );
    }
    c.region_write_u32(0, reg::STATUS, STATUS_DONE)?;
    Ok(secs)
}

/// Scenario `dma-socket`.
pub fn socket(ctx: &mut Ctx) -> Result<Vec<Row>> {
    let (_srv, sock) = ctx.serve_device("dma-engine")?;
    let mut c = Client::connect_negotiated(&sock)?;
    let data = pattern(JOB);
    let want_crc = crc32fast::hash(&data);
    c.set_dma_handler(Box::new(VecRam {
        base: IOVA,
        mem: data,
    }));
    c.dma_map(
        DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        0,
        IOVA,
        JOB as u64,
        None,
    )?;
    let mut r = ctx.raw(raw::Mode::Plain)?;
    let n = JOB / PIECE;
    let read_req = raw::message(32, Some(32 + PIECE));
    let write_req = raw::message(32 + PIECE, Some(32));
    let mut reply = vec![0u8; 32 + PIECE];
    let gbps = |s: f64| JOB as f64 / s / 1e9;
    let (mut vr, mut br, mut vw, mut bw) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..5 {
        let s = job(&mut c, Opcode::Crc32, IOVA, 0, JOB)?;
        if rep == 0 && c.region_read_u32(0, reg::RESULT)? != want_crc {
            bail!("CRC32 over socket DMA is wrong");
        }
        vr.push(gbps(s));
        br.push(gbps(seconds(|| {
            for _ in 0..n {
                r.round_trip(&read_req, &mut reply)?;
            }
            anyhow::Ok(())
        })?));
        vw.push(gbps(job(&mut c, Opcode::Fill, 0, IOVA, JOB)?));
        bw.push(gbps(seconds(|| {
            for _ in 0..n {
                r.round_trip(&write_req, &mut reply[..32])?;
            }
            anyhow::Ok(())
        })?));
    }
    Ok(vec![
        Row::new(
            "dma-socket DMA_READ (CRC32 16 MiB)",
            Unit::GBps,
            median(vr),
            median(br),
            "raw 32-byte request / 64 KiB+32-byte reply ping-pong, same count",
            Goal::None,
        ),
        Row::new(
            "dma-socket DMA_WRITE (FILL 16 MiB)",
            Unit::GBps,
            median(vw),
            median(bw),
            "raw 64 KiB+32-byte request / 32-byte reply ping-pong, same count",
            Goal::None,
        ),
    ])
}
