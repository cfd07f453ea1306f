//! DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS: the client methods that set up interrupts.

use std::os::fd::BorrowedFd;

use super::Client;
use crate::error::ProtocolError;
use crate::header::Command;
use crate::messages::irq::{
    IrqInfo, IrqSetHeader, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};
use crate::messages::IrqAction;
use crate::wire::put;

impl Client {
    /// DEVICE_GET_IRQ_INFO.
    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfo, ProtocolError> {
        let mut p = Vec::new();
        put(
            &mut p,
            &IrqInfo {
                argsz: 16,
                index,
                ..IrqInfo::default()
            },
        );
        let r = self.request(Command::DeviceGetIrqInfo, &p, &[])?;
        crate::messages::decode_fixed(&r.payload, "DEVICE_GET_IRQ_INFO reply")
    }

    /// DEVICE_SET_IRQS with explicit flags, trailing data and fds.
    pub fn set_irqs_raw(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        data: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ProtocolError> {
        let mut p = Vec::new();
        put(
            &mut p,
            &IrqSetHeader {
                argsz: (20 + data.len()) as u32,
                flags,
                index,
                start,
                count,
            },
        );
        p.extend_from_slice(data);
        self.request(Command::DeviceSetIrqs, &p, fds)?;
        Ok(())
    }

    /// Assign trigger eventfds to vectors `start..start+fds.len()` (empty `fds` with `count`
    /// de-assigns, see [`Self::deassign_irq_eventfds`]).
    pub fn set_irq_eventfds(
        &mut self,
        index: u32,
        start: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ProtocolError> {
        self.set_irqs_raw(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
            index,
            start,
            fds.len() as u32,
            &[],
            fds,
        )
    }

    /// De-assign trigger eventfds (EVENTFD with no fds).
    pub fn deassign_irq_eventfds(
        &mut self,
        index: u32,
        start: u32,
        count: u32,
    ) -> Result<(), ProtocolError> {
        self.set_irqs_raw(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
            index,
            start,
            count,
            &[],
            &[],
        )
    }

    /// Assign the INTx unmask (resample) eventfd.
    pub fn set_irq_unmask_eventfd(
        &mut self,
        index: u32,
        fd: BorrowedFd<'_>,
    ) -> Result<(), ProtocolError> {
        self.set_irqs_raw(
            IRQ_SET_ACTION_UNMASK | IRQ_SET_DATA_EVENTFD,
            index,
            0,
            1,
            &[],
            &[fd],
        )
    }

    /// Apply `action` with DATA_NONE to `start..start+count`.
    pub fn irq_action(
        &mut self,
        action: IrqAction,
        index: u32,
        start: u32,
        count: u32,
    ) -> Result<(), ProtocolError> {
        let a = action_flag(action);
        self.set_irqs_raw(a | IRQ_SET_DATA_NONE, index, start, count, &[], &[])
    }

    /// Apply `action` with DATA_BOOL.
    pub fn irq_action_bools(
        &mut self,
        action: IrqAction,
        index: u32,
        start: u32,
        bools: &[bool],
    ) -> Result<(), ProtocolError> {
        let a = action_flag(action);
        let data: Vec<u8> = bools.iter().map(|b| u8::from(*b)).collect();
        self.set_irqs_raw(
            a | IRQ_SET_DATA_BOOL,
            index,
            start,
            bools.len() as u32,
            &data,
            &[],
        )
    }

    /// Disable a whole IRQ index (`TRIGGER|NONE`, count 0).
    pub fn disable_irqs(&mut self, index: u32) -> Result<(), ProtocolError> {
        self.set_irqs_raw(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE,
            index,
            0,
            0,
            &[],
            &[],
        )
    }
}

fn action_flag(action: IrqAction) -> u32 {
    match action {
        IrqAction::Mask => IRQ_SET_ACTION_MASK,
        IrqAction::Unmask => IRQ_SET_ACTION_UNMASK,
        IrqAction::Trigger => IRQ_SET_ACTION_TRIGGER,
    }
}
