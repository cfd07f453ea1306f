//! Interrupts: INTx, MSI, MSI-X, ERR and REQ as the client configures them with
//! DEVICE_SET_IRQS (spec "VFIO_USER_DEVICE_SET_IRQS"; kernel `vfio.h` `VFIO_DEVICE_SET_IRQS`).
//!
//! The client hands the server one trigger eventfd per vector; raising an interrupt writes 1
//! to it. Like vfio-pci, one index delivers device interrupts at a time: MSI-X when it has
//! eventfds, else MSI, else INTx. Masked vectors latch a pending bit (served in the MSI-X PBA)
//! and fire when unmasked. INTx is automasked: after it fires it stays masked until the client
//! unmasks it (SET_IRQS UNMASK, or a write to the unmask/resample eventfd).
//!
//! [`Interrupts::validate`] checks a request against the layout without side effects;
//! [`Interrupts::apply`] performs it. The split lets migration validate at once and apply later.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use vfud_protocol::messages::irq::{
    IrqInfo, IRQ_INDEX_COUNT, IRQ_INDEX_ERR, IRQ_INDEX_INTX, IRQ_INDEX_MSI, IRQ_INDEX_MSIX,
    IRQ_INDEX_REQ, IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE,
};
use vfud_protocol::messages::{IrqAction, IrqData, SetIrqs};

use crate::device::IrqLayout;
use crate::error::IrqError;

/// State of one IRQ index.
#[derive(Debug, Default)]
struct IndexState {
    count: u32,
    flags: u32,
    triggers: Vec<Option<OwnedFd>>,
    masked: Vec<bool>,
    pending: Vec<bool>,
}

impl IndexState {
    fn new(count: u32, flags: u32) -> Self {
        let n = count as usize;
        Self {
            count,
            flags,
            triggers: (0..n).map(|_| None).collect(),
            masked: vec![false; n],
            pending: vec![false; n],
        }
    }

    fn has_triggers(&self) -> bool {
        self.triggers.iter().any(Option::is_some)
    }

    fn clear(&mut self) {
        self.triggers.iter_mut().for_each(|t| *t = None);
        self.masked.iter_mut().for_each(|m| *m = false);
        self.pending.iter_mut().for_each(|p| *p = false);
    }
}

fn signal(fd: &OwnedFd) -> bool {
    matches!(
        nix::unistd::write(fd.as_fd(), &1u64.to_ne_bytes()),
        Ok(8) | Err(Errno::EAGAIN)
    )
}

/// All interrupt state of a device.
#[derive(Debug)]
pub struct Interrupts {
    idx: Vec<IndexState>,
    intx_unmask_fd: Option<OwnedFd>,
    intx_level: bool,
    intx_disabled: bool,
    dropped: u64,
    delivered: u64,
    hold: bool,
}

impl Interrupts {
    /// Interrupt state for a layout.
    pub fn new(layout: &IrqLayout) -> Self {
        let mut idx: Vec<IndexState> = (0..IRQ_INDEX_COUNT)
            .map(|_| IndexState::default())
            .collect();
        idx[IRQ_INDEX_INTX as usize] = IndexState::new(
            u32::from(layout.intx),
            IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
        );
        idx[IRQ_INDEX_MSI as usize] =
            IndexState::new(layout.msi_vectors, IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE);
        idx[IRQ_INDEX_MSIX as usize] = IndexState::new(
            layout.msix.map(|(n, _)| n).unwrap_or(0),
            IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE,
        );
        idx[IRQ_INDEX_ERR as usize] = IndexState::new(u32::from(layout.err), IRQ_INFO_EVENTFD);
        idx[IRQ_INDEX_REQ as usize] = IndexState::new(u32::from(layout.req), IRQ_INFO_EVENTFD);
        Self {
            idx,
            intx_unmask_fd: None,
            intx_level: false,
            intx_disabled: false,
            dropped: 0,
            delivered: 0,
            hold: false,
        }
    }

