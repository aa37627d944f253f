//! Captioning a messy folder end to end: every valid image gets exactly the caption it gets
//! alone, hand-written captions survive, bad files are logged and skipped, reruns do no model
//! work, killed runs leave no partial files and resume, and shards partition the input.

#[path = "../../florence/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn florence(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_florence"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const GEN: &[&str] = &["--max-new-tokens", "6", "--num-beams", "2", "--threads", "2"];

/// A JPEG with an EXIF orientation tag (6: rotate 90 degrees clockwise) spliced in after SOI.
fn jpeg_with_orientation(jpeg: &[u8], orientation: u8) -> Vec<u8> {
    let mut tiff = b"II*\0\x08\0\0\0".to_vec();
    tiff.extend([1, 0]); // one IFD entry
    tiff.extend([0x12, 0x01, 3, 0, 1, 0, 0, 0, orientation, 0, 0, 0]);
    tiff.extend([0, 0, 0, 0]);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend(tiff);
    let len = (app1.len() + 2) as u16;
    let mut out = jpeg[..2].to_vec();
    out.extend([0xFF, 0xE1]);
    out.extend(len.to_be_bytes());
    out.extend(app1);
    out.extend(&jpeg[2..]);
    out
}

fn noise(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ seed.wrapping_mul(97)) as u8;
        image::Rgb([v, v.wrapping_mul(3), v.wrapping_add(seed as u8)])
    })
}

/// Writes the corpus; returns the valid images and the bad files with a word of their reason.
// A list of every messy case, one after the other; long because the cases are many.
fn make_corpus(root: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, &'static str)>) {
    for d in ["a/sub", "b", "c"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let mut valid = Vec::new();
    let mut put = |rel: &str, bytes: Vec<u8>| {
        let p = root.join(rel);
        std::fs::write(&p, bytes).unwrap();
        valid.push(p);
    };
    let enc = |img: image::DynamicImage, fmt: image::ImageFormat| {
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, fmt).unwrap();
        buf.into_inner()
    };
    for f in ["noise_rgb.png", "gradient_rgba.png", "palette.png", "gray16.png"] {
        put(&format!("a/{f}"), std::fs::read(common::image(f)).unwrap());
    }
    put("a/sub/deep.png", enc(noise(33, 21, 1).into(), image::ImageFormat::Png));
    let photo = enc(noise(80, 50, 2).into(), image::ImageFormat::Jpeg);
    put("b/photo.jpg", photo.clone());
    put("b/rotated.jpg", jpeg_with_orientation(&photo, 6));
    put(
        "b/gray.jpg",
        enc(
            image::DynamicImage::ImageRgb8(noise(40, 40, 3)).grayscale(),
            image::ImageFormat::Jpeg,
        ),
    );
    put("c/img.bmp", enc(noise(20, 30, 4).into(), image::ImageFormat::Bmp));
    put("c/img.tiff", enc(noise(25, 25, 5).into(), image::ImageFormat::Tiff));
    put(
        "c/lossless.webp",
        enc(
            image::DynamicImage::ImageRgba8(image::DynamicImage::ImageRgb8(noise(30, 20, 6)).to_rgba8()),
            image::ImageFormat::WebP,
        ),
    );
    {
        let mut buf = Vec::new();
        let mut gif = image::codecs::gif::GifEncoder::new(&mut buf);
        for seed in [7, 8] {
            let frame = image::Frame::new(image::DynamicImage::ImageRgb8(noise(16, 16, seed)).to_rgba8());
            gif.encode_frame(frame).unwrap();
        }
        drop(gif);
        put("c/anim.gif", buf);
    }
    put("c/one_pixel.png", enc(noise(1, 1, 9).into(), image::ImageFormat::Png));
    put(
        "c/ünïcödé 画像.png",
        enc(noise(12, 12, 10).into(), image::ImageFormat::Png),
    );
    put("c/no_extension", enc(noise(14, 9, 11).into(), image::ImageFormat::Png));
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::OsStr::from_bytes(b"caf\xe9.png");
        let p = root.join("c").join(name);
        std::fs::write(&p, enc(noise(10, 10, 12).into(), image::ImageFormat::Png)).unwrap();
        valid.push(p);
        std::os::unix::fs::symlink("..", root.join("a/sub/loop")).unwrap();
    }
    let bad_dir = root.join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let png = std::fs::read(common::image("noise_rgb.png")).unwrap();
    // c/img.tiff would share c/img.txt with c/img.bmp: it must be refused, not overwrite it.
    valid.retain(|p| !p.ends_with("c/img.tiff"));
    let collision = (root.join("c/img.tiff"), "already the caption of");
    let bad = vec![
        (bad_dir.join("zero.jpg"), Vec::new(), "empty"),
        (bad_dir.join("truncated.png"), png[..png.len() / 2].to_vec(), "decode"),
        (
            bad_dir.join("text.jpg"),
            b"this is not a picture\n".to_vec(),
            "not a recognized image format",
        ),
        (
            bad_dir.join("huge.png"),
            enc(noise(1200, 1000, 13).into(), image::ImageFormat::Png),
            "above the limit",
        ),
    ];
    let mut bad: Vec<(PathBuf, &'static str)> = bad
        .into_iter()
        .map(|(p, bytes, why)| {
            std::fs::write(&p, bytes).unwrap();
            (p, why)
        })
        .collect();
    bad.push(collision);
    valid.sort();
    (valid, bad)
}

