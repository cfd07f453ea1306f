//! `uart16550`: a 16550A-compatible UART behind PCI, bound by Linux's stock `8250_pci` driver
//! through its class match (class 0x070002, one 8-byte I/O BAR, INTx), like QEMU's
//! `pci-serial`.
//!
//! # Registers (BAR0, I/O, byte access; National Semiconductor PC16550D datasheet)
//! | off | DLAB=0 read | DLAB=0 write | DLAB=1 |
//! |---|---|---|---|
//! | 0 | RBR receive buffer | THR transmit holding | DLL |
//! | 1 | IER | IER | DLM |
//! | 2 | IIR | FCR | — |
//! | 3 | LCR | LCR | |
//! | 4 | MCR | MCR | |
//! | 5 | LSR | — | |
//! | 6 | MSR | — | |
//! | 7 | SCR | SCR | |
//!
//! Interrupts are level-triggered on INTx: the line is high while an enabled condition is
//! pending (receiver line status, received data or timeout, THR empty, modem status, in
//! that priority). Transmitted bytes go to the host backend at once; if the backend falls
//! behind, THR stays full, so the guest sees flow control instead of lost bytes. Received
//! bytes come from the backend into a 16-byte FIFO and are only read from the backend when
//! the FIFO has room, so nothing is overrun.
//!
//! # Host backend (`backend=` option)
//! - `socket:PATH`: vfud listens on PATH; one host client at a time reads what the guest
//!   writes and writes what the guest reads. Output made while no client is connected is kept
//!   (up to 1 MiB) and delivered on connect.
//! - `file:PATH`: guest output is appended to PATH; no input.
//! - `stdout`: guest output goes to vfud's standard output; no input.

mod backend;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::os::fd::{OwnedFd, RawFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vfud_server::{
    BarIndex, BarSpec, ConfigView, Device, DeviceCtx, DeviceDescription, DeviceError, DeviceState,
    HostIo, IrqLayout, Migratable, PciIds,
};

pub use backend::Backend;

/// FIFO depth of a 16550A.
pub const FIFO_SIZE: usize = 16;
/// Most guest output held for a slow or absent host reader before THR stops emptying.
pub const OUTPUT_HIGH_WATER: usize = 1 << 20;

const RBR: u64 = 0;
const IER: u64 = 1;
const IIR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_RLSI: u8 = 0x04;
const IER_MSI: u8 = 0x08;
const IIR_NO_INT: u8 = 0x01;
const IIR_MSI: u8 = 0x00;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_CTI: u8 = 0x0c;
const IIR_FIFO_ENABLED: u8 = 0xc0;
const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;
const FCR_CLEAR_TX: u8 = 0x04;
const LCR_DLAB: u8 = 0x80;
const MCR_LOOP: u8 = 0x10;
const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_DCD: u8 = 0x80;

pub(crate) const TOKEN_LISTENER: u32 = 0;
pub(crate) const TOKEN_CONN: u32 = 1;

/// Version of [`UartState`].
pub const STATE_VERSION: u16 = 1;

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

/// Migration state: registers plus the bytes in flight between guest and host, so a
/// migration loses and reorders nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// Registers and receive FIFO.
    pub regs: UartRegs,
    /// Guest output not yet taken by the host.
    pub out: Vec<u8>,
    /// Host input not yet in the FIFO.
    pub input: Vec<u8>,
}

/// The device.
#[derive(Debug)]
pub struct Uart16550 {
    regs: UartRegs,
    backend: Backend,
    /// Guest output not yet accepted by the backend.
    out: VecDeque<u8>,
    /// Host input not yet in the FIFO.
    input: VecDeque<u8>,
    input_eof: bool,
}

impl Uart16550 {
    /// A UART with the given backend.
    pub fn new(backend: Backend) -> Self {
        Self {
            regs: UartRegs {
                thre_pending: false,
                ..UartRegs::default()
            },
            backend,
            out: VecDeque::new(),
            input: VecDeque::new(),
            input_eof: false,
        }
    }

    fn rx_trigger(&self) -> usize {
        if self.regs.fcr & FCR_ENABLE == 0 {
            return 1;
        }
        [1, 4, 8, 14][usize::from(self.regs.fcr >> 6)]
    }

    fn fifo_cap(&self) -> usize {
        if self.regs.fcr & FCR_ENABLE != 0 {
            FIFO_SIZE
        } else {
            1
        }
    }

    fn thr_empty(&self) -> bool {
        self.out.len() < OUTPUT_HIGH_WATER
    }

