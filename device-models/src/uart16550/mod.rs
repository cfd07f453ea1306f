//! `uart16550`: a 16550A-compatible UART behind PCI (class 0x070002, INTx), bound by Linux's
//! stock `8250_pci` driver.
//!
//! # Where the registers are (`bar=` option)
//! - `bar=mem` (default): the eight registers at offsets 0–7 of a 4 KiB memory BAR 0. QEMU
//!   posts writes to memory BARs (REGION_WRITE with NO_REPLY; `hw/vfio/pci.c`
//!   `vfio_bar_prepare`: "IO regions are sync, memory can be async"), so a THR write costs the
//!   guest no round trip. `8250_pci` binds a class-0x0700 function by class only when it has
//!   an I/O BAR (`serial_pci_guess_board` counts I/O BARs), so this function carries the ids
//!   of an entry in the driver's table for a plain 16550 at BAR 0 (`pbn_b0_1_115200`): Realtek
//!   RealManage, 10ec:816a. The subsystem ids 5646:0002 say it is vfud's UART.
//! - `bar=io`: an 8-byte I/O BAR 0 and ids 5646:0002, bound through the class match like
//!   QEMU's `pci-serial`. Every access, writes included, is a round trip.
//!
//! # Registers (byte access; National Semiconductor PC16550D datasheet)
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
//! # Interrupts
//! INTx is a level: high while an enabled condition is pending (receiver line status,
//! received data or timeout, THR empty, modem status, in that priority) — except while the
//! driver services it. QEMU (without KVM) ends an INTx at the first BAR access after it and
//! unmasks it then, long before the driver's handler is done; a line still high at that
//! moment fires again, and the guest later takes a second interrupt that finds nothing to do.
//! So the service window starts when IIR is read reporting an interrupt, and the line stays
//! low until IIR reads "none" (the 8250 handler loops until it does) or the driver has not
//! touched the UART for [`SERVICE_GRACE`]; a condition still pending then raises the line.
//! Register contents are never affected, only when the line rises.
//!
//! # Data paths
//! Guest output is buffered and handed to the host in batches: when the driver's handler is
//! done (IIR reads "none"), when it stops transmitting (IER clears THRI), at
//! [`FLUSH_SIZE`] bytes, and at most [`FLUSH_TICK`] after a byte was written. If the host
//! falls behind, THR stays full at [`OUTPUT_HIGH_WATER`], so the guest sees flow control
//! instead of lost bytes. Host input is read in 4 KiB chunks into a buffer and moved into the
//! 16-byte FIFO as it drains: outside a service window whenever the FIFO has room, inside one
//! for at most [`RX_BATCH`] more bytes (a byte arrives as soon as one is read, so the 8250
//! receive loop, one RBR and one LSR read per byte, keeps going), then not until the window
//! ends. Each batch is one interrupt, and a fast host cannot keep the guest in its interrupt
//! handler while its tty layer's buffers overflow.
//!
//! # Host backend (`backend=` option)
//! - `socket:PATH`: vfud listens on PATH; one host client at a time reads what the guest
//!   writes and writes what the guest reads. Output made while no client is connected is kept
//!   (up to 1 MiB) and delivered on connect.
//! - `file:PATH`: guest output is appended to PATH; no input.
//! - `stdout`: guest output goes to vfud's standard output; no input.

mod backend;
mod regs;
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
use regs::*;
pub use regs::{UartRegs, FIFO_SIZE};

/// Most guest output held for a slow or absent host reader before THR stops emptying.
pub const OUTPUT_HIGH_WATER: usize = 1 << 20;
/// Guest output handed to the host as soon as this much is buffered.
pub const FLUSH_SIZE: usize = 4096;
/// Longest time guest output waits in the buffer (and the retry period of a backed-up host).
pub const FLUSH_TICK: Duration = Duration::from_millis(1);
/// A service window with no register access for this long ends (see the module docs).
pub const SERVICE_GRACE: Duration = Duration::from_millis(2);
/// Bytes moved into the receive FIFO during one service window: the 8250 driver's receive
/// loop takes at most 256 characters per call (`serial8250_rx_chars`).
pub const RX_BATCH: usize = 256;

pub(crate) const TOKEN_LISTENER: u32 = 0;
pub(crate) const TOKEN_CONN: u32 = 1;

/// Version of [`UartState`].
pub const STATE_VERSION: u16 = 1;

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

