//! `coordinator sweep export`: a sweep's results or epoch metrics as CSV or Parquet, from one
//! column model so that both formats hold the same columns under the same names as the SQL
//! tables.

use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use seedsweep_proto::v1 as pb;
use std::sync::Arc;

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

    pub fn csv(&self) -> String {
        let mut out = self
            .columns
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>()
            .join(",");
        out.push('\n');
        for i in 0..self.rows() {
            let row: Vec<String> = self.columns.iter().map(|c| c.1.csv(i)).collect();
            out += &row.join(",");
            out.push('\n');
        }
        out
    }

    pub fn parquet(&self) -> anyhow::Result<Vec<u8>> {
        let fields: Vec<String> = self
            .columns
            .iter()
            .map(|(name, c)| match c {
                Column::Text(_) => format!("{} {name} (UTF8);", c.parquet_type()),
                _ => format!("{} {name};", c.parquet_type()),
            })
            .collect();
        let schema = parquet::schema::parser::parse_message_type(&format!(
            "message {} {{ {} }}",
            self.name,
            fields.join(" ")
        ))?;
        let props = Arc::new(WriterProperties::builder().build());
        let mut writer = SerializedFileWriter::new(Vec::new(), Arc::new(schema), props)?;
        let mut group = writer.next_row_group()?;
        for (_, column) in &self.columns {
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
                    let bytes: Vec<ByteArray> =
                        v.iter().map(|s| ByteArray::from(s.as_str())).collect();
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
        Ok(writer.into_inner()?)
    }
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
            ("test_accuracy", f(|r| r.test_accuracy)),
            ("test_top5", o(|r| r.test_top5)),
            ("test_loss", f(|r| r.test_loss)),
            ("train_loss", f(|r| r.train_loss)),
            ("train_accuracy", f(|r| r.train_accuracy)),
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
        ],
    }
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
            ("train_loss", f(|r| r.train_loss)),
            ("train_accuracy", f(|r| r.train_accuracy)),
            ("test_loss", o(|r| r.test_loss)),
            ("test_accuracy", o(|r| r.test_accuracy)),
            ("test_top5", o(|r| r.test_top5)),
            ("val_loss", o(|r| r.val_loss)),
            ("val_accuracy", o(|r| r.val_accuracy)),
            ("lr", f(|r| r.lr)),
            ("seconds", f(|r| r.seconds)),
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
