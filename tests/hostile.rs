//! Hostile clients (issue 13): every case sends something a well-behaved client never would
//! and asserts exactly what the server does about it — the errno of its error reply, no reply
//! at all, or a clean disconnect — and then that a fresh client is served. One in-process
//! server (dma-engine) takes every case in turn, so a case that broke it fails the next.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use common::hostile::{
    frame, frame_sized, fresh_client_is_served, owned, version_payload, InProcess, Outcome, Raw,
    CASE_ID,
};
use nix::errno::Errno;
use vfud_protocol::header::Command;
use vfud_protocol::messages::irq::*;
use vfud_protocol::messages::version::Capabilities;

use common::hostile_payloads::*;
use Outcome::{Disconnect, Silent};

/// How a case is set up before its hostile frame.
#[derive(Clone, Copy)]
enum Pre {
    /// Nothing: the frame is the first thing the server sees.
    Raw,
    /// VERSION with default capabilities.
    Negotiated,
    /// VERSION allowing 2 DMA maps and 2 fds per message.
    Small,
    /// Negotiated, then this setup request (which must succeed).
    Then(Command, fn() -> Vec<u8>),
}

/// The fds a case sends with its frame.
type Fds = fn() -> Vec<OwnedFd>;

struct Case {
    name: std::borrow::Cow<'static, str>,
    pre: Pre,
    bytes: Vec<u8>,
    fds: Fds,
    /// Half-close after sending (the server sees EOF).
    eof: bool,
    expect: Outcome,
}

fn none() -> Vec<OwnedFd> {
    Vec::new()
}

fn case(
    name: impl Into<std::borrow::Cow<'static, str>>,
    pre: Pre,
    cmd: Command,
    payload: Vec<u8>,
    expect: Outcome,
) -> Case {
    Case {
        name: name.into(),
        pre,
        bytes: frame(CASE_ID, cmd as u16, 0, &payload),
        fds: none,
        eof: false,
        expect,
    }
}

fn with_fds(mut c: Case, fds: Fds) -> Case {
    c.fds = fds;
    c
}

