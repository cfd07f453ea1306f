//! Round trips, continued from `roundtrip.rs`: region access, DEVICE_FEATURE and its payloads,
//! MIG_DATA, and the header's command for every request.

mod common;

use common::{pair, recv_frame, roundtrip, send_request, set_irqs};
use vfud_protocol::codec::Limits;
use vfud_protocol::header::{Command, MessageKind};
use vfud_protocol::messages::feature::{
    DmaLoggingControl, DmaLoggingRange, DmaLoggingReport, MigDeviceState,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_GET,
    FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE, FEATURE_MIG_DEVICE_STATE, FEATURE_PROBE, FEATURE_SET,
    MIGRATION_PRE_COPY, MIGRATION_STOP_COPY,
};
use vfud_protocol::messages::{
    DeviceFeature, DeviceInfo, DmaMap, DmaUnmap, IrqAction, IrqData, IrqInfo, MigData, MigState,
    RegionAccess, RegionInfo, RegionIoFds, Request, VersionMessage, WriteMultiEntry,
};
use vfud_protocol::ProtocolError;
use zerocopy::{FromBytes, IntoBytes};

// ---------------------------------------------------------------------------------------------
// REGION_READ / REGION_WRITE / REGION_WRITE_MULTI / DEVICE_RESET

#[test]
fn region_read_request_and_reply_round_trip() {
    let a = RegionAccess {
        offset: 0x10,
        region: 0,
        count: 4,
    };

    let got = roundtrip(&Request::RegionRead(a));

    let Request::RegionRead(r) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(r, a);
    // The reply is the same struct followed by the data.
    let reply = a.encode_with_data(&[0xde, 0xad, 0xbe, 0xef]);
    let (ra, data) = RegionAccess::decode_write(&reply).expect("reply");
    assert_eq!(ra, a);
    assert_eq!(data, [0xde, 0xad, 0xbe, 0xef]);
}

#[test]
fn region_write_round_trips_with_its_data() {
    let data: Vec<u8> = (0..=255u8).collect();
    let a = RegionAccess {
        offset: 0x1000,
        region: 2,
        count: data.len() as u32,
    };

    let got = roundtrip(&Request::RegionWrite(a, data.clone()));

    let Request::RegionWrite(r, d) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(r, a);
    assert_eq!(d, data);
}

#[test]
fn posted_region_write_carries_no_reply_flag() {
    let (client, server) = pair();
    let a = RegionAccess {
        offset: 0,
        region: 0,
        count: 4,
    };

    send_request(&client, 5, &Request::RegionWrite(a, vec![1, 2, 3, 4]), true);
    let f = recv_frame(&server, &Limits::default()).expect("frame");

    assert_eq!(
        f.header.kind().expect("kind"),
        MessageKind::Command { no_reply: true }
    );
    let Ok(Request::RegionWrite(r, d)) =
        Request::decode(f.header.cmd, &f.payload, f.fds, &Limits::default())
    else {
        panic!("did not decode");
    };
    assert_eq!((r, d), (a, vec![1, 2, 3, 4]));
}

#[test]
fn region_write_multi_batch_round_trips() {
    let entries: Vec<WriteMultiEntry> = (1..=8u32)
        .map(|n| WriteMultiEntry {
            offset: u64::from(n) * 8,
            region: n % 3,
            count: n,
            data: [n as u8; 8],
        })
        .collect();

    let got = roundtrip(&Request::RegionWriteMulti(entries.clone()));

    let Request::RegionWriteMulti(v) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(v, entries);
    assert_eq!(v[2].bytes(), &[3, 3, 3]);
    assert_eq!(v[7].bytes().len(), 8);
}

#[test]
fn region_write_multi_encoding_is_count_then_24_byte_entries() {
    let e = WriteMultiEntry {
        offset: 0x20,
        region: 4,
        count: 2,
        data: [0xaa, 0xbb, 0, 0, 0, 0, 0, 0],
    };

    let bytes = WriteMultiEntry::encode_batch(&[e, e, e]);

    assert_eq!(bytes.len(), 8 + 3 * 24);
    assert_eq!(u64::from_ne_bytes(bytes[..8].try_into().expect("8")), 3);
    assert_eq!(
        WriteMultiEntry::decode_batch(&bytes).expect("decode"),
        vec![e, e, e]
    );
}

#[test]
fn device_reset_round_trips_with_an_empty_payload() {
    let (payload, fds) = Request::DeviceReset.encode();
    assert!(payload.is_empty());
    assert!(fds.is_empty());

    let got = roundtrip(&Request::DeviceReset);

    assert!(matches!(got, Request::DeviceReset));
    assert_eq!(got.command(), Command::DeviceReset);
}

// ---------------------------------------------------------------------------------------------
// DEVICE_FEATURE and its payloads

fn feature_roundtrip(f: &DeviceFeature) -> DeviceFeature {
    let got = roundtrip(&Request::DeviceFeature(f.clone()));
    let Request::DeviceFeature(d) = got else {
        panic!("decoded as {got:?}")
    };
    d
}

