//! Property tests: arbitrary bytes never panic any decoder (and what they accept is
//! self-consistent), and encode → decode is the identity for generated valid messages.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use proptest::prelude::*;
use vfud_protocol::codec::{send_chunks, FrameReader, Limits};
use vfud_protocol::header::{Header, HEADER_SIZE};
use vfud_protocol::messages::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_UNMAP_FLAG_ALL};
use vfud_protocol::messages::feature::{DmaLoggingControl, DmaLoggingRange};
use vfud_protocol::messages::region::{
    RegionInfo, SparseArea, REGION_FLAG_CAPS, REGION_FLAG_MMAP, REGION_FLAG_READ,
    REGION_FLAG_WRITE, WRITE_MULTI_DATA, WRITE_MULTI_MAX,
};
use vfud_protocol::messages::version::{Capabilities, MigrationCaps, TwinSocketCaps};
use vfud_protocol::messages::{
    DeviceFeature, DmaAccess, DmaMap, DmaUnmap, IrqAction, IrqData, MigData, RegionAccess,
    RegionCap, RegionInfoReply, RegionIoFds, Request, SetIrqs, VersionMessage, WriteMultiEntry,
};
use vfud_protocol::ProtocolError;
use zerocopy::{FromBytes, IntoBytes};

fn limits() -> Limits {
    Limits::with_xfer(2, 4096)
}

/// Decode what `Request::decode` accepted a second time, after re-encoding it: it must still be
/// accepted and be the same command.
fn redecode(req: &Request, l: &Limits) -> Result<Request, ProtocolError> {
    let (payload, fds) = req.encode();
    assert!(fds.is_empty(), "no fds were given");
    Request::decode(req.command() as u16, &payload, Vec::new(), l)
}

