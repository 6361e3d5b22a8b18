//! The native part of `import codeclm`: the formats that are not Parquet (Python polars reads
//! the manifests). Token data crosses as little-endian `uint16` bytes, which the Python layer
//! views as numpy arrays without a copy; reads run with the interpreter released.

use std::path::PathBuf;

use codeclm_formats::{shard, tokens, vocab};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

mod codec;

fn err(e: codeclm_formats::Error) -> PyErr {
    match e {
        codeclm_formats::Error::Io { .. } => PyOSError::new_err(e.to_string()),
        e => PyValueError::new_err(e.to_string()),
    }
}

fn u16_bytes(ids: impl IntoIterator<Item = u16>) -> Vec<u8> {
    ids.into_iter().flat_map(u16::to_le_bytes).collect()
}

/// A byte-level BPE vocabulary (`tokenizer.json` as `codeclm vocab train` writes it): the same
/// ids as Hugging Face `tokenizers` on the same file, and the exact inverse.
#[pyclass(module = "codeclm._native", frozen)]
struct Vocab {
    pub(crate) inner: vocab::Vocab,
}

#[pymethods]
impl Vocab {
    #[new]
    fn new(path: PathBuf) -> PyResult<Self> {
        Ok(Vocab {
            inner: vocab::Vocab::load(&path).map_err(err)?,
        })
    }

    /// xxh3-64 of the file's bytes, 16 hex digits: the name of its token sets.
    #[getter]
    fn hash(&self) -> String {
        self.inner.hash.clone()
    }

    #[getter]
    fn size(&self) -> u32 {
        self.inner.size
    }

    #[getter]
    fn bos(&self) -> u32 {
        self.inner.bos
    }

    #[getter]
    fn eos(&self) -> u32 {
        self.inner.eos
    }

    /// The ids of `data` (no BOS/EOS), as little-endian uint16 bytes.
    fn encode_u16<'py>(&self, py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
        let mut ids = Vec::new();
        py.detach(|| self.inner.encode(data, &mut ids));
        PyBytes::new(py, &u16_bytes(ids.into_iter().map(|i| i as u16)))
    }

    /// The bytes `ids` (little-endian uint16 bytes) stand for; special tokens stand for none.
    fn decode_u16<'py>(&self, py: Python<'py>, ids: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        if ids.len() % 2 != 0 {
            return Err(PyValueError::new_err(
                "ids must be uint16: an even number of bytes",
            ));
        }
        let ids: Vec<u32> = ids
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect();
        let bytes = py.detach(|| self.inner.decode(&ids)).map_err(err)?;
        Ok(PyBytes::new(py, &bytes))
    }
}

/// A token shard: documents (BOS ... EOS) of one dataset part under one vocabulary, in
/// checksummed zstd frames; a range read decompresses only the frames it covers.
#[pyclass(module = "codeclm._native", frozen)]
struct TokenShard {
    inner: tokens::TokenShard,
}

#[pymethods]
impl TokenShard {
    /// Opens and checks the shard (header, footer, frame index); with `vocab_hash`, also that it
    /// belongs to that vocabulary.
    #[new]
    #[pyo3(signature = (path, vocab_hash = None))]
    fn new(path: PathBuf, vocab_hash: Option<&str>) -> PyResult<Self> {
        Ok(TokenShard {
            inner: tokens::TokenShard::open(&path, vocab_hash).map_err(err)?,
        })
    }

    #[getter]
    fn vocab_hash(&self) -> String {
        self.inner.vocab_hash.clone()
    }

    #[getter]
    fn vocab_size(&self) -> u32 {
        self.inner.vocab_size
    }

    #[getter]
    fn docs(&self) -> u64 {
        self.inner.docs
    }

    #[getter]
    fn tokens(&self) -> u64 {
        self.inner.token_count
    }

