//! Output files: one safetensors file, a directory of `.npy` files, or raw bytes.
//!
//! Every tensor's size is known before any data arrives, so the files are laid out up front
//! (headers written, lengths set) and each chunk is written in place at its offset; nothing
//! needs to be held in memory. Files are written under a temporary name in the same directory
//! (`.NAME.partial`) and renamed only once every tensor is verified, so no half-written file
//! ever carries the final name; dropping an uncommitted output removes them.
//!
//! npy: NumPy has no bfloat16, so bfloat16 tensors are written as `<u2` holding the raw bf16
//! bits (`torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)` restores them). File names
//! are the tensor names with `/` as `__`, every other character that is not an ASCII letter,
//! digit, `.`, `-` or `_` as `_`, and a leading `.` as `_`; names that collide after this are
//! refused.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::progress::human_bytes;
use weightinit_engine::DType;
use weightinit_proto::TensorHeader;
use weightinit_proto::convert;

/// How the tensors are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One .safetensors file with the seed, algorithm and BLAKE3 digests in __metadata__.
    Safetensors,
    /// A directory of NAME.npy files (bfloat16 as '<u2' holding the raw bits).
    Npy,
    /// The tensors' bytes concatenated in request order, nothing else.
    Raw,
}

impl std::fmt::Display for Format {
    /// The name `--format` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        let value = self.to_possible_value().expect("no variant is skipped");
        f.write_str(value.get_name())
    }
}

impl Format {
    /// The format `explicit` names, or else the one `out` implies: a directory (existing, or
    /// a path ending in `/`) is npy, `.safetensors` is safetensors, `.bin` and `.raw` are raw.
    pub fn resolve(explicit: Option<Format>, out: &Path) -> Result<Format, OutputError> {
        if let Some(format) = explicit {
            return Ok(format);
        }
        if out.as_os_str().as_encoded_bytes().ends_with(b"/") || out.is_dir() {
            return Ok(Self::Npy);
        }
        match out.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => Ok(Self::Safetensors),
            Some("bin" | "raw") => Ok(Self::Raw),
            _ => Err(OutputError::UnknownFormat(out.to_owned())),
        }
    }
}

/// Why the output cannot be laid out or written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "cannot tell the format of {} from its name: use .safetensors, .bin, .raw, a directory, \
         or --format",
        .0.display()
    )]
    UnknownFormat(PathBuf),
    /// A single-file output path that is a directory or has no file name.
    #[error("{} is not a file name", .0.display())]
    NotAFile(PathBuf),
    /// A tensor named like safetensors' metadata entry.
    #[error("safetensors reserves the name {0:?} for its metadata")]
    ReservedName(String),
    /// Two tensors that would be written to the same .npy file.
    #[error("tensors {first:?} and {second:?} would both be {file}")]
    NameClash {
        file: String,
        first: String,
        second: String,
    },
    /// A dtype number the client does not know (a server newer than this client).
    #[error("tensor {tensor:?} has dtype {value}, unknown to this client")]
    UnknownDType { tensor: String, value: i32 },
    /// A shape too long for an npy v1.0 header.
    #[error("tensor {0:?}: the shape is too long for an npy header")]
    NpyHeader(String),
    /// The output needs more space than its file system has free.
    #[error(
        "not enough space: the output needs {} ({needed} bytes), {} has {} free; free some \
         space, write elsewhere (--out), or pass --no-space-check to write anyway",
        human_bytes(*needed),
        dir.display(),
        human_bytes(*available)
    )]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The dtype of a header's tensor, by the service's own mapping.
pub fn dtype(header: &TensorHeader) -> Result<DType, OutputError> {
    DType::ALL
        .into_iter()
        .find(|d| i32::from(convert::proto_dtype(*d)) == header.dtype)
        .ok_or_else(|| OutputError::UnknownDType {
            tensor: header.name.clone(),
            value: header.dtype,
        })
}

