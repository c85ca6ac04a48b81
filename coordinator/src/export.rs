//! A sweep's results or epoch metrics as CSV or Parquet (`coordinator sweep export` and the
//! dashboard's downloads), from one column model so that both formats hold the same columns
//! under the same names as the SQL tables.

use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use seedsweep_proto::v1 as pb;
use std::sync::Arc;

/// Rows asked for per page of a results listing; an epoch listing asks for [`EPOCH_PAGES`]
/// times as many. (The server's most are 10,000 results and 50,000 epoch rows.)
pub const PAGE: u32 = 5_000;
pub const EPOCH_PAGES: u32 = 10;

/// Calls `each` with every page of a listing, in order: `fetch(after)` reads the page after a
/// key (the first page when None) and returns its rows with the next page's key, if any; the
/// future `each` returns is awaited before the next page is read, so only one page is in memory
/// at a time.
pub async fn for_each_page<K, T, Fut, Done>(
    mut fetch: impl FnMut(Option<K>) -> Fut,
    mut each: impl FnMut(Vec<T>) -> Done,
) -> anyhow::Result<()>
where
    Fut: std::future::Future<Output = anyhow::Result<(Vec<T>, Option<K>)>>,
    Done: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut after = None;
    loop {
        let (rows, next) = fetch(after).await?;
        each(rows).await?;
        match next {
            Some(key) => after = Some(key),
            None => return Ok(()),
        }
    }
}

/// One column's values.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    Int(Vec<i64>),
    Float(Vec<f64>),
    /// NULL where absent.
    MaybeFloat(Vec<Option<f64>>),
    Text(Vec<String>),
    Bool(Vec<bool>),
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::Int(v) => v.len(),
            Column::Float(v) => v.len(),
            Column::MaybeFloat(v) => v.len(),
            Column::Text(v) => v.len(),
            Column::Bool(v) => v.len(),
        }
    }

    /// The CSV text of row `i` (empty for NULL).
    fn csv(&self, i: usize) -> String {
        match self {
            Column::Int(v) => v[i].to_string(),
            // Rust's shortest round-trip formatting: the exact double back when read.
            Column::Float(v) => v[i].to_string(),
            Column::MaybeFloat(v) => v[i].map_or(String::new(), |x| x.to_string()),
            Column::Text(v) => {
                let s = &v[i];
                if s.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", s.replace('"', "\"\""))
                } else {
                    s.clone()
                }
            }
            Column::Bool(v) => v[i].to_string(),
        }
    }

    fn parquet_type(&self) -> &'static str {
        match self {
            Column::Int(_) => "REQUIRED INT64",
            Column::Float(_) => "REQUIRED DOUBLE",
            Column::MaybeFloat(_) => "OPTIONAL DOUBLE",
            Column::Text(_) => "REQUIRED BYTE_ARRAY",
            Column::Bool(_) => "REQUIRED BOOLEAN",
        }
    }
}

/// Named columns of equal length.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub name: &'static str,
    pub columns: Vec<(&'static str, Column)>,
}

impl Table {
    pub fn rows(&self) -> usize {
        self.columns.first().map_or(0, |c| c.1.len())
    }

    /// The whole table as CSV, header included.
    #[cfg(test)]
    pub fn csv(&self) -> String {
        self.csv_header() + &self.csv_rows()
    }

    fn csv_header(&self) -> String {
        let names: Vec<&str> = self.columns.iter().map(|c| c.0).collect();
        names.join(",") + "\n"
    }

    fn csv_rows(&self) -> String {
        let mut out = String::new();
        for i in 0..self.rows() {
            let row: Vec<String> = self.columns.iter().map(|c| c.1.csv(i)).collect();
            out += &row.join(",");
            out.push('\n');
        }
        out
    }

    /// The whole table as a Parquet file.
    #[cfg(test)]
    pub fn parquet(&self) -> anyhow::Result<Vec<u8>> {
        let mut sink = Sink::new(Format::Parquet, Vec::new(), self)?;
        sink.write(self)?;
        Ok(sink.finish()?.0)
    }

