//! Stream round trips and refusals.
use super::*;
use crate::migration::DeviceState;
use crate::mmap::SharedMemory;

fn bars() -> [Option<SharedMemory>; 6] {
    let mut b: [Option<SharedMemory>; 6] = Default::default();
    b[2] = Some(SharedMemory::new("t", 64 * 1024).unwrap());
    b
}

fn header() -> StreamHeader {
    StreamHeader {
        ordering: 2,
        state_version: 1,
        model: "dma-engine".into(),
    }
}

fn final_state() -> Result<FinalState, crate::DeviceError> {
    Ok(FinalState {
        config: vec![7; 256],
        irq: vec![0; 4],
        msix: Vec::new(),
        device: DeviceState {
            version: 1,
            payload: b"{}".to_vec(),
        },
    })
}

fn loader(model: &str) -> Loader {
    let mut bars = [0; 6];
    bars[2] = 64 * 1024;
    Loader::new(Shape {
        model: model.into(),
        bars,
        config_len: 256,
        irq_len: 4,
        msix_len: 0,
        max_device_state: 1 << 20,
    })
}

fn whole_stream(b: &[Option<SharedMemory>; 6]) -> Vec<u8> {
    let mut s = Saver::new(&header(), b, true);
    let mut f = final_state;
    let mut out = Vec::new();
    loop {
        let chunk = s.read(10_000, b, Some(&mut f)).unwrap();
        if chunk.is_empty() {
            break;
        }
        out.extend(chunk);
    }
    out
}

#[test]
fn stream_round_trips_and_stages_memory() {
    let b = bars();
    b[2].as_ref().unwrap().write(100, b"payload").unwrap();
    let s = whole_stream(&b);
    let dst = bars();
    let mut l = loader("dma-engine");
    for c in s.chunks(777) {
        l.write(c, &dst).unwrap();
    }
    let st = l.finish().unwrap();
    assert_eq!(st.header.unwrap(), header());
    assert_eq!(st.config.unwrap(), vec![7; 256]);
    let mut got = [0u8; 7];
    dst[2].as_ref().unwrap().read(100, &mut got).unwrap();
    assert_eq!(&got, b"payload");
}

#[test]
fn precopy_reports_shrinking_initial_and_growing_dirty_bytes() {
    let b = bars();
    let mut s = Saver::new(&header(), &b, true);
    let start = s.initial_bytes();
    assert!(start >= 64 * 1024);
    let first = s.read(16 * 1024, &b, None).unwrap();
    assert_eq!(first.len(), 16 * 1024, "full chunks");
    assert!(s.initial_bytes() < start);
    while !s.read(1 << 20, &b, None).unwrap().is_empty() {}
    assert_eq!(s.initial_bytes(), 0);
    assert_eq!(s.dirty_bytes(&b), 0);
    b[2].as_ref().unwrap().write(5000, &[1]).unwrap();
    assert_eq!(s.dirty_bytes(&b), 4096);
    let delta = s.read(1 << 20, &b, None).unwrap();
    assert!(delta.len() > 4096 && delta.len() < 2 * 4096);
    assert_eq!(s.dirty_bytes(&b), 0);
}

#[test]
fn every_sampled_bit_flip_is_refused() {
    let b = bars();
    let s = whole_stream(&b);
    let step = (s.len() * 8 / 1200).max(1);
    let mut tried = 0;
    for bit in (0..s.len() * 8).step_by(step) {
        let mut m = s.clone();
        m[bit / 8] ^= 1 << (bit % 8);
        let mut l = loader("dma-engine");
        let ok = l.write(&m, &b).is_ok() && l.finish().is_ok();
        assert!(!ok, "flip of bit {bit} accepted");
        tried += 1;
    }
    assert!(tried >= 1000);
}

