//! `florence serve` end to end on loopback, with the reference fixture models: every route, the
//! records equal to `florence caption --format jsonl`, concurrent requests equal to sequential
//! ones, bad input, the queue bound, the API key, timeouts, cancellation and graceful shutdown.

#[path = "../../florence/tests/common/mod.rs"]
mod common;
mod server;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server::{chat, form, Server};

fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(common::image(name)).unwrap()
}

/// The record `florence caption --format jsonl` prints for `image` with the flags equivalent to
/// the caption request `settings`.
fn cli_record(model: &str, image: &str, settings: &Value) -> Value {
    let mut args: Vec<String> = vec![
        "caption".into(),
        "--model".into(),
        model.into(),
        "--format".into(),
        "jsonl".into(),
    ];
    for (key, value) in settings.as_object().unwrap() {
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            Value::Bool(true) => args.push(flag),
            Value::String(s) => args.extend([flag, s.clone()]),
            other => args.extend([flag, other.to_string()]),
        }
    }
    args.push(common::image(image).to_str().unwrap().into());
    let out = Command::new(env!("CARGO_BIN_EXE_florence"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A /v1/caption request: the image, named by its path like the CLI's record, and `settings`.
fn caption_request(image: &str, settings: &Value) -> Value {
    let mut body = settings.clone();
    body["image"] = json!(server::base64(&image_bytes(image)));
    body["path"] = json!(common::image(image).to_str().unwrap());
    body
}

fn settings() -> Vec<Value> {
    vec![
        json!({"task": "<CAPTION>"}),
        json!({"task": "<OD>", "num_beams": 1, "max_new_tokens": 20}),
        json!({"task": "<CAPTION_TO_PHRASE_GROUNDING>", "text_input": "a green car", "max_new_tokens": 16}),
        json!({"task": "<MORE_DETAILED_CAPTION>", "num_beams": 1, "do_sample": true, "seed": 7, "top_k": 5, "max_new_tokens": 12}),
        json!({"task": "What is this?", "num_beams": 2, "min_new_tokens": 5, "max_new_tokens": 12}),
    ]
}

const IMAGES: [&str; 3] = ["noise_rgb.png", "gradient_rgba.png", "gray16.png"];

/// /v1/caption returns exactly the CLI's record, and a chat completion's content is its caption
/// (or the structured result's JSON); a multipart upload gives the same record.
#[test]
fn records_equal_florence_caption_jsonl() {
    for name in ["remote_f32", "native_f32"] {
        let dir = common::model_dir(name);
        let model = dir.path().to_str().unwrap();
        let server = Server::start(dir.path(), &[]);
        for (i, settings) in settings().iter().enumerate() {
            let image = IMAGES[i % IMAGES.len()];
            let want = cli_record(model, image, settings);
            let got = server.post("/v1/caption", &caption_request(image, settings));
            assert_eq!(got.status, 200, "{}", got.body);
            assert_eq!(got.json(), want, "{name} {settings}");

            let mut chat_extra = json!({});
            if let Some(n) = settings.get("max_new_tokens") {
                chat_extra["max_tokens"] = n.clone();
            }
            if let Some(b) = settings.get("num_beams") {
                chat_extra["num_beams"] = b.clone();
            }
            if settings.get("do_sample").is_some() || settings.get("min_new_tokens").is_some() {
                continue; // not expressible in a chat request
            }
            let text = match settings.get("text_input") {
                Some(input) => format!("{}{}", settings["task"].as_str().unwrap(), input.as_str().unwrap()),
                None => settings["task"].as_str().unwrap().to_string(),
            };
            let reply = server.post(
                "/v1/chat/completions",
                &chat(Some(&text), &image_bytes(image), chat_extra),
            );
            assert_eq!(reply.status, 200, "{}", reply.body);
            let reply = reply.json();
            let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
            match want.get("text") {
                Some(text) => assert_eq!(content, text.as_str().unwrap()),
                None => assert_eq!(serde_json::from_str::<Value>(content).unwrap(), want["result"]),
            }
            let ids = want["ids"].as_array().unwrap().len() as u64;
            assert_eq!(reply["usage"]["completion_tokens"], json!(ids - 1));
            assert_eq!(reply["object"], "chat.completion");
            assert_eq!(reply["choices"][0]["message"]["role"], "assistant");
        }
        let settings = json!({"task": "<OD>", "max_new_tokens": 20});
        let want = cli_record(model, "palette.png", &settings);
        let (content_type, body) = form(
            &image_bytes("palette.png"),
            "palette.png",
            &[("task", "<OD>"), ("max_new_tokens", "20")],
        );
        let got = server.post_raw("/v1/caption", &content_type, &body, &[]);
        assert_eq!(got.status, 200, "{}", got.body);
        let mut got = got.json();
        assert_eq!(got["path"], "palette.png");
        got["path"] = want["path"].clone();
        assert_eq!(got, want);
    }
}

/// Requests sent together share decoding steps and get what each gets alone.
#[test]
fn concurrent_requests_equal_sequential_ones() {
    let dir = common::model_dir("native_bf16_sharded");
    let server = Server::start(dir.path(), &["--max-batch-size", "16"]);
    let mut requests = Vec::new();
    for (i, settings) in settings().into_iter().enumerate() {
        for (j, image) in IMAGES.iter().enumerate() {
            let mut s = settings.clone();
            // Long enough to overlap: forced lengths that differ, so requests leave at different steps.
            let n = 60 + 13 * (i * IMAGES.len() + j);
            s["max_new_tokens"] = json!(n);
            s["min_new_tokens"] = json!(n - 5);
            requests.push(caption_request(image, &s));
        }
    }
    let sequential: Vec<Value> = requests
        .iter()
        .map(|r| {
            let reply = server.post("/v1/caption", r);
            assert_eq!(reply.status, 200, "{}", reply.body);
            reply.json()
        })
        .collect();
    let batched_before = batched_steps(&server);
    assert_eq!(batched_before, 0.0, "one at a time, every step holds one image");
    let concurrent: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| s.spawn(|| server.post("/v1/caption", r)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let reply = h.join().unwrap();
                assert_eq!(reply.status, 200, "{}", reply.body);
                reply.json()
            })
            .collect()
    });
    assert!(batched_steps(&server) > 0.0, "the requests never shared a step");
    for (i, (a, b)) in sequential.iter().zip(&concurrent).enumerate() {
        assert_eq!(a, b, "request {i}: {}", requests[i]["task"]);
    }
}

