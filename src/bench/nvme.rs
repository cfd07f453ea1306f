//! NVMe doorbells (`nvme-doorbell`): what a submission costs from the doorbell to its
//! completion interrupt, with the doorbell page mmap'd (`doorbells=mmap`) and trapped
//! (`doorbells=trap`, a posted REGION_WRITE as QEMU sends it).
//!
//! A host-side driver over the vfud client plays the guest: a memfd mapped with DMA_MAP is
//! guest RAM holding the queues and the data buffer, MSI-X vector 1 is an eventfd. It enables
//! the controller, creates one I/O queue pair (shadow doorbells off, so every doorbell is a
//! register write), then times each 4 KiB Read from the SQ tail doorbell to the completion's
//! interrupt, the entry checked in RAM; the CQ head doorbell follows the same way, untimed.
//! Back to back the watcher thread stays in its spin; after 2 ms idle it naps, which is the
//! worst case of mmap'd doorbells. A last row is the server's CPU time (all its threads, from
//! `/proc/PID/task/*/schedstat`) per back-to-back read: what the polling costs. The ratio is
//! mmap ÷ trap.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vfud_devices::nvme::dbpage::DoorbellMode;
use vfud_devices::nvme::spec::{self, admin, io, reg};
use vfud_protocol::messages::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::irq::IRQ_INDEX_MSIX;
use vfud_protocol::messages::region::PCI_CONFIG_REGION_INDEX;
use vfud_protocol::Client;
use vfud_server::mmap::SharedMemory;

use super::harness::{Ctx, Goal, Row, Samples, Unit};

const IOVA: u64 = 0x1_0000_0000;
const RAM: usize = 1 << 20;
const ASQ: u64 = 0;
const ACQ: u64 = 0x1000;
const SQ1: u64 = 0x2000;
const CQ1: u64 = 0x3000;
const BUF: u64 = 0x10000;
const ENTRIES: u16 = 64;
const BAR0_SIZE: usize = 16 * 1024;
const BACK_TO_BACK: usize = 4000;
const AFTER_IDLE: usize = 150;
const IDLE: Duration = Duration::from_millis(2);

/// A one-queue-pair host driver.
struct Driver {
    client: Client,
    ram: SharedMemory,
    page: Option<SharedMemory>,
    irq: EventFd,
    tails: [u16; 2],
    heads: [u16; 2],
    phases: [bool; 2],
    cid: u16,
}

impl Driver {
    fn start(ctx: &mut Ctx, ring: DoorbellMode) -> Result<(super::harness::Proc, Self)> {
        let (srv, sock) = ctx.serve_device(&format!(
            "nvme,queues=1,shadow=off,doorbells={}",
            ring.as_str()
        ))?;
        let mut client = Client::connect_negotiated(&sock)?;
        let ram = SharedMemory::new("vfud-bench-nvme-ram", RAM)?;
        let rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
        client.dma_map(rw, 0, IOVA, RAM as u64, Some(ram.fd()))?;
        client.region_write(PCI_CONFIG_REGION_INDEX, 4, &6u16.to_le_bytes())?; // mem + bus master
        let irq = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?;
        client.set_irq_eventfds(IRQ_INDEX_MSIX, 1, &[irq.as_fd()])?; // the I/O CQ's vector
        client.region_write(4, 16 + 12, &[0; 4])?; // unmask MSI-X vector 1 (table in BAR4)
        let page = match ring {
            DoorbellMode::Trap => None,
            DoorbellMode::Mmap => {
                let (_, fd) = client.region_info(0)?;
                let fd = fd.context("BAR0 offers no doorbell page")?;
                Some(SharedMemory::from_fd(fd, BAR0_SIZE)?)
            }
        };
        let mut d = Self {
            client,
            ram,
            page,
            irq,
            tails: [0; 2],
            heads: [0; 2],
            phases: [true; 2],
            cid: 0,
        };
        d.enable()?;
        Ok((srv, d))
    }

    fn enable(&mut self) -> Result<()> {
        let aqa = u32::from(ENTRIES - 1) << 16 | u32::from(ENTRIES - 1);
        let c = &mut self.client;
        c.region_write(0, reg::AQA, &aqa.to_le_bytes())?;
        c.region_write(0, reg::ASQ, &(IOVA + ASQ).to_le_bytes())?;
        c.region_write(0, reg::ACQ, &(IOVA + ACQ).to_le_bytes())?;
        let cc = spec::CC_EN | 6 << 16 | 4 << 20;
        c.region_write(0, reg::CC, &cc.to_le_bytes())?;
        let start = Instant::now();
        while c.region_read_u32(0, reg::CSTS)? & spec::CSTS_RDY == 0 {
            if start.elapsed() > Duration::from_secs(5) {
                bail!("the controller did not become ready");
            }
        }
        let size = u32::from(ENTRIES - 1) << 16 | 1;
        // CQ 1: physically contiguous, interrupts on vector 1; SQ 1 on CQ 1.
        self.admin(admin::CREATE_CQ, IOVA + CQ1, [size, 1 | 2 | 1 << 16])?;
        self.admin(admin::CREATE_SQ, IOVA + SQ1, [size, 1 | 1 << 16])?;
        Ok(())
    }

    /// An admin command, rung over the socket and polled for.
    fn admin(&mut self, op: u8, prp1: u64, cdw: [u32; 2]) -> Result<()> {
        let mut s = [0u32; 16];
        s[0] = u32::from(op);
        s[6] = prp1 as u32;
        s[7] = (prp1 >> 32) as u32;
        s[10] = cdw[0];
        s[11] = cdw[1];
        self.put(0, s)?;
        let t = u32::from(self.tails[0]);
        self.client.region_write_u32(0, reg::DOORBELLS, t)?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.reap(0)? {
                if status != 0 {
                    bail!("admin command {op:#x} failed with status {status:#x}");
                }
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(5) {
                bail!("admin command {op:#x} did not complete");
            }
        }
    }

