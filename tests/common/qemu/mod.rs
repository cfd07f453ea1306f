//! QEMU harness: provision QEMU 11.1 and the guest kit, start `qemu-system-x86_64` (through
//! `scripts/qemu.sh`) with vfio-user-pci devices attached to vfud sockets, talk QMP to it, and
//! watch its serial console.
//!
//! Every QEMU runs under TCG on a q35 machine whose 256 MiB of RAM is a shared memfd (so DMA
//! maps carry fds), with `-nodefaults -display none -no-reboot`, the serial console in a file
//! and QMP on a UNIX socket, all in a per-instance temporary directory. With a guest script the
//! Debian kernel of the guest kit boots an initramfs made by `scripts/make-initramfs.sh`; its
//! `/init` runs the script, prints `VFUD-GUEST-EXIT <status>` and powers off.
//!
//! Every wait has a deadline. [`Qemu`] kills QEMU's process group on drop, and QEMU also gets
//! SIGKILL if the thread that started it dies; when dropped during a panic it prints the serial
//! log, QEMU's stderr and the trace log (vfud's stderr is inherited and already on the console).
//!
//! The rooms: [`provision`] (QEMU root and guest kit), [`process`] (starting, watching and
//! stopping QEMU), [`qmp`] (the QMP client, shared with `vfud qemu-migrate`), [`pci`]
//! (`query-pci` and sysfs resources), [`guest`] (guest script preludes and result lines) and
//! [`trace`] (QEMU's vfio-user trace events).

pub mod guest;
pub mod pci;
pub mod process;
pub mod provision;
pub mod qmp;
pub mod trace;

// Every test file picks different helpers; the flat namespace stays for all of them.
#[allow(unused_imports)]
pub use guest::*;
#[allow(unused_imports)]
pub use pci::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use provision::*;
#[allow(unused_imports)]
pub use qmp::*;
#[allow(unused_imports)]
pub use trace::*;
