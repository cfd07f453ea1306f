//! Field-level validation without a socket: every flag, count and length rule the decoders
//! enforce (SET_IRQS, DMA_MAP/UNMAP, WRITE_MULTI, DEVICE_FEATURE, VERSION, DMA logging) and
//! hostile GET_REGION_INFO / GET_REGION_IO_FDS replies. Each case names the variant it expects.

use vfud_protocol::codec::Limits;
use vfud_protocol::header::Command;
use vfud_protocol::messages::dma::{
    DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_UNMAP_FLAG_ALL, DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
};
use vfud_protocol::messages::feature::{
    DmaLoggingControl, DmaLoggingControlHeader, DmaLoggingRange, FEATURE_GET, FEATURE_PROBE,
    FEATURE_SET,
};
use vfud_protocol::messages::irq::{
    IrqSetHeader, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};
use vfud_protocol::messages::region::{CapHeader, RegionInfo, REGION_FLAG_CAPS};
use vfud_protocol::messages::{
    DeviceFeature, DmaAccess, DmaMap, DmaUnmap, MigData, RegionInfoReply, RegionIoFds, Request,
    SetIrqs, VersionMessage, WriteMultiEntry,
};
use vfud_protocol::ProtocolError;
use zerocopy::IntoBytes;

fn decode(cmd: Command, payload: &[u8]) -> Result<Request, ProtocolError> {
    Request::decode(cmd as u16, payload, Vec::new(), &Limits::default())
}

fn is_invalid(res: &Result<Request, ProtocolError>, want: &str) -> bool {
    matches!(res, Err(ProtocolError::InvalidField { field, .. }) if *field == want)
}

// ---------------------------------------------------------------------------------------------
// SET_IRQS

fn irq_set(flags: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    irq_set_argsz(flags, start, count, data, 20 + data.len() as u32)
}

fn irq_set_argsz(flags: u32, start: u32, count: u32, data: &[u8], argsz: u32) -> Vec<u8> {
    let mut v = IrqSetHeader {
        argsz,
        flags,
        index: 2,
        start,
        count,
    }
    .as_bytes()
    .to_vec();
    v.extend_from_slice(data);
    v
}

#[test]
fn set_irqs_needs_exactly_one_action_and_one_data_type() {
    const T: u32 = IRQ_SET_ACTION_TRIGGER;
    const N: u32 = IRQ_SET_DATA_NONE;
    let cases: &[(&str, u32)] = &[
        ("no action", N),
        (
            "mask and unmask",
            IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | N,
        ),
        (
            "all three actions",
            IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | T | N,
        ),
        ("no data type", T),
        ("none and bool", T | N | IRQ_SET_DATA_BOOL),
        (
            "bool and eventfd",
            T | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD,
        ),
        ("unknown bit 6", T | N | 1 << 6),
        ("unknown bit 31", T | N | 1 << 31),
    ];
    for (name, flags) in cases {
        let res = SetIrqs::decode(&irq_set(*flags, 0, 1, &[]), Vec::new());

        assert!(
            matches!(res, Err(ProtocolError::InvalidField { field: "flags", .. })),
            "{name}: {res:?}"
        );
    }
}

#[test]
fn set_irqs_count_zero_is_only_the_trigger_none_disable_at_start_zero() {
    let bad: &[(&str, Vec<u8>)] = &[
        (
            "MASK|NONE",
            irq_set(IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE, 0, 0, &[]),
        ),
        (
            "UNMASK|NONE",
            irq_set(IRQ_SET_ACTION_UNMASK | IRQ_SET_DATA_NONE, 0, 0, &[]),
        ),
        (
            "TRIGGER|BOOL",
            irq_set(IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_BOOL, 0, 0, &[]),
        ),
        (
            "TRIGGER|EVENTFD",
            irq_set(IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD, 0, 0, &[]),
        ),
        (
            "start 1",
            irq_set(IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE, 1, 0, &[]),
        ),
    ];
    for (name, payload) in bad {
        let res = SetIrqs::decode(payload, Vec::new());

        assert!(
            matches!(res, Err(ProtocolError::InvalidField { field: "count", .. })),
            "{name}: {res:?}"
        );
    }
    let ok = SetIrqs::decode(
        &irq_set(IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE, 0, 0, &[]),
        Vec::new(),
    );
    assert!(ok.expect("disable form").is_disable());
}

