//! vfud's `nvme` under a real QEMU 11.1 and Linux guest (TCG, 2 vCPUs), driven by `vfud guest`
//! with the stock `nvme` driver, `mkfs.ext4` and `fio` in the initramfs:
//! - the driver binds, `/dev/nvme0n1` has the size asked, each queue has its MSI-X line;
//!   a filesystem is made, files written and their checksums read back after a remount; a fio
//!   verify job passes; the backing file holds what the guest sees;
//! - the same with `doorbells=mmap`: QEMU maps the doorbell page (its memfd is in QEMU's
//!   address space) and the doorbells of thousands of I/Os cost no REGION_WRITE;
//! - the device is handed over twice between vfud processes while fio verify jobs run, with
//!   trapped and with mmap'd doorbells: every job passes, the kernel logs no I/O error, and
//!   the backing file holds what the guest wrote.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::qemu::{guest_values, repo_root};

/// Namespace size.
const SIZE_MIB: u64 = 64;
/// Deadline for one guest run.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Guest prelude: result helpers, the device, and `md5_dev` (checksum of the whole namespace).
const PRELUDE: &str = r#"
fails=0
ok() { echo "VFUD-TEST: $*"; }
fail() { echo "VFUD-TEST: FAIL $*"; fails=$((fails + 1)); }
i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/nvme0n1 ] || { fail "no /dev/nvme0n1"; dmesg | grep -i nvme; exit 1; }
md5_dev() { sync; echo 3 > /proc/sys/vm/drop_caches; md5sum /dev/nvme0n1 | cut -d' ' -f1; }
io_errors() { dmesg | grep -ciE 'I/O error|blk_update_request|nvme.*(timeout|reset|abort|failed)'; }
fio_verify() {  # fio_verify OFFSET_MIB: random 4 KiB writes over 4 MiB, then read and verify
  fio --name=v --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --size=4M --offset=$1M \
      --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 \
      --randseed=$1 >/tmp/fio.out 2>&1
}
"#;

/// A `vfud guest` run whose console is collected as it comes.
struct Guest {
    child: Child,
    console: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    _slot: Slot,
}

/// Guests of this file running at once: each is 2 TCG vCPUs, and the hosts these tests run on
/// have about 2 CPUs, so four at once starve the fio loops the handover tests count on.
const MAX_GUESTS: usize = 2;
static RUNNING: (Mutex<usize>, std::sync::Condvar) = (Mutex::new(0), std::sync::Condvar::new());

/// One of [`MAX_GUESTS`] places, held while a guest runs.
struct Slot;

impl Slot {
    fn take() -> Slot {
        let mut n = RUNNING.0.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= MAX_GUESTS {
            n = RUNNING.1.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *RUNNING.0.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        RUNNING.1.notify_one();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    /// Start `vfud guest --device SPEC` with `script`; `control` adds a control socket.
    fn start(dir: &Path, spec: &str, script: &str, control: Option<&Path>) -> Guest {
        let script_path = dir.join("test.sh");
        std::fs::write(&script_path, format!("{PRELUDE}\n{script}")).expect("guest script");
        let mut c = Command::new(common::vfud_bin());
        c.arg("guest")
            .arg("--device")
            .arg(spec)
            .arg("--script")
            .arg(&script_path)
            .arg("--socket-dir")
            .arg(dir)
            .args(["--mem-mib", "1024", "--timeout", "110"])
            .args(["--qemu-arg=-smp", "--qemu-arg=2"])
            // ext4 and nvme with their soft dependencies; fio and mkfs.ext4.
            .env(
                "VFUD_GUEST_MODULES",
                "crc32c_generic ext4 crc64_rocksoft_generic nvme",
            )
            .env("VFUD_GUEST_TOOLS", "1")
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if let Some(ctl) = control {
            c.arg("--control").arg(ctl);
        }
        let slot = Slot::take();
        let mut child = c.spawn().expect("spawn vfud guest");
        let console = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout");
        let sink = console.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).into_owned();
                eprintln!("[guest] {}", line.trim_end());
                let mut c = sink.lock().expect("console");
                c.push_str(&line);
                c.push('\n');
            }
        });
        Guest {
            child,
            console,
            reader: Some(reader),
            _slot: slot,
        }
    }

    fn text(&self) -> String {
        self.console.lock().expect("console").clone()
    }

    /// Wait until the console shows `needle`.
    fn wait_for(&self, needle: &str, deadline: Instant) {
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the guest never printed {needle:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the guest to power off; its console, and whether `vfud guest` succeeded.
    fn finish(mut self, deadline: Instant) -> (String, bool) {
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait vfud guest") {
                break st;
            }
            assert!(Instant::now() < deadline, "vfud guest did not finish");
            std::thread::sleep(Duration::from_millis(50));
        };
        if let Some(r) = self.reader.take() {
            r.join().expect("console reader");
        }
        (self.text(), status.success())
    }
}