    fn lsr(&self) -> u8 {
        let mut v = self.regs.lsr_latched;
        if !self.regs.rx_fifo.is_empty() {
            v |= LSR_DR;
        }
        if self.thr_empty() {
            v |= LSR_THRE | LSR_TEMT;
        }
        v
    }

    fn msr(&self) -> u8 {
        if self.regs.mcr & MCR_LOOP != 0 {
            // Loopback: DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
            let m = self.regs.mcr;
            ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
        } else {
            MSR_CTS | MSR_DSR | MSR_DCD | self.regs.msr_delta
        }
    }

    /// The highest-priority pending interrupt, as IIR reports it.
    fn pending_iir(&self) -> u8 {
        let r = &self.regs;
        if r.ier & IER_RLSI != 0 && r.lsr_latched & LSR_OE != 0 {
            IIR_RLSI
        } else if r.ier & IER_RDI != 0 && !r.rx_fifo.is_empty() {
            if r.rx_fifo.len() >= self.rx_trigger() {
                IIR_RDI
            } else {
                IIR_CTI
            }
        } else if r.ier & IER_THRI != 0 && r.thre_pending {
            IIR_THRI
        } else if r.ier & IER_MSI != 0 && r.msr_delta & 0x0f != 0 {
            IIR_MSI
        } else {
            IIR_NO_INT
        }
    }

    fn update_irq(&self, cx: &mut DeviceCtx<'_>) {
        cx.set_intx(self.pending_iir() != IIR_NO_INT);
    }

    /// Move host input into the FIFO while there is room; read more from the backend.
    fn refill(&mut self) {
        let cap = self.fifo_cap();
        loop {
            while self.regs.rx_fifo.len() < cap {
                match self.input.pop_front() {
                    Some(b) => self.regs.rx_fifo.push_back(b),
                    None => break,
                }
            }
            if self.regs.rx_fifo.len() >= cap || self.input_eof {
                return;
            }
            let before = self.input.len();
            self.input_eof |= self.backend.read_in(&mut self.input, before + 4096);
            if self.input.len() == before {
                return;
            }
        }
    }

    /// Push buffered guest output to the backend as far as it takes it.
    fn flush(&mut self) {
        self.backend.write_out(&mut self.out);
    }

    fn transmit(&mut self, byte: u8) {
        if self.regs.mcr & MCR_LOOP != 0 {
            if self.regs.rx_fifo.len() < self.fifo_cap() {
                self.regs.rx_fifo.push_back(byte);
            } else {
                self.regs.lsr_latched |= LSR_OE;
            }
            return;
        }
        self.out.push_back(byte);
        self.flush();
    }
}

impl Device for Uart16550 {
    fn describe(&self) -> DeviceDescription {
        DeviceDescription::new("uart16550", PciIds::new(0x5646, 0x0002, 0x07_00_02))
            .bar(0, BarSpec::io(8))
            .irqs(IrqLayout::intx())
    }

    fn bar_read(
        &mut self,
        _bar: BarIndex,
        offset: u64,
        data: &mut [u8],
        cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        for (i, b) in data.iter_mut().enumerate() {
            let dlab = self.regs.lcr & LCR_DLAB != 0;
            *b = match (offset + i as u64, dlab) {
                (RBR, true) => self.regs.divisor as u8,
                (IER, true) => (self.regs.divisor >> 8) as u8,
                (RBR, false) => {
                    let v = self.regs.rx_fifo.pop_front().unwrap_or(0);
                    self.refill();
                    v
                }
                (IER, false) => self.regs.ier,
                (IIR, _) => {
                    let iir = self.pending_iir();
                    if iir == IIR_THRI {
                        self.regs.thre_pending = false;
                    }
                    let fifo = if self.regs.fcr & FCR_ENABLE != 0 {
                        IIR_FIFO_ENABLED
                    } else {
                        0
                    };
                    iir | fifo
                }
                (LCR, _) => self.regs.lcr,
                (MCR, _) => self.regs.mcr,
                (LSR, _) => {
                    let v = self.lsr();
                    self.regs.lsr_latched = 0;
                    v
                }
                (MSR, _) => {
                    let v = self.msr();
                    self.regs.msr_delta = 0;
                    v
                }
                (SCR, _) => self.regs.scr,
                _ => 0xff,
            };
        }
        self.update_irq(cx);
        Ok(())
    }

