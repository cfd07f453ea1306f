//! `vfud bench`: how close vfud gets to the limits that bound it — the UNIX socket, `memcpy`
//! and the downtime a migration cannot avoid.
//!
//! Every figure is a ratio against a baseline measured in the same run on the same machine,
//! so the numbers mean something on any host and no test depends on absolute timings. Each
//! baseline does the same work as vfud minus vfud: the same message sizes over the same kind
//! of socket between two processes, the same bytes copied between the same buffers, the same
//! migration without the optimisation under test. Ratios are always vfud ÷ baseline.
//!
//! | scenario | vfud | baseline | goal |
//! |---|---|---|---|
//! | `region-rtt` | 4-byte REGION_READ/WRITE with reply on dma-engine BAR0, `vfud serve` in another process; median and p99, client and server on two CPUs and on one | raw AF_UNIX ping-pong of the same request/reply sizes with a peer process (and, for information, a peer that sleeps in `epoll_wait` as an event loop does) | ratio ≤ 1.05 |
//! | `supervised-rtt` | the same round trip against dma-engine under `vfud serve --supervise` (request journal, checkpoints) | the same requests under plain `vfud serve`, blocks alternating | ratio ≤ 1.02 |
//! | `posted-writes` | NO_REPLY REGION_WRITE stream and REGION_WRITE_MULTI batches, ended by one replied read | raw one-way stream of the same messages, ended the same way | ≥ 1 M writes/s |
//! | `mig-data` | MIG_DATA_READ of a 256 MiB device state in 1 MiB chunks | raw request/1 MiB-reply ping-pong | ratio ≥ 0.7 |
//! | `dma-mmap` | device reads/writes of fd-mapped guest RAM through `GuestMem` | `memcpy` between the same memfd pages and the same buffer | ratio ≥ 0.8 |
//! | `dma-socket` | DMA_READ/DMA_WRITE fallback (dma-engine CRC32/FILL over a map without fd) | raw ping-pong with 64 KiB payloads | — |
//! | `downtime` | PRE_COPY with 1% of 256 MiB dirtied after its copy (total, data, restore) | stop-and-copy of the same device | ratio ≤ 0.2 |
//! | `handover` | pause a client sees across `vfud migrate --handover` | median single read round trip | — |
//! | `dma-maps` | 65 535 DMA_MAPs then DMA_UNMAPs | raw ping-pong of the same sizes, same count | — |
//! | `dma-lookup` | `GuestMem` 8-byte reads with 65 535 maps | the same reads with 16 maps | — |
//! | `msix-2048` | 2 048 MSI-X eventfds in one SET_IRQS sequence (16 fds a message) | raw messages carrying the same fds | — |
//! | `nvme-doorbell` | 4 KiB NVMe Read from SQ doorbell to MSI-X interrupt with `doorbells=mmap` (a store into the mmap'd page), back to back and after 2 ms idle | the same with `doorbells=trap` (posted REGION_WRITE) | — |
//! | `devices-64` | RSS per extra device of one `vfud serve` with 64 devices | RSS of a 1-device process | — |
//!
//! **Placement.** On a small virtual machine the scheduler decides whether client and server
//! share a CPU, and a wakeup across CPUs can cost more than the whole round trip on one, so
//! unpinned ping-pong figures come out bimodal. The bench therefore runs on CPU 0 and starts
//! every process (servers and raw peers alike) under `taskset -c N`, N from `--server-cpu`
//! (default 0: one CPU, so the figures measure work rather than wakeup latency);
//! `region-rtt` reports both placements whatever the flag; `--no-pin` leaves it all to the
//! scheduler. Children are stopped with SIGINT, which `vfud serve` and profilers handle, so
//! `--wrap 'perf record …'` or `--wrap 'strace -c -f …'` profile the servers of a run.
//!
//! Scenario modules: [`region`] (round trips, posted writes), [`migration`] (stream bandwidth,
//! downtime, handover), [`dma`], [`scale`], [`nvme`]. The raw peer is in [`raw`], process, placement and
//! statistics plumbing in [`harness`], and the bench-only device models in [`bigmem`]
//! (256 MiB of mmap-able state) and [`msix2048`]. Both models run in a child process started
//! with the hidden `--internal-serve MODEL --socket PATH` flags, so server and client never
//! share an address space, exactly as with `vfud serve`.

