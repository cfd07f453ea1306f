//! Requests longer than their fixed struct, for every command whose message carries `argsz`:
//! accepted when the payload is no longer than `argsz` (the tail is ignored), refused when the
//! tail goes past `argsz`, refused when the payload is shorter than the struct. libvfio-user's
//! client sends `argsz` bytes of request (64 bytes of GET_REGION_INFO, for instance).
//! Also: MIG_DATA_READ replies padded to the requested size, as libvfio-user servers send them.

use vfud_protocol::codec::Limits;
use vfud_protocol::header::Command;
use vfud_protocol::messages::dma::DMA_MAP_FLAG_READ;
use vfud_protocol::messages::feature::{
    DmaLoggingControl, DmaLoggingRange, FEATURE_DMA_LOGGING_START, FEATURE_SET,
};
use vfud_protocol::messages::irq::{
    IrqSetHeader, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};
use vfud_protocol::messages::{
    DeviceInfo, DmaMap, DmaUnmap, IrqData, IrqInfo, MigData, RegionInfo, RegionIoFds, Request,
};
use vfud_protocol::ProtocolError;
use zerocopy::IntoBytes;

fn decode(cmd: Command, payload: &[u8]) -> Result<Request, ProtocolError> {
    Request::decode(cmd as u16, payload, Vec::new(), &Limits::default())
}

/// `fixed` (whose first field is `argsz`) with its `argsz` set to `argsz`, then `tail` bytes.
fn with_tail(fixed: &[u8], argsz: u32, tail: usize) -> Vec<u8> {
    let mut v = fixed.to_vec();
    v[..4].copy_from_slice(&argsz.to_le_bytes());
    v.extend((0..tail).map(|i| 0xa5 ^ i as u8));
    v
}

/// The three cases for one command: a tail within `argsz` decodes like the bare struct, a tail
/// past `argsz` is a length error, a payload cut short of the struct is too short.
fn check_command(cmd: Command, fixed: &[u8], same: impl Fn(&Request, &Request) -> bool) {
    let n = fixed.len();
    let bare = decode(cmd, &with_tail(fixed, n as u32 + 32, 0)).expect("bare struct");
    let long = decode(cmd, &with_tail(fixed, n as u32 + 32, 32))
        .unwrap_or_else(|e| panic!("{cmd:?}: tail within argsz refused: {e}"));
    assert!(same(&bare, &long), "{cmd:?}: the tail changed the request");
    let past = decode(cmd, &with_tail(fixed, n as u32 + 32, 33));
    assert!(
        matches!(past, Err(ProtocolError::PayloadLength { got, expected, .. }) if got == n + 33 && expected == n + 32),
        "{cmd:?}: tail past argsz: {past:?}"
    );
    let short = decode(cmd, &with_tail(fixed, n as u32 + 32, 0)[..n - 1]);
    assert!(
        matches!(short, Err(ProtocolError::PayloadTooShort { .. })),
        "{cmd:?}: short payload: {short:?}"
    );
}

#[test]
fn get_region_info_of_64_bytes_as_libvfio_user_sends_it() {
    let req = RegionInfo {
        argsz: 64,
        index: 7,
        ..RegionInfo::default()
    };
    // Exactly what libvfio-user's client sends when asking again with room for the caps.
    let mut p = req.as_bytes().to_vec();
    p.resize(64, 0);
    match decode(Command::DeviceGetRegionInfo, &p) {
        Ok(Request::GetRegionInfo(i)) => assert_eq!((i.argsz, i.index), (64, 7)),
        other => panic!("{other:?}"),
    }
    check_command(
        Command::DeviceGetRegionInfo,
        req.as_bytes(),
        |a, b| matches!((a, b), (Request::GetRegionInfo(x), Request::GetRegionInfo(y)) if x.index == y.index),
    );
}

#[test]
fn device_get_info_with_a_tail() {
    check_command(
        Command::DeviceGetInfo,
        DeviceInfo::default().as_bytes(),
        |a, b| {
            matches!(
                (a, b),
                (Request::DeviceGetInfo(_), Request::DeviceGetInfo(_))
            )
        },
    );
}

#[test]
fn get_region_io_fds_with_a_tail() {
    let req = RegionIoFds {
        index: 2,
        ..RegionIoFds::default()
    };
    check_command(
        Command::DeviceGetRegionIoFds,
        req.as_bytes(),
        |a, b| matches!((a, b), (Request::GetRegionIoFds(x), Request::GetRegionIoFds(y)) if x.index == y.index),
    );
}

#[test]
fn get_irq_info_with_a_tail() {
    let req = IrqInfo {
        index: 2,
        ..IrqInfo::default()
    };
    check_command(
        Command::DeviceGetIrqInfo,
        req.as_bytes(),
        |a, b| matches!((a, b), (Request::GetIrqInfo(x), Request::GetIrqInfo(y)) if x.index == y.index),
    );
}

#[test]
fn dma_map_with_a_tail() {
    let req = DmaMap {
        argsz: 32,
        flags: DMA_MAP_FLAG_READ,
        offset: 0,
        addr: 0x1000,
        size: 0x2000,
    };
    check_command(
        Command::DmaMap,
        req.as_bytes(),
        |a, b| matches!((a, b), (Request::DmaMap(x, _), Request::DmaMap(y, _)) if x.addr == y.addr && x.size == y.size),
    );
}

#[test]
fn dma_unmap_with_a_tail() {
    let req = DmaUnmap {
        argsz: 24,
        flags: 0,
        addr: 0x1000,
        size: 0x2000,
    };
    check_command(
        Command::DmaUnmap,
        req.as_bytes(),
        |a, b| matches!((a, b), (Request::DmaUnmap(x), Request::DmaUnmap(y)) if x.addr == y.addr && x.size == y.size),
    );
}

