//! `vfud probe`: an lspci-like view of a vfio-user device, obtained as a client.

use std::path::Path;

use anyhow::{Context, Result};
use vfud_protocol::messages::irq::{
    IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE,
};
use vfud_protocol::messages::region::{
    RegionCap, PCI_CONFIG_REGION_INDEX, REGION_FLAG_CAPS, REGION_FLAG_MMAP, REGION_FLAG_READ,
    REGION_FLAG_WRITE,
};
use vfud_protocol::Client;

/// Names of the PCI IRQ indices (INTx, MSI, MSI-X, ERR, REQ).
pub(crate) const IRQ_NAMES: [&str; 5] = ["INTx", "MSI", "MSI-X", "ERR", "REQ"];

/// A region index as lspci-minded people say it (`BAR0`, `config`, `region 9`).
pub(crate) fn region_name(i: u32) -> String {
    match i {
        0..=5 => format!("BAR{i}"),
        6 => "ROM".into(),
        7 => "config".into(),
        8 => "VGA".into(),
        n => format!("region {n}"),
    }
}

/// The names of the bits set in `flags`, comma-separated, or `-`.
pub(crate) fn flag_list(flags: u32, names: &[(u32, &str)]) -> String {
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| flags & b != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

fn cap_name(id: u8) -> &'static str {
    match id {
        0x01 => "Power Management",
        0x05 => "MSI",
        0x09 => "Vendor Specific",
        0x10 => "PCI Express",
        0x11 => "MSI-X",
        _ => "unknown",
    }
}

/// Connect, negotiate and print everything.
pub fn run(socket: &Path) -> Result<()> {
    let mut c = Client::connect_negotiated(socket)
        .with_context(|| format!("cannot talk vfio-user on {}", socket.display()))?;
    let n = c.negotiated().clone();
    println!("vfio-user server at {}", socket.display());
    println!(
        "  negotiated: version 0.{} max_msg_fds={} max_data_xfer_size={} pgsizes={:#x} max_dma_maps={} migration={} write_multiple={}",
        n.minor,
        n.max_msg_fds,
        n.max_data_xfer_size,
        n.pgsizes,
        n.max_dma_maps,
        n.migration.as_ref().map(|m| format!("pgsize {}", m.pgsize)).unwrap_or_else(|| "no".into()),
        n.write_multiple
    );
    let info = c.device_info().context("DEVICE_GET_INFO")?;
    println!(
        "  device: flags={} regions={} irqs={}",
        flag_list(info.flags, &[(1, "RESET"), (2, "PCI")]),
        info.num_regions,
        info.num_irqs
    );
    println!("Regions:");
    for i in 0..info.num_regions.min(100) {
        let (r, fd) = c
            .region_info(i)
            .with_context(|| format!("REGION_INFO {i}"))?;
        if r.info.size == 0 {
            continue;
        }
        println!(
            "  {:<9} size {:#x} flags {}{}",
            region_name(i),
            r.info.size,
            flag_list(
                r.info.flags,
                &[
                    (REGION_FLAG_READ, "R"),
                    (REGION_FLAG_WRITE, "W"),
                    (REGION_FLAG_MMAP, "MMAP"),
                    (REGION_FLAG_CAPS, "CAPS")
                ]
            ),
            if fd.is_some() { " (fd)" } else { "" }
        );
        for cap in &r.caps {
            match cap {
                RegionCap::SparseMmap(areas) => {
                    for a in areas {
                        println!("            mmap area {:#x}+{:#x}", a.offset, a.size);
                    }
                }
                RegionCap::Type {
                    region_type,
                    subtype,
                } => {
                    println!("            type {region_type} subtype {subtype}")
                }
                RegionCap::Other { id, version, data } => {
                    println!("            cap id {id} v{version} ({} bytes)", data.len())
                }
            }
        }
    }
    println!("Interrupts:");
    for i in 0..info.num_irqs.min(50) {
        let irq = c.irq_info(i).with_context(|| format!("IRQ_INFO {i}"))?;
        println!(
            "  {:<6} count {} flags {}",
            IRQ_NAMES.get(i as usize).copied().unwrap_or("?"),
            irq.count,
            flag_list(
                irq.flags,
                &[
                    (IRQ_INFO_EVENTFD, "EVENTFD"),
                    (IRQ_INFO_MASKABLE, "MASKABLE"),
                    (IRQ_INFO_AUTOMASKED, "AUTOMASKED"),
                    (IRQ_INFO_NORESIZE, "NORESIZE")
                ]
            )
        );
    }
    let (cfg_info, _) = c.region_info(PCI_CONFIG_REGION_INDEX)?;
    let len = cfg_info.info.size.min(4096) as u32;
    let mut cfg = Vec::with_capacity(len as usize);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(256);
        cfg.extend(
            c.region_read(PCI_CONFIG_REGION_INDEX, off.into(), n)
                .context("config read")?,
        );
        off += n;
    }
    print_config(&cfg);
    Ok(())
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    b.get(o..o + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .unwrap_or(0xffff)
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(u32::MAX)
}

