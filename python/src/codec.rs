//! The codec tools of `codeclm.jpeg` and `codeclm.h264`: prompts cut the way `codeclm sample`
//! cuts them, the decodability figures it reports, and the grammar masks of constrained
//! sampling, over `codeclm-codec` (mozjpeg built in; no FFmpeg).

use std::sync::Arc;

use codeclm_codec::grammar::TokenGrammar;
use codeclm_codec::h264::{H264Grammar, H264State};
use codeclm_codec::jpeg::{JpegGrammar, JpegSettings, JpegState};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::{u16_bytes, Vocab};

fn value_err(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The prompt of the first `round(ratio * rows)` MCU rows of an abbreviated stream: (BOS +
/// its ids as uint16 bytes, where in the stream it ends, MCU rows kept, MCU rows).
#[pyfunction]
pub fn jpeg_prompt<'py>(
    py: Python<'py>,
    stream: &[u8],
    vocab: &Vocab,
    ratio: f64,
    after_marker: bool,
) -> PyResult<(Bound<'py, PyBytes>, usize, u32, u32)> {
    let (layout, rows, mut cut) =
        codeclm_codec::jpeg::scan::ratio_cut(stream, ratio, after_marker).map_err(value_err)?;
    let v = &vocab.inner;
    let mut ids = vec![v.bos];
    if after_marker {
        v.encode(&stream[..cut], &mut ids);
    } else {
        let mut tokens = Vec::new();
        v.encode(stream, &mut tokens);
        cut = v.token_prefix(&tokens, cut, &mut ids);
    }
    let ids = PyBytes::new(py, &u16_bytes(ids.into_iter().map(|t| t as u16)));
    Ok((ids, cut, rows, layout.mcu_rows))
}

/// The decodability of a complete JPEG (as `codeclm sample` measures each generation): the
/// figures as JSON, and the RGB pixels (width x height x 3) when libjpeg produced any.
#[pyfunction]
pub fn jpeg_measure<'py>(
    py: Python<'py>,
    jpeg: &[u8],
    name: &str,
) -> PyResult<(String, Option<Bound<'py, PyBytes>>)> {
    let (rgb, report) = py.detach(|| codeclm_codec::jpeg::report::measure_jpeg(jpeg, name));
    let json = serde_json::to_string(&report).map_err(value_err)?;
    Ok((json, rgb.map(|p| PyBytes::new(py, &p))))
}

/// The prompt of the first `frames` frames of an Annex B stream: (BOS + ids as uint16 bytes,
/// where it ends, frames in the whole stream).
#[pyfunction]
pub fn h264_prompt<'py>(
    py: Python<'py>,
    stream: &[u8],
    vocab: &Vocab,
    frames: usize,
) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
    use codeclm_codec::h264::nal;
    let total = nal::frame_starts(stream, &nal::nal_units(stream)).len();
    let cut = nal::frame_cut(stream, frames).map_err(PyValueError::new_err)?;
    let v = &vocab.inner;
    let mut tokens = Vec::new();
    v.encode(stream, &mut tokens);
    let mut ids = vec![v.bos];
    let cut = v.token_prefix(&tokens, cut, &mut ids);
    let ids = PyBytes::new(py, &u16_bytes(ids.into_iter().map(|t| t as u16)));
    Ok((ids, cut, total))
}

/// The slice-level check of a stream encoded one macroblock per slice, as JSON.
#[pyfunction]
pub fn h264_check_slices(
    h264: &[u8],
    mbs_per_frame: u32,
    frames_expected: u32,
) -> PyResult<String> {
    let c = codeclm_codec::h264::check::check_slices(h264, mbs_per_frame, frames_expected);
    serde_json::to_string(&c).map_err(value_err)
}

enum Tokens {
    Jpeg(TokenGrammar<JpegGrammar>),
    H264(TokenGrammar<H264Grammar>),
}

#[derive(Clone, Copy)]
enum State {
    Jpeg(JpegState),
    H264(H264State),
}

fn token_bytes(vocab: &Vocab) -> Vec<Vec<u8>> {
    let v = &vocab.inner;
    (0..v.size).map(|id| v.token_bytes(id).to_vec()).collect()
}

/// A dataset's stream grammar over a vocabulary: which ids may follow a sequence, what
/// `codeclm sample --constrain` masks logits with.
#[pyclass(module = "codeclm._native", frozen)]
pub struct Grammar {
    tokens: Arc<Tokens>,
}

