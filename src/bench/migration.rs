//! Migration: stream bandwidth, downtime, and the pause of a live handover.
//!
//! **Stream bandwidth** (`mig-data`): the bench-only [`super::bigmem`] device (256 MiB of
//! device memory, filled with a pattern first) runs in a child process; the client walks it to
//! STOP_COPY and reads the whole stream with 1 MiB MIG_DATA_READs. Each request is 24 bytes
//! and each reply 1 MiB + 24 bytes, so the baseline is the same number of 24-byte requests
//! answered with 1 MiB + 24-byte replies by the raw peer: the socket's bandwidth for exactly
//! this exchange. Everything vfud does beyond that (producing the stream from device memory,
//! checksumming it, framing and copying) shows as the ratio.
//!
//! **Downtime** (`downtime`): two bigmem servers, source memory filled with a pattern, and the
//! migration driver ([`vfud::driver`]) moving the device between them. With PRE_COPY the memory
//! is copied while the VM runs; 1% of its pages (655 of 65 536) are then rewritten through the
//! BAR's fd, after their copy was sent and before the driver decides to stop, so they must go
//! in the stop-copy phase — the dirtying a last pre-copy round always leaves behind. (It
//! happens in `VmHooks::progress`, which the driver calls after a round's copy and before its
//! convergence check; `VmHooks::tick` runs before the round's copy, so pages dirtied there
//! would simply ride along in it.) The baseline is stop-and-copy of the same device with the
//! same pages written before the stop: everything moves while the VM is stopped. The driver
//! always pre-copies when the device offers it, so the baseline drives the same steps as the
//! driver's stop phase (source to STOP_COPY, read until empty with the driver's own
//! [`driver::copy_stream`], restore config and interrupts, destination to RUNNING), and times it the same
//! way: from the stop to the destination running. Both runs check that the dirtied pages
//! arrived.
//!
//! **Handover** (`handover`): `vfud serve --control` hands a running dma-engine, with its
//! client attached, to a `vfud serve --incoming` process (`vfud migrate --handover --json`)
//! while the client issues back-to-back 4-byte reads. Reported: the server-measured pause
//! (`pause_ms`: from the old process stopping to the new one's first reply) and the longest
//! read the client saw, each against the median read round trip measured just before.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vfud::driver::{self, vm, Channel, Endpoint, Options, Progress, VmHooks};
use vfud_devices::dma_engine::reg;
use vfud_protocol::messages::MigState;
use vfud_protocol::Client;
use vfud_server::mmap::SharedMemory;

use super::bigmem::{MEMORY_BAR, MEMORY_SIZE};
use super::harness::{median, seconds, Ctx, Goal, Row, Samples, Unit};
use super::raw;

const CHUNK: usize = 1 << 20;
const PAGE: u64 = 4096;

/// Fill the device memory of the device behind `c` with a pattern; returns its fd.
fn fill_memory(c: &mut Client, seed: u8) -> Result<File> {
    let (_, fd) = c.region_info(MEMORY_BAR)?;
    let f = File::from(fd.context("device memory has no fd")?);
    let buf: Vec<u8> = (0..CHUNK)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect();
    for off in (0..MEMORY_SIZE).step_by(CHUNK) {
        f.write_all_at(&buf, off)?;
    }
    Ok(f)
}

/// Pages rewritten by [`dirty`]: 1% of the device memory, spread evenly.
fn dirty_pages() -> impl Iterator<Item = u64> {
    let pages = MEMORY_SIZE / PAGE;
    (0..pages / 100).map(move |i| i * 100)
}

/// Rewrite 1% of the pages of device memory `mem` with `byte`.
fn dirty(mem: &File, byte: u8) -> std::io::Result<()> {
    let page = vec![byte; PAGE as usize];
    for p in dirty_pages() {
        mem.write_all_at(&page, p * PAGE)?;
    }
    Ok(())
}