#[test]
fn device_feature_migration_get_and_reply_round_trip() {
    let req = DeviceFeature {
        argsz: 16,
        feature: FEATURE_MIGRATION,
        get: true,
        set: false,
        probe: false,
        data: vec![],
    };

    let got = feature_roundtrip(&req);

    assert_eq!(got, req);
    assert_eq!(got.flags(), FEATURE_GET | u32::from(FEATURE_MIGRATION));
    let reply = DeviceFeature {
        data: (MIGRATION_STOP_COPY | MIGRATION_PRE_COPY)
            .to_ne_bytes()
            .to_vec(),
        ..req
    };
    let dec = DeviceFeature::decode(&reply.encode()).expect("reply");
    let flags = u64::from_ne_bytes(dec.data[..].try_into().expect("u64"));
    assert_eq!(flags, MIGRATION_STOP_COPY | MIGRATION_PRE_COPY);
}

#[test]
fn device_feature_mig_device_state_set_round_trips() {
    let st = MigDeviceState {
        device_state: MigState::StopCopy as u32,
        data_fd: u32::MAX,
    };
    let req = DeviceFeature {
        argsz: 16,
        feature: FEATURE_MIG_DEVICE_STATE,
        get: false,
        set: true,
        probe: false,
        data: st.as_bytes().to_vec(),
    };

    let got = feature_roundtrip(&req);

    assert_eq!(got, req);
    let dec = MigDeviceState::read_from_bytes(&got.data[..]).expect("mig state");
    assert_eq!(dec, st);
    assert_eq!(
        MigState::try_from(dec.device_state).expect("state"),
        MigState::StopCopy
    );
}

#[test]
fn device_feature_probe_with_set_round_trips() {
    let req = DeviceFeature {
        argsz: 8,
        feature: FEATURE_MIG_DEVICE_STATE,
        get: false,
        set: true,
        probe: true,
        data: vec![],
    };

    let got = feature_roundtrip(&req);

    assert_eq!(got, req);
    assert_eq!(
        got.flags(),
        FEATURE_SET | FEATURE_PROBE | u32::from(FEATURE_MIG_DEVICE_STATE)
    );
}

#[test]
fn device_feature_dma_logging_start_and_stop_round_trip() {
    let ctl = DmaLoggingControl {
        page_size: 4096,
        ranges: vec![
            DmaLoggingRange {
                iova: 0,
                length: 0x8000_0000,
            },
            DmaLoggingRange {
                iova: 0x1_0000_0000,
                length: 0x4000_0000,
            },
        ],
    };
    let start = DeviceFeature {
        argsz: 8 + 16 + 32,
        feature: FEATURE_DMA_LOGGING_START,
        get: false,
        set: true,
        probe: false,
        data: ctl.encode(),
    };

    let got = feature_roundtrip(&start);

    assert_eq!(got, start);
    assert_eq!(got.data.len(), 16 + 2 * 16);
    assert_eq!(DmaLoggingControl::decode(&got.data).expect("control"), ctl);

    let everything = DmaLoggingControl {
        page_size: 1 << 21,
        ranges: vec![],
    };
    assert_eq!(
        DmaLoggingControl::decode(&everything.encode()).expect("n = 0"),
        everything
    );

    let stop = DeviceFeature {
        argsz: 8,
        feature: FEATURE_DMA_LOGGING_STOP,
        get: false,
        set: true,
        probe: false,
        data: vec![],
    };
    assert_eq!(feature_roundtrip(&stop), stop);
}

#[test]
fn device_feature_dma_logging_report_round_trips_with_inline_bitmap() {
    let rep = DmaLoggingReport {
        iova: 0x1000_0000,
        length: 1 << 20,
        page_size: 4096,
    };
    let bitmap_len = rep.bitmap_len().expect("bitmap len");
    let req = DeviceFeature {
        argsz: (8 + 24 + bitmap_len) as u32,
        feature: FEATURE_DMA_LOGGING_REPORT,
        get: true,
        set: false,
        probe: false,
        data: rep.as_bytes().to_vec(),
    };

    let got = feature_roundtrip(&req);

    assert_eq!(got, req);
    assert_eq!(
        DmaLoggingReport::read_from_bytes(&got.data[..]).expect("report"),
        rep
    );
    // The reply appends the bitmap right after the 24-byte report.
    let mut data = rep.as_bytes().to_vec();
    let bitmap: Vec<u8> = (0..bitmap_len).map(|i| i as u8).collect();
    data.extend_from_slice(&bitmap);
    let reply = DeviceFeature::decode(&DeviceFeature { data, ..req }.encode()).expect("reply");
    assert_eq!(&reply.data[24..], &bitmap[..]);
}