proptest! {
    // ---- decoders never panic on hostile bytes ---------------------------------------------

    #[test]
    fn request_decode_never_panics_on_any_cmd(
        cmd in any::<u16>(),
        payload in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let l = limits();
        if let Ok(req) = Request::decode(cmd, &payload, Vec::new(), &l) {
            prop_assert_eq!(req.command() as u16, cmd);
            let again = redecode(&req, &l);
            prop_assert!(again.is_ok(), "re-encoded {:?} rejected: {:?}", req, again);
        }
    }

    #[test]
    fn request_decode_never_panics_on_known_cmds_and_struct_sized_payloads(
        cmd in 0u16..20,
        len in prop::sample::select(vec![0usize, 4, 8, 12, 16, 20, 21, 24, 32, 40, 56, 80]),
        seed in prop::collection::vec(any::<u8>(), 80),
        argsz in prop::sample::select(vec![0u32, 8, 16, 20, 24, 32, 4096, u32::MAX]),
    ) {
        let mut payload = seed[..len].to_vec();
        if len >= 4 {
            // Most structs start with argsz: give it plausible values often.
            payload[..4].copy_from_slice(&argsz.to_ne_bytes());
        }
        let l = limits();
        if let Ok(req) = Request::decode(cmd, &payload, Vec::new(), &l) {
            prop_assert_eq!(req.command() as u16, cmd);
            prop_assert!(redecode(&req, &l).is_ok());
        }
    }

    #[test]
    fn version_decode_never_panics_on_bytes(payload in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(v) = VersionMessage::decode(&payload) {
            prop_assert_eq!(VersionMessage::decode(&v.encode()).ok(), Some(v));
        }
    }

    #[test]
    fn version_decode_never_panics_on_json_like_text(
        major in any::<u16>(),
        text in "[{}\\[\\]\":,0-9a-z_ .-]{0,120}",
    ) {
        let mut p = major.to_ne_bytes().to_vec();
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(b"{\"capabilities\":");
        p.extend_from_slice(text.as_bytes());
        p.push(0);
        if let Ok(v) = VersionMessage::decode(&p) {
            prop_assert_eq!(v.major, major);
            prop_assert_eq!(VersionMessage::decode(&v.encode()).ok(), Some(v));
        }
    }

    #[test]
    fn region_info_reply_decode_never_panics_on_bytes(
        payload in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        if let Ok(r) = RegionInfoReply::decode(&payload) {
            prop_assert!(r.caps.len() <= 16);
        }
    }

    #[test]
    fn region_info_reply_decode_never_panics_on_cap_chains(
        cap_offset in 0u32..160,
        chain in prop::collection::vec(any::<u8>(), 0..128),
        next_hint in prop::collection::vec(0u32..200, 0..8),
    ) {
        let mut p = RegionInfo {
            argsz: 0,
            flags: REGION_FLAG_CAPS,
            index: 0,
            cap_offset,
            size: 4096,
            offset: 0,
        }
        .as_bytes()
        .to_vec();
        p.extend_from_slice(&chain);
        // Plant plausible `next` values at 8-byte strides so chains get walked.
        for (i, n) in next_hint.iter().enumerate() {
            let at = 32 + 8 * i + 4;
            if at + 4 <= p.len() {
                p[at..at + 4].copy_from_slice(&n.to_ne_bytes());
            }
        }
        let len = p.len() as u32;
        p[..4].copy_from_slice(&len.to_ne_bytes());
        if let Ok(r) = RegionInfoReply::decode(&p) {
            prop_assert!(r.caps.len() <= 16);
            prop_assert_eq!(r.info.argsz, len);
        }
    }

    #[test]
    fn region_io_fds_decode_reply_never_panics(
        payload in prop::collection::vec(any::<u8>(), 0..256),
        count in prop::option::of(0u32..8),
    ) {
        let mut payload = payload;
        if let (Some(c), true) = (count, payload.len() >= 16) {
            payload[12..16].copy_from_slice(&c.to_ne_bytes());
        }
        if let Ok((h, subs)) = RegionIoFds::decode_reply(&payload) {
            prop_assert_eq!(subs.len(), h.count as usize);
            prop_assert!(16 + 40 * subs.len() <= payload.len());
        }
    }

    #[test]
    fn other_decoders_never_panic_and_keep_their_invariants(
        payload in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        if let Ok((a, data)) = DmaAccess::decode_with_data(&payload) {
            prop_assert_eq!(a.count, data.len() as u64);
        }
        if let Ok((a, data)) = RegionAccess::decode_write(&payload) {
            prop_assert_eq!(a.count as usize, data.len());
        }
        if let Ok(data) = MigData::decode_write(&payload) {
            prop_assert_eq!(data.len() + 8, payload.len());
        }
        if let Ok(v) = WriteMultiEntry::decode_batch(&payload) {
            prop_assert!(!v.is_empty() && v.len() as u64 <= WRITE_MULTI_MAX);
            prop_assert!(v.iter().all(|e| (1..=8).contains(&e.count)));
        }
        if let Ok(f) = DeviceFeature::decode(&payload) {
            prop_assert!(!(f.get && f.set));
            prop_assert!(f.get || f.set || f.probe);
        }
        if let Ok(c) = DmaLoggingControl::decode(&payload) {
            prop_assert!(c.page_size.is_power_of_two());
        }
        if let Ok(s) = SetIrqs::decode(&payload, Vec::new()) {
            prop_assert!(s.start.checked_add(s.count).is_some());
        }
        if let Ok((h, _)) = Header::read_from_prefix(&payload) {
            let _ = h.kind();
            let _ = h.command_kind();
            if let Ok(n) = h.payload_len() {
                prop_assert_eq!(n + HEADER_SIZE, h.msg_size as usize);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn frame_reader_never_panics_on_an_arbitrary_stream(
        stream in prop::collection::vec(any::<u8>(), 0..2048),
        plant_sizes in prop::collection::vec(16u32..200, 0..4),
    ) {
        // Planting small msg_size values at the first header makes whole frames likely.
        let mut stream = stream;
        if let (Some(s), true) = (plant_sizes.first(), stream.len() >= 8) {
            stream[4..8].copy_from_slice(&s.to_ne_bytes());
        }
        let (tx, rx) = UnixStream::pair().expect("socketpair");
        send_chunks(tx.as_fd(), &[&stream], &[]).expect("send");
        drop(tx);
        let l = limits();
        let mut reader = FrameReader::new();
        let mut consumed = 0usize;
        let end = loop {
            match reader.read_frame(rx.as_fd(), &l) {
                Ok(Some(f)) => {
                    prop_assert_eq!(f.payload.len() + HEADER_SIZE, f.header.msg_size as usize);
                    consumed += f.header.msg_size as usize;
                    prop_assert!(consumed <= stream.len());
                    let _ = Request::decode(f.header.cmd, &f.payload, f.fds, &l);
                }
                Ok(None) => panic!("a blocking socket with a closed peer never returns None"),
                Err(e) => break e,
            }
        };
        // The stream always ends in an error: EOF or a bad header.
        prop_assert!(matches!(
            end,
            ProtocolError::Disconnected
                | ProtocolError::MsgSizeTooSmall(_)
                | ProtocolError::MsgTooLarge { .. }
        ), "{:?}", end);
    }
}

// ---- encode → decode identity for valid messages -----------------------------------------------

fn dma_map() -> impl Strategy<Value = DmaMap> {
    (0u32..4, 0u64..1 << 62, 0u64..1 << 62, 1u64..1 << 62).prop_map(
        |(flags, offset, addr, size)| DmaMap {
            argsz: 32,
            flags: flags & (DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE),
            offset,
            addr,
            size,
        },
    )
}

fn write_multi_entry() -> impl Strategy<Value = WriteMultiEntry> {
    (
        any::<u64>(),
        any::<u32>(),
        1u32..=8,
        any::<[u8; WRITE_MULTI_DATA]>(),
    )
        .prop_map(|(offset, region, count, data)| WriteMultiEntry {
            offset,
            region,
            count,
            data,
        })
}

fn action() -> impl Strategy<Value = IrqAction> {
    prop_oneof![
        Just(IrqAction::Mask),
        Just(IrqAction::Unmask),
        Just(IrqAction::Trigger)
    ]
}

fn unknown_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        "[a-z ]{0,12}".prop_map(serde_json::Value::from),
    ]
}

fn capabilities() -> impl Strategy<Value = Capabilities> {
    (
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u64>()),
        prop::option::of(any::<u64>()),
        prop::option::of(any::<u32>()),
        prop::option::of((any::<u64>(), prop::option::of(any::<u64>()))),
        prop::option::of(any::<bool>()),
        prop::option::of((
            prop::option::of(any::<bool>()),
            prop::option::of(any::<u32>()),
        )),
        prop::collection::btree_map("x_[a-z_]{1,10}", unknown_value(), 0..3),
    )
        .prop_map(
            |(fds, xfer, pgsizes, maps, mig, wm, twin, unknown)| Capabilities {
                max_msg_fds: fds,
                max_data_xfer_size: xfer,
                pgsizes,
                max_dma_maps: maps,
                migration: mig.map(|(pgsize, max_bitmap_size)| MigrationCaps {
                    pgsize,
                    max_bitmap_size,
                }),
                write_multiple: wm,
                twin_socket: twin.map(|(supported, fd_index)| TwinSocketCaps {
                    supported,
                    fd_index,
                }),
                unknown: unknown.into_iter().collect::<BTreeMap<_, _>>(),
            },
        )
}

