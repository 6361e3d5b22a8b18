//! Grammar-constrained sampling: at every step, only the tokens whose bytes can continue a
//! valid stream of the dataset's format may be drawn, and EOS only once the stream is
//! complete. The grammars are the codec's ([`JpegGrammar`]; H.264's NAL-level one); this
//! module turns one into a [`Constraint`] over a vocabulary, and builds the dataset's grammar
//! from its build settings.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use codeclm_codec::grammar::{ByteGrammar, TokenGrammar};
use codeclm_codec::jpeg::JpegGrammar;
use codeclm_formats::vocab::Vocab;
use codeclm_formats::Dataset;
use codeclm_model::Constraint;
use serde::{Deserialize, Serialize};

use crate::SampleError;

/// Which grammar sampling follows (`--constrain`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Constrain {
    /// The dataset's JPEG streams: fixed header, Huffman-level scan, restart cycle, EOI.
    Jpeg,
    /// The dataset's H.264 streams at the NAL level.
    H264,
    /// No constraint: every token may be drawn at every step (the paper's sampling).
    None,
}

impl Constrain {
    pub fn as_str(self) -> &'static str {
        match self {
            Constrain::Jpeg => "jpeg",
            Constrain::H264 => "h264",
            Constrain::None => "none",
        }
    }
}

/// Time spent masking, shared between a constraint and whoever reports it.
#[derive(Debug, Default)]
pub struct MaskClock {
    nanos: AtomicU64,
    masks: AtomicU64,
}

impl MaskClock {
    /// (seconds spent in masks, masks computed: one per row and step).
    pub fn read(&self) -> (f64, u64) {
        (
            self.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            self.masks.load(Ordering::Relaxed),
        )
    }
}

/// A [`ByteGrammar`] over a vocabulary's tokens, as a [`Constraint`] for generation.
pub struct GrammarConstraint<G: ByteGrammar> {
    tokens: TokenGrammar<G>,
    /// The grammar state of each row of the current batch.
    states: Vec<G::State>,
    allowed: Vec<bool>,
    clock: Arc<MaskClock>,
}

impl<G: ByteGrammar> GrammarConstraint<G> {
    pub fn new(grammar: G, vocab: &Vocab) -> GrammarConstraint<G> {
        let tokens: Vec<Vec<u8>> = (0..vocab.size)
            .map(|id| vocab.token_bytes(id).to_vec())
            .collect();
        GrammarConstraint {
            tokens: TokenGrammar::new(grammar, tokens, vocab.eos),
            states: Vec::new(),
            allowed: Vec::new(),
            clock: Arc::default(),
        }
    }

    /// The clock its masks are timed on.
    pub fn clock(&self) -> Arc<MaskClock> {
        self.clock.clone()
    }

    pub fn grammar(&self) -> &G {
        self.tokens.grammar()
    }

    /// The tokens (ids) `state` allows next, EOS included when the stream is complete.
    pub fn allowed_after(&self, state: &G::State) -> Vec<u32> {
        self.tokens.allowed_after(state)
    }

    /// The state after `ids` (special tokens have no bytes), or the byte where they break the
    /// grammar.
    pub fn walk(&self, ids: &[u32]) -> Result<G::State, usize> {
        self.tokens.walk(ids)
    }
}

impl<G: ByteGrammar> Constraint for GrammarConstraint<G> {
    fn begin(&mut self, prompts: &[Vec<u32>]) -> Result<(), String> {
        self.states.clear();
        for (row, p) in prompts.iter().enumerate() {
            let st = self.walk(p).map_err(|at| {
                format!(
                    "prompt {row} breaks the dataset's stream grammar at byte {at}: it is not a prefix of a stream this dataset writes (sample with --constrain none, or prompt with the dataset's own samples)"
                )
            })?;
            self.states.push(st);
        }
        Ok(())
    }

    fn mask(&mut self, row: usize, logits: &mut [f32]) -> Result<(), String> {
        let started = Instant::now();
        self.allowed.resize(logits.len(), false);
        // EOS when the stream may end here; bytes when it may go on (a complete H.264 stream
        // may take another frame; a JPEG after EOI takes nothing).
        let any = self.tokens.mask(&self.states[row], &mut self.allowed);
        for (l, &ok) in logits.iter_mut().zip(&self.allowed) {
            if !ok {
                *l = f32::NEG_INFINITY;
            }
        }
        self.clock
            .nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.clock.masks.fetch_add(1, Ordering::Relaxed);
        if any {
            Ok(())
        } else {
            Err(format!(
                "row {row}: no token of the vocabulary continues the stream (the vocabulary lacks a byte the grammar needs)"
            ))
        }
    }