#[test]
fn wrong_model_and_truncation_are_refused() {
    let b = bars();
    let s = whole_stream(&b);
    let mut l = loader("uart16550");
    assert!(matches!(
        l.write(&s, &b),
        Err(StreamError::ModelMismatch { .. })
    ));
    let mut l = loader("dma-engine");
    l.write(&s[..s.len() - 1], &b).unwrap();
    assert!(matches!(l.finish(), Err(StreamError::Truncated(_))));
    let mut l = loader("dma-engine");
    assert_eq!(
        l.write(&[0xff; 40], &b),
        Err(StreamError::SectionTooLarge(u64::MAX))
    );
    let mut l = loader("dma-engine");
    let mut bad = vec![1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0];
    bad.extend([1, 2, 3, 4]);
    assert!(matches!(
        l.write(&bad, &b),
        Err(StreamError::CrcMismatch { offset: 0, .. })
    ));
}

/// A stream with a valid CRC on every section, from the given sections.
fn forged(sections: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, p) in sections {
        put_section(&mut out, *k, p);
    }
    out
}

fn memory(bar: u8, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = vec![bar, 0, 0, 0, 0, 0, 0, 0];
    p.extend(offset.to_le_bytes());
    p.extend(data);
    p
}

#[test]
fn lies_with_valid_crcs_are_refused_each_with_its_own_error() {
    let h = (kind::HEADER, header().encode());
    let b = bars();
    let refuse = |sections: Vec<(u16, Vec<u8>)>| {
        loader("dma-engine")
            .write(&forged(&sections), &b)
            .unwrap_err()
    };
    let mut bad_magic = header().encode();
    bad_magic[0] ^= 1;
    assert_eq!(
        refuse(vec![(kind::HEADER, bad_magic)]),
        StreamError::BadMagic
    );
    let mut other_version = header().encode();
    other_version[8] = 9;
    assert_eq!(
        refuse(vec![(kind::HEADER, other_version)]),
        StreamError::FormatVersion(9)
    );
    assert_eq!(
        refuse(vec![h.clone(), (0x77, vec![])]),
        StreamError::UnknownSection(0x77)
    );
    assert_eq!(
        refuse(vec![h.clone(), (kind::BAR_MEMORY, memory(0, 0, &[1]))]),
        StreamError::NoSuchBar(0)
    );
    assert_eq!(
        refuse(vec![h.clone(), (kind::BAR_MEMORY, memory(9, 0, &[1]))]),
        StreamError::NoSuchBar(9)
    );
    assert!(matches!(
        refuse(vec![
            h.clone(),
            (kind::BAR_MEMORY, memory(2, 64 * 1024 - 1, &[1, 2]))
        ]),
        StreamError::OutOfRange { bar: 2, .. }
    ));
    assert!(matches!(
        refuse(vec![
            h.clone(),
            (kind::BAR_MEMORY, memory(2, u64::MAX, &[1]))
        ]),
        StreamError::OutOfRange { .. }
    ));
    assert!(matches!(
        refuse(vec![h.clone(), (kind::IRQ_STATE, vec![0; 9])]),
        StreamError::SizeMismatch {
            what: "interrupt state",
            ..
        }
    ));
    assert!(matches!(
        refuse(vec![h.clone(), (kind::CONFIG, vec![0; 4096])]),
        StreamError::SizeMismatch { what: "config", .. }
    ));
    let mut big_state = vec![1, 0];
    big_state.resize(2 + (1 << 20) + 1, b' ');
    assert!(matches!(
        refuse(vec![h.clone(), (kind::DEVICE_STATE, big_state)]),
        StreamError::TooLarge {
            what: "device state",
            ..
        }
    ));
    assert_eq!(
        refuse(vec![(kind::CONFIG, vec![0; 256])]),
        StreamError::BadMagic,
        "no header first"
    );
}

#[test]
fn memory_is_written_in_place_and_rolled_back_on_failure() {
    let dst = bars();
    dst[2]
        .as_ref()
        .unwrap()
        .write(8192, b"destination own")
        .unwrap();
    let s = forged(&[
        (kind::HEADER, header().encode()),
        (kind::BAR_MEMORY, memory(2, 8192, &[1; 10])),
        (kind::BAR_MEMORY, memory(2, 8192, &[2; 5])),
    ]);
    let mut l = loader("dma-engine");
    l.write(&s, &dst).unwrap();
    let mut got = [0u8; 15];
    dst[2].as_ref().unwrap().read(8192, &mut got).unwrap();
    assert_eq!(
        &got[..10],
        &[2, 2, 2, 2, 2, 1, 1, 1, 1, 1],
        "later sections win"
    );
    // The stream ends without device state: refused, and the memory is put back.
    l.write(&forged(&[(kind::END, vec![])]), &dst).unwrap();
    assert!(l.finish().is_err());
    l.rollback(&dst);
    dst[2].as_ref().unwrap().read(8192, &mut got).unwrap();
    assert_eq!(&got, b"destination own");
}

