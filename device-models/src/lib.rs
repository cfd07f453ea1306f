//! Device models for vfud. Each device is one module built only on `vfud-server`'s API, and
//! one row of [`MODELS`], the registry that `vfud devices`, `vfud serve --device` and the
//! tests all read.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod dma_engine;
pub mod nvme;
pub mod uart16550;

use vfud_server::{Device, DeviceError};

/// Why a `--device` spec does not make a device.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// No model of that name.
    #[error("unknown device {name:?}; available: {available}")]
    UnknownModel {
        /// The name given.
        name: String,
        /// The registry's names.
        available: String,
    },
    /// An option without `=`.
    #[error("device option {0:?} is not key=value")]
    NotKeyValue(String),
    /// An option the model does not take.
    #[error("device {model} has no option {key:?}")]
    UnknownOption {
        /// The model.
        model: String,
        /// The option.
        key: String,
    },
    /// An option whose value does not parse or fit.
    #[error("option {0}")]
    BadValue(String),
    /// The model refused to start (a backend file or socket, a size).
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Options of a `--device NAME,key=value,...` spec.
#[derive(Debug, Default)]
pub struct Options<'a> {
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Options<'a> {
    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The value of `key` as a number (decimal, or hex with `0x`).
    pub fn number(&self, key: &str) -> Result<Option<u64>, SpecError> {
        self.get(key)
            .map(|v| {
                let r = match v.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => v.parse(),
                };
                r.map_err(|_| SpecError::BadValue(format!("{key}={v} is not a number")))
            })
            .transpose()
    }
}

impl Options<'_> {
    /// The value of `key` as a byte count: a number with an optional binary suffix
    /// (`K`, `M`, `G`, `T`: 1024-based), e.g. `64M`.
    pub fn bytes(&self, key: &str) -> Result<Option<u64>, SpecError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let (num, shift) = match v.char_indices().last() {
            Some((i, 'K' | 'k')) => (&v[..i], 10),
            Some((i, 'M' | 'm')) => (&v[..i], 20),
            Some((i, 'G' | 'g')) => (&v[..i], 30),
            Some((i, 'T' | 't')) => (&v[..i], 40),
            _ => (v, 0),
        };
        let bad = || SpecError::BadValue(format!("{key}={v} is not a size (e.g. 4096, 64M, 1G)"));
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_mul(1 << shift).map(Some).ok_or_else(bad)
    }
}

/// One device model in the registry.
pub struct Model {
    /// Name given to `--device`.
    pub name: &'static str,
    /// One line of help.
    pub help: &'static str,
    /// Options it takes, with a line of help each.
    pub options: &'static [(&'static str, &'static str)],
    /// Build the device from its options (already checked against `options`).
    pub create: fn(&Options<'_>) -> Result<Box<dyn Device>, SpecError>,
}

/// Every device model vfud serves.
pub const MODELS: &[Model] = &[
    Model {
        name: "dma-engine",
        help: "DMA controller: COPY/FILL/CRC32 over guest and device memory, MSI-X/MSI/INTx",
        options: &[
            (
                "slice",
                "bytes a job moves per event-loop turn (default 1 MiB)",
            ),
            (
                "msix",
                "on or off (default on); off lets QEMU 11.1 unplug it (qemu-migrate --replug)",
            ),
            (
                "crash-test",
                "TESTING ONLY: on makes a write of 0xdeaddead to BAR0 0xffc panic the model, \
                 and one of 0xdead1001 or a read there hang it",
            ),
        ],
        create: |o| {
            let slice = o
                .number("slice")?
                .unwrap_or(u64::from(dma_engine::DEFAULT_SLICE));
            let slice = u32::try_from(slice)
                .map_err(|_| SpecError::BadValue("slice is too large".into()))?;
            let engine = dma_engine::DmaEngine::with_slice(slice);
            let engine = match o.get("crash-test") {
                None | Some("off") => engine,
                Some("on") => engine.with_crash_test(),
                Some(v) => {
                    return Err(SpecError::BadValue(format!(
                        "crash-test={v}: give on or off"
                    )))
                }
            };
            Ok(Box::new(match o.get("msix") {
                None | Some("on") => engine,
                Some("off") => engine.without_msix(),
                Some(v) => return Err(SpecError::BadValue(format!("msix={v}: give on or off"))),
            }))
        },
    },
    Model {
        name: "nvme",
        help: "NVMe 1.4 controller, one namespace on a file, bound by Linux's stock nvme driver",
        options: &[
            (
                "backing",
                "namespace file, created sparse if missing (default: an anonymous memfd)",
            ),
            (
                "size",
                "namespace bytes; grows a smaller file (default: the file's size, or 64 MiB)",
            ),
            ("queues", "I/O queue pairs, 1-127 (default 4)"),
            (
                "shadow",
                "on or off (default on): offer Doorbell Buffer Config (shadow doorbells)",
            ),
            (
                "doorbells",
                "trap (default; posted writes) or mmap (a shared page a thread polls)",
            ),
        ],
        create: |o| {
            let shadow = match o.get("shadow") {
                None | Some("on") => true,
                Some("off") => false,
                Some(v) => return Err(SpecError::BadValue(format!("shadow={v}: give on or off"))),
            };
            let dev = nvme::Nvme::from_options(
                o.get("backing").map(Into::into),
                o.bytes("size")?,
                o.number("queues")?,
                shadow,
            )?;
            let mode = match o.get("doorbells") {
                None => nvme::dbpage::DoorbellMode::default(),
                Some(v) => nvme::dbpage::DoorbellMode::parse(v).ok_or_else(|| {
                    SpecError::BadValue(format!("doorbells={v}: give trap or mmap"))
                })?,
            };
            Ok(Box::new(dev.with_doorbells(mode)?))
        },
    },
    Model {
        name: "uart16550",
        help: "16550A UART (class 0x070002) bound by Linux's stock 8250_pci driver",
        options: &[
            (
                "backend",
                "socket:PATH, file:PATH, stdout or null (default stdout)",
            ),
            (
                "bar",
                "mem (default; posted register writes, ids 10ec:816a) or io (ids 5646:0002)",
            ),
        ],
        create: |o| {
            let bar = o
                .get("bar")
                .map(uart16550::RegisterBar::parse)
                .transpose()?
                .unwrap_or_default();
            let backend = match o.get("backend") {
                Some(b) => uart16550::Backend::parse(b)?,
                None => uart16550::Backend::Stdout,
            };
            Ok(Box::new(uart16550::Uart16550::new(backend).with_bar(bar)))
        },
    },
];

/// The registry row of `name`.
pub fn model(name: &str) -> Option<&'static Model> {
    MODELS.iter().find(|m| m.name == name)
}