    /// Tokens `offset .. offset + n` as little-endian uint16 bytes (frame checksums checked).
    fn read_u16<'py>(&self, py: Python<'py>, offset: u64, n: u64) -> PyResult<Bound<'py, PyBytes>> {
        let ids = py
            .detach(|| self.inner.read_range(offset, n))
            .map_err(err)?;
        Ok(PyBytes::new(py, &u16_bytes(ids)))
    }
}

/// A codec shard: zstd-compressed JPEG or H.264 records with a checksummed index.
#[pyclass(module = "codeclm._native", frozen)]
struct CodecShard {
    inner: shard::CodecShard,
}

#[pymethods]
impl CodecShard {
    #[new]
    fn new(path: PathBuf) -> PyResult<Self> {
        Ok(CodecShard {
            inner: shard::CodecShard::open(&path).map_err(err)?,
        })
    }

    /// `jpeg` or `h264`.
    #[getter]
    fn codec(&self) -> &'static str {
        self.inner.codec().name()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// The codec bytes of record `record` (the manifest's `record` column), checksum checked.
    fn read<'py>(&self, py: Python<'py>, record: usize) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = py.detach(|| self.inner.read(record)).map_err(err)?;
        Ok(PyBytes::new(py, &bytes))
    }
}

/// The complete JPEG of an abbreviated stream and the dataset's tables-only stream (DQT before
/// the frame header, DHT after it, as libjpeg writes a full file).
#[pyfunction]
fn jpeg_splice_tables<'py>(
    py: Python<'py>,
    abbreviated: &[u8],
    tables: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    let full = codeclm_codec::jpeg::splice_tables(abbreviated, tables)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(PyBytes::new(py, &full))
}

/// A complete JPEG's abbreviated stream (DQT and DHT removed): what a dataset stores.
#[pyfunction]
fn jpeg_strip_tables<'py>(py: Python<'py>, full: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let abbreviated = codeclm_codec::jpeg::strip_tables(full)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(PyBytes::new(py, &abbreviated))
}

/// Generated bytes cleaned the way the paper's code cleans them (and `codeclm sample`): from the
/// first SOI to the first EOI after it, SOI or EOI added where missing.
#[pyfunction]
fn jpeg_tidy<'py>(py: Python<'py>, generated: &[u8]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &codeclm_codec::jpeg::tidy_generated(generated))
}

