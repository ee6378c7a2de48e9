//! `acrf`: the command line. Each subcommand is a thin edge over the library crates; errors become one
//! readable message and a non-zero exit.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "acrf", version, about = "AC-RF LoRA training for Z-Image Turbo on CPU, one GPU or many")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a LoRA file's modules, rank, alpha, dtype and metadata.
    Inspect {
        /// A LoRA .safetensors in ComfyUI/diffusers, peft or kohya layout.
        file: PathBuf,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { file } => {
            print!("{}", acrf_worker::lora::Lora::describe(&file)?);
            Ok(())
        }
    }
}