    /// DEVICE_GET_IRQ_INFO for `index`.
    pub fn info(&self, index: u32) -> Result<IrqInfo, IrqError> {
        let s = self
            .idx
            .get(index as usize)
            .ok_or(IrqError::NoIndex(index))?;
        Ok(IrqInfo {
            argsz: 16,
            flags: s.flags,
            index,
            count: s.count,
        })
    }

    /// Check a SET_IRQS against the layout, without side effects.
    pub fn validate(&self, s: &SetIrqs) -> Result<(), IrqError> {
        let st = self
            .idx
            .get(s.index as usize)
            .ok_or(IrqError::NoIndex(s.index))?;
        if s.is_disable() {
            return Ok(());
        }
        let end = s.start.saturating_add(s.count);
        if end > st.count {
            return Err(IrqError::OutOfRange {
                index: s.index,
                start: s.start,
                end,
                count: st.count,
            });
        }
        let is_err_req = s.index == IRQ_INDEX_ERR || s.index == IRQ_INDEX_REQ;
        if is_err_req && s.action != IrqAction::Trigger {
            return Err(IrqError::TriggerOnly);
        }
        match (s.action, &s.data) {
            (IrqAction::Mask | IrqAction::Unmask, _) if st.flags & IRQ_INFO_MASKABLE == 0 => {
                Err(IrqError::NotMaskable(s.index))
            }
            (IrqAction::Unmask, IrqData::Eventfds(fds)) => {
                if s.index != IRQ_INDEX_INTX || s.count != 1 || fds.len() > 1 {
                    Err(IrqError::UnmaskFdNotIntx)
                } else {
                    Ok(())
                }
            }
            (IrqAction::Mask, IrqData::Eventfds(_)) => Err(IrqError::MaskFd),
            _ => Ok(()),
        }
    }

    /// Perform a validated SET_IRQS.
    pub fn apply(&mut self, s: SetIrqs) -> Result<(), IrqError> {
        self.validate(&s)?;
        let index = s.index;
        if s.is_disable() {
            self.idx[index as usize].clear();
            if index == IRQ_INDEX_INTX {
                self.intx_unmask_fd = None;
            }
            return Ok(());
        }
        let range = s.start as usize..(s.start + s.count) as usize;
        let pick = |data: &IrqData, i: usize| match data {
            IrqData::Bool(v) => v.get(i).copied().unwrap_or(false),
            _ => true,
        };
        match (s.action, s.data) {
            (IrqAction::Trigger, IrqData::Eventfds(fds)) => {
                let st = &mut self.idx[index as usize];
                if fds.is_empty() {
                    for i in range {
                        st.triggers[i] = None;
                    }
                } else {
                    for (i, fd) in range.zip(fds) {
                        st.triggers[i] = Some(fd);
                    }
                }
                self.flush_pending(index);
            }
            (IrqAction::Trigger, data) => {
                for (n, v) in range.enumerate() {
                    if pick(&data, n) {
                        self.fire(index, v as u32);
                    }
                }
            }
            (IrqAction::Unmask, IrqData::Eventfds(mut fds)) => {
                self.intx_unmask_fd = fds.pop();
            }
            (IrqAction::Mask, data) => {
                for (n, v) in range.enumerate() {
                    if pick(&data, n) {
                        self.idx[index as usize].masked[v] = true;
                    }
                }
            }
            (IrqAction::Unmask, data) => {
                for (n, v) in range.enumerate() {
                    if pick(&data, n) {
                        if index == IRQ_INDEX_INTX {
                            self.unmask_intx();
                        } else {
                            self.idx[index as usize].masked[v] = false;
                        }
                    }
                }
                self.flush_pending(index);
            }
        }
        Ok(())
    }