    fn parquet_schema(&self) -> anyhow::Result<parquet::schema::types::Type> {
        let fields: Vec<String> = self
            .columns
            .iter()
            .map(|(name, c)| match c {
                Column::Text(_) => format!("{} {name} (UTF8);", c.parquet_type()),
                _ => format!("{} {name};", c.parquet_type()),
            })
            .collect();
        Ok(parquet::schema::parser::parse_message_type(&format!(
            "message {} {{ {} }}",
            self.name,
            fields.join(" ")
        ))?)
    }
}

/// An export's file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Parquet,
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Format> {
        match s {
            "csv" => Ok(Format::Csv),
            "parquet" => Ok(Format::Parquet),
            other => anyhow::bail!("--format {other}: use csv or parquet"),
        }
    }
}

/// Writes a table one page at a time, so an export of any size holds one page in memory: CSV
/// rows after one header, or one Parquet row group per page.
pub enum Sink<W: std::io::Write + Send> {
    Csv(W, usize),
    Parquet(SerializedFileWriter<W>, usize),
}

impl<W: std::io::Write + Send> Sink<W> {
    /// A sink with the columns of `shape` (a page, possibly empty).
    pub fn new(format: Format, mut out: W, shape: &Table) -> anyhow::Result<Sink<W>> {
        Ok(match format {
            Format::Csv => {
                out.write_all(shape.csv_header().as_bytes())?;
                Sink::Csv(out, 0)
            }
            Format::Parquet => {
                let props = Arc::new(WriterProperties::builder().build());
                let schema = Arc::new(shape.parquet_schema()?);
                Sink::Parquet(SerializedFileWriter::new(out, schema, props)?, 0)
            }
        })
    }

    pub fn write(&mut self, page: &Table) -> anyhow::Result<()> {
        match self {
            Sink::Csv(out, rows) => {
                out.write_all(page.csv_rows().as_bytes())?;
                *rows += page.rows();
            }
            Sink::Parquet(_, _) if page.rows() == 0 => {}
            Sink::Parquet(writer, rows) => {
                write_row_group(writer, page)?;
                *rows += page.rows();
            }
        }
        Ok(())
    }

    /// Ends the file; returns the writer and the rows written.
    pub fn finish(self) -> anyhow::Result<(W, usize)> {
        match self {
            Sink::Csv(out, rows) => Ok((out, rows)),
            Sink::Parquet(writer, rows) => Ok((writer.into_inner()?, rows)),
        }
    }
}

impl Sink<Vec<u8>> {
    /// The bytes written so far that no earlier call took, leaving the sink empty: a download
    /// sends each page's bytes as they are made. (Parquet keeps a few KiB buffered until
    /// [`Sink::finish`].)
    pub fn take_written(&mut self) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Sink::Csv(out, _) => std::mem::take(out),
            Sink::Parquet(writer, _) => {
                writer.flush()?;
                std::mem::take(writer.inner_mut())
            }
        })
    }
}

fn write_row_group<W: std::io::Write + Send>(
    writer: &mut SerializedFileWriter<W>,
    page: &Table,
) -> anyhow::Result<()> {
    let mut group = writer.next_row_group()?;
    for (_, column) in &page.columns {
        let mut out = group
            .next_column()?
            .ok_or_else(|| anyhow::anyhow!("the schema has fewer columns than the table"))?;
        match column {
            Column::Int(v) => {
                out.typed::<Int64Type>().write_batch(v, None, None)?;
            }
            Column::Float(v) => {
                out.typed::<DoubleType>().write_batch(v, None, None)?;
            }
            Column::MaybeFloat(v) => {
                let present: Vec<f64> = v.iter().flatten().copied().collect();
                let levels: Vec<i16> = v.iter().map(|x| x.is_some() as i16).collect();
                out.typed::<DoubleType>()
                    .write_batch(&present, Some(&levels), None)?;
            }
            Column::Text(v) => {
                let bytes: Vec<ByteArray> = v.iter().map(|s| ByteArray::from(s.as_str())).collect();
                out.typed::<ByteArrayType>()
                    .write_batch(&bytes, None, None)?;
            }
            Column::Bool(v) => {
                out.typed::<BoolType>().write_batch(v, None, None)?;
            }
        }
        out.close()?;
    }
    group.close()?;
    Ok(())
}