fn print_config(cfg: &[u8]) {
    println!("Config space ({} bytes):", cfg.len());
    println!(
        "  {:04x}:{:04x} rev {:02x} class {:06x} subsystem {:04x}:{:04x}",
        u16_at(cfg, 0),
        u16_at(cfg, 2),
        cfg.get(8).copied().unwrap_or(0),
        u32_at(cfg, 8) >> 8,
        u16_at(cfg, 0x2c),
        u16_at(cfg, 0x2e)
    );
    println!(
        "  command {:#06x} status {:#06x} interrupt pin {}",
        u16_at(cfg, 4),
        u16_at(cfg, 6),
        cfg.get(0x3d).copied().unwrap_or(0)
    );
    for i in 0..6 {
        let v = u32_at(cfg, 0x10 + 4 * i);
        if v != 0 {
            let kind = if v & 1 != 0 {
                "I/O"
            } else if v & 0x4 != 0 {
                "64-bit mem"
            } else {
                "32-bit mem"
            };
            let pf = if v & 1 == 0 && v & 0x8 != 0 {
                " prefetchable"
            } else {
                ""
            };
            println!("  BAR{i}: {kind}{pf} ({v:#010x})");
        }
    }
    if u16_at(cfg, 6) & 0x10 != 0 {
        let mut p = cfg.get(0x34).copied().unwrap_or(0) as usize;
        let mut seen = 0;
        while p != 0 && seen < 48 {
            let id = cfg.get(p).copied().unwrap_or(0);
            let next = cfg.get(p + 1).copied().unwrap_or(0) as usize;
            let detail = match id {
                0x05 => format!(
                    "vectors {} 64-bit {} per-vector mask {}",
                    1 << ((u16_at(cfg, p + 2) >> 1) & 7),
                    u16_at(cfg, p + 2) & 0x80 != 0,
                    u16_at(cfg, p + 2) & 0x100 != 0
                ),
                0x11 => format!(
                    "table size {} table BAR{}+{:#x} PBA BAR{}+{:#x}",
                    (u16_at(cfg, p + 2) & 0x7ff) + 1,
                    u32_at(cfg, p + 4) & 7,
                    u32_at(cfg, p + 4) & !7,
                    u32_at(cfg, p + 8) & 7,
                    u32_at(cfg, p + 8) & !7
                ),
                0x10 => format!(
                    "version {} type {}",
                    u16_at(cfg, p + 2) & 0xf,
                    (u16_at(cfg, p + 2) >> 4) & 0xf
                ),
                _ => String::new(),
            };
            println!("  cap [{p:#04x}] {} {detail}", cap_name(id));
            p = next;
            seen += 1;
        }
    }
    if cfg.len() > 0x100 {
        let mut p = 0x100usize;
        let mut seen = 0;
        while p != 0 && seen < 64 {
            let h = u32_at(cfg, p);
            if h == 0 || h == u32::MAX {
                break;
            }
            let id = h & 0xffff;
            let detail = if id == 3 {
                format!(
                    "serial {:08x}{:08x}",
                    u32_at(cfg, p + 8),
                    u32_at(cfg, p + 4)
                )
            } else {
                String::new()
            };
            println!("  ext cap [{p:#05x}] id {id:#06x} {detail}");
            p = (h >> 20) as usize;
            seen += 1;
        }
    }
}
