//! Round trips for every vfio-user message: encode (`Request::encode` or the struct helpers),
//! send over a real socketpair where fds are involved, decode, and compare every field.

mod common;

use std::os::fd::AsFd;

use common::{
    decode_direct, memfd_with, pair, pread_vec, recv_frame, roundtrip, same_file, send_request,
};
use vfud_protocol::codec::{send_message, send_reply, Limits};
use vfud_protocol::header::{Command, Header, MessageKind};
use vfud_protocol::messages::device::{DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET};
use vfud_protocol::messages::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_UNMAP_FLAG_ALL};
use vfud_protocol::messages::irq::{
    IRQ_INDEX_MSIX, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE,
};
use vfud_protocol::messages::region::{
    IoFdSubRegion, SparseArea, PCI_CONFIG_REGION_INDEX, REGION_CAP_SPARSE_MMAP, REGION_CAP_TYPE,
    REGION_FLAG_CAPS, REGION_FLAG_MMAP, REGION_FLAG_READ, REGION_FLAG_WRITE,
};
use vfud_protocol::messages::version::{accept_reply, negotiate, Capabilities, ServerOffer};
use vfud_protocol::messages::{
    DeviceInfo, DmaAccess, DmaMap, DmaUnmap, IrqInfo, RegionCap, RegionInfo, RegionInfoReply,
    RegionIoFds, Request, VersionMessage,
};
use vfud_protocol::ProtocolError;
use zerocopy::{FromBytes, IntoBytes};

// ---------------------------------------------------------------------------------------------
// VERSION

#[test]
fn version_with_qemu_capabilities_round_trips() {
    let sent = VersionMessage::qemu_proposal();

    let got = roundtrip(&Request::Version(sent.clone()));

    let Request::Version(v) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(v, sent);
    let caps = v.caps.expect("caps present");
    assert_eq!(caps.max_msg_fds, Some(16));
    assert_eq!(caps.max_data_xfer_size, Some(1 << 20));
    assert_eq!(caps.write_multiple, Some(true));
    assert_eq!(caps.migration.expect("migration").pgsize, 4096);
}

#[test]
fn version_without_capabilities_round_trips_as_bare_version() {
    let sent = VersionMessage {
        major: 0,
        minor: 3,
        caps: None,
    };

    let (payload, _) = Request::Version(sent.clone()).encode();
    let got = VersionMessage::decode(&payload).expect("decode");

    assert_eq!(
        payload.len(),
        4,
        "no JSON, not even a NUL, when caps are absent"
    );
    assert_eq!(got, sent);
}

#[test]
fn version_reply_from_negotiation_round_trips_and_is_accepted() {
    let proposal = VersionMessage::qemu_proposal();
    let request_len = proposal.encode().len();

    let (reply, negotiated) =
        negotiate(&proposal, &ServerOffer::default(), request_len).expect("negotiate");
    let decoded = VersionMessage::decode(&reply.encode()).expect("decode reply");

    assert_eq!(decoded, reply);
    assert_eq!(
        accept_reply(&proposal, &decoded).expect("accept"),
        negotiated
    );
    assert_eq!(
        *decoded.encode().last().expect("non-empty"),
        0,
        "JSON is NUL-terminated"
    );
}

#[test]
fn version_empty_capabilities_object_round_trips() {
    let sent = VersionMessage {
        major: 0,
        minor: 0,
        caps: Some(Capabilities::default()),
    };

    let bytes = sent.encode();

    assert_eq!(&bytes[4..], b"{\"capabilities\":{}}\0");
    assert_eq!(VersionMessage::decode(&bytes).expect("decode"), sent);
}

// ---------------------------------------------------------------------------------------------
// DMA_MAP / DMA_UNMAP / DMA_READ / DMA_WRITE

#[test]
fn dma_map_with_memfd_round_trips_and_fd_maps_the_same_memory() {
    let guest = b"guest RAM page contents";
    let fd = memfd_with(guest, 8192);
    let keep = fd.try_clone().expect("dup");
    let map = DmaMap {
        argsz: 32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset: 8192,
        addr: 0x1_0000_0000,
        size: 1 << 20,
    };

    let got = roundtrip(&Request::DmaMap(map, Some(fd)));

    let Request::DmaMap(m, Some(rfd)) = got else {
        panic!("expected DMA_MAP with an fd, got {got:?}")
    };
    assert_eq!(m, map);
    assert!(
        same_file(rfd.as_fd(), keep.as_fd()),
        "received fd is the memfd"
    );
    assert_eq!(pread_vec(rfd.as_fd(), 8192, guest.len()), guest);
}

