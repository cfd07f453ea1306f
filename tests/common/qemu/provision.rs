//! Provisioning: QEMU 11.1's root and the guest kit (`scripts/provision.sh`), and initramfs
//! images for guest scripts (`scripts/make-initramfs.sh`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

/// The repository (workspace root).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The guest kit directory made by `scripts/provision-guest.sh`.
pub fn guest_dir() -> PathBuf {
    repo_root().join("target/vfud-env/guest")
}

/// The kernel to boot from the guest kit `dir`: the uncompressed `vmlinux` (PVH entry, about
/// 4 s faster under TCG than having the guest decompress `vmlinuz`) when provisioning made it.
pub fn guest_kernel(dir: &Path) -> PathBuf {
    let vmlinux = dir.join("vmlinux");
    if vmlinux.is_file() {
        vmlinux
    } else {
        dir.join("vmlinuz")
    }
}

/// Run `scripts/provision.sh` once per test process; panics with its output on failure.
pub fn provision() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        let t = Instant::now();
        let out = Command::new(repo_root().join("scripts/provision.sh"))
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run scripts/provision.sh: {e}"))?;
        if out.status.success() {
            eprintln!("[qemu harness] provisioned in {:.1?}", t.elapsed());
            Ok(())
        } else {
            Err(format!(
                "scripts/provision.sh failed ({})\n--- stdout\n{}\n--- stderr\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// Build an initramfs at `out` whose `/test.sh` is `script` (see `scripts/make-initramfs.sh`).
pub fn make_initramfs(out: &Path, script: &str) {
    provision();
    let script_path = out.with_extension("test.sh");
    fs::write(&script_path, script).expect("write guest test script");
    let res = Command::new(repo_root().join("scripts/make-initramfs.sh"))
        .arg(out)
        .arg(&script_path)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/make-initramfs.sh");
    assert!(
        res.status.success(),
        "scripts/make-initramfs.sh failed ({})\n{}{}",
        res.status,
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
}