    /// Write an SQE at SQ `q`'s tail (not rung yet).
    fn put(&mut self, q: usize, mut s: [u32; 16]) -> Result<()> {
        self.cid = self.cid.wrapping_add(1);
        s[0] |= u32::from(self.cid) << 16;
        let bytes: Vec<u8> = s.iter().flat_map(|d| d.to_le_bytes()).collect();
        let base = if q == 0 { ASQ } else { SQ1 };
        self.ram
            .write(base + u64::from(self.tails[q]) * 64, &bytes)?;
        self.tails[q] = (self.tails[q] + 1) % ENTRIES;
        Ok(())
    }

    /// Take CQ `q`'s next entry, if there, and ring its head; its status.
    fn reap(&mut self, q: usize) -> Result<Option<u16>> {
        let base = if q == 0 { ACQ } else { CQ1 };
        let mut e = [0u8; 16];
        self.ram
            .read(base + u64::from(self.heads[q]) * 16, &mut e)?;
        let sf = u16::from_le_bytes([e[14], e[15]]);
        if (sf & 1 == 1) != self.phases[q] {
            return Ok(None);
        }
        self.heads[q] = (self.heads[q] + 1) % ENTRIES;
        if self.heads[q] == 0 {
            self.phases[q] = !self.phases[q];
        }
        let off = reg::DOORBELLS + 8 * q as u64 + 4;
        self.doorbell(off, u32::from(self.heads[q]), q == 0)?;
        Ok(Some(sf >> 1))
    }

    /// Ring: a store into the page, or a posted REGION_WRITE (replied for admin).
    fn doorbell(&mut self, off: u64, v: u32, admin: bool) -> Result<()> {
        match (&self.page, admin) {
            (Some(page), false) => page.write(off, &v.to_le_bytes())?,
            (_, true) => self.client.region_write_u32(0, off, v)?,
            (None, false) => self.client.region_write_posted(0, off, &v.to_le_bytes())?,
        }
        Ok(())
    }

    /// One 4 KiB Read: ns from the doorbell to the interrupt.
    fn read_once(&mut self) -> Result<u64> {
        let mut s = [0u32; 16];
        s[0] = u32::from(io::READ);
        s[1] = 1;
        s[6] = (IOVA + BUF) as u32;
        s[7] = ((IOVA + BUF) >> 32) as u32;
        self.put(1, s)?;
        let t = Instant::now();
        self.doorbell(reg::DOORBELLS + 8, u32::from(self.tails[1]), false)?;
        self.irq.read()?;
        let took = super::harness::ns(t);
        match self.reap(1)? {
            Some(0) => Ok(took),
            Some(st) => bail!("read failed with status {st:#x}"),
            None => bail!("an interrupt without a completion entry"),
        }
    }
}

fn measure(d: &mut Driver, n: usize, gap: Option<Duration>) -> Result<Samples> {
    let mut s = Samples::default();
    for _ in 0..n {
        if let Some(g) = gap {
            std::thread::sleep(g);
        }
        s.0.push(d.read_once()?);
    }
    Ok(s)
}

/// Scenario `nvme-doorbell`.
pub fn doorbell(ctx: &mut Ctx) -> Result<Vec<Row>> {
    let (ms, mut mmap) = Driver::start(ctx, DoorbellMode::Mmap)?;
    let (ts, mut trap) = Driver::start(ctx, DoorbellMode::Trap)?;
    measure(&mut mmap, 500, None)?;
    measure(&mut trap, 500, None)?;
    let (mut bm, mut bt) = (Samples::default(), Samples::default());
    let (mut cpu_m, mut cpu_t) = (0, 0);
    for _ in 0..4 {
        let c = cpu_ns(ms.pid())?;
        bm.0.extend(measure(&mut mmap, BACK_TO_BACK / 4, None)?.0);
        cpu_m += cpu_ns(ms.pid())? - c;
        let c = cpu_ns(ts.pid())?;
        bt.0.extend(measure(&mut trap, BACK_TO_BACK / 4, None)?.0);
        cpu_t += cpu_ns(ts.pid())? - c;
    }
    let im = measure(&mut mmap, AFTER_IDLE, Some(IDLE))?;
    let it = measure(&mut trap, AFTER_IDLE, Some(IDLE))?;
    let per_read = |ns: u64| ns as f64 / BACK_TO_BACK as f64 / 1e3;
    const BASE: &str = "the same Read with the doorbell trapped (posted REGION_WRITE)";
    let row = |name: &str, m: &Samples, t: &Samples, p: f64| {
        Row::percentile(format!("nvme-doorbell {name}"), m, t, p, BASE, Goal::None)
    };
    Ok(vec![
        row("4 KiB read, back to back, median", &bm, &bt, 50.0),
        row("4 KiB read, back to back, p99", &bm, &bt, 99.0),
        row("4 KiB read, after 2 ms idle, median", &im, &it, 50.0),
        Row::new(
            "nvme-doorbell server CPU per read, back to back",
            Unit::Us,
            per_read(cpu_m),
            per_read(cpu_t),
            "the same Read with the doorbell trapped (posted REGION_WRITE)",
            Goal::None,
        ),
    ])
}

/// CPU time of every thread of process `pid` so far, in ns (`/proc/PID/task/*/schedstat`;
/// with `--wrap` that is the wrapper's, so the row means little then).
fn cpu_ns(pid: u32) -> Result<u64> {
    let mut sum = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(t?.path().join("schedstat")).unwrap_or_default();
        sum += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(sum)
}