/// Which BAR holds the registers (see the module docs for the ids each one carries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RegisterBar {
    /// A memory BAR: posted register writes.
    #[default]
    Mem,
    /// An I/O BAR: every access waits for vfud.
    Io,
}

impl RegisterBar {
    /// Parse the `bar=` option.
    pub fn parse(v: &str) -> Result<Self, DeviceError> {
        match v {
            "mem" => Ok(Self::Mem),
            "io" => Ok(Self::Io),
            _ => Err(DeviceError::Other(format!(
                "option bar={v}: give mem or io"
            ))),
        }
    }
}

/// The device.
#[derive(Debug)]
pub struct Uart16550 {
    regs: UartRegs,
    backend: Backend,
    bar: RegisterBar,
    /// Guest output not yet accepted by the backend.
    out: VecDeque<u8>,
    /// When `out` is next offered to the backend by the timer (set while `out` is not empty).
    flush_at: Option<Instant>,
    /// Host input not yet in the FIFO.
    input: VecDeque<u8>,
    input_eof: bool,
    /// While the driver services an interrupt: when the window ends if the UART is left alone.
    service_until: Option<Instant>,
    /// Bytes moved into the FIFO during the current service window.
    window_rx: usize,
}

impl Uart16550 {
    /// A UART with the given backend, its registers in a memory BAR.
    pub fn new(backend: Backend) -> Self {
        Self {
            regs: UartRegs::default(),
            backend,
            bar: RegisterBar::default(),
            out: VecDeque::new(),
            flush_at: None,
            input: VecDeque::new(),
            input_eof: false,
            service_until: None,
            window_rx: 0,
        }
    }

    /// The same UART with its registers in `bar`.
    pub fn with_bar(mut self, bar: RegisterBar) -> Self {
        self.bar = bar;
        self
    }

    fn thr_empty(&self) -> bool {
        self.out.len() < OUTPUT_HIGH_WATER
    }

    /// The INTx level: a pending interrupt outside a service window.
    fn line(&self) -> bool {
        self.service_until.is_none() && self.regs.pending_iir() != IIR_NO_INT
    }

    fn update_irq(&self, cx: &mut DeviceCtx<'_>) {
        cx.set_intx(self.line());
    }

    /// Keep an open service window open: the driver is still at work.
    fn touch(&mut self) {
        if self.service_until.is_some() {
            self.service_until = Some(Instant::now() + SERVICE_GRACE);
        }
    }

    /// The driver's handler is done (or gone): hand output over, refill the FIFO.
    fn end_service(&mut self) {
        self.service_until = None;
        self.flush();
        self.refill();
    }

    /// Move host input into the FIFO while there is room (inside a service window, up to
    /// [`RX_BATCH`] bytes); read more from the backend.
    fn refill(&mut self) {
        let cap = self.regs.fifo_cap();
        let in_window = self.service_until.is_some();
        loop {
            while self.regs.rx_fifo.len() < cap && !(in_window && self.window_rx >= RX_BATCH) {
                match self.input.pop_front() {
                    Some(b) => {
                        self.regs.rx_fifo.push_back(b);
                        self.window_rx += usize::from(in_window);
                    }
                    None => break,
                }
            }
            let budget_spent = in_window && self.window_rx >= RX_BATCH;
            if self.regs.rx_fifo.len() >= cap || budget_spent || self.input_eof {
                return;
            }
            let before = self.input.len();
            self.input_eof |= self.backend.read_in(&mut self.input, before + 4096);
            if self.input.len() == before {
                return;
            }
        }
    }

    /// Offer buffered guest output to the backend; what it does not take is retried a tick
    /// later.
    fn flush(&mut self) {
        self.backend.write_out(&mut self.out);
        self.flush_at = (!self.out.is_empty()).then(|| Instant::now() + FLUSH_TICK);
    }

