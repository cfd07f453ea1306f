//! Turn one observed vfio-user message into named fields, with the protocol crate's decoders.
//!
//! A tracer must show what was sent, not what a server would accept, so a message that fails
//! to decode is reported with the decoder's error (and still forwarded by the caller); the
//! checks are the ones `vfud-protocol` applies, so "malformed" here means what vfud would
//! reject.

use std::os::fd::OwnedFd;

use serde_json::{json, Value};
use vfud_protocol::header::{Header, MessageKind};
use vfud_protocol::messages::feature::{
    self, vfud as vf, DmaLoggingControl, DmaLoggingReport, MigDeviceState,
};
use vfud_protocol::messages::irq::{
    IrqAction, IrqData, IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE,
};
use vfud_protocol::messages::region::{
    RegionCap, REGION_FLAG_CAPS, REGION_FLAG_MMAP, REGION_FLAG_READ, REGION_FLAG_WRITE,
};
use vfud_protocol::messages::{
    DeviceFeature, DeviceInfo, DmaAccess, DmaUnmap, IrqInfo, MigData, MigState, RegionAccess,
    RegionInfoReply, RegionIoFds, Request, VersionMessage,
};
use vfud_protocol::wire::WireReader;
use vfud_protocol::{Command, Limits, ProtocolError};

use crate::probe::{flag_list, region_name, IRQ_NAMES};

/// Which way a message went through the tracer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// From the client (QEMU) to the server.
    ClientToServer,
    /// From the server to the client (replies, and DMA_READ/DMA_WRITE commands).
    ServerToClient,
}

impl Dir {
    /// Short label: `C>S` or `S>C`.
    pub fn arrow(self) -> &'static str {
        match self {
            Dir::ClientToServer => "C>S",
            Dir::ServerToClient => "S>C",
        }
    }

    /// The other direction (where a reply to a command sent this way travels).
    pub fn reverse(self) -> Dir {
        match self {
            Dir::ClientToServer => Dir::ServerToClient,
            Dir::ServerToClient => Dir::ClientToServer,
        }
    }
}

/// What kind of message, as its header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A command (`no_reply` when the sender wants no answer).
    Command {
        /// NO_REPLY flag.
        no_reply: bool,
    },
    /// A successful reply.
    Reply,
    /// An error reply with its errno.
    Error(u32),
    /// The header's type bits name no message type.
    BadType,
}

