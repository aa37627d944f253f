//! `florence serve`: the flags become a [`ServeConfig`]; the server lives in `florence-serve`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use florence::preprocess::DecodeOptions;
use florence::Error;
use florence_serve::ServeConfig;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model folder (config.json, weights, tokenizer), or a Hugging Face model id such as
    /// microsoft/Florence-2-large, taken from the Hugging Face cache or downloaded into it.
    #[arg(long, value_name = "DIR|ORG/NAME", default_value = florence::hub::DEFAULT_MODEL)]
    model: String,
    /// Never download: use only local folders and the Hugging Face cache (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Address to listen on. The default answers only this machine; 0.0.0.0 answers every
    /// network the machine is on (set an --api-key then).
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000, value_name = "PORT")]
    port: u16,
    /// The model's name in /v1/models and in replies (default: the --model value).
    #[arg(long, value_name = "NAME")]
    model_id: Option<String>,
    /// The task of chat requests whose text names none.
    #[arg(long, default_value = "<CAPTION>", value_name = "TASK")]
    task: String,

    /// Most requests captioned at once: they share each decoding step, and a request joins the
    /// running batch as soon as a place is free.
    #[arg(long, default_value_t = 8, value_name = "N", help_heading = "Limits")]
    max_batch_size: usize,
    /// Most requests waiting for a place in the batch; beyond them the server answers 503 with
    /// Retry-After at once.
    #[arg(long, default_value_t = 64, value_name = "N", help_heading = "Limits")]
    max_queue: usize,
    /// Largest request body, in bytes (413 beyond); base64 makes an image a third larger.
    #[arg(long, default_value_t = 20 << 20, value_name = "N", help_heading = "Limits")]
    max_body_bytes: usize,
    /// Refuse images with more pixels than this (decompression-bomb guard).
    #[arg(long, value_name = "N", default_value_t = DecodeOptions::default().max_pixels, help_heading = "Limits")]
    max_pixels: u64,
    /// Longest a request may take, waiting included (504 beyond; its work is cancelled).
    #[arg(long, default_value_t = 300.0, value_name = "S", help_heading = "Limits")]
    timeout_s: f64,
    /// Requests to /v1/* must send "Authorization: Bearer KEY".
    #[arg(long, value_name = "KEY", conflicts_with = "api_key_file", help_heading = "Limits")]
    api_key: Option<String>,
    /// Read the API key from FILE (its first line), so it stays out of the process list.
    #[arg(long, value_name = "FILE", help_heading = "Limits")]
    api_key_file: Option<PathBuf>,

    /// Worker threads for the model (default: all cores).
    #[arg(long, value_name = "N", help_heading = "Performance")]
    pub threads: Option<usize>,
    #[command(flatten)]
    precision: crate::precision::PrecisionArgs,
}

impl ServeArgs {
    /// Checks the flags and builds the server's configuration.
    fn config(&self) -> Result<ServeConfig, Error> {
        for (flag, value) in [
            ("--max-batch-size", self.max_batch_size),
            ("--max-body-bytes", self.max_body_bytes),
        ] {
            if value == 0 {
                return Err(Error::usage(format!("{flag} must be at least 1")));
            }
        }
        if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) {
            return Err(Error::usage(format!(
                "--timeout-s must be positive, got {}",
                self.timeout_s
            )));
        }
        florence::Task::new(&self.task, None)?;
        let api_key = match (&self.api_key, &self.api_key_file) {
            (Some(key), _) => Some(key.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                let key = text.lines().next().unwrap_or("").trim().to_string();
                if key.is_empty() {
                    return Err(Error::usage(format!("{}: the API key file is empty", path.display())));
                }
                Some(key)
            }
            (None, None) => None,
        };
        if api_key.as_deref() == Some("") {
            return Err(Error::usage("--api-key is empty"));
        }
        Ok(ServeConfig {
            addr: SocketAddr::new(self.host, self.port),
            model_id: self.model_id.clone().unwrap_or_else(|| self.model.clone()),
            weights: self.precision.resolve("serve", true)?.description,
            max_batch_size: self.max_batch_size,
            max_queue: self.max_queue,
            max_body_bytes: self.max_body_bytes,
            decode: DecodeOptions {
                max_pixels: self.max_pixels,
                ..DecodeOptions::default()
            },
            timeout: Duration::from_secs_f64(self.timeout_s),
            api_key,
            default_task: self.task.clone(),
        })
    }
}

/// Runs the server until Ctrl-C or SIGTERM.
pub fn run(args: ServeArgs) -> Result<(), Error> {
    let config = args.config()?;
    let model = args.model.clone();
    let load = move || {
        let offline = args.offline || florence::hub::offline_from_env();
        let dir = florence::hub::resolve(&args.model, offline, true)?;
        let loaded = florence::Florence::load(&dir, &args.precision.resolve("serve", true)?.options)?;
        for warning in loaded.warnings() {
            eprintln!("warning: {warning}");
        }
        Ok(loaded)
    };
    florence_serve::serve(config, load, |addr| {
        eprintln!("florence serve: listening on http://{addr} (loading {model})");
    })
}
