//! `vfud qemu-migrate`: drive a QEMU-to-QEMU live migration over QMP, and refuse it when
//! QEMU's vfio-user client cannot carry the state of the VM's vfio-user devices.
//!
//! Why a guard: QEMU's vfio-user client (`vfio-user-pci`, QEMU ≥ 10.1) reuses the kernel-VFIO
//! migration code only when it has the `enable-migration` property that `vfio-pci` has.
//! QEMU 11.1's client has no such property, registers no migration blocker and sends no
//! migration message to the server, yet a `migrate` completes: the stream simply has no
//! section for the device, and the destination guest finds it freshly reset (COMMAND cleared,
//! BARs unassigned) under a driver that believes it is configured. A server cannot repair
//! that afterwards, so this command checks before it starts anything.
//!
//! The check, all over QMP (`docs/interop/qmp-spec.rst`), read-only on the source:
//! - `query-version` names the QEMU in messages;
//! - `qom-list-types` (`implements: vfio-user-pci`) gives the vfio-user device types, and
//!   `device-list-properties` says whether each has `enable-migration`;
//! - `qom-list` of `/machine/peripheral` (devices with an `id`) and
//!   `/machine/peripheral-anon` (without) finds the VM's devices: a child property of type
//!   `child<vfio-user-pci>` is one;
//! - `query-status` and `query-migrate` make sure no migration is running and none is blocked.
//!
//! A device whose type lacks `enable-migration`, or whose `enable-migration` is `off`, makes
//! the command refuse with an explanation and a non-zero exit, without sending `migrate`.
//! Otherwise (or with no vfio-user device) it sends `migrate`, polls `query-migrate` until
//! `completed` or `failed`, and, given the destination's QMP socket, waits until the
//! destination runs.

use std::fmt::{self, Write as _};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// The QOM type of QEMU's vfio-user client device.
const VFIO_USER_PCI: &str = "vfio-user-pci";
/// The property a vfio device type has when QEMU can migrate its state (`vfio-pci` has it).
const ENABLE_MIGRATION: &str = "enable-migration";
/// QOM containers of user-created devices: with an `id`, and without.
const PERIPHERAL_CONTAINERS: [&str; 2] = ["/machine/peripheral", "/machine/peripheral-anon"];
/// Deadline for the QMP greeting and for each reply.
const QMP_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for the greeting: a QMP socket serves one client at a time, and a second one
/// waits, greeting-less, until the first disconnects.
const QMP_GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between `query-migrate` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Interval between progress lines while the status does not change.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// `query-migrate` states in which a migration is under way (QAPI `MigrationStatus`).
const MIGRATION_ACTIVE_STATES: [&str; 11] = [
    "setup",
    "cancelling",
    "active",
    "postcopy-device",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover-setup",
    "postcopy-recover",
    "colo",
    "pre-switchover",
    "device",
];

/// Arguments of `vfud qemu-migrate`.
#[derive(clap::Args, Debug)]
pub struct QemuMigrateArgs {
    /// QMP socket of the source QEMU.
    #[arg(long)]
    pub qmp: std::path::PathBuf,
    /// Migration URI for the destination (e.g. `unix:/tmp/dst.mig`).
    #[arg(long)]
    pub to: String,
    /// QMP socket of the destination QEMU (started with `-incoming`), to wait for completion.
    #[arg(long)]
    pub dest_qmp: Option<std::path::PathBuf>,
    /// Only check whether the VM can be migrated without losing device state; migrate nothing.
    #[arg(long)]
    pub check: bool,
    /// Give up after this many seconds: cancel the migration and fail.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// Run the command.
pub fn run(args: &QemuMigrateArgs) -> Result<()> {
    let mut src = Qmp::connect(&args.qmp)?;
    let source = inspect(&mut src).context("inspecting the source QEMU")?;
    println!("source: {}", source.summary());
    let affected = source.affected();
    if !affected.is_empty() {
        let status = query_status(&mut src).unwrap_or_else(|e| format!("unknown: {e:#}"));
        bail!(
            "{}",
            refusal_message(&source.version, Side::Source, &affected, &status)
        );
    }
    preflight_source(&mut src)?;

    let mut dst = match &args.dest_qmp {
        Some(p) => {
            let mut q = Qmp::connect(p)?;
            let dest = inspect(&mut q).context("inspecting the destination QEMU")?;
            println!("destination: {}", dest.summary());
            let affected = dest.affected();
            if !affected.is_empty() {
                let status = query_status(&mut src).unwrap_or_else(|e| format!("unknown: {e:#}"));
                bail!(
                    "{}",
                    refusal_message(&dest.version, Side::Destination, &affected, &status)
                );
            }
            let st = query_status(&mut q)?;
            if st != "inmigrate" {
                bail!(
                    "the destination QEMU ({}) is not waiting for a migration (status {st}): \
                     start it with `-incoming {}` (or `-incoming defer` and QMP \
                     `migrate-incoming`)",
                    p.display(),
                    args.to
                );
            }
            Some(q)
        }
        None => None,
    };

    if args.check {
        println!(
            "check passed: every vfio-user device can migrate its state ({} device(s)); \
             nothing was started",
            source.devices.len()
        );
        return Ok(());
    }

    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let was_running = query_status(&mut src)? == "running";
    migrate(&mut src, &args.to, deadline, source.devices.len())?;
    if let Some(q) = dst.as_mut() {
        wait_destination(q, was_running, deadline)?;
    }
    Ok(())
}

/// Which QEMU a refusal is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Destination,
    Source,
}

