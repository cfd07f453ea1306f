//! INTMS/INTMC interrupt masking, and Abort of queued and fetched commands.

use super::*;

#[test]
fn intms_masks_msi_until_intmc_and_msix_ignores_it() {
    let (_d, mut h) = queue_on(1, 1, 0);
    h.b.write32(0, reg::INTMS, 1).unwrap();
    assert_eq!(
        h.b.read32(0, reg::INTMC).unwrap(),
        1,
        "INTMC reads the mask"
    );
    let cid = h.submit(1, read_sqe());
    h.b.run(100);
    assert!(h.b.interrupts().is_empty(), "masked: no MSI");
    h.b.write32(0, reg::INTMC, 1).unwrap();
    assert_eq!(
        h.b.interrupts(),
        vec![(1, 0, 1)],
        "unmasked while the completion waits: signalled"
    );
    assert_eq!(h.reap(1).unwrap().0, cid);
    h.b.write32(0, reg::INTMC, 1).unwrap();
    assert!(h.b.interrupts().is_empty(), "nothing waiting: no signal");

    let (_d, mut h) = queue_on(2, 2, 1);
    h.b.write32(0, reg::INTMS, u32::MAX).unwrap();
    assert_eq!(h.rw(1, iop::READ, 0, 1, BUF, 0), 0);
    assert_eq!(h.b.interrupts(), vec![(2, 1, 1)], "MSI-X: INTMS ignored");
}

#[test]
fn intms_drops_intx_and_intmc_raises_it_again() {
    const STATUS_INTERRUPT: u16 = 1 << 3;
    let (_d, mut h) = queue_on(0, 1, 0);
    h.submit(1, read_sqe());
    h.b.run(100);
    assert_ne!(
        h.b.config16(6) & STATUS_INTERRUPT,
        0,
        "a completion: INTx up"
    );
    h.b.write32(0, reg::INTMS, 1).unwrap();
    assert_eq!(h.b.config16(6) & STATUS_INTERRUPT, 0, "masked: INTx down");
    let cid = h.submit(1, read_sqe());
    h.b.run(100);
    assert_eq!(h.b.config16(6) & STATUS_INTERRUPT, 0, "masked: stays down");
    h.b.write32(0, reg::INTMC, 1).unwrap();
    assert_ne!(h.b.config16(6) & STATUS_INTERRUPT, 0, "unmasked: up again");
    h.reap(1).unwrap();
    assert_eq!(h.reap(1).unwrap().0, cid);
    assert_eq!(h.b.config16(6) & STATUS_INTERRUPT, 0, "consumed: down");
}

#[test]
fn abort_takes_a_command_not_started_and_reports_others_not_aborted() {
    let (_d, _p, dev) = file_backed(MIB);
    let mut h = Host::new(dev, RamMode::Fd);
    h.enable();
    h.create_queues(1, 1);
    // A read and an Abort naming it, both queued before the controller takes a turn.
    let target = h.submit(1, read_sqe());
    let abort = h.submit(
        0,
        sqe(aop::ABORT, 0, 0, [1 | u32::from(target) << 16, 0, 0, 0]),
    );
    h.b.run(100);
    assert_eq!(
        h.reap(0),
        Some((abort, 0, 0)),
        "result bit 0 clear: aborted"
    );
    let (cid, st, _) = h.reap(1).unwrap();
    assert_eq!(
        (cid, st & !status::DNR),
        (target, status::ABORTED_BY_REQUEST)
    );
    // A command that already completed (or never existed) is not aborted.
    let done = h.submit(1, read_sqe());
    h.b.run(100);
    assert_eq!(h.reap(1).unwrap().0, done);
    let a = sqe(aop::ABORT, 0, 0, [1 | u32::from(done) << 16, 0, 0, 0]);
    assert_eq!(h.cmd(0, a), (0, 1), "bit 0 set: not aborted");

    // A command still in its submission queue: a turn fetches at most 32 entries a queue,
    // so the 40th of 40 reads is still queued when the Abort runs.
    let cids: Vec<u16> = (0..40).map(|_| h.submit(1, read_sqe())).collect();
    let last = cids[39];
    let abort = h.submit(
        0,
        sqe(aop::ABORT, 0, 0, [1 | u32::from(last) << 16, 0, 0, 0]),
    );
    h.b.run(100);
    assert_eq!(h.reap(0), Some((abort, 0, 0)), "aborted while queued");
    let done: Vec<(u16, u16)> = std::iter::from_fn(|| h.reap(1))
        .map(|(c, st, _)| (c, st & !status::DNR))
        .collect();
    assert_eq!(done.len(), 40, "every read completed once");
    for (c, st) in done {
        let want = if c == last {
            status::ABORTED_BY_REQUEST
        } else {
            0
        };
        assert_eq!(st, want, "command {c}");
    }
}
