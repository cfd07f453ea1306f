//! QEMU harness (filled in by the QEMU test work).
