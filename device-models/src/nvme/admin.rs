//! Admin commands (§5): Identify, queue creation and deletion, features, log pages, Abort,
//! Asynchronous Event Request, Doorbell Buffer Config.

use vfud_server::DeviceCtx;

use super::command::{fail, Command, Outcome};
use super::ctrl::{Cq, Ctrl, Dbbuf, Sq};
use super::identify;
use super::namespace::Namespace;
use super::prp::Stop;
use super::spec::{admin, status, SqeFields, MAX_QUEUE_ENTRIES, PAGE};

/// Feature identifiers the controller keeps (§5.21.1).
mod fid {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    /// Features whose value is accepted and remembered (Get returns what Set stored).
    pub const KEPT: &[u8] = &[
        ARBITRATION,
        POWER_MANAGEMENT,
        TEMPERATURE_THRESHOLD,
        ERROR_RECOVERY,
        VOLATILE_WRITE_CACHE,
        INTERRUPT_COALESCING,
        INTERRUPT_VECTOR_CONFIG,
        WRITE_ATOMICITY,
        ASYNC_EVENT_CONFIG,
    ];
}

/// Most Asynchronous Event Requests held at once (AERL + 1).
pub const MAX_AERS: usize = 4;

/// What the admin commands see besides the command.
pub struct AdminCtx<'a> {
    /// The controller.
    pub ctrl: &'a mut Ctrl,
    /// The namespace.
    pub ns: &'a Namespace,
    /// Serial number.
    pub serial: &'a str,
    /// Whether shadow doorbells are offered.
    pub dbbuf: bool,
    /// Asynchronous Event Requests already parked.
    pub parked_aers: usize,
}

impl AdminCtx<'_> {
    fn io_queues(&self) -> u16 {
        (self.ctrl.sqs.len() - 1) as u16
    }

    fn nguid(&self) -> [u8; 16] {
        let mut g = [0u8; 16];
        let s = self.serial.as_bytes();
        g[..s.len().min(16)].copy_from_slice(&s[..s.len().min(16)]);
        g[15] = 1;
        g
    }
}

fn ok(result: u32) -> Result<Outcome, Stop> {
    Ok(Outcome::Done(status::SUCCESS, result))
}

/// Execute (a step of) an admin command.
pub fn exec(
    cmd: &mut Command,
    a: &mut AdminCtx<'_>,
    cx: &mut DeviceCtx<'_>,
) -> Result<Outcome, Stop> {
    let sqe = cmd.sqe;
    match sqe.opcode() {
        admin::IDENTIFY => {
            let page = match sqe.cdw(10) & 0xff {
                0 if sqe.nsid() == 1 => identify::namespace(a.ns, a.nguid()),
                0 | 3 if sqe.nsid() != 1 => return Err(fail(status::INVALID_NAMESPACE)),
                1 => identify::controller(a.serial, a.dbbuf),
                2 => identify::active_list(sqe.nsid()),
                3 => identify::descriptors(a.nguid()),
                _ => return Err(fail(status::INVALID_FIELD)),
            };
            cmd.send(&page, identify::PAGE_BYTES as u64, cx)?;
            ok(0)
        }
        admin::GET_LOG_PAGE => {
            let lid = sqe.cdw(10) as u8;
            let numd = u64::from(sqe.cdw(10) >> 16) | u64::from(sqe.cdw(11) & 0xffff) << 16;
            let len = (numd + 1) * 4;
            let offset = u64::from(sqe.cdw(12)) | u64::from(sqe.cdw(13)) << 32;
            let page = identify::log_page(lid, a.ctrl).ok_or(fail(status::INVALID_LOG_PAGE))?;
            if offset % 4 != 0 || offset > page.len() as u64 || len > 16 * PAGE {
                return Err(fail(status::INVALID_FIELD));
            }
            cmd.send(&page[offset as usize..], len, cx)?;
            ok(0)
        }
        admin::CREATE_CQ => create_cq(cmd, a),
        admin::CREATE_SQ => create_sq(cmd, a),
        admin::DELETE_SQ => {
            let qid = sqe.cdw(10) as u16;
            match a.ctrl.sqs.get_mut(usize::from(qid)) {
                Some(q @ Some(_)) if qid != 0 => {
                    *q = None;
                    ok(0)
                }
                _ => Err(fail(status::INVALID_QID)),
            }
        }
        admin::DELETE_CQ => {
            let qid = sqe.cdw(10) as u16;
            if qid == 0 || a.ctrl.cqs.get(usize::from(qid)).is_none_or(|q| q.is_none()) {
                return Err(fail(status::INVALID_QID));
            }
            if a.ctrl.sqs.iter().flatten().any(|s| s.cqid == qid) {
                return Err(fail(status::INVALID_QUEUE_DELETION));
            }
            a.ctrl.cqs[usize::from(qid)] = None;
            ok(0)
        }
        admin::SET_FEATURES => set_features(cmd, a),
        admin::GET_FEATURES => {
            let f = sqe.cdw(10) as u8;
            let sel = (sqe.cdw(10) >> 8) & 7;
            if sel == 3 {
                return ok(0); // supported capabilities: nothing saveable or changeable per NS
            }
            match f {
                fid::NUMBER_OF_QUEUES => {
                    let n = u32::from(a.io_queues() - 1);
                    ok(n | n << 16)
                }
                f if fid::KEPT.contains(&f) => ok(a.ctrl.feature(f)),
                _ => Err(fail(status::INVALID_FIELD)),
            }
        }
        admin::ABORT => ok(1), // bit 0 "not aborted" unless the engine finds the target waiting
        admin::ASYNC_EVENT => {
            if a.parked_aers >= MAX_AERS {
                return Err(fail(status::AER_LIMIT));
            }
            Ok(Outcome::Park)
        }
        admin::DBBUF_CONFIG if a.dbbuf => {
            let (dbs, eis) = (sqe.prp1(), sqe.prp2());
            if dbs == 0 || eis == 0 || dbs % PAGE != 0 || eis % PAGE != 0 {
                return Err(fail(status::INVALID_FIELD));
            }
            a.ctrl.dbbuf = Some(Dbbuf { dbs, eis });
            ok(0)
        }
        _ => Err(fail(status::INVALID_OPCODE)),
    }
}

