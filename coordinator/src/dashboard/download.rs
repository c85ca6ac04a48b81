//! `/sweeps/ID/export/TABLE.FORMAT`: a sweep's results or epoch metrics as the CSV or Parquet
//! file `coordinator sweep export` writes, sent a page at a time as it is read, so that a
//! download of any size holds one page in memory.

use super::{Dashboard, Problem, Shared, to_sign_in};
use crate::export::{
    EPOCH_PAGES, Format, PAGE, Sink, Table, epochs_table, for_each_page, results_table,
};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use seedsweep_proto::v1 as pb;
use seedsweep_proto::v1::coordinator_server::Coordinator as _;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::Request;

/// What a download holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Results,
    Epochs,
}

/// The table and format a file name asks for: `results.csv`, `epochs.parquet`, ...
fn parse(file: &str) -> Option<(Kind, Format)> {
    let (table, ext) = file.split_once('.')?;
    let kind = match table {
        "results" => Kind::Results,
        "epochs" => Kind::Epochs,
        _ => return None,
    };
    Some((kind, ext.parse().ok()?))
}

pub(super) async fn download(
    State(d): Shared,
    Path((id, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if d.visitor(&headers).is_none() {
        return to_sign_in();
    }
    let Some((kind, format)) = parse(&file) else {
        let why = format!(
            "no download {file}: ask for results.csv, results.parquet, epochs.csv or epochs.parquet"
        );
        return Problem(StatusCode::NOT_FOUND, why).into_response();
    };
    // A wrong sweep is a 404 page, not a broken download.
    if let Err(p) = d.status(&id).await {
        return p.into_response();
    }
    let (tx, rx) = mpsc::channel(2);
    let name = format!("{id}-{file}");
    tokio::spawn(async move {
        if let Err(e) = send(&d, &id, kind, format, &tx).await {
            tracing::warn!(sweep = %id, error = %e, "a dashboard download failed");
            // The browser sees the download fail rather than end early.
            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
    });
    let content_type = match format {
        Format::Csv => "text/csv; charset=utf-8",
        Format::Parquet => "application/vnd.apache.parquet",
    };
    (
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response()
}

type Chunks = mpsc::Sender<std::io::Result<Vec<u8>>>;

/// Reads the sweep's rows a page at a time into a sink and sends each page's bytes to `tx`,
/// waiting for the browser to take them before reading on; stops when the browser goes.
async fn send(
    d: &Arc<Dashboard>,
    id: &str,
    kind: Kind,
    format: Format,
    tx: &Chunks,
) -> anyhow::Result<()> {
    let mut sink = match kind {
        Kind::Results => Sink::new(format, Vec::new(), &results_table(id, &[]))?,
        Kind::Epochs => Sink::new(format, Vec::new(), &epochs_table(id, &[]))?,
    };
    // Writes a page into the sink; sending its bytes is the future it returns.
    let mut page = |table: Table| {
        let bytes = sink.write(&table).and_then(|()| sink.take_written());
        let tx = tx.clone();
        async move {
            let bytes = bytes?;
            if !bytes.is_empty() {
                tx.send(Ok(bytes)).await?;
            }
            anyhow::Ok(())
        }
    };
    match kind {
        Kind::Results => {
            let fetch = |after_seed| {
                let req = pb::ListResultsRequest {
                    sweep_id: id.to_string(),
                    page_size: PAGE,
                    after_seed,
                };
                async move {
                    let page = d.service.list_results(Request::new(req)).await?;
                    let page = page.into_inner();
                    Ok((page.results, page.next_after_seed))
                }
            };
            for_each_page(fetch, |rows| page(results_table(id, &rows))).await?
        }
        Kind::Epochs => {
            let fetch = |after| {
                let req = pb::ListEpochMetricsRequest {
                    sweep_id: id.to_string(),
                    page_size: PAGE * EPOCH_PAGES,
                    after,
                };
                async move {
                    let page = d.service.list_epoch_metrics(Request::new(req)).await?;
                    let page = page.into_inner();
                    Ok((page.rows, page.next_after))
                }
            };
            for_each_page(fetch, |rows| page(epochs_table(id, &rows))).await?
        }
    }
    let (rest, _) = sink.finish()?;
    tx.send(Ok(rest)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_name_a_table_and_a_format() {
        assert_eq!(parse("results.csv"), Some((Kind::Results, Format::Csv)));
        assert_eq!(
            parse("epochs.parquet"),
            Some((Kind::Epochs, Format::Parquet))
        );
        for bad in [
            "results",
            "results.xlsx",
            "seeds.csv",
            ".csv",
            "results.csv.gz",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