#[test]
fn set_irqs_data_must_match_its_type() {
    let res = SetIrqs::decode(
        &irq_set(IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_BOOL, 0, 3, &[1, 1]),
        Vec::new(),
    );
    assert!(
        matches!(res, Err(ProtocolError::InvalidField { field: "data", .. })),
        "BOOL too short: {res:?}"
    );
    // Bytes after the data that `argsz` does not cover are refused.
    let cases: &[(&str, Vec<u8>)] = &[
        (
            "NONE with bytes",
            irq_set_argsz(IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE, 0, 1, &[1], 20),
        ),
        (
            "BOOL too long",
            irq_set_argsz(IRQ_SET_ACTION_MASK | IRQ_SET_DATA_BOOL, 0, 1, &[1, 1], 21),
        ),
        (
            "EVENTFD with bytes",
            irq_set_argsz(
                IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
                0,
                1,
                &[0; 4],
                20,
            ),
        ),
    ];
    for (name, payload) in cases {
        let res = SetIrqs::decode(payload, Vec::new());

        assert!(
            matches!(res, Err(ProtocolError::PayloadLength { .. })),
            "{name}: {res:?}"
        );
    }
}

#[test]
fn set_irqs_start_plus_count_must_not_overflow() {
    let payload = irq_set(IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE, u32::MAX, 2, &[]);

    let res = SetIrqs::decode(&payload, Vec::new());

    assert!(matches!(
        res,
        Err(ProtocolError::InvalidField { field: "start", .. })
    ));
}