    fn advance(&mut self, row: usize, token: u32) {
        let ok = self.tokens.advance(&mut self.states[row], token);
        debug_assert!(ok, "token {token} was not allowed");
    }
}

/// The JPEG grammar of a dataset's images: the header its encoder writes for its size and
/// JPEG settings (a blank image encoded the dataset's way; every stream of the dataset starts
/// with it), and its shared Huffman tables.
pub fn jpeg_grammar(ds: &Dataset) -> Result<JpegGrammar, SampleError> {
    let build = codeclm_etl::BuildSettings::of(ds).map_err(|e| SampleError::Run(e.to_string()))?;
    let cfg = &build.image;
    let tables = ds.jpeg_tables().ok_or_else(|| {
        SampleError::Run(format!(
            "{}: the dataset has no JPEG tables file, so its JPEG grammar is unknown",
            ds.layout.root.display()
        ))
    })?;
    JpegGrammar::of_dataset(cfg.size, &cfg.jpeg, tables)
        .map_err(|e| SampleError::Run(format!("the dataset's JPEG grammar: {e}")))
}

/// Videos whose parameter sets the H.264 grammar learns at most (the first ones of the
/// dataset; a parameter set none of them has is still allowed through a prompt's stream).
pub const GRAMMAR_VIDEOS: usize = 256;

