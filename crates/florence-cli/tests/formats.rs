//! Dataset formats end to end: WebDataset tar shards (plain and gzipped) and Parquet files give
//! the captions their images get as files; caption shards are written whole, survive a kill and
//! are skipped by a rerun; a corrupt member is reported by name while the others are captioned;
//! a Parquet manifest has the record's columns and the kept ones; shards go whole to a machine.

#[path = "../../florence/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde_json::Value;

const GEN: &[&str] = &["--max-new-tokens", "6", "--num-beams", "2", "--threads", "2"];
const SOURCES: [&str; 4] = ["noise_rgb.png", "gradient_rgba.png", "palette.png", "gray8.png"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn florence(model: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_florence"))
        .args(["caption", "--model", model])
        .args(GEN)
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `path` -> `text` of a JSONL run.
fn texts(o: &Output) -> BTreeMap<String, String> {
    assert!(o.status.success(), "florence failed: {}", stderr(o));
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["path"].as_str().unwrap().to_string(),
                v["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(common::image(name)).unwrap()
}

/// The caption of each fixture image captioned as a file, by fixture name.
fn file_captions(model: &str) -> BTreeMap<String, String> {
    let paths: Vec<PathBuf> = SOURCES.iter().map(|n| common::image(n)).collect();
    let mut args = vec!["--format", "jsonl"];
    args.extend(paths.iter().map(|p| s(p)));
    let by_path = texts(&florence(model, &args));
    SOURCES
        .iter()
        .zip(&paths)
        .map(|(n, p)| (n.to_string(), by_path[s(p)].clone()))
        .collect()
}

/// Writes a tar of `members` (name, bytes) to `path`, gzipped when it ends in `.gz`.
fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let out: Box<dyn std::io::Write> = if s(path).ends_with(".gz") {
        Box::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()))
    } else {
        Box::new(file)
    };
    let mut tar = tar::Builder::new(out);
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, name, bytes.as_slice()).unwrap();
    }
    tar.into_inner().unwrap().flush().unwrap();
}

/// A WebDataset shard of the fixture images as `KEY.png` with a `KEY.json` beside each.
fn fixture_members(first_key: usize) -> Vec<(String, Vec<u8>)> {
    let mut members = Vec::new();
    for (i, name) in SOURCES.iter().enumerate() {
        let key = format!("{:06}", first_key + i);
        members.push((format!("{key}.png"), fixture(name)));
        members.push((
            format!("{key}.json"),
            format!("{{\"source\": \"{name}\"}}").into_bytes(),
        ));
    }
    members
}

/// The members of a tar file, by name.
fn read_tar(path: &Path) -> BTreeMap<String, String> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            (name, text)
        })
        .collect()
}

fn write_parquet(path: &Path, batch: &RecordBatch, rows_per_group: usize) {
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(rows_per_group))
        .build();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// `id`, `url` and the fixture images as a binary `jpg` column (what img2dataset writes).
fn binary_table(images: &[Vec<u8>]) -> RecordBatch {
    let n = images.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values((0..n as i64).map(|i| 100 + i))),
        Arc::new(StringArray::from_iter_values(
            (0..n).map(|i| format!("https://x/{i}.png")),
        )),
        Arc::new(BinaryArray::from_iter_values(images.iter())),
    ];
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("url", DataType::Utf8, false),
        Field::new("jpg", DataType::Binary, true),
    ]);
    RecordBatch::try_new(Arc::new(schema), columns).unwrap()
}