/// Decoding steps that held more than one image.
fn batched_steps(server: &Server) -> f64 {
    let all = server.metric("florence_batch_size_count").unwrap();
    let single = server.metric("florence_batch_size_bucket{le=\"1.0\"}").unwrap();
    all - single
}

/// Each bad request gets its status and a message naming the problem; the server stays healthy.
#[test]
fn bad_requests_get_their_status_and_message() {
    let dir = common::model_dir("remote_f32");
    let server = Server::start(dir.path(), &["--max-pixels", "5000", "--max-body-bytes", "200000"]);
    let png = image_bytes("noise_rgb.png");
    let b64 = server::base64(&png);
    let mut truncated_png = png.clone();
    truncated_png.truncate(png.len() / 2);
    let big: Vec<u8> = {
        let img = image::RgbImage::from_pixel(100, 100, image::Rgb([10, 200, 30]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/v1/caption",
            json!({"image": b64, "bogus": 1}),
            400,
            "unknown field `bogus`",
        ),
        ("/v1/caption", json!({"image": "%%%"}), 400, "not valid base64"),
        (
            "/v1/caption",
            json!({"image": server::base64(b"hello")}),
            400,
            "cannot read the image: not a recognized image format",
        ),
        (
            "/v1/caption",
            json!({"image": server::base64(&truncated_png)}),
            400,
            "truncated",
        ),
        ("/v1/caption", json!({"image": server::base64(&big)}), 400, "pixels"),
        (
            "/v1/caption",
            json!({"image": b64, "task": "<FOO>"}),
            400,
            "unknown task <FOO>",
        ),
        (
            "/v1/caption",
            json!({"image": b64, "task": "<CAPTION_TO_PHRASE_GROUNDING>"}),
            400,
            "needs a text input",
        ),
        (
            "/v1/caption",
            json!({"image": b64, "temperature": 0.5}),
            400,
            "temperature needs \"do_sample\": true",
        ),
        (
            "/v1/caption",
            json!({"image": b64, "max_new_tokens": 0}),
            400,
            "max_new_tokens must be at least 1",
        ),
        (
            "/v1/caption",
            json!({"image": b64, "max_new_tokens": 100000}),
            400,
            "exceeds the model's",
        ),
        ("/v1/caption", json!({"task": "<OD>"}), 400, "no image"),
        (
            "/v1/caption",
            json!({"image": "x".repeat(300_000)}),
            413,
            "larger than the server's --max-body-bytes of 200000",
        ),
        ("/v1/chat/completions", json!({"messages": []}), 400, "no user message"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            400,
            "has no image",
        ),
        (
            "/v1/chat/completions",
            chat(None, &png, json!({"n": 2})),
            400,
            "n must be 1",
        ),
        (
            "/v1/chat/completions",
            chat(Some("<FOO>"), &png, json!({})),
            400,
            "unknown task <FOO>",
        ),
        (
            "/v1/chat/completions",
            chat(Some("<REGION_TO_OCR>"), &png, json!({})),
            400,
            "needs a text input after it",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}),
            400,
            "the server does not fetch URLs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
            400,
            "unknown variant `input_audio`",
        ),
    ];
    for (path, body, status, message) in cases {
        let reply = server.post(path, &body);
        assert_eq!(reply.status, status, "{path} {message}: {}", reply.body);
        let error = reply.error();
        assert!(error.contains(message), "{path}: {error:?} should say {message:?}");
        assert!(!error.contains('\n'), "one line: {error:?}");
    }
    let reply = server.post_raw("/v1/caption", "application/json", b"{not json", &[]);
    assert_eq!(reply.status, 400);
    assert!(reply.error().contains("not a valid caption request"));
    let reply = server.get("/v1/nothing");
    assert_eq!(reply.status, 404);
    assert!(reply.error().contains("no route GET /v1/nothing"));

    assert_eq!(server.get("/health").status, 200);
    let ok = server.post("/v1/caption", &json!({"image": b64, "max_new_tokens": 8}));
    assert_eq!(ok.status, 200, "{}", ok.body);
    let metrics = server.get("/metrics").body;
    assert!(
        metrics.contains("florence_requests_total{route=\"/v1/caption\",status=\"400\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("florence_requests_total{route=\"/v1/caption\",status=\"413\"}"));
}