fn raw(
    name: impl Into<std::borrow::Cow<'static, str>>,
    pre: Pre,
    bytes: Vec<u8>,
    expect: Outcome,
) -> Case {
    Case {
        name: name.into(),
        pre,
        bytes,
        fds: none,
        eof: false,
        expect,
    }
}

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    use Command as C;
    use Errno::*;
    use Pre::{Negotiated as N, Raw as R};
    let resuming = Pre::Then(C::DeviceFeature, || mig_state(4));
    let mapped = Pre::Then(C::DmaMap, || map(0x10000, 0x10000));
    let logging = Pre::Then(C::DeviceFeature, || log_start(4096, &[]));
    let mut v = vec![
        // --- Framing.
        Case {
            eof: true,
            ..raw("truncated header then EOF", R, vec![1, 0, 1, 0, 32, 0], Disconnect)
        },
        Case {
            eof: true,
            ..raw("truncated payload then EOF", N, frame_sized(CASE_ID, 4, 0, 32, &[16, 0]), Disconnect)
        },
        raw("msg_size 0", N, frame_sized(CASE_ID, 4, 0, 0, &[]), Disconnect),
        raw("msg_size 1", N, frame_sized(CASE_ID, 4, 0, 1, &[]), Disconnect),
        raw("msg_size 15", N, frame_sized(CASE_ID, 4, 0, 15, &[]), Disconnect),
        raw("msg_size 4 GiB - 1", N, frame_sized(CASE_ID, 4, 0, u32::MAX, &[]), Disconnect),
        // Oversize but otherwise sane commands are skipped and answered E2BIG; beyond what is
        // skipped, or not a command at all, the stream is out of step: disconnect.
        raw("msg_size past max_data_xfer_size", N, frame_sized(CASE_ID, 10, 0, (1 << 20) + 4096, &vec![0; (1 << 20) + 4080]), e(E2BIG)),
        raw("msg_size 8 MiB MIG_DATA_WRITE", N, frame_sized(CASE_ID, 18, 0, 8 << 20, &vec![0; (8 << 20) - 16]), e(E2BIG)),
        raw("oversize NO_REPLY write", N, frame_sized(CASE_ID, 10, 0x10, 2 << 20, &vec![0; (2 << 20) - 16]), Silent),
        raw("msg_size beyond what is skipped", N, frame_sized(CASE_ID, 18, 0, (64 << 20) + 65, &[]), Disconnect),
        raw("oversize unknown command", N, frame_sized(CASE_ID, 0x7777, 0, 2 << 20, &[]), Disconnect),
        raw("oversize reply", N, frame_sized(CASE_ID, 11, 1, 2 << 20, &[]), Disconnect),
        raw("unknown command 0", N, frame(CASE_ID, 0, 0, &[]), e(ENOSYS)),
        raw("obsolete command 14", N, frame(CASE_ID, 14, 0, &[]), e(ENOSYS)),
        raw("unknown command 19", N, frame(CASE_ID, 19, 0, &[]), e(ENOSYS)),
        raw("unknown command 0x7f01", N, frame(CASE_ID, 0x7f01, 0, &[]), e(ENOSYS)),
        raw("unknown command 0xffff", N, frame(CASE_ID, 0xffff, 0, &[1, 2, 3]), e(ENOSYS)),
        raw("DMA_READ as a command", N, frame(CASE_ID, 11, 0, &[0; 16]), e(EINVAL)),
        raw("DMA_WRITE as a command", N, frame(CASE_ID, 12, 0, &[0; 17]), e(EINVAL)),
        raw("message type 2", N, frame(CASE_ID, 4, 2, &get_info(16)), e(EINVAL)),
        raw("message type 15", N, frame(CASE_ID, 4, 0xf, &get_info(16)), e(EINVAL)),
        raw("reply to nothing", N, frame(CASE_ID, 4, 1, &get_info(16)), Silent),
        raw("error reply to nothing", N, frame(CASE_ID, 11, 0x21, &[]), Silent),
        raw("DMA_READ reply nobody asked for", N, frame(CASE_ID, 11, 1, &[0; 20]), Silent),
        raw("NO_REPLY command that fails", N, frame(CASE_ID, 9, 0x10, &access(0, 99, 4)), Silent),
        raw("NO_REPLY unknown command", N, frame(CASE_ID, 77, 0x10, &[]), Silent),
        // --- VERSION.
        case("command before VERSION: GET_INFO", R, C::DeviceGetInfo, get_info(16), e(EINVAL)),
        case("command before VERSION: REGION_READ", R, C::RegionRead, access(0, 7, 4), e(EINVAL)),
        case("command before VERSION: DMA_MAP", R, C::DmaMap, map(0, 0x1000), e(EINVAL)),
        case("command before VERSION: RESET", R, C::DeviceReset, vec![], e(EINVAL)),
        case("command before VERSION: SET_IRQS", R, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, 0, &[]), e(EINVAL)),
        case("VERSION twice", N, C::Version, version_payload(None), e(EINVAL)),
        case("VERSION major 1", R, C::Version, le(&[&[1, 0, 0, 0]]), e(Errno::ENOTSUP)),
        case("VERSION major 0xffff", R, C::Version, le(&[&[0xff, 0xff, 0, 0]]), e(Errno::ENOTSUP)),
        case("VERSION 2-byte payload", R, C::Version, vec![0, 0], e(EINVAL)),
        case("VERSION JSON without NUL", R, C::Version, le(&[&[0, 0, 0, 0], b"{}"]), e(EINVAL)),
        case("VERSION bad JSON", R, C::Version, le(&[&[0, 0, 0, 0], b"{not json\0"]), e(EINVAL)),
        case("VERSION embedded NUL", R, C::Version, le(&[&[0, 0, 0, 0], b"{}\0{}\0"]), e(EINVAL)),
        case("VERSION caps of the wrong type", R, C::Version, le(&[&[0, 0, 0, 0], br#"{"capabilities":{"max_msg_fds":"many"}}"#, b"\0"]), e(EINVAL)),
        with_fds(case("VERSION with an fd", R, C::Version, version_payload(None), e(EINVAL)), || vec![eventfd()]),
        // --- argsz lies.
        case("GET_INFO argsz 0", N, C::DeviceGetInfo, get_info(0), e(EINVAL)),
        case("GET_INFO argsz 15", N, C::DeviceGetInfo, get_info(15), e(EINVAL)),
        case("GET_INFO argsz 4 GiB", N, C::DeviceGetInfo, get_info(u32::MAX), Outcome::Ok),
        case("REGION_INFO argsz 0", N, C::DeviceGetRegionInfo, region_info(0, 0), e(EINVAL)),
        case("REGION_INFO argsz 31", N, C::DeviceGetRegionInfo, region_info(31, 0), e(EINVAL)),
        case("REGION_INFO argsz 4 GiB", N, C::DeviceGetRegionInfo, region_info(u32::MAX, 2), Outcome::Ok),
        case("IRQ_INFO argsz 0", N, C::DeviceGetIrqInfo, irq_info(0, 0), e(EINVAL)),
        case("IRQ_INFO argsz 4 GiB", N, C::DeviceGetIrqInfo, irq_info(u32::MAX, 0), Outcome::Ok),
        case("DMA_MAP argsz 0", N, C::DmaMap, dma_map(0, 3, 0, 0, 0x1000), e(EINVAL)),
        case("DMA_MAP argsz 4 GiB", N, C::DmaMap, dma_map(u32::MAX, 3, 0, 0x100000, 0x1000), Outcome::Ok),
        case("DMA_UNMAP argsz 0", N, C::DmaUnmap, unmap(0, 0, 0, 0x1000), e(EINVAL)),
        case("SET_IRQS argsz 0", N, C::DeviceSetIrqs, le(&[&u32b(0), &u32b(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER), &[0; 12]]), e(EINVAL)),
        // --- Payload lengths.
        case("GET_INFO short", N, C::DeviceGetInfo, vec![16, 0, 0], e(EINVAL)),
        case("GET_INFO long", N, C::DeviceGetInfo, le(&[&get_info(16), &[0]]), e(EINVAL)),
        case("REGION_INFO short", N, C::DeviceGetRegionInfo, region_info(32, 0)[..20].to_vec(), e(EINVAL)),
        case("IRQ_INFO short", N, C::DeviceGetIrqInfo, vec![16, 0, 0, 0, 0, 0, 0, 0], e(EINVAL)),
        case("REGION_READ short", N, C::RegionRead, access(0, 7, 4)[..12].to_vec(), e(EINVAL)),
        case("REGION_READ with data", N, C::RegionRead, le(&[&access(0, 7, 4), &[0; 4]]), e(EINVAL)),
        case("REGION_WRITE count beyond data", N, C::RegionWrite, le(&[&access(0, 7, 8), &[0; 4]]), e(EINVAL)),
        case("REGION_WRITE data beyond count", N, C::RegionWrite, le(&[&access(0x40, 7, 2), &[0; 4]]), e(EINVAL)),
        case("DMA_MAP short", N, C::DmaMap, map(0, 0x1000)[..24].to_vec(), e(EINVAL)),
        case("DMA_UNMAP long", N, C::DmaUnmap, le(&[&unmap(24, 0, 0, 0x1000), &[0; 8]]), e(EINVAL)),
        case("SET_IRQS short", N, C::DeviceSetIrqs, vec![20, 0, 0, 0], e(EINVAL)),
        case("RESET with payload", N, C::DeviceReset, vec![0], e(EINVAL)),
        case("FEATURE short", N, C::DeviceFeature, vec![8, 0, 0], e(EINVAL)),
        case("MIG_DATA_READ short", N, C::MigDataRead, vec![8, 0], e(EINVAL)),
        case("MIG_DATA_WRITE size beyond data", N, C::MigDataWrite, le(&[&u32b(16), &u32b(8), &[0; 4]]), e(EINVAL)),
        case("WRITE_MULTI empty", N, C::RegionWriteMulti, vec![], e(EINVAL)),
        case("WRITE_MULTI count 201", N, C::RegionWriteMulti, le(&[&u64b(201)]), e(EINVAL)),
        // --- Regions, offsets, counts.
        case("REGION_INFO index 10", N, C::DeviceGetRegionInfo, region_info(32, 10), e(EINVAL)),
        case("REGION_INFO index 4 G", N, C::DeviceGetRegionInfo, region_info(32, u32::MAX), e(EINVAL)),
        case("IO_FDS index 4 G", N, C::DeviceGetRegionIoFds, le(&[&u32b(32), &u32b(0), &u32b(u32::MAX), &u32b(0)]), e(EINVAL)),
        case("IRQ_INFO index 5", N, C::DeviceGetIrqInfo, irq_info(16, 5), e(EINVAL)),
        case("IRQ_INFO index 4 G", N, C::DeviceGetIrqInfo, irq_info(16, u32::MAX), e(EINVAL)),
        case("REGION_READ region 10", N, C::RegionRead, access(0, 10, 4), e(EINVAL)),
        case("REGION_READ region 4 G", N, C::RegionRead, access(0, u32::MAX, 4), e(EINVAL)),
        case("REGION_READ absent BAR 1", N, C::RegionRead, access(0, 1, 4), e(EINVAL)),
        case("REGION_READ config at 4096", N, C::RegionRead, access(4096, 7, 4), e(EINVAL)),
        case("REGION_READ config crossing the end", N, C::RegionRead, access(4094, 7, 4), e(EINVAL)),
        case("REGION_READ offset 2^64-1", N, C::RegionRead, access(u64::MAX, 7, 4), e(EINVAL)),
        case("REGION_READ BAR0 offset+count overflows", N, C::RegionRead, access(u64::MAX - 1, 0, 4), e(EINVAL)),
        case("REGION_READ BAR0 past its end", N, C::RegionRead, access(4096, 0, 4), e(EINVAL)),
        case("REGION_READ count past max_data_xfer_size", N, C::RegionRead, access(0, 2, (1 << 20) + 1), e(E2BIG)),
        case("REGION_READ count 4 G", N, C::RegionRead, access(0, 2, u32::MAX), e(E2BIG)),
        case("REGION_READ BAR0 odd size 3", N, C::RegionRead, access(0, 0, 3), e(EINVAL)),
        case("REGION_READ BAR0 unaligned u32", N, C::RegionRead, access(2, 0, 4), e(EINVAL)),
        case("REGION_WRITE BAR0 odd size 5", N, C::RegionWrite, le(&[&access(0, 0, 5), &[0; 5]]), e(EINVAL)),
        case("REGION_WRITE region 9", N, C::RegionWrite, le(&[&access(0, 20, 1), &[0]]), e(EINVAL)),
        case("REGION_WRITE BAR2 past its end", N, C::RegionWrite, le(&[&access(u64::MAX - 3, 2, 4), &[0; 4]]), e(EINVAL)),
        // --- DMA_MAP lies.
        case("DMA_MAP 2^63 without fd", N, C::DmaMap, map(0, 1 << 63), e(EFAULT)),
        with_fds(case("DMA_MAP 2^63 with fd", N, C::DmaMap, map(0, 1 << 63), e(EFAULT)), || vec![memfd(0x1000)]),
        case("DMA_MAP zero size", N, C::DmaMap, map(0x1000, 0), e(EINVAL)),
        case("DMA_MAP unaligned address", N, C::DmaMap, map(0x1001, 0x1000), e(EINVAL)),
        case("DMA_MAP unaligned size", N, C::DmaMap, map(0x1000, 0x1001), e(EINVAL)),
        with_fds(case("DMA_MAP unaligned offset", N, C::DmaMap, dma_map(32, 3, 0x10, 0, 0x1000), e(EINVAL)), || vec![memfd(0x2000)]),
        case("DMA_MAP address overflows", N, C::DmaMap, map(u64::MAX - 0xfff, 0x2000), e(EINVAL)),
        with_fds(case("DMA_MAP offset overflows", N, C::DmaMap, dma_map(32, 3, u64::MAX - 0xfff, 0, 0x2000), e(EINVAL)), || vec![memfd(0x2000)]),
        case("DMA_MAP unknown flags", N, C::DmaMap, dma_map(32, 4, 0, 0, 0x1000), e(EINVAL)),
        case("DMA_MAP overlapping", mapped, C::DmaMap, map(0x18000, 0x10000), e(EEXIST)),
        case("DMA_MAP same range twice", mapped, C::DmaMap, map(0x10000, 0x10000), e(EEXIST)),
        case("DMA_MAP covering an existing map", mapped, C::DmaMap, map(0, 0x100000), e(EEXIST)),
        with_fds(case("DMA_MAP beyond the file", N, C::DmaMap, map(0, 0x2000), e(EFAULT)), || vec![memfd(0x1000)]),
        with_fds(case("DMA_MAP offset beyond the file", N, C::DmaMap, dma_map(32, 3, 0x1000, 0, 0x1000), e(EFAULT)), || vec![memfd(0x1000)]),
        with_fds(case("DMA_MAP empty file", N, C::DmaMap, map(0, 0x1000), e(EFAULT)), || vec![memfd(0)]),
        with_fds(case("DMA_MAP two fds", N, C::DmaMap, map(0, 0x1000), e(EINVAL)), || vec![memfd(0x1000), memfd(0x1000)]),
        with_fds(case("DMA_MAP fds beyond max_msg_fds", N, C::DmaMap, map(0, 0x1000), e(EINVAL)), || (0..17).map(|_| memfd(0x1000)).collect()),
        with_fds(case("DMA_MAP a directory", N, C::DmaMap, map(0, 0x1000), e(EFAULT)), || vec![owned(std::fs::File::open("/").unwrap())]),
        with_fds(case("DMA_MAP a socket", N, C::DmaMap, map(0, 0x1000), e(EFAULT)), || vec![owned(std::os::unix::net::UnixStream::pair().unwrap().0)]),
        with_fds(case("DMA_MAP a pipe", N, C::DmaMap, map(0, 0x1000), e(EFAULT)), || vec![nix::unistd::pipe().unwrap().0]),
        with_fds(case("DMA_MAP an eventfd", N, C::DmaMap, map(0, 0x1000), e(EFAULT)), || vec![eventfd()]),
        with_fds(case("DMA_MAP /dev/null", N, C::DmaMap, map(0, 0x1000), e(EFAULT)), || vec![owned(std::fs::File::open("/dev/null").unwrap())]),
        with_fds(case("DMA_MAP writable on a read-only fd", N, C::DmaMap, map(0, 0x1000), e(EFAULT)), || {
            let f = common::memfd(0x1000);
            let ro = std::fs::File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f))).unwrap();
            vec![owned(ro)]
        }),
        case("DMA_MAP beyond max_dma_maps", Pre::Small, C::DmaMap, map(0x10000, 0x1000), Outcome::Ok),
        // --- DMA_UNMAP.
        case("DMA_UNMAP unknown range", N, C::DmaUnmap, unmap(24, 0, 0x10000, 0x1000), e(ENOENT)),
        case("DMA_UNMAP part of a map", mapped, C::DmaUnmap, unmap(24, 0, 0x10000, 0x1000), e(ENOENT)),
        case("DMA_UNMAP wrong start", mapped, C::DmaUnmap, unmap(24, 0, 0x11000, 0x10000), e(ENOENT)),
        case("DMA_UNMAP zero size", N, C::DmaUnmap, unmap(24, 0, 0x10000, 0), e(EINVAL)),
        case("DMA_UNMAP ALL with an address", N, C::DmaUnmap, unmap(24, 2, 0x1000, 0), e(EINVAL)),
        case("DMA_UNMAP GET_DIRTY_BITMAP", mapped, C::DmaUnmap, unmap(24, 1, 0x10000, 0x10000), e(EINVAL)),
        case("DMA_UNMAP unknown flags", N, C::DmaUnmap, unmap(24, 8, 0x10000, 0x1000), e(EINVAL)),
        // --- SET_IRQS.
        case("SET_IRQS index 5", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 5, 0, 1, &[]), e(EINVAL)),
        case("SET_IRQS start+count overflows", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, IRQ_INDEX_MSIX, u32::MAX, 2, &[]), e(EINVAL)),
        case("SET_IRQS past the vectors", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, 4096, &[]), e(EINVAL)),
        case("SET_IRQS INTx vector 1", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_INTX, 1, 1, &[]), e(EINVAL)),
        case("SET_IRQS two actions", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER | IRQ_SET_ACTION_MASK, IRQ_INDEX_MSIX, 0, 1, &[]), e(EINVAL)),
        case("SET_IRQS two data types", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, 1, &[1]), e(EINVAL)),
        case("SET_IRQS unknown flags", N, C::DeviceSetIrqs, set_irqs(1 << 9 | IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, 1, &[]), e(EINVAL)),
        case("SET_IRQS DATA_BOOL too short", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, 4, &[1, 1]), e(EINVAL)),
        // Bytes past the fixed struct are ignored, as the kernel does (liberal argsz parsing).
        case("SET_IRQS DATA_NONE with data", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, 1, &[1]), Outcome::Ok),
        case("SET_IRQS count 4 G with bools", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, u32::MAX, &[1]), e(EINVAL)),
        case("SET_IRQS ERR index masked", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, IRQ_INDEX_ERR, 0, 1, &[]), e(EINVAL)),
        with_fds(case("SET_IRQS two fds for one vector", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, 1, &[]), e(EINVAL)), || vec![eventfd(), eventfd()]),
        with_fds(case("SET_IRQS one fd for two vectors", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, 2, &[]), e(EINVAL)), || vec![eventfd()]),
        with_fds(case("SET_IRQS fds beyond max_msg_fds", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, 17, &[]), e(EINVAL)), || (0..17).map(|_| eventfd()).collect()),
        with_fds(case("SET_IRQS a memfd as eventfd", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, 1, &[]), e(EINVAL)), || vec![memfd(8)]),
        with_fds(case("SET_IRQS a pipe as eventfd", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, 1, &[]), e(EINVAL)), || vec![nix::unistd::pipe().unwrap().1]),
        with_fds(case("SET_IRQS a socket as eventfd", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, 1, &[]), e(EINVAL)), || vec![owned(std::os::unix::net::UnixStream::pair().unwrap().0)]),
        with_fds(case("SET_IRQS mask eventfd", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_MASK, IRQ_INDEX_INTX, 0, 1, &[]), e(EINVAL)), || vec![eventfd()]),
        with_fds(case("SET_IRQS unmask eventfd on MSI-X", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK, IRQ_INDEX_MSIX, 0, 1, &[]), e(EINVAL)), || vec![eventfd()]),
        with_fds(case("SET_IRQS DATA_BOOL with an fd", N, C::DeviceSetIrqs, set_irqs(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, IRQ_INDEX_MSIX, 0, 1, &[1]), e(EINVAL)), || vec![eventfd()]),
        with_fds(case("GET_INFO with an fd", N, C::DeviceGetInfo, get_info(16), e(EINVAL)), || vec![eventfd()]),
        // --- Migration.
        case("MIG state ERROR", N, C::DeviceFeature, mig_state(0), e(EINVAL)),
        case("MIG state RUNNING_P2P", N, C::DeviceFeature, mig_state(5), e(EINVAL)),
        case("MIG state PRE_COPY_P2P", N, C::DeviceFeature, mig_state(7), e(EINVAL)),
        case("MIG state 8", N, C::DeviceFeature, mig_state(8), e(EINVAL)),
        case("MIG state 4 G", N, C::DeviceFeature, mig_state(u32::MAX), e(EINVAL)),
        case("MIG state short payload", N, C::DeviceFeature, feature(16, SET | MIG_STATE, &[4, 0]), e(EINVAL)),
        case("MIG GET and SET together", N, C::DeviceFeature, feature(16, GET | SET | MIG_STATE, &[0; 8]), e(EINVAL)),
        case("MIG no operation", N, C::DeviceFeature, feature(16, MIG_STATE, &[0; 8]), e(EINVAL)),
        case("MIG SET on the read-only MIGRATION feature", N, C::DeviceFeature, feature(16, SET | 1, &[0; 8]), e(EINVAL)),
        case("unknown feature", N, C::DeviceFeature, feature(16, GET | 0x1234, &[]), e(ENOTTY)),
        case("unknown feature flags", N, C::DeviceFeature, feature(16, GET | 1 << 20 | 1, &[]), e(EINVAL)),
        case("MIG_DATA_READ while RUNNING", N, C::MigDataRead, mig_read(64), e(EINVAL)),
        case("MIG_DATA_WRITE while RUNNING", N, C::MigDataWrite, mig_write(&[0; 16]), e(EINVAL)),
        case("MIG_DATA_READ oversized", N, C::MigDataRead, mig_read((1 << 20) + 1), e(E2BIG)),
        case("MIG_DATA_READ while RESUMING", resuming, C::MigDataRead, mig_read(64), e(EINVAL)),
        case("MIG_DATA_WRITE garbage while RESUMING", resuming, C::MigDataWrite, mig_write(&[0xff; 64]), e(EINVAL)),
        case("MIG_DATA_WRITE oversized section while RESUMING", resuming, C::MigDataWrite, mig_write(&le(&[&[1, 0, 0, 0, 0, 0, 0, 0], &u64b(1 << 40)])), e(EINVAL)),
        case("RESUMING to RUNNING with no stream", resuming, C::DeviceFeature, mig_state(2), e(EINVAL)),
        case("REGION_WRITE BAR while RESUMING", resuming, C::RegionWrite, le(&[&access(0, 0, 4), &[0; 4]]), e(EBUSY)),
        case("DMA_MAP while RESUMING", resuming, C::DmaMap, map(0x100000, 0x1000), Outcome::Ok),
        // --- DMA logging.
        case("LOGGING_START page size 3", N, C::DeviceFeature, log_start(3, &[]), e(EINVAL)),
        case("LOGGING_START page size 0", N, C::DeviceFeature, log_start(0, &[]), e(EINVAL)),
        case("LOGGING_START num_ranges lies", N, C::DeviceFeature, feature(24, SET | LOG_START, &le(&[&u64b(4096), &u32b(1000), &u32b(0)])), e(EINVAL)),
        case("LOGGING_START num_ranges 4 G", N, C::DeviceFeature, feature(24, SET | LOG_START, &le(&[&u64b(4096), &u32b(u32::MAX), &u32b(0)])), e(EINVAL)),
        case("LOGGING_START overflowing range", N, C::DeviceFeature, log_start(4096, &[(u64::MAX, 2)]), e(EINVAL)),
        case("LOGGING_START empty range", N, C::DeviceFeature, log_start(4096, &[(0, 0)]), e(EINVAL)),
        case("LOGGING_START twice", logging, C::DeviceFeature, log_start(4096, &[]), e(EBUSY)),
        case("LOGGING_START over 1 TiB maps past the budget", Pre::Then(C::DmaMap, || map(1 << 41, 1 << 40)), C::DeviceFeature, log_start(4096, &[]), Outcome::Ok),
        case("LOGGING_STOP without START", N, C::DeviceFeature, feature(8, SET | LOG_STOP, &[]), e(EINVAL)),
        case("LOGGING_REPORT without START", N, C::DeviceFeature, log_report(4096, 0, 0x1000, 4096), e(EINVAL)),
        case("LOGGING_REPORT page size 3", logging, C::DeviceFeature, log_report(4096, 0, 0x1000, 3), e(EINVAL)),
        case("LOGGING_REPORT page size 1", logging, C::DeviceFeature, log_report(4096, 0, 0x1000, 1), e(EINVAL)),
        case("LOGGING_REPORT argsz too small", logging, C::DeviceFeature, log_report(16, 0, 1 << 30, 4096), e(EINVAL)),
        case("LOGGING_REPORT past max_data_xfer_size", logging, C::DeviceFeature, log_report(u32::MAX, 0, 1 << 40, 4096), e(E2BIG)),
        case("LOGGING_REPORT 2^64 bytes", logging, C::DeviceFeature, log_report(u32::MAX, 0, u64::MAX, 1 << 12), e(EINVAL)),
        case("LOGGING_REPORT range overflows", logging, C::DeviceFeature, log_report(4096, u64::MAX, 0x10000, 4096), e(EINVAL)),
        case("LOGGING_REPORT short", logging, C::DeviceFeature, feature(4096, GET | LOG_REPORT, &[0; 8]), e(EINVAL)),
    ];
    // Every command with a payload of 1 and 4095 garbage bytes.
    for cmd in [2u16, 3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 17, 18] {
        for (n, name) in [(1, "1 garbage byte"), (4095, "4095 garbage bytes")] {
            let name = format!("command {cmd} with {name}");
            // 0xa5 bytes: argsz and counts of 0xa5a5a5a5. GET_INFO's argsz is merely large
            // and its extra bytes ignored; MIG_DATA_READ's size exceeds max_data_xfer_size.
            let expect = match (cmd, n) {
                (4, 4095) => Outcome::Ok,
                (17, 4095) => e(E2BIG),
                _ => e(EINVAL),
            };
            v.push(raw(name, N, frame(CASE_ID, cmd, 0, &vec![0xa5; n]), expect));
        }
    }
    v
}

