//! Unit tests of interrupt state.
use super::*;
use nix::sys::eventfd::{EfdFlags, EventFd};

fn efd() -> (OwnedFd, EventFd) {
    let e = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap();
    let dup = e.as_fd().try_clone_to_owned().unwrap();
    (dup, e)
}

fn count(e: &EventFd) -> u64 {
    let mut b = [0u8; 8];
    match nix::unistd::read(e.as_fd(), &mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

fn layout() -> IrqLayout {
    IrqLayout {
        intx: true,
        msi_vectors: 1,
        msix: Some((
            4,
            crate::device::MsixPlacement {
                bar: crate::device::BarIndex(4),
                table_offset: 0,
                pba_offset: 0x800,
            },
        )),
        err: false,
        req: false,
    }
}

fn set(index: u32, start: u32, count: u32, action: IrqAction, data: IrqData) -> SetIrqs {
    SetIrqs {
        index,
        start,
        count,
        action,
        data,
    }
}

#[test]
fn masked_msix_vector_latches_pending_and_fires_on_unmask() {
    let mut irqs = Interrupts::new(&layout());
    let (fd, e) = efd();
    irqs.apply(set(
        2,
        1,
        1,
        IrqAction::Trigger,
        IrqData::Eventfds(vec![fd]),
    ))
    .unwrap();
    irqs.apply(set(2, 1, 1, IrqAction::Mask, IrqData::None))
        .unwrap();
    irqs.raise(1);
    assert_eq!(count(&e), 0);
    let mut pba = [0u8; 1];
    irqs.read_pba(0, &mut pba);
    assert_eq!(pba[0], 0b10);
    irqs.apply(set(2, 1, 1, IrqAction::Unmask, IrqData::None))
        .unwrap();
    assert_eq!(count(&e), 1);
    irqs.read_pba(0, &mut pba);
    assert_eq!(pba[0], 0);
}

#[test]
fn intx_is_automasked_until_unmask() {
    let mut irqs = Interrupts::new(&layout());
    let (fd, e) = efd();
    irqs.apply(set(
        0,
        0,
        1,
        IrqAction::Trigger,
        IrqData::Eventfds(vec![fd]),
    ))
    .unwrap();
    irqs.raise(0);
    irqs.raise(0);
    assert_eq!(count(&e), 1);
    irqs.unmask_intx();
    assert_eq!(count(&e), 1, "pending edge fires on unmask");
}

#[test]
fn out_of_range_and_wrong_actions_are_rejected() {
    let irqs = Interrupts::new(&layout());
    assert!(irqs
        .validate(&set(2, 3, 2, IrqAction::Trigger, IrqData::None))
        .is_err());
    assert!(irqs
        .validate(&set(9, 0, 1, IrqAction::Trigger, IrqData::None))
        .is_err());
    assert!(irqs
        .validate(&set(1, 0, 1, IrqAction::Mask, IrqData::None))
        .is_err());
    assert!(irqs
        .validate(&set(3, 0, 1, IrqAction::Trigger, IrqData::None))
        .is_err());
    assert!(irqs
        .validate(&set(2, 0, 0, IrqAction::Trigger, IrqData::None))
        .is_ok());
}

#[test]
fn msix_takes_precedence_over_intx() {
    let mut irqs = Interrupts::new(&layout());
    let (fd0, e0) = efd();
    let (fd2, e2) = efd();
    irqs.apply(set(
        0,
        0,
        1,
        IrqAction::Trigger,
        IrqData::Eventfds(vec![fd0]),
    ))
    .unwrap();
    irqs.apply(set(
        2,
        0,
        1,
        IrqAction::Trigger,
        IrqData::Eventfds(vec![fd2]),
    ))
    .unwrap();
    irqs.raise(0);
    assert_eq!((count(&e0), count(&e2)), (0, 1));
    irqs.apply(set(2, 0, 0, IrqAction::Trigger, IrqData::None))
        .unwrap();
    irqs.raise(0);
    assert_eq!(count(&e0), 1);
}