/// The `results` columns of a sweep's results.
pub fn results_table(sweep_id: &str, rows: &[pb::SeedResult]) -> Table {
    let f = |g: fn(&pb::SeedResult) -> f64| Column::Float(rows.iter().map(g).collect());
    let o =
        |g: fn(&pb::SeedResult) -> Option<f64>| Column::MaybeFloat(rows.iter().map(g).collect());
    let t = |g: fn(&pb::SeedResult) -> &str| {
        Column::Text(rows.iter().map(|r| g(r).to_string()).collect())
    };
    let factor = |g: fn(&pb::FactorSeeds) -> i64| {
        Column::Int(
            rows.iter()
                .map(|r| r.factors.as_ref().map_or(r.seed, g))
                .collect(),
        )
    };
    Table {
        name: "results",
        columns: vec![
            (
                "sweep_id",
                Column::Text(vec![sweep_id.to_string(); rows.len()]),
            ),
            ("seed", Column::Int(rows.iter().map(|r| r.seed).collect())),
            ("init_seed", factor(|f| f.init)),
            ("order_seed", factor(|f| f.order)),
            ("augment_seed", factor(|f| f.augment)),
            ("split_seed", factor(|f| f.split)),
            ("test_accuracy", o(|r| r.test_accuracy)),
            ("test_top5", o(|r| r.test_top5)),
            ("test_loss", o(|r| r.test_loss)),
            ("train_loss", o(|r| r.train_loss)),
            ("train_accuracy", o(|r| r.train_accuracy)),
            ("val_loss", o(|r| r.val_loss)),
            ("val_accuracy", o(|r| r.val_accuracy)),
            (
                "epochs",
                Column::Int(rows.iter().map(|r| r.epochs as i64).collect()),
            ),
            ("seconds", f(|r| r.seconds)),
            ("worker_id", t(|r| &r.worker_id)),
            ("device", t(|r| &r.device)),
            ("data_fingerprint", t(|r| &r.data_fingerprint)),
            ("precision", t(|r| &r.precision)),
            (
                "deterministic",
                Column::Bool(rows.iter().map(|r| r.deterministic).collect()),
            ),
            ("finished_at", t(|r| &r.finished_at)),
            ("custom", custom(rows.iter().map(|r| &r.custom))),
        ],
    }
}

/// The `custom` column: a command sweep's custom metrics as the JSON object SQL holds (empty
/// when none).
fn custom<'a>(maps: impl Iterator<Item = &'a std::collections::BTreeMap<String, f64>>) -> Column {
    Column::Text(
        maps.map(|m| {
            if m.is_empty() {
                String::new()
            } else {
                serde_json::to_string(m).unwrap_or_default()
            }
        })
        .collect(),
    )
}

