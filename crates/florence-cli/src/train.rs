//! `florence train`: fine-tune a Florence-2 model on image + caption folders.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use florence_train::{StepMetrics, TrainOptions};

/// Fine-tune a Florence-2 model with a Florence-2ner config (YAML or JSON).
#[derive(clap::Args)]
pub struct TrainArgs {
    /// The config file: Florence-2ner's keys (model_name, dataset_path or dataset_config,
    /// optimizer, learning_rate, ...); paths in it are relative to it.
    #[arg(value_name = "CONFIG")]
    config: PathBuf,
    /// The run's folder (metrics.jsonl, checkpoint-STEP/, final/), instead of the config's output_dir.
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Continue from a checkpoint-STEP folder this command wrote: weights, optimizer state,
    /// schedule and data position; the result equals an uninterrupted run.
    #[arg(long, value_name = "CHECKPOINT_DIR")]
    resume: Option<PathBuf>,
    /// Stop after this many optimizer steps in all (the schedule still spans the whole run).
    #[arg(long, value_name = "N")]
    max_steps: Option<usize>,
    /// Never download the model from the Hugging Face hub (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// No progress bar; messages only.
    #[arg(short, long)]
    quiet: bool,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Where to train: cpu, cuda (the first GPU), cuda:N, or auto (a CUDA GPU when this build
    /// has CUDA support and one is present, else the CPU).
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: florence::device::DeviceChoice,
}

/// Shows a run's steps on a progress bar.
struct Bar {
    bar: indicatif::ProgressBar,
    started: std::time::Instant,
    samples: usize,
    /// Where training runs, said once when it starts (not with --quiet).
    device: Option<String>,
}

impl florence_train::Progress for Bar {
    fn begin(&mut self, done: usize, total: usize) {
        if let Some(device) = self.device.take() {
            self.message(&format!("training on the {device}"));
        }
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        self.bar.reset_eta();
        self.started = std::time::Instant::now();
    }

    fn step(&mut self, m: &StepMetrics) {
        self.samples += m.samples;
        let rate = self.samples as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_position(m.step as u64);
        self.bar.set_message(format!(
            "loss {:.4}  grad {:.3}  lr {:.3e}  {rate:.2} samples/s",
            m.loss, m.grad_norm, m.lr
        ));
    }

    fn message(&mut self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }
}

/// Runs the command; `Ok(false)` when it stopped on an interruption.
pub fn run(args: TrainArgs, interrupted: &AtomicBool) -> florence::Result<bool> {
    let options = TrainOptions {
        config: args.config,
        output: args.output,
        resume: args.resume,
        max_steps: args.max_steps,
        offline: args.offline,
    };
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("step {pos}/{len} {bar:25}  ETA {eta}  {msg}")
                .expect("the template is valid"),
        );
        b
    };
    let (device, chosen) = args.device.open()?;
    let mut progress = Bar {
        device: (!args.quiet).then_some(chosen),
        bar,
        started: std::time::Instant::now(),
        samples: 0,
    };
    let summary = florence_train::train(&options, &device, interrupted, &mut progress)?;
    progress.bar.finish_and_clear();
    if let Some(dir) = &summary.last_checkpoint {
        eprintln!("{} steps; last checkpoint {}", summary.steps, dir.display());
    }
    if summary.interrupted {
        eprintln!(
            "stopped; continue with --resume {}",
            summary
                .last_checkpoint
                .as_ref()
                .map_or(String::new(), |d| d.display().to_string())
        );
    }
    Ok(!summary.interrupted)
}