/// Whether the destination's memory holds `byte` on every dirtied page.
fn check_dirtied(dst: &mut Client, byte: u8) -> Result<()> {
    let (_, fd) = dst.region_info(MEMORY_BAR)?;
    let f = File::from(fd.context("device memory has no fd")?);
    let mut page = vec![0u8; PAGE as usize];
    for p in dirty_pages() {
        f.read_exact_at(&mut page, p * PAGE)?;
        if page.iter().any(|&b| b != byte) {
            bail!("page {p} did not reach the destination");
        }
    }
    Ok(())
}

/// Scenario `mig-data`.
pub fn mig_data(ctx: &mut Ctx) -> Result<Vec<Row>> {
    let (_srv, sock) = ctx.serve_bench_model("bigmem")?;
    let mut c = Client::connect_negotiated(&sock)?;
    let mem = fill_memory(&mut c, 0)?;
    let mut r = ctx.raw(raw::Mode::Plain)?;
    let req = raw::message(16 + 8, Some(16 + 8 + CHUNK));
    let mut reply = vec![0u8; 16 + 8 + CHUNK];
    let (mut v, mut b) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        c.set_mig_state(MigState::StopCopy)?;
        let (mut bytes, mut reads) = (0usize, 0usize);
        let s = seconds(|| {
            loop {
                let d = c.mig_data_read_buf(CHUNK as u32)?;
                let n = d.len();
                c.recycle_mig_data(d);
                if n == 0 {
                    break;
                }
                bytes += n;
                reads += 1;
            }
            anyhow::Ok(())
        })?;
        c.set_mig_state(MigState::Running)?;
        if bytes < MEMORY_SIZE as usize {
            bail!("stream of {bytes} bytes is shorter than the device memory");
        }
        v.push(bytes as f64 / s / 1e9);
        let s = seconds(|| {
            for _ in 0..reads {
                r.round_trip(&req, &mut reply)?;
            }
            anyhow::Ok(())
        })?;
        b.push((reads * CHUNK) as f64 / s / 1e9);
    }
    let raw_gbps = median(b);
    let passes = MemoryPasses::measure(&mem)?;
    let raw_s = MEMORY_SIZE as f64 / raw_gbps / 1e9;
    Ok(vec![
        Row::new(
            "mig-data 256 MiB in 1 MiB reads",
            Unit::GBps,
            median(v),
            raw_gbps,
            RAW_READS,
            Goal::RatioMin(0.7),
        ),
        Row::new(
            "mig-data   ceiling: raw + reading memory once",
            Unit::GBps,
            MEMORY_SIZE as f64 / (raw_s + passes.read) / 1e9,
            raw_gbps,
            RAW_READS,
            Goal::None,
        ),
    ])
}

/// How long one pass over the 256 MiB of device memory takes in this process, seconds:
/// what a server must do with device memory beyond moving bytes through the socket, which the
/// raw baselines (replies from one cache-hot 1 MiB buffer) never do. The source reads it at
/// least once (vfud: the checksum pass, after which the kernel copies from cache); the
/// destination writes it once.
struct MemoryPasses {
    /// A CRC32 over the memory, read in 256 KiB pieces that stay in cache (page tables
    /// populated first, not timed).
    read: f64,
    /// 1 MiB copies from one buffer into 256 MiB of prefaulted memory.
    write: f64,
}

impl MemoryPasses {
    fn measure(mem: &File) -> Result<Self> {
        let len = MEMORY_SIZE as usize;
        let src = SharedMemory::from_fd(mem.try_clone()?.into(), len)?;
        src.populate_for_reading();
        let out = SharedMemory::new("bench-pass", len)?;
        out.prefault();
        let (mut piece, chunk) = (vec![0u8; 256 << 10], vec![0x5au8; CHUNK]);
        let (mut read, mut write) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            read.push(seconds(|| {
                let mut crc = crc32fast::Hasher::new();
                for off in (0..len).step_by(piece.len()) {
                    src.read(off as u64, &mut piece)?;
                    crc.update(&piece);
                }
                std::hint::black_box(crc.finalize());
                anyhow::Ok(())
            })?);
            write.push(seconds(|| {
                for off in (0..len).step_by(CHUNK) {
                    out.write(off as u64, &chunk)?;
                }
                anyhow::Ok(())
            })?);
        }
        Ok(Self {
            read: median(read),
            write: median(write),
        })
    }
}