    /// Deliver vector `v` of `index` now, or latch it as pending when masked or unassigned.
    fn fire(&mut self, index: u32, v: u32) {
        let st = &mut self.idx[index as usize];
        let i = v as usize;
        if i >= st.triggers.len() {
            tracing::warn!(index, vector = v, "interrupt vector out of range dropped");
            self.dropped += 1;
            return;
        }
        let intx_blocked = index == IRQ_INDEX_INTX && self.intx_disabled;
        if st.masked[i] || intx_blocked || self.hold {
            st.pending[i] = true;
            return;
        }
        match &st.triggers[i] {
            Some(fd) if signal(fd) => {
                self.delivered += 1;
                st.pending[i] = false;
                if index == IRQ_INDEX_INTX {
                    // Automask: INTx stays masked until the client unmasks it.
                    st.masked[i] = true;
                }
            }
            _ => {
                st.pending[i] = true;
                self.dropped += 1;
                tracing::debug!(index, vector = v, "no eventfd for interrupt; kept pending");
            }
        }
    }

    fn flush_pending(&mut self, index: u32) {
        let n = self.idx[index as usize].count;
        for v in 0..n {
            let st = &self.idx[index as usize];
            let i = v as usize;
            if st.pending[i] && !st.masked[i] && st.triggers[i].is_some() {
                self.fire(index, v);
            }
        }
    }

    /// While held, every interrupt is latched as pending; releasing delivers what is pending
    /// and unmasked. Used to apply a batch of deferred SET_IRQS as one step.
    pub fn set_hold(&mut self, hold: bool) {
        self.hold = hold;
        if !hold {
            for index in 0..IRQ_INDEX_COUNT {
                self.flush_pending(index);
            }
        }
    }

    /// Which index delivers device interrupts now.
    pub fn active_index(&self) -> Option<u32> {
        [IRQ_INDEX_MSIX, IRQ_INDEX_MSI, IRQ_INDEX_INTX]
            .into_iter()
            .find(|i| self.idx[*i as usize].has_triggers())
    }

    /// Raise device interrupt `vector` in the active mode. Without MSI/MSI-X this asserts the
    /// INTx line, which stays asserted (PCI STATUS bit 3) until the device lowers it with
    /// [`Interrupts::set_intx_level`]`(false)` when the guest acknowledges the event: INTx is
    /// level-triggered (PCI 3.0 §2.2.6), and drivers of shared or generic INTx
    /// (`uio_pci_generic`, a nested `vfio-pci`) claim an interrupt by that status bit.
    pub fn raise(&mut self, vector: u32) {
        match self.active_index() {
            Some(IRQ_INDEX_INTX) | None if self.idx[IRQ_INDEX_INTX as usize].count > 0 => {
                self.set_intx_level(true)
            }
            Some(index) => self.fire(index, vector),
            None => {
                self.dropped += 1;
                tracing::debug!(vector, "no interrupt mode enabled; interrupt dropped");
            }
        }
    }

    /// Set the level of the INTx line. A rising or held level fires when unmasked.
    pub fn set_intx_level(&mut self, level: bool) {
        self.intx_level = level;
        if level && self.idx[IRQ_INDEX_INTX as usize].count > 0 {
            let st = &self.idx[IRQ_INDEX_INTX as usize];
            if !st.masked[0]
                && self.active_index() != Some(IRQ_INDEX_MSIX)
                && self.active_index() != Some(IRQ_INDEX_MSI)
            {
                self.fire(IRQ_INDEX_INTX, 0);
            }
        } else if !level {
            if let Some(p) = self.idx[IRQ_INDEX_INTX as usize].pending.get_mut(0) {
                *p = false;
            }
        }
    }

    /// PCI 2.3 Interrupt Status (STATUS bit 3): the device's INTx signal, whatever COMMAND's
    /// Interrupt Disable says; a device delivering MSI or MSI-X does not assert INTx.
    pub fn intx_status(&self) -> bool {
        self.intx_level
            && self.idx[IRQ_INDEX_INTX as usize].count > 0
            && !matches!(
                self.active_index(),
                Some(IRQ_INDEX_MSIX) | Some(IRQ_INDEX_MSI)
            )
    }

    /// Unmask INTx: refire if the line is still asserted or an edge is pending.
    pub fn unmask_intx(&mut self) {
        let Some(st) = self.idx.get_mut(IRQ_INDEX_INTX as usize) else {
            return;
        };
        if st.count == 0 {
            return;
        }
        st.masked[0] = false;
        if self.intx_level || st.pending[0] {
            self.fire(IRQ_INDEX_INTX, 0);
        }
    }

