//! `fleetcast-load`: see `loadtest/README.md` and `fleetcast-load --help`.

use clap::{Args, Parser, Subcommand};
use fleetcast_load::capacity::{self, Ramp};
use fleetcast_load::run::{self, RunOptions};
use fleetcast_load::scenario::{Overrides, Plan, Scenario};
use fleetcast_load::{report, sys};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "fleetcast-load",
    version,
    about = "Load generator for fleetcast and any broker speaking its native WebSocket dialect"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Scenario file (TOML).
    #[arg(long)]
    scenario: PathBuf,
    /// Broker URL (overrides the scenario's `url`).
    #[arg(long)]
    url: Option<String>,
    /// Total dashboards (spread over the scenario's groups in proportion).
    #[arg(long)]
    dashboards: Option<u32>,
    /// Total vehicles (spread over the tenants in proportion).
    #[arg(long)]
    vehicles: Option<u32>,
    /// Multiplies every publish rate.
    #[arg(long)]
    rate_multiplier: Option<f64>,
    /// Seconds of publishing (the measurement window).
    #[arg(long)]
    duration: Option<f64>,
    /// I/O threads (default: the scenario's, else one per CPU this process may use).
    #[arg(long)]
    threads: Option<usize>,
    /// Bind client sockets to 127.0.0.1 ..= 127.0.0.N.
    #[arg(long)]
    source_addresses: Option<u32>,
    /// The broker's pid, for its CPU and memory (from /proc).
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Output directory [default: target/fleetcast-load/<scenario>-<timestamp>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
    /// Leave the kernel's ACK behaviour alone (an ACK per drained read) instead of
    /// keeping dashboard sockets in delayed-ACK mode.
    #[arg(long)]
    quickack: bool,
    /// Measure latency to the kernel's receive time on each dashboard socket
    /// (SO_TIMESTAMPNS), the headline figure: it leaves out the generator's own queueing
    /// before its read. The default unless the scenario turns it off.
    #[arg(long, conflicts_with = "no_socket_timestamps")]
    socket_timestamps: bool,
    /// Latency to the generator's read only (no kernel receive timestamps).
    #[arg(long)]
    no_socket_timestamps: bool,
    /// Spin instead of sleeping in epoll, so that a halted vCPU's wake-up time does not
    /// delay sends (the generator's CPU then reads 100 %).
    #[arg(long)]
    busy_poll: bool,
    /// Reconnect storm: spread the reconnects over this many seconds (the scenario's
    /// `[storm] spread_s`).
    #[arg(long, value_name = "S")]
    storm_spread: Option<f64>,
    /// Do not read the broker's /metrics (a fleetcast extra) before and after.
    #[arg(long)]
    no_metrics: bool,
    /// PEM file of the CA that signed the broker's certificate (for a wss:// url).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Offer permessage-deflate (RFC 7692, no context takeover either way) on every
    /// connection and inflate the compressed frames the broker sends.
    #[arg(long)]
    deflate: bool,
}

impl Common {
    fn overrides(&self) -> Overrides {
        Overrides {
            url: self.url.clone(),
            dashboards: self.dashboards,
            vehicles: self.vehicles,
            rate_multiplier: self.rate_multiplier,
            duration_s: self.duration,
            threads: self.threads,
            source_addresses: self.source_addresses,
            delayed_acks: self.quickack.then_some(false),
            socket_timestamps: if self.no_socket_timestamps {
                Some(false)
            } else {
                self.socket_timestamps.then_some(true)
            },
            busy_poll: self.busy_poll.then_some(true),
            storm_spread_s: self.storm_spread,
        }
    }

