//! The asynchronous socket-DMA path over a real socket, with the test playing QEMU by hand:
//! the server keeps answering while its DMA_READ waits, takes replies out of order and late,
//! and fails a job cleanly (keeping the device) when the client goes away mid-DMA.

mod common;

use std::time::Duration;

use common::Vfud;
use vfud_devices::dma_engine::{reg, Opcode, STATUS_BUSY, STATUS_DONE, STATUS_ERROR};
use vfud_protocol::codec::{send_reply, Frame};
use vfud_protocol::header::{Command, MessageKind};
use vfud_protocol::messages::dma::{DmaAccess, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::RegionAccess;
use vfud_protocol::wire::put;
use vfud_protocol::Client;

const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
const IOVA: u64 = 0x4000_0000;
const SIZE: usize = 2 << 20;

/// Guest RAM the test serves by hand.
struct Ram(Vec<u8>);

impl Ram {
    fn new() -> Self {
        Self((0..SIZE).map(|i| (i % 241) as u8).collect())
    }

    /// Answer one DMA request from the server.
    fn answer(&mut self, c: &Client, f: &Frame) {
        let (a, payload) = match Command::try_from(f.header.cmd) {
            Ok(Command::DmaRead) => {
                let a = DmaAccess::decode_read(&f.payload).unwrap();
                let at = (a.addr - IOVA) as usize;
                (a, a.encode_with_data(&self.0[at..at + a.count as usize]))
            }
            Ok(Command::DmaWrite) => {
                let (a, data) = DmaAccess::decode_with_data(&f.payload).unwrap();
                let at = (a.addr - IOVA) as usize;
                self.0[at..at + data.len()].copy_from_slice(data);
                let mut p = Vec::new();
                put(&mut p, &a);
                (a, p)
            }
            other => panic!("unexpected server request {other:?}"),
        };
        assert!(a.count > 0);
        send_reply(
            std::os::fd::AsFd::as_fd(c.stream()),
            &f.header,
            &payload,
            &[],
        )
        .unwrap();
    }
}

fn attach(v: &Vfud) -> Client {
    let mut c = v.client();
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    c.dma_map(RW, 0, IOVA, SIZE as u64, None).unwrap();
    c
}

/// Send a 4-byte register write and wait for its reply, setting DMA requests aside.
fn write_reg(c: &mut Client, off: u64, v: u32, aside: &mut Vec<Frame>) {
    let a = RegionAccess {
        offset: off,
        region: 0,
        count: 4,
    };
    let h = c
        .send_command(
            Command::RegionWrite,
            &a.encode_with_data(&v.to_le_bytes()),
            &[],
            false,
        )
        .unwrap();
    wait_reply(c, h.msg_id, aside);
}

/// Read a register, setting DMA requests aside.
fn read_reg(c: &mut Client, off: u64, aside: &mut Vec<Frame>) -> u32 {
    let a = RegionAccess {
        offset: off,
        region: 0,
        count: 4,
    };
    let mut p = Vec::new();
    put(&mut p, &a);
    let h = c.send_command(Command::RegionRead, &p, &[], false).unwrap();
    let f = wait_reply(c, h.msg_id, aside);
    u32::from_le_bytes(f.payload[16..20].try_into().unwrap())
}

fn wait_reply(c: &mut Client, id: u16, aside: &mut Vec<Frame>) -> Frame {
    loop {
        let f = c
            .recv_frame()
            .expect("the server answers while its DMA waits");
        match f.header.kind().unwrap() {
            MessageKind::Command { .. } => aside.push(f),
            MessageKind::Reply if f.header.msg_id == id => return f,
            k => panic!("unexpected {k:?} id {}", f.header.msg_id),
        }
    }
}

fn start(c: &mut Client, op: Opcode, src: u64, dst: u64, len: u32, aside: &mut Vec<Frame>) {
    for (o, v) in common::dma_engine::job_registers(op, src, dst, len, 0x5e) {
        write_reg(c, o, v, aside);
    }
}

#[test]
fn registers_are_answered_while_a_dma_read_waits() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = attach(&v);
    let mut ram = Ram::new();
    let mut aside = Vec::new();
    start(&mut c, Opcode::Crc32, IOVA, 0, SIZE as u32, &mut aside);
    // Hold the first DMA_READ unanswered and poll STATUS a hundred times.
    while aside.is_empty() {
        assert_ne!(read_reg(&mut c, reg::STATUS, &mut aside) & STATUS_BUSY, 0);
    }
    for _ in 0..100 {
        assert_eq!(read_reg(&mut c, reg::STATUS, &mut aside), STATUS_BUSY);
    }
    // Now serve the device until the job is done.
    let mut served = 0;
    loop {
        for f in std::mem::take(&mut aside) {
            ram.answer(&c, &f);
            served += 1;
        }
        let s = read_reg(&mut c, reg::STATUS, &mut aside);
        if s & STATUS_BUSY == 0 {
            assert_eq!(s, STATUS_DONE);
            break;
        }
    }
    assert!(
        served >= SIZE / (64 << 10),
        "one DMA_READ per 64 KiB at least, got {served}"
    );
    assert_eq!(
        read_reg(&mut c, reg::RESULT, &mut aside),
        crc32fast::hash(&ram.0)
    );
}

#[test]
fn writes_acknowledged_late_and_out_of_order_complete_the_job() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = attach(&v);
    let mut ram = Ram::new();
    let mut aside = Vec::new();
    start(&mut c, Opcode::Fill, 0, IOVA, (1 << 20) as u32, &mut aside);
    // Collect the posted DMA_WRITEs (16 in flight at most) while STATUS stays BUSY.
    let mut held = Vec::new();
    let mut acked_late = 0;
    loop {
        held.append(&mut aside);
        let s = read_reg(&mut c, reg::STATUS, &mut aside);
        if s & STATUS_BUSY == 0 {
            break;
        }
        if held.len() >= 16 {
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(
                read_reg(&mut c, reg::STATUS, &mut aside),
                STATUS_BUSY,
                "not done before acks"
            );
            held.append(&mut aside);
            while let Some(f) = held.pop() {
                ram.answer(&c, &f); // last first
                acked_late += 1;
            }
        }
    }
    for f in held.drain(..) {
        ram.answer(&c, &f);
    }
    assert_eq!(read_reg(&mut c, reg::STATUS, &mut aside), STATUS_DONE);
    assert!(
        acked_late >= 16,
        "the writes were held and acknowledged in reverse: {acked_late}"
    );
    assert!(ram.0[..1 << 20].iter().all(|b| *b == 0x5e));
    assert_eq!(
        ram.0[1 << 20],
        ((1 << 20) % 241) as u8,
        "nothing past the job"
    );
}

#[test]
fn a_client_leaving_mid_dma_fails_the_job_and_the_device_stays() {
    let v = Vfud::start("dma-engine", &[]);
    {
        let mut c = attach(&v);
        let mut aside = Vec::new();
        start(&mut c, Opcode::Crc32, IOVA, 0, SIZE as u32, &mut aside);
        while aside.is_empty() {
            read_reg(&mut c, reg::STATUS, &mut aside);
        }
        // Gone without answering.
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut c = v.client();
    let s = c.region_read_u32(0, reg::STATUS).unwrap();
    assert_eq!(s, STATUS_ERROR, "failed cleanly, not BUSY forever");
    assert_eq!(c.region_read_u32(0, reg::COMPLETIONS).unwrap(), 1);
    assert_ne!(c.region_read_u32(0, reg::ERROR_CODE).unwrap(), 0);
}