#![forbid(unsafe_code)]

mod bigmem;
mod compare;
mod dma;
mod harness;
mod migration;
mod msix2048;
mod nvme;
mod raw;
mod region;
mod scale;
mod supervised;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use harness::{Ctx, Row};

/// Arguments of `vfud bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Run only scenarios whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    pub list: bool,
    /// Also print each scenario's ratio against a saved `vfud bench --json` run.
    #[arg(long, value_name = "OLD.json")]
    pub compare: Option<PathBuf>,
    /// CPU for every process the bench starts (servers, raw peers); the bench itself runs on
    /// CPU 0. The default, 0, puts client and server on one CPU, so figures measure CPU work
    /// rather than the machine's cross-CPU wakeup latency (region-rtt reports both anyway).
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    /// Leave CPU placement to the scheduler.
    #[arg(long)]
    pub no_pin: bool,
    /// Start every spawned server under this command, for profiling (e.g.
    /// `--wrap 'strace -c -f -o /tmp/server.strace'`). Memory figures are then meaningless.
    #[arg(long)]
    pub wrap: Option<String>,
    /// Internal: run the raw-socket baseline peer on this socket path.
    #[arg(long, hide = true)]
    pub internal_peer: Option<PathBuf>,
    /// Internal: serve a bench-only device model (`bigmem`, `msix2048`) on `--socket`.
    #[arg(long, hide = true, requires = "socket")]
    pub internal_serve: Option<String>,
    /// Internal: socket path for `--internal-serve`.
    #[arg(long, hide = true)]
    pub socket: Option<PathBuf>,
}

/// One scenario: a name for `--only`, and the function that measures it.
struct Scenario {
    name: &'static str,
    what: &'static str,
    run: fn(&mut Ctx) -> Result<Vec<Row>>,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "region-rtt",
        what: "4-byte REGION_READ/WRITE round trip vs raw socket ping-pong",
        run: region::round_trip,
    },
    Scenario {
        name: "supervised-rtt",
        what: "region round trip under `serve --supervise` vs plain `serve`",
        run: supervised::round_trip,
    },
    Scenario {
        name: "posted-writes",
        what: "NO_REPLY REGION_WRITE and REGION_WRITE_MULTI vs raw one-way stream",
        run: region::posted_writes,
    },
    Scenario {
        name: "mig-data",
        what: "MIG_DATA_READ of 256 MiB in 1 MiB chunks vs raw 1 MiB replies",
        run: migration::mig_data,
    },
    Scenario {
        name: "dma-mmap",
        what: "GuestMem read/write of fd-mapped RAM vs memcpy on the same pages",
        run: dma::mmap,
    },
    Scenario {
        name: "dma-socket",
        what: "DMA_READ/DMA_WRITE fallback vs raw 64 KiB ping-pong",
        run: dma::socket,
    },
    Scenario {
        name: "downtime",
        what: "PRE_COPY downtime (1% of 256 MiB dirtied) vs stop-and-copy",
        run: migration::downtime,
    },
    Scenario {
        name: "handover",
        what: "client pause across a live handover vs one read round trip",
        run: migration::handover,
    },
    Scenario {
        name: "dma-maps",
        what: "65 535 DMA_MAP then DMA_UNMAP vs raw ping-pong",
        run: scale::dma_maps,
    },
    Scenario {
        name: "dma-lookup",
        what: "GuestMem read with 65 535 maps vs 16 maps",
        run: scale::dma_lookup,
    },
    Scenario {
        name: "msix-2048",
        what: "2 048 MSI-X eventfds in one SET_IRQS sequence vs raw fd passing",
        run: scale::msix,
    },
    Scenario {
        name: "nvme-doorbell",
        what: "NVMe Read latency, doorbell to interrupt: mmap'd doorbell page vs trapped",
        run: nvme::doorbell,
    },
    Scenario {
        name: "devices-64",
        what: "RSS per device with 64 devices in one process vs a 1-device process",
        run: scale::devices,
    },
];

