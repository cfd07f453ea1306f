//! Socket-free tests of the NVMe controller: a small host driver on a [`TestBench`].

use super::spec::{admin as aop, io as iop, reg, status, CC_EN, CSTS_RDY, CSTS_SHST_DONE};
use super::*;
use vfud_server::testing::{RamMode, TestBench, RAM_BASE};

const MIB: u64 = 1 << 20;
const ASQ: u64 = RAM_BASE;
const ACQ: u64 = RAM_BASE + 0x1000;
/// I/O queue pair `q` (1-based): SQ at `IOQ + 0x2000 q`, CQ one page above.
const IOQ: u64 = RAM_BASE + 0x10000;
const BUF: u64 = RAM_BASE + 0x100000;
const PRP_LIST: u64 = RAM_BASE + 0x80000;
const ENTRIES: u16 = 64;

/// A minimal host driver: queue bookkeeping as Linux's nvme driver keeps it.
struct Host {
    b: TestBench,
    tails: Vec<u16>,
    heads: Vec<u16>,
    phases: Vec<bool>,
    cid: u16,
}

fn sq_base(q: u16) -> u64 {
    if q == 0 {
        ASQ
    } else {
        IOQ + 0x2000 * u64::from(q)
    }
}

fn cq_base(q: u16) -> u64 {
    if q == 0 {
        ACQ
    } else {
        sq_base(q) + 0x1000
    }
}

impl Host {
    fn new(dev: Nvme, mode: RamMode) -> Self {
        let mut b = TestBench::with_ram(Box::new(dev), mode, 16 * MIB as usize);
        b.set_config16(4, 0x0006); // memory space + bus master
        let n = 8;
        Self {
            b,
            tails: vec![0; n],
            heads: vec![0; n],
            phases: vec![true; n],
            cid: 0,
        }
    }

    fn enable(&mut self) {
        let aqa = u32::from(ENTRIES - 1) << 16 | u32::from(ENTRIES - 1);
        self.b.write32(0, reg::AQA, aqa).unwrap();
        self.b.write(0, reg::ASQ, &ASQ.to_le_bytes()).unwrap();
        self.b.write(0, reg::ACQ, &ACQ.to_le_bytes()).unwrap();
        self.b
            .write32(0, reg::CC, CC_EN | 6 << 16 | 4 << 20)
            .unwrap();
        assert_eq!(self.b.read32(0, reg::CSTS).unwrap() & CSTS_RDY, CSTS_RDY);
    }

    /// Put a command in SQ `q` and ring its doorbell; returns the command id.
    fn submit(&mut self, q: u16, mut sqe: [u32; 16]) -> u16 {
        self.cid = self.cid.wrapping_add(1);
        sqe[0] |= u32::from(self.cid) << 16;
        let bytes: Vec<u8> = sqe.iter().flat_map(|d| d.to_le_bytes()).collect();
        let t = &mut self.tails[usize::from(q)];
        self.b.ram_write(sq_base(q) + u64::from(*t) * 64, &bytes);
        *t = (*t + 1) % ENTRIES;
        let t = *t;
        self.b
            .write32(0, reg::DOORBELLS + 8 * u64::from(q), u32::from(t))
            .unwrap();
        self.cid
    }

    /// The next completion of CQ `q`, if one is there: (cid, status, result).
    fn reap(&mut self, q: u16) -> Option<(u16, u16, u32)> {
        let i = usize::from(q);
        let e = self
            .b
            .ram_read(cq_base(q) + u64::from(self.heads[i]) * 16, 16);
        let sf = u16::from_le_bytes([e[14], e[15]]);
        if (sf & 1 == 1) != self.phases[i] {
            return None;
        }
        self.heads[i] = (self.heads[i] + 1) % ENTRIES;
        if self.heads[i] == 0 {
            self.phases[i] = !self.phases[i];
        }
        let h = u32::from(self.heads[i]);
        self.b
            .write32(0, reg::DOORBELLS + 8 * u64::from(q) + 4, h)
            .unwrap();
        let cid = u16::from_le_bytes([e[12], e[13]]);
        Some((cid, sf >> 1, u32::from_le_bytes([e[0], e[1], e[2], e[3]])))
    }

    /// Submit, run the device, return (status, result).
    fn cmd(&mut self, q: u16, sqe: [u32; 16]) -> (u16, u32) {
        let cid = self.submit(q, sqe);
        self.b.run(10_000);
        let (c, st, res) = self.reap(q).expect("a completion");
        assert_eq!(c, cid);
        (st & !status::DNR, res)
    }