#[test]
fn a_refused_section_rolls_memory_back_at_once() {
    let dst = bars();
    let s = forged(&[
        (kind::HEADER, header().encode()),
        (kind::BAR_MEMORY, memory(2, 0, &[9; 4])),
        (kind::BAR_MEMORY, memory(2, 1 << 20, &[9; 4])),
    ]);
    assert!(loader("dma-engine").write(&s, &dst).is_err());
    let mut got = [1u8; 4];
    dst[2].as_ref().unwrap().read(0, &mut got).unwrap();
    assert_eq!(got, [0; 4]);
}

#[test]
fn stop_copy_makes_one_pass_over_device_memory() {
    let b = bars();
    let mem = b[2].as_ref().unwrap();
    let mut s = Saver::new(&header(), &b, true);
    let mut stream = Vec::new();
    loop {
        let chunk = s.read(1 << 20, &b, None).unwrap();
        if chunk.is_empty() {
            break;
        }
        stream.extend(chunk);
    }
    let precopy = stream.len();
    mem.write(5000, &[1]).unwrap();
    let mut f = final_state;
    stream.extend(s.read(100, &b, Some(&mut f)).unwrap());
    // Device memory is frozen once stopped (a change now would be a bug elsewhere), so the
    // pass just made is the last: a second one found nothing and doubled the downtime.
    mem.write(9000, &[2]).unwrap();
    assert_eq!(s.dirty_bytes(&b) + 8192, s.stop_copy_estimate(&b));
    loop {
        let chunk = s.read(100, &b, Some(&mut f)).unwrap();
        if chunk.is_empty() {
            break;
        }
        stream.extend(chunk);
    }
    assert!(s.is_finished());
    assert!(
        stream.len() - precopy < 4096 + 1024,
        "one delta page and the final sections"
    );
    let dst = bars();
    let mut l = loader("dma-engine");
    l.write(&stream, &dst).unwrap();
    l.finish().unwrap();
    let mut got = [0u8; 1];
    dst[2].as_ref().unwrap().read(5000, &mut got).unwrap();
    assert_eq!(got, [1], "the page dirtied before the stop arrived");
    dst[2].as_ref().unwrap().read(9000, &mut got).unwrap();
    assert_eq!(got, [0], "no second pass picked up a write after it");
}

#[test]
fn sections_built_straight_into_the_reply_make_the_same_stream() {
    let b: [Option<SharedMemory>; 6] = {
        let mut b: [Option<SharedMemory>; 6] = Default::default();
        b[2] = Some(SharedMemory::new("t", 64 * 1024).unwrap());
        b[4] = Some(SharedMemory::new("u", 3 * MEMORY_CHUNK + 4096).unwrap());
        b
    };
    b[4].as_ref()
        .unwrap()
        .fill(0, 3 * MEMORY_CHUNK + 4096, 0x5a)
        .unwrap();
    // Large reads take whole sections straight into the reply; odd sizes split them.
    let mut whole = Vec::new();
    for max in [1 << 20, 70_000, 1 << 20, 300_000] {
        let mut s = Saver::new(&header(), &b, false);
        let mut f = final_state;
        let mut stream = Vec::new();
        loop {
            let n = s.read_into(&mut stream, max, &b, Some(&mut f)).unwrap();
            assert!(n <= max);
            if n == 0 {
                break;
            }
        }
        if whole.is_empty() {
            whole = stream;
        } else {
            assert_eq!(stream, whole, "reads of {max} bytes");
        }
    }
}