#[pymethods]
impl Grammar {
    /// The JPEG grammar of a dataset's images: `size` x `size`, its JPEG settings (the JSON of
    /// `dataset.json`'s `build.image.jpeg`), its tables-only stream.
    #[staticmethod]
    fn jpeg(size: u32, settings_json: &str, tables: &[u8], vocab: &Vocab) -> PyResult<Grammar> {
        let settings: JpegSettings = serde_json::from_str(settings_json)
            .map_err(|e| value_err(format!("not JPEG settings ({e}): {settings_json}")))?;
        let g = JpegGrammar::of_dataset(size, &settings, tables).map_err(value_err)?;
        Ok(Grammar {
            tokens: Arc::new(Tokens::Jpeg(TokenGrammar::new(
                g,
                token_bytes(vocab),
                vocab.inner.eos,
            ))),
        })
    }

    /// The NAL-level H.264 grammar of streams like `streams` (their parameter sets), at most
    /// `max_frames` frames.
    #[staticmethod]
    fn h264(streams: Vec<Vec<u8>>, max_frames: u32, vocab: &Vocab) -> PyResult<Grammar> {
        let g = H264Grammar::from_streams(streams.iter().map(Vec::as_slice), max_frames)
            .map_err(value_err)?;
        Ok(Grammar {
            tokens: Arc::new(Tokens::H264(TokenGrammar::new(
                g,
                token_bytes(vocab),
                vocab.inner.eos,
            ))),
        })
    }

    /// The fixed stream header every sample starts with (JPEG: SOI through SOS); None for
    /// H.264.
    #[getter]
    fn header<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        match &*self.tokens {
            Tokens::Jpeg(t) => Some(PyBytes::new(py, t.grammar().header())),
            Tokens::H264(_) => None,
        }
    }

    /// The state after `ids` (little-endian uint16 bytes; BOS and other special tokens
    /// consume nothing); an error names the byte where they leave the grammar.
    fn state(&self, ids: &[u8]) -> PyResult<GrammarState> {
        let ids: Vec<u32> = ids
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect();
        let broken = |at: usize| {
            PyValueError::new_err(format!(
                "the ids leave the dataset's stream grammar at byte {at}: they are not a prefix of a stream this dataset writes"
            ))
        };
        let state = match &*self.tokens {
            Tokens::Jpeg(t) => State::Jpeg(t.walk(&ids).map_err(broken)?),
            Tokens::H264(t) => State::H264(t.walk(&ids).map_err(broken)?),
        };
        Ok(GrammarState {
            tokens: self.tokens.clone(),
            state,
            broken: false,
        })
    }
}

/// Where one sequence is in a [`Grammar`]: its mask, and the state after one more token.
#[pyclass(module = "codeclm._native")]
pub struct GrammarState {
    tokens: Arc<Tokens>,
    state: State,
    broken: bool,
}

#[pymethods]
impl GrammarState {
    /// One byte per id of the vocabulary: 1 where the id may come next (EOS once the stream
    /// may end), 0 elsewhere.
    fn mask<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        if self.broken {
            return Err(PyValueError::new_err(
                "the state left the grammar (an advance returned False)",
            ));
        }
        let (tokens, state) = (&self.tokens, self.state);
        let allowed = py.detach(|| {
            let mut allowed = match &**tokens {
                Tokens::Jpeg(t) => vec![false; t.vocab_size()],
                Tokens::H264(t) => vec![false; t.vocab_size()],
            };
            match (&**tokens, &state) {
                (Tokens::Jpeg(t), State::Jpeg(s)) => t.mask(s, &mut allowed),
                (Tokens::H264(t), State::H264(s)) => t.mask(s, &mut allowed),
                _ => unreachable!("a state is of its own grammar"),
            };
            allowed.into_iter().map(u8::from).collect::<Vec<u8>>()
        });
        Ok(PyBytes::new(py, &allowed))
    }

    /// Consumes `id`; False (and the state is spent) when the grammar does not allow it.
    fn advance(&mut self, id: u32) -> bool {
        let ok = !self.broken
            && match (&*self.tokens, &mut self.state) {
                (Tokens::Jpeg(t), State::Jpeg(s)) => t.advance(s, id),
                (Tokens::H264(t), State::H264(s)) => t.advance(s, id),
                _ => false,
            };
        self.broken = !ok;
        ok
    }

    /// An independent copy (for beams or branches).
    fn copy(&self) -> GrammarState {
        GrammarState {
            tokens: self.tokens.clone(),
            state: self.state,
            broken: self.broken,
        }
    }
}