    fn create_queues(&mut self, q: u16, iv: u16) {
        let size = u32::from(ENTRIES - 1) << 16 | u32::from(q);
        let (st, _) = self.cmd(
            0,
            sqe(
                aop::CREATE_CQ,
                cq_base(q),
                0,
                [size, 1 | 2 | u32::from(iv) << 16, 0, 0],
            ),
        );
        assert_eq!(st, 0);
        let (st, _) = self.cmd(
            0,
            sqe(
                aop::CREATE_SQ,
                sq_base(q),
                0,
                [size, 1 | u32::from(q) << 16, 0, 0],
            ),
        );
        assert_eq!(st, 0);
    }

    fn rw(&mut self, q: u16, op: u8, slba: u64, blocks: u32, prp1: u64, prp2: u64) -> u16 {
        let mut s = sqe(
            op,
            prp1,
            prp2,
            [slba as u32, (slba >> 32) as u32, blocks - 1, 0],
        );
        s[1] = 1;
        self.cmd(q, s).0
    }
}

/// An SQE with opcode, PRP1/2 and CDW10–13.
fn sqe(op: u8, prp1: u64, prp2: u64, cdw: [u32; 4]) -> [u32; 16] {
    let mut s = [0u32; 16];
    s[0] = u32::from(op);
    s[6] = prp1 as u32;
    s[7] = (prp1 >> 32) as u32;
    s[8] = prp2 as u32;
    s[9] = (prp2 >> 32) as u32;
    s[10..14].copy_from_slice(&cdw);
    s
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn file_backed(size: u64) -> (tempfile::TempDir, PathBuf, Nvme) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ns.img");
    let dev = Nvme::from_options(Some(path.clone()), Some(size), Some(2), true).unwrap();
    (dir, path, dev)
}

#[test]
fn enable_and_identify() {
    let (_d, path, dev) = file_backed(8 * MIB);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        8 * MIB,
        "created at the size asked"
    );
    let mut h = Host::new(dev, RamMode::Fd);
    assert_eq!(
        h.b.read(0, reg::CAP, 8).unwrap()[0..2],
        [0xff, 0x03],
        "MQES 1023"
    );
    assert_eq!(h.b.read32(0, reg::VS).unwrap(), 0x0001_0400);
    h.enable();
    assert_eq!(h.cmd(0, sqe(aop::IDENTIFY, BUF, 0, [1, 0, 0, 0])).0, 0);
    let id = h.b.ram_read(BUF, 4096);
    assert_eq!(&id[0..2], &identify::VENDOR.to_le_bytes());
    assert!(id[24..64].starts_with(identify::MODEL.as_bytes()));
    assert_eq!(
        u32::from_le_bytes(id[516..520].try_into().unwrap()),
        1,
        "one namespace"
    );
    let mut ns = sqe(aop::IDENTIFY, BUF, 0, [0, 0, 0, 0]);
    ns[1] = 1;
    assert_eq!(h.cmd(0, ns).0, 0);
    let id = h.b.ram_read(BUF, 4096);
    assert_eq!(
        u64::from_le_bytes(id[0..8].try_into().unwrap()),
        8 * MIB / 4096
    );
    assert_eq!(id[130], 12, "4 KiB blocks");
    assert_eq!(h.cmd(0, sqe(aop::IDENTIFY, BUF, 0, [2, 0, 0, 0])).0, 0);
    assert_eq!(h.b.ram_read(BUF, 8), [1, 0, 0, 0, 0, 0, 0, 0]);
    // Number of queues: what the controller has, 0-based.
    let (st, res) = h.cmd(0, sqe(aop::SET_FEATURES, 0, 0, [7, 63 | 63 << 16, 0, 0]));
    assert_eq!((st, res), (0, 1 | 1 << 16));
}

