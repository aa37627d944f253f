//! `florence`: run Florence-2 models from the command line.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};

mod bench;
mod caption;
mod eval;
mod generation;
mod precision;
mod serve;
mod train;

#[derive(Parser)]
#[command(
    name = "florence",
    version,
    about = "Caption, detect and ground with Florence-2 models, token for token like transformers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a Florence-2 task (captioning by default) on images or whole folders.
    ///
    /// Given image files, the results are printed. Given folders (or --files-from, --ext,
    /// --output-dir), each caption is written to a sidecar file next to its image (photo.jpg ->
    /// photo.txt), as kohya_ss, OneTrainer, SimpleTuner and ai-toolkit expect. Existing captions
    /// are kept unless --existing says otherwise, so rerunning a command resumes it.
    #[command(after_help = "Examples:
  florence caption --model ./Florence-2-base photo.jpg
  florence caption --model ./Florence-2-base -r ./dataset                     # dataset/**/x.jpg -> x.txt
  florence caption --model ./Florence-2-base -r ./dataset --ext .caption --prefix 'ohwx, '
  florence caption --model ./Florence-2-base -r ./dataset --output-dir ./captions --format csv --manifest all.csv
  florence caption --model ./Florence-2-base --files-from list.txt --shard 0/4 --errors errors.jsonl
  florence caption --model ./Florence-2-base shards/*.tar --output-dir captions   # WebDataset: captions/00000.tar
  florence caption --model ./Florence-2-base data.parquet --image-column jpg --format parquet --manifest out.parquet --keep-columns key,url
  florence caption --model ./Florence-2-large --task '<MORE_DETAILED_CAPTION>' --format jsonl *.png
  florence caption --model ./Florence-2-base --task '<CAPTION_TO_PHRASE_GROUNDING>' --text-input 'a green car' car.jpg
  florence caption --model ./Florence-2-base --do-sample --temperature 0.7 --top-p 0.9 --seed 42 photo.jpg
  florence caption --do-sample --top-k 40 --min-p 0.05 photo.jpg
  florence caption -r ./dataset --existing append --separator ' ' --suffix ', best quality'
  florence caption -r ./dataset --batch-size 8 --threads 16 --num-beams 1 --max-new-tokens 256 --min-new-tokens 8
  florence caption -r ./dataset --model microsoft/Florence-2-large --offline -q
  florence caption -r ./scans --no-exif-orientation --max-pixels 500000000
  florence caption -r ./dataset --dtype bf16 --quantize q8                    # less memory, faster; not exact

Exit status: 0 when every image was captioned or skipped, 1 when some image failed (each is
reported on stderr and in --errors), 2 when the run could not start or was interrupted.")]
    Caption(Box<caption::CaptionArgs>),
    /// Time each stage of a generation (image decode, preprocessing, vision tower, projector,
    /// text encoder, decoder steps, search) and report peak memory.
    #[command(
        after_help = "Examples:\n  florence bench --model ./Florence-2-base --threads 2 --num-beams 3 --new-tokens 64 photo.jpg\n  florence bench --model ./Florence-2-base --threads 2 --quantize q8 photo.jpg"
    )]
    Bench(BenchCommand),
    /// Fine-tune a Florence-2 model on image + caption folders with a Florence-2ner config.
    ///
    /// Writes metrics.jsonl (one line per optimizer step, and per evaluation), checkpoint-STEP/
    /// folders (complete model folders, loadable by `florence caption --model` and transformers,
    /// with the state to resume from) and final/. Ctrl-C writes a checkpoint and stops.
    #[command(after_help = "Examples:
  florence train config.yaml
  florence train config.yaml --output runs/my-captioner --threads 16
  florence train config.yaml --output runs/my-captioner --resume runs/my-captioner/checkpoint-40
  florence train config.yaml --max-steps 10 --output /tmp/smoke

The config takes Florence-2ner's keys; see the README's \"Fine-tuning\" section for all of them
and the data layouts.

Exit status: 0 when the run finished, 1 when it was interrupted (a checkpoint was written),
2 when it could not start or failed.")]
    Train(Box<train::TrainArgs>),
    /// Score captioners on held-out images: the model card's table, metrics and loss plot.
    ///
    /// Each --model captions every reference image through the same pipeline as `florence
    /// caption` (its captions are kept in OUT/predictions/NAME.jsonl); --predictions scores captions
    /// made earlier. Writes OUT/metrics.json (sacreBLEU, chrF, ROUGE-L, COCO BLEU-4 and CIDEr-D,
    /// each equal to its reference implementation), OUT/report.md (the table to paste into a model
    /// card) and OUT/report.html (self-contained, with thumbnails), and with --metrics-from the
    /// run's loss curves as OUT/loss.png and OUT/loss.svg.
    #[command(after_help = "Examples:
  florence eval --references data/eval --model microsoft/Florence-2-base --model run/final \\
      --metrics-from run --output report
  florence eval --references run/eval_image_paths.jsonl --model base=./Florence-2-base --model tuned=run/final --output report
  florence eval --references data/eval --predictions mine=captions.jsonl --output report --overwrite

Exit status: 0 when the report was written, 2 when it could not be (an error, or Ctrl-C).")]
    Eval(Box<eval::EvalArgs>),
    /// Serve a model over HTTP: OpenAI-compatible chat completions with an image, our own
    /// /v1/caption, health and Prometheus metrics.
    ///
    /// The model is loaded once; concurrent requests are captioned together (a request joins the
    /// running batch between two decoding steps and leaves it when done), each with the tokens it
    /// would get alone. Ctrl-C or SIGTERM stops accepting, finishes the requests in flight and exits.
    #[command(after_help = "Examples:
  florence serve --model ./Florence-2-base
  florence serve --model microsoft/Florence-2-large --port 8080 --max-batch-size 16 --threads 16
  florence serve --model ./my-finetune --host 0.0.0.0 --api-key-file key.txt --task '<MORE_DETAILED_CAPTION>'

  curl -s localhost:8000/v1/caption -F image=@photo.jpg -F task='<DETAILED_CAPTION>'
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"florence\",
      \"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"<CAPTION>\"},
      {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/jpeg;base64,'\"$(base64 -w0 photo.jpg)\"'\"}}]}]}'

Exit status: 0 after a clean stop, 2 when the server could not start (an address in use, a model
that does not load).")]
    Serve(Box<serve::ServeArgs>),
}

#[derive(clap::Args)]
struct BenchCommand {
    #[command(flatten)]
    args: bench::BenchArgs,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

/// Sets the worker-thread count before any thread pool starts.
fn set_threads(n: Option<usize>) -> Result<(), florence::Error> {
    if let Some(n) = n {
        if n == 0 {
            return Err(florence::Error::Usage("--threads must be at least 1".into()));
        }
        // Read by rayon and candle when their thread pools start, i.e. after this.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    Ok(())
}

/// Keeps freed memory in the process, so that large activations do not pay for fresh, zeroed
/// pages on every pass, and uses one malloc arena, whose heap glibc does not unmap when it empties.
// By default glibc hands every block over 32 MB back to the OS (a quarter of the first run's
// time went to the kernel clearing pages); the worker threads' arenas live in 64 MB heaps that
// glibc unmaps whenever one empties, whatever the trim threshold: with them a 4-image batch took
// 3.1 million page faults, with one arena 0.35 million.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; it runs before any other thread
    // starts, and the values are valid for these parameters.
    unsafe {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        const M_ARENA_MAX: i32 = -8;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        mallopt(M_MMAP_MAX, 0);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
        mallopt(M_ARENA_MAX, 1);
    }
}

/// A flag the first Ctrl-C sets (saying `what` happens now); a second one exits at once.
fn on_ctrl_c(what: &'static str) -> Arc<AtomicBool> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\n{what} (Ctrl-C again to quit now)");
    });
    interrupted
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Caption(a) => set_threads(a.threads).and_then(|_| {
            // The first Ctrl-C finishes the batch in flight and writes its captions.
            let interrupted = on_ctrl_c("stopping after the current batch");
            florence::on_pool_thread(|| caption::run(*a, &interrupted))
        }),
        Command::Train(t) => set_threads(t.threads).and_then(|_| {
            let interrupted = on_ctrl_c("stopping after the current step, with a checkpoint");
            florence::on_pool_thread(|| train::run(*t, &interrupted))
        }),
        Command::Eval(e) => set_threads(e.threads).and_then(|_| {
            let interrupted = on_ctrl_c("stopping after the current batch");
            florence::on_pool_thread(|| eval::run(*e, &interrupted))
        }),
        Command::Serve(s) => set_threads(s.threads).and_then(|_| serve::run(*s)).map(|_| true),
        Command::Bench(b) => set_threads(b.threads)
            .and_then(|_| florence::on_pool_thread(|| bench::bench(b.args)))
            .map(|_| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
