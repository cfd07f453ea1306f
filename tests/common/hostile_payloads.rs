//! Payload builders for the hostile-client suite (`tests/hostile.rs`): each command's fixed
//! part with whatever lie a case needs, and the fds of the wrong kind it sends.

use std::os::fd::OwnedFd;

use nix::errno::Errno;

use super::hostile::{owned, Outcome};

pub fn e(n: Errno) -> Outcome {
    Outcome::Errno(n)
}

pub fn le(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

pub fn u32b(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

pub fn u64b(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

pub fn get_info(argsz: u32) -> Vec<u8> {
    le(&[&u32b(argsz), &[0; 12]])
}

pub fn region_info(argsz: u32, index: u32) -> Vec<u8> {
    le(&[
        &u32b(argsz),
        &u32b(0),
        &u32b(index),
        &u32b(0),
        &u64b(0),
        &u64b(0),
    ])
}

pub fn irq_info(argsz: u32, index: u32) -> Vec<u8> {
    le(&[&u32b(argsz), &u32b(0), &u32b(index), &u32b(0)])
}

pub fn access(offset: u64, region: u32, count: u32) -> Vec<u8> {
    le(&[&u64b(offset), &u32b(region), &u32b(count)])
}

pub fn dma_map(argsz: u32, flags: u32, offset: u64, addr: u64, size: u64) -> Vec<u8> {
    le(&[
        &u32b(argsz),
        &u32b(flags),
        &u64b(offset),
        &u64b(addr),
        &u64b(size),
    ])
}

pub fn map(addr: u64, size: u64) -> Vec<u8> {
    dma_map(32, 3, 0, addr, size)
}

pub fn unmap(argsz: u32, flags: u32, addr: u64, size: u64) -> Vec<u8> {
    le(&[&u32b(argsz), &u32b(flags), &u64b(addr), &u64b(size)])
}

pub fn set_irqs(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    le(&[
        &u32b(20 + data.len() as u32),
        &u32b(flags),
        &u32b(index),
        &u32b(start),
        &u32b(count),
        data,
    ])
}

pub fn feature(argsz: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    le(&[&u32b(argsz), &u32b(flags), data])
}

pub const GET: u32 = 1 << 16;
pub const SET: u32 = 1 << 17;
pub const MIG_STATE: u32 = 2;
pub const LOG_START: u32 = 6;
pub const LOG_STOP: u32 = 7;
pub const LOG_REPORT: u32 = 8;

pub fn mig_state(state: u32) -> Vec<u8> {
    feature(16, SET | MIG_STATE, &le(&[&u32b(state), &u32b(0)]))
}

pub fn log_start(page: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut d = le(&[&u64b(page), &u32b(ranges.len() as u32), &u32b(0)]);
    for (i, l) in ranges {
        d.extend(u64b(*i));
        d.extend(u64b(*l));
    }
    feature(8 + d.len() as u32, SET | LOG_START, &d)
}

pub fn log_report(argsz: u32, iova: u64, length: u64, page: u64) -> Vec<u8> {
    feature(
        argsz,
        GET | LOG_REPORT,
        &le(&[&u64b(iova), &u64b(length), &u64b(page)]),
    )
}

pub fn mig_read(size: u32) -> Vec<u8> {
    le(&[&u32b(size + 8), &u32b(size)])
}

pub fn mig_write(data: &[u8]) -> Vec<u8> {
    le(&[&u32b(8 + data.len() as u32), &u32b(data.len() as u32), data])
}

pub fn memfd(size: u64) -> OwnedFd {
    owned(super::memfd(size))
}

pub fn eventfd() -> OwnedFd {
    owned(super::eventfd())
}