#[test]
fn writes_of_any_size_load_the_same_stream() {
    let b = bars();
    b[2].as_ref().unwrap().fill(0, 64 * 1024, 0x5a).unwrap();
    let s = whole_stream(&b);
    for size in [1, 15, 16, 17, 4111, s.len()] {
        let dst = bars();
        let mut l = loader("dma-engine");
        for c in s.chunks(size) {
            l.write(c, &dst).unwrap();
        }
        assert_eq!(l.consumed(), s.len() as u64, "writes of {size} bytes");
        assert!(l.finish().is_ok(), "writes of {size} bytes");
        let mut got = vec![0u8; 64 * 1024];
        dst[2].as_ref().unwrap().read(0, &mut got).unwrap();
        assert!(got.iter().all(|&x| x == 0x5a), "writes of {size} bytes");
    }
}

#[test]
fn the_backup_skips_holes_and_a_rollback_gives_the_pages_back() {
    let dst = bars();
    let mem = dst[2].as_ref().unwrap();
    mem.write(2 * 4096, b"kept").unwrap();
    let mut l = loader("dma-engine");
    l.back_up(&dst).unwrap();
    let s = forged(&[
        (kind::HEADER, header().encode()),
        (kind::BAR_MEMORY, memory(2, 0, &[3; 16 * 1024])),
    ]);
    l.write(&s, &dst).unwrap();
    assert_eq!(mem.data_ranges(), vec![0..16 * 1024]);
    l.rollback(&dst);
    assert_eq!(
        mem.data_ranges(),
        vec![2 * 4096..3 * 4096],
        "only the page that held data"
    );
    let mut got = [0u8; 8];
    mem.read(2 * 4096 - 4, &mut got).unwrap();
    assert_eq!(&got, b"\0\0\0\0kept");
}

#[test]
fn replies_sent_from_the_mapping_load_the_same_memory() {
    const BIG: usize = 3 * MEMORY_CHUNK + 4096;
    let mk = || {
        let mut b: [Option<SharedMemory>; 6] = Default::default();
        b[2] = Some(SharedMemory::new("t", 64 * 1024).unwrap());
        b[4] = Some(SharedMemory::new("u", BIG).unwrap());
        b
    };
    let src = mk();
    src[4].as_ref().unwrap().fill(0, BIG, 0x5a).unwrap();
    src[2].as_ref().unwrap().write(10, b"small bar").unwrap();
    for max in [1 << 20, 70_000, 300_000, 100] {
        let mut s = Saver::new(&header(), &src, false);
        let mut f = final_state;
        let dst = mk();
        let mut bars = [0; 6];
        bars[2] = 64 * 1024;
        bars[4] = BIG as u64;
        let mut l = Loader::new(Shape {
            model: "dma-engine".into(),
            bars,
            config_len: 256,
            irq_len: 4,
            msix_len: 0,
            max_device_state: 1 << 20,
        });
        let mut referenced = 0;
        loop {
            let (mut bytes, mut parts) = (Vec::new(), Vec::new());
            let n = s
                .read_reply(&mut bytes, &mut parts, max, &src, Some(&mut f))
                .unwrap();
            let reply = crate::dispatch::Reply {
                payload: bytes,
                memory: parts,
                ..Default::default()
            };
            referenced += reply.memory.iter().map(|m| m.len).sum::<usize>();
            let wire = reply.to_bytes(&src).unwrap();
            assert_eq!(wire.len(), n, "reads of {max} bytes");
            assert!(n <= max, "reads of {max} bytes");
            if n == 0 {
                break;
            }
            l.write(&wire, &dst).unwrap();
        }
        assert!(l.finish().is_ok(), "reads of {max} bytes");
        if max >= 70_000 {
            assert!(
                referenced >= BIG,
                "memory sent from the mapping ({max}-byte reads)"
            );
        }
        let (mut a, mut b) = (vec![0u8; BIG], vec![1u8; BIG]);
        src[4].as_ref().unwrap().read(0, &mut a).unwrap();
        dst[4].as_ref().unwrap().read(0, &mut b).unwrap();
        assert!(a == b, "reads of {max} bytes");
        let mut small = [0u8; 9];
        dst[2].as_ref().unwrap().read(10, &mut small).unwrap();
        assert_eq!(&small, b"small bar");
    }
}
