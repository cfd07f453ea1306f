//! Scale: the largest tables and counts the protocol allows, and many devices per process.
//!
//! **DMA maps** (`dma-maps`): 65 535 DMA_MAPs of 4 KiB (QEMU's `max_dma_maps`), then as many
//! DMA_UNMAPs, against `vfud serve`. The maps carry no fd: fd-backed maps would each need an
//! mmap, and 65 535 of them exceed Linux's default `vm.max_map_count` (65 530) before vfud is
//! even involved. Baseline: the same number of raw round trips of the same sizes (48/16 bytes
//! for a map, 40/40 for an unmap), measured on 20 000 and scaled.
//!
//! **DMA lookup** (`dma-lookup`): the cost of finding the mapping on every device access, with
//! 65 535 maps versus 16, in this process with the server's [`DmaTable`] and [`GuestMem`].
//! In both tables the same 16 mappings are fd-backed (the others, in the large table, are
//! socket-backed 4 KiB maps between them) and the same pseudo-random sequence of 8-byte reads
//! hits them, so the data touched is identical and only the table size differs.
//!
//! **MSI-X** (`msix-2048`): the bench-only [`super::msix2048`] device; its 2 048 vectors get
//! one eventfd each in one SET_IRQS sequence (16 fds per message, the negotiated
//! `max_msg_fds`: 128 messages of 36 bytes answered with 16). Baseline: 128 raw messages of
//! those sizes carrying the same fds to a peer that receives and closes them. One vector is
//! then triggered to check the eventfds are in force.
//!
//! **Devices per process** (`devices-64`): one `vfud serve` with 64 dma-engines, each with a
//! negotiated client, against one with a single dma-engine: the resident memory each extra
//! device costs (`VmRSS` of the server process).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vfud_devices::dma_engine::reg;
use vfud_protocol::messages::dma::{DmaMap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::irq::IRQ_INDEX_MSIX;
use vfud_protocol::messages::IrqAction;
use vfud_protocol::Client;
use vfud_server::dma::{DmaTable, GuestMem, Iova};
use vfud_server::mmap::SharedMemory;

use super::harness::{median, rss_kib, seconds, Ctx, Goal, Row, Samples, Unit};
use super::msix2048::VECTORS;
use super::raw;

const PAGE: u64 = 4096;
const MAPS: u64 = 65_535;
const BASE: u64 = 1 << 32;

/// Scenario `dma-maps`.
pub fn dma_maps(ctx: &mut Ctx) -> Result<Vec<Row>> {
    let (_srv, sock) = ctx.serve_device("dma-engine")?;
    let mut c = Client::connect_negotiated(&sock)?;
    if u64::from(c.negotiated().max_dma_maps) < MAPS {
        bail!("negotiated max_dma_maps is {}", c.negotiated().max_dma_maps);
    }
    let rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
    let map_s = seconds(|| {
        for i in 0..MAPS {
            c.dma_map(rw, 0, BASE + i * PAGE, PAGE, None)?;
        }
        anyhow::Ok(())
    })?;
    let unmap_s = seconds(|| {
        for i in 0..MAPS {
            c.dma_unmap(BASE + i * PAGE, PAGE)?;
        }
        anyhow::Ok(())
    })?;
    let mut r = ctx.raw(raw::Mode::Plain)?;
    let (map_req, unmap_req) = (raw::message(48, Some(16)), raw::message(40, Some(40)));
    let mut reply = [0u8; 40];
    let (mut bm, mut bu) = (Samples::default(), Samples::default());
    for _ in 0..20_000 {
        bm.time(|| r.round_trip(&map_req, &mut reply[..16]))?;
        bu.time(|| r.round_trip(&unmap_req, &mut reply[..40]))?;
    }
    let scaled = |s: &Samples| s.mean_us() * MAPS as f64 / 1e3;
    Ok(vec![
        Row::new(
            "dma-maps 65535 x DMA_MAP",
            Unit::Ms,
            map_s * 1e3,
            scaled(&bm),
            "raw ping-pong of the same sizes, same count",
            Goal::None,
        ),
        Row::new(
            "dma-maps 65535 x DMA_UNMAP",
            Unit::Ms,
            unmap_s * 1e3,
            scaled(&bu),
            "raw ping-pong of the same sizes, same count",
            Goal::None,
        ),
    ])
}

/// A table of `n` 4 KiB maps whose 16 fd-backed ones (pages of `mem`) are returned by IOVA.
fn lookup_table(n: u64, mem: &SharedMemory) -> Result<(DmaTable, Vec<u64>)> {
    let mut t = DmaTable::new(n as usize);
    let stride = n / 16;
    let mut targets = Vec::new();
    for i in 0..n {
        let fd = if i % stride == 0 && targets.len() < 16 {
            Some(mem.fd().try_clone_to_owned()?)
        } else {
            None
        };
        let m = DmaMap {
            argsz: 32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset: targets.len() as u64 * PAGE,
            addr: BASE + i * PAGE,
            size: PAGE,
        };
        if fd.is_some() {
            targets.push(m.addr);
        }
        t.map(&m, fd)?;
    }
    Ok((t, targets))
}

/// Scenario `dma-lookup`.
pub fn dma_lookup(_ctx: &mut Ctx) -> Result<Vec<Row>> {
    const READS: usize = 1 << 20;
    let mem = SharedMemory::new("vfud-bench-lookup", 16 * PAGE as usize)?;
    let (big, big_targets) = lookup_table(MAPS, &mem)?;
    let (small, small_targets) = lookup_table(16, &mem)?;
    // xorshift: the same (mapping, offset) sequence for both tables.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let picks: Vec<(usize, u64)> = (0..READS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x % 16) as usize, (x >> 8) % (PAGE / 8) * 8)
        })
        .collect();
    let run = |t: &DmaTable, targets: &[u64]| -> Result<f64> {
        let mut gm = GuestMem::new(t, None);
        let mut b = [0u8; 8];
        let mut sum = 0u64;
        let s = seconds(|| {
            for &(k, off) in &picks {
                gm.read(Iova(targets[k] + off), &mut b)?;
                sum = sum.wrapping_add(u64::from_le_bytes(b));
            }
            anyhow::Ok(())
        })?;
        std::hint::black_box(sum);
        Ok(s * 1e9 / READS as f64)
    };
    let (mut vb, mut vs) = (Vec::new(), Vec::new());
    for rep in 0..6 {
        let b = run(&big, &big_targets)?;
        let s = run(&small, &small_targets)?;
        if rep > 0 {
            vb.push(b);
            vs.push(s);
        }
    }
    Ok(vec![Row::new(
        "dma-lookup 8-byte read, 65535 maps",
        Unit::Ns,
        median(vb),
        median(vs),
        "the same reads with 16 maps",
        Goal::None,
    )])
}

