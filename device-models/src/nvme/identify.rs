//! Identify data structures (§5.15.2) and log pages (§5.14.1) the controller returns.

use super::ctrl::{Counters, Ctrl};
use super::namespace::{Namespace, LBA_SIZE};
use super::spec::{self, MDTS};

/// PCI vendor id used in Identify (the same as the function's).
pub const VENDOR: u16 = 0x5646;
/// Model number reported.
pub const MODEL: &str = "vfud NVMe controller";
/// Firmware revision reported.
pub const FIRMWARE: &str = "vfud0.1";

/// Size of identify data and of the log pages below.
pub const PAGE_BYTES: usize = 4096;

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

/// An ASCII field padded with spaces, as Identify wants.
fn ascii(b: &mut [u8], off: usize, len: usize, s: &str) {
    b[off..off + len].fill(b' ');
    let n = s.len().min(len);
    b[off..off + n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Identify Controller (CNS 1).
pub fn controller(serial: &str, dbbuf: bool) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_BYTES];
    put(&mut b, 0, &VENDOR.to_le_bytes()); // VID
    put(&mut b, 2, &VENDOR.to_le_bytes()); // SSVID
    ascii(&mut b, 4, 20, serial); // SN
    ascii(&mut b, 24, 40, MODEL); // MN
    ascii(&mut b, 64, 8, FIRMWARE); // FR
    b[72] = 6; // RAB
    b[77] = MDTS;
    put(&mut b, 78, &1u16.to_le_bytes()); // CNTLID
    put(&mut b, 80, &spec::VERSION.to_le_bytes()); // VER
                                                   // OACS bit 8: Doorbell Buffer Config.
    put(&mut b, 256, &(u16::from(dbbuf) << 8).to_le_bytes());
    b[258] = 3; // ACL: 4 concurrent Aborts
    b[259] = 3; // AERL: 4 outstanding AERs
    b[260] = 1 << 1 | 1; // FRMW: one slot, slot 1 read-only
    b[261] = 1 << 2; // LPA: extended data for Get Log Page
    b[262] = 63; // ELPE: 64 error log entries
    put(&mut b, 266, &343u16.to_le_bytes()); // WCTEMP (K)
    put(&mut b, 268, &373u16.to_le_bytes()); // CCTEMP (K)
    b[512] = 0x66; // SQES: 64 bytes
    b[513] = 0x44; // CQES: 16 bytes
    put(&mut b, 514, &(spec::MAX_QUEUE_ENTRIES as u16).to_le_bytes()); // MAXCMD
    put(&mut b, 516, &1u32.to_le_bytes()); // NN
                                           // ONCS: Dataset Management (bit 2), Write Zeroes (bit 3).
    put(&mut b, 520, &(1u16 << 2 | 1 << 3).to_le_bytes());
    b[525] = 1; // VWC: volatile write cache present, so the driver sends Flush
    let nqn = format!("nqn.2024-01.io.vfud:nvme:{serial}");
    put(&mut b, 768, nqn.as_bytes()); // SUBNQN
                                      // Power state 0: 25.00 W max.
    put(&mut b, 2048, &2500u16.to_le_bytes());
    b
}

/// Identify Namespace (CNS 0).
pub fn namespace(ns: &Namespace, nguid: [u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_BYTES];
    let n = ns.blocks();
    put(&mut b, 0, &n.to_le_bytes()); // NSZE
    put(&mut b, 8, &n.to_le_bytes()); // NCAP
    put(&mut b, 16, &n.to_le_bytes()); // NUSE
    b[24] = 1; // NSFEAT: thin provisioning (deallocated blocks hold no space)
    b[25] = 0; // NLBAF: one format
    b[26] = 0; // FLBAS: format 0
    b[33] = 1 | 1 << 3; // DLFEAT: deallocated reads as zeros; Write Zeroes may deallocate
    put(&mut b, 104, &nguid); // NGUID
                              // LBA format 0: no metadata, LBADS = 12 (4 KiB), best performance.
    b[128 + 2] = LBA_SIZE.trailing_zeros() as u8;
    b
}

/// Active Namespace ID list (CNS 2): namespace 1 if it is above `after`.
pub fn active_list(after: u32) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_BYTES];
    if after < 1 {
        put(&mut b, 0, &1u32.to_le_bytes());
    }
    b
}

/// Namespace Identification Descriptor list (CNS 3): the NGUID.
pub fn descriptors(nguid: [u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_BYTES];
    b[0] = 2; // NIDT: NGUID
    b[1] = 16; // NIDL
    put(&mut b, 4, &nguid);
    b
}

/// SMART / Health Information log (LID 2).
pub fn smart(c: &Counters) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    put(&mut b, 1, &303u16.to_le_bytes()); // composite temperature: 30 °C
    b[3] = 100; // available spare
    b[4] = 10; // available spare threshold
    let units = |bytes: u64| (bytes / 512).div_ceil(1000);
    put(&mut b, 32, &u128::from(units(c.bytes_read)).to_le_bytes());
    put(
        &mut b,
        48,
        &u128::from(units(c.bytes_written)).to_le_bytes(),
    );
    put(&mut b, 64, &u128::from(c.reads).to_le_bytes());
    put(&mut b, 80, &u128::from(c.writes).to_le_bytes());
    b
}

/// Firmware Slot Information log (LID 3).
pub fn firmware() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0] = 1; // AFI: slot 1 active
    ascii(&mut b, 8, 8, FIRMWARE);
    b
}

/// The log page `lid`, or `None` for one the controller does not have.
pub fn log_page(lid: u8, ctrl: &Ctrl) -> Option<Vec<u8>> {
    Some(match lid {
        1 => vec![0u8; 64 * 64], // error information: no errors recorded
        2 => smart(&ctrl.counters),
        3 => firmware(),
        _ => return None,
    })
}
