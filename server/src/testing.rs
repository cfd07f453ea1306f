//! A socket-free test harness for device models: [`TestBench`] runs a device inside the real
//! dispatcher (the same routing, config space, MSI-X and migration code as `vfud serve`) with
//! in-memory guest RAM and interrupts recorded on eventfds, and
//! [`migration_roundtrip_tests!`](crate::migration_roundtrip_tests) gives every model the same
//! migration tests.
//!
//! ```
//! use vfud_server::testing::TestBench;
//! # use vfud_server::*;
//! # struct Nop;
//! # impl Device for Nop {
//! #     fn describe(&self) -> DeviceDescription {
//! #         DeviceDescription::new("nop", PciIds::new(1, 2, 0xff0000)).bar(0, BarSpec::mem32(16))
//! #     }
//! #     fn bar_read(&mut self, _: BarIndex, _: u64, d: &mut [u8], _: &mut DeviceCtx<'_>)
//! #         -> Result<(), DeviceError> { d.fill(7); Ok(()) }
//! #     fn bar_write(&mut self, _: BarIndex, _: u64, _: &[u8], _: &mut DeviceCtx<'_>)
//! #         -> Result<(), DeviceError> { Ok(()) }
//! # }
//! let mut bench = TestBench::new(Box::new(Nop));
//! assert_eq!(bench.read32(0, 0).unwrap(), 0x0707_0707);
//! ```

use std::os::fd::{AsFd, OwnedFd};

use nix::sys::eventfd::{EfdFlags, EventFd};
use vfud_protocol::codec::Frame;
use vfud_protocol::header::Command;
use vfud_protocol::messages::dma::{DmaAccess, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::region::PCI_CONFIG_REGION_INDEX;
use vfud_protocol::messages::version::{VersionMessage, PROTOCOL_MAJOR};
use vfud_protocol::messages::{
    DmaMap, IrqAction, IrqData, MigData, MigState, RegionAccess, Request, SetIrqs,
};

use zerocopy::FromBytes;

use crate::device::Device;
use crate::dispatch::{DeviceServer, ServerSettings};
use crate::error::RequestError;
use crate::DeviceState;

/// IOVA where the bench's guest RAM starts.
pub const RAM_BASE: u64 = 0x1000_0000;

/// How the bench's guest RAM reaches the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamMode {
    /// A memfd mapped by the server (QEMU with `memory-backend-memfd`).
    Fd,
    /// No fd: the server sends DMA_READ/DMA_WRITE, which the bench answers (QEMU's default).
    Socket,
}

enum Ram {
    Fd(OwnedFd),
    Socket(Vec<u8>),
}

/// A device under test with no socket. See the module docs.
pub struct TestBench {
    server: DeviceServer,
    ram: Ram,
    ram_size: usize,
    irqs: Vec<(u32, u32, EventFd)>,
}

fn expect_ok<T>(r: Result<T, RequestError>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {}", crate::error::chain(&e)))
}

impl TestBench {
    /// A negotiated session with 16 MiB of fd-backed RAM at [`RAM_BASE`].
    pub fn new(device: Box<dyn Device>) -> Self {
        Self::with_ram(device, RamMode::Fd, 16 << 20)
    }

    /// A negotiated session with `size` bytes of RAM at [`RAM_BASE`], reached as `mode` says.
    pub fn with_ram(device: Box<dyn Device>, mode: RamMode, size: usize) -> Self {
        let server = expect_ok(
            DeviceServer::new(device, ServerSettings::default()).map_err(RequestError::from),
            "device",
        );
        let mut bench = Self {
            server,
            ram: Ram::Socket(Vec::new()),
            ram_size: size,
            irqs: Vec::new(),
        };
        let v = VersionMessage {
            major: PROTOCOL_MAJOR,
            minor: 0,
            caps: None,
        };
        let len = v.encode().len();
        expect_ok(bench.server.handle(Request::Version(v), len), "VERSION");
        let map = DmaMap {
            argsz: 32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset: 0,
            addr: RAM_BASE,
            size: size as u64,
        };
        let fd = match mode {
            RamMode::Fd => {
                let fd = nix::sys::memfd::memfd_create(
                    c"vfud-testbench",
                    nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
                )
                .expect("memfd");
                nix::unistd::ftruncate(&fd, size as i64).expect("ftruncate");
                bench.ram = Ram::Fd(fd.try_clone().expect("dup"));
                Some(fd)
            }
            RamMode::Socket => {
                bench.ram = Ram::Socket(vec![0; size]);
                None
            }
        };
        expect_ok(bench.server.handle(Request::DmaMap(map, fd), 32), "DMA_MAP");
        bench
    }

