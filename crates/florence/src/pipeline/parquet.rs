//! Parquet files, as Hugging Face `datasets` and img2dataset write them: as input, one image per
//! row from a binary column or a `{bytes, path}` image struct, read a row group at a time; as
//! output, the JSONL record's fields as columns plus the input columns asked to be kept.
//!
//! A row group is the unit of work: `--shard` hashes each row group's key
//! (`FILE/row-group-G`), so the machines of a run split even a single large file, and each reads
//! only the row groups it owns.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder, UInt32Builder};
use arrow_array::cast::AsArray;
use arrow_array::{new_null_array, Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::Value;

use super::dataset::{temp_path, InputImage, Job};
use super::shard::Shard;
use super::sink::{jsonl_record, Captioned, RunInfo, Sink, SinkFailure};
use super::source::{Container, Member, Read};
use crate::error::{Error, Result};

/// Rows decoded at a time; a row group larger than this is read in parts.
const READ_BATCH: usize = 64;
/// Rows the Parquet manifest buffers before writing them.
const WRITE_BATCH: usize = 1024;
/// The record's columns, in order, ahead of the kept ones.
const RECORD_COLUMNS: [&str; 8] = ["path", "task", "text", "result", "raw", "ids", "model", "generation"];

/// Whether `path` is named like a Parquet file (`.parquet`, in any case).
pub fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// Which columns of Parquet inputs are read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns {
    /// The image column; when `None`, the file's only binary or `{bytes, path}` struct column.
    pub image: Option<String>,
    /// Columns copied to a Parquet manifest beside each row's record.
    pub keep: Vec<String>,
}

/// A Parquet row's values of the kept columns: one row of the kept columns.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptColumns(RecordBatch);

/// The names and types of the kept columns, as the first Parquet input has them (empty when no
/// column is kept or no Parquet input has them).
#[derive(Debug, Clone, Default)]
pub struct KeptSchema(Vec<Field>);

/// Settles the kept columns' types over all inputs: the first file's, which the others must match.
pub(crate) struct KeptResolver<'a> {
    columns: &'a Columns,
    fields: Option<(PathBuf, Vec<Field>)>,
}

impl<'a> KeptResolver<'a> {
    pub(crate) fn new(columns: &'a Columns) -> Self {
        Self { columns, fields: None }
    }

