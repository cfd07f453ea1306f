//! Region access: what a guest's MMIO to a trapped BAR costs.
//!
//! **Round trip** (`region-rtt`): a 4-byte REGION_READ of dma-engine's ID register and a
//! 4-byte REGION_WRITE (with reply) of its PATTERN register, client in this process and
//! `vfud serve` in another. Request and reply are 32/36 bytes (read) and 36/32 bytes
//! (write), header included. The baseline sends messages of exactly those sizes to the raw
//! peer ([`super::raw`]) and waits for replies of exactly those sizes. vfud and baseline run in
//! alternating blocks so frequency changes and noise hit both alike; median and p99 are of
//! all samples. Both are measured with the server on another CPU and on the client's CPU (see
//! the placement note in [`super`]); an extra row compares against a peer that sleeps in
//! `epoll_wait` before each read, separating what an event loop costs from what vfud adds.
//!
//! **Posted writes** (`posted-writes`): QEMU sends BAR writes with NO_REPLY and may batch them
//! in REGION_WRITE_MULTI (≤ 200 entries). vfud: a stream of posted 4-byte writes (36-byte
//! messages), and batches of 200 4-byte entries (4 824-byte messages), each ended by one
//! replied REGION_READ, which cannot be answered before every write before it was applied.
//! Baseline: the same messages, one `write` each, ended the same way.

use anyhow::Result;
use vfud_devices::dma_engine::reg;
use vfud_protocol::messages::region::WriteMultiEntry;
use vfud_protocol::Client;

use super::harness::{can_place, median, seconds, Ctx, Goal, Row, Samples, Unit};
use super::raw;

const ROUNDS: usize = 10;
const PER_ROUND: usize = 2000;
const WARMUP: usize = 2000;

/// Scenario `region-rtt`: client and server on different CPUs, then on one CPU (each
/// placement applied alike to vfud and its baselines); unpinned when `taskset` is missing.
pub fn round_trip(ctx: &mut Ctx) -> Result<Vec<Row>> {
    if !can_place() {
        return round_trip_placed(ctx, "unpinned");
    }
    let mut rows = Vec::new();
    if ctx.nproc() >= 2 {
        rows.extend(ctx.placed(0, 1, |c| round_trip_placed(c, "cross-CPU"))?);
    }
    rows.extend(ctx.placed(0, 0, |c| round_trip_placed(c, "one CPU"))?);
    Ok(rows)
}

fn round_trip_placed(ctx: &mut Ctx, placement: &str) -> Result<Vec<Row>> {
    let (_srv, sock) = ctx.serve_device("dma-engine")?;
    let mut c = Client::connect_negotiated(&sock)?;
    let mut r = ctx.raw(raw::Mode::Plain)?;
    let mut e = ctx.raw(raw::Mode::Epoll)?;
    let read_req = raw::message(32, Some(36));
    let write_req = raw::message(36, Some(32));
    let mut reply = [0u8; 36];
    let val = 0x5au32.to_le_bytes();
    for _ in 0..WARMUP {
        c.region_read(0, reg::ID, 4)?;
        c.region_write(0, reg::PATTERN, &val)?;
        r.round_trip(&read_req, &mut reply[..36])?;
        r.round_trip(&write_req, &mut reply[..32])?;
        e.round_trip(&read_req, &mut reply[..36])?;
    }
    let (mut vr, mut rr, mut er) = (Samples::default(), Samples::default(), Samples::default());
    let (mut vw, mut rw) = (Samples::default(), Samples::default());
    for _ in 0..ROUNDS {
        for _ in 0..PER_ROUND {
            vr.time(|| c.region_read(0, reg::ID, 4))?;
        }
        for _ in 0..PER_ROUND {
            rr.time(|| r.round_trip(&read_req, &mut reply[..36]))?;
        }
        for _ in 0..PER_ROUND {
            er.time(|| e.round_trip(&read_req, &mut reply[..36]))?;
        }
        for _ in 0..PER_ROUND {
            vw.time(|| c.region_write(0, reg::PATTERN, &val))?;
        }
        for _ in 0..PER_ROUND {
            rw.time(|| r.round_trip(&write_req, &mut reply[..32]))?;
        }
    }
    const BASE: &str =
        "raw AF_UNIX ping-pong of the same request/reply sizes between two processes";
    let row = |what: &str, v: &Samples, b: &Samples, p: f64, base, goal| {
        Row::percentile(
            format!("region-rtt {what}, {placement}"),
            v,
            b,
            p,
            base,
            goal,
        )
    };
    let goal = Goal::RatioMax(1.05);
    Ok(vec![
        row("read median", &vr, &rr, 50.0, BASE, goal),
        row("read p99", &vr, &rr, 99.0, BASE, goal),
        row("write median", &vw, &rw, 50.0, BASE, goal),
        row("write p99", &vw, &rw, 99.0, BASE, goal),
        row(
            "read median vs epoll peer",
            &vr,
            &er,
            50.0,
            "raw ping-pong whose peer sleeps in epoll_wait before each read, as an event loop does",
            Goal::None,
        ),
    ])
}

const POSTED: usize = 200_000;
const BATCH: usize = 200;
const BATCHES: usize = 2_000;
const REPS: usize = 3;

/// Scenario `posted-writes`.
pub fn posted_writes(ctx: &mut Ctx) -> Result<Vec<Row>> {
    let (_srv, sock) = ctx.serve_device("dma-engine")?;
    let mut c = Client::connect_negotiated(&sock)?;
    let mut r = ctx.raw(raw::Mode::Plain)?;
    let val = 0x5au32.to_le_bytes();
    let posted = raw::message(36, None);
    let sync = raw::message(32, Some(36));
    let mut reply = [0u8; 36];
    let entry = WriteMultiEntry {
        offset: reg::PATTERN,
        region: 0,
        count: 4,
        data: [0x5a, 0, 0, 0, 0, 0, 0, 0],
    };
    let entries = vec![entry; BATCH];
    let multi = raw::message(16 + 8 + 24 * BATCH, None);
    let (mut vp, mut rp, mut vm, mut rm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPS {
        vp.push(
            POSTED as f64
                / seconds(|| {
                    for _ in 0..POSTED {
                        c.region_write_posted(0, reg::PATTERN, &val)?;
                    }
                    c.region_read(0, reg::ID, 4).map(drop)
                })?,
        );
        rp.push(
            POSTED as f64
                / seconds(|| {
                    for _ in 0..POSTED {
                        r.post(&posted)?;
                    }
                    r.round_trip(&sync, &mut reply)
                })?,
        );
        vm.push(
            (BATCH * BATCHES) as f64
                / seconds(|| {
                    for _ in 0..BATCHES {
                        c.region_write_multi(&entries)?;
                    }
                    c.region_read(0, reg::ID, 4).map(drop)
                })?,
        );
        rm.push(
            (BATCH * BATCHES) as f64
                / seconds(|| {
                    for _ in 0..BATCHES {
                        r.post(&multi)?;
                    }
                    r.round_trip(&sync, &mut reply)
                })?,
        );
    }
    Ok(vec![
        Row::new(
            "posted-writes REGION_WRITE",
            Unit::PerSec,
            median(vp),
            median(rp),
            "raw one-way stream of the same 36-byte messages, one write(2) each",
            Goal::AtLeast(1e6),
        ),
        Row::new(
            "posted-writes WRITE_MULTI x200",
            Unit::PerSec,
            median(vm),
            median(rm),
            "raw one-way stream of the same 4824-byte batches (writes/s)",
            Goal::AtLeast(1e6),
        ),
    ])
}