fn sidecar(p: &Path) -> PathBuf {
    p.with_extension("txt")
}

/// The caption each image gets when captioned on its own (print mode, no files written).
fn single_captions(model: &str, images: &[PathBuf]) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    for img in images {
        let mut args = vec!["caption", "--model", model, "--format", "jsonl"];
        args.extend(GEN);
        // By OsStr: one file name is not UTF-8.
        let o = Command::new(env!("CARGO_BIN_EXE_florence"))
            .args(&args)
            .arg(img)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            img.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        out.insert(img.clone(), v["text"].as_str().unwrap().to_string());
    }
    out
}

fn temp_files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().ends_with(".florence-tmp") {
                found.push(e.path());
            }
        }
    }
    found
}

// One scenario on one corpus, step after step (caption, rerun, append, shards), because each
// step starts from the files the one before left; it is long for that reason.
#[test]
fn messy_folder_is_captioned_safely_and_resumably() {
    let model_dir = common::model_dir("native_f32");
    let model = s(model_dir.path()).to_string();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (valid, bad) = make_corpus(&data);
    let hand_written = valid.iter().find(|p| p.ends_with("a/noise_rgb.png")).unwrap().clone();
    std::fs::write(sidecar(&hand_written), "my own caption\n").unwrap();
    let expected = single_captions(&model, &valid);

    // EXIF orientation is applied: the rotated copy decodes with its sides swapped.
    let plain = florence::preprocess::load_image(&data.join("b/photo.jpg")).unwrap();
    let rotated = florence::preprocess::load_image(&data.join("b/rotated.jpg")).unwrap();
    assert_eq!((rotated.width(), rotated.height()), (plain.height(), plain.width()));

    let errors = tmp.path().join("errors.jsonl");
    let mut args = vec![
        "caption",
        "--model",
        &model,
        "-r",
        s(&data),
        "--errors",
        s(&errors),
        "--max-pixels",
        "1000000",
        "--batch-size",
        "3",
    ];
    args.extend(GEN);
    let o = florence(&args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "bad files make the exit code 1: {stderr}");
    assert!(
        stderr.contains(&format!(
            "{} captioned, 1 skipped, {} failed",
            valid.len() - 1,
            bad.len()
        )),
        "{stderr}"
    );

    for img in &valid {
        let got =
            std::fs::read_to_string(sidecar(img)).unwrap_or_else(|e| panic!("{}: no caption: {e}", img.display()));
        if img == &hand_written {
            assert_eq!(got, "my own caption\n", "a hand-written caption was changed");
        } else {
            assert_eq!(got, format!("{}\n", expected[img]), "{}", img.display());
        }
    }
    let logged: Vec<Value> = std::fs::read_to_string(&errors)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged.len(), bad.len(), "{logged:?}");
    for (path, why) in &bad {
        let entry = logged
            .iter()
            .find(|e| e["path"] == s(path))
            .unwrap_or_else(|| panic!("{} not logged", path.display()));
        assert!(entry["error"].as_str().unwrap().contains(why), "{entry}");
        // (the collision's sidecar exists: it is the other image's, checked above)
        assert!(*why == "already the caption of" || !sidecar(path).exists());
    }
    assert!(temp_files(&data).is_empty());

    // A rerun finds nothing to caption: it never loads the model (a missing one is fine).
    let mut args = vec![
        "caption",
        "--model",
        "/nonexistent/model",
        "-r",
        s(&data),
        "--max-pixels",
        "1000000",
    ];
    args.extend(GEN);
    let o = florence(&args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("0 captioned, {} skipped, {} failed", valid.len(), bad.len())),
        "{stderr}"
    );

    // --existing append keeps the hand-written caption and adds the model's.
    let mut args = vec![
        "caption",
        "--model",
        &model,
        "--existing",
        "append",
        "--ext",
        ".txt",
        s(&hand_written),
    ];
    args.extend(GEN);
    assert!(florence(&args).status.success());
    assert_eq!(
        std::fs::read_to_string(sidecar(&hand_written)).unwrap(),
        format!("my own caption, {}\n", expected[&hand_written])
    );

    // Shards partition the folder exactly.
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut total = 0;
    for i in 0..3 {
        let out = tmp.path().join(format!("shard{i}"));
        let manifest = tmp.path().join(format!("shard{i}.jsonl"));
        let shard = format!("{i}/3");
        let mut args = vec![
            "caption",
            "--model",
            &model,
            "-r",
            s(&data),
            "--shard",
            &shard,
            "--output-dir",
            s(&out),
            "--manifest",
            s(&manifest),
            "-q",
            "--max-pixels",
            "1000000",
        ];
        args.extend(GEN);
        florence(&args);
        for line in std::fs::read_to_string(&manifest).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            seen.insert(v["path"].as_str().unwrap().to_string());
            total += 1;
        }
    }
    let all: BTreeSet<String> = valid.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    assert_eq!(total, all.len(), "an image was captioned by two shards");
    assert_eq!(seen, all);
}