/// The QEMU version as `query-version` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct QemuVersion {
    major: u64,
    minor: u64,
    micro: u64,
    /// Distribution package string (e.g. `Debian 1:11.1.3+ds-1~bpo13+1`), may be empty.
    package: String,
}

impl QemuVersion {
    fn from_qmp(v: &Value) -> Result<Self> {
        let n = |k: &str| {
            v["qemu"][k]
                .as_u64()
                .ok_or_else(|| anyhow!("query-version: no qemu.{k} in {v}"))
        };
        Ok(Self {
            major: n("major")?,
            minor: n("minor")?,
            micro: n("micro")?,
            package: v["package"].as_str().unwrap_or("").trim().to_string(),
        })
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QEMU {}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package)?;
        }
        Ok(())
    }
}

/// A vfio-user device type of the QEMU binary.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DeviceType {
    name: String,
    /// Whether the type has the `enable-migration` property.
    migratable: bool,
}

/// A vfio-user device of the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
struct VfioUserDevice {
    /// QOM path, e.g. `/machine/peripheral/dma0` or `/machine/peripheral-anon/device[0]`.
    path: String,
    /// The `id` given to `-device`/`device_add`, if any.
    id: Option<String>,
    /// QOM type.
    type_name: String,
    /// PCI device/function on its bus (`addr` property), e.g. `02.0`.
    addr: Option<String>,
    /// Value of `enable-migration` (`on`, `off`, `auto`), when the type has it.
    enable_migration: Option<String>,
}

impl VfioUserDevice {
    fn describe(&self) -> String {
        let mut s = self.path.clone();
        s += &match &self.id {
            Some(id) => format!(" (id \"{id}\""),
            None => " (no id".to_string(),
        };
        if let Some(a) = &self.addr {
            s += &format!(", PCI slot {a}");
        }
        s += &format!(", {})", self.type_name);
        s
    }
}

/// Why a device's state cannot migrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reason {
    /// The device type has no `enable-migration`: the client cannot migrate at all.
    NoClientSupport,
    /// `enable-migration=off` on the device.
    Disabled,
}

/// What the guard learnt about one QEMU.
#[derive(Clone, Debug)]
struct Inspection {
    version: QemuVersion,
    types: Vec<DeviceType>,
    devices: Vec<VfioUserDevice>,
}

impl Inspection {
    /// The devices whose state a migration would lose, with the reason.
    fn affected(&self) -> Vec<(VfioUserDevice, Reason)> {
        self.devices
            .iter()
            .filter_map(|d| {
                let migratable = self
                    .types
                    .iter()
                    .any(|t| t.name == d.type_name && t.migratable);
                if !migratable {
                    Some((d.clone(), Reason::NoClientSupport))
                } else if d.enable_migration.as_deref() == Some("off") {
                    Some((d.clone(), Reason::Disabled))
                } else {
                    None
                }
            })
            .collect()
    }