/// Run the benchmarks (or, with the hidden flags, one of the child processes they start).
pub fn run(a: &BenchArgs) -> Result<()> {
    if let Some(path) = &a.internal_peer {
        return raw::serve_peer(path);
    }
    if let Some(model) = &a.internal_serve {
        let socket = a
            .socket
            .as_ref()
            .context("--internal-serve needs --socket")?;
        return serve_internal(model, socket);
    }
    if a.list {
        for s in SCENARIOS {
            println!("{:<14} {}", s.name, s.what);
        }
        return Ok(());
    }
    let chosen: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| a.only.as_deref().is_none_or(|o| s.name.contains(o)))
        .collect();
    if chosen.is_empty() {
        bail!(
            "no scenario matches {:?} (see --list)",
            a.only.as_deref().unwrap_or_default()
        );
    }
    let mut ctx = Ctx::new(a.wrap.clone(), !a.json)?;
    if a.server_cpu >= ctx.nproc() {
        bail!(
            "--server-cpu {} but this machine has {} CPUs",
            a.server_cpu,
            ctx.nproc()
        );
    }
    let placement = (!a.no_pin && harness::can_place()).then_some((0, a.server_cpu));
    let start = Instant::now();
    let mut rows = Vec::new();
    let mut timings = Vec::new();
    let mut run_all = |ctx: &mut Ctx| -> Result<()> {
        for (i, s) in chosen.iter().enumerate() {
            ctx.say(&format!(
                "[{}/{}] {}: {}",
                i + 1,
                chosen.len(),
                s.name,
                s.what
            ));
            let t = Instant::now();
            let r = (s.run)(ctx).with_context(|| format!("scenario {}", s.name))?;
            timings.push((s.name, t.elapsed().as_secs_f64()));
            rows.extend(r);
        }
        Ok(())
    };
    match placement {
        Some((client, server)) => ctx.placed(client, server, run_all)?,
        None => run_all(&mut ctx)?,
    }
    let elapsed = start.elapsed().as_secs_f64();
    let machine = harness::machine(ctx.nproc());
    let changes = match &a.compare {
        Some(old) => Some(compare::load_and_compare(old, &rows)?),
        None => None,
    };
    if a.json {
        let out = json!({
            "machine": machine,
            "placement": placement.map(|(c, s)| json!({"bench_cpu": c, "server_cpu": s})),
            "elapsed_s": elapsed,
            "scenario_s": timings.iter().map(|(n, s)| json!({"name": n, "seconds": s})).collect::<Vec<_>>(),
            "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "compare": changes.as_deref().map(compare::to_json),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", harness::table(&rows));
        let placed = match placement {
            Some((c, s)) => format!("bench on CPU {c}, servers and peers on CPU {s}"),
            None => "unpinned".into(),
        };
        println!(
            "\n{} CPUs ({}), kernel {}; {placed}; {:.1} s",
            machine["nproc"],
            machine["cpu"].as_str().unwrap_or("?"),
            machine["kernel"].as_str().unwrap_or("?"),
            elapsed
        );
        if let (Some(c), Some(old)) = (&changes, &a.compare) {
            println!("\nagainst {}:\n{}", old.display(), compare::table(c));
        }
    }
    Ok(())
}

/// Child process of the bench: serve one bench-only model until killed.
fn serve_internal(model: &str, socket: &std::path::Path) -> Result<()> {
    let device: Box<dyn vfud_server::Device> = match model {
        "bigmem" => Box::new(bigmem::BigMem::new()),
        "msix2048" => Box::new(msix2048::ManyVectors::new()),
        other => bail!("unknown bench model {other:?} (bigmem, msix2048)"),
    };
    let listener = vfud_server::event_loop::bind_socket(socket, None)
        .with_context(|| format!("binding {}", socket.display()))?;
    let shutdown = vfud_server::ShutdownHandle::new();
    vfud_server::event_loop::serve_listener(
        device,
        Some(listener),
        None,
        &vfud_server::ServerSettings::default(),
        &shutdown,
    )?;
    Ok(())
}