/// A long forced caption on the 4096-position fixture: seconds of work.
fn long_request(tokens: usize) -> Value {
    json!({
        "image": server::base64(&image_bytes("noise_rgb.png")),
        "num_beams": 1, "max_new_tokens": tokens, "min_new_tokens": tokens,
    })
}

/// With one request running and one waiting, the others are turned away at once with 503 and
/// Retry-After, and the two admitted finish.
#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let dir = common::model_dir("native_bf16_sharded");
    let server = Server::start(dir.path(), &["--max-batch-size", "1", "--max-queue", "1"]);
    let body = long_request(3000);
    let started = Instant::now();
    let replies: Vec<server::Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6).map(|_| s.spawn(|| server.post("/v1/caption", &body))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let refused: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(
        (ok, refused.len()),
        (2, 4),
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in refused {
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(r.error().contains("at capacity"), "{}", r.body);
    }
    assert!(started.elapsed() > Duration::from_millis(100));
    assert_eq!(server.get("/health").status, 200);
}

/// With an API key, /v1/* needs `Authorization: Bearer KEY`; /health does not.
#[test]
fn the_api_key_guards_the_api() {
    let dir = common::model_dir("remote_f32");
    let key_file = dir.path().join("key.txt");
    std::fs::write(&key_file, "s3cret\n").unwrap();
    let server = Server::start(dir.path(), &["--api-key-file", key_file.to_str().unwrap()]);
    let body = json!({"image": server::base64(&image_bytes("noise_rgb.png")), "max_new_tokens": 8}).to_string();
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", "s3cret")],
    ] {
        let reply = server.post_raw("/v1/caption", "application/json", body.as_bytes(), &headers);
        assert_eq!(reply.status, 401, "{headers:?}");
        assert!(reply.error().contains("API key"));
    }
    let reply = server.post_raw(
        "/v1/caption",
        "application/json",
        body.as_bytes(),
        &[("Authorization", "Bearer s3cret")],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.get("/v1/models").status, 401);
}

