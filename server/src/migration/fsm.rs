//! The VFIO migration v2 state machine (kernel `vfio.h` "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE";
//! QEMU `vfio-user.rst` "Direct State Transitions"), as data.
//!
//! vfio-user implements neither the P2P states nor ERROR as a target. A requested transition
//! is walked hop by hop along the shortest path of direct arcs that never passes *through*
//! a saving state (PRE_COPY, STOP_COPY); STOP_COPY→PRE_COPY is forbidden outright.

use std::collections::VecDeque;

pub use vfud_protocol::messages::MigState;

/// The direct arcs the server implements.
pub const DIRECT_ARCS: [(MigState, MigState); 9] = [
    (MigState::Running, MigState::Stop),
    (MigState::Running, MigState::PreCopy),
    (MigState::Stop, MigState::Running),
    (MigState::Stop, MigState::StopCopy),
    (MigState::Stop, MigState::Resuming),
    (MigState::StopCopy, MigState::Stop),
    (MigState::Resuming, MigState::Stop),
    (MigState::PreCopy, MigState::Running),
    (MigState::PreCopy, MigState::StopCopy),
];

fn is_saving(s: MigState) -> bool {
    matches!(s, MigState::PreCopy | MigState::StopCopy)
}

/// Whether `s` can be requested at all.
pub fn is_valid_target(s: MigState) -> bool {
    matches!(
        s,
        MigState::Running
            | MigState::Stop
            | MigState::StopCopy
            | MigState::Resuming
            | MigState::PreCopy
    )
}

/// The hops from `from` to `to` (excluding `from`), or `None` when the transition is illegal.
/// An empty path means `from == to`.
pub fn path(from: MigState, to: MigState) -> Option<Vec<MigState>> {
    if !is_valid_target(to) || !is_valid_target(from) {
        return None;
    }
    if from == to {
        return Some(Vec::new());
    }
    if from == MigState::StopCopy && to == MigState::PreCopy {
        return None;
    }
    // Breadth-first search: intermediate states must not be saving states.
    let mut prev: [Option<MigState>; 8] = [None; 8];
    let mut seen = [false; 8];
    let mut q = VecDeque::from([from]);
    seen[from as usize] = true;
    while let Some(s) = q.pop_front() {
        if s != from && is_saving(s) && s != to {
            continue;
        }
        for (a, b) in DIRECT_ARCS {
            if a == s && !seen[b as usize] {
                seen[b as usize] = true;
                prev[b as usize] = Some(s);
                if b == to {
                    let mut hops = vec![to];
                    let mut cur = s;
                    while cur != from {
                        hops.push(cur);
                        cur = prev[cur as usize]?;
                    }
                    hops.reverse();
                    return Some(hops);
                }
                q.push_back(b);
            }
        }
    }
    None
}

/// What each state permits (one table; see `permits` tests for the whole matrix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permits {
    /// REGION_READ.
    pub region_read: bool,
    /// REGION_WRITE to BARs (config writes follow `config_write`).
    pub bar_write: bool,
    /// REGION_WRITE to config space.
    pub config_write: bool,
    /// DMA_MAP/DMA_UNMAP.
    pub dma_map: bool,
    /// SET_IRQS (possibly deferred).
    pub set_irqs: bool,
    /// MIG_DATA_READ.
    pub mig_data_read: bool,
    /// MIG_DATA_WRITE.
    pub mig_data_write: bool,
    /// The device runs: deferred work, timers and backend events are processed.
    pub device_runs: bool,
}

/// The permission table.
pub fn permits(s: MigState) -> Permits {
    let p = |region_read, bar_write, config_write, dma_map, set_irqs, rd, wr, runs| Permits {
        region_read,
        bar_write,
        config_write,
        dma_map,
        set_irqs,
        mig_data_read: rd,
        mig_data_write: wr,
        device_runs: runs,
    };
    match s {
        MigState::Running => p(true, true, true, true, true, false, false, true),
        MigState::PreCopy => p(true, true, true, true, true, true, false, true),
        MigState::Stop => p(true, true, true, true, true, false, false, false),
        // The saved state must not change under the reader: BAR and config writes are refused.
        MigState::StopCopy => p(true, false, false, true, true, true, false, false),
        // Config writes and SET_IRQS arrive here during restore (QEMU's non-iterable phase).
        MigState::Resuming => p(true, false, true, true, true, false, true, false),
        _ => p(false, false, false, false, false, false, false, false),
    }
}

#[cfg(test)]
mod tests {
    use super::MigState::*;
    use super::*;

    #[test]
    fn documented_combination_arcs() {
        assert_eq!(path(Running, StopCopy), Some(vec![Stop, StopCopy]));
        assert_eq!(path(Running, Resuming), Some(vec![Stop, Resuming]));
        assert_eq!(path(Resuming, Running), Some(vec![Stop, Running]));
        assert_eq!(path(PreCopy, Stop), Some(vec![Running, Stop]));
        assert_eq!(path(StopCopy, Running), Some(vec![Stop, Running]));
        assert_eq!(path(StopCopy, Resuming), Some(vec![Stop, Resuming]));
        assert_eq!(path(Stop, PreCopy), Some(vec![Running, PreCopy]));
        assert_eq!(path(PreCopy, StopCopy), Some(vec![StopCopy]));
        assert_eq!(path(StopCopy, PreCopy), None);
        assert_eq!(path(Running, Running), Some(vec![]));
    }

    #[test]
    fn every_pair_is_either_a_walk_of_direct_arcs_or_refused() {
        for from in MigState::ALL {
            for to in MigState::ALL {
                match path(from, to) {
                    Some(hops) => {
                        let mut cur = from;
                        for (i, h) in hops.iter().enumerate() {
                            assert!(DIRECT_ARCS.contains(&(cur, *h)), "{from:?}->{to:?}");
                            if i + 1 < hops.len() {
                                assert!(!is_saving(*h), "{from:?}->{to:?} passes through {h:?}");
                            }
                            cur = *h;
                        }
                        assert_eq!(cur, to);
                    }
                    None => assert!(
                        !is_valid_target(to)
                            || !is_valid_target(from)
                            || (from, to) == (StopCopy, PreCopy),
                        "{from:?}->{to:?} refused"
                    ),
                }
            }
        }
    }

    #[test]
    fn error_and_p2p_are_never_targets() {
        for from in MigState::ALL {
            for to in [Error, RunningP2p, PreCopyP2p] {
                assert_eq!(path(from, to), None);
            }
        }
    }

    #[test]
    fn permits_table() {
        assert!(permits(Resuming).mig_data_write && !permits(Resuming).mig_data_read);
        assert!(permits(PreCopy).mig_data_read && permits(StopCopy).mig_data_read);
        assert!(!permits(Running).mig_data_read && !permits(Stop).mig_data_write);
        assert!(permits(Resuming).set_irqs && permits(Resuming).config_write);
        assert!(!permits(StopCopy).bar_write && !permits(StopCopy).config_write);
        assert!(permits(Stop).dma_map, "hot-unplug after VM stop must work");
        assert_eq!(permits(Error), permits(RunningP2p));
        assert!(!permits(Error).region_read);
        let runs: Vec<_> = MigState::ALL
            .into_iter()
            .filter(|s| permits(*s).device_runs)
            .collect();
        assert_eq!(runs, vec![Running, PreCopy]);
    }
}