#[test]
fn set_irqs_shorter_than_its_header_is_too_short() {
    let res = decode(Command::DeviceSetIrqs, &[0; 19]);

    assert!(matches!(
        res,
        Err(ProtocolError::PayloadTooShort {
            got: 19,
            needed: 20,
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// DMA_MAP / DMA_UNMAP

fn dma_map(flags: u32, offset: u64, addr: u64, size: u64) -> Vec<u8> {
    DmaMap {
        argsz: 32,
        flags,
        offset,
        addr,
        size,
    }
    .as_bytes()
    .to_vec()
}

#[test]
fn dma_map_rejects_unknown_flags_empty_and_overflowing_ranges() {
    const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
    let cases: &[(&str, Vec<u8>, &str)] = &[
        ("LVU MMAP flag", dma_map(RW | 1 << 2, 0, 0, 4096), "flags"),
        ("bit 31", dma_map(1 << 31, 0, 0, 4096), "flags"),
        ("size 0", dma_map(RW, 0, 0x1000, 0), "size"),
        (
            "addr + size overflows",
            dma_map(RW, 0, u64::MAX - 4095, 4096),
            "addr",
        ),
        (
            "offset + size overflows",
            dma_map(RW, u64::MAX, 0, 2),
            "addr",
        ),
    ];
    for (name, payload, field) in cases {
        let res = decode(Command::DmaMap, payload);

        assert!(is_invalid(&res, field), "{name}: {res:?}");
    }
    // The last byte of the address space is reachable.
    assert!(decode(Command::DmaMap, &dma_map(RW, 0, u64::MAX - 4096, 4096)).is_ok());
}

#[test]
fn dma_map_with_trailing_bytes_is_rejected() {
    let mut p = dma_map(DMA_MAP_FLAG_READ, 0, 0, 4096);
    p.push(0);

    let res = decode(Command::DmaMap, &p);

    assert!(matches!(
        res,
        Err(ProtocolError::PayloadLength {
            got: 33,
            expected: 32,
            ..
        })
    ));
}

fn dma_unmap(flags: u32, addr: u64, size: u64) -> Vec<u8> {
    DmaUnmap {
        argsz: 24,
        flags,
        addr,
        size,
    }
    .as_bytes()
    .to_vec()
}

#[test]
fn dma_unmap_flag_rules() {
    let cases: &[(&str, Vec<u8>, &str)] = &[
        (
            "GET_DIRTY_BITMAP",
            dma_unmap(DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 0, 4096),
            "flags",
        ),
        ("unknown bit 2", dma_unmap(1 << 2, 0, 4096), "flags"),
        (
            "ALL with addr",
            dma_unmap(DMA_UNMAP_FLAG_ALL, 0x1000, 0),
            "flags",
        ),
        (
            "ALL with size",
            dma_unmap(DMA_UNMAP_FLAG_ALL, 0, 0x1000),
            "flags",
        ),
        ("size 0 without ALL", dma_unmap(0, 0x1000, 0), "size"),
    ];
    for (name, payload, field) in cases {
        let res = decode(Command::DmaUnmap, payload);

        assert!(is_invalid(&res, field), "{name}: {res:?}");
    }
}

#[test]
fn dma_access_count_must_match_data_and_read_has_no_data() {
    let mut p = DmaAccess { addr: 0, count: 8 }.as_bytes().to_vec();
    p.extend_from_slice(&[0; 4]);

    assert!(matches!(
        DmaAccess::decode_with_data(&p),
        Err(ProtocolError::InvalidField { field: "count", .. })
    ));
    assert!(matches!(
        DmaAccess::decode_read(&p),
        Err(ProtocolError::PayloadLength { .. })
    ));
    assert!(matches!(
        DmaAccess::decode_read(&p[..15]),
        Err(ProtocolError::PayloadTooShort { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// REGION_WRITE_MULTI

fn entry(count: u32) -> WriteMultiEntry {
    WriteMultiEntry {
        offset: 0,
        region: 0,
        count,
        data: [0; 8],
    }
}

#[test]
fn write_multi_batch_rules() {
    let mut short = WriteMultiEntry::encode_batch(&[entry(4), entry(4)]);
    short.truncate(8 + 24);
    let mut long = WriteMultiEntry::encode_batch(&[entry(4)]);
    long.extend_from_slice(&[0; 24]);
    let too_many = WriteMultiEntry::encode_batch(&vec![entry(1); 201]);

    assert!(is_invalid(
        &decode(Command::RegionWriteMulti, &0u64.to_ne_bytes()),
        "wr_cnt"
    ));
    assert!(is_invalid(
        &decode(Command::RegionWriteMulti, &too_many),
        "wr_cnt"
    ));
    assert!(is_invalid(
        &decode(Command::RegionWriteMulti, &u64::MAX.to_ne_bytes()),
        "wr_cnt"
    ));
    assert!(matches!(
        decode(Command::RegionWriteMulti, &short),
        Err(ProtocolError::PayloadLength { expected: 56, .. })
    ));
    assert!(matches!(
        decode(Command::RegionWriteMulti, &long),
        Err(ProtocolError::PayloadLength { expected: 32, .. })
    ));
    assert!(matches!(
        decode(Command::RegionWriteMulti, &[0; 4]),
        Err(ProtocolError::PayloadTooShort { .. })
    ));
    // 200 entries is the maximum and is accepted.
    let max = WriteMultiEntry::encode_batch(&vec![entry(8); 200]);
    assert!(matches!(
        decode(Command::RegionWriteMulti, &max),
        Ok(Request::RegionWriteMulti(v)) if v.len() == 200
    ));
}

#[test]
fn write_multi_entry_count_must_be_1_to_8() {
    for bad in [0u32, 9, u32::MAX] {
        let p = WriteMultiEntry::encode_batch(&[entry(1), entry(bad)]);

        let res = decode(Command::RegionWriteMulti, &p);

        assert!(is_invalid(&res, "count"), "count {bad}: {res:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// DEVICE_FEATURE, DMA logging, MIG_DATA

fn feature(flags: u32) -> Vec<u8> {
    let mut v = 16u32.to_ne_bytes().to_vec();
    v.extend_from_slice(&flags.to_ne_bytes());
    v
}

#[test]
fn device_feature_operation_rules() {
    let cases: &[(&str, u32)] = &[
        ("GET and SET", 1 | FEATURE_GET | FEATURE_SET),
        (
            "GET, SET and PROBE",
            1 | FEATURE_GET | FEATURE_SET | FEATURE_PROBE,
        ),
        ("no operation", 1),
        ("unknown bit 19", 1 | FEATURE_GET | 1 << 19),
    ];
    for (name, flags) in cases {
        let res = DeviceFeature::decode(&feature(*flags));

        assert!(
            matches!(res, Err(ProtocolError::InvalidField { field: "flags", .. })),
            "{name}: {res:?}"
        );
    }
    assert!(matches!(
        DeviceFeature::decode(&[0; 7]),
        Err(ProtocolError::PayloadTooShort { needed: 8, .. })
    ));
    // PROBE alone, and PROBE with either op, are valid.
    for flags in [
        FEATURE_PROBE,
        FEATURE_PROBE | FEATURE_GET,
        FEATURE_PROBE | FEATURE_SET,
    ] {
        assert!(
            DeviceFeature::decode(&feature(2 | flags)).is_ok(),
            "{flags:#x}"
        );
    }
}

fn logging(page_size: u64, num_ranges: u32, ranges: &[DmaLoggingRange]) -> Vec<u8> {
    let mut v = DmaLoggingControlHeader {
        page_size,
        num_ranges,
        reserved: 0,
    }
    .as_bytes()
    .to_vec();
    for r in ranges {
        v.extend_from_slice(r.as_bytes());
    }
    v
}

#[test]
fn dma_logging_control_rules() {
    let r = |iova, length| DmaLoggingRange { iova, length };

    for ps in [0u64, 3, 4095, 4097] {
        assert!(
            matches!(
                DmaLoggingControl::decode(&logging(ps, 0, &[])),
                Err(ProtocolError::InvalidField {
                    field: "page_size",
                    ..
                })
            ),
            "page_size {ps}"
        );
    }
    assert!(matches!(
        DmaLoggingControl::decode(&logging(4096, 2, &[r(0, 4096)])),
        Err(ProtocolError::PayloadLength { expected: 48, .. })
    ));
    assert!(matches!(
        DmaLoggingControl::decode(&logging(4096, u32::MAX, &[r(0, 4096)])),
        Err(ProtocolError::PayloadLength { .. })
    ));
    assert!(matches!(
        DmaLoggingControl::decode(&logging(4096, 1, &[r(0, 0)])),
        Err(ProtocolError::InvalidField { field: "range", .. })
    ));
    assert!(matches!(
        DmaLoggingControl::decode(&logging(4096, 1, &[r(u64::MAX, 2)])),
        Err(ProtocolError::InvalidField { field: "range", .. })
    ));
    assert!(matches!(
        DmaLoggingControl::decode(&[0; 15]),
        Err(ProtocolError::PayloadTooShort { .. })
    ));
}

#[test]
fn mig_data_lengths() {
    assert!(matches!(
        decode(Command::MigDataRead, &[0; 4]),
        Err(ProtocolError::PayloadTooShort { .. })
    ));
    assert!(matches!(
        decode(Command::MigDataRead, &[0; 12]),
        Err(ProtocolError::PayloadLength { .. })
    ));
    assert!(matches!(
        MigData::decode_write(&[0; 7]),
        Err(ProtocolError::PayloadTooShort { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// VERSION

#[test]
fn version_payload_rules() {
    let with = |json: &[u8]| {
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(json);
        p
    };

    assert!(matches!(
        VersionMessage::decode(&[0, 0]),
        Err(ProtocolError::PayloadTooShort { .. })
    ));
    assert!(matches!(
        VersionMessage::decode(&with(b"{\"capabilities\":{}}")),
        Err(ProtocolError::InvalidField { .. })
    ));
    assert!(matches!(
        VersionMessage::decode(&with(b"{\"capa\0bilities\":{}}\0")),
        Err(ProtocolError::InvalidField { .. })
    ));
    assert!(matches!(
        VersionMessage::decode(&with(b"\0")),
        Err(ProtocolError::InvalidJson(_))
    ));
    assert!(matches!(
        VersionMessage::decode(&with(b"[1,2]\0")),
        Err(ProtocolError::InvalidJson(_))
    ));
    assert!(matches!(
        VersionMessage::decode(&with(b"{\"capabilities\":{\"max_msg_fds\":-1}}\0")),
        Err(ProtocolError::InvalidJson(_))
    ));
    assert!(matches!(
        VersionMessage::decode(&with(b"{\"capabilities\":{\"write_multiple\":1}}\0")),
        Err(ProtocolError::InvalidJson(_))
    ));
    assert!(matches!(
        VersionMessage::decode(&with(b"\xff\xfe\0")),
        Err(ProtocolError::InvalidJson(_))
    ));
    // A document without "capabilities" means all defaults.
    let v = VersionMessage::decode(&with(b"{}\0")).expect("empty object");
    assert_eq!(v.caps, Some(Default::default()));
}

#[test]
fn version_deeply_nested_json_is_an_error_not_a_stack_overflow() {
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(b"{\"capabilities\":{\"x\":");
    p.extend_from_slice(&vec![b'['; 100_000]);
    p.push(0);

    let res = VersionMessage::decode(&p);

    assert!(matches!(res, Err(ProtocolError::InvalidJson(_))));
}

// ---------------------------------------------------------------------------------------------
// Hostile GET_REGION_INFO and GET_REGION_IO_FDS replies (decoded by a client)

fn info_with_caps(argsz: u32, cap_offset: u32) -> Vec<u8> {
    RegionInfo {
        argsz,
        flags: REGION_FLAG_CAPS,
        index: 0,
        cap_offset,
        size: 4096,
        offset: 0,
    }
    .as_bytes()
    .to_vec()
}

fn cap(id: u16, next: u32, body: &[u8]) -> Vec<u8> {
    let mut v = CapHeader {
        id,
        version: 1,
        next,
    }
    .as_bytes()
    .to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn region_info_reply_rejects_broken_cap_chains() {
    let mut past_end = info_with_caps(40, 64);
    past_end.extend_from_slice(&[0; 8]);
    let mut hdr_cut = info_with_caps(36, 32);
    hdr_cut.extend_from_slice(&[0; 4]);
    let mut backwards = info_with_caps(56, 32);
    backwards.extend(cap(99, 16, &[0; 8]));
    backwards.extend(cap(99, 0, &[0; 8]));
    let mut self_loop = info_with_caps(48, 32);
    self_loop.extend(cap(99, 32, &[0; 8]));
    let mut next_past_end = info_with_caps(48, 32);
    next_past_end.extend(cap(99, 4096, &[0; 8]));
    let mut too_many = Vec::new();
    let n = 17u32;
    too_many.extend(info_with_caps(32 + 8 * n, 32));
    for i in 0..n {
        let next = if i + 1 == n { 0 } else { 32 + 8 * (i + 1) };
        too_many.extend(cap(99, next, &[]));
    }
    let mut sparse_lies = info_with_caps(48, 32);
    sparse_lies.extend(cap(1, 0, &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]));

    let cases: &[(&str, &[u8], &str)] = &[
        ("cap_offset past the end", &past_end, "cap_offset"),
        ("cap header cut short", &hdr_cut, "cap_offset"),
        ("next points backwards", &backwards, "cap next"),
        ("next points at itself", &self_loop, "cap next"),
        ("next past the end", &next_past_end, "cap next"),
        ("17 capabilities", &too_many, "cap chain"),
        ("sparse nr_areas beyond the bytes", &sparse_lies, "nr_areas"),
    ];
    for (name, bytes, field) in cases {
        let res = RegionInfoReply::decode(bytes);

        assert!(
            matches!(&res, Err(ProtocolError::InvalidField { field: f, .. }) if f == field),
            "{name}: {res:?}"
        );
    }
}

#[test]
fn region_info_reply_type_cap_too_short_and_struct_too_short() {
    let mut short_type = info_with_caps(44, 32);
    short_type.extend(cap(2, 0, &[0; 4]));

    assert!(matches!(
        RegionInfoReply::decode(&short_type),
        Err(ProtocolError::PayloadTooShort { .. })
    ));
    assert!(matches!(
        RegionInfoReply::decode(&[0; 31]),
        Err(ProtocolError::PayloadTooShort { needed: 32, .. })
    ));
}

#[test]
fn region_info_reply_ignores_chain_when_caps_flag_is_clear_or_truncated() {
    // cap_offset points nowhere, but without FLAG_CAPS nothing is walked.
    let mut no_flag = info_with_caps(32, 0xffff);
    no_flag[4..8].copy_from_slice(&0u32.to_ne_bytes());
    // argsz says 4096 but only 32 bytes came: truncated, nothing is walked.
    let truncated = info_with_caps(4096, 0xffff);

    let a = RegionInfoReply::decode(&no_flag).expect("no caps flag");
    let b = RegionInfoReply::decode(&truncated).expect("truncated");

    assert!(a.caps.is_empty());
    assert!(b.caps.is_empty());
    assert_eq!(b.info.argsz, 4096);
}

#[test]
fn region_io_fds_reply_count_is_bounded_by_the_bytes() {
    let mut p = RegionIoFds {
        argsz: 56,
        flags: 0,
        index: 0,
        count: 2,
    }
    .as_bytes()
    .to_vec();
    p.extend_from_slice(&[0; 40]);

    assert!(matches!(
        RegionIoFds::decode_reply(&p),
        Err(ProtocolError::InvalidField { field: "count", .. })
    ));
    p[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
    assert!(matches!(
        RegionIoFds::decode_reply(&p),
        Err(ProtocolError::InvalidField { field: "count", .. })
    ));
    assert!(matches!(
        RegionIoFds::decode_reply(&p[..12]),
        Err(ProtocolError::PayloadTooShort { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Error → errno, the single mapping used for error replies

#[test]
fn errno_mapping_per_variant() {
    use nix::errno::Errno;
    let cases: Vec<(ProtocolError, Errno)> = vec![
        (ProtocolError::UnsupportedCommand(14), Errno::ENOSYS),
        (
            ProtocolError::TransferTooLarge { size: 2, max: 1 },
            Errno::E2BIG,
        ),
        (ProtocolError::MsgTooLarge { size: 2, max: 1 }, Errno::E2BIG),
        (
            ProtocolError::UnsupportedVersion { major: 1, minor: 0 },
            Errno::ENOTSUP,
        ),
        (ProtocolError::Remote(Errno::EEXIST), Errno::EEXIST),
        (ProtocolError::Timeout, Errno::ETIMEDOUT),
        (ProtocolError::Disconnected, Errno::ENOTCONN),
        (
            ProtocolError::Io(std::io::Error::from_raw_os_error(Errno::EPIPE as i32)),
            Errno::EPIPE,
        ),
        (
            ProtocolError::Io(std::io::Error::other("no os error")),
            Errno::EIO,
        ),
        (
            ProtocolError::ArgszTooSmall {
                argsz: 0,
                needed: 1,
            },
            Errno::EINVAL,
        ),
        (
            ProtocolError::FdCountExceeded { got: 2, max: 1 },
            Errno::EINVAL,
        ),
        (ProtocolError::FdsTruncated, Errno::EINVAL),
        (ProtocolError::invalid("x", "y"), Errno::EINVAL),
        (ProtocolError::MsgSizeTooSmall(0), Errno::EINVAL),
        (
            ProtocolError::PayloadTooShort {
                what: "x",
                got: 0,
                needed: 1,
            },
            Errno::EINVAL,
        ),
        (
            ProtocolError::PayloadLength {
                what: "x",
                got: 2,
                expected: 1,
            },
            Errno::EINVAL,
        ),
        (ProtocolError::UnexpectedReply("x".into()), Errno::EINVAL),
    ];
    for (e, want) in cases {
        assert_eq!(e.errno(), want, "{e:?}");
    }
}