#[test]
fn write_then_read_through_a_prp_list_in_both_memory_modes() {
    for mode in [RamMode::Fd, RamMode::Socket] {
        let (_d, path, dev) = file_backed(8 * MIB);
        let mut h = Host::new(dev, mode);
        h.enable();
        h.create_queues(1, 1);
        // 64 KiB over 16 scattered pages: PRP1 + a PRP list of 15 entries.
        let data = pattern(64 * 1024, 7);
        let pages: Vec<u64> = (0..16).map(|i| BUF + (i * 2 + 1) * 4096).collect();
        for (i, p) in pages.iter().enumerate() {
            h.b.ram_write(*p, &data[i * 4096..(i + 1) * 4096]);
        }
        let list: Vec<u8> = pages[1..].iter().flat_map(|p| p.to_le_bytes()).collect();
        h.b.ram_write(PRP_LIST, &list);
        assert_eq!(h.rw(1, iop::WRITE, 100, 16, pages[0], PRP_LIST), 0);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(
            &file[100 * 4096..116 * 4096],
            &data[..],
            "{mode:?}: the file holds the data"
        );

        // Read back into one contiguous buffer (PRP1 + a list of contiguous pages).
        let dst = BUF + 4 * MIB;
        let list: Vec<u8> = (1..16)
            .flat_map(|i| (dst + i * 4096).to_le_bytes())
            .collect();
        h.b.ram_write(PRP_LIST, &list);
        assert_eq!(h.rw(1, iop::READ, 100, 16, dst, PRP_LIST), 0);
        assert_eq!(h.b.ram_read(dst, data.len()), data, "{mode:?}");
        // Two blocks: PRP2 is the second page itself.
        assert_eq!(h.rw(1, iop::READ, 101, 2, dst, dst + 0x3000), 0);
        assert_eq!(h.b.ram_read(dst + 0x3000, 4096), &data[8192..12288]);
        assert_eq!(
            h.cmd(1, {
                let mut s = sqe(iop::FLUSH, 0, 0, [0; 4]);
                s[1] = 1;
                s
            })
            .0,
            0
        );
    }
}

#[test]
fn deallocate_and_write_zeroes_read_back_as_zeros() {
    let (_d, path, dev) = file_backed(8 * MIB);
    let mut h = Host::new(dev, RamMode::Fd);
    h.enable();
    h.create_queues(1, 1);
    h.b.ram_write(BUF, &pattern(8192, 1));
    assert_eq!(h.rw(1, iop::WRITE, 10, 2, BUF, BUF + 4096), 0);
    assert_eq!(h.rw(1, iop::WRITE, 20, 2, BUF, BUF + 4096), 0);
    // DSM deallocate block 10 (one range) and Write Zeroes block 21.
    let mut range = vec![0u8; 16];
    range[4..8].copy_from_slice(&1u32.to_le_bytes());
    range[8..16].copy_from_slice(&10u64.to_le_bytes());
    h.b.ram_write(BUF + 0x10000, &range);
    let mut dsm = sqe(iop::DSM, BUF + 0x10000, 0, [0, 1 << 2, 0, 0]);
    dsm[1] = 1;
    assert_eq!(h.cmd(1, dsm).0, 0);
    let mut wz = sqe(iop::WRITE_ZEROES, 0, 0, [21, 0, 0, 0]);
    wz[1] = 1;
    assert_eq!(h.cmd(1, wz).0, 0);
    let file = std::fs::read(&path).unwrap();
    assert!(file[10 * 4096..11 * 4096].iter().all(|b| *b == 0));
    assert_eq!(&file[11 * 4096..12 * 4096], &pattern(8192, 1)[4096..]);
    assert!(file[21 * 4096..22 * 4096].iter().all(|b| *b == 0));
    assert_eq!(&file[20 * 4096..21 * 4096], &pattern(8192, 1)[..4096]);
}