    fn transmit(&mut self, byte: u8) {
        if self.regs.loopback() {
            if self.regs.rx_fifo.len() < self.regs.fifo_cap() {
                self.regs.rx_fifo.push_back(byte);
            } else {
                self.regs.lsr_latched |= LSR_OE;
            }
            return;
        }
        self.out.push_back(byte);
        if self.out.len() >= FLUSH_SIZE {
            self.flush();
        } else if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + FLUSH_TICK);
        }
    }

    fn read_reg(&mut self, reg: u64) -> u8 {
        match (reg, self.regs.dlab()) {
            (RBR, true) => self.regs.divisor as u8,
            (IER, true) => (self.regs.divisor >> 8) as u8,
            (RBR, false) => {
                let v = self.regs.rx_fifo.pop_front().unwrap_or(0);
                self.refill();
                v
            }
            (IER, false) => self.regs.ier,
            (IIR, _) => {
                let iir = self.regs.pending_iir();
                if iir == IIR_THRI {
                    self.regs.thre_pending = false;
                }
                let fifo = self.regs.iir_fifo_bits();
                if iir == IIR_NO_INT {
                    self.end_service();
                } else {
                    if self.service_until.is_none() {
                        self.window_rx = 0;
                    }
                    self.service_until = Some(Instant::now() + SERVICE_GRACE);
                }
                iir | fifo
            }
            (LCR, _) => self.regs.lcr,
            (MCR, _) => self.regs.mcr,
            (LSR, _) => {
                let v = self.regs.lsr(self.thr_empty());
                self.regs.lsr_latched = 0;
                v
            }
            (MSR, _) => {
                let v = self.regs.msr();
                self.regs.msr_delta = 0;
                v
            }
            (SCR, _) => self.regs.scr,
            _ => 0xff,
        }
    }

    fn write_reg(&mut self, reg: u64, v: u8) {
        match (reg, self.regs.dlab()) {
            (RBR, true) => self.regs.divisor = (self.regs.divisor & 0xff00) | u16::from(v),
            (IER, true) => self.regs.divisor = (self.regs.divisor & 0x00ff) | (u16::from(v) << 8),
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
                // The driver stops transmitting: its buffer is drained, so is ours.
                if v & IER_THRI == 0 && was & IER_THRI != 0 {
                    self.flush();
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
}

impl Device for Uart16550 {
    fn describe(&self) -> DeviceDescription {
        let (ids, bar) = match self.bar {
            RegisterBar::Io => (PciIds::new(0x5646, 0x0002, 0x07_00_02), BarSpec::io(8)),
            RegisterBar::Mem => {
                let mut ids = PciIds::new(0x10ec, 0x816a, 0x07_00_02);
                (ids.subsystem_vendor, ids.subsystem) = (0x5646, 0x0002);
                (ids, BarSpec::mem32(4096))
            }
        };
        DeviceDescription::new("uart16550", ids)
            .bar(0, bar)
            .irqs(IrqLayout::intx())
    }

    fn bar_read(
        &mut self,
        _bar: BarIndex,
        offset: u64,
        data: &mut [u8],
        cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        self.touch();
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_reg(offset + i as u64);
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
        self.touch();
        for (i, v) in data.iter().copied().enumerate() {
            self.write_reg(offset + i as u64, v);
        }
        self.update_irq(cx);
        Ok(())
    }

    fn reset(&mut self, cx: &mut DeviceCtx<'_>) {
        self.regs = UartRegs::default();
        self.service_until = None;
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

    /// The 8250 driver keeps IER in a shadow and writes it only when a bit changes: if it
    /// enabled the THR-empty interrupt after the checkpoint, it now waits for an interrupt
    /// the restored IER will never raise, and output stalls for good. So while the port is
    /// open (receive interrupts on), enable it and report THR empty: a driver with nothing to
    /// send answers that interrupt by disabling it again.
    fn restored_after_crash(&mut self) {
        if self.regs.ier & IER_RDI != 0 {
            self.regs.ier |= IER_THRI;
            self.regs.thre_pending = true;
        }
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
        // The source may have been inside a service window (its line low with an interrupt
        // pending): resume as if it were, so the timer raises what the driver leaves pending.
        self.service_until = Some(Instant::now() + SERVICE_GRACE);
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
        let flush = self.flush_at.filter(|_| self.backend.connected());
        // Safety net: input waiting for FIFO room outside a service window.
        let waiting = self.service_until.is_none()
            && !self.input.is_empty()
            && self.regs.rx_fifo.len() < self.regs.fifo_cap();
        let poll = waiting.then(|| Instant::now() + FLUSH_TICK);
        [flush, self.service_until, poll]
            .into_iter()
            .flatten()
            .min()
    }

    fn on_timer(&mut self, cx: &mut DeviceCtx<'_>) {
        let now = Instant::now();
        let was_full = !self.thr_empty();
        if self.service_until.is_some_and(|t| now >= t) {
            self.end_service();
        }
        if self.flush_at.is_some_and(|t| now >= t) {
            self.flush();
        }
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
