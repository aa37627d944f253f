//! `florence bench`: times each stage of one generation and reports peak memory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use florence::generation::{generate, StepDecoder};
use florence::{Florence, Task};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Image to caption (decoding and preprocessing are timed too).
    image: PathBuf,
    /// Task token or prompt.
    #[arg(long, default_value = "<CAPTION>")]
    task: String,
    /// Beams of beam search.
    #[arg(long, default_value_t = 3)]
    num_beams: usize,
    /// New tokens, forced (min = max), as in the reference benchmark.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Copies of the image per forward pass.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Timed runs after one warm-up run; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[command(flatten)]
    precision: crate::precision::PrecisionArgs,
}

/// Times each decoder step.
struct TimedDecoder<'a, D: StepDecoder> {
    inner: &'a mut D,
    steps: Vec<Duration>,
    reorders: Duration,
}

impl<D: StepDecoder> StepDecoder for TimedDecoder<'_, D> {
    fn step(&mut self, images: &[usize], tokens: &[u32]) -> florence::Result<Vec<Vec<f32>>> {
        let t = Instant::now();
        let r = self.inner.step(images, tokens);
        self.steps.push(t.elapsed());
        r
    }
    fn reorder(&mut self, image: usize, order: &[u32]) -> florence::Result<()> {
        let t = Instant::now();
        let r = self.inner.reorder(image, order);
        self.reorders += t.elapsed();
        r
    }
}

/// Peak resident memory of this process (`VmHWM`), in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn bench(a: BenchArgs) -> florence::Result<()> {
    for (flag, value) in [
        ("--runs", a.runs),
        ("--batch-size", a.batch_size),
        ("--new-tokens", a.new_tokens),
    ] {
        if value == 0 {
            return Err(florence::Error::Usage(format!("{flag} must be at least 1")));
        }
    }
    let precision = a.precision.resolve("bench", false)?;
    let t = Instant::now();
    let model = Florence::load(&a.model, &precision.options)?;
    let load = t.elapsed();
    for w in model.warnings() {
        eprintln!("warning: {w}");
    }
    let task = Task::new(&a.task, None)?;
    let mut gen = model.generation_config().clone();
    gen.num_beams = a.num_beams;
    gen.max_new_tokens = a.new_tokens;
    gen.min_new_tokens = a.new_tokens;
    gen.sampling = None;
    gen.validate(model.max_decoder_positions())?;

    let mut rows: Vec<[f64; 9]> = Vec::new();
    for run in 0..=a.runs {
        let timed = match model.network() {
            Ok(network) => staged_run(&a, &model, network, &task, &gen)?,
            // The tensor path (a GPU) is timed whole: its stages overlap on the device.
            Err(_) => whole_run(&a, &model, &task, &gen)?,
        };
        if run == 0 {
            let stages = format!("  (vision {:.1} ms, decoder step {:.1} ms)", timed[2], timed[6]);
            let stages = if timed[2].is_nan() { "" } else { &stages };
            println!("first run (cold)     {:9.1} ms{stages}", timed[8]);
        } else {
            rows.push(timed);
        }
    }
    report(&a, &precision.description, load, &rows);
    Ok(())
}

/// `--batch-size` copies of the decoded `--image` (decoding is timed as a stage).
fn decoded_batch(a: &BenchArgs) -> florence::Result<Vec<florence::RgbImage>> {
    Ok(vec![florence::preprocess::load_image(&a.image)?; a.batch_size])
}