#[test]
fn killed_run_leaves_no_partial_files_and_resumes() {
    let model_dir = common::model_dir("native_f32");
    let model = s(model_dir.path()).to_string();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let sources = ["noise_rgb.png", "gradient_rgba.png", "palette.png", "gray8.png"];
    let mut images = Vec::new();
    for i in 0..40 {
        let p = data.join(format!("img_{i:02}.png"));
        std::fs::copy(common::image(sources[i % sources.len()]), &p).unwrap();
        images.push(p);
    }
    let expected = single_captions(&model, &images[..sources.len()]);
    let want = |p: &Path| {
        let i: usize = p.file_stem().unwrap().to_str().unwrap()[4..].parse().unwrap();
        format!("{}\n", expected[&images[i % sources.len()]])
    };

    let mut args = vec!["caption", "--model", &model, s(&data), "-q"];
    args.extend(GEN);
    let mut child = Command::new(env!("CARGO_BIN_EXE_florence"))
        .args(&args)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while images.iter().filter(|p| sidecar(p).exists()).count() < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let done = images.iter().filter(|p| sidecar(p).exists()).count();
    assert!(
        done >= 5 && done < images.len(),
        "the run was not interrupted mid-way ({done} done)"
    );
    for p in images.iter().filter(|p| sidecar(p).exists()) {
        assert_eq!(
            std::fs::read_to_string(sidecar(p)).unwrap(),
            want(p),
            "partial caption in {}",
            p.display()
        );
    }

    let o = florence(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(temp_files(&data).is_empty(), "temporary files left behind");
    for p in &images {
        assert_eq!(std::fs::read_to_string(sidecar(p)).unwrap(), want(p), "{}", p.display());
    }
}

/// A caption that cannot be written (here its path is taken by a folder, which root cannot
/// bypass the way it bypasses permissions) is reported with its path and reason; the other
/// images are still captioned and no temporary file is left.
#[test]
fn unwritable_caption_is_reported_and_the_run_goes_on() {
    let model_dir = common::model_dir("native_f32");
    let model = s(model_dir.path()).to_string();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("b.txt").join("inside")).unwrap();
    let mut images = Vec::new();
    for name in ["a", "b", "c"] {
        let p = data.join(format!("{name}.png"));
        std::fs::copy(common::image("noise_rgb.png"), &p).unwrap();
        images.push(p);
    }
    let errors = tmp.path().join("errors.jsonl");
    let mut args = vec![
        "caption",
        "--model",
        &model,
        s(&data),
        "-q",
        "--existing",
        "overwrite",
        "--errors",
        s(&errors),
    ];
    args.extend(GEN);
    let o = florence(&args);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let logged: Vec<Value> = std::fs::read_to_string(&errors)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0]["path"], s(&images[1]));
    let reason = logged[0]["error"].as_str().unwrap();
    assert!(
        reason.starts_with("cannot write ") && reason.contains("b.txt"),
        "{reason}"
    );
    let expected = single_captions(&model, &images[..1]);
    for p in [&images[0], &images[2]] {
        assert_eq!(
            std::fs::read_to_string(sidecar(p)).unwrap(),
            format!("{}\n", expected[&images[0]])
        );
    }
    assert!(
        sidecar(&images[1]).is_dir(),
        "the folder in the caption's place was touched"
    );
    assert!(temp_files(&data).is_empty(), "temporary files left behind");
}