fn run_case(path: &std::path::Path, c: &Case) -> Outcome {
    let mut r = match c.pre {
        Pre::Raw => {
            // The fresh-client check of the previous case may still be attached: wait it out.
            drop(fresh_client_is_served(path));
            let mut r;
            loop {
                r = Raw::connect(path);
                // A connection refused while the previous client is let go reads EOF at once.
                let probe = r.s.try_clone().unwrap();
                probe
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                let mut b = [0u8; 1];
                match std::io::Read::read(&mut &probe, &mut b) {
                    Ok(0) => std::thread::sleep(Duration::from_millis(10)),
                    _ => break,
                }
            }
            r
        }
        _ => fresh_client_is_served(path),
    };
    match c.pre {
        Pre::Small => {
            // A fresh connection: re-negotiate is not allowed on this one.
            drop(r);
            r = loop {
                let mut s = Raw::connect(path);
                s.s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                // Padded: the reply may be no longer than the request (or its caps are dropped).
                let mut caps = Capabilities {
                    max_dma_maps: Some(2),
                    ..Default::default()
                };
                caps.unknown.insert("padding".into(), "x".repeat(64).into());
                if s.request(Command::Version, &version_payload(Some(caps)), &[]) == Outcome::Ok {
                    break s;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            for i in 0..2u64 {
                assert_eq!(
                    r.request(Command::DmaMap, &map(i << 12, 0x1000), &[]),
                    Outcome::Ok
                );
            }
            // A third map is refused; the case's own frame then checks the reply shape.
            assert_eq!(
                r.request(Command::DmaMap, &map(0x2000, 0x1000), &[]),
                e(Errno::ENOSPC),
                "beyond max_dma_maps"
            );
            assert_eq!(
                r.request(Command::DmaUnmap, &unmap(24, 0, 0, 0x1000), &[]),
                Outcome::Ok
            );
        }
        Pre::Then(cmd, payload) => {
            assert_eq!(
                r.request(cmd, &payload(), &[]),
                Outcome::Ok,
                "{}: setup",
                c.name
            );
        }
        _ => {}
    }
    let fds = (c.fds)();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    r.send(&c.bytes, &borrowed);
    drop(fds);
    if c.eof {
        let _ = r.s.shutdown(std::net::Shutdown::Write);
        return r.outcome(false);
    }
    r.outcome(true)
}

/// Run a case; a `Pre::Raw` case may land while the server still lets go of the previous
/// client, when it refuses the connection (closes it unread): that is retried.
fn run_case_retrying(path: &std::path::Path, c: &Case) -> Outcome {
    for _ in 0..50 {
        let got = run_case(path, c);
        if !(matches!(c.pre, Pre::Raw) && got == Disconnect && c.expect != Disconnect) {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Disconnect
}

#[test]
fn hostile_clients_get_exact_answers_and_a_fresh_client_is_served() {
    let server = InProcess::start("dma-engine");
    let cases = cases();
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    let mut names = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for c in &cases {
        assert!(names.insert(c.name.clone()), "duplicate case {}", c.name);
        let got = run_case_retrying(&server.path, c);
        if got != c.expect {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                c.name, c.expect, got
            ));
        }
        assert!(server.alive(), "the server died at {}", c.name);
        let mut fresh = fresh_client_is_served(&server.path);
        assert_eq!(
            fresh.request(Command::RegionRead, &access(0, 7, 2), &[]),
            Outcome::Ok,
            "fresh client after {}",
            c.name
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// REGION_READ of 64 KiB of config/BAR memory per request, never reading the replies.
fn flood_without_reading(r: &Raw) {
    let req = frame(
        CASE_ID,
        Command::RegionRead as u16,
        0,
        &access(0, 2, 64 * 1024),
    );
    r.s.set_nonblocking(true).unwrap();
    // Write until our side's buffer is full too: the server is then stuck sending to us.
    let mut sent = 0;
    for _ in 0..10_000 {
        match std::io::Write::write(&mut &r.s, &req) {
            Ok(_) => sent += 1,
            Err(_) => break,
        }
    }
    assert!(sent > 10, "the server read nothing");
    r.s.set_nonblocking(false).unwrap();
}

#[test]
fn a_client_that_never_reads_is_disconnected_and_the_next_one_served() {
    let server = InProcess::start("dma-engine");
    let r = fresh_client_is_served(&server.path);
    flood_without_reading(&r);
    // Bounded send buffering: the server gives up on this client (SEND_TIMEOUT) and closes
    // it while we still read nothing (the hang-up shows without reading).
    let mut p = [nix::poll::PollFd::new(
        r.s.as_fd(),
        nix::poll::PollFlags::from_bits_retain(nix::libc::POLLRDHUP),
    )];
    let n = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(60_000u16)).unwrap();
    assert_eq!(n, 1, "the server still holds a client that does not read");
    // What it sent before giving up is still there, then EOF (or ECONNRESET: the server
    // closed with our unread requests still in its buffer).
    r.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        match std::io::Read::read(&mut &r.s, &mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("no disconnect: {e} after {total} bytes"),
        }
    }
    let mut fresh = fresh_client_is_served(&server.path);
    assert_eq!(
        fresh.request(Command::RegionRead, &access(0, 7, 2), &[]),
        Outcome::Ok
    );
}

#[test]
fn a_flood_of_connections_leaves_the_device_serving() {
    let server = InProcess::start("dma-engine");
    let mut held = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&server.path) {
            let _ = std::io::Write::write(&mut &s, &[0xff; 7]);
            held.push(s);
        }
    }
    assert!(held.len() >= 100, "only {} connections", held.len());
    drop(held);
    let mut fresh = fresh_client_is_served(&server.path);
    assert_eq!(
        fresh.request(Command::RegionRead, &access(0, 7, 2), &[]),
        Outcome::Ok
    );
    assert!(server.alive());
}