/// Hugging Face `datasets`' layout: an `image` struct of `bytes` and `path`, and a `label`.
fn image_struct_table(images: &[Vec<u8>]) -> RecordBatch {
    let fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let image = StructArray::new(
        fields.clone(),
        vec![
            Arc::new(BinaryArray::from_iter_values(images.iter())) as ArrayRef,
            Arc::new(StringArray::from_iter_values(
                (0..images.len()).map(|i| format!("{i}.png")),
            )),
        ],
        None,
    );
    let label = StringArray::from_iter_values((0..images.len()).map(|i| format!("label {i}")));
    let schema = Schema::new(vec![
        Field::new("image", DataType::Struct(fields), true),
        Field::new("label", DataType::Utf8, false),
    ]);
    RecordBatch::try_new(Arc::new(schema), vec![Arc::new(image), Arc::new(label)]).unwrap()
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| s(p).ends_with(".florence-tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// A tar shard (plain and gzipped), a binary Parquet column and a Hugging Face image struct
/// give each image the caption it gets as a file, named CONTAINER/MEMBER.
#[test]
fn containers_give_the_captions_of_files() {
    let model_dir = common::model_dir("remote_f32");
    let model = s(model_dir.path());
    let tmp = tempfile::tempdir().unwrap();
    let want = file_captions(model);

    let plain = tmp.path().join("shards/00000.tar");
    let gz = tmp.path().join("shards/00001.tar.gz");
    write_tar(&plain, &fixture_members(0));
    write_tar(&gz, &fixture_members(4));
    let images: Vec<Vec<u8>> = SOURCES.iter().map(|n| fixture(n)).collect();
    let binary = tmp.path().join("img2dataset.parquet");
    let hf = tmp.path().join("hf.parquet");
    write_parquet(&binary, &binary_table(&images), 3);
    write_parquet(&hf, &image_struct_table(&images), 2);

    let got = texts(&florence(
        model,
        &["--format", "jsonl", s(&plain), s(&gz), s(&binary), s(&hf)],
    ));
    let mut expected = BTreeMap::new();
    for (i, name) in SOURCES.iter().enumerate() {
        expected.insert(format!("{}/{:06}.png", s(&plain), i), want[*name].clone());
        expected.insert(format!("{}/{:06}.png", s(&gz), i + 4), want[*name].clone());
        expected.insert(format!("{}/{i}", s(&binary)), want[*name].clone());
        expected.insert(format!("{}/{i}", s(&hf)), want[*name].clone());
    }
    assert_eq!(got, expected);
}

/// With --output-dir each shard's captions form a caption shard of KEY.txt members, written
/// whole: a killed run leaves only complete caption shards, and a rerun skips those and
/// finishes the rest.
#[test]
fn caption_shards_are_written_whole_and_resumed() {
    let model_dir = common::model_dir("remote_f32");
    let model = s(model_dir.path());
    let tmp = tempfile::tempdir().unwrap();
    let want = file_captions(model);
    let out = tmp.path().join("captions");
    let shards: Vec<PathBuf> = (0..20)
        .map(|i| {
            let p = tmp.path().join(format!("shards/{i:05}.tar"));
            write_tar(&p, &fixture_members(4 * i));
            p
        })
        .collect();
    let expected = |i: usize| -> BTreeMap<String, String> {
        (0..4)
            .map(|j| (format!("{:06}.txt", 4 * i + j), want[SOURCES[j]].clone()))
            .collect()
    };
    let caption_shard = |i: usize| out.join(format!("{i:05}.tar"));
    let done = || (0..shards.len()).filter(|&i| caption_shard(i).exists()).count();

    let mut args = vec!["caption", "--model", model, "--output-dir", s(&out), "-q"];
    args.extend(GEN);
    args.extend(shards.iter().map(|p| s(p)));
    let mut child = Command::new(env!("CARGO_BIN_EXE_florence"))
        .args(&args)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while done() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let finished = done();
    assert!(
        finished >= 2 && finished < shards.len(),
        "the run was not interrupted mid-way ({finished} done)"
    );
    for i in (0..shards.len()).filter(|&i| caption_shard(i).exists()) {
        assert_eq!(read_tar(&caption_shard(i)), expected(i), "partial caption shard {i}");
    }

    let o = Command::new(env!("CARGO_BIN_EXE_florence"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for i in 0..shards.len() {
        assert_eq!(read_tar(&caption_shard(i)), expected(i), "caption shard {i}");
    }
    assert!(temp_files(&out).is_empty(), "temporary files left behind");

    // Everything is done: a rerun skips every shard without loading a model.
    let mut rerun = vec!["caption", "--model", "/nonexistent/model", "--output-dir", s(&out)];
    rerun.extend(shards.iter().map(|p| s(p)));
    let o = Command::new(env!("CARGO_BIN_EXE_florence"))
        .args(&rerun)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("0 captioned, 20 skipped, 0 failed"),
        "{}",
        stderr(&o)
    );
}

/// A member that is not an image is reported as SHARD.tar/KEY.EXT and the shard's other images
/// are captioned; a shard cut short is reported by its name and gets no caption shard.
#[test]
fn corrupt_members_and_shards_are_reported_by_name() {
    let model_dir = common::model_dir("remote_f32");
    let model = s(model_dir.path());
    let tmp = tempfile::tempdir().unwrap();
    let want = file_captions(model);
    let out = tmp.path().join("captions");
    let errors = tmp.path().join("errors.jsonl");

    let good = tmp.path().join("shards/00000.tar");
    let mut members = fixture_members(0);
    members.insert(2, ("000009.jpg".into(), b"not a jpeg".to_vec()));
    write_tar(&good, &members);
    let cut = tmp.path().join("shards/00001.tar");
    write_tar(&cut, &fixture_members(4));
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();

    let o = florence(
        model,
        &["--output-dir", s(&out), "--errors", s(&errors), s(&good), s(&cut)],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let member = format!("{}/000009.jpg", s(&good));
    assert!(
        stderr(&o).contains(&format!("error: {member}: cannot decode image")),
        "{}",
        stderr(&o)
    );
    let logged: Vec<Value> = std::fs::read_to_string(&errors)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let paths: BTreeSet<&str> = logged.iter().map(|v| v["path"].as_str().unwrap()).collect();
    assert_eq!(paths, BTreeSet::from([member.as_str(), s(&cut)]), "{logged:?}");
    let cut_error = logged.iter().find(|v| v["path"] == s(&cut)).unwrap();
    assert!(
        cut_error["error"].as_str().unwrap().contains("re-download"),
        "{cut_error}"
    );

    let expected: BTreeMap<String, String> = (0..4)
        .map(|j| (format!("{j:06}.txt"), want[SOURCES[j]].clone()))
        .collect();
    assert_eq!(read_tar(&out.join("00000.tar")), expected);
    assert!(!out.join("00001.tar").exists(), "a caption shard for a damaged shard");
    assert!(temp_files(&out).is_empty(), "temporary files left behind");
}

/// --format parquet writes the JSONL record's fields as columns and the --keep-columns of the
/// input after them, with their types.
#[test]
fn parquet_manifest_has_the_record_and_kept_columns() {
    let model_dir = common::model_dir("remote_f32");
    let model = s(model_dir.path());
    let tmp = tempfile::tempdir().unwrap();
    let want = file_captions(model);
    let input = tmp.path().join("data.parquet");
    let images: Vec<Vec<u8>> = SOURCES.iter().map(|n| fixture(n)).collect();
    write_parquet(&input, &binary_table(&images), 2);
    let manifest = tmp.path().join("captions.parquet");

    let args = [
        "--format",
        "parquet",
        "--manifest",
        s(&manifest),
        "--keep-columns",
        "url,id",
    ];
    let o = florence(model, &[&args[..], &["--image-column", "jpg", s(&input)]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&manifest).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    let batch = arrow_select_concat(&batches);
    let names: Vec<&str> = batch.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [
            "path",
            "task",
            "text",
            "result",
            "raw",
            "ids",
            "model",
            "generation",
            "url",
            "id"
        ]
    );
    assert_eq!(batch.num_rows(), SOURCES.len());
    let col = |n: &str| batch.column_by_name(n).unwrap().clone();
    let (text, path, url) = (col("text"), col("path"), col("url"));
    let (id, ids, generation) = (col("id"), col("ids"), col("generation"));
    for (i, name) in SOURCES.iter().enumerate() {
        assert_eq!(path.as_string::<i32>().value(i), format!("{}/{i}", s(&input)));
        assert_eq!(text.as_string::<i32>().value(i), want[*name]);
        assert_eq!(url.as_string::<i32>().value(i), format!("https://x/{i}.png"));
        assert_eq!(
            id.as_primitive::<arrow_array::types::Int64Type>().value(i),
            100 + i as i64
        );
        assert!(!ids.as_list::<i32>().value(i).is_empty());
    }
    assert!(col("result").is_null(0), "a text task has no result");
    let g: Value = serde_json::from_str(generation.as_string::<i32>().value(0)).unwrap();
    assert_eq!(g["num_beams"], 2);

    // A column that is not there is named, with the file's columns.
    let o = florence(model, &[&args[..], &["--keep-columns", "nope", s(&input)]].concat());
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no column \"nope\" to keep"), "{}", stderr(&o));
}

fn arrow_select_concat(batches: &[RecordBatch]) -> RecordBatch {
    let schema = batches[0].schema();
    let columns = (0..schema.fields().len())
        .map(|c| {
            let parts: Vec<&dyn arrow_array::Array> = batches.iter().map(|b| b.column(c).as_ref()).collect();
            arrow_select::concat::concat(&parts).unwrap()
        })
        .collect();
    RecordBatch::try_new(schema, columns).unwrap()
}

/// --shard gives each tar shard whole to one machine and splits Parquet files by row group;
/// together the machines take every image once. (The images do not decode, so --errors shows
/// which machine took each without a model.)
#[test]
fn shards_take_whole_tars_and_parquet_row_groups() {
    let tmp = tempfile::tempdir().unwrap();
    let mut inputs = Vec::new();
    for i in 0..8 {
        let p = tmp.path().join(format!("shards/{i:05}.tar"));
        let members: Vec<(String, Vec<u8>)> = (0..3).map(|j| (format!("{i}{j}.jpg"), b"bad".to_vec())).collect();
        write_tar(&p, &members);
        inputs.push(p);
    }
    let table = tmp.path().join("rows.parquet");
    write_parquet(&table, &binary_table(&vec![b"bad".to_vec(); 24]), 3);
    inputs.push(table.clone());

    let mut union = BTreeSet::new();
    let mut total = 0;
    for i in 0..2 {
        let errors = tmp.path().join(format!("errors-{i}.jsonl"));
        let o = Command::new(env!("CARGO_BIN_EXE_florence"))
            .args(["caption", "--model", "/nonexistent/model", "--format", "jsonl", "-q"])
            .args(["--shard", &format!("{i}/2"), "--errors", s(&errors)])
            .args(&inputs)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let taken: Vec<String> = std::fs::read_to_string(&errors)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["path"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        // Whole tars: a machine took all three members of a shard or none.
        let mut per_tar: BTreeMap<&str, usize> = BTreeMap::new();
        for p in taken.iter().filter(|p| p.contains(".tar/")) {
            *per_tar.entry(p.rsplit_once('/').unwrap().0).or_default() += 1;
        }
        assert!(per_tar.values().all(|&n| n == 3), "{per_tar:?}");
        // Whole row groups: rows 3g, 3g+1, 3g+2 together.
        let rows: BTreeSet<usize> = taken
            .iter()
            .filter_map(|p| p.strip_prefix(&format!("{}/", s(&table))))
            .map(|r| r.parse().unwrap())
            .collect();
        assert!(
            rows.iter().all(|r| (0..3).all(|k| rows.contains(&(r / 3 * 3 + k)))),
            "{rows:?}"
        );
        assert!(taken.len() < 48, "shard {i} took everything");
        total += taken.len();
        union.extend(taken);
    }
    assert_eq!(total, 48, "an image was taken by two machines");
    assert_eq!(union.len(), 48);
}
