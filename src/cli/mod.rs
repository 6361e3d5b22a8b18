//! The command groups, one module each, and the one place where flags become configs
//! ([`flags`]). Vocabulary: a row of a dataset is a *sample*; what a model writes is a
//! *generation* (the command that makes them is `codeclm sample`).

pub mod allreduce;
pub mod bench;
pub mod dataset;
pub mod eval;
pub mod flags;
pub mod model;
pub mod sample;
pub mod scale;
pub mod tokens;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "codeclm",
    version,
    about = "Images and videos to canonical codec bytes, tokens and compact language models (Jpeg-LM)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build, inspect, verify, export, merge, tokenize and decode datasets of codec bytes.
    #[command(subcommand)]
    Dataset(dataset::DatasetCommand),
    /// Byte-level BPE vocabularies over codec bytes.
    #[command(subcommand)]
    Vocab(tokens::VocabCommand),
    /// Train a Llama model on a dataset's token shards (or --resume a run).
    Train(model::TrainArgs),
    /// Generate images (or videos) from a trained run, unconditionally or completing prompts;
    /// writes the generations, a contact sheet and a decodability report.
    Sample(sample::SampleArgs),
    /// Evaluation: FID the paper's way (needs `make fid-weights`).
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Trained models: logits for a token sequence, preset sizes and memory.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Benchmarks: throughput and peak memory, one JSON line each (the tools/ scripts run the
    /// references on the same inputs).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Internal: one decode worker of `dataset build --isolation processes` (reads jobs on
    /// stdin, writes outcomes on stdout).
    #[command(hide = true)]
    DecodeWorker,
}

pub fn run(cli: Cli) -> Result<()> {
    let _failpoints = codeclm_etl::isolate::arm_failpoints();
    match cli.command {
        Command::Dataset(cmd) => dataset::run(cmd),
        Command::Vocab(tokens::VocabCommand::Train(args)) => tokens::train(args),
        Command::Train(args) => model::train_cmd(args),
        Command::Sample(args) => sample::sample(args),
        Command::Eval(cmd) => eval::run(cmd),
        Command::DecodeWorker => std::process::exit(codeclm_etl::isolate::serve()),
        Command::Model(cmd) => model::model_cmd(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    }
}