/// A downtime and its two parts: moving the data (source stopped → last byte written to the
/// destination) and finishing (config and interrupts restored, destination to RUNNING, which
/// is where the destination applies the stream). Milliseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Downtime {
    total: f64,
    data: f64,
    finish: f64,
    /// Stream bytes moved (counted by [`stop_and_copy`]).
    bytes: usize,
}

/// Stop-and-copy without pre-copy, timed as the driver times downtime.
fn stop_and_copy(src: &mut Endpoint, dst: &mut Endpoint) -> Result<Downtime> {
    let ch = Channel::open(&mut src.client, false)?;
    let dch = Channel::open(&mut dst.client, false)?;
    dch.set_state(&mut dst.client, MigState::Resuming)?;
    let stopped = Instant::now();
    ch.set_state(&mut src.client, MigState::StopCopy)?;
    let bytes = driver::copy_stream(&ch, &dch, src, dst, CHUNK as u32)? as usize;
    let data = stopped.elapsed().as_secs_f64() * 1000.0;
    vm::restore_config(&mut src.client, &mut dst.client)?;
    dst.irqs = src.irqs.try_clone()?;
    dst.irqs.replay(&mut dst.client)?;
    dch.set_state(&mut dst.client, MigState::Running)?;
    let total = stopped.elapsed().as_secs_f64() * 1000.0;
    ch.set_state(&mut src.client, MigState::Stop)?;
    Ok(Downtime {
        total,
        data,
        finish: total - data,
        bytes,
    })
}

/// The VM of the pre-copy run: dirties 1% of device memory once its copy has been sent, and
/// notes when the VM stops and when the stop-copy data is through (the driver reports phase
/// "restore" right after it).
struct Dirtier {
    mem: File,
    byte: u8,
    done: bool,
    error: Option<std::io::Error>,
    stopped: Option<Instant>,
    data_ms: f64,
}

impl VmHooks for Dirtier {
    fn stop(&mut self, _src: &mut Endpoint) {
        self.stopped = Some(Instant::now());
    }

    fn progress(&mut self, p: &Progress) {
        if p.phase == "precopy" && !self.done {
            self.done = true;
            self.error = dirty(&self.mem, self.byte).err();
        }
        if let (Some(t), "restore") = (self.stopped, p.phase) {
            self.data_ms = t.elapsed().as_secs_f64() * 1000.0;
        }
    }
}

/// Two bigmem servers with the source memory filled; returns them with their endpoints.
fn pair(ctx: &mut Ctx) -> Result<(Vec<super::harness::Proc>, Endpoint, Endpoint, File)> {
    let (a, sa) = ctx.serve_bench_model("bigmem")?;
    let (b, sb) = ctx.serve_bench_model("bigmem")?;
    let mut src = Endpoint::connect(&sa)?;
    let dst = Endpoint::connect(&sb)?;
    let mem = fill_memory(&mut src.client, 1)?;
    Ok((vec![a, b], src, dst, mem))
}

