//! Round trips, continued from `roundtrip.rs`: SET_IRQS in each data form, with eventfds that
//! signal the originals after crossing a socket.

mod common;

use std::os::fd::{AsFd, OwnedFd};

use common::{eventfd_nb, eventfd_signal, eventfd_take, roundtrip, same_file, set_irqs};
use vfud_protocol::messages::irq::{
    IRQ_INDEX_INTX, IRQ_INDEX_MSIX, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD,
};
use vfud_protocol::messages::{IrqAction, IrqData, Request, SetIrqs};

// ---------------------------------------------------------------------------------------------
// SET_IRQS

#[test]
fn set_irqs_data_none_round_trips_for_each_action() {
    for action in [IrqAction::Mask, IrqAction::Unmask, IrqAction::Trigger] {
        let got = roundtrip(&set_irqs(action, 1, 2, IrqData::None));

        let Request::SetIrqs(s) = got else {
            panic!("decoded as {got:?}")
        };
        assert_eq!((s.index, s.start, s.count), (IRQ_INDEX_MSIX, 1, 2));
        assert_eq!(s.action, action);
        assert!(matches!(s.data, IrqData::None));
        assert!(!s.is_disable());
    }
}

#[test]
fn set_irqs_data_bool_round_trips() {
    let bools = vec![true, false, false, true];

    let got = roundtrip(&set_irqs(
        IrqAction::Trigger,
        0,
        4,
        IrqData::Bool(bools.clone()),
    ));

    let Request::SetIrqs(s) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!(s.count, 4);
    assert_eq!(s.action, IrqAction::Trigger);
    let IrqData::Bool(v) = s.data else {
        panic!("expected DATA_BOOL")
    };
    assert_eq!(v, bools);
}

#[test]
fn set_irqs_eventfds_round_trip_and_received_fds_signal_the_originals() {
    let originals: Vec<OwnedFd> = (0..3).map(|_| eventfd_nb()).collect();
    let dups: Vec<OwnedFd> = originals
        .iter()
        .map(|f| f.try_clone().expect("dup"))
        .collect();

    let got = roundtrip(&set_irqs(IrqAction::Trigger, 1, 3, IrqData::Eventfds(dups)));

    let Request::SetIrqs(s) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!((s.start, s.count, s.action), (1, 3, IrqAction::Trigger));
    let IrqData::Eventfds(fds) = s.data else {
        panic!("expected DATA_EVENTFD")
    };
    assert_eq!(fds.len(), 3);
    // Order is preserved: signalling received fd i wakes original i only.
    for (i, fd) in fds.iter().enumerate() {
        eventfd_signal(fd.as_fd());
        for (j, o) in originals.iter().enumerate() {
            let fired = eventfd_take(o.as_fd());
            assert_eq!(
                fired,
                (i == j).then_some(1),
                "vector {i} signalled, checked {j}"
            );
        }
    }
}

#[test]
fn set_irqs_unmask_eventfd_for_intx_round_trips() {
    let resample = eventfd_nb();
    let req = Request::SetIrqs(SetIrqs {
        index: IRQ_INDEX_INTX,
        start: 0,
        count: 1,
        action: IrqAction::Unmask,
        data: IrqData::Eventfds(vec![resample.try_clone().expect("dup")]),
    });

    let got = roundtrip(&req);

    let Request::SetIrqs(s) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!((s.index, s.action), (IRQ_INDEX_INTX, IrqAction::Unmask));
    let IrqData::Eventfds(fds) = s.data else {
        panic!("expected DATA_EVENTFD")
    };
    assert!(same_file(fds[0].as_fd(), resample.as_fd()));
}

#[test]
fn set_irqs_eventfd_without_fds_deassigns_a_range() {
    let got = roundtrip(&set_irqs(
        IrqAction::Trigger,
        2,
        5,
        IrqData::Eventfds(vec![]),
    ));

    let Request::SetIrqs(s) = got else {
        panic!("decoded as {got:?}")
    };
    assert_eq!((s.start, s.count), (2, 5));
    assert!(matches!(&s.data, IrqData::Eventfds(v) if v.is_empty()));
    assert_eq!(s.flags(), IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD);
}

#[test]
fn set_irqs_count_zero_trigger_none_is_the_disable_form() {
    let got = roundtrip(&set_irqs(IrqAction::Trigger, 0, 0, IrqData::None));

    let Request::SetIrqs(s) = got else {
        panic!("decoded as {got:?}")
    };
    assert!(s.is_disable());
    assert_eq!(s.count, 0);
    assert!(matches!(s.data, IrqData::None));
}
