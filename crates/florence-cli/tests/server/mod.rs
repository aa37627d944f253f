//! A `florence serve` process on a loopback port for the tests, and requests to it.

#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

/// A running server; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Lines of its standard error so far (read by a thread).
    stderr: std::sync::Mutex<mpsc::Receiver<String>>,
    pub log: Vec<String>,
}

/// A reply: status, headers and body.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The message of an OpenAI-style error body.
    pub fn error(&self) -> String {
        let v = self.json();
        assert!(v["error"]["type"].is_string(), "not an error body: {v}");
        v["error"]["message"].as_str().unwrap().to_string()
    }
}

impl Server {
    /// Starts `florence serve --model DIR --port 0 FLAGS` and waits until the model is loaded.
    pub fn start(model: &Path, flags: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_florence"))
            .args([
                "serve",
                "--model",
                model.to_str().unwrap(),
                "--port",
                "0",
                "--threads",
                "2",
            ])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = read_lines(child.stderr.take().unwrap());
        let mut server = Server {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            stderr: std::sync::Mutex::new(stderr),
            log: Vec::new(),
        };
        let line = server.wait_for("listening on http://");
        let addr = line.split("http://").nth(1).unwrap().split_whitespace().next().unwrap();
        server.addr = addr.parse().unwrap();
        server.wait_for("ready");
        server
    }

    /// Waits for a line of standard error containing `text` and returns it.
    pub fn wait_for(&mut self, text: &str) -> String {
        loop {
            match self.stderr.lock().unwrap().recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!("the server never said {text:?}; it said:\n{}", self.log.join("\n")),
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn get(&self, path: &str) -> Reply {
        reply(ureq::get(&self.url(path)).call())
    }

    /// POSTs a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(path, "application/json", body.to_string().as_bytes(), &[])
    }

    pub fn post_raw(&self, path: &str, content_type: &str, body: &[u8], headers: &[(&str, &str)]) -> Reply {
        let mut request = ureq::post(&self.url(path))
            .set("Content-Type", content_type)
            .timeout(Duration::from_secs(120));
        for (name, value) in headers {
            request = request.set(name, value);
        }
        reply(request.send_bytes(body))
    }

    /// The value of a metric line that starts with `prefix` (the first such line).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        self.get("/metrics")
            .body
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse().unwrap())
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_lines(stderr: ChildStderr) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn reply(result: Result<ureq::Response, ureq::Error>) -> Reply {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = response.header(&n).unwrap_or_default().to_string();
            (n, v)
        })
        .collect();
    let mut body = String::new();
    response.into_reader().read_to_string(&mut body).unwrap();
    Reply { status, headers, body }
}

/// The file as base64.
pub fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An OpenAI chat request with `text` (if any) and the image as a data: URL.
pub fn chat(text: Option<&str>, image: &[u8], extra: Value) -> Value {
    let mut content = Vec::new();
    if let Some(text) = text {
        content.push(json!({"type": "text", "text": text}));
    }
    let url = format!("data:image/png;base64,{}", base64(image));
    content.push(json!({"type": "image_url", "image_url": {"url": url}}));
    let mut request = json!({"model": "florence", "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().unwrap() {
        request[k] = v.clone();
    }
    request
}

/// A multipart form with the image file and text fields.
pub fn form(image: &[u8], file_name: &str, fields: &[(&str, &str)]) -> (String, Vec<u8>) {
    let boundary = "florence-test-boundary-7d93";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{file_name}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(image);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}