    fn options(&self) -> RunOptions {
        RunOptions {
            overrides: self.overrides(),
            broker_pid: self.broker_pid,
            progress: !self.quiet,
            scrape_metrics: !self.no_metrics,
            label: String::new(),
            ca_file: self.ca_file.clone(),
            deflate: self.deflate,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario once and write report.json and report.html.
    Run {
        #[command(flatten)]
        common: Common,
        /// Exit with status 2 when the scenario's SLO did not hold.
        #[arg(long)]
        check_slo: bool,
    },
    /// Step one knob up, a full run per step, until the SLO breaks.
    Capacity {
        #[command(flatten)]
        common: Common,
        /// What to ramp.
        #[arg(long, value_enum)]
        ramp: Ramp,
        #[arg(long)]
        start: f64,
        #[arg(long)]
        step: f64,
        #[arg(long)]
        max: f64,
        /// p99 latency objective (default: the scenario's [slo], else 10 ms).
        #[arg(long)]
        slo_p99_ms: Option<f64>,
        /// Lost / expected objective (default: the scenario's [slo], else 0).
        #[arg(long)]
        slo_loss: Option<f64>,
        /// Errors allowed per step (default: the scenario's [slo], else 0).
        #[arg(long)]
        slo_errors: Option<u64>,
        /// Seconds between steps (the broker closes the previous step's connections).
        #[arg(long, default_value_t = 2.0)]
        pause: f64,
    },
    /// Validate a scenario and print what it would open and offer.
    Check {
        #[command(flatten)]
        common: Common,
    },
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("fleetcast-load: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run { common, check_slo } => {
            let scenario = Scenario::load(&common.scenario)?;
            let r = run::run(&scenario, &common.options())?;
            let out = common
                .out
                .clone()
                .unwrap_or_else(|| run::default_out(&scenario.name));
            run::write_report(&out, &r)?;
            print!("{}", report::summary(&r));
            println!(
                "  reports        {} and report.html",
                out.join("report.json").display()
            );
            if check_slo && r.verdict.as_ref().is_some_and(|v| !v.held) {
                std::process::exit(2);
            }
        }
        Command::Capacity {
            common,
            ramp,
            start,
            step,
            max,
            slo_p99_ms,
            slo_loss,
            slo_errors,
            pause,
        } => {
            let scenario = Scenario::load(&common.scenario)?;
            let mut slo = scenario.slo;
            if let Some(v) = slo_p99_ms {
                slo.p99_ms = v;
            }
            if let Some(v) = slo_loss {
                slo.loss = v;
            }
            if let Some(v) = slo_errors {
                slo.max_errors = v;
            }
            anyhow::ensure!(
                slo.p99_ms > 0.0 && (0.0..=1.0).contains(&slo.loss),
                "--slo-p99-ms must be > 0 and --slo-loss in [0, 1]"
            );
            let values = capacity::steps(start, step, max)?;
            let out = common.out.clone().unwrap_or_else(|| {
                run::default_out(&format!("{}-capacity-{}", scenario.name, ramp.name()))
            });
            let c = run::capacity(
                &scenario,
                &common.options(),
                ramp,
                &values,
                slo,
                &out,
                Duration::from_secs_f64(pause.clamp(0.0, 60.0)),
            )?;
            print!("{}", capacity::summary(&c));
            println!(
                "  reports        {} and report.html (a directory per step beside them)",
                out.join("report.json").display()
            );
        }
        Command::Check { common } => {
            let scenario = Scenario::load(&common.scenario)?.with_overrides(&common.overrides())?;
            let plan = Plan::build(&scenario)?;
            let fd = sys::raise_nofile();
            let (loc, al, tr) = plan.offered_rates();
            println!("scenario {}: {}", scenario.name, scenario.description);
            println!(
                "  connections  {} ({} dashboards in {} group(s), {} vehicles, {} services)",
                plan.conns.len(),
                plan.dashboards(),
                plan.groups.len(),
                plan.vehicles(),
                plan.count(|k| matches!(k, fleetcast_load::scenario::ConnKind::Service { .. }))
            );
            for g in &plan.groups {
                println!("    {g}");
            }
            println!(
                "  offered      {loc:.0} location_update/s, {al:.1} safety_alert/s, {tr:.1} trip_event/s -> {:.0} deliveries/s",
                plan.offered_deliveries()
            );
            match sys::fd_budget(&fd, plan.conns.len() as u64) {
                Ok(line) => println!("  {line}"),
                Err(e) => {
                    println!("  {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    Ok(())
}