/// One tensor as the output files see it.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    byte_length: u64,
}

impl Entry {
    fn new(header: &TensorHeader) -> Result<Self, OutputError> {
        Ok(Self {
            name: header.name.clone(),
            dtype: dtype(header)?,
            shape: header.output_shape.clone(),
            byte_length: header.byte_length,
        })
    }
}

/// The safetensors dtype code and the npy descr of a dtype.
fn codes(dtype: DType) -> (&'static str, &'static str) {
    match dtype {
        DType::Float64 => ("F64", "<f8"),
        DType::Float32 => ("F32", "<f4"),
        DType::Float16 => ("F16", "<f2"),
        DType::BFloat16 => ("BF16", "<u2"),
    }
}

/// What safetensors' `__metadata__` records besides the digests.
#[derive(Clone, Copy, Debug)]
pub struct Provenance {
    pub seed: u64,
    pub algorithm: u32,
}

/// The safetensors header (length prefix included) for `entries` laid out in order. Digests
/// are hex, so the header has the same length whatever they are: it is written with
/// placeholders first and rewritten in place once the digests are known.
fn safetensors_header(
    entries: &[Entry],
    provenance: Provenance,
    digests: Option<&[blake3::Hash]>,
) -> Vec<u8> {
    use serde_json::{Map, Value, json};
    let mut metadata = Map::new();
    // transformers refuses safetensors files whose format is not one it knows.
    metadata.insert("format".into(), "pt".into());
    metadata.insert("seed".into(), provenance.seed.to_string().into());
    metadata.insert("algorithm".into(), provenance.algorithm.to_string().into());
    let mut header = Map::new();
    let mut offset = 0u64;
    for (i, entry) in entries.iter().enumerate() {
        let digest = digests.map_or_else(|| "0".repeat(64), |d| d[i].to_hex().to_string());
        metadata.insert(format!("blake3.{}", entry.name), digest.into());
        let end = offset + entry.byte_length;
        header.insert(
            entry.name.clone(),
            json!({
                "dtype": codes(entry.dtype).0,
                "shape": entry.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    header.insert("__metadata__".into(), Value::Object(metadata));
    let mut json = serde_json::to_vec(&Value::Object(header)).expect("JSON of strings");
    // Padding keeps the data 8-byte aligned, as safetensors recommends.
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

/// An npy v1.0 header: magic, version, length, the dict, padded to a multiple of 64 bytes.
fn npy_header(entry: &Entry) -> Result<Vec<u8>, OutputError> {
    let shape = match entry.shape.as_slice() {
        [n] => format!("({n},)"),
        dims => {
            let dims: Vec<String> = dims.iter().map(u64::to_string).collect();
            format!("({})", dims.join(", "))
        }
    };
    let mut dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        codes(entry.dtype).1
    );
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let len = u16::try_from(dict.len()).map_err(|_| OutputError::NpyHeader(entry.name.clone()))?;
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    Ok(out)
}

/// The .npy file name of a tensor (see the module documentation).
pub fn npy_file_name(tensor: &str) -> String {
    let mut name = String::with_capacity(tensor.len() + 4);
    for c in tensor.chars() {
        match c {
            '/' => name.push_str("__"),
            c if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') => name.push(c),
            _ => name.push('_'),
        }
    }
    // A leading dot would hide the file, and our partial files start with one.
    if name.starts_with('.') {
        name.replace_range(..1, "_");
    }
    name.push_str(".npy");
    name
}

/// A file to create: its final path, the bytes before the data, and the data's length.
#[derive(Debug, PartialEq)]
struct FilePlan {
    path: PathBuf,
    prefix: Vec<u8>,
    data_len: u64,
}

/// Where a tensor's bytes go: which file, at which offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    file: usize,
    base: u64,
}

/// The files of an output and the place of every tensor in them.
fn layout(
    format: Format,
    out: &Path,
    entries: &[Entry],
    provenance: Provenance,
) -> Result<(Vec<FilePlan>, Vec<Place>), OutputError> {
    let concatenated = |prefix: Vec<u8>| {
        let mut base = prefix.len() as u64;
        let places = entries
            .iter()
            .map(|e| {
                let place = Place { file: 0, base };
                base += e.byte_length;
                place
            })
            .collect();
        let data_len = entries.iter().map(|e| e.byte_length).sum();
        let file = FilePlan {
            path: out.to_owned(),
            prefix,
            data_len,
        };
        (vec![file], places)
    };
    match format {
        Format::Safetensors => {
            if let Some(e) = entries.iter().find(|e| e.name == "__metadata__") {
                return Err(OutputError::ReservedName(e.name.clone()));
            }
            Ok(concatenated(safetensors_header(entries, provenance, None)))
        }
        Format::Raw => Ok(concatenated(Vec::new())),
        Format::Npy => {
            let mut owners: HashMap<String, &str> = HashMap::new();
            let mut files = Vec::with_capacity(entries.len());
            for entry in entries {
                let file = npy_file_name(&entry.name);
                if let Some(first) = owners.insert(file.clone(), &entry.name) {
                    return Err(OutputError::NameClash {
                        file,
                        first: first.to_owned(),
                        second: entry.name.clone(),
                    });
                }
                files.push(FilePlan {
                    path: out.join(file),
                    prefix: npy_header(entry)?,
                    data_len: entry.byte_length,
                });
            }
            let places = files
                .iter()
                .enumerate()
                .map(|(file, f)| Place {
                    file,
                    base: f.prefix.len() as u64,
                })
                .collect();
            Ok((files, places))
        }
    }
}

/// A file being written under its temporary name.
struct Part {
    file: File,
    partial: PathBuf,
    path: PathBuf,
}

/// The output of one fetch, laid out and ready for chunks at any offset.
pub struct Output {
    format: Format,
    entries: Vec<Entry>,
    provenance: Provenance,
    parts: Vec<Part>,
    places: Vec<Place>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Output {
    /// Creates the temporary files of `manifest` (the tensors in request order) at `out`;
    /// with `check_space`, only when the file system has room for all of them (the files
    /// are sparse until written, so nothing else would stop a fetch that cannot fit).
    pub fn create(
        format: Format,
        out: &Path,
        manifest: &[TensorHeader],
        provenance: Provenance,
        check_space: bool,
    ) -> Result<Self, OutputError> {
        let entries = manifest
            .iter()
            .map(Entry::new)
            .collect::<Result<Vec<_>, _>>()?;
        let (plans, places) = layout(format, out, &entries, provenance)?;
        if check_space {
            let needed = plans
                .iter()
                .map(|p| p.prefix.len() as u64 + p.data_len)
                .sum();
            let dir = match format {
                Format::Npy => out,
                _ => out.parent().unwrap_or(Path::new("")),
            };
            ensure_space(dir, needed)?;
        }
        if format == Format::Npy {
            fs::create_dir_all(out).map_err(io_error(out))?;
        } else if out.is_dir() {
            return Err(OutputError::NotAFile(out.to_owned()));
        }
        let mut output = Self {
            format,
            entries,
            provenance,
            parts: Vec::with_capacity(plans.len()),
            places,
        };
        for plan in plans {
            let name = plan
                .path
                .file_name()
                .ok_or_else(|| OutputError::NotAFile(plan.path.clone()))?;
            let mut partial_name = std::ffi::OsString::from(".");
            partial_name.push(name);
            partial_name.push(".partial");
            let partial = plan.path.with_file_name(partial_name);
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&partial)
                .map_err(io_error(&partial))?;
            // Pushed before writing, so that a failure below still removes the file.
            output.parts.push(Part {
                file,
                partial,
                path: plan.path,
            });
            let part = output.parts.last().expect("just pushed");
            part.file
                .write_all_at(&plan.prefix, 0)
                .and_then(|()| part.file.set_len(plan.prefix.len() as u64 + plan.data_len))
                .map_err(io_error(&part.partial))?;
        }
        Ok(output)
    }

    /// Writes `data` at byte `offset` of tensor `tensor`'s output; the caller keeps writes
    /// within the tensor.
    pub fn write(&self, tensor: usize, offset: u64, data: &[u8]) -> Result<(), OutputError> {
        let place = self.places[tensor];
        let part = &self.parts[place.file];
        part.file
            .write_all_at(data, place.base + offset)
            .map_err(io_error(&part.partial))
    }

    /// Records the verified `digests` (safetensors), flushes every file to disk and gives it
    /// its final name.
    pub fn commit(mut self, digests: &[blake3::Hash]) -> Result<(), OutputError> {
        if self.format == Format::Safetensors {
            let header = safetensors_header(&self.entries, self.provenance, Some(digests));
            let part = &self.parts[0];
            part.file
                .write_all_at(&header, 0)
                .map_err(io_error(&part.partial))?;
        }
        // Data reaches the disk before the name does: a crash never leaves a truncated file
        // under the final name.
        for part in &self.parts {
            part.file.sync_all().map_err(io_error(&part.partial))?;
        }
        for part in &self.parts {
            fs::rename(&part.partial, &part.path).map_err(io_error(&part.path))?;
        }
        self.parts.clear();
        Ok(())
    }
}

/// Fails unless `dir`'s file system (that of its nearest existing ancestor, when `dir` is
/// yet to be made) has `needed` bytes free for an unprivileged user.
fn ensure_space(dir: &Path, needed: u64) -> Result<(), OutputError> {
    let dir = dir
        .ancestors()
        .map(|d| {
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            }
        })
        .find(|d| d.is_dir())
        .unwrap_or(Path::new("/"));
    let stat = rustix::fs::statvfs(dir).map_err(|e| OutputError::Io {
        path: dir.to_owned(),
        source: e.into(),
    })?;
    let available = stat.f_bavail.saturating_mul(stat.f_frsize);
    if needed > available {
        return Err(OutputError::NoSpace {
            dir: dir.to_owned(),
            needed,
            available,
        });
    }
    Ok(())
}

impl Drop for Output {
    /// Removes what was not committed (renamed files are gone from their temporary names
    /// already): a failed fetch leaves nothing behind.
    fn drop(&mut self) {
        for part in &self.parts {
            let _ = fs::remove_file(&part.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, dtype: DType, shape: &[u64]) -> Entry {
        Entry {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            byte_length: shape.iter().product::<u64>() * dtype.size() as u64,
        }
    }

    const PROVENANCE: Provenance = Provenance {
        seed: 42,
        algorithm: 1,
    };

    #[test]
    fn formats_from_flags_and_names() {
        use Format::*;
        let resolve = |f, p: &str| Format::resolve(f, Path::new(p)).ok();
        assert_eq!(resolve(None, "m.safetensors"), Some(Safetensors));
        assert_eq!(resolve(None, "m.bin"), Some(Raw));
        assert_eq!(resolve(None, "m.raw"), Some(Raw));
        assert_eq!(resolve(None, "weights/"), Some(Npy));
        assert_eq!(resolve(None, "."), Some(Npy));
        assert_eq!(resolve(Some(Npy), "m.bin"), Some(Npy));
        assert_eq!(resolve(None, "m.pt"), None);
    }

    #[test]
    fn safetensors_header_is_aligned_and_digest_independent() {
        let entries = [
            entry("w", DType::BFloat16, &[3, 5]),
            entry("s", DType::Float64, &[]),
        ];
        let placeholder = safetensors_header(&entries, PROVENANCE, None);
        let digests = [blake3::hash(b"w"), blake3::hash(b"s")];
        let header = safetensors_header(&entries, PROVENANCE, Some(&digests));
        assert_eq!(header.len(), placeholder.len());
        assert_eq!(header.len() % 8, 0);
        let n = u64::from_le_bytes(header[..8].try_into().unwrap()) as usize;
        assert_eq!(n, header.len() - 8);
        let json: serde_json::Value = serde_json::from_slice(&header[8..]).unwrap();
        assert_eq!(json["w"]["dtype"], "BF16");
        assert_eq!(json["w"]["shape"], serde_json::json!([3, 5]));
        assert_eq!(json["w"]["data_offsets"], serde_json::json!([0, 30]));
        assert_eq!(json["s"]["shape"], serde_json::json!([]));
        assert_eq!(json["s"]["data_offsets"], serde_json::json!([30, 38]));
        let metadata = &json["__metadata__"];
        assert_eq!(metadata["seed"], "42");
        assert_eq!(metadata["algorithm"], "1");
        assert_eq!(metadata["blake3.s"], digests[1].to_hex().as_str());
    }

    #[test]
    fn npy_headers_as_numpy_writes_them() {
        let header = npy_header(&entry("w", DType::Float32, &[3, 5])).unwrap();
        assert_eq!(header.len() % 64, 0);
        assert_eq!(&header[..8], b"\x93NUMPY\x01\x00");
        assert_eq!(
            u16::from_le_bytes([header[8], header[9]]) as usize,
            header.len() - 10
        );
        let dict = std::str::from_utf8(&header[10..]).unwrap();
        assert!(dict.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 5), }"));
        assert!(dict.ends_with(" \n"));
        let shape = |s: &[u64]| {
            let h = npy_header(&entry("x", DType::BFloat16, s)).unwrap();
            let dict = String::from_utf8(h[10..].to_vec()).unwrap();
            assert!(dict.contains("'descr': '<u2'"));
            dict.split("'shape': ")
                .nth(1)
                .unwrap()
                .split(", }")
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(shape(&[]), "()");
        assert_eq!(shape(&[7]), "(7,)");
    }

    #[test]
    fn npy_names_are_safe_and_unique() {
        assert_eq!(npy_file_name("dense/kernel"), "dense__kernel.npy");
        assert_eq!(npy_file_name("fc1.weight"), "fc1.weight.npy");
        assert_eq!(npy_file_name("../x y:é"), "_.__x_y__.npy");
        assert_eq!(npy_file_name(".hidden"), "_hidden.npy");
        let entries = [
            entry("a/b", DType::Float32, &[1]),
            entry("a__b", DType::Float32, &[1]),
        ];
        let clash = layout(Format::Npy, Path::new("d"), &entries, PROVENANCE).unwrap_err();
        assert!(matches!(clash, OutputError::NameClash { .. }), "{clash}");
    }

    #[test]
    fn layouts_place_tensors_after_headers() {
        let entries = [
            entry("a", DType::Float32, &[2]),
            entry("b", DType::Float16, &[3]),
        ];
        let (files, places) =
            layout(Format::Raw, Path::new("m.bin"), &entries, PROVENANCE).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].data_len, 14);
        assert_eq!(
            places,
            [Place { file: 0, base: 0 }, Place { file: 0, base: 8 }]
        );
        let (files, places) = layout(
            Format::Safetensors,
            Path::new("m.safetensors"),
            &entries,
            PROVENANCE,
        )
        .unwrap();
        let header = files[0].prefix.len() as u64;
        assert_eq!(
            places[1],
            Place {
                file: 0,
                base: header + 8
            }
        );
        let (files, places) = layout(Format::Npy, Path::new("d"), &entries, PROVENANCE).unwrap();
        assert_eq!(files[1].path, Path::new("d/b.npy"));
        assert_eq!(places[1], Place { file: 1, base: 128 });
        let reserved = [entry("__metadata__", DType::Float32, &[1])];
        assert!(
            layout(
                Format::Safetensors,
                Path::new("m.safetensors"),
                &reserved,
                PROVENANCE
            )
            .is_err()
        );
    }
}