    fn check(&mut self, file: &Path, schema: &Schema) -> Result<(), String> {
        let mut fields = Vec::new();
        for name in &self.columns.keep {
            let field = schema.field_with_name(name).map_err(|_| {
                format!(
                    "it has no column {name:?} to keep; its columns are {}",
                    column_list(schema)
                )
            })?;
            fields.push(field.clone().with_nullable(true));
        }
        match &self.fields {
            None => self.fields = Some((file.to_path_buf(), fields)),
            Some((first, known)) => {
                if let Some((a, b)) = known.iter().zip(&fields).find(|(a, b)| a.data_type() != b.data_type()) {
                    return Err(format!(
                        "its column {:?} is {} but {} in {}; kept columns need one type",
                        b.name(),
                        b.data_type(),
                        a.data_type(),
                        first.display()
                    ));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> KeptSchema {
        KeptSchema(self.fields.map(|(_, f)| f).unwrap_or_default())
    }
}

fn column_list(schema: &Schema) -> String {
    let names: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| format!("{} ({})", f.name(), f.data_type()))
        .collect();
    names.join(", ")
}

/// Whether a column of this type holds encoded images: binary, or a struct with binary `bytes`
/// (Hugging Face's `Image` feature).
fn is_image_type(t: &DataType) -> bool {
    let binary = |t: &DataType| matches!(t, DataType::Binary | DataType::LargeBinary | DataType::BinaryView);
    match t {
        DataType::Struct(fields) => fields.iter().any(|f| f.name() == "bytes" && binary(f.data_type())),
        t => binary(t),
    }
}

/// The image column of `schema`: the one named, or the only one of an image type.
fn image_column(schema: &Schema, named: Option<&str>) -> Result<String, String> {
    if let Some(name) = named {
        let field = schema
            .field_with_name(name)
            .map_err(|_| format!("it has no column {name:?}; its columns are {}", column_list(schema)))?;
        if !is_image_type(field.data_type()) {
            return Err(format!(
                "its column {name:?} is {}, not binary image bytes or a {{bytes, path}} image struct",
                field.data_type()
            ));
        }
        return Ok(name.to_string());
    }
    let found: Vec<&str> = schema
        .fields()
        .iter()
        .filter(|f| is_image_type(f.data_type()))
        .map(|f| f.name().as_str())
        .collect();
    match found[..] {
        [one] => Ok(one.to_string()),
        [] => Err(format!(
            "it has no image column (binary, or a {{bytes, path}} struct); its columns are {}",
            column_list(schema)
        )),
        _ => Err(format!(
            "it has several image columns ({}); pick one with --image-column",
            found.join(", ")
        )),
    }
}

/// Some row groups of a Parquet file to caption, read one after the other.
#[derive(Debug)]
pub struct RowGroups {
    file: InputImage,
    container: Arc<Container>,
    metadata: ArrowReaderMetadata,
    image: String,
    keep: Vec<String>,
    /// The row groups read, with the index of the first row of each in the file.
    groups: Vec<(usize, usize)>,
    rows: usize,
}

impl RowGroups {
    /// How many rows (images) the row groups hold.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Reads the row groups in order, a few rows at a time, emitting each row's image bytes.
    pub(crate) fn read(self, emit: &mut dyn FnMut(Read) -> std::ops::ControlFlow<()>) -> std::ops::ControlFlow<()> {
        let broken = |e: &dyn std::fmt::Display| Read::Broken(self.file.path.clone(), format!("cannot read: {e}"));
        let file = match std::fs::File::open(&self.file.path) {
            Ok(f) => f,
            Err(e) => return emit(broken(&e)),
        };
        let schema = self.metadata.parquet_schema();
        let arrow = self.metadata.schema();
        let roots = (self.keep.iter().chain([&self.image])).filter_map(|n| arrow.index_of(n).ok());
        let mask = ProjectionMask::roots(schema, roots);
        for &(group, first_row) in &self.groups {
            let reader = file.try_clone().map_err(|e| e.to_string()).and_then(|f| {
                ParquetRecordBatchReaderBuilder::new_with_metadata(f, self.metadata.clone())
                    .with_projection(mask.clone())
                    .with_row_groups(vec![group])
                    .with_batch_size(READ_BATCH)
                    .build()
                    .map_err(|e| e.to_string())
            });
            let reader = match reader {
                Ok(r) => r,
                Err(e) => return emit(broken(&e)),
            };
            let mut row = first_row;
            for batch in reader {
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => return emit(broken(&e)),
                };
                self.emit_batch(&batch, row, emit)?;
                row += batch.num_rows();
            }
        }
        std::ops::ControlFlow::Continue(())
    }

    /// Emits the rows of `batch`, the first of which is row `first_row` of the file.
    fn emit_batch(
        &self,
        batch: &RecordBatch,
        first_row: usize,
        emit: &mut dyn FnMut(Read) -> std::ops::ControlFlow<()>,
    ) -> std::ops::ControlFlow<()> {
        let images = batch
            .column_by_name(&self.image)
            .expect("the image column is projected");
        let kept = (!self.keep.is_empty()).then(|| {
            batch
                .project(&self.keep_indices(batch))
                .expect("the kept columns are projected")
        });
        for i in 0..batch.num_rows() {
            let row = first_row + i;
            let job = Job {
                image: InputImage {
                    path: member_path(&self.file.path, row),
                    root: self.file.root.clone(),
                    key: member_path(&self.file.key, row),
                },
                sidecar: None,
                member: Some(Member {
                    container: self.container.clone(),
                    key: row.to_string(),
                    kept: kept.as_ref().map(|k| KeptColumns(k.slice(i, 1))),
                }),
            };
            emit(Read::Image(job, image_bytes(images.as_ref(), i)))?;
        }
        std::ops::ControlFlow::Continue(())
    }

    fn keep_indices(&self, batch: &RecordBatch) -> Vec<usize> {
        self.keep
            .iter()
            .filter_map(|n| batch.schema().index_of(n).ok())
            .collect()
    }
}

/// `FILE/ROW`: a row's name in manifests and errors.
fn member_path(file: &Path, row: usize) -> PathBuf {
    let mut path = file.to_path_buf().into_os_string();
    path.push(format!("/{row}"));
    path.into()
}

/// Row `i`'s image bytes from a binary column or an image struct's `bytes`.
fn image_bytes(column: &dyn Array, i: usize) -> Result<Vec<u8>, String> {
    if column.is_null(i) {
        return Err("the image is null".into());
    }
    Ok(match column.data_type() {
        DataType::Binary => column.as_binary::<i32>().value(i).to_vec(),
        DataType::LargeBinary => column.as_binary::<i64>().value(i).to_vec(),
        DataType::BinaryView => column.as_binary_view().value(i).to_vec(),
        _ => {
            let image = column.as_struct();
            let bytes = image
                .column_by_name("bytes")
                .expect("an image struct has bytes (checked when planned)");
            if bytes.is_null(i) {
                let path = image.column_by_name("path").and_then(|p| p.as_string_opt::<i32>());
                return Err(match path.filter(|p| p.is_valid(i)) {
                    Some(p) => format!(
                        "the image has no bytes, only a path ({}); save the dataset with the images embedded",
                        p.value(i)
                    ),
                    None => "the image is null".into(),
                });
            }
            return image_bytes(bytes.as_ref(), i);
        }
    })
}

/// Plans a Parquet input: reads its footer, finds its image column, checks its codecs and kept
/// columns, and keeps the row groups in `shard`. `None` when no row group is this shard's.
pub(crate) fn plan(
    file: &InputImage,
    shard: Option<Shard>,
    columns: &Columns,
    kept: &mut KeptResolver,
) -> Result<Option<RowGroups>, String> {
    let reader = std::fs::File::open(&file.path).map_err(|e| format!("cannot read: {e}"))?;
    let metadata = ArrowReaderMetadata::load(&reader, ArrowReaderOptions::new())
        .map_err(|e| format!("cannot read it as Parquet: {e}"))?;
    let schema = metadata.schema().clone();
    let image = image_column(&schema, columns.image.as_deref())?;
    kept.check(&file.path, &schema)?;
    check_codecs(&metadata, &schema, &image, &columns.keep)?;
    let mut groups = Vec::new();
    let mut rows = 0;
    let mut first_row = 0;
    for (g, group) in metadata.metadata().row_groups().iter().enumerate() {
        let n = group.num_rows() as usize;
        let mut key = file.key.clone().into_os_string();
        key.push(format!("/row-group-{g}"));
        if shard.is_none_or(|s| s.contains_key(Path::new(&key))) {
            groups.push((g, first_row));
            rows += n;
        }
        first_row += n;
    }
    if groups.is_empty() {
        return Ok(None);
    }
    Ok(Some(RowGroups {
        file: file.clone(),
        container: Arc::new(Container {
            path: file.path.clone(),
            output: None,
        }),
        metadata,
        image,
        keep: columns.keep.clone(),
        groups,
        rows,
    }))
}

/// Refuses a file whose read columns use a codec this build leaves out (Snappy, gzip and
/// uncompressed are read), before any model work.
fn check_codecs(metadata: &ArrowReaderMetadata, schema: &Schema, image: &str, keep: &[String]) -> Result<(), String> {
    let read: Vec<usize> = keep
        .iter()
        .map(String::as_str)
        .chain([image])
        .filter_map(|n| schema.index_of(n).ok())
        .collect();
    let descr = metadata.parquet_schema();
    for group in metadata.metadata().row_groups() {
        for (leaf, chunk) in group.columns().iter().enumerate() {
            let readable = matches!(
                chunk.compression(),
                Compression::UNCOMPRESSED | Compression::SNAPPY | Compression::GZIP(_)
            );
            if !readable && read.contains(&descr.get_column_root_idx(leaf)) {
                return Err(format!(
                    "its column {} is compressed with {}, which florence does not read; re-save the file \
                     with Snappy (pyarrow's default: compression='snappy')",
                    chunk.column_path(),
                    chunk.compression()
                ));
            }
        }
    }
    Ok(())
}

/// A manifest in Parquet: one row per captioned image with the JSONL record's fields as columns
/// (`path`, `task`, `text`, `result` and `generation` as JSON text, `raw`, `ids`, `model`),
/// then the kept columns of Parquet inputs (null for other inputs' images). Written to a
/// temporary file beside `path`, renamed over it when the run finishes.
pub struct ParquetSink {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<ArrowWriter<std::io::BufWriter<std::fs::File>>>,
    schema: SchemaRef,
    model: String,
    weights: String,
    task: String,
    generation: Value,
    /// Records not written yet, with their kept values.
    rows: Vec<(Value, Option<RecordBatch>)>,
}

impl ParquetSink {
    /// Writes the manifest to `path`, crediting `model` with its `weights` as [`ManifestSink`]
    /// does, with the `kept` columns after the record's.
    ///
    /// [`ManifestSink`]: super::ManifestSink
    pub fn to_file(
        path: &Path,
        model: impl Into<String>,
        weights: impl Into<String>,
        kept: &KeptSchema,
    ) -> Result<Self> {
        if let Some(f) = kept.0.iter().find(|f| RECORD_COLUMNS.contains(&f.name().as_str())) {
            return Err(Error::usage(format!(
                "--keep-columns {0}: the manifest has a column {0} of its own; rename the input column",
                f.name()
            )));
        }
        let text = |name: &str| Field::new(name, DataType::Utf8, true);
        let ids = Field::new(
            "ids",
            DataType::List(Arc::new(Field::new("item", DataType::UInt32, true))),
            true,
        );
        let mut fields: Vec<Field> = RECORD_COLUMNS
            .iter()
            .map(|&name| if name == "ids" { ids.clone() } else { text(name) })
            .collect();
        fields.extend(kept.0.iter().cloned());
        let schema = Arc::new(Schema::new(fields));
        let tmp = temp_path(path);
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(path, e))?;
        let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
        let writer = ArrowWriter::try_new(std::io::BufWriter::new(file), schema.clone(), Some(props))
            .map_err(|e| Error::output(format!("cannot write {}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            writer: Some(writer),
            schema,
            model: model.into(),
            weights: weights.into(),
            task: String::new(),
            generation: Value::Null,
            rows: Vec::new(),
        })
    }

    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::output(format!("cannot write results to {}: {e}", self.path.display()))
    }

    fn writer(&mut self) -> Result<&mut ArrowWriter<std::io::BufWriter<std::fs::File>>> {
        match &mut self.writer {
            Some(writer) => Ok(writer),
            None => Err(Error::output(format!("{} is already closed", self.path.display()))),
        }
    }

    /// Writes the buffered rows as one batch.
    fn flush(&mut self) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let text = |field: &str| -> ArrayRef {
            let mut b = StringBuilder::new();
            for (record, _) in &self.rows {
                match &record[field] {
                    Value::Null => b.append_null(),
                    Value::String(s) => b.append_value(s),
                    other => b.append_value(other.to_string()),
                }
            }
            Arc::new(b.finish())
        };
        let mut ids = ListBuilder::new(UInt32Builder::new());
        for (record, _) in &self.rows {
            let values = record["ids"].as_array().into_iter().flatten();
            ids.values().extend(values.map(|v| v.as_u64().map(|v| v as u32)));
            ids.append(true);
        }
        let mut columns: Vec<ArrayRef> = RECORD_COLUMNS
            .iter()
            .map(|&name| {
                if name == "ids" {
                    Arc::new(ids.finish()) as ArrayRef
                } else {
                    text(name)
                }
            })
            .collect();
        for (j, field) in self.schema.fields().iter().enumerate().skip(RECORD_COLUMNS.len()) {
            let j = j - RECORD_COLUMNS.len();
            let parts: Vec<ArrayRef> = self
                .rows
                .iter()
                .map(|(_, kept)| match kept {
                    Some(batch) => batch.column(j).clone(),
                    None => new_null_array(field.data_type(), 1),
                })
                .collect();
            let parts: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
            columns.push(arrow_select::concat::concat(&parts).map_err(|e| self.error(e))?);
        }
        let batch = RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| self.error(e))?;
        self.rows.clear();
        let written = self.writer()?.write(&batch);
        written.map_err(|e| self.error(e))
    }
}

impl Sink for ParquetSink {
    fn begin(&mut self, run: &RunInfo) -> Result<()> {
        self.task = run.task.name.clone();
        self.generation = super::generation_json(run.generation, &self.weights);
        Ok(())
    }

    fn captioned(&mut self, item: &Captioned) -> Result<(), SinkFailure> {
        let path = item.job.image.path.to_string_lossy();
        let record = jsonl_record(
            Some(&path),
            &self.task,
            item.output,
            item.caption,
            &self.model,
            &self.generation,
        );
        let kept = item
            .job
            .member
            .as_ref()
            .and_then(|m| m.kept.as_ref())
            .map(|k| k.0.clone());
        self.rows.push((record, kept));
        if self.rows.len() >= WRITE_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.flush()?;
        let Some(writer) = self.writer.take() else {
            return Ok(());
        };
        let file = writer.into_inner().map_err(|e| self.error(e))?;
        let file = file.into_inner().map_err(|e| self.error(e.into_error()))?;
        file.sync_all().map_err(|e| self.error(e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| self.error(e))
    }
}