/// The `epoch_metrics` columns of a sweep's epochs.
pub fn epochs_table(sweep_id: &str, rows: &[pb::EpochRow]) -> Table {
    let f = |g: fn(&pb::EpochRow) -> f64| Column::Float(rows.iter().map(g).collect());
    let o = |g: fn(&pb::EpochRow) -> Option<f64>| Column::MaybeFloat(rows.iter().map(g).collect());
    Table {
        name: "epoch_metrics",
        columns: vec![
            (
                "sweep_id",
                Column::Text(vec![sweep_id.to_string(); rows.len()]),
            ),
            ("seed", Column::Int(rows.iter().map(|r| r.seed).collect())),
            (
                "epoch",
                Column::Int(rows.iter().map(|r| r.epoch as i64).collect()),
            ),
            ("train_loss", o(|r| r.train_loss)),
            ("train_accuracy", o(|r| r.train_accuracy)),
            ("test_loss", o(|r| r.test_loss)),
            ("test_accuracy", o(|r| r.test_accuracy)),
            ("test_top5", o(|r| r.test_top5)),
            ("val_loss", o(|r| r.val_loss)),
            ("val_accuracy", o(|r| r.val_accuracy)),
            ("lr", o(|r| r.lr)),
            ("seconds", f(|r| r.seconds)),
            ("custom", custom(rows.iter().map(|r| &r.custom))),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            name: "t",
            columns: vec![
                ("seed", Column::Int(vec![1, 2])),
                ("acc", Column::Float(vec![0.1, 0.9375])),
                ("top5", Column::MaybeFloat(vec![None, Some(0.5)])),
                ("who", Column::Text(vec!["a,b".into(), "say \"hi\"".into()])),
                ("ok", Column::Bool(vec![true, false])),
            ],
        }
    }

    #[test]
    fn csv_quotes_text_and_leaves_nulls_empty() {
        assert_eq!(
            table().csv(),
            "seed,acc,top5,who,ok\n1,0.1,,\"a,b\",true\n2,0.9375,0.5,\"say \"\"hi\"\"\",false\n"
        );
    }

    /// Pages written one after another make one file, as the whole table would.
    #[test]
    fn pages_make_one_file() {
        let mut csv = Sink::new(Format::Csv, Vec::new(), &table()).unwrap();
        csv.write(&table()).unwrap();
        csv.write(&table()).unwrap();
        let (bytes, rows) = csv.finish().unwrap();
        assert_eq!(rows, 4);
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(text, table().csv() + &table().csv_rows());
        let mut pq = Sink::new(Format::Parquet, Vec::new(), &table()).unwrap();
        pq.write(&table()).unwrap();
        pq.write(&table()).unwrap();
        let (bytes, rows) = pq.finish().unwrap();
        assert_eq!(rows, 4);
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &bytes).unwrap();
        let reader = SerializedFileReader::new(std::fs::File::open(file.path()).unwrap()).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 4);
        assert_eq!(reader.metadata().num_row_groups(), 2);
    }

    /// Bytes taken page by page make the same file as the whole table written at once.
    #[test]
    fn taken_pieces_make_the_same_file() {
        for format in [Format::Csv, Format::Parquet] {
            let mut whole = Sink::new(format, Vec::new(), &table()).unwrap();
            let mut pieces = Sink::new(format, Vec::new(), &table()).unwrap();
            let mut taken = Vec::new();
            for _ in 0..3 {
                whole.write(&table()).unwrap();
                pieces.write(&table()).unwrap();
                taken.extend(pieces.take_written().unwrap());
            }
            assert!(
                !taken.is_empty(),
                "{format:?}: nothing was sent before the end"
            );
            taken.extend(pieces.finish().unwrap().0);
            assert_eq!(taken, whole.finish().unwrap().0, "{format:?}");
        }
    }

    #[test]
    fn parquet_reads_back() {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let bytes = table().parquet().unwrap();
        assert_eq!(&bytes[..4], b"PAR1");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &bytes).unwrap();
        let reader = SerializedFileReader::new(std::fs::File::open(file.path()).unwrap()).unwrap();
        let meta = reader.metadata();
        assert_eq!(meta.file_metadata().num_rows(), 2);
        let names: Vec<String> = meta
            .file_metadata()
            .schema_descr()
            .columns()
            .iter()
            .map(|c| c.name().to_string())
            .collect();
        assert_eq!(names, ["seed", "acc", "top5", "who", "ok"]);
        let rows: Vec<String> = reader
            .get_row_iter(None)
            .unwrap()
            .map(|r| r.unwrap().to_string())
            .collect();
        assert_eq!(rows.len(), 2);
        assert!(
            rows[0].contains("top5: null") && rows[1].contains("top5: 0.5"),
            "{rows:?}"
        );
        assert!(
            rows[0].contains("seed: 1") && rows[0].contains("a,b"),
            "{rows:?}"
        );
    }
}
