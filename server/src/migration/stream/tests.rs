//! Stream round trips and refusals.
use super::*;
use crate::migration::DeviceState;
use crate::mmap::SharedMemory;

fn bars() -> [Option<SharedMemory>; 6] {
    let mut b: [Option<SharedMemory>; 6] = Default::default();
    b[2] = Some(SharedMemory::new("t", 64 * 1024).unwrap());
    b
}

const SIZES: [usize; 6] = [0, 0, 64 * 1024, 0, 0, 0];

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
    let mut l = Loader::new("dma-engine").with_bar_sizes(SIZES);
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
        let mut l = Loader::new("dma-engine").with_bar_sizes(SIZES);
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
    let mut l = Loader::new("dma-engine").with_bar_sizes(SIZES);
    l.write(&s[..s.len() - 1]).unwrap();
    assert!(matches!(l.finish(), Err(StreamError::Truncated(_))));
    let mut l = Loader::new("dma-engine").with_bar_sizes(SIZES);
    assert_eq!(
        l.write(&[0xff; 40]),
        Err(StreamError::SectionTooLarge(u64::MAX))
    );
    let mut l = Loader::new("dma-engine").with_bar_sizes(SIZES);
    let mut bad = vec![1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0];
    bad.extend([1, 2, 3, 4]);
    assert!(matches!(
        l.write(&bad),
        Err(StreamError::CrcMismatch { offset: 0, .. })
    ));
}

#[test]
fn bar_memory_staging_is_bounded_by_the_bar_and_merged() {
    let mut stream = Vec::new();
    put_section(&mut stream, kind::HEADER, &header().encode());
    let section = |bar: u8, off: u64, data: &[u8]| {
        let mut p = vec![bar, 0, 0, 0, 0, 0, 0, 0];
        p.extend(off.to_le_bytes());
        p.extend(data);
        p
    };
    // A thousand rounds over the same pages stage one BAR image, not a thousand copies.
    for round in 0..1000u32 {
        let data = vec![round as u8; 8192];
        put_section(&mut stream, kind::BAR_MEMORY, &section(2, 4096, &data));
    }
    put_section(
        &mut stream,
        kind::BAR_MEMORY,
        &section(2, 12288, &[9; 4096]),
    );
    put_section(&mut stream, kind::BAR_MEMORY, &section(2, 40000, &[7; 10]));
    put_section(&mut stream, kind::CONFIG, &[0; 256]);
    put_section(&mut stream, kind::DEVICE_STATE, &[1, 0]);
    put_section(&mut stream, kind::END, &[]);
    let mut l = Loader::new("dma-engine").with_bar_sizes(SIZES);
    l.write(&stream).unwrap();
    let st = l.finish().unwrap();
    assert_eq!(st.memory.len(), 2, "adjacent ranges merge");
    assert_eq!((st.memory[0].0, st.memory[0].1), (2, 4096));
    assert_eq!(st.memory[0].2.len(), 12288);
    assert_eq!(st.memory[0].2[0], (999u32 as u8), "the last round wins");
    assert_eq!(st.memory[0].2[8192], 9);
    assert_eq!((st.memory[1].1, st.memory[1].2.len()), (40000, 10));
}

#[test]
fn memory_outside_the_bar_or_oversized_sections_are_refused() {
    let mut stream = Vec::new();
    put_section(&mut stream, kind::HEADER, &header().encode());
    let mut bad = vec![2, 0, 0, 0, 0, 0, 0, 0];
    bad.extend((64u64 * 1024 - 4).to_le_bytes());
    bad.extend([0; 8]);
    let mut s1 = stream.clone();
    put_section(&mut s1, kind::BAR_MEMORY, &bad);
    let mut l = Loader::new("dma-engine").with_bar_sizes(SIZES);
    assert!(matches!(l.write(&s1), Err(StreamError::Malformed(_))));
    let mut no_bar = vec![0u8; 16];
    no_bar.push(1);
    let mut s2 = stream.clone();
    put_section(&mut s2, kind::BAR_MEMORY, &no_bar);
    let mut l = Loader::new("dma-engine").with_bar_sizes(SIZES);
    assert!(matches!(l.write(&s2), Err(StreamError::Malformed(_))));
    let mut s3 = stream;
    put_section(&mut s3, kind::CONFIG, &[0; 8192]);
    let mut l = Loader::new("dma-engine").with_bar_sizes(SIZES);
    assert_eq!(l.write(&s3), Err(StreamError::SectionTooLarge(8192)));
}