    /// Command-register INTx Disable (PCI 3.0 §6.2.2) gates INTx delivery.
    pub fn set_intx_disabled(&mut self, disabled: bool) {
        let was = self.intx_disabled;
        self.intx_disabled = disabled;
        if was && !disabled {
            self.flush_pending(IRQ_INDEX_INTX);
        }
    }

    /// The INTx unmask (resample) eventfd the event loop must watch.
    pub fn intx_unmask_fd(&self) -> Option<RawFd> {
        self.intx_unmask_fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// Drain the unmask eventfd after it became readable, then unmask.
    pub fn on_intx_unmask_event(&mut self) {
        if let Some(fd) = &self.intx_unmask_fd {
            let mut b = [0u8; 8];
            let _ = nix::unistd::read(fd.as_fd(), &mut b);
        }
        self.unmask_intx();
    }

    /// Mask or unmask one MSI-X vector from its table vector-control word.
    pub fn set_msix_masked(&mut self, vector: u32, masked: bool) {
        if let Some(m) = self.idx[IRQ_INDEX_MSIX as usize]
            .masked
            .get_mut(vector as usize)
        {
            *m = masked;
        }
        if !masked {
            self.flush_pending(IRQ_INDEX_MSIX);
        }
    }

    /// MSI-X pending-bit array bytes at `offset` (PBA reads are forwarded to the server).
    pub fn read_pba(&self, offset: u64, buf: &mut [u8]) {
        let pending = &self.idx[IRQ_INDEX_MSIX as usize].pending;
        for (i, b) in buf.iter_mut().enumerate() {
            let byte = offset as usize + i;
            *b = (0..8).fold(0u8, |acc, bit| {
                let v = byte * 8 + bit;
                acc | (u8::from(pending.get(v).copied().unwrap_or(false)) << bit)
            });
        }
    }

    /// Whether vector `v` of `index` is pending.
    pub fn is_pending(&self, index: u32, v: u32) -> bool {
        self.idx
            .get(index as usize)
            .and_then(|s| s.pending.get(v as usize))
            .copied()
            .unwrap_or(false)
    }

    /// The checks that can only be made when a SET_IRQS takes effect: every fd must be an
    /// eventfd (the kernel's `eventfd_ctx_fdget` check). Deferred SET_IRQS run these for the
    /// whole queue before applying any of it.
    pub fn check_apply(s: &SetIrqs) -> Result<(), IrqError> {
        if let IrqData::Eventfds(fds) = &s.data {
            for fd in fds {
                let link = fd_target(fd.as_raw_fd());
                if link != "anon_inode:[eventfd]" {
                    return Err(IrqError::NotEventfd {
                        index: s.index,
                        what: link,
                    });
                }
            }
        }
        Ok(())
    }

    /// Pending bits of every index, for the migration stream: `u32 count, count × u8` per index.
    pub fn save_pending(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for st in &self.idx {
            out.extend((st.pending.len() as u32).to_le_bytes());
            out.extend(st.pending.iter().map(|p| u8::from(*p)));
        }
        out.push(u8::from(self.intx_level));
        // MSI-X vector masks: a client may mask a vector through the table rather than
        // SET_IRQS, which a VMM does not replay. INTx's automask is not carried: the
        // destination's VMM starts with the line handled.
        let msix = &self.idx[IRQ_INDEX_MSIX as usize].masked;
        out.extend(msix.iter().map(|m| u8::from(*m)));
        out
    }

    /// Restore state saved by [`Interrupts::save_pending`]: pending bits (delivered when the
    /// vectors are assigned and unmasked), the INTx level and MSI-X masks.
    pub fn restore_pending(&mut self, b: &[u8]) -> Result<(), IrqError> {
        let bad = |m: &str| IrqError::BadState(m.to_string());
        let mut off = 0usize;
        let mut all = Vec::new();
        for st in &self.idx {
            let n = b
                .get(off..off + 4)
                .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]) as usize)
                .ok_or_else(|| bad("truncated"))?;
            if n != st.pending.len() {
                return Err(IrqError::BadState(format!(
                    "{n} vectors, the device has {}",
                    st.pending.len()
                )));
            }
            let bits = b
                .get(off + 4..off + 4 + n)
                .ok_or_else(|| bad("truncated"))?;
            all.push(bits.iter().map(|x| *x != 0).collect::<Vec<_>>());
            off += 4 + n;
        }
        let level = *b.get(off).ok_or_else(|| bad("truncated"))? != 0;
        off += 1;
        let n = self.idx[IRQ_INDEX_MSIX as usize].masked.len();
        let masks = b.get(off..off + n).ok_or_else(|| bad("truncated"))?;
        if off + n != b.len() {
            return Err(bad("trailing bytes"));
        }
        for (st, bits) in self.idx.iter_mut().zip(all) {
            st.pending = bits;
        }
        self.intx_level = level;
        for (m, v) in self.idx[IRQ_INDEX_MSIX as usize]
            .masked
            .iter_mut()
            .zip(masks)
        {
            *m = *v != 0;
        }
        Ok(())
    }

    /// Drop every eventfd and all mask/pending state (reset, disconnect).
    pub fn disable_all(&mut self) {
        self.idx.iter_mut().for_each(IndexState::clear);
        self.intx_unmask_fd = None;
        self.intx_level = false;
    }

    /// The client's interrupt setup as SET_IRQS requests with duplicated fds, in an order that
    /// rebuilds it: trigger eventfds per vector, then masks, then the INTx unmask eventfd.
    pub fn export(&self) -> std::io::Result<Vec<SetIrqs>> {
        let mut out = Vec::new();
        for (index, st) in self.idx.iter().enumerate() {
            for (v, fd) in st.triggers.iter().enumerate() {
                if let Some(fd) = fd {
                    out.push(SetIrqs {
                        index: index as u32,
                        start: v as u32,
                        count: 1,
                        action: IrqAction::Trigger,
                        data: IrqData::Eventfds(vec![fd.try_clone()?]),
                    });
                }
            }
        }
        for (index, st) in self.idx.iter().enumerate() {
            if index as u32 == IRQ_INDEX_INTX {
                continue; // INTx masking is automatic state, carried by the pending bits
            }
            for (v, m) in st.masked.iter().enumerate() {
                if *m {
                    out.push(SetIrqs {
                        index: index as u32,
                        start: v as u32,
                        count: 1,
                        action: IrqAction::Mask,
                        data: IrqData::None,
                    });
                }
            }
        }
        if let Some(fd) = &self.intx_unmask_fd {
            out.push(SetIrqs {
                index: IRQ_INDEX_INTX,
                start: 0,
                count: 1,
                action: IrqAction::Unmask,
                data: IrqData::Eventfds(vec![fd.try_clone()?]),
            });
        }
        Ok(out)
    }

    /// Interrupts delivered and dropped so far.
    pub fn counters(&self) -> (u64, u64) {
        (self.delivered, self.dropped)
    }
}

/// What `/proc/self/fd/N` names for `fd` (empty if unreadable). The lookup is relative to a
/// handle on this process's fd directory kept open for the process's life: a SET_IRQS of
/// 2 048 MSI-X eventfds checks every one, and walking `/proc/self/fd/N` from the root each
/// time cost about as much as the rest of the request (bench `msix-2048`).
fn fd_target(fd: RawFd) -> String {
    use std::sync::OnceLock;
    static FD_DIR: OnceLock<Option<OwnedFd>> = OnceLock::new();
    let dir = FD_DIR.get_or_init(|| {
        nix::fcntl::open(
            "/proc/self/fd",
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ok()
    });
    let name = fd.to_string();
    let target = match dir {
        Some(d) => nix::fcntl::readlinkat(d, name.as_str()),
        None => nix::fcntl::readlink(format!("/proc/self/fd/{name}").as_str()),
    };
    target
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
