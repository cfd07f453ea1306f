//! **Supervision overhead** (`supervised-rtt`): the 4-byte REGION_READ/REGION_WRITE round
//! trip of `region-rtt` against dma-engine served by `vfud serve --supervise` (device process
//! under a supervisor: every request journaled in shared memory, checkpoints every 100 ms
//! while active), with plain `vfud serve` as the baseline. Blocks alternate between the two
//! so that noise hits both alike. The placement is whatever the scheduler picks.

use anyhow::Result;
use vfud_devices::dma_engine::reg;
use vfud_protocol::Client;

use super::harness::{Ctx, Goal, Row, Samples};

const ROUNDS: usize = 10;
const PER_ROUND: usize = 2000;

/// Scenario `supervised-rtt`.
pub fn round_trip(ctx: &mut Ctx) -> Result<Vec<Row>> {
    let (_plain, plain_sock) = ctx.serve_device("dma-engine")?;
    let sup_sock = ctx.path("supervised");
    let _sup = ctx.serve(
        &[
            "--supervise".into(),
            "--device".into(),
            "dma-engine".into(),
            "--socket".into(),
            sup_sock.clone().into(),
        ],
        std::slice::from_ref(&sup_sock),
    )?;
    let mut p = Client::connect_negotiated(&plain_sock)?;
    let mut s = Client::connect_negotiated(&sup_sock)?;
    let val = 0x5au32.to_le_bytes();
    for _ in 0..PER_ROUND {
        p.region_read(0, reg::ID, 4)?;
        s.region_read(0, reg::ID, 4)?;
    }
    let (mut pr, mut sr, mut pw, mut sw) = Default::default();
    let time = |c: &mut Client, r: &mut Samples, w: &mut Samples| -> Result<()> {
        for _ in 0..PER_ROUND {
            r.time(|| c.region_read(0, reg::ID, 4))?;
        }
        for _ in 0..PER_ROUND {
            w.time(|| c.region_write(0, reg::PATTERN, &val))?;
        }
        Ok(())
    };
    for _ in 0..ROUNDS {
        time(&mut s, &mut sr, &mut sw)?;
        time(&mut p, &mut pr, &mut pw)?;
    }
    const BASE: &str = "the same requests to dma-engine under plain `vfud serve`";
    let row = |what: &str, v: &Samples, b: &Samples, pct: f64| {
        let goal = Goal::RatioMax(1.02);
        Row::percentile(format!("supervised-rtt {what}"), v, b, pct, BASE, goal)
    };
    Ok(vec![
        row("read median", &sr, &pr, 50.0),
        row("read p99", &sr, &pr, 99.0),
        row("write median", &sw, &pw, 50.0),
        row("write p99", &sw, &pw, 99.0),
    ])
}