/// Shard membership depends on each image's path inside the dataset, not on where the dataset
/// is mounted or how its root is spelled: one copy named by an absolute path, another by a
/// relative one from a different mount point, split the same way. Files that cannot be decoded
/// show which shard took them (in --errors) without loading a model.
#[test]
fn shards_do_not_depend_on_where_the_dataset_is_mounted() {
    let tmp = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..40).map(|i| format!("part{}/img_{i:02}.jpg", i % 3)).collect();
    let (first, second) = (tmp.path().join("a/ds"), tmp.path().join("mnt/b/ds"));
    for root in [&first, &second] {
        for name in &names {
            std::fs::create_dir_all(root.join(name).parent().unwrap()).unwrap();
            std::fs::write(root.join(name), b"not an image").unwrap();
        }
    }
    // The names each run logged, relative to the dataset root it was given.
    let shard = |root: &Path, cwd: &Path, spelled: &str, shard: &str| -> BTreeSet<String> {
        let errors = tmp.path().join(format!("errors-{}.jsonl", shard.replace('/', "-")));
        let _ = std::fs::remove_file(&errors);
        let o = Command::new(env!("CARGO_BIN_EXE_florence"))
            .current_dir(cwd)
            .args(["caption", "--model", "/nonexistent/model", "-r", spelled, "-q"])
            .args(["--shard", shard, "--errors", s(&errors)])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(&errors)
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                let p = PathBuf::from(v["path"].as_str().unwrap());
                let p = if p.is_absolute() { p } else { cwd.join(p) };
                p.strip_prefix(root).unwrap().to_string_lossy().into_owned()
            })
            .collect()
    };
    let mut union = BTreeSet::new();
    for i in 0..2 {
        let spec = format!("{i}/2");
        let absolute = shard(&first, tmp.path(), s(&first), &spec);
        let relative = shard(&second, &tmp.path().join("mnt/b"), "ds", &spec);
        assert_eq!(absolute, relative, "shard {spec} differs between the two mounts");
        assert!(
            !absolute.is_empty() && absolute.len() < names.len(),
            "shard {spec}: {absolute:?}"
        );
        union.extend(absolute);
    }
    assert_eq!(union, names.iter().cloned().collect::<BTreeSet<_>>());
}

/// `--shard auto` takes the shard from Slurm, Kubernetes or torchrun variables and splits the
/// input as `--shard I/N` does; without them it stops with a one-line error naming them.
#[test]
fn shard_auto_follows_the_scheduler() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ds");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..30 {
        std::fs::write(data.join(format!("img_{i:02}.jpg")), b"not an image").unwrap();
    }
    const VARS: [&str; 8] = [
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_STEP",
        "SLURM_ARRAY_TASK_COUNT",
        "JOB_COMPLETION_INDEX",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
    ];
    // The images a run took (they fail to decode, so --errors names them), or its error.
    let run = |spec: &str, vars: &[(&str, &str)]| -> Result<BTreeSet<String>, String> {
        let errors = tmp.path().join("errors.jsonl");
        let _ = std::fs::remove_file(&errors);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_florence"));
        for v in VARS {
            cmd.env_remove(v);
        }
        let o = cmd
            .envs(vars.iter().copied())
            .args(["caption", "--model", "/nonexistent/model", "-r", s(&data), "-q"])
            .args(["--shard", spec, "--errors", s(&errors)])
            .output()
            .unwrap();
        if o.status.code() == Some(2) {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        Ok(std::fs::read_to_string(&errors)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["path"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect())
    };
    let mut union = BTreeSet::new();
    for i in 0..3usize {
        let want = run(&format!("{i}/3"), &[]).unwrap();
        let (id, index) = ((10 + 2 * i).to_string(), i.to_string());
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", id.as_str()),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert_eq!(run("auto", &slurm).unwrap(), want, "Slurm task {id}");
        assert_eq!(run("auto/3", &[("JOB_COMPLETION_INDEX", &index)]).unwrap(), want);
        assert_eq!(run("auto", &[("RANK", &index), ("WORLD_SIZE", "3")]).unwrap(), want);
        assert!(want.is_disjoint(&union));
        union.extend(want);
    }
    assert_eq!(union.len(), 30);
    let error = run("auto", &[]).unwrap_err();
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(error.contains("SLURM_ARRAY_TASK_ID") && error.contains("JOB_COMPLETION_INDEX") && error.contains("RANK"));
    let error = run("auto", &[("JOB_COMPLETION_INDEX", "1")]).unwrap_err();
    assert!(error.contains("--shard auto/N"), "{error}");
}