#[test]
fn bad_commands_get_status_codes_and_the_controller_carries_on() {
    let (_d, _p, dev) = file_backed(MIB);
    let mut h = Host::new(dev, RamMode::Fd);
    h.enable();
    assert_eq!(h.cmd(0, sqe(0x7f, 0, 0, [0; 4])).0, status::INVALID_OPCODE);
    assert_eq!(
        h.cmd(0, sqe(aop::IDENTIFY, BUF, 0, [9, 0, 0, 0])).0,
        status::INVALID_FIELD
    );
    assert_eq!(
        h.cmd(
            0,
            sqe(aop::GET_LOG_PAGE, BUF, 0, [0x7f | 127 << 16, 0, 0, 0])
        )
        .0,
        status::INVALID_LOG_PAGE
    );
    // An SQ whose CQ does not exist; a queue id beyond the controller's.
    let size = u32::from(ENTRIES - 1) << 16;
    assert_eq!(
        h.cmd(
            0,
            sqe(aop::CREATE_SQ, sq_base(1), 0, [size | 1, 1 | 1 << 16, 0, 0])
        )
        .0,
        status::INVALID_CQ
    );
    assert_eq!(
        h.cmd(0, sqe(aop::CREATE_CQ, cq_base(1), 0, [size | 9, 3, 0, 0]))
            .0,
        status::INVALID_QID
    );
    assert_eq!(
        h.cmd(0, sqe(aop::DELETE_CQ, 0, 0, [1, 0, 0, 0])).0,
        status::INVALID_QID
    );
    h.create_queues(1, 1);
    assert_eq!(
        h.cmd(0, sqe(aop::DELETE_CQ, 0, 0, [1, 0, 0, 0])).0,
        status::INVALID_QUEUE_DELETION
    );
    // I/O: past the end, a wrong namespace, too large, DMA outside guest memory.
    assert_eq!(
        h.rw(1, iop::READ, 255, 2, BUF, BUF + 4096),
        status::LBA_OUT_OF_RANGE
    );
    let mut s = sqe(iop::READ, BUF, 0, [0; 4]);
    s[1] = 2;
    assert_eq!(h.cmd(1, s).0, status::INVALID_NAMESPACE);
    assert_eq!(
        h.rw(1, iop::READ, 0, 64, BUF, PRP_LIST),
        status::INVALID_FIELD
    );
    assert_eq!(
        h.rw(1, iop::READ, 0, 1, 0x1000, 0),
        status::DATA_TRANSFER_ERROR
    );
    assert_eq!(
        h.rw(1, iop::READ, 0, 2, BUF, BUF + 17),
        status::INVALID_PRP_OFFSET
    );
    // Registers: a 2-byte access is refused; the controller still works.
    assert!(h.b.read(0, reg::CSTS, 2).is_err());
    assert_eq!(h.rw(1, iop::READ, 0, 1, BUF, 0), 0);
    // Enabling with an invalid configuration reports a fatal status, no panic.
    h.b.write32(0, reg::CC, 0).unwrap();
    h.b.write32(0, reg::AQA, 0).unwrap();
    h.b.write32(0, reg::CC, CC_EN).unwrap();
    assert_eq!(h.b.read32(0, reg::CSTS).unwrap(), spec::CSTS_CFS);
}

#[test]
fn one_msix_vector_per_completion_queue() {
    let (_d, _p, dev) = file_backed(MIB);
    let mut h = Host::new(dev, RamMode::Fd);
    h.b.wire_irqs(2, 3);
    h.enable();
    h.create_queues(1, 1);
    h.create_queues(2, 2);
    h.b.interrupts();
    for _ in 0..3 {
        assert_eq!(h.rw(1, iop::READ, 0, 1, BUF, 0), 0);
    }
    assert_eq!(h.rw(2, iop::READ, 0, 1, BUF, 0), 0);
    assert_eq!(h.b.interrupts(), vec![(2, 1, 3), (2, 2, 1)]);
}

#[test]
fn aer_is_parked_and_shutdown_completes() {
    let (_d, _p, dev) = file_backed(MIB);
    let mut h = Host::new(dev, RamMode::Fd);
    h.enable();
    h.submit(0, sqe(aop::ASYNC_EVENT, 0, 0, [0; 4]));
    h.b.run(100);
    assert!(h.reap(0).is_none(), "no event, no completion");
    assert_eq!(h.cmd(0, sqe(aop::ABORT, 0, 0, [0; 4])), (0, 1));
    h.b.write32(0, reg::CC, CC_EN | 1 << 14 | 6 << 16 | 4 << 20)
        .unwrap();
    h.b.run(100);
    assert_eq!(h.b.read32(0, reg::CSTS).unwrap(), CSTS_RDY | CSTS_SHST_DONE);
    h.b.write32(0, reg::CC, 0).unwrap();
    assert_eq!(h.b.read32(0, reg::CSTS).unwrap(), 0, "reset: not ready");
}

/// A file-backed controller, enabled, with `count` vectors of interrupt `index` wired and I/O
/// queue pair 1 on vector `iv`; interrupts so far drained.
fn queue_on(index: u32, count: u32, iv: u16) -> (tempfile::TempDir, Host) {
    let (d, _p, dev) = file_backed(MIB);
    let mut h = Host::new(dev, RamMode::Fd);
    h.b.wire_irqs(index, count);
    h.enable();
    h.create_queues(1, iv);
    h.b.interrupts();
    (d, h)
}

fn read_sqe() -> [u32; 16] {
    let mut s = sqe(iop::READ, BUF, 0, [0; 4]);
    s[1] = 1;
    s
}

mod doorbells;
mod interrupt_mask_and_abort;
mod migration;