    fn bar_write(
        &mut self,
        _bar: BarIndex,
        offset: u64,
        data: &[u8],
        cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        for (i, v) in data.iter().copied().enumerate() {
            let dlab = self.regs.lcr & LCR_DLAB != 0;
            match (offset + i as u64, dlab) {
                (RBR, true) => self.regs.divisor = (self.regs.divisor & 0xff00) | u16::from(v),
                (IER, true) => {
                    self.regs.divisor = (self.regs.divisor & 0x00ff) | (u16::from(v) << 8)
                }
                (RBR, false) => {
                    self.transmit(v);
                    // The byte left THR at once unless the backend is backed up.
                    self.regs.thre_pending = self.thr_empty();
                }
                (IER, false) => {
                    let was = self.regs.ier;
                    self.regs.ier = v & 0x0f;
                    // Enabling THRI while THR is empty raises it (as the 16550 does).
                    if v & IER_THRI != 0 && was & IER_THRI == 0 && self.thr_empty() {
                        self.regs.thre_pending = true;
                    }
                }
                (IIR, _) => {
                    if v & FCR_CLEAR_RX != 0 {
                        self.regs.rx_fifo.clear();
                    }
                    if v & FCR_CLEAR_TX != 0 {
                        // Bytes already handed to the host are not recalled.
                    }
                    self.regs.fcr = v & 0xc1;
                    self.refill();
                }
                (LCR, _) => self.regs.lcr = v,
                (MCR, _) => self.regs.mcr = v & 0x1f,
                (SCR, _) => self.regs.scr = v,
                _ => {} // LSR/MSR writes are ignored
            }
        }
        self.update_irq(cx);
        Ok(())
    }

    fn reset(&mut self, cx: &mut DeviceCtx<'_>) {
        self.regs = UartRegs::default();
        self.update_irq(cx);
    }

    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        Some(self)
    }

    fn host_io(&mut self) -> Option<&mut dyn HostIo> {
        Some(self)
    }
}

impl Migratable for Uart16550 {
    fn quiesce(&mut self) {
        self.input_eof |= self.backend.read_in(&mut self.input, usize::MAX);
    }

    fn save(&mut self) -> Result<DeviceState, DeviceError> {
        DeviceState::encode(
            STATE_VERSION,
            &UartState {
                regs: self.regs.clone(),
                out: self.out.iter().copied().collect(),
                input: self.input.iter().copied().collect(),
            },
        )
    }

    fn load(
        &mut self,
        state: &DeviceState,
        _config: Option<&ConfigView<'_>>,
    ) -> Result<(), DeviceError> {
        let st: UartState = state.decode(STATE_VERSION)?;
        if st.regs.rx_fifo.len() > FIFO_SIZE {
            return Err(DeviceError::InvalidState(
                "receive FIFO longer than 16 bytes".into(),
            ));
        }
        self.regs = st.regs;
        self.out = st.out.into();
        self.input = st.input.into();
        self.flush();
        Ok(())
    }
}

impl HostIo for Uart16550 {
    fn event_fds(&self) -> Vec<(RawFd, u32)> {
        self.backend.event_fds()
    }

    fn on_event(&mut self, token: u32, cx: &mut DeviceCtx<'_>) -> Result<(), DeviceError> {
        if token == TOKEN_LISTENER && self.backend.accept()? {
            self.input_eof = false;
            self.flush();
        }
        // Edge-triggered: drain what fits, remember the rest in `input`.
        self.refill();
        self.input_eof |= self.backend.read_in(&mut self.input, OUTPUT_HIGH_WATER);
        self.refill();
        self.update_irq(cx);
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        // Poll the backend while output is backed up or input waits for FIFO room.
        let waiting_out = !self.out.is_empty() && self.backend.connected();
        (waiting_out || !self.input.is_empty()).then(|| Instant::now() + Duration::from_millis(2))
    }

    fn on_timer(&mut self, cx: &mut DeviceCtx<'_>) {
        let was_full = !self.thr_empty();
        self.flush();
        if was_full && self.thr_empty() {
            self.regs.thre_pending = true;
        }
        self.refill();
        self.update_irq(cx);
    }

    fn export(&self) -> Option<(String, Vec<OwnedFd>)> {
        self.backend.export()
    }

    fn adopt(&mut self, desc: &str, fds: Vec<OwnedFd>) -> Result<(), DeviceError> {
        self.backend = Backend::adopt(desc, fds)?;
        Ok(())
    }

    fn release(&mut self) {
        self.backend.release();
    }
}