/// One decoded message: its kind, command name and fields, or why it did not decode.
#[derive(Debug)]
pub struct Decoded {
    /// Command, reply or error.
    pub kind: Kind,
    /// The command's spec name (`DEVICE_GET_REGION_INFO`), or `CMD_<n>` for unknown numbers.
    pub name: String,
    /// Decoded fields in display order.
    pub fields: Vec<(&'static str, Value)>,
    /// The decoder's complaint when the message is malformed.
    pub problem: Option<String>,
}

/// `StopCopy` → `STOP_COPY`: the protocol crate's state names as the kernel spells them.
fn screaming(camel: &str) -> String {
    let mut out = String::new();
    for (i, ch) in camel.chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

/// The spec name of `cmd` (`DMA_MAP`), or `CMD_<n>` for numbers the protocol does not define.
pub fn command_name(cmd: u16) -> String {
    match Command::try_from(cmd) {
        Ok(c) => c.name().to_string(),
        Err(_) => format!("CMD_{cmd}"),
    }
}

/// Limits for decoding: as permissive as any peer could negotiate, since the tracer reports
/// rather than enforces.
pub fn tracer_limits() -> Limits {
    Limits::with_xfer(
        vfud_protocol::codec::SCM_MAX_FD,
        vfud_protocol::messages::version::MAX_MAX_DATA_XFER_SIZE * 4,
    )
}

/// Decode one message that went `dir`. `fds` are only counted (and duplicated for decoders
/// that check them); the caller forwards the originals.
pub fn decode(dir: Dir, h: &Header, payload: &[u8], fds: &[OwnedFd]) -> Decoded {
    let kind = match h.kind() {
        Ok(MessageKind::Command { no_reply }) => Kind::Command { no_reply },
        Ok(MessageKind::Reply) => Kind::Reply,
        Ok(MessageKind::ErrorReply(e)) => Kind::Error(e),
        Err(_) => Kind::BadType,
    };
    let mut d = Decoded {
        kind,
        name: command_name(h.cmd),
        fields: Vec::new(),
        problem: None,
    };
    let r = match kind {
        Kind::Command { .. } => command_fields(dir, h.cmd, payload, fds, &mut d.fields),
        Kind::Reply => reply_fields(h.cmd, payload, &mut d.fields),
        Kind::Error(_) if payload.is_empty() => Ok(()),
        Kind::Error(_) => Err(ProtocolError::invalid(
            "msg_size",
            format!("error reply with {} payload bytes", payload.len()),
        )),
        Kind::BadType => h.kind().map(|_| ()),
    };
    if let Err(e) = r {
        d.problem = Some(e.to_string());
    }
    if !fds.is_empty() {
        d.fields.push(("fds", json!(fds.len())));
    }
    d
}

fn hex(v: u64) -> Value {
    json!(format!("{v:#x}"))
}

/// Up to 16 bytes of data as hex, with `…` when there is more.
fn data_hex(data: &[u8]) -> Value {
    let mut s: String = data.iter().take(16).map(|b| format!("{b:02x}")).collect();
    if data.len() > 16 {
        s.push('…');
    }
    json!(s)
}

fn irq_name(index: u32) -> Value {
    json!(IRQ_NAMES
        .get(index as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| index.to_string()))
}

fn command_fields(
    dir: Dir,
    cmd: u16,
    payload: &[u8],
    fds: &[OwnedFd],
    f: &mut Vec<(&'static str, Value)>,
) -> Result<(), ProtocolError> {
    if dir == Dir::ServerToClient {
        // DMA_READ/DMA_WRITE: the only commands a server sends.
        let a = match Command::try_from(cmd)? {
            Command::DmaRead => DmaAccess::decode_read(payload)?,
            Command::DmaWrite => DmaAccess::decode_with_data(payload)?.0,
            _ => {
                return Err(ProtocolError::invalid(
                    "cmd",
                    "servers send only DMA_READ/DMA_WRITE commands",
                ))
            }
        };
        dma_access(a, f);
        return Ok(());
    }
    let dup: Vec<OwnedFd> = fds.iter().filter_map(|fd| fd.try_clone().ok()).collect();
    match Request::decode(cmd, payload, dup, &tracer_limits())? {
        Request::Version(v) => version_fields(&v, f),
        Request::DmaMap(m, fd) => {
            f.push(("iova", hex(m.addr)));
            f.push(("size", hex(m.size)));
            f.push(("offset", hex(m.offset)));
            f.push(("prot", json!(flag_list(m.flags, &[(1, "R"), (2, "W")]))));
            f.push(("fd_backed", json!(fd.is_some())));
        }
        Request::DmaUnmap(u) => unmap_fields(&u, f),
        Request::DeviceGetInfo(i) => f.push(("argsz", json!(i.argsz))),
        Request::GetRegionInfo(i) => {
            f.push(("region", json!(region_name(i.index))));
            f.push(("argsz", json!(i.argsz)));
        }
        Request::GetRegionIoFds(i) => f.push(("region", json!(region_name(i.index)))),
        Request::GetIrqInfo(i) => f.push(("irq", irq_name(i.index))),
        Request::SetIrqs(s) => {
            f.push(("irq", irq_name(s.index)));
            f.push(("start", json!(s.start)));
            f.push(("count", json!(s.count)));
            let action = match s.action {
                IrqAction::Mask => "MASK",
                IrqAction::Unmask => "UNMASK",
                IrqAction::Trigger => "TRIGGER",
            };
            f.push(("action", json!(action)));
            let data = match &s.data {
                IrqData::None => "NONE".to_string(),
                IrqData::Bool(v) => {
                    format!("BOOL{:?}", v.iter().map(|b| *b as u8).collect::<Vec<_>>())
                }
                IrqData::Eventfds(v) => format!("EVENTFD x{}", v.len()),
            };
            f.push(("data", json!(data)));
        }
        Request::RegionRead(a) => region_access(&a, f),
        Request::RegionWrite(a, data) => {
            region_access(&a, f);
            f.push(("data", data_hex(&data)));
        }
        Request::DeviceReset => {}
        Request::RegionWriteMulti(v) => {
            f.push(("writes", json!(v.len())));
            let shown: Vec<String> = v
                .iter()
                .take(4)
                .map(|e| format!("{}+{:#x}/{}", region_name(e.region), e.offset, e.count))
                .collect();
            f.push(("first", json!(shown.join(" "))));
        }
        Request::DeviceFeature(df) => feature_fields(&df, f)?,
        Request::MigDataRead(m) => f.push(("size", json!(m.size))),
        Request::MigDataWrite(d) => f.push(("size", json!(d.len()))),
    }
    Ok(())
}

fn version_fields(v: &VersionMessage, f: &mut Vec<(&'static str, Value)>) {
    f.push(("version", json!(format!("{}.{}", v.major, v.minor))));
    if let Some(c) = &v.caps {
        f.push(("caps", serde_json::to_value(c).unwrap_or(Value::Null)));
    }
}

fn unmap_fields(u: &DmaUnmap, f: &mut Vec<(&'static str, Value)>) {
    if u.is_all() {
        f.push(("all", json!(true)));
    } else {
        f.push(("iova", hex(u.addr)));
        f.push(("size", hex(u.size)));
    }
}

fn region_access(a: &RegionAccess, f: &mut Vec<(&'static str, Value)>) {
    f.push(("region", json!(region_name(a.region))));
    f.push(("offset", hex(a.offset)));
    f.push(("count", json!(a.count)));
}

fn dma_access(a: DmaAccess, f: &mut Vec<(&'static str, Value)>) {
    f.push(("iova", hex(a.addr)));
    f.push(("count", json!(a.count)));
}

fn feature_name(id: u16) -> String {
    match id {
        feature::FEATURE_MIGRATION => "MIGRATION".into(),
        feature::FEATURE_MIG_DEVICE_STATE => "MIG_DEVICE_STATE".into(),
        feature::FEATURE_DMA_LOGGING_START => "DMA_LOGGING_START".into(),
        feature::FEATURE_DMA_LOGGING_STOP => "DMA_LOGGING_STOP".into(),
        feature::FEATURE_DMA_LOGGING_REPORT => "DMA_LOGGING_REPORT".into(),
        feature::FEATURE_MIG_DATA_SIZE => "MIG_DATA_SIZE".into(),
        vf::FEATURE_PRECOPY_INFO => "VFUD_PRECOPY_INFO".into(),
        vf::FEATURE_MIGRATION_ORDERING => "VFUD_MIGRATION_ORDERING".into(),
        n => format!("{n:#x}"),
    }
}

fn state_name(s: u32) -> Value {
    json!(MigState::try_from(s)
        .map(|s| screaming(&format!("{s:?}")))
        .unwrap_or_else(|_| format!("?{s}")))
}

/// DEVICE_FEATURE request or reply: the feature, the operation and the data it carries.
fn feature_fields(
    df: &DeviceFeature,
    f: &mut Vec<(&'static str, Value)>,
) -> Result<(), ProtocolError> {
    f.push(("feature", json!(feature_name(df.feature))));
    let ops: Vec<&str> = [(df.get, "GET"), (df.set, "SET"), (df.probe, "PROBE")]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
    f.push(("op", json!(ops.join("|"))));
    if df.data.is_empty() {
        return Ok(());
    }
    let mut r = WireReader::new(&df.data, "feature data");
    match df.feature {
        feature::FEATURE_MIGRATION => {
            let flags: u64 = r.read()?;
            let names = [
                (feature::MIGRATION_STOP_COPY as u32, "STOP_COPY"),
                (feature::MIGRATION_P2P as u32, "P2P"),
                (feature::MIGRATION_PRE_COPY as u32, "PRE_COPY"),
            ];
            f.push(("migration_flags", json!(flag_list(flags as u32, &names))));
        }
        feature::FEATURE_MIG_DEVICE_STATE => {
            let s: MigDeviceState = r.read()?;
            f.push(("state", state_name(s.device_state)));
        }
        feature::FEATURE_MIG_DATA_SIZE => {
            let n: u64 = r.read()?;
            f.push(("stop_copy_length", json!(n)));
        }
        feature::FEATURE_DMA_LOGGING_START => {
            let c = DmaLoggingControl::decode(&df.data)?;
            f.push(("page_size", json!(c.page_size)));
            let ranges: Vec<String> = c
                .ranges
                .iter()
                .map(|r| format!("{:#x}+{:#x}", r.iova, r.length))
                .collect();
            f.push(("ranges", json!(ranges)));
        }
        feature::FEATURE_DMA_LOGGING_REPORT => {
            let rep: DmaLoggingReport = r.read()?;
            f.push(("iova", hex(rep.iova)));
            f.push(("length", hex(rep.length)));
            f.push(("page_size", json!(rep.page_size)));
            if r.remaining() > 0 {
                f.push(("bitmap_bytes", json!(r.remaining())));
            }
        }
        vf::FEATURE_PRECOPY_INFO => {
            let p: vf::PrecopyInfo = r.read()?;
            f.push(("initial_bytes", json!(p.initial_bytes)));
            f.push(("dirty_bytes", json!(p.dirty_bytes)));
        }
        vf::FEATURE_MIGRATION_ORDERING => {
            let o: vf::MigrationOrdering = r.read()?;
            let names = [
                (vf::ORDERING_CONFIG_BEFORE_DATA, "CONFIG_BEFORE_DATA"),
                (vf::ORDERING_SET_IRQS_DEFERRED, "SET_IRQS_DEFERRED"),
            ];
            f.push(("ordering", json!(flag_list(o.flags, &names))));
        }
        _ => f.push(("data_bytes", json!(df.data.len()))),
    }
    Ok(())
}

fn reply_fields(
    cmd: u16,
    payload: &[u8],
    f: &mut Vec<(&'static str, Value)>,
) -> Result<(), ProtocolError> {
    let Ok(c) = Command::try_from(cmd) else {
        f.push(("payload_bytes", json!(payload.len())));
        return Ok(());
    };
    match c {
        Command::Version => version_fields(&VersionMessage::decode(payload)?, f),
        Command::DeviceGetInfo => {
            let i = DeviceInfo::decode_request(payload)?;
            f.push((
                "flags",
                json!(flag_list(i.flags, &[(1, "RESET"), (2, "PCI")])),
            ));
            f.push(("regions", json!(i.num_regions)));
            f.push(("irqs", json!(i.num_irqs)));
        }
        Command::DeviceGetRegionInfo => {
            let r = RegionInfoReply::decode(payload)?;
            f.push(("region", json!(region_name(r.info.index))));
            f.push(("size", hex(r.info.size)));
            let names = [
                (REGION_FLAG_READ, "R"),
                (REGION_FLAG_WRITE, "W"),
                (REGION_FLAG_MMAP, "MMAP"),
                (REGION_FLAG_CAPS, "CAPS"),
            ];
            f.push(("flags", json!(flag_list(r.info.flags, &names))));
            f.push(("offset", hex(r.info.offset)));
            f.push(("argsz", json!(r.info.argsz)));
            if !r.caps.is_empty() {
                let caps: Vec<String> = r.caps.iter().map(cap_text).collect();
                f.push(("caps", json!(caps)));
            }
        }
        Command::DeviceGetRegionIoFds => {
            let (h, subs) = RegionIoFds::decode_reply(payload)?;
            f.push(("region", json!(region_name(h.index))));
            f.push(("subregions", json!(subs.len())));
        }
        Command::DeviceGetIrqInfo => {
            let i = IrqInfo::decode_request(payload)?;
            f.push(("irq", irq_name(i.index)));
            f.push(("count", json!(i.count)));
            let names = [
                (IRQ_INFO_EVENTFD, "EVENTFD"),
                (IRQ_INFO_MASKABLE, "MASKABLE"),
                (IRQ_INFO_AUTOMASKED, "AUTOMASKED"),
                (IRQ_INFO_NORESIZE, "NORESIZE"),
            ];
            f.push(("flags", json!(flag_list(i.flags, &names))));
        }
        Command::RegionRead => {
            let (a, data) = RegionAccess::decode_write(payload)?;
            region_access(&a, f);
            f.push(("data", data_hex(data)));
        }
        Command::RegionWrite => region_access(&RegionAccess::decode_read(payload)?, f),
        Command::DmaRead => dma_access(DmaAccess::decode_with_data(payload)?.0, f),
        Command::DmaWrite => dma_access(DmaAccess::decode_read(payload)?, f),
        Command::DmaUnmap => unmap_fields(&DmaUnmap::decode(payload)?, f),
        Command::DeviceFeature => feature_fields(&DeviceFeature::decode(payload)?, f)?,
        Command::MigDataRead => f.push(("size", json!(MigData::decode_write(payload)?.len()))),
        Command::DmaMap
        | Command::DeviceSetIrqs
        | Command::DeviceReset
        | Command::RegionWriteMulti
        | Command::MigDataWrite => {
            if !payload.is_empty() {
                f.push(("payload_bytes", json!(payload.len())));
            }
        }
    }
    Ok(())
}

fn cap_text(c: &RegionCap) -> String {
    match c {
        RegionCap::SparseMmap(areas) => {
            let a: Vec<String> = areas
                .iter()
                .map(|a| format!("{:#x}+{:#x}", a.offset, a.size))
                .collect();
            format!("sparse-mmap[{}]", a.join(","))
        }
        RegionCap::Type {
            region_type,
            subtype,
        } => format!("type {region_type}/{subtype}"),
        RegionCap::Other { id, version, data } => {
            format!("cap {id:#x} v{version} ({} bytes)", data.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names_follow_the_spec_spelling() {
        assert_eq!(command_name(2), "DMA_MAP");
        assert_eq!(command_name(5), "DEVICE_GET_REGION_INFO");
        assert_eq!(command_name(15), "REGION_WRITE_MULTI");
        assert_eq!(command_name(17), "MIG_DATA_READ");
        assert_eq!(command_name(14), "CMD_14");
    }

    #[test]
    fn a_short_region_read_is_reported_malformed() {
        let h = Header::command(3, Command::RegionRead, 3, false);
        let d = decode(Dir::ClientToServer, &h, &[1, 2, 3], &[]);
        assert_eq!(d.name, "REGION_READ");
        assert!(
            d.problem.as_deref().unwrap_or("").contains("REGION_READ"),
            "{d:?}"
        );
    }

    #[test]
    fn a_mig_device_state_set_shows_the_state() {
        let df = DeviceFeature {
            argsz: 16,
            feature: feature::FEATURE_MIG_DEVICE_STATE,
            get: false,
            set: true,
            probe: false,
            data: vec![3, 0, 0, 0, 0, 0, 0, 0],
        };
        let p = df.encode();
        let h = Header::command(1, Command::DeviceFeature, p.len(), false);
        let d = decode(Dir::ClientToServer, &h, &p, &[]);
        assert_eq!(d.problem, None);
        let state = d
            .fields
            .iter()
            .find(|(k, _)| *k == "state")
            .map(|(_, v)| v.clone());
        assert_eq!(state, Some(json!("STOP_COPY")));
    }
}
