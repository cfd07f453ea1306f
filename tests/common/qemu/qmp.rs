//! QMP: the client is `vfud::qmp`, the same one `vfud qemu-migrate` uses; the harness
//! connects with its own deadlines.

use std::path::Path;
use std::time::Duration;

pub use vfud::qmp::{Qmp, QmpError};

/// Deadline for QMP replies and for QEMU to exit after `quit`.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(20);

/// Connect to a QEMU's QMP socket with [`QMP_TIMEOUT`] for the greeting and each reply.
pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
    Qmp::connect_with(path, QMP_TIMEOUT, QMP_TIMEOUT)
}
