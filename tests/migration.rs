//! The server half of live migration over real sockets, its state machine: the v2 states and
//! every transition between them, what each state permits, SET_IRQS deferred while RESUMING
//! and applied (or refused) on the way to RUNNING, and reset. The stream itself, save and
//! restore, dirty logging and the v1 region are in `migration_stream.rs`.

mod common;

use common::dma_engine::{run_op, w};
use common::migration::{restore, save, CHUNK, RAM_IOVA, RAM_SIZE, RW};
use common::{eventfd as efd, memfd, wait_eventfd as fired};

use std::os::fd::AsFd;

use common::Vfud;
use nix::errno::Errno;
use vfud_devices::dma_engine::{reg, Opcode, CONTROL_IRQ_ENABLE};
use vfud_protocol::messages::feature::{
    FEATURE_MIGRATION, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY,
};
use vfud_protocol::messages::irq::{IRQ_INDEX_MSIX, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD};
use vfud_protocol::messages::{IrqAction, MigState};
use vfud_protocol::{Client, ProtocolError};

#[test]
fn migration_feature_advertises_stop_copy_and_pre_copy() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    assert_eq!(
        c.migration_flags().unwrap(),
        MIGRATION_STOP_COPY | MIGRATION_PRE_COPY
    );
    assert_eq!(c.mig_state().unwrap(), MigState::Running);
    c.feature_probe(FEATURE_MIGRATION, true, false).unwrap();
    assert!(matches!(
        c.feature_probe(FEATURE_MIGRATION, false, true),
        Err(ProtocolError::Remote(Errno::EINVAL))
    ));
    assert!(matches!(
        c.feature_get(0x3fff, &[], 8),
        Err(ProtocolError::Remote(Errno::ENOTTY))
    ));
}

#[test]
fn every_state_pair_walks_documented_hops_or_is_refused_keeping_state() {
    use MigState::*;
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    let stream = save(&mut c);
    c.set_mig_state(Running).unwrap();
    let reachable = [Running, Stop, StopCopy, Resuming, PreCopy];
    let go = |c: &mut Client, s: MigState| {
        c.device_reset().unwrap();
        if s == Resuming {
            c.set_mig_state(Resuming).unwrap();
            for ch in stream.chunks(CHUNK as usize) {
                c.mig_data_write(ch).unwrap();
            }
        } else {
            c.set_mig_state(s).unwrap();
        }
        assert_eq!(c.mig_state().unwrap(), s);
    };
    for from in reachable {
        for to in MigState::ALL {
            go(&mut c, from);
            let legal = reachable.contains(&to) && !(from == StopCopy && to == PreCopy);
            let res = c.set_mig_state(to);
            if legal {
                res.unwrap_or_else(|e| panic!("{from:?}->{to:?}: {e}"));
                assert_eq!(c.mig_state().unwrap(), to, "{from:?}->{to:?}");
            } else {
                assert!(
                    matches!(res, Err(ProtocolError::Remote(Errno::EINVAL))),
                    "{from:?}->{to:?}: {res:?}"
                );
                assert_eq!(c.mig_state().unwrap(), from, "{from:?}->{to:?} kept state");
            }
        }
    }
}

#[test]
fn each_state_permits_exactly_its_commands() {
    use MigState::*;
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    let ram = memfd(RAM_SIZE);
    let e = efd();
    // (state, region read, BAR write, config write, dma map, set_irqs, mig read, mig write)
    let table = [
        (Running, true, true, true, true, true, false, false),
        (PreCopy, true, true, true, true, true, true, false),
        (Stop, true, true, true, true, true, false, false),
        (StopCopy, true, false, false, true, true, true, false),
        (Resuming, true, false, true, true, true, false, true),
    ];
    for (state, rd, bw, cw, dm, si, mr, mw) in table {
        c.device_reset().unwrap();
        c.set_mig_state(state).unwrap();
        let got = (
            state,
            c.region_read(7, 0, 4).is_ok(),
            c.region_write(0, reg::PATTERN, &[1, 0, 0, 0]).is_ok(),
            c.region_write(7, 0x0c, &[0x10]).is_ok(),
            c.dma_map(RW, 0, RAM_IOVA, RAM_SIZE, Some(ram.as_fd()))
                .is_ok()
                && c.dma_unmap(RAM_IOVA, RAM_SIZE).is_ok(),
            c.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &[e.as_fd()]).is_ok(),
            c.mig_data_read(16).is_ok(),
            // A valid stream header is accepted in RESUMING; elsewhere the command is refused.
            c.mig_data_write(&[]).is_ok(),
        );
        assert_eq!(got, (state, rd, bw, cw, dm, si, mr, mw));
    }
}