/// Scenario `downtime`.
pub fn downtime(ctx: &mut Ctx) -> Result<Vec<Row>> {
    let (mut stop, mut pre) = (Vec::new(), Vec::new());
    let mut passes = None;
    for run in 0..2u8 {
        let byte = 0xd0 + run;
        {
            let (_procs, mut src, mut dst, mem) = pair(ctx)?;
            dirty(&mem, byte)?;
            stop.push(stop_and_copy(&mut src, &mut dst)?);
            if passes.is_none() {
                passes = Some(MemoryPasses::measure(&mem)?);
            }
            check_dirtied(&mut dst.client, byte)?;
        }
        {
            let (_procs, mut src, mut dst, mem) = pair(ctx)?;
            let mut hooks = Dirtier {
                mem,
                byte,
                done: false,
                error: None,
                stopped: None,
                data_ms: 0.0,
            };
            let report = driver::migrate(&mut src, &mut dst, &Options::default(), &mut hooks)?;
            if let Some(e) = hooks.error {
                return Err(e).context("dirtying device memory");
            }
            if report.rounds == 0 {
                bail!("the driver did not pre-copy");
            }
            check_dirtied(&mut dst.client, byte)?;
            pre.push(Downtime {
                total: report.downtime_ms,
                data: hooks.data_ms,
                finish: report.downtime_ms - hooks.data_ms,
                bytes: 0,
            });
        }
    }
    let two_hops = raw_two_hops(ctx, stop.first().map_or(0, |d| d.bytes))?;
    let passes = passes.context("no stop-and-copy run")?;
    let copy_gbps = median(stop.iter().map(|d| d.bytes as f64 / d.data / 1e6).collect());
    const BASE: &str = "stop-and-copy of the same device (no pre-copy)";
    let part = |v: &[Downtime], f: fn(&Downtime) -> f64| median(v.iter().map(f).collect());
    Ok(vec![
        Row::new(
            "downtime 256 MiB, 1% dirtied",
            Unit::Ms,
            part(&pre, |d| d.total),
            part(&stop, |d| d.total),
            BASE,
            Goal::RatioMax(0.2),
        ),
        Row::new(
            "downtime   of which moving data",
            Unit::Ms,
            part(&pre, |d| d.data),
            part(&stop, |d| d.data),
            BASE,
            Goal::None,
        ),
        Row::new(
            "downtime   of which restore+RUNNING",
            Unit::Ms,
            part(&pre, |d| d.finish),
            part(&stop, |d| d.finish),
            BASE,
            Goal::None,
        ),
        Row::new(
            "stop-and-copy 256 MiB, source to destination",
            Unit::GBps,
            copy_gbps,
            two_hops,
            TWO_HOPS,
            Goal::RatioMin(0.5),
        ),
        Row::new(
            "stop-and-copy   ceiling: raw + memory read and written once",
            Unit::GBps,
            MEMORY_SIZE as f64
                / (MEMORY_SIZE as f64 / two_hops / 1e9 + passes.read + passes.write)
                / 1e9,
            two_hops,
            TWO_HOPS,
            Goal::None,
        ),
    ])
}

const RAW_READS: &str = "raw 24-byte request / 1 MiB+24-byte reply ping-pong, same count";

const TWO_HOPS: &str = "raw: the same bytes as 1 MiB+24-byte replies from one connection, each \
                        sent on as a 1 MiB+24-byte request on a second, same count";

/// The socket's bandwidth for what the stop-and-copy moves: `bytes` in 1 MiB pieces, each
/// read as a reply from one raw connection and written as a request to another (the two
/// hops source → driver → destination), GB/s; the median of three passes.
fn raw_two_hops(ctx: &mut Ctx, bytes: usize) -> Result<f64> {
    let mut from = ctx.raw(raw::Mode::Plain)?;
    let mut to = ctx.raw(raw::Mode::Plain)?;
    let read = raw::message(16 + 8, Some(16 + 8 + CHUNK));
    let write = raw::message(16 + 8 + CHUNK, Some(16));
    let (mut reply, mut ack) = (vec![0u8; 16 + 8 + CHUNK], vec![0u8; 16]);
    let pieces = bytes.div_ceil(CHUNK).max(1);
    let mut v = Vec::new();
    for _ in 0..3 {
        let s = seconds(|| {
            for _ in 0..pieces {
                from.round_trip(&read, &mut reply)?;
                to.round_trip(&write, &mut ack)?;
            }
            anyhow::Ok(())
        })?;
        v.push((pieces * CHUNK) as f64 / s / 1e9);
    }
    Ok(median(v))
}