    fn summary(&self) -> String {
        let support = if self.types.is_empty() {
            "no vfio-user client".to_string()
        } else {
            self.types
                .iter()
                .map(|t| {
                    format!(
                        "{} {} {ENABLE_MIGRATION}",
                        t.name,
                        if t.migratable { "has" } else { "lacks" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{}, {support}, {} vfio-user device(s)",
            self.version,
            self.devices.len()
        )
    }
}

/// Read-only inspection of a QEMU: version, vfio-user device types and devices.
fn inspect(q: &mut Qmp) -> Result<Inspection> {
    let version = QemuVersion::from_qmp(&q.execute("query-version", None)?)?;
    // Types implementing vfio-user-pci (itself and any subtype). A QEMU without the client
    // has none.
    let listed = q.try_execute(
        "qom-list-types",
        Some(json!({ "implements": VFIO_USER_PCI, "abstract": false })),
    )?;
    let type_names: Vec<String> = match listed {
        Ok(v) => v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let mut types = Vec::new();
    for name in type_names {
        let props = q.execute(
            "device-list-properties",
            Some(json!({ "typename": name.as_str() })),
        )?;
        types.push(DeviceType {
            migratable: has_property(&props, ENABLE_MIGRATION),
            name,
        });
    }

    let mut devices = Vec::new();
    if !types.is_empty() {
        for container in PERIPHERAL_CONTAINERS {
            let children = match q.try_execute("qom-list", Some(json!({ "path": container })))? {
                Ok(v) => v,
                // No device of that kind was ever created.
                Err(_) => continue,
            };
            for child in children.as_array().into_iter().flatten() {
                let (Some(name), Some(ty)) = (child["name"].as_str(), child["type"].as_str())
                else {
                    continue;
                };
                let Some(t) = types
                    .iter()
                    .find(|t| child_type(ty) == Some(t.name.as_str()))
                else {
                    continue;
                };
                let path = format!("{container}/{name}");
                let addr = q
                    .try_execute("qom-get", Some(json!({ "path": path, "property": "addr" })))?
                    .ok()
                    .and_then(|v| v.as_u64())
                    .map(format_devfn);
                let enable_migration = if t.migratable {
                    q.try_execute(
                        "qom-get",
                        Some(json!({ "path": path, "property": ENABLE_MIGRATION })),
                    )?
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                } else {
                    None
                };
                devices.push(VfioUserDevice {
                    id: (container == PERIPHERAL_CONTAINERS[0]).then(|| name.to_string()),
                    path,
                    type_name: t.name.clone(),
                    addr,
                    enable_migration,
                });
            }
        }
    }
    Ok(Inspection {
        version,
        types,
        devices,
    })
}

/// Whether a `device-list-properties` reply lists `name`.
fn has_property(props: &Value, name: &str) -> bool {
    props
        .as_array()
        .is_some_and(|a| a.iter().any(|p| p["name"] == name))
}

/// `T` of a QOM child property type `child<T>`.
fn child_type(ty: &str) -> Option<&str> {
    ty.strip_prefix("child<")?.strip_suffix('>')
}

/// A PCI `addr` property (devfn) as `slot.function`.
fn format_devfn(devfn: u64) -> String {
    format!("{:02x}.{:x}", (devfn >> 3) & 0x1f, devfn & 7)
}

/// The explanation printed when the guard refuses.
fn refusal_message(
    version: &QemuVersion,
    side: Side,
    affected: &[(VfioUserDevice, Reason)],
    source_status: &str,
) -> String {
    let which = match side {
        Side::Source => "source",
        Side::Destination => "destination",
    };
    let n = affected.len();
    let plural = if n == 1 { "" } else { "s" };
    let mut m = format!(
        "refusing to migrate: the {which} runs {version}, which cannot migrate the state of \
         the VM's vfio-user device{plural}\n"
    );
    let _ = writeln!(m, "affected device{plural}:");
    for (d, r) in affected {
        let why = match r {
            Reason::NoClientSupport => format!(
                "{} has no `{ENABLE_MIGRATION}` property: this QEMU's vfio-user client \
                 cannot migrate device state",
                d.type_name
            ),
            Reason::Disabled => format!("{ENABLE_MIGRATION}=off on this device"),
        };
        let _ = writeln!(m, "  {}: {why}", d.describe());
    }
    let _ = writeln!(
        m,
        "a QEMU migration would still complete, but without the device state: registers, \
         device memory and interrupt setup would be lost, and the destination guest would see \
         a freshly reset device (PCI COMMAND cleared, BARs unassigned) under a driver that \
         believes it is configured"
    );
    let _ = writeln!(
        m,
        "nothing was started: no `migrate` was sent and the source VM is unchanged \
         (status: {source_status})"
    );
    let _ = writeln!(m, "what to do instead:");
    let _ = writeln!(
        m,
        "  - to move a device to another vfud process (to upgrade or restart vfud) while the VM \
         keeps running, use vfud's live handover, `vfud migrate --handover` (see `vfud migrate \
         --help`): QEMU stays attached and the device state moves between the vfud processes"
    );
    let _ = write!(
        m,
        "  - to move the VM to another QEMU, use a QEMU whose {VFIO_USER_PCI} has \
         `{ENABLE_MIGRATION}`, or unplug the vfio-user devices (`device_del`, the guest \
         sees the removal) before migrating and attach them again on the destination"
    );
    m
}

/// `query-status` → `status`.
fn query_status(q: &mut Qmp) -> Result<String> {
    let v = q.execute("query-status", None)?;
    v["status"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("query-status: no status in {v}"))
}

/// Refuse when a migration is already under way or QEMU reports blockers.
fn preflight_source(q: &mut Qmp) -> Result<()> {
    let v = q.execute("query-migrate", None)?;
    if let Some(st) = v["status"].as_str() {
        if MIGRATION_ACTIVE_STATES.contains(&st) {
            bail!("a migration of the source QEMU is already under way (status {st})");
        }
    }
    if let Some(reasons) = v["blocked-reasons"].as_array() {
        if !reasons.is_empty() {
            let list: Vec<String> = reasons
                .iter()
                .map(|r| format!("  - {}", r.as_str().unwrap_or("?")))
                .collect();
            bail!(
                "the source QEMU blocks migration:\n{}\nnothing was started",
                list.join("\n")
            );
        }
    }
    Ok(())
}

/// Send `migrate` and poll `query-migrate` until it completes; cancel at `deadline`.
fn migrate(q: &mut Qmp, uri: &str, deadline: Instant, vfio_user_devices: usize) -> Result<()> {
    println!("migrating to {uri}");
    let started = Instant::now();
    if let Err(e) = q.try_execute("migrate", Some(json!({ "uri": uri })))? {
        bail!("QEMU refused to start the migration: {e} (the source VM keeps running)");
    }
    let mut last_status = String::new();
    let mut last_print = Instant::now();
    loop {
        let v = q.execute("query-migrate", None)?;
        let status = v["status"].as_str().unwrap_or("none").to_string();
        if status != last_status || last_print.elapsed() >= PROGRESS_INTERVAL {
            println!(
                "  {:>6.1?} {}",
                started.elapsed(),
                progress_line(&status, &v)
            );
            last_status = status.clone();
            last_print = Instant::now();
        }
        match status.as_str() {
            "completed" => {
                let total = v["total-time"].as_u64().unwrap_or(0);
                let downtime = v["downtime"].as_u64().unwrap_or(0);
                println!("migration completed in {total} ms (downtime {downtime} ms)");
                let vfio = v["vfio"]["transferred"].as_u64().unwrap_or(0);
                if vfio_user_devices > 0 && vfio == 0 {
                    bail!(
                        "the migration completed but QEMU transferred no vfio device state \
                         ({vfio_user_devices} vfio-user device(s)): the destination's devices \
                         are likely freshly reset; do not resume the source's workload \
                         elsewhere before checking them"
                    );
                }
                return Ok(());
            }
            "failed" | "cancelled" => {
                let desc = v["error-desc"].as_str().unwrap_or("no error description");
                bail!("migration {status}: {desc} (the source VM keeps its state)");
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            let _ = q.try_execute("migrate_cancel", None)?;
            bail!("migration not completed within the timeout (status {status}); cancelled it");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// One progress line from a `query-migrate` reply.
fn progress_line(status: &str, v: &Value) -> String {
    let mib = |x: &Value| x.as_u64().map(|b| b as f64 / (1024.0 * 1024.0));
    let mut s = status.to_string();
    let ram = &v["ram"];
    if let (Some(t), Some(total)) = (mib(&ram["transferred"]), mib(&ram["total"])) {
        let _ = write!(s, ", RAM {t:.1} MiB sent of {total:.1} MiB");
        if let Some(r) = mib(&ram["remaining"]) {
            let _ = write!(s, ", {r:.1} MiB remaining");
        }
        if let Some(n) = ram["dirty-sync-count"].as_u64() {
            let _ = write!(s, ", pass {n}");
        }
    }
    if let Some(b) = v["vfio"]["transferred"].as_u64() {
        let _ = write!(s, ", vfio {b} B");
    }
    s
}

/// Wait until the destination QEMU has loaded the VM and (if the source ran) runs it.
fn wait_destination(q: &mut Qmp, expect_running: bool, deadline: Instant) -> Result<()> {
    loop {
        let st = query_status(q)?;
        let done = if expect_running {
            st == "running"
        } else {
            st != "inmigrate"
        };
        if done {
            println!("destination status: {st}");
            return Ok(());
        }
        if st == "guest-panicked" || st == "internal-error" || st == "shutdown" {
            bail!("the destination QEMU is in state {st} after the migration");
        }
        if Instant::now() >= deadline {
            bail!(
                "the destination QEMU did not {} within the timeout (status {st})",
                if expect_running {
                    "start running"
                } else {
                    "finish loading"
                }
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// A QMP command's error reply.
#[derive(Clone, Debug, PartialEq, Eq)]
struct QmpCommandError {
    class: String,
    desc: String,
}

impl fmt::Display for QmpCommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

impl std::error::Error for QmpCommandError {}

/// A minimal synchronous QMP client (`docs/interop/qmp-spec.rst`): one command at a time,
/// asynchronous events skipped.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
}

impl Qmp {
    /// Connect to the QMP socket `path`, read the greeting and leave negotiation mode.
    fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path)
            .with_context(|| format!("connecting to QMP socket {}", path.display()))?;
        s.set_read_timeout(Some(QMP_GREETING_TIMEOUT))?;
        s.set_write_timeout(Some(QMP_REPLY_TIMEOUT))?;
        let mut q = Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            path: path.to_path_buf(),
        };
        let greeting = match q.read_message() {
            Ok(g) => g,
            Err(e) if is_timeout(&e) => bail!(
                "no QMP greeting on {} within {QMP_GREETING_TIMEOUT:?}: a QMP socket serves \
                 one client at a time, is another one connected? (give QEMU another \
                 `-qmp unix:PATH,server=on,wait=off` for vfud)",
                path.display()
            ),
            Err(e) => return Err(e),
        };
        if greeting.get("QMP").is_none() {
            bail!(
                "{} is not a QMP socket (greeting {greeting})",
                path.display()
            );
        }
        q.writer.set_read_timeout(Some(QMP_REPLY_TIMEOUT))?;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .with_context(|| format!("reading QMP socket {}", self.path.display()))?;
        if n == 0 {
            bail!("QEMU closed the QMP socket {}", self.path.display());
        }
        serde_json::from_str(&line).with_context(|| format!("QMP message {:?}", line.trim_end()))
    }

    /// Run `cmd`: the outer error is a transport failure, the inner one QEMU's error reply.
    fn try_execute(
        &mut self,
        cmd: &str,
        args: Option<Value>,
    ) -> Result<std::result::Result<Value, QmpCommandError>> {
        let mut req = json!({ "execute": cmd });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let mut text = req.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .with_context(|| format!("sending QMP {cmd} to {}", self.path.display()))?;
        loop {
            let mut m = self.read_message()?;
            if m.get("event").is_some() {
                continue;
            }
            if let Some(r) = m.get_mut("return") {
                return Ok(Ok(r.take()));
            }
            if let Some(e) = m.get("error") {
                let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
                return Ok(Err(QmpCommandError {
                    class: s("class"),
                    desc: s("desc"),
                }));
            }
            bail!("unexpected QMP message in reply to {cmd}: {m}");
        }
    }

    /// Run `cmd`, treating QEMU's error reply as an error.
    fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value> {
        self.try_execute(cmd, args)?
            .with_context(|| format!("QMP {cmd} on {}", self.path.display()))
    }
}

fn is_timeout(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<io::Error>())
        .any(|e| {
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn qemu_11_1() -> QemuVersion {
        QemuVersion::from_qmp(&json!({
            "qemu": {"micro": 3, "minor": 1, "major": 11},
            "package": "Debian 1:11.1.3+ds-1~bpo13+1"
        }))
        .unwrap()
    }

    fn device(path: &str, id: Option<&str>, enable_migration: Option<&str>) -> VfioUserDevice {
        VfioUserDevice {
            path: path.into(),
            id: id.map(str::to_string),
            type_name: VFIO_USER_PCI.into(),
            addr: Some("02.0".into()),
            enable_migration: enable_migration.map(str::to_string),
        }
    }

    #[test]
    fn version_displays_numbers_and_package() {
        assert_eq!(
            qemu_11_1().to_string(),
            "QEMU 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)"
        );
    }

    #[test]
    fn devices_of_a_type_without_enable_migration_are_affected() {
        let i = Inspection {
            version: qemu_11_1(),
            types: vec![DeviceType {
                name: VFIO_USER_PCI.into(),
                migratable: false,
            }],
            devices: vec![device("/machine/peripheral-anon/device[0]", None, None)],
        };

        let affected = i.affected();

        assert_eq!(affected.len(), 1);
        assert_eq!(affected[0].1, Reason::NoClientSupport);
    }

    #[test]
    fn only_devices_with_enable_migration_off_are_affected_when_supported() {
        let i = Inspection {
            version: qemu_11_1(),
            types: vec![DeviceType {
                name: VFIO_USER_PCI.into(),
                migratable: true,
            }],
            devices: vec![
                device("/machine/peripheral/a", Some("a"), Some("auto")),
                device("/machine/peripheral/b", Some("b"), Some("off")),
            ],
        };

        let affected = i.affected();

        assert_eq!(affected.len(), 1);
        assert_eq!(affected[0].0.path, "/machine/peripheral/b");
        assert_eq!(affected[0].1, Reason::Disabled);
    }

    #[test]
    fn refusal_names_version_devices_loss_and_handover() {
        let d = device("/machine/peripheral/dma0", Some("dma0"), None);

        let m = refusal_message(
            &qemu_11_1(),
            Side::Source,
            &[(d, Reason::NoClientSupport)],
            "running",
        );

        assert!(m.starts_with("refusing to migrate: the source runs QEMU 11.1.3 (Debian"));
        assert!(m.contains("/machine/peripheral/dma0 (id \"dma0\", PCI slot 02.0"));
        assert!(m.contains("would be lost"));
        assert!(m.contains("freshly reset device"));
        assert!(m.contains("vfud migrate --handover"));
        assert!(m.contains("(status: running)"));
    }

    #[test]
    fn helpers_parse_qom_types_and_devfn() {
        assert_eq!(child_type("child<vfio-user-pci>"), Some("vfio-user-pci"));
        assert_eq!(child_type("link<bus>"), None);
        assert_eq!(format_devfn(0x10), "02.0");
        assert_eq!(format_devfn(0x1b), "03.3");
        assert!(has_property(
            &json!([{"name": "socket"}, {"name": "enable-migration"}]),
            ENABLE_MIGRATION
        ));
        assert!(!has_property(
            &json!([{"name": "socket"}]),
            ENABLE_MIGRATION
        ));
    }

    #[test]
    fn qmp_client_skips_events_and_returns_error_replies() {
        // Arrange: a fake QMP server answering three commands.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let replies = [
                r#"{"return": {}}"#.to_string(),
                format!(
                    "{}\n{}",
                    r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                    r#"{"return": {"status": "running", "running": true}}"#
                ),
                r#"{"error": {"class": "GenericError", "desc": "nope"}}"#.to_string(),
            ];
            for reply in replies {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                writeln!(w, "{reply}").unwrap();
            }
        });

        // Act
        let mut q = Qmp::connect(&path).unwrap();
        let status = query_status(&mut q).unwrap();
        let err = q.try_execute("migrate", None).unwrap();

        // Assert
        assert_eq!(status, "running");
        assert_eq!(
            err,
            Err(QmpCommandError {
                class: "GenericError".into(),
                desc: "nope".into()
            })
        );
        server.join().unwrap();
    }
}
