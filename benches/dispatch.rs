//! Per-message user-space cost of vfud's request path, without the scheduler in the way: the
//! pieces `vfud bench` region-rtt and posted-writes time end to end, one at a time, each next to
//! the least the same step could cost.
//!
//! - `frame/*`: one REGION_READ request and its reply through vfud's codec (`send_message` +
//!   `FrameReader::read_frame` on both ends of a socketpair, one thread) against `write` +
//!   `read` of the same 32 and 36 bytes on the same kind of socketpair. The difference is the
//!   codec's extra syscalls (header and payload read separately), its `cmsg` buffers and its
//!   allocations.
//! - `decode/region_read`: `Request::decode` of a REGION_READ payload.
//! - `dispatch/*`: `DeviceServer::handle` of a 4-byte REGION_READ and REGION_WRITE to
//!   dma-engine's BAR0 (decode excluded), i.e. the server's work between reading a frame and
//!   sending its reply.
//! - `guest_mem/*`: an 8-byte `GuestMem` read from an fd-backed mapping with 16 and 65 535 maps.
//!
//! Run with `cargo bench --bench dispatch`; `vfud bench` remains the end-to-end, same-run
//! comparison.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use vfud_devices::dma_engine::{reg, DmaEngine};
use vfud_protocol::codec::{send_message, FrameReader, Limits};
use vfud_protocol::header::{Command, Header};
use vfud_protocol::messages::dma::{DmaMap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::region::RegionAccess;
use vfud_protocol::messages::{Request, VersionMessage};
use vfud_protocol::wire::put;
use vfud_server::dispatch::DeviceServer;
use vfud_server::dma::{DmaTable, GuestMem, Iova};
use vfud_server::mmap::SharedMemory;
use vfud_server::ServerSettings;

fn read_access() -> RegionAccess {
    RegionAccess {
        offset: reg::ID,
        region: 0,
        count: 4,
    }
}

fn read_payload() -> Vec<u8> {
    let mut p = Vec::new();
    put(&mut p, &read_access());
    p
}

fn frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    let (a, b) = UnixStream::pair().unwrap();
    let (mut ra, mut rb) = (FrameReader::new(), FrameReader::new());
    let limits = Limits::default();
    let req = read_payload();
    let reply = read_access().encode_with_data(&[1, 2, 3, 4]);
    g.bench_function("vfud_region_read", |bench| {
        bench.iter(|| {
            let h = Header::command(1, Command::RegionRead, 16, false);
            send_message(a.as_fd(), &h, &[&req], &[]).unwrap();
            let f = rb.read_frame(b.as_fd(), &limits).unwrap().unwrap();
            send_message(b.as_fd(), &f.header.reply(reply.len()), &[&reply], &[]).unwrap();
            ra.read_frame(a.as_fd(), &limits).unwrap().unwrap()
        })
    });
    let (mut x, mut y) = UnixStream::pair().unwrap();
    let (q, r) = ([0u8; 32], [0u8; 36]);
    let (mut qb, mut rbuf) = ([0u8; 32], [0u8; 36]);
    g.bench_function("raw_same_sizes", |bench| {
        bench.iter(|| {
            x.write_all(&q).unwrap();
            y.read_exact(&mut qb).unwrap();
            y.write_all(&r).unwrap();
            x.read_exact(&mut rbuf).unwrap();
        })
    });
    g.finish();
}

fn negotiated_server() -> DeviceServer {
    let mut s = DeviceServer::new(Box::new(DmaEngine::new()), ServerSettings::default()).unwrap();
    let v = VersionMessage::qemu_proposal();
    let len = v.encode().len();
    s.handle(Request::Version(v), len).unwrap();
    s
}

fn decode_and_dispatch(c: &mut Criterion) {
    let payload = read_payload();
    let limits = Limits::default();
    c.bench_function("decode/region_read", |b| {
        b.iter(|| {
            Request::decode(Command::RegionRead as u16, &payload, Vec::new(), &limits).unwrap()
        })
    });
    let mut g = c.benchmark_group("dispatch");
    let mut s = negotiated_server();
    g.bench_function("region_read", |b| {
        b.iter(|| s.handle(Request::RegionRead(read_access()), 16).unwrap())
    });
    let w = RegionAccess {
        offset: reg::PATTERN,
        region: 0,
        count: 4,
    };
    g.bench_function("region_write", |b| {
        b.iter_batched(
            || Request::RegionWrite(w, vec![0x5a, 0, 0, 0]),
            |r| s.handle(r, 20).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn guest_mem(c: &mut Criterion) {
    const PAGE: u64 = 4096;
    let mem = SharedMemory::new("bench", PAGE as usize).unwrap();
    let mut g = c.benchmark_group("guest_mem");
    for n in [16u64, 65_535] {
        let mut t = DmaTable::new(n as usize);
        for i in 0..n {
            let fd = (i == n / 2).then(|| mem.fd().try_clone_to_owned().unwrap());
            let m = DmaMap {
                argsz: 32,
                flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
                offset: 0,
                addr: i * PAGE,
                size: PAGE,
            };
            t.map(&m, fd).unwrap();
        }
        let mut gm = GuestMem::new(&t, None);
        let mut buf = [0u8; 8];
        g.bench_function(format!("read8_{n}_maps"), |b| {
            b.iter(|| gm.read(Iova(n / 2 * PAGE + 64), &mut buf).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, frame, decode_and_dispatch, guest_mem);
criterion_main!(benches);
