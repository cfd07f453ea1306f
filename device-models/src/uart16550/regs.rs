//! The 16550A's registers as the guest sees them (National Semiconductor PC16550D datasheet):
//! offsets, bits, and the register state with the values derived from it (LSR, MSR, IIR).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// FIFO depth of a 16550A.
pub const FIFO_SIZE: usize = 16;

pub(crate) const RBR: u64 = 0;
pub(crate) const IER: u64 = 1;
pub(crate) const IIR: u64 = 2;
pub(crate) const LCR: u64 = 3;
pub(crate) const MCR: u64 = 4;
pub(crate) const LSR: u64 = 5;
pub(crate) const MSR: u64 = 6;
pub(crate) const SCR: u64 = 7;

pub(crate) const IER_RDI: u8 = 0x01;
pub(crate) const IER_THRI: u8 = 0x02;
pub(crate) const IER_RLSI: u8 = 0x04;
pub(crate) const IER_MSI: u8 = 0x08;
pub(crate) const IIR_NO_INT: u8 = 0x01;
pub(crate) const IIR_MSI: u8 = 0x00;
pub(crate) const IIR_THRI: u8 = 0x02;
pub(crate) const IIR_RDI: u8 = 0x04;
pub(crate) const IIR_RLSI: u8 = 0x06;
pub(crate) const IIR_CTI: u8 = 0x0c;
pub(crate) const IIR_FIFO_ENABLED: u8 = 0xc0;
pub(crate) const FCR_ENABLE: u8 = 0x01;
pub(crate) const FCR_CLEAR_RX: u8 = 0x02;
pub(crate) const FCR_CLEAR_TX: u8 = 0x04;
pub(crate) const LCR_DLAB: u8 = 0x80;
pub(crate) const MCR_LOOP: u8 = 0x10;
pub(crate) const LSR_DR: u8 = 0x01;
pub(crate) const LSR_OE: u8 = 0x02;
pub(crate) const LSR_THRE: u8 = 0x20;
pub(crate) const LSR_TEMT: u8 = 0x40;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_DCD: u8 = 0x80;

/// Register state of the UART.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartRegs {
    /// Interrupt enable.
    pub ier: u8,
    /// Line control.
    pub lcr: u8,
    /// Modem control.
    pub mcr: u8,
    /// Line status bits that are latched (OE).
    pub lsr_latched: u8,
    /// Modem status deltas.
    pub msr_delta: u8,
    /// Scratch.
    pub scr: u8,
    /// Divisor latch.
    pub divisor: u16,
    /// FIFO control (enable + trigger bits).
    pub fcr: u8,
    /// THR-empty interrupt is pending (cleared by IIR read or THR write).
    pub thre_pending: bool,
    /// Received bytes not yet read by the guest.
    pub rx_fifo: VecDeque<u8>,
}

impl UartRegs {
    /// Receive FIFO trigger level (FCR bits 7:6), 1 without FIFO.
    fn rx_trigger(&self) -> usize {
        if self.fcr & FCR_ENABLE == 0 {
            return 1;
        }
        [1, 4, 8, 14][usize::from(self.fcr >> 6)]
    }

    /// Bytes the receive side holds: the FIFO, or the single holding register without it.
    pub(crate) fn fifo_cap(&self) -> usize {
        if self.fcr & FCR_ENABLE != 0 {
            FIFO_SIZE
        } else {
            1
        }
    }

    pub(crate) fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    pub(crate) fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    /// LSR; `thr_empty` says whether the transmitter takes another byte.
    pub(crate) fn lsr(&self, thr_empty: bool) -> u8 {
        let mut v = self.lsr_latched;
        if !self.rx_fifo.is_empty() {
            v |= LSR_DR;
        }
        if thr_empty {
            v |= LSR_THRE | LSR_TEMT;
        }
        v
    }

    pub(crate) fn msr(&self) -> u8 {
        if self.loopback() {
            // Loopback: DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
            let m = self.mcr;
            ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
        } else {
            MSR_CTS | MSR_DSR | MSR_DCD | self.msr_delta
        }
    }

    /// The highest-priority pending interrupt, as IIR reports it (without the FIFO bits).
    pub(crate) fn pending_iir(&self) -> u8 {
        if self.ier & IER_RLSI != 0 && self.lsr_latched & LSR_OE != 0 {
            IIR_RLSI
        } else if self.ier & IER_RDI != 0 && !self.rx_fifo.is_empty() {
            if self.rx_fifo.len() >= self.rx_trigger() {
                IIR_RDI
            } else {
                IIR_CTI
            }
        } else if self.ier & IER_THRI != 0 && self.thre_pending {
            IIR_THRI
        } else if self.ier & IER_MSI != 0 && self.msr_delta & 0x0f != 0 {
            IIR_MSI
        } else {
            IIR_NO_INT
        }
    }

    /// IIR's FIFO bits.
    pub(crate) fn iir_fifo_bits(&self) -> u8 {
        if self.fcr & FCR_ENABLE != 0 {
            IIR_FIFO_ENABLED
        } else {
            0
        }
    }
}