#[test]
fn dma_logging_report_bitmap_len_is_one_bit_per_page_in_u64_words() {
    let r = |length: u64, page_size: u64| DmaLoggingReport {
        iova: 0,
        length,
        page_size,
    };

    // 256 pages → 4 words.
    assert_eq!(r(1 << 20, 4096).bitmap_len().expect("len"), 32);
    // 65 pages → 2 words.
    assert_eq!(r(65 * 4096, 4096).bitmap_len().expect("len"), 16);
    // A partial page counts as a page.
    assert_eq!(r(1, 4096).bitmap_len().expect("len"), 8);
    assert_eq!(r(4097, 4096).bitmap_len().expect("len"), 8);
    assert_eq!(r(0, 4096).bitmap_len().expect("len"), 0);
    // 64 pages exactly fill one word.
    assert_eq!(r(64 * 4096, 4096).bitmap_len().expect("len"), 8);
    // The whole 64-bit space with 4 KiB pages does not overflow.
    assert_eq!(r(u64::MAX, 4096).bitmap_len().expect("len"), 1 << 49);
    // Page sizes must be powers of two.
    assert!(matches!(
        r(4096, 0).bitmap_len(),
        Err(ProtocolError::InvalidField { .. })
    ));
    assert!(matches!(
        r(4096, 3000).bitmap_len(),
        Err(ProtocolError::InvalidField { .. })
    ));
}

#[test]
fn device_feature_mig_data_size_get_round_trips() {
    let req = DeviceFeature {
        argsz: 16,
        feature: FEATURE_MIG_DATA_SIZE,
        get: true,
        set: false,
        probe: false,
        data: vec![],
    };

    let got = feature_roundtrip(&req);

    assert_eq!(got, req);
    let reply = DeviceFeature {
        data: 123_456u64.to_ne_bytes().to_vec(),
        ..req
    };
    let dec = DeviceFeature::decode(&reply.encode()).expect("reply");
    assert_eq!(
        u64::from_ne_bytes(dec.data[..].try_into().expect("u64")),
        123_456
    );
}

#[test]
fn mig_state_try_from_accepts_exactly_the_eight_kernel_states() {
    for (n, s) in MigState::ALL.iter().enumerate() {
        let n = n as u32;
        assert_eq!(*s as u32, n);
        assert_eq!(MigState::try_from(n).expect("known state"), *s);
    }
    for bad in [8u32, 9, 0x100, u32::MAX] {
        assert!(
            matches!(
                MigState::try_from(bad),
                Err(ProtocolError::InvalidField {
                    field: "device_state",
                    ..
                })
            ),
            "state {bad} must be rejected"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// MIG_DATA_READ / MIG_DATA_WRITE

#[test]
fn mig_data_read_request_and_reply_round_trip() {
    let req = MigData {
        argsz: 8 + 4096,
        size: 4096,
    };

    let got = roundtrip(&Request::MigDataRead(req));

    let Request::MigDataRead(m) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(m, req);
    // Reply: argsz = 8 + n, size = n, then n bytes; a short read is legal.
    let data = vec![0x5a; 100];
    let reply = MigData::encode_with_data(&data);
    let h = MigData::read_from_prefix(&reply).expect("header").0;
    assert_eq!(
        h,
        MigData {
            argsz: 108,
            size: 100
        }
    );
    assert_eq!(MigData::decode_write(&reply).expect("reply"), &data[..]);
}

#[test]
fn mig_data_read_reply_of_zero_bytes_is_end_of_stream() {
    let reply = MigData::encode_with_data(&[]);

    assert_eq!(reply.len(), 8);
    assert_eq!(
        MigData::read_from_bytes(&reply[..]).expect("hdr"),
        MigData { argsz: 8, size: 0 }
    );
    assert!(MigData::decode_write(&reply).expect("decode").is_empty());
}

#[test]
fn mig_data_write_round_trips() {
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();

    let got = roundtrip(&Request::MigDataWrite(data.clone()));

    let Request::MigDataWrite(d) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(d, data);
}

// ---------------------------------------------------------------------------------------------
// Request::command is the header's cmd

#[test]
fn request_command_matches_the_number_on_the_wire() {
    let cases: Vec<(Request, u16)> = vec![
        (Request::Version(VersionMessage::default()), 1),
        (Request::DmaMap(DmaMap::default(), None), 2),
        (Request::DmaUnmap(DmaUnmap::default()), 3),
        (Request::DeviceGetInfo(DeviceInfo::default()), 4),
        (Request::GetRegionInfo(RegionInfo::default()), 5),
        (Request::GetRegionIoFds(RegionIoFds::default()), 6),
        (Request::GetIrqInfo(IrqInfo::default()), 7),
        (set_irqs(IrqAction::Mask, 0, 1, IrqData::None), 8),
        (Request::RegionRead(RegionAccess::default()), 9),
        (Request::RegionWrite(RegionAccess::default(), vec![]), 10),
        (Request::DeviceReset, 13),
        (Request::RegionWriteMulti(vec![]), 15),
        (
            Request::DeviceFeature(DeviceFeature {
                argsz: 8,
                feature: 1,
                get: true,
                set: false,
                probe: false,
                data: vec![],
            }),
            16,
        ),
        (Request::MigDataRead(MigData::default()), 17),
        (Request::MigDataWrite(vec![]), 18),
    ];
    for (req, n) in cases {
        assert_eq!(req.command() as u16, n, "{req:?}");
    }
}