/// Scenario `handover`.
pub fn handover(ctx: &mut Ctx) -> Result<Vec<Row>> {
    let sock = ctx.path("dev");
    let (a_ctl, b_ctl) = (ctx.path("a-ctl"), ctx.path("b-ctl"));
    let _a = ctx.serve(
        &[
            "--device".into(),
            "dma-engine".into(),
            "--socket".into(),
            sock.clone().into(),
            "--control".into(),
            a_ctl.clone().into(),
        ],
        &[sock.clone(), a_ctl.clone()],
    )?;
    let _b = ctx.serve(
        &[
            "--device".into(),
            "dma-engine".into(),
            "--incoming".into(),
            b_ctl.clone().into(),
        ],
        std::slice::from_ref(&b_ctl),
    )?;
    let mut c = Client::connect_negotiated(&sock)?;
    let mut base = Samples::default();
    for i in 0..22_000 {
        let t = Instant::now();
        c.region_read(0, reg::ID, 4)?;
        if i >= 2000 {
            base.0.push(super::harness::ns(t));
        }
    }
    let rtt_ms = base.percentile_us(50.0) / 1e3;
    // The same window around a tool that does no handover (`vfud status` on A's control
    // socket): starting a process on the bench's CPU costs the client reads by itself.
    let ((idle_reads, idle), c) = reads_while(c, || {
        std::process::Command::new(ctx.exe())
            .args(["status", "--json", "--control"])
            .arg(&a_ctl)
            .env("RUST_LOG", "error")
            .output()
            .context("running vfud status")
    })?;
    let ((reads, out), _c) = reads_while(c, || {
        std::process::Command::new(ctx.exe())
            .args(["migrate", "--handover", "--json", "--from"])
            .arg(&a_ctl)
            .arg("--to")
            .arg(&b_ctl)
            .env("RUST_LOG", "error")
            .output()
            .context("running vfud migrate --handover")
    })?;
    let (idle, out) = (idle?, out?);
    if !idle.status.success() {
        bail!(
            "vfud status failed: {}",
            String::from_utf8_lossy(&idle.stderr).trim()
        );
    }
    if !out.status.success() {
        bail!(
            "handover failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let pause = report["pause_ms"]
        .as_f64()
        .context("handover report has no pause_ms")?;
    let longest = |s: &Samples| s.0.iter().copied().max().unwrap_or(0) as f64 / 1e6;
    const BASE: &str = "median 4-byte REGION_READ round trip before the handover";
    Ok(vec![
        Row::new(
            "handover pause (server)",
            Unit::Ms,
            pause,
            rtt_ms,
            BASE,
            Goal::None,
        ),
        Row::new(
            "handover longest client read",
            Unit::Ms,
            longest(&reads),
            rtt_ms,
            BASE,
            Goal::None,
        ),
        Row::new(
            "handover longest read vs a tool run",
            Unit::Ms,
            longest(&reads),
            longest(&idle_reads),
            "longest read in the same window around `vfud status` (no handover)",
            Goal::None,
        ),
    ])
}

/// Back-to-back 4-byte reads on `c` from another thread, from 100 ms before `work` until
/// 100 ms after it; the read times, `work`'s result and the client back.
fn reads_while<T>(
    mut c: Client,
    work: impl FnOnce() -> Result<T>,
) -> Result<((Samples, Result<T>), Client)> {
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<(Samples, Client)> {
            let mut s = Samples::default();
            while !stop.load(Ordering::Relaxed) {
                s.time(|| c.region_read(0, reg::ID, 4))?;
            }
            Ok((s, c))
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let out = work();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let (s, c) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    Ok(((s, out), c))
}