/// Queue id and entries from CDW10 (QID, 0-based QSIZE), checked against the controller.
fn queue_params(cmd: &Command, a: &AdminCtx<'_>) -> Result<(u16, u16), Stop> {
    let qid = cmd.sqe.cdw(10) as u16;
    let entries = (cmd.sqe.cdw(10) >> 16) + 1;
    if qid == 0 || qid > a.io_queues() {
        return Err(fail(status::INVALID_QID));
    }
    if !(2..=MAX_QUEUE_ENTRIES).contains(&entries) {
        return Err(fail(status::INVALID_QSIZE));
    }
    let base = cmd.sqe.prp1();
    if base == 0 || !base.is_multiple_of(PAGE) {
        return Err(fail(status::INVALID_FIELD));
    }
    // Queues must be physically contiguous (CAP.CQR): PC must be set.
    if cmd.sqe.cdw(11) & 1 == 0 {
        return Err(fail(status::INVALID_FIELD));
    }
    Ok((qid, entries as u16))
}

fn create_cq(cmd: &Command, a: &mut AdminCtx<'_>) -> Result<Outcome, Stop> {
    let (qid, size) = queue_params(cmd, a)?;
    if a.ctrl.cqs[usize::from(qid)].is_some() {
        return Err(fail(status::INVALID_QID));
    }
    let cdw11 = cmd.sqe.cdw(11);
    let iv = (cdw11 >> 16) as u16;
    // One vector per completion queue at most: MSI-X has io_queues + 1 entries.
    if iv > a.io_queues() {
        return Err(fail(status::INVALID_VECTOR));
    }
    a.ctrl.cqs[usize::from(qid)] = Some(Cq {
        base: cmd.sqe.prp1(),
        size,
        phase: true,
        iv,
        ien: cdw11 & 2 != 0,
        ..Cq::default()
    });
    ok(0)
}

fn create_sq(cmd: &Command, a: &mut AdminCtx<'_>) -> Result<Outcome, Stop> {
    let (qid, size) = queue_params(cmd, a)?;
    let cqid = (cmd.sqe.cdw(11) >> 16) as u16;
    if a.ctrl.sqs[usize::from(qid)].is_some() {
        return Err(fail(status::INVALID_QID));
    }
    if cqid == 0
        || a.ctrl
            .cqs
            .get(usize::from(cqid))
            .is_none_or(|c| c.is_none())
    {
        return Err(fail(status::INVALID_CQ));
    }
    a.ctrl.sqs[usize::from(qid)] = Some(Sq {
        base: cmd.sqe.prp1(),
        size,
        cqid,
        ..Sq::default()
    });
    ok(0)
}

fn set_features(cmd: &Command, a: &mut AdminCtx<'_>) -> Result<Outcome, Stop> {
    let f = cmd.sqe.cdw(10) as u8;
    let save = cmd.sqe.cdw(10) & (1 << 31) != 0;
    let v = cmd.sqe.cdw(11);
    if save {
        return Err(fail(status::FEATURE_NOT_SAVEABLE));
    }
    match f {
        fid::NUMBER_OF_QUEUES => {
            if v & 0xffff == 0xffff || v >> 16 == 0xffff {
                return Err(fail(status::INVALID_FIELD));
            }
            // The answer is what the controller has, whatever was asked (0-based).
            let n = u32::from(a.io_queues() - 1);
            ok(n | n << 16)
        }
        f if fid::KEPT.contains(&f) => {
            // Accepted and remembered; coalescing and the rest change no behaviour here.
            a.ctrl.set_feature(f, v);
            ok(0)
        }
        _ => Err(fail(status::INVALID_FIELD)),
    }
}