#[test]
fn set_irqs_while_resuming_is_deferred_until_running_and_pending_interrupts_follow() {
    let src_v = Vfud::start("dma-engine", &[]);
    let dst_v = Vfud::start("dma-engine", &[]);
    let mut src = src_v.client();
    let mut dst = dst_v.client();
    let ram = memfd(RAM_SIZE);
    src.dma_map(RW, 0, RAM_IOVA, RAM_SIZE, Some(ram.as_fd()))
        .unwrap();
    let se = efd();
    src.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &[se.as_fd()])
        .unwrap();
    src.irq_action(IrqAction::Mask, IRQ_INDEX_MSIX, 0, 1)
        .unwrap();
    w(&mut src, reg::CONTROL, CONTROL_IRQ_ENABLE);
    run_op(&mut src, Opcode::Crc32, RAM_IOVA, 0, 4, 0);
    assert_eq!(fired(&se, 50), 0, "masked on the source: pending");
    let stream = save(&mut src);

    dst.dma_map(RW, 0, RAM_IOVA, RAM_SIZE, Some(ram.as_fd()))
        .unwrap();
    dst.set_mig_state(MigState::Resuming).unwrap();
    for ch in stream.chunks(CHUNK as usize) {
        dst.mig_data_write(ch).unwrap();
    }
    let de = efd();
    // Bad requests still fail at once.
    assert!(dst
        .irq_action(IrqAction::Trigger, IRQ_INDEX_MSIX, 9, 1)
        .is_err());
    dst.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &[de.as_fd()])
        .unwrap();
    dst.irq_action(IrqAction::Unmask, IRQ_INDEX_MSIX, 0, 1)
        .unwrap();
    dst.irq_action(IrqAction::Trigger, IRQ_INDEX_MSIX, 0, 1)
        .unwrap();
    assert_eq!(fired(&de, 100), 0, "nothing fires while RESUMING");
    dst.set_mig_state(MigState::Stop).unwrap();
    assert_eq!(fired(&de, 100), 0, "nothing fires in STOP");
    assert_eq!(
        dst.region_read(4, 0x800, 1).unwrap()[0] & 1,
        1,
        "pending in the PBA"
    );
    dst.set_mig_state(MigState::Running).unwrap();
    // The restored pending interrupt and the client's deferred trigger share one pending
    // bit (as in the MSI-X PBA), so one signal is delivered.
    assert_eq!(
        fired(&de, 2000),
        1,
        "the pending interrupt fires right after RUNNING"
    );
    assert_eq!(dst.region_read(4, 0x800, 1).unwrap()[0] & 1, 0);
    // The destination runs: a new completion interrupts once.
    run_op(&mut dst, Opcode::Crc32, RAM_IOVA, 0, 4, 0);
    assert_eq!(fired(&de, 2000), 1);
}

#[test]
fn a_set_irqs_that_fails_when_applied_fails_the_transition_to_running() {
    let src_v = Vfud::start("dma-engine", &[]);
    let dst_v = Vfud::start("dma-engine", &[]);
    let mut src = src_v.client();
    let mut dst = dst_v.client();
    let stream = save(&mut src);
    restore(&mut dst, &stream).unwrap();
    let good = efd();
    let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
    dst.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &[good.as_fd()])
        .unwrap();
    // Not an eventfd: only applying can tell.
    dst.set_irqs_raw(
        IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
        IRQ_INDEX_MSIX,
        1,
        1,
        &[],
        &[pipe_r.as_fd()],
    )
    .unwrap();
    assert!(matches!(
        dst.set_mig_state(MigState::Running),
        Err(ProtocolError::Remote(Errno::EINVAL))
    ));
    assert_eq!(dst.mig_state().unwrap(), MigState::Stop);
    // Nothing was applied: vector 0's good eventfd was not assigned.
    dst.irq_action(IrqAction::Trigger, IRQ_INDEX_MSIX, 0, 1)
        .unwrap();
    assert_eq!(fired(&good, 50), 0);
    // Corrected, the transition succeeds.
    dst.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &[good.as_fd()])
        .unwrap();
    dst.set_mig_state(MigState::Running).unwrap();
    assert_eq!(
        fired(&good, 2000),
        1,
        "the trigger queued after the failure"
    );
    dst.irq_action(IrqAction::Trigger, IRQ_INDEX_MSIX, 0, 1)
        .unwrap();
    assert_eq!(fired(&good, 2000), 1, "applied at once in RUNNING");
    // In RUNNING a non-eventfd fails at once.
    assert!(dst
        .set_irqs_raw(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
            IRQ_INDEX_MSIX,
            1,
            1,
            &[],
            &[pipe_r.as_fd()]
        )
        .is_err());
}

#[test]
fn reset_returns_to_running_and_drops_the_migration() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    c.set_mig_state(MigState::StopCopy).unwrap();
    c.mig_data_read(1000).unwrap();
    c.device_reset().unwrap();
    assert_eq!(c.mig_state().unwrap(), MigState::Running);
    assert!(c.mig_data_read(16).is_err());
}