/// Scenario `msix-2048`.
pub fn msix(ctx: &mut Ctx) -> Result<Vec<Row>> {
    let (_srv, sock) = ctx.serve_bench_model("msix2048")?;
    let mut c = Client::connect_negotiated(&sock)?;
    let info = c.irq_info(IRQ_INDEX_MSIX)?;
    if info.count != VECTORS {
        bail!("device has {} MSI-X vectors, not {VECTORS}", info.count);
    }
    let per = c.negotiated().max_msg_fds.max(1) as usize;
    let fds = (0..VECTORS)
        .map(|_| EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK))
        .collect::<Result<Vec<_>, _>>()?;
    let b: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let mut r = ctx.raw(raw::Mode::Fds)?;
    let req = raw::message(16 + 20, Some(16));
    let mut reply = [0u8; 16];
    let (mut v, mut base) = (Vec::new(), Vec::new());
    for rep in 0..6 {
        v.push(
            seconds(|| {
                for (i, chunk) in b.chunks(per).enumerate() {
                    c.set_irq_eventfds(IRQ_INDEX_MSIX, (i * per) as u32, chunk)?;
                }
                anyhow::Ok(())
            })? * 1e3,
        );
        if rep == 0 {
            c.irq_action(IrqAction::Trigger, IRQ_INDEX_MSIX, VECTORS - 1, 1)?;
            if fds[VECTORS as usize - 1].read().is_err() {
                bail!("MSI-X vector {} did not fire", VECTORS - 1);
            }
        }
        c.disable_irqs(IRQ_INDEX_MSIX)?;
        base.push(
            seconds(|| {
                for chunk in b.chunks(per) {
                    r.round_trip_fds(&req, chunk, &mut reply)?;
                }
                anyhow::Ok(())
            })? * 1e3,
        );
    }
    Ok(vec![Row::new(
        format!(
            "msix-2048 SET_IRQS ({} x {per} fds)",
            VECTORS as usize / per
        ),
        Unit::Ms,
        median(v),
        median(base),
        "raw messages of the same sizes carrying the same fds",
        Goal::None,
    )])
}

/// RSS of one `vfud serve` with `n` dma-engines, each with a negotiated client.
fn serve_rss(ctx: &mut Ctx, n: usize) -> Result<u64> {
    let socks: Vec<PathBuf> = (0..n).map(|_| ctx.path("dev")).collect();
    let mut args = Vec::new();
    for s in &socks {
        args.extend(["--device".into(), "dma-engine".into(), "--socket".into()]);
        args.push(s.clone().into());
    }
    let p = ctx.serve(&args, &socks)?;
    let mut clients = Vec::new();
    for s in &socks {
        let mut c = Client::connect_negotiated(s)
            .with_context(|| format!("connecting to {}", s.display()))?;
        c.region_read(0, reg::ID, 4)?;
        clients.push(c);
    }
    std::thread::sleep(Duration::from_millis(200));
    rss_kib(p.pid())
}

/// Scenario `devices-64`.
pub fn devices(ctx: &mut Ctx) -> Result<Vec<Row>> {
    let one = median(
        (0..3)
            .map(|_| serve_rss(ctx, 1).map(|x| x as f64))
            .collect::<Result<_>>()?,
    );
    let many = serve_rss(ctx, 64)? as f64;
    Ok(vec![
        Row::new(
            "devices-64 RSS per extra device",
            Unit::KiB,
            (many - one) / 63.0,
            one,
            "RSS of a vfud serve process with 1 device (client attached)",
            Goal::None,
        ),
        Row::new(
            "devices-64 RSS of the process",
            Unit::KiB,
            many,
            one * 64.0,
            "64 one-device processes",
            Goal::None,
        ),
    ])
}