/// One generation on the CPU kernels, stage by stage: the row `report` prints.
fn staged_run(
    a: &BenchArgs,
    model: &Florence,
    network: &florence::Florence2,
    task: &Task,
    gen: &florence::GenerationConfig,
) -> florence::Result<[f64; 9]> {
    let t0 = Instant::now();
    let images = decoded_batch(a)?;
    let decode = t0.elapsed();
    let t = Instant::now();
    let pv = model.pixel_values(&images)?;
    let preprocess = t.elapsed();
    let t = Instant::now();
    let feats = network.vision_features(&pv)?;
    network.settle_memory();
    let vision = t.elapsed();
    let t = Instant::now();
    let projected = network.project(&feats)?;
    let prompt = model.tokenizer().encode(&task.prompt)?;
    let projector = t.elapsed();
    let t = Instant::now();
    let memory = network.encode(&projected, &prompt)?;
    let encoder = t.elapsed();
    let t = Instant::now();
    let mut dec = network.decoder(&memory, gen.num_beams)?;
    let cross_kv = t.elapsed();
    let t = Instant::now();
    let mut timed = TimedDecoder {
        inner: &mut dec,
        steps: Vec::new(),
        reorders: Duration::ZERO,
    };
    let seqs = generate(gen, images.len(), &mut timed)?;
    let generation = t.elapsed();
    let steps: Duration = timed.steps.iter().sum();
    let search = generation - steps - timed.reorders;
    let per_step = ms(steps) / timed.steps.len().max(1) as f64;
    check_forced(a, seqs.iter().map(Vec::len))?;
    Ok([
        ms(decode),
        ms(preprocess),
        ms(vision),
        ms(projector),
        ms(encoder),
        ms(cross_kv),
        per_step,
        ms(search + timed.reorders),
        ms(t0.elapsed()),
    ])
}

/// One whole generation through `Florence::run`, for a model off the CPU kernels: decoding,
/// preprocessing and the end-to-end time; the model's own stages are not split (NaN).
fn whole_run(
    a: &BenchArgs,
    model: &Florence,
    task: &Task,
    gen: &florence::GenerationConfig,
) -> florence::Result<[f64; 9]> {
    let t0 = Instant::now();
    let images = decoded_batch(a)?;
    let decode = t0.elapsed();
    let t = Instant::now();
    let prepared: Vec<_> = images.iter().map(|i| model.processor().prepare(i)).collect();
    let preprocess = t.elapsed();
    let outputs = model.run_prepared(&prepared, task, gen)?;
    check_forced(a, outputs.iter().map(|o| o.ids.len()))?;
    let mut row = [f64::NAN; 9];
    (row[0], row[1], row[8]) = (ms(decode), ms(preprocess), ms(t0.elapsed()));
    Ok(row)
}

/// Every sequence has the forced length (the start token and `--new-tokens`).
fn check_forced(a: &BenchArgs, mut lengths: impl Iterator<Item = usize>) -> florence::Result<()> {
    match lengths.find(|&n| n != a.new_tokens + 1) {
        Some(n) => Err(florence::Error::Internal(format!(
            "generated {} tokens, not the {} forced by --new-tokens",
            n - 1,
            a.new_tokens
        ))),
        None => Ok(()),
    }
}

/// Prints the medians of the timed runs' stages, one per line.
fn report(a: &BenchArgs, weights: &str, load: Duration, rows: &[[f64; 9]]) {
    let median = |i: usize| {
        let mut v: Vec<f64> = rows.iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("weights              {weights}");
    println!("model load           {:9.1} ms", ms(load));
    let names = [
        "image decode",
        "preprocess",
        "vision tower",
        "projector",
        "text encoder",
        "cross-attention K/V",
        "decoder step (mean)",
        "search + reorder",
        "end to end (no load)",
    ];
    for (i, n) in names.iter().enumerate().filter(|&(i, _)| !median(i).is_nan()) {
        println!("{n:<20} {:9.1} ms", median(i));
    }
    println!(
        "images/s             {:9.2}  ({} image(s), {} beams, {} new tokens, median of {} runs)",
        a.batch_size as f64 / (median(8) / 1e3),
        a.batch_size,
        a.num_beams,
        a.new_tokens,
        rows.len()
    );
    if let Some(mb) = peak_rss_mb() {
        println!("peak RSS             {mb:9.0} MB");
    }
}
