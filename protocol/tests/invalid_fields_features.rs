//! Invalid fields, continued from `invalid_fields.rs`: DEVICE_FEATURE, DMA logging, MIG_DATA,
//! VERSION, hostile region-info replies, and the error → errno mapping.

mod common;

use common::decode;

use vfud_protocol::header::Command;
use vfud_protocol::messages::feature::{
    DmaLoggingControl, DmaLoggingControlHeader, DmaLoggingRange, FEATURE_GET, FEATURE_PROBE,
    FEATURE_SET,
};
use vfud_protocol::messages::region::{CapHeader, RegionInfo, REGION_FLAG_CAPS};
use vfud_protocol::messages::{
    DeviceFeature, MigData, RegionInfoReply, RegionIoFds, VersionMessage,
};
use vfud_protocol::ProtocolError;
use zerocopy::IntoBytes;

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