/// The device on `backing`, with `extra` options (`,doorbells=mmap`).
fn device_spec(backing: &Path, extra: &str) -> String {
    format!("nvme,backing={},size={SIZE_MIB}M{extra}", backing.display())
}

/// Pid of the QEMU whose command line names `dir` (its vfio-user socket is there).
fn qemu_pid(dir: &Path) -> u32 {
    let dir = dir.to_string_lossy();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("qemu-system") && cmd.contains(&*dir)
        })
        .expect("the guest's QEMU process")
}

/// REGION_WRITE messages the device served so far (`vfud status` on its control socket).
fn region_writes(control: &Path) -> u64 {
    let out = Command::new(common::vfud_bin())
        .args(["status", "--json", "--control"])
        .arg(control)
        .output()
        .expect("vfud status");
    assert!(out.status.success(), "vfud status failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    v["messages"]["REGION_WRITE"]["served"]
        .as_u64()
        .unwrap_or(0)
}

/// `md5sum FILE` on the host.
fn host_md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().expect("md5sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("md5sum output")
        .to_string()
}

fn scratch() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = std::fs::canonicalize(dir.path()).expect("canonical tempdir");
    let backing = d.join("ns.img");
    (dir, d, backing)
}

/// Bind, make a filesystem, verify files and a fio job, use every I/O queue.
const FILESYSTEM_AND_FIO: &str = r#"
dev=
for p in /sys/bus/pci/devices/*; do [ "$(cat $p/class)" = 0x010802 ] && dev=$p; done
drv=none; [ -e "$dev/driver" ] && drv=$(basename "$(readlink "$dev/driver")")
ok "driver=$drv sectors=$(cat /sys/block/nvme0n1/size)"
ok "queue_irqs=$(grep -c 'PCI-MSI.*nvme0q' /proc/interrupts)"
/usr/sbin/mkfs.ext4 -q -F /dev/nvme0n1 || fail mkfs
mkdir -p /mnt
mount -t ext4 /dev/nvme0n1 /mnt || fail mount
for n in 1 2 3; do dd if=/dev/urandom of=/mnt/f$n bs=64k count=$((n * 8)) 2>/dev/null; done
(cd /mnt && md5sum f1 f2 f3) > /tmp/sums
umount /mnt || fail umount
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/nvme0n1 /mnt || fail remount
(cd /mnt && md5sum -c /tmp/sums) >/dev/null && ok files_verified=1 || fail "checksums differ"
umount /mnt
fio_verify 40 && ok fio_verify=1 || { fail fio; cat /tmp/fio.out; }
# Reads from each vCPU go through that vCPU's I/O queue and its interrupt vector.
for c in 0 1; do
  fio --name=r$c --filename=/dev/nvme0n1 --rw=randread --bs=4k --size=1M --ioengine=psync \
      --direct=1 --cpus_allowed=$c >/dev/null 2>&1 || fail "fio on cpu $c"
done
grep nvme0q /proc/interrupts
ok "io_queue_irqs_used=$(awk '/nvme0q[1-9]/ { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; if (s > 0) n++ } END { print n + 0 }' /proc/interrupts)"
ok "io_errors=$(io_errors) md5=$(md5_dev)"
[ $fails = 0 ]
"#;

#[test]
fn stock_driver_filesystem_and_fio_verify() {
    let (_keep, d, backing) = scratch();
    let guest = Guest::start(&d, &device_spec(&backing, ""), FILESYSTEM_AND_FIO, None);
    let (text, success) = guest.finish(Instant::now() + RUN_TIMEOUT);
    check_filesystem_run(&text, success, &backing);
}

#[test]
fn mmap_doorbells_filesystem_and_fio_verify() {
    let (_keep, d, backing) = scratch();
    let ctl = d.join("nvme.ctl");
    // Shadow doorbells off: every doorbell is a register write, so each I/O rings the page.
    let spec = device_spec(&backing, ",doorbells=mmap,shadow=off");
    let guest = Guest::start(&d, &spec, FILESYSTEM_AND_FIO, Some(&ctl));
    let deadline = Instant::now() + RUN_TIMEOUT;
    guest.wait_for("VFUD-TEST: driver=", deadline);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", qemu_pid(&d))).expect("maps");
    assert!(
        maps.contains("vfud-nvme-bar0"),
        "QEMU mapped the doorbell page's memfd"
    );
    guest.wait_for("VFUD-TEST: fio_verify=", deadline);
    // The verify job alone is 1 024 writes and 1 024 reads, each ringing an SQ tail and a CQ
    // head; only the register writes of bring-up (a few dozen) arrive as messages.
    let writes = region_writes(&ctl);
    eprintln!("[test] REGION_WRITEs after the verify job: {writes}");
    assert!(
        writes < 256,
        "{writes} REGION_WRITEs: doorbells went over the socket"
    );
    let (text, success) = guest.finish(deadline);
    check_filesystem_run(&text, success, &backing);
}

fn check_filesystem_run(text: &str, success: bool, backing: &Path) {
    let v = guest_values(text);
    let get = |k: &str| {
        v.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("no {k} from the guest"))
    };
    assert_eq!(get("driver"), "nvme");
    assert_eq!(get("sectors"), (SIZE_MIB << 20 >> 9).to_string());
    // Admin queue + one I/O queue per vCPU, each on its own MSI-X vector, both I/O queues used.
    assert_eq!(get("queue_irqs"), "3");
    assert_eq!(get("io_queue_irqs_used"), "2");
    assert_eq!(get("files_verified"), "1");
    assert_eq!(get("fio_verify"), "1");
    assert_eq!(get("io_errors"), "0");
    assert!(!text.contains("FAIL"), "guest failures");
    assert!(success, "vfud guest failed");
    // The backing file is what the guest sees, and it holds the ext4 superblock.
    assert_eq!(host_md5(backing), get("md5"));
    let img = std::fs::read(backing).expect("backing file");
    assert_eq!(img.len() as u64, SIZE_MIB << 20);
    assert_eq!(&img[0x438..0x43a], &[0x53, 0xef], "ext4 magic");
}

#[test]
fn two_handovers_during_fio_verify() {
    handovers_during_fio_verify("");
}

#[test]
fn two_handovers_during_fio_verify_with_mmap_doorbells() {
    handovers_during_fio_verify(",doorbells=mmap");
}

fn handovers_during_fio_verify(extra: &str) {
    let (_keep, d, backing) = scratch();
    let spec = device_spec(&backing, extra);
    let ctl: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|n| d.join(format!("{n}.ctl")))
        .collect();
    let script = r#"
ok looping=1
n=0 bad=0
while [ $n -lt 8 ]; do
  off=$(( (n % 12) * 4 ))
  fio_verify $off || { bad=$((bad + 1)); cat /tmp/fio.out; }
  n=$((n + 1))
  ok "progress=$n"
done
ok "jobs=$n bad=$bad io_errors=$(io_errors) md5=$(md5_dev)"
[ $bad = 0 ]
"#;
    let guest = Guest::start(&d, &spec, script, Some(&ctl[0]));
    let deadline = Instant::now() + RUN_TIMEOUT;
    guest.wait_for("VFUD-TEST: looping=1", deadline);
    let mut procs = Vec::new();
    for i in 0..2 {
        guest.wait_for(&format!("progress={}", 2 + 3 * i), deadline);
        procs.push(common::serve_incoming(&spec, &ctl[i + 1]));
        common::handover(&ctl[i], &ctl[i + 1]);
        eprintln!("[test] handover {i} done");
    }
    let (text, success) = guest.finish(deadline);
    let v = guest_values(&text);
    let get = |k: &str| {
        v.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("no {k} from the guest"))
    };
    let jobs: u32 = get("jobs").parse().expect("jobs");
    // A fixed count, not a time budget: a slow machine must not run too few jobs to span
    // both handovers (they happen after jobs 2 and 5).
    assert_eq!(jobs, 8, "fio jobs ran across both handovers");
    assert_eq!(get("bad"), "0", "every fio verify job passed");
    assert_eq!(
        get("io_errors"),
        "0",
        "no I/O error in the guest's kernel log"
    );
    assert!(success, "vfud guest failed");
    assert_eq!(
        host_md5(&backing),
        get("md5"),
        "the backing file holds what the guest wrote"
    );
}