fn column<const N: usize, T>(
    name: &str,
    bytes: &[u8],
    rows: usize,
    f: fn([u8; N]) -> T,
) -> PyResult<Vec<T>> {
    if bytes.len() != rows * N {
        return Err(PyValueError::new_err(format!(
            "column {name}: {} bytes for {rows} rows of {N} bytes",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunks of N")))
        .collect())
}

/// The trainer's training stream (`codeclm_loader::Loader`) over a document table the Python
/// layer reads from the token manifest: the same windows as `codeclm train` for the same
/// context, seed and mix.
#[pyclass(module = "codeclm._native", unsendable)]
struct Loader {
    table: std::sync::Arc<codeclm_loader::DocTable>,
    inner: codeclm_loader::Loader,
}

fn loader_err(e: codeclm_loader::Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

#[pymethods]
impl Loader {
    /// Columns as little-endian bytes, one value per manifest row in manifest order: `shard`
    /// (u32 index into `shards`), `offset` (u64), `n_tokens` and `codec_bytes` (u32),
    /// `modality` (u8: 0 image, 1 video) and `split` (u8: 0 train, 1 val).
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (root, hash, bos, eos, shards, shard, offset, n_tokens, codec_bytes, modality, split, context, seed, mix))]
    fn new(
        root: PathBuf,
        hash: String,
        bos: u32,
        eos: u32,
        shards: Vec<String>,
        shard: &[u8],
        offset: &[u8],
        n_tokens: &[u8],
        codec_bytes: &[u8],
        modality: &[u8],
        split: &[u8],
        context: usize,
        seed: u64,
        mix: std::collections::BTreeMap<String, f64>,
    ) -> PyResult<Self> {
        use codeclm_formats::{Modality, Split};
        let rows = modality.len();
        let shard = column("shard", shard, rows, u32::from_le_bytes)?;
        let offset = column("offset", offset, rows, u64::from_le_bytes)?;
        let n_tokens = column("n_tokens", n_tokens, rows, u32::from_le_bytes)?;
        let codec_bytes = column("codec_bytes", codec_bytes, rows, u32::from_le_bytes)?;
        let split = column("split", split, rows, |[b]: [u8; 1]| b)?;
        let mut docs = Vec::with_capacity(rows);
        for i in 0..rows {
            if shard[i] as usize >= shards.len() || modality[i] > 1 || split[i] > 1 {
                return Err(PyValueError::new_err(format!(
                    "row {i}: shard, modality or split out of range"
                )));
            }
            docs.push(codeclm_loader::DocRef {
                offset: offset[i],
                n_tokens: n_tokens[i],
                codec_bytes: codec_bytes[i],
                shard: shard[i],
                modality: Modality::ALL[modality[i] as usize],
                split: Split::ALL[split[i] as usize],
            });
        }
        let table = std::sync::Arc::new(codeclm_loader::DocTable {
            root,
            hash,
            bos,
            eos,
            shards,
            docs,
        });
        let inner = codeclm_loader::Loader::new(&table, context, seed, &mix).map_err(loader_err)?;
        Ok(Loader { table, inner })
    }

    /// The next `batch` windows as (inputs, targets), each `batch * context` little-endian
    /// uint16 tokens, row-major.
    fn next_batch_u16<'py>(
        &mut self,
        py: Python<'py>,
        batch: usize,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let (inner, table) = (&mut self.inner, &self.table);
        let (x, y) = py
            .detach(|| inner.next_batch(table, batch))
            .map_err(loader_err)?;
        let bytes = |v: Vec<u32>| PyBytes::new(py, &u16_bytes(v.into_iter().map(|t| t as u16)));
        Ok((bytes(x), bytes(y)))
    }

    /// Hands out only the windows at `start..start + count` of every `period` of the global
    /// stream from here on (a rank's, or a data-loading worker's, share).
    fn set_share(&mut self, period: u64, start: u64, count: u64) -> PyResult<()> {
        self.inner
            .set_share(codeclm_loader::Share {
                period,
                start,
                count,
            })
            .map_err(loader_err)
    }

    /// Moves past the next `n` windows of the global stream without reading them.
    fn skip_windows(&mut self, py: Python<'_>, n: u64) -> PyResult<()> {
        let inner = &mut self.inner;
        py.detach(|| inner.skip_windows(n)).map_err(loader_err)
    }

    /// Everything that decides the rest of the stream, as JSON (what a checkpoint saves).
    fn state_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner.state).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Continues from a state `state_json` gave (here or in another process).
    fn set_state_json(&mut self, json: &str) -> PyResult<()> {
        self.inner.state = serde_json::from_str(json)
            .map_err(|e| PyValueError::new_err(format!("not a loader state: {e}")))?;
        Ok(())
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Loader>()?;
    m.add_function(wrap_pyfunction!(jpeg_splice_tables, m)?)?;
    m.add_function(wrap_pyfunction!(jpeg_strip_tables, m)?)?;
    m.add_function(wrap_pyfunction!(jpeg_tidy, m)?)?;
    m.add_function(wrap_pyfunction!(codec::jpeg_prompt, m)?)?;
    m.add_function(wrap_pyfunction!(codec::jpeg_measure, m)?)?;
    m.add_function(wrap_pyfunction!(codec::h264_prompt, m)?)?;
    m.add_function(wrap_pyfunction!(codec::h264_check_slices, m)?)?;
    m.add_class::<codec::Grammar>()?;
    m.add_class::<codec::GrammarState>()?;
    m.add_class::<Vocab>()?;
    m.add_class::<TokenShard>()?;
    m.add_class::<CodecShard>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