fn region_cap() -> impl Strategy<Value = RegionCap> {
    prop_oneof![
        prop::collection::vec((any::<u64>(), any::<u64>()), 0..6).prop_map(|v| {
            RegionCap::SparseMmap(
                v.into_iter()
                    .map(|(offset, size)| SparseArea { offset, size })
                    .collect(),
            )
        }),
        (any::<u32>(), any::<u32>()).prop_map(|(region_type, subtype)| RegionCap::Type {
            region_type,
            subtype
        }),
        // Other caps: ids past the known ones, bodies in whole 8-byte units (see roundtrip.rs
        // for the padding of odd sizes).
        (
            3u16..,
            any::<u16>(),
            prop::collection::vec(any::<u64>(), 0..4)
        )
            .prop_map(|(id, version, words)| RegionCap::Other {
                id,
                version,
                data: words.iter().flat_map(|w| w.to_ne_bytes()).collect(),
            }),
    ]
}

proptest! {
    #[test]
    fn dma_map_round_trips(m in dma_map()) {
        let got = Request::decode(2, &Request::DmaMap(m, None).encode().0, Vec::new(), &limits());
        prop_assert!(matches!(got, Ok(Request::DmaMap(d, None)) if d == m));
    }

    #[test]
    fn dma_unmap_round_trips(addr in any::<u64>(), size in 1u64.., all in any::<bool>()) {
        let u = if all {
            DmaUnmap { argsz: 24, flags: DMA_UNMAP_FLAG_ALL, addr: 0, size: 0 }
        } else {
            DmaUnmap { argsz: 24, flags: 0, addr, size }
        };
        let got = Request::decode(3, &Request::DmaUnmap(u).encode().0, Vec::new(), &limits());
        prop_assert!(matches!(got, Ok(Request::DmaUnmap(d)) if d == u));
    }

    #[test]
    fn region_access_with_data_round_trips(
        offset in any::<u64>(),
        region in any::<u32>(),
        data in prop::collection::vec(any::<u8>(), 0..=4096),
    ) {
        let a = RegionAccess { offset, region, count: data.len() as u32 };
        let l = limits();

        let w = Request::decode(10, &Request::RegionWrite(a, data.clone()).encode().0, Vec::new(), &l);
        let r = Request::decode(9, &Request::RegionRead(a).encode().0, Vec::new(), &l);
        let reply_bytes = a.encode_with_data(&data);
        let reply = RegionAccess::decode_write(&reply_bytes);

        prop_assert!(matches!(w, Ok(Request::RegionWrite(ref ga, ref gd)) if *ga == a && *gd == data));
        prop_assert!(matches!(r, Ok(Request::RegionRead(ga)) if ga == a));
        prop_assert!(matches!(reply, Ok((ga, gd)) if ga == a && gd == &data[..]));
    }

    #[test]
    fn dma_access_with_data_round_trips(
        addr in any::<u64>(),
        data in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let a = DmaAccess { addr, count: data.len() as u64 };
        let bytes = a.encode_with_data(&data);
        let got = DmaAccess::decode_with_data(&bytes);
        prop_assert!(matches!(got, Ok((ga, gd)) if ga == a && gd == &data[..]));
    }

    #[test]
    fn write_multi_batches_round_trip(
        entries in prop::collection::vec(write_multi_entry(), 1..=WRITE_MULTI_MAX as usize),
    ) {
        let got = Request::decode(
            15,
            &Request::RegionWriteMulti(entries.clone()).encode().0,
            Vec::new(),
            &limits(),
        );
        prop_assert!(matches!(got, Ok(Request::RegionWriteMulti(ref v)) if *v == entries));
    }

    #[test]
    fn set_irqs_bool_round_trips(
        index in any::<u32>(),
        start in 0u32..1024,
        action in action(),
        bools in prop::collection::vec(any::<bool>(), 1..64),
    ) {
        let req = Request::SetIrqs(SetIrqs {
            index,
            start,
            count: bools.len() as u32,
            action,
            data: IrqData::Bool(bools.clone()),
        });
        let got = Request::decode(8, &req.encode().0, Vec::new(), &limits());
        let Ok(Request::SetIrqs(s)) = got else {
            return Err(TestCaseError::fail(format!("{got:?}")));
        };
        prop_assert_eq!((s.index, s.start, s.count, s.action), (index, start, bools.len() as u32, action));
        prop_assert!(matches!(s.data, IrqData::Bool(ref v) if *v == bools));
    }

    #[test]
    fn set_irqs_none_round_trips(
        index in any::<u32>(),
        start in 0u32..1024,
        count in 1u32..1024,
        action in action(),
    ) {
        let req = Request::SetIrqs(SetIrqs { index, start, count, action, data: IrqData::None });
        let got = Request::decode(8, &req.encode().0, Vec::new(), &limits());
        let Ok(Request::SetIrqs(s)) = got else {
            return Err(TestCaseError::fail(format!("{got:?}")));
        };
        prop_assert_eq!((s.index, s.start, s.count, s.action), (index, start, count, action));
        prop_assert!(matches!(s.data, IrqData::None));
    }

    #[test]
    fn device_feature_round_trips(
        argsz in any::<u32>(),
        feature in any::<u16>(),
        op in 0u8..5,
        data in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let (get, set, probe) = [
            (true, false, false),
            (false, true, false),
            (false, false, true),
            (true, false, true),
            (false, true, true),
        ][op as usize];
        let f = DeviceFeature { argsz, feature, get, set, probe, data };
        let got = Request::decode(16, &Request::DeviceFeature(f.clone()).encode().0, Vec::new(), &limits());
        prop_assert!(matches!(got, Ok(Request::DeviceFeature(ref g)) if *g == f));
    }

    #[test]
    fn version_capabilities_round_trip(
        major in any::<u16>(),
        minor in any::<u16>(),
        caps in prop::option::of(capabilities()),
    ) {
        let v = VersionMessage { major, minor, caps };
        let got = Request::decode(1, &Request::Version(v.clone()).encode().0, Vec::new(), &limits());
        prop_assert!(matches!(got, Ok(Request::Version(ref g)) if *g == v), "{:?}", got);
    }

    #[test]
    fn mig_data_round_trips(data in prop::collection::vec(any::<u8>(), 0..=4096), size in 0u32..=4096) {
        let l = limits();
        let w = Request::decode(18, &Request::MigDataWrite(data.clone()).encode().0, Vec::new(), &l);
        let r = Request::decode(17, MigData { argsz: 8 + size, size }.as_bytes(), Vec::new(), &l);
        prop_assert!(matches!(w, Ok(Request::MigDataWrite(ref d)) if *d == data));
        prop_assert!(matches!(r, Ok(Request::MigDataRead(m)) if m.size == size));
    }

    #[test]
    fn dma_logging_control_round_trips(
        shift in 0u32..64,
        ranges in prop::collection::vec((0u64..1 << 62, 1u64..1 << 62), 0..8),
    ) {
        let c = DmaLoggingControl {
            page_size: 1 << shift,
            ranges: ranges.into_iter().map(|(iova, length)| DmaLoggingRange { iova, length }).collect(),
        };
        prop_assert_eq!(DmaLoggingControl::decode(&c.encode()).ok(), Some(c));
    }

    #[test]
    fn region_info_reply_round_trips_or_truncates(
        flags in prop::sample::select(vec![
            0,
            REGION_FLAG_READ,
            REGION_FLAG_READ | REGION_FLAG_WRITE,
            REGION_FLAG_READ | REGION_FLAG_WRITE | REGION_FLAG_MMAP,
        ]),
        index in 0u32..16,
        size in any::<u64>(),
        offset in any::<u64>(),
        caps in prop::collection::vec(region_cap(), 0..5),
        room in 32u32..512,
    ) {
        let reply = RegionInfoReply {
            info: RegionInfo { argsz: 0, flags, index, cap_offset: 0, size, offset },
            caps,
        };
        let full = reply.encode(u32::MAX);
        let got = RegionInfoReply::decode(&reply.encode(room)).expect("own encoding decodes");

        prop_assert_eq!(got.info.argsz as usize, full.len());
        prop_assert_eq!((got.info.index, got.info.size, got.info.offset), (index, size, offset));
        if room as usize >= full.len() {
            prop_assert_eq!(&got.caps, &reply.caps);
        } else {
            prop_assert!(got.caps.is_empty());
        }
        prop_assert_eq!(got.info.flags & REGION_FLAG_CAPS != 0, !reply.caps.is_empty());
        // QEMU's acceptance rule for any reply, truncated or not: with FLAG_CAPS,
        // 32 <= cap_offset <= argsz.
        if got.info.flags & REGION_FLAG_CAPS != 0 {
            prop_assert!(got.info.cap_offset >= 32 && got.info.cap_offset <= got.info.argsz);
        }
    }
}
