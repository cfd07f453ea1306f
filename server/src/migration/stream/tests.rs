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

fn whole_stream(b: &[Option<SharedMemory>; 6]) -> Vec<u8> {
    let mut s = Saver::new(&header(), b);
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
    let mut l = Loader::new("dma-engine");
    for c in s.chunks(777) {
        l.write(c).unwrap();
    }
    let st = l.finish().unwrap();
    assert_eq!(st.header.unwrap(), header());
    assert_eq!(st.config.unwrap(), vec![7; 256]);
    let (bar, off, data) = &st.memory[0];
    assert_eq!((*bar, *off), (2, 0));
    assert_eq!(&data[100..107], b"payload");
}

#[test]
fn precopy_reports_shrinking_initial_and_growing_dirty_bytes() {
    let b = bars();
    let mut s = Saver::new(&header(), &b);
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
        let mut l = Loader::new("dma-engine");
        let ok = l.write(&m).is_ok() && l.finish().is_ok();
        assert!(!ok, "flip of bit {bit} accepted");
        tried += 1;
    }
    assert!(tried >= 1000);
}

#[test]
fn wrong_model_and_truncation_are_refused() {
    let b = bars();
    let s = whole_stream(&b);
    let mut l = Loader::new("uart16550");
    assert!(matches!(
        l.write(&s),
        Err(StreamError::ModelMismatch { .. })
    ));
    let mut l = Loader::new("dma-engine");
    l.write(&s[..s.len() - 1]).unwrap();
    assert!(matches!(l.finish(), Err(StreamError::Truncated(_))));
    let mut l = Loader::new("dma-engine");
    assert_eq!(
        l.write(&[0xff; 40]),
        Err(StreamError::SectionTooLarge(u64::MAX))
    );
    let mut l = Loader::new("dma-engine");
    let mut bad = vec![1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0];
    bad.extend([1, 2, 3, 4]);
    assert!(matches!(
        l.write(&bad),
        Err(StreamError::CrcMismatch { offset: 0, .. })
    ));
}
