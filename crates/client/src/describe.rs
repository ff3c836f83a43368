//! `weightinit describe`: how every tensor of a request resolves (shapes, dtype, fans,
//! distribution, size), as a table, without generating anything; and `weightinit digest`:
//! every tensor's BLAKE3, generated but not transferred.

use tonic::{Request, Status};

use super::output;
use super::progress::human_bytes;
use super::remote::hex;
use super::source::{SourceArgs, SourceError, status_text};
use weightinit_proto::{Resolved, TensorHeader};

#[derive(clap::Args, Debug)]
pub struct DescribeArgs {
    #[command(flatten)]
    pub source: SourceArgs,
}

/// Why a request could not be described.
#[derive(Debug, thiserror::Error)]
pub enum DescribeError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{}", status_text(.0))]
    Rpc(#[from] Status),
}

/// `weightinit digest`: prints `HEX  NAME` per tensor on stdout, in request order: the hex
/// that the Python client, `fetch`'s safetensors metadata and b3sum write (grpcurl shows the
/// same bytes in base64).
pub async fn digest(args: DescribeArgs) -> Result<(), DescribeError> {
    let request = args.source.request()?;
    let digests = args
        .source
        .source()?
        .digest(Request::new(request))
        .await?
        .into_inner()
        .digests;
    for end in digests {
        println!("{}  {}", hex(&end.blake3), end.name);
    }
    Ok(())
}

/// `weightinit describe`: prints the table on stdout.
pub async fn run(args: DescribeArgs) -> Result<(), DescribeError> {
    let request = args.source.request()?;
    let headers = args
        .source
        .source()?
        .describe(Request::new(request))
        .await?
        .into_inner()
        .tensors;
    print!("{}", table(&headers));
    Ok(())
}

const COLUMNS: [&str; 10] = [
    "NAME",
    "SHAPE",
    "OUTPUT",
    "DTYPE",
    "SCHEME",
    "FAN_IN",
    "FAN_OUT",
    "DISTRIBUTION",
    "GAIN",
    "BYTES",
];

/// Columns of numbers, aligned right.
const NUMERIC: [bool; 10] = [
    false, false, false, false, false, true, true, false, true, true,
];

/// One line per tensor and a total line, in aligned columns.
pub fn table(headers: &[TensorHeader]) -> String {
    let rows: Vec<[String; 10]> = headers.iter().map(row).collect();
    let mut widths = COLUMNS.map(|c| c.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(COLUMNS.map(str::to_owned)).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .zip(NUMERIC)
            .map(|((cell, width), numeric)| match numeric {
                true => format!("{cell:>width$}"),
                false => format!("{cell:<width$}"),
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let total: u64 = headers.iter().map(|h| h.byte_length).sum();
    out.push_str(&format!(
        "total: {} tensors, {total} bytes ({})\n",
        headers.len(),
        human_bytes(total)
    ));
    out
}

fn row(header: &TensorHeader) -> [String; 10] {
    let resolved = header.resolved.clone().unwrap_or_default();
    let optional = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
    [
        header.name.clone(),
        shape(&header.shape),
        shape(&header.output_shape),
        output::dtype(header).map_or_else(|_| header.dtype.to_string(), |d| d.name().to_owned()),
        resolved.scheme.clone(),
        optional(resolved.fan_in.map(|f| f.to_string())),
        optional(resolved.fan_out.map(|f| f.to_string())),
        distribution(&resolved),
        optional(resolved.gain.map(number)),
        human_bytes(header.byte_length),
    ]
}

fn shape(dims: &[u64]) -> String {
    let dims: Vec<String> = dims.iter().map(u64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// The distribution with the parameters that matter for it.
fn distribution(r: &Resolved) -> String {
    match r.distribution.as_str() {
        "constant" => format!("constant {}", number(r.value)),
        "uniform" => format!("uniform [{}, {})", number(r.low), number(r.high)),
        "normal" => format!("normal mean={} std={}", number(r.mean), number(r.std)),
        "truncated_normal" => format!(
            "truncated_normal mean={} std={} in [{}, {}]",
            number(r.mean),
            number(r.std),
            number(r.trunc_low),
            number(r.trunc_high)
        ),
        other => other.to_owned(),
    }
}

/// Six significant digits, without trailing zeros: readable, and enough to recognise a value.
fn number(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return x.to_string();
    }
    let magnitude = x.abs().log10().floor() as i32;
    if (-4..6).contains(&magnitude) {
        return trim_zeros(&format!("{x:.*}", (5 - magnitude) as usize)).to_owned();
    }
    let text = format!("{x:.5e}");
    let (mantissa, exponent) = text.split_once('e').expect("exponent notation");
    format!("{}e{exponent}", trim_zeros(mantissa))
}

fn trim_zeros(text: &str) -> &str {
    match text.contains('.') {
        true => text.trim_end_matches('0').trim_end_matches('.'),
        false => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_short() {
        assert_eq!(number(0.0), "0");
        assert_eq!(number(1.0), "1");
        assert_eq!(number(-2.0), "-2");
        assert_eq!(number(0.07654655446197431), "0.0765466");
        assert_eq!(number(1.2345678), "1.23457");
        assert_eq!(number(0.02), "0.02");
        assert_eq!(number(123456.7), "123457");
        assert_eq!(number(1e-8), "1e-8");
        assert_eq!(number(-1.25e9), "-1.25e9");
    }

    #[test]
    fn table_lines_up() {
        let header = TensorHeader {
            index: 0,
            name: "fc1.weight".into(),
            shape: vec![256, 784],
            output_shape: vec![128, 784],
            dtype: 1,
            byte_length: 401_408,
            algorithm: 1,
            resolved: Some(Resolved {
                scheme: "xavier_uniform".into(),
                fan_in: Some(784),
                fan_out: Some(256),
                distribution: "uniform".into(),
                low: -0.07,
                high: 0.07,
                gain: Some(1.0),
                ..Default::default()
            }),
        };
        let text = table(&[header]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME        SHAPE       OUTPUT      DTYPE"));
        assert!(lines[1].starts_with("fc1.weight  [256, 784]  [128, 784]  float32"));
        assert!(lines[1].contains("uniform [-0.07, 0.07)"));
        assert!(lines[1].ends_with("392.0 KiB"));
        assert_eq!(lines[2], "total: 1 tensors, 401408 bytes (392.0 KiB)");
    }
}