/// The NAL-level H.264 grammar of a dataset's videos: the parameter sets its first
/// [`GRAMMAR_VIDEOS`] videos (and `prompts`) start with (the SPS carries the source's aspect
/// and colour tags, so they differ between sources), slices in order, at most `max_frames`
/// frames.
pub fn h264_grammar(
    ds: &Dataset,
    prompts: &[&[u8]],
    max_frames: u32,
) -> Result<codeclm_codec::h264::H264Grammar, SampleError> {
    let mut streams: Vec<Vec<u8>> = Vec::new();
    let videos = codeclm_formats::RowFilter::ok(codeclm_formats::Modality::Video, None);
    for row in ds.first_rows(videos, GRAMMAR_VIDEOS)? {
        streams.push(ds.codec_bytes(&row)?);
    }
    if streams.is_empty() && prompts.is_empty() {
        return Err(SampleError::Run(format!(
            "{}: the dataset has no videos to learn the H.264 grammar from",
            ds.layout.root.display()
        )));
    }
    codeclm_codec::h264::H264Grammar::from_streams(
        streams
            .iter()
            .map(Vec::as_slice)
            .chain(prompts.iter().copied()),
        max_frames,
    )
    .map_err(|e| SampleError::Run(format!("the dataset's H.264 grammar: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use codeclm_codec::jpeg::scan::HuffmanTables;
    use codeclm_codec::jpeg::{JpegSettings, Subsampling};
    use codeclm_etl::ImageConfig;
    use codeclm_formats::vocab::PreTokenize;
    use codeclm_model::{generate_with, GenerateConfig, LlamaConfig, Lm};

    use crate::image::render_image;

    /// The bundled photos encoded at `size` with `jpeg`, and the tables-only stream.
    fn photos(size: u32, jpeg: JpegSettings) -> (Vec<Vec<u8>>, Vec<u8>) {
        codeclm_etl::test_media::photo_streams_with(&ImageConfig {
            size,
            jpeg,
            ..ImageConfig::default()
        })
    }

    /// The proof that cannot be faked: a model with untrained weights, sampling as
    /// `codeclm sample` does (top-k 50, top-p 0.9), writes only images that libjpeg decodes
    /// with no warning, at the dataset's size, for every layout and vocabulary size.
    #[test]
    fn untrained_models_sample_only_clean_images_under_the_grammar() {
        for sub in [Subsampling::S420, Subsampling::S444] {
            for ri in [1u16, 4] {
                for size in [64u32, 256] {
                    let jpeg = JpegSettings {
                        subsampling: sub,
                        restart_interval: ri,
                        ..JpegSettings::default()
                    };
                    let (streams, tables) = photos(size, jpeg);
                    let ht = HuffmanTables::from_stream(&tables).unwrap();
                    let grammar = JpegGrammar::new(&streams[0], &ht).unwrap();
                    // The dataset's header is the same in every stream.
                    for s in &streams {
                        assert!(s.starts_with(grammar.header()));
                    }
                    for vocab_size in [320, 1024] {
                        let json = codeclm_etl::tokenize::train_on_streams(
                            &streams,
                            vocab_size,
                            PreTokenize::RestartMarkers,
                        )
                        .unwrap();
                        let vocab =
                            Vocab::from_json(&json, std::path::Path::new("v.json")).unwrap();
                        assert!(vocab.size as usize > vocab_size - 40, "{}", vocab.size);
                        let mut cfg = LlamaConfig::preset("tiny", vocab.size as usize).unwrap();
                        cfg.hidden_size = 32;
                        cfg.intermediate_size = 64;
                        cfg.num_hidden_layers = 1;
                        cfg.num_attention_heads = 2;
                        cfg.num_key_value_heads = Some(1);
                        cfg.max_position_embeddings = 64;
                        let mut lm = Lm::random(cfg, size as u64 + ri as u64).unwrap();
                        let mut c = GrammarConstraint::new(grammar.clone(), &vocab);
                        let n = if size == 256 { 2 } else { 4 };
                        let gen = GenerateConfig {
                            max_new_tokens: 1 << 20,
                            temperature: 1.0,
                            top_k: Some(50),
                            top_p: Some(0.9),
                            seed: vocab_size as u64,
                            eos_token_id: Some(vocab.eos),
                            pad_token_id: vocab.bos,
                            window: Some(64),
                        };
                        let prompts = vec![vec![vocab.bos]; n];
                        let out = generate_with(&mut lm, &prompts, &gen, Some(&mut c)).unwrap();
                        for (i, new) in out.iter().enumerate() {
                            let mut ids = vec![vocab.bos];
                            ids.extend_from_slice(new);
                            let what = format!("{size} {sub:?} ri {ri} vocab {} #{i}", vocab.size);
                            let g = render_image(
                                &what,
                                &vocab,
                                &ids,
                                new.len(),
                                &tables,
                                Some(grammar.header()),
                            );
                            let r = &g.report;
                            assert!(r.ended_with_eos, "{what}: {r:?}");
                            assert!(r.header_ok && r.decodes_clean, "{what}: {r:?}");
                            assert_eq!(r.decoder_warnings, 0, "{what}");
                            assert_eq!((r.width, r.height), (size, size), "{what}");
                            assert_eq!(r.mcu_fraction, 1.0, "{what}");
                        }
                        let (secs, masks) = c.clock().read();
                        eprintln!(
                            "{size} {sub:?} ri {ri} vocab {}: {:.0} tokens per image, {:.1} us per mask",
                            vocab.size,
                            out.iter().map(Vec::len).sum::<usize>() as f64 / n as f64,
                            1e6 * secs / masks as f64
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn prompts_are_walked_and_bad_prompts_refused() {
        let (streams, tables) = photos(64, JpegSettings::default());
        let ht = HuffmanTables::from_stream(&tables).unwrap();
        let grammar = JpegGrammar::new(&streams[0], &ht).unwrap();
        let json =
            codeclm_etl::tokenize::train_on_streams(&streams, 320, PreTokenize::RestartMarkers)
                .unwrap();
        let vocab = Vocab::from_json(&json, std::path::Path::new("v.json")).unwrap();
        let mut c = GrammarConstraint::new(grammar, &vocab);
        let mut ids = vec![vocab.bos];
        vocab.encode(&streams[1], &mut ids);
        // A whole real stream: complete, so only EOS may follow.
        let st = c.walk(&ids).unwrap();
        assert_eq!(c.allowed_after(&st), vec![vocab.eos]);
        // Half of it: a prefix; the next real token is among those allowed.
        let half = ids.len() / 2;
        let st = c.walk(&ids[..half]).unwrap();
        assert!(c.allowed_after(&st).contains(&ids[half]));
        c.begin(&[ids[..half].to_vec()]).unwrap();
        let mut logits = vec![0f32; vocab.size as usize + 7];
        c.mask(0, &mut logits).unwrap();
        assert!(logits[ids[half] as usize].is_finite());
        assert!(logits[vocab.size as usize..]
            .iter()
            .all(|l| *l == f32::NEG_INFINITY));
        assert_eq!(logits[vocab.eos as usize], f32::NEG_INFINITY);
        // Another dataset's stream (another size) breaks the grammar in its header.
        let (other, _) = photos(256, JpegSettings::default());
        let mut bad = vec![vocab.bos];
        vocab.encode(&other[0][..40], &mut bad);
        let err = c.begin(&[bad]).unwrap_err();
        assert!(
            err.contains("prompt 0 breaks the dataset's stream grammar"),
            "{err}"
        );
    }
}