/// Construct a device from `NAME[,key=value...]`, e.g. `uart16550,backend=socket:/tmp/u.sock`.
pub fn create(spec: &str) -> Result<Box<dyn Device>, SpecError> {
    let mut parts = spec.split(',');
    let name = parts.next().unwrap_or_default();
    let m = model(name).ok_or_else(|| SpecError::UnknownModel {
        name: name.to_string(),
        available: MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", "),
    })?;
    let mut opts = Options::default();
    for p in parts {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| SpecError::NotKeyValue(p.to_string()))?;
        if !m.options.iter().any(|(o, _)| *o == k) {
            return Err(SpecError::UnknownOption {
                model: name.to_string(),
                key: k.to_string(),
            });
        }
        opts.pairs.push((k, v));
    }
    (m.create)(&opts)
}

/// Construct a device that adopts its host backend from another vfud process (the receiving
/// side of a live handover, or a device process restarted by `--supervise`): a `backend=`
/// option becomes `backend=null`, so nothing is opened or bound that the other side still
/// holds (a UART's `socket:PATH` would be "in use"); `HostIo::adopt` installs the real one.
pub fn create_detached(spec: &str) -> Result<Box<dyn Device>, SpecError> {
    let parts: Vec<&str> = spec
        .split(',')
        .map(|p| match p.starts_with("backend=") {
            true => "backend=null",
            false => p,
        })
        .collect();
    create(&parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_builds_with_no_options() {
        for m in MODELS {
            let d = create(m.name).unwrap_or_else(|e| panic!("{}: {e}", m.name));
            assert_eq!(d.describe().name, m.name);
        }
    }

    #[test]
    fn dma_engine_msix_off_leaves_msix_out_and_keeps_msi() {
        let on = create("dma-engine").unwrap().describe();
        let off = create("dma-engine,msix=off").unwrap().describe();

        assert!(on.irqs.msix.is_some());
        assert!(off.irqs.msix.is_none());
        assert_eq!(off.irqs.msi_vectors, on.irqs.msi_vectors);
    }

    #[test]
    fn nvme_size_takes_binary_suffixes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ns.img");
        let spec = format!("nvme,backing={},size=3M,queues=2", f.display());
        create(&spec).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 3 << 20);
    }

    fn refusal(spec: &str) -> String {
        create(spec)
            .err()
            .unwrap_or_else(|| panic!("{spec} was accepted"))
            .to_string()
    }

    #[test]
    fn unknown_names_and_options_are_refused() {
        assert!(refusal("nope").contains("available: dma-engine"));
        assert!(refusal("dma-engine,colour=red").contains("no option"));
        assert!(refusal("dma-engine,slice").contains("key=value"));
        assert!(refusal("dma-engine,slice=lots").contains("not a number"));
        assert!(refusal("dma-engine,msix=maybe").contains("on or off"));
        assert!(refusal("nvme,size=12Q").contains("not a size"));
        assert!(refusal("nvme,queues=0").contains("1 to 127"));
        assert!(refusal("nvme,shadow=maybe").contains("on or off"));
        assert!(refusal("nvme,doorbells=fast").contains("trap or mmap"));
        assert!(refusal("uart16550,backend=null,bar=pio").contains("mem or io"));
    }

    #[test]
    fn detached_uart_leaves_a_socket_backend_held_elsewhere_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uart.host");
        let _held = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let spec = format!("uart16550,backend=socket:{},bar=io", path.display());

        let bound = refusal(&spec);
        let detached = create_detached(&spec).unwrap();

        assert!(bound.contains("in use"), "{bound}");
        assert_eq!(detached.describe().ids.vendor, 0x5646, "other options kept");
        assert!(path.exists(), "the held socket is not unlinked");
    }

    #[test]
    fn uart_bar_option_picks_the_bar_kind_and_ids() {
        use vfud_server::BarKind;
        let mem = create("uart16550,backend=null").unwrap().describe();
        let io = create("uart16550,backend=null,bar=io").unwrap().describe();

        let kind = |d: &vfud_server::DeviceDescription| d.bars[0].as_ref().unwrap().kind;
        assert_eq!(kind(&mem), BarKind::Mem32);
        assert_eq!((mem.ids.vendor, mem.ids.device), (0x10ec, 0x816a));
        assert_eq!(
            (mem.ids.subsystem_vendor, mem.ids.subsystem),
            (0x5646, 0x0002)
        );
        assert_eq!(kind(&io), BarKind::Io);
        assert_eq!((io.ids.vendor, io.ids.device), (0x5646, 0x0002));
        assert_eq!(mem.ids.class_code, io.ids.class_code);
    }
}