    /// The server around the device (for what the helpers do not cover).
    pub fn server(&mut self) -> &mut DeviceServer {
        &mut self.server
    }

    /// Read `len` bytes of a region (a BAR 0–5, or config space 7).
    pub fn read(&mut self, region: u32, offset: u64, len: u32) -> Result<Vec<u8>, RequestError> {
        let a = RegionAccess {
            offset,
            region,
            count: len,
        };
        let reply = self.server.handle(Request::RegionRead(a), 16)?;
        self.pump();
        Ok(reply.payload[16..].to_vec())
    }

    /// Write bytes to a region.
    pub fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), RequestError> {
        let a = RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        self.server
            .handle(Request::RegionWrite(a, data.to_vec()), 16 + data.len())?;
        self.pump();
        Ok(())
    }

    /// Read a 32-bit register of BAR `bar`.
    pub fn read32(&mut self, bar: u32, offset: u64) -> Result<u32, RequestError> {
        let b = self.read(bar, offset, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Write a 32-bit register of BAR `bar`.
    pub fn write32(&mut self, bar: u32, offset: u64, v: u32) -> Result<(), RequestError> {
        self.write(bar, offset, &v.to_le_bytes())
    }

    /// Read 2 bytes of config space.
    pub fn config16(&mut self, offset: u64) -> u16 {
        let b = expect_ok(self.read(PCI_CONFIG_REGION_INDEX, offset, 2), "config read");
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Write 2 bytes of config space.
    pub fn set_config16(&mut self, offset: u64, v: u16) {
        expect_ok(
            self.write(PCI_CONFIG_REGION_INDEX, offset, &v.to_le_bytes()),
            "config write",
        );
    }

    /// Wire `count` vectors of IRQ index `index` (0 INTx, 1 MSI, 2 MSI-X) to eventfds, as a
    /// client's SET_IRQS would; what fires is counted by [`TestBench::interrupts`].
    pub fn wire_irqs(&mut self, index: u32, count: u32) {
        let mut fds = Vec::new();
        for v in 0..count {
            let e = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).expect("eventfd");
            fds.push(e.as_fd().try_clone_to_owned().expect("dup"));
            self.irqs.push((index, v, e));
        }
        let s = SetIrqs {
            index,
            start: 0,
            count,
            action: IrqAction::Trigger,
            data: IrqData::Eventfds(fds),
        };
        expect_ok(self.server.handle(Request::SetIrqs(s), 20), "SET_IRQS");
        if index == 2 {
            // MSI-X vectors start masked (table vector control); unmask them as a driver does.
            let msix = self.server.function.desc().irqs.msix;
            if let Some((_, p)) = msix {
                for v in 0..u64::from(count) {
                    let off = p.table_offset + v * 16;
                    expect_ok(
                        self.write(u32::from(p.bar.0), off, &0xfee0_0000u64.to_le_bytes()),
                        "MSI-X address",
                    );
                    expect_ok(
                        self.write(u32::from(p.bar.0), off + 12, &[0; 4]),
                        "MSI-X unmask",
                    );
                }
            }
        }
    }

    /// Interrupts delivered since the last call, as (index, vector, count).
    pub fn interrupts(&mut self) -> Vec<(u32, u32, u64)> {
        let mut out = Vec::new();
        for (index, v, e) in &self.irqs {
            let mut b = [0u8; 8];
            if let Ok(8) = nix::unistd::read(e.as_fd(), &mut b) {
                out.push((*index, *v, u64::from_ne_bytes(b)));
            }
        }
        out
    }

    /// Unmask INTx as the client does after handling it (SET_IRQS UNMASK).
    pub fn unmask_intx(&mut self) {
        let s = SetIrqs {
            index: 0,
            start: 0,
            count: 1,
            action: IrqAction::Unmask,
            data: IrqData::None,
        };
        expect_ok(self.server.handle(Request::SetIrqs(s), 20), "unmask");
    }

    /// Run deferred device work until the device has none (answering its socket DMA), at
    /// most `max_turns` event-loop turns; returns the turns taken.
    pub fn run(&mut self, max_turns: usize) -> usize {
        for turn in 0..max_turns {
            self.pump();
            if !self.server.work_pending() {
                return turn;
            }
            self.server.run_deferred();
        }
        max_turns
    }

    /// Run deferred work for exactly one event-loop turn.
    pub fn step(&mut self) {
        self.server.run_deferred();
        self.pump();
    }

    /// Answer the device's DMA_READ/DMA_WRITE requests from the bench's RAM (socket mode).
    fn pump(&mut self) {
        for m in self.server.take_outbox() {
            let Ram::Socket(ram) = &mut self.ram else {
                continue;
            };
            let a = DmaAccess::read_from_prefix(&m.payload)
                .expect("DMA request")
                .0;
            let at = (a.addr - RAM_BASE) as usize..(a.addr - RAM_BASE + a.count) as usize;
            let payload = match m.header.command_kind() {
                Ok(Command::DmaRead) => a.encode_with_data(&ram[at]),
                _ => {
                    let (_, data) = DmaAccess::decode_with_data(&m.payload).expect("DMA_WRITE");
                    ram[at].copy_from_slice(data);
                    m.payload[..16].to_vec()
                }
            };
            let f = Frame {
                header: m.header.reply(payload.len()),
                payload,
                fds: Vec::new(),
            };
            self.server.client_reply(&f);
        }
    }

    /// Write guest RAM at IOVA `iova` (as the guest's CPU would).
    pub fn ram_write(&mut self, iova: u64, data: &[u8]) {
        let off = (iova - RAM_BASE) as usize;
        assert!(off + data.len() <= self.ram_size, "outside the bench's RAM");
        match &mut self.ram {
            Ram::Fd(fd) => {
                nix::sys::uio::pwrite(fd, data, off as i64).expect("pwrite");
            }
            Ram::Socket(v) => v[off..off + data.len()].copy_from_slice(data),
        }
    }

    /// Read guest RAM at IOVA `iova`.
    pub fn ram_read(&mut self, iova: u64, len: usize) -> Vec<u8> {
        let off = (iova - RAM_BASE) as usize;
        assert!(off + len <= self.ram_size, "outside the bench's RAM");
        match &self.ram {
            Ram::Fd(fd) => {
                let mut b = vec![0u8; len];
                nix::sys::uio::pread(fd, &mut b, off as i64).expect("pread");
                b
            }
            Ram::Socket(v) => v[off..off + len].to_vec(),
        }
    }

    /// DEVICE_RESET.
    pub fn reset(&mut self) {
        expect_ok(self.server.handle(Request::DeviceReset, 0), "reset");
    }

    /// Walk the migration FSM to `state`.
    pub fn set_state(&mut self, state: MigState) -> Result<(), RequestError> {
        self.server.set_mig_state(state)
    }

    /// Stop the device and read its whole migration stream (RUNNING → STOP_COPY → STOP).
    pub fn save_stream(&mut self) -> Result<Vec<u8>, RequestError> {
        self.server.set_mig_state(MigState::StopCopy)?;
        let mut out = Vec::new();
        loop {
            let r = self.server.handle(
                Request::MigDataRead(MigData {
                    argsz: 16,
                    size: 1 << 20,
                }),
                16,
            )?;
            let payload = r.to_bytes(self.server.bar_memory())?;
            let chunk = MigData::decode_write(&payload)?;
            if chunk.is_empty() {
                break;
            }
            out.extend_from_slice(chunk);
        }
        self.server.set_mig_state(MigState::Stop)?;
        Ok(out)
    }

    /// Restore a stream into this device (→ RESUMING, the data, → RUNNING).
    pub fn restore_stream(&mut self, stream: &[u8]) -> Result<(), RequestError> {
        self.server.set_mig_state(MigState::Resuming)?;
        for chunk in stream.chunks(1 << 20) {
            self.server
                .handle(Request::MigDataWrite(chunk.to_vec()), chunk.len())?;
        }
        self.server.set_mig_state(MigState::Running)
    }

    /// The device's saved state (the device must be stopped or it is stopped and resumed).
    pub fn device_state(&mut self) -> DeviceState {
        let dev = self
            .server
            .device
            .migration()
            .expect("device supports migration");
        dev.save().expect("save")
    }
}

/// The migration tests every device model gets: `migration_roundtrip_tests!(make_device)`
/// with an expression that builds a fresh `Box<dyn Device>`. In the spirit of crosvm's
/// `suspendable_tests!`.
#[macro_export]
macro_rules! migration_roundtrip_tests {
    ($make:expr) => {
        mod migration_roundtrip {
            use super::*;
            use $crate::testing::TestBench;
            use $crate::vfud_protocol_reexport::MigState;

            fn bench() -> TestBench {
                TestBench::new($make)
            }

            #[test]
            fn state_survives_a_round_trip() {
                let mut a = bench();
                let stream = a.save_stream().expect("save");
                let before = a.device_state();
                let mut b = bench();
                b.restore_stream(&stream).expect("restore");
                assert_eq!(b.server().mig_state(), MigState::Running);
                b.set_state(MigState::Stop).unwrap();
                assert_eq!(b.device_state(), before);
            }

            #[test]
            fn a_flipped_byte_is_refused_and_changes_nothing() {
                let mut a = bench();
                let mut stream = a.save_stream().expect("save");
                let mut b = bench();
                b.set_state(MigState::Stop).unwrap();
                let before = b.device_state();
                b.set_state(MigState::Running).unwrap();
                let mid = stream.len() / 2;
                stream[mid] ^= 0x10;
                assert!(b.restore_stream(&stream).is_err());
                assert_eq!(b.device_state(), before);
            }

            #[test]
            fn a_truncated_stream_is_refused() {
                let mut a = bench();
                let stream = a.save_stream().expect("save");
                let mut b = bench();
                assert!(b.restore_stream(&stream[..stream.len() - 8]).is_err());
            }

            #[test]
            fn a_state_from_the_future_is_refused() {
                let mut a = bench();
                a.set_state(MigState::Stop).unwrap();
                let mut st = a.device_state();
                let before = st.clone();
                st.version = st.version.wrapping_add(2);
                let dev = a.server().device_mut();
                let m = dev.migration().expect("migratable");
                assert!(m.load(&st, None).is_err());
                assert_eq!(m.save().unwrap(), before);
            }

            #[test]
            fn garbage_state_is_refused() {
                let mut a = bench();
                a.set_state(MigState::Stop).unwrap();
                let mut st = a.device_state();
                st.payload = b"{not json".to_vec();
                let dev = a.server().device_mut();
                let m = dev.migration().expect("migratable");
                assert!(m.load(&st, None).is_err());
            }

            #[test]
            fn reset_after_a_migration_returns_to_running() {
                let mut a = bench();
                let stream = a.save_stream().expect("save");
                let mut b = bench();
                b.restore_stream(&stream).expect("restore");
                b.reset();
                assert_eq!(b.server().mig_state(), MigState::Running);
            }
        }
    };
}