#[test]
fn dma_map_without_fd_round_trips() {
    let map = DmaMap {
        argsz: 32,
        flags: DMA_MAP_FLAG_READ,
        offset: 0,
        addr: 0xfee0_0000,
        size: 4096,
    };

    let got = roundtrip(&Request::DmaMap(map, None));

    let Request::DmaMap(m, fd) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(m, map);
    assert!(fd.is_none());
}

#[test]
fn dma_unmap_of_one_range_round_trips() {
    let u = DmaUnmap {
        argsz: 24,
        flags: 0,
        addr: 0x8000_0000,
        size: 0x4000_0000,
    };

    let got = decode_direct(&Request::DmaUnmap(u)).expect("decode");

    let Request::DmaUnmap(d) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(d, u);
    assert!(!d.is_all());
}

#[test]
fn dma_unmap_all_round_trips() {
    let u = DmaUnmap {
        argsz: 24,
        flags: DMA_UNMAP_FLAG_ALL,
        addr: 0,
        size: 0,
    };

    let got = roundtrip(&Request::DmaUnmap(u));

    let Request::DmaUnmap(d) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(d, u);
    assert!(d.is_all());
}

#[test]
fn dma_read_and_write_access_structs_round_trip() {
    // Server → client DMA_READ request: no data.
    let read = DmaAccess {
        addr: 0x1000,
        count: 64,
    };
    let read_bytes = read.as_bytes().to_vec();
    assert_eq!(
        DmaAccess::decode_read(&read_bytes).expect("decode read"),
        read
    );

    // DMA_WRITE request and DMA_READ reply: struct then `count` bytes.
    let data: Vec<u8> = (0..64u8).collect();
    let bytes = read.encode_with_data(&data);
    assert_eq!(bytes.len(), 16 + 64);
    let (a, d) = DmaAccess::decode_with_data(&bytes).expect("decode with data");
    assert_eq!(a, read);
    assert_eq!(d, &data[..]);

    // Empty transfer.
    let empty = DmaAccess { addr: 0, count: 0 };
    let empty_bytes = empty.encode_with_data(&[]);
    let (a, d) = DmaAccess::decode_with_data(&empty_bytes).expect("empty");
    assert_eq!(a, empty);
    assert!(d.is_empty());
}

