//! Field-level validation without a socket: every flag, count and length rule the decoders
//! enforce (SET_IRQS, DMA_MAP/UNMAP, WRITE_MULTI, DEVICE_FEATURE, VERSION, DMA logging) and
//! hostile GET_REGION_INFO / GET_REGION_IO_FDS replies. Each case names the variant it expects.

mod common;

use common::{decode, is_invalid};

use vfud_protocol::header::Command;
use vfud_protocol::messages::dma::{
    DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_UNMAP_FLAG_ALL, DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
};
use vfud_protocol::messages::irq::{
    IrqSetHeader, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};
use vfud_protocol::messages::{DmaAccess, DmaMap, DmaUnmap, Request, SetIrqs, WriteMultiEntry};
use vfud_protocol::ProtocolError;
use zerocopy::IntoBytes;

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
