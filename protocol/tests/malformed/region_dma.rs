//! Region and DMA messages: GET_REGION_INFO, GET_REGION_IO_FDS, REGION_READ/WRITE(_MULTI),
//! DMA_MAP and DMA_UNMAP with lying `argsz`, counts, fds, transfer sizes and flags.

use nix::errno::Errno;
use vfud_protocol::codec::Limits;
use vfud_protocol::header::Command;
use vfud_protocol::messages::dma::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
use vfud_protocol::messages::{DmaMap, DmaUnmap, RegionAccess, RegionInfo, RegionIoFds};
use vfud_protocol::ProtocolError;
use zerocopy::IntoBytes;

use super::{cat, msg, small, Row};

/// The rows of this family, for the runner in `main.rs`.
pub fn rows() -> Vec<Row> {
    let l = small();
    let region_write = |count: u32, data: &[u8]| {
        msg(
            Command::RegionWrite,
            &cat(&[
                RegionAccess {
                    offset: 0,
                    region: 0,
                    count,
                }
                .as_bytes(),
                data,
            ]),
        )
    };
    vec![
        Row {
            name: "DMA_MAP argsz 16 < 32",
            limits: l,
            bytes: msg(
                Command::DmaMap,
                DmaMap {
                    argsz: 16,
                    flags: 3,
                    offset: 0,
                    addr: 0,
                    size: 4096,
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::ArgszTooSmall {
                        argsz: 16,
                        needed: 32
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "DMA_UNMAP argsz 0 < 24",
            limits: l,
            bytes: msg(
                Command::DmaUnmap,
                DmaUnmap {
                    argsz: 0,
                    flags: 0,
                    addr: 0,
                    size: 4096,
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::ArgszTooSmall {
                        argsz: 0,
                        needed: 24
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "DMA_MAP with 2 fds",
            limits: Limits::default(),
            bytes: msg(
                Command::DmaMap,
                DmaMap {
                    argsz: 32,
                    flags: 3,
                    offset: 0,
                    addr: 0,
                    size: 4096,
                }
                .as_bytes(),
            ),
            eventfds: 2,
            expect: |e| matches!(e, ProtocolError::FdCountExceeded { got: 2, max: 1 }),
            errno: Errno::EINVAL,
        },
        Row {
            name: "DMA_UNMAP with the obsolete GET_DIRTY_BITMAP",
            limits: l,
            bytes: msg(
                Command::DmaUnmap,
                DmaUnmap {
                    argsz: 24,
                    flags: DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
                    addr: 0,
                    size: 4096,
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidField { field: "flags", .. }),
            errno: Errno::EINVAL,
        },
        Row {
            name: "GET_REGION_INFO argsz 31 < 32",
            limits: l,
            bytes: msg(
                Command::DeviceGetRegionInfo,
                RegionInfo {
                    argsz: 31,
                    ..RegionInfo::default()
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::ArgszTooSmall {
                        argsz: 31,
                        needed: 32
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "GET_REGION_IO_FDS argsz 15 < 16",
            limits: l,
            bytes: msg(
                Command::DeviceGetRegionIoFds,
                RegionIoFds {
                    argsz: 15,
                    ..RegionIoFds::default()
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::ArgszTooSmall {
                        argsz: 15,
                        needed: 16
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "REGION_READ payload of 12 bytes",
            limits: l,
            bytes: msg(Command::RegionRead, &[0; 12]),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::PayloadTooShort {
                        got: 12,
                        needed: 16,
                        ..
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "REGION_READ payload of 20 bytes",
            limits: l,
            bytes: msg(Command::RegionRead, &[0; 20]),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::PayloadLength {
                        got: 20,
                        expected: 16,
                        ..
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "REGION_READ of max_data_xfer_size + 1",
            limits: l,
            bytes: msg(
                Command::RegionRead,
                RegionAccess {
                    offset: 0,
                    region: 2,
                    count: 4097,
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::TransferTooLarge {
                        size: 4097,
                        max: 4096
                    }
                )
            },
            errno: Errno::E2BIG,
        },
        Row {
            name: "REGION_WRITE count 8 but 4 data bytes",
            limits: l,
            bytes: region_write(8, &[1, 2, 3, 4]),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidField { field: "count", .. }),
            errno: Errno::EINVAL,
        },
        Row {
            name: "REGION_WRITE count 2 but 4 data bytes",
            limits: l,
            bytes: region_write(2, &[1, 2, 3, 4]),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidField { field: "count", .. }),
            errno: Errno::EINVAL,
        },
        Row {
            name: "REGION_WRITE of max_data_xfer_size + 1",
            limits: l,
            bytes: region_write(4097, &[0; 4097]),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::TransferTooLarge {
                        size: 4097,
                        max: 4096
                    }
                )
            },
            errno: Errno::E2BIG,
        },
        Row {
            name: "REGION_WRITE_MULTI with wr_cnt 0",
            limits: l,
            bytes: msg(Command::RegionWriteMulti, &0u64.to_ne_bytes()),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::InvalidField {
                        field: "wr_cnt",
                        ..
                    }
                )
            },
            errno: Errno::EINVAL,
        },
    ]
}