#[test]
fn mig_data_read_with_a_tail() {
    let req = MigData { argsz: 8, size: 16 };
    check_command(
        Command::MigDataRead,
        req.as_bytes(),
        |a, b| matches!((a, b), (Request::MigDataRead(x), Request::MigDataRead(y)) if x.size == y.size),
    );
}

#[test]
fn mig_data_write_takes_size_bytes_and_ignores_a_tail_within_argsz() {
    let mut p = MigData {
        argsz: 8 + 4 + 6,
        size: 4,
    }
    .as_bytes()
    .to_vec();
    p.extend_from_slice(&[1, 2, 3, 4, 9, 9, 9, 9, 9, 9]);
    match decode(Command::MigDataWrite, &p) {
        Ok(Request::MigDataWrite(d)) => assert_eq!(d, [1, 2, 3, 4]),
        other => panic!("{other:?}"),
    }
    p.push(9);
    assert!(matches!(
        decode(Command::MigDataWrite, &p),
        Err(ProtocolError::PayloadLength { .. })
    ));
    // Fewer bytes than `size` is still an error.
    let short = [MigData { argsz: 16, size: 8 }.as_bytes(), &[1, 2][..]].concat();
    assert!(matches!(
        decode(Command::MigDataWrite, &short),
        Err(ProtocolError::InvalidField { field: "size", .. })
    ));
}

fn irq_set(flags: u32, count: u32, data: &[u8], argsz: u32) -> Vec<u8> {
    let h = IrqSetHeader {
        argsz,
        flags,
        index: 2,
        start: 0,
        count,
    };
    [h.as_bytes(), data].concat()
}

#[test]
fn set_irqs_ignores_a_tail_within_argsz_for_each_data_type() {
    let none = irq_set(IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE, 2, &[0; 12], 32);
    assert!(matches!(
        decode(Command::DeviceSetIrqs, &none),
        Ok(Request::SetIrqs(s)) if matches!(s.data, IrqData::None) && s.count == 2
    ));
    let bools = irq_set(
        IRQ_SET_ACTION_MASK | IRQ_SET_DATA_BOOL,
        2,
        &[1, 0, 7, 7],
        24,
    );
    match decode(Command::DeviceSetIrqs, &bools) {
        Ok(Request::SetIrqs(s)) => {
            assert!(matches!(s.data, IrqData::Bool(ref v) if v == &[true, false]))
        }
        other => panic!("{other:?}"),
    }
    let efd = irq_set(
        IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
        1,
        &[0; 4],
        24,
    );
    assert!(matches!(
        decode(Command::DeviceSetIrqs, &efd),
        Ok(Request::SetIrqs(s)) if matches!(s.data, IrqData::Eventfds(ref v) if v.is_empty())
    ));
    // One byte past argsz, for each type.
    for p in [
        irq_set(IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE, 2, &[0; 13], 32),
        irq_set(
            IRQ_SET_ACTION_MASK | IRQ_SET_DATA_BOOL,
            2,
            &[1, 0, 7, 7, 7],
            24,
        ),
        irq_set(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
            1,
            &[0; 5],
            24,
        ),
    ] {
        let r = decode(Command::DeviceSetIrqs, &p);
        assert!(
            matches!(r, Err(ProtocolError::PayloadLength { .. })),
            "{r:?}"
        );
    }
}

#[test]
fn dma_logging_start_ignores_bytes_after_its_ranges() {
    let ctl = DmaLoggingControl {
        page_size: 4096,
        ranges: vec![DmaLoggingRange {
            iova: 0,
            length: 1 << 20,
        }],
    };
    let mut data = ctl.encode();
    data.extend_from_slice(&[0xee; 16]);
    assert_eq!(DmaLoggingControl::decode(&data).expect("tail ignored"), ctl);
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&(FEATURE_SET | u32::from(FEATURE_DMA_LOGGING_START)).to_le_bytes());
    p.extend_from_slice(&data);
    let len = p.len() as u32;
    p[..4].copy_from_slice(&len.to_le_bytes());
    assert!(matches!(
        decode(Command::DeviceFeature, &p),
        Ok(Request::DeviceFeature(f)) if f.set && f.feature == FEATURE_DMA_LOGGING_START
    ));
    // Ranges promised but missing are still an error.
    let cut = &ctl.encode()[..20];
    assert!(DmaLoggingControl::decode(cut).is_err());
}

#[test]
fn padded_mig_data_read_replies_give_the_announced_bytes() {
    // libvfio-user: 5 data bytes in a reply padded to the 16 requested.
    let mut reply = MigData { argsz: 13, size: 5 }.as_bytes().to_vec();
    reply.extend_from_slice(&[1, 2, 3, 4, 5]);
    reply.resize(8 + 16, 0);
    let (data, padding) = MigData::decode_read_reply(&reply, 16).expect("padded reply");
    assert_eq!((data, padding), (&[1u8, 2, 3, 4, 5][..], 11));
    // vfud's own (spec-exact) reply has no padding.
    let exact = MigData::encode_with_data(&[1, 2, 3]);
    assert_eq!(exact.len(), 8 + 3);
    assert_eq!(
        MigData::decode_read_reply(&exact, 16).unwrap(),
        (&[1u8, 2, 3][..], 0)
    );
    // Longer than the request allowed, or more data than asked: refused.
    reply.push(0);
    assert!(matches!(
        MigData::decode_read_reply(&reply, 16),
        Err(ProtocolError::PayloadLength { .. })
    ));
    let big = MigData::encode_with_data(&[0; 17]);
    assert!(MigData::decode_read_reply(&big, 16).is_err());
    // Fewer bytes than announced: refused.
    assert!(MigData::decode_read_reply(&exact[..10], 16).is_err());
}