/// A request past --timeout-s gets 504 and its work stops; so does one whose client hangs up.
#[test]
fn timeouts_and_disconnects_cancel_the_work() {
    let dir = common::model_dir("native_bf16_sharded");
    let server = Server::start(dir.path(), &["--timeout-s", "0.3"]);
    let started = Instant::now();
    let reply = server.post("/v1/caption", &long_request(4000));
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert!(reply.error().contains("--timeout-s of 0.3 s"), "{}", reply.body);
    assert!(started.elapsed() < Duration::from_secs(5));
    wait_until_idle(&server);
    assert_eq!(server.metric("florence_images_total"), Some(0.0));

    // A client that sends its request and closes the connection.
    let server = Server::start(dir.path(), &[]);
    let body = long_request(4000).to_string();
    {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
        write!(
            stream,
            "POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.metric("florence_batch_images").unwrap_or(0.0) < 1.0 {
            assert!(Instant::now() < deadline, "the request never joined the batch");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    wait_until_idle(&server);
    assert_eq!(server.metric("florence_images_total"), Some(0.0));
    assert_eq!(
        server.metric("florence_requests_total{route=\"/v1/caption\",status=\"499\"}"),
        Some(1.0)
    );
}

/// Waits (at most 10 s, far less than the cancelled work) until no image is in the batch.
fn wait_until_idle(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("florence_batch_images").unwrap_or(0.0) > 0.0 {
        assert!(Instant::now() < deadline, "the cancelled work kept running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM stops accepting, lets the requests in flight finish, and exits 0.
#[test]
fn sigterm_drains_requests_in_flight() {
    let dir = common::model_dir("native_bf16_sharded");
    let mut server = Server::start(dir.path(), &[]);
    let body = long_request(1500);
    let replies = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(|| server.post("/v1/caption", &body))).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.metric("florence_batch_images").unwrap_or(0.0) < 3.0 {
            assert!(Instant::now() < deadline, "the requests never joined the batch");
            std::thread::sleep(Duration::from_millis(10));
        }
        server.terminate();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    for reply in replies {
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.json()["ids"].as_array().unwrap().len(), 1501);
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    server.wait_for("stopping");
    assert!(std::net::TcpStream::connect(server.addr).is_err(), "still accepting");
}

/// The routes that describe the server, and a request as the official OpenAI client sends it
/// (the body shape of OpenAI's vision guide), plain and streamed.
#[test]
fn openai_clients_get_the_openai_shapes() {
    let dir = common::model_dir("remote_f32");
    let model = dir.path().to_str().unwrap();
    let server = Server::start(dir.path(), &["--model-id", "florence-2-test"]);
    let health = server.get("/health");
    assert_eq!((health.status, health.json()), (200, json!({"status": "ok"})));
    let models = server.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "florence-2-test");
    assert_eq!(models["data"][0]["object"], "model");

    // From OpenAI's "Images and vision" guide (base64 input), with our image.
    let png = image_bytes("gradient_rgba.png");
    let recorded = format!(
        r#"{{"model": "gpt-4.1-mini", "messages": [{{"role": "user", "content": [{{"type": "text", "text": "What's in this image?"}}, {{"type": "image_url", "image_url": {{"url": "data:image/jpeg;base64,{}", "detail": "auto"}}}}]}}], "max_tokens": 20}}"#,
        server::base64(&png)
    );
    let reply = server.post_raw(
        "/v1/chat/completions",
        "application/json",
        recorded.as_bytes(),
        &[
            ("Authorization", "Bearer sk-none"),
            ("User-Agent", "OpenAI/Python 1.99.0"),
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = reply.json();
    let want = cli_record(
        model,
        "gradient_rgba.png",
        &json!({"task": "What's in this image?", "max_new_tokens": 20}),
    );
    assert_eq!(reply["choices"][0]["message"]["content"], want["text"]);
    assert_eq!(reply["model"], "florence-2-test");
    assert!(reply["id"].as_str().unwrap().starts_with("chatcmpl-"));

    // Streamed, greedy: the deltas add up to the caption.
    let want = cli_record(
        model,
        "gradient_rgba.png",
        &json!({"task": "<CAPTION>", "num_beams": 1, "max_new_tokens": 20}),
    );
    let body = chat(
        None,
        &png,
        json!({"stream": true, "num_beams": 1, "max_tokens": 20, "stream_options": {"include_usage": true}}),
    );
    let reply = server.post("/v1/chat/completions", &body);
    assert_eq!(reply.status, 200);
    assert!(reply.header("content-type").unwrap().starts_with("text/event-stream"));
    let events: Vec<&str> = reply.body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want["text"].as_str().unwrap());
    assert!(chunks.len() > 4, "the caption came in one piece: {chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        usage["completion_tokens"],
        json!(want["ids"].as_array().unwrap().len() - 1)
    );
}
