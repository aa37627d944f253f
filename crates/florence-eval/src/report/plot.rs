//! Training and validation loss curves of `florence train` runs, as PNG and SVG.

use std::path::Path;
use std::sync::Once;

use florence::Error;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// A run's loss curves, read from its `metrics.jsonl`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curves {
    /// The run's name in the legend (its folder's name).
    pub name: String,
    /// (optimizer step, training loss).
    pub train: Vec<(f64, f64)>,
    /// (optimizer step, validation loss).
    pub eval: Vec<(f64, f64)>,
}

impl Curves {
    /// Reads `RUN/metrics.jsonl`: lines with `loss` are training steps, lines with `eval_loss`
    /// evaluations.
    pub fn read(run: &Path) -> Result<Self, Error> {
        let file = run.join("metrics.jsonl");
        let text = std::fs::read_to_string(&file).map_err(|e| {
            Error::usage(format!(
                "{}: {e}; --metrics-from takes a `florence train` output folder",
                file.display()
            ))
        })?;
        let name = run
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        let mut curves = Curves {
            name,
            ..Default::default()
        };
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| Error::usage(format!("{}:{}: {e}", file.display(), n + 1)))?;
            let Some(step) = v["step"].as_f64() else { continue };
            if let Some(loss) = v["loss"].as_f64() {
                curves.train.push((step, loss));
            }
            if let Some(loss) = v["eval_loss"].as_f64() {
                curves.eval.push((step, loss));
            }
        }
        if curves.train.is_empty() && curves.eval.is_empty() {
            return Err(Error::usage(format!("{}: no losses recorded yet", file.display())));
        }
        Ok(curves)
    }
}

const WIDTH: u32 = 900;
const HEIGHT: u32 = 500;
const FONT: &str = "sans-serif";

/// Plotters draws text with its own rasterizer and the DejaVu Sans the binary carries.
fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is valid TrueType, so registering cannot fail.
        let _ = register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// The loss plot of every run, as PNG bytes and SVG text.
pub fn loss_plot(runs: &[Curves]) -> Result<(Vec<u8>, String), Error> {
    register();
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    draw(
        BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area(),
        runs,
    )?;
    let image = image::RgbImage::from_raw(WIDTH, HEIGHT, rgb).expect("buffer of the plot's size");
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::internal(format!("encoding the loss plot: {e}")))?;
    let mut svg = String::new();
    draw(
        SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area(),
        runs,
    )?;
    Ok((png, svg))
}

fn draw<DB: DrawingBackend>(area: DrawingArea<DB, plotters::coord::Shift>, runs: &[Curves]) -> Result<(), Error> {
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| Error::internal(format!("drawing the loss plot: {e}"));
    area.fill(&WHITE).map_err(fail)?;
    let points = runs.iter().flat_map(|r| r.train.iter().chain(&r.eval));
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(&area)
        .caption("Loss", (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
        .map_err(fail)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("loss")
        .label_style((FONT, 14))
        .draw()
        .map_err(fail)?;
    for (k, run) in runs.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let label = |what: &str| {
            if runs.len() == 1 {
                what.to_string()
            } else {
                format!("{} {what}", run.name)
            }
        };
        chart
            .draw_series(LineSeries::new(
                run.train.iter().copied(),
                color.mix(0.5).stroke_width(1),
            ))
            .map_err(fail)?
            .label(label("train"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.mix(0.5)));
        chart
            .draw_series(LineSeries::new(run.eval.iter().copied(), color.stroke_width(2)).point_size(3))
            .map_err(fail)?
            .label(label("validation"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(fail)?;
    area.present().map_err(fail)
}
