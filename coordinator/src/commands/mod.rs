//! What each `acrf` subcommand does with its flags (`args`), one module each: a thin edge over the library
//! crates where errors become one readable message and an exit status (`exit`).

mod bench;
mod cache;
mod coordinator;
mod demo;
mod doctor;
mod inspect;
mod launch;
mod plan;
mod report;
mod sample;
mod sweep;
mod token;
mod train;
mod worker;

use std::io::IsTerminal;

use anyhow::Result;
use clap::Parser;

use crate::args::{Cli, Command};
use crate::exit::Exit;

/// The `acrf` binary: runs the command line and says how it ended.
pub fn main() -> Exit {
    configure_cpu_threads();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour codes are for a person at a terminal; in a log file or a pipe they are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    in_matmul_pool(|| run(cli)).unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        Exit::of_error(&e)
    })
}

/// Sets candle's CPU thread counts unless the user has: matmuls on every physical core, elementwise ops on the
/// calling thread.
///
/// candle 0.11 reads `RAYON_NUM_THREADS` before every matmul and, when it is unset, counts the physical cores
/// by parsing `/proc/cpuinfo`, about 500 times per step of a small model. Its elementwise ops run on a pool
/// whose threads spin on a barrier between ops; over ops of a few hundred kB that costs more than it
/// parallelises, and on a busy host a descheduled spinner stalls every op. Measured on 2 cores: 0.12 s per
/// step of the reference model instead of 0.15 s quiet and 0.4 s under load.
fn configure_cpu_threads() {
    let defaults = [("RAYON_NUM_THREADS", num_cpus::get_physical().max(1)), ("CANDLE_NUM_THREADS", 1)];
    for (name, value) in defaults {
        if std::env::var_os(name).is_none() {
            // SAFETY: this runs first in `main`, before any thread exists, so nothing reads the environment
            // while it changes.
            unsafe { std::env::set_var(name, value.to_string()) };
        }
    }
}

/// Runs `f` on a thread of a rayon pool as large as candle's matmul parallelism.
///
/// candle hands every CPU matmul to rayon. From outside a pool the caller blocks on a latch while the pool's
/// threads, woken for each matmul and asleep again after it, do the work: a small model's step has about 700
/// matmuls, each paying a futex wake-up. From inside the pool the caller takes a share of each matmul and the
/// other threads, still spinning from the previous one, steal the rest. Measured on 2 cores: 0.073 s per step
/// of the reference model instead of 0.093 s.
fn in_matmul_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

fn run(cli: Cli) -> Result<Exit> {
    let done = |()| Exit::Finished;
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Train(args) => train::run(args),
        Command::Plan(args) => plan::run(args).map(done),
        Command::Bench(args) => bench::run(args).map(done),
        Command::Doctor(args) => doctor::run(args).map(done),
        Command::Launch(args) => launch::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Token(args) => token::run(args).map(done),
        Command::Worker(args) => worker::run(args).map(done),
        Command::Cache(args) => cache::run(&args),
        Command::Sweep(args) => sweep::run(&args),
        Command::Sample(args) => sample::run(&args).map(done),
        Command::Report(args) => report::run(args).map(done),
        Command::Inspect(args) => inspect::run(args).map(done),
    }
}