#[test]
fn dma_write_travels_server_to_client_over_a_socket() {
    let (server, client) = pair();
    let data = b"written by the device".to_vec();
    let a = DmaAccess {
        addr: 0x2000,
        count: data.len() as u64,
    };
    let payload = a.encode_with_data(&data);
    let h = Header::command(9, Command::DmaWrite, payload.len(), false);

    send_message(server.as_fd(), &h, &[&payload], &[]).expect("send");
    let f = recv_frame(&client, &Limits::default()).expect("frame");

    assert_eq!(f.header.command_kind().expect("cmd"), Command::DmaWrite);
    let (got, got_data) = DmaAccess::decode_with_data(&f.payload).expect("decode");
    assert_eq!(got, a);
    assert_eq!(got_data, &data[..]);
    // A client must never send these: they decode as invalid requests.
    assert!(matches!(
        Request::decode(f.header.cmd, &f.payload, Vec::new(), &Limits::default()),
        Err(ProtocolError::InvalidField { field: "cmd", .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// DEVICE_GET_INFO, GET_REGION_INFO, GET_REGION_IO_FDS, GET_IRQ_INFO

#[test]
fn device_get_info_request_and_reply_round_trip() {
    let req = DeviceInfo {
        argsz: 16,
        ..DeviceInfo::default()
    };

    let got = roundtrip(&Request::DeviceGetInfo(req));

    let Request::DeviceGetInfo(i) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(i, req);

    let reply = DeviceInfo {
        argsz: 16,
        flags: DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI,
        num_regions: 9,
        num_irqs: 5,
    };
    assert_eq!(
        DeviceInfo::read_from_bytes(reply.as_bytes()).expect("reply"),
        reply
    );
}

#[test]
fn get_region_info_request_round_trips() {
    let req = RegionInfo {
        argsz: 32,
        index: PCI_CONFIG_REGION_INDEX,
        ..RegionInfo::default()
    };

    let got = roundtrip(&Request::GetRegionInfo(req));

    let Request::GetRegionInfo(i) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(i, req);
}

fn bar2_reply() -> RegionInfoReply {
    RegionInfoReply {
        info: RegionInfo {
            argsz: 0,
            flags: REGION_FLAG_READ | REGION_FLAG_WRITE | REGION_FLAG_MMAP,
            index: 2,
            cap_offset: 0,
            size: 1 << 20,
            offset: 0x10_0000,
        },
        caps: vec![
            RegionCap::SparseMmap(vec![
                SparseArea {
                    offset: 0,
                    size: 0x1000,
                },
                SparseArea {
                    offset: 0x8000,
                    size: 0x7_8000,
                },
            ]),
            RegionCap::Type {
                region_type: 0x8000_1af4,
                subtype: 7,
            },
            RegionCap::Other {
                id: 0x42,
                version: 3,
                data: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
            },
        ],
    }
}

#[test]
fn region_info_reply_with_sparse_mmap_type_and_other_caps_round_trips() {
    let reply = bar2_reply();

    let bytes = reply.encode(4096);
    let got = RegionInfoReply::decode(&bytes).expect("decode");

    // header (32) + sparse (8 + 8 + 2*16) + type (8 + 8) + other (8 + 16)
    let full = 32 + 48 + 16 + 24;
    assert_eq!(bytes.len(), full);
    assert_eq!(got.info.argsz as usize, full);
    assert_eq!(got.info.flags, reply.info.flags | REGION_FLAG_CAPS);
    assert_eq!(got.info.cap_offset, 32);
    assert_eq!(got.info.index, 2);
    assert_eq!(got.info.size, 1 << 20);
    assert_eq!(got.info.offset, 0x10_0000);
    assert_eq!(got.caps, reply.caps);
}

#[test]
fn region_info_reply_caps_chain_uses_kernel_ids_and_forward_next_offsets() {
    let bytes = bar2_reply().encode(4096);

    // First cap header at cap_offset 32: id, version, next.
    let id = u16::from_ne_bytes([bytes[32], bytes[33]]);
    let version = u16::from_ne_bytes([bytes[34], bytes[35]]);
    let next = u32::from_ne_bytes(bytes[36..40].try_into().expect("4 bytes"));
    assert_eq!((id, version), (REGION_CAP_SPARSE_MMAP, 1));
    assert_eq!(next, 32 + 48);
    let id2 = u16::from_ne_bytes([bytes[80], bytes[81]]);
    assert_eq!(id2, REGION_CAP_TYPE);
    let next2 = u32::from_ne_bytes(bytes[84..88].try_into().expect("4 bytes"));
    assert_eq!(next2, 32 + 48 + 16);
    let last_next = u32::from_ne_bytes(bytes[100..104].try_into().expect("4 bytes"));
    assert_eq!(last_next, 0, "last capability ends the chain");
}

#[test]
fn region_info_reply_without_caps_clears_caps_flag_and_offset() {
    let reply = RegionInfoReply {
        info: RegionInfo {
            argsz: 0,
            flags: REGION_FLAG_READ | REGION_FLAG_CAPS,
            index: 7,
            cap_offset: 99,
            size: 4096,
            offset: 0,
        },
        caps: vec![],
    };

    let bytes = reply.encode(32);
    let got = RegionInfoReply::decode(&bytes).expect("decode");

    assert_eq!(bytes.len(), 32);
    assert_eq!(got.info.argsz, 32);
    assert_eq!(got.info.flags, REGION_FLAG_READ);
    assert_eq!(got.info.cap_offset, 0);
    assert!(got.caps.is_empty());
}

#[test]
fn region_info_reply_is_truncated_when_client_argsz_is_too_small() {
    let reply = bar2_reply();
    let full = reply.encode(4096).len();

    let bytes = reply.encode(32);
    let got = RegionInfoReply::decode(&bytes).expect("decode truncated");

    assert_eq!(bytes.len(), 32, "only the fixed struct is sent");
    assert_eq!(
        got.info.argsz as usize, full,
        "argsz states the full size needed"
    );
    assert!(
        got.caps.is_empty(),
        "caps are left out of a truncated reply"
    );
    // QEMU 11.1 (`hw/vfio-user/device.c`) rejects FLAG_CAPS unless 32 <= cap_offset <=
    // argsz, even in a truncated reply, so FLAG_CAPS stays set and cap_offset stays 32.
    assert_ne!(got.info.flags & REGION_FLAG_CAPS, 0);
    assert_eq!(got.info.cap_offset, 32);
    assert!(got.info.cap_offset <= got.info.argsz);
    // One byte short of the full size is still too small.
    let short = reply.encode(full as u32 - 1);
    assert_eq!(short.len(), 32);
    // Exactly the full size is enough.
    assert_eq!(reply.encode(full as u32).len(), full);
}

#[test]
fn region_info_reply_other_cap_body_comes_back_padded_to_8_bytes() {
    // Capabilities carry no length: a body runs to the next header (or the end), and the
    // encoder keeps each capability 8-byte aligned, so an odd-sized body gains zero padding.
    let reply = RegionInfoReply {
        info: RegionInfo::default(),
        caps: vec![RegionCap::Other {
            id: 9,
            version: 1,
            data: vec![0xa, 0xb, 0xc],
        }],
    };

    let got = RegionInfoReply::decode(&reply.encode(4096)).expect("decode");

    assert_eq!(
        got.caps,
        vec![RegionCap::Other {
            id: 9,
            version: 1,
            data: vec![0xa, 0xb, 0xc, 0, 0, 0, 0, 0],
        }]
    );
}

#[test]
fn region_info_reply_with_mmap_fd_travels_over_a_socket() {
    let (client, server) = pair();
    let req = RegionInfo {
        argsz: 4096,
        index: 2,
        ..RegionInfo::default()
    };
    let sent = send_request(&client, 77, &Request::GetRegionInfo(req), false);
    let f = recv_frame(&server, &Limits::default()).expect("request frame");
    let Ok(Request::GetRegionInfo(r)) =
        Request::decode(f.header.cmd, &f.payload, f.fds, &Limits::default())
    else {
        panic!("request did not decode");
    };
    let bar = memfd_with(b"BAR2", 0x10_0000);

    send_reply(
        server.as_fd(),
        &f.header,
        &bar2_reply().encode(r.argsz),
        &[bar.as_fd()],
    )
    .expect("reply");
    let mut rf = recv_frame(&client, &Limits::default()).expect("reply frame");

    assert_eq!(rf.header.msg_id, sent.msg_id);
    assert_eq!(rf.header.kind().expect("kind"), MessageKind::Reply);
    assert_eq!(rf.fds.len(), 1);
    let got = RegionInfoReply::decode(&rf.payload).expect("decode");
    assert_eq!(got.caps, bar2_reply().caps);
    let fd = rf.fds.pop().expect("fd");
    assert_eq!(pread_vec(fd.as_fd(), got.info.offset as i64, 4), b"BAR2");
}

#[test]
fn get_region_io_fds_request_round_trips() {
    let req = RegionIoFds {
        argsz: 4096,
        flags: 0,
        index: 0,
        count: 0,
    };

    let got = roundtrip(&Request::GetRegionIoFds(req));

    let Request::GetRegionIoFds(r) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(r, req);
}

#[test]
fn get_region_io_fds_reply_round_trips() {
    let subs = [
        IoFdSubRegion {
            offset: 0x40,
            size: 4,
            fd_index: 0,
            kind: 0,
            flags: 1,
            padding: 0,
            datamatch: 0xdead_beef,
        },
        IoFdSubRegion {
            offset: 0x80,
            size: 8,
            fd_index: 1,
            kind: 1,
            flags: 0,
            padding: 0,
            datamatch: 0,
        },
    ];

    let bytes = RegionIoFds::encode_reply(3, &subs);
    let (h, got) = RegionIoFds::decode_reply(&bytes).expect("decode");

    assert_eq!(bytes.len(), 16 + 2 * 40);
    assert_eq!(h.argsz as usize, bytes.len());
    assert_eq!(h.index, 3);
    assert_eq!(h.count, 2);
    assert_eq!(got, subs);
}

#[test]
fn get_irq_info_request_and_reply_round_trip() {
    let req = IrqInfo {
        argsz: 16,
        index: IRQ_INDEX_MSIX,
        ..IrqInfo::default()
    };

    let got = roundtrip(&Request::GetIrqInfo(req));

    let Request::GetIrqInfo(i) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(i, req);
    let reply = IrqInfo {
        argsz: 16,
        flags: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
        index: IRQ_INDEX_MSIX,
        count: 4,
    };
    assert_eq!(
        IrqInfo::read_from_bytes(reply.as_bytes()).expect("reply"),
        reply
    );
}
