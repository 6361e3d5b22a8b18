//! Run directories. A run holds what Hugging Face reads (`config.json`, `model.safetensors` with
//! HF Llama names, f32) plus what an exact resume needs (`optimizer.safetensors`: AdamW moments;
//! `trainer_state.json`: step, loader position, train config, vocabulary and dataset).
//!
//! A checkpoint is several files, so it is committed through a journal: all files are written
//! to `RUN/.next/` (each atomically), a `COMMIT` marker is written last, then they are renamed
//! into `RUN/` and `.next/` is removed. A run killed while saving is rolled forward (complete
//! journal) or back (incomplete journal) by [`recover`], so a resume never sees a torn set.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::llama::LlamaConfig;
use crate::{Error, Result};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const STATE: &str = "trainer_state.json";
const JOURNAL: &str = ".next";
const COMMIT: &str = "COMMIT";

/// A tensor as the engine holds it on the host: shape and f32 values.
pub type HostTensor = (Vec<usize>, Vec<f32>);

/// Serializes f32 tensors given as (name, shape, values) straight from flat buffers (HF
/// `format: pt` metadata).
pub fn serialize_f32(
    tensors: &[(&str, &[usize], &[f32])],
    extra_metadata: &[(&str, String)],
) -> Result<Vec<u8>> {
    struct F32<'a>(&'a [usize], &'a [f32]);
    impl safetensors::View for &F32<'_> {
        fn dtype(&self) -> safetensors::Dtype {
            safetensors::Dtype::F32
        }
        fn shape(&self) -> &[usize] {
            self.0
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            let mut b = Vec::with_capacity(self.1.len() * 4);
            for v in self.1 {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.into()
        }
        fn data_len(&self) -> usize {
            self.1.len() * 4
        }
    }
    let mut meta: HashMap<String, String> = HashMap::new();
    meta.insert("format".into(), "pt".into());
    for (k, v) in extra_metadata {
        meta.insert(k.to_string(), v.clone());
    }
    let views: Vec<(&str, F32)> = tensors.iter().map(|(n, s, v)| (*n, F32(s, v))).collect();
    // safetensors writes the metadata map in the HashMap's order, which varies by process: the
    // same JSON in sorted order (same length) takes its place, so equal checkpoints are equal
    // bytes. A clone iterates in the original's order.
    let unsorted =
        serde_json::to_string(&meta.clone()).map_err(|e| Error::Config(e.to_string()))?;
    let sorted = serde_json::to_string(&meta.iter().collect::<BTreeMap<_, _>>())
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut bytes = safetensors::serialize(views.iter().map(|(n, v)| (*n, v)), Some(meta))
        .map_err(|e| Error::Config(format!("cannot serialize tensors: {e}")))?;
    let header = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let key = format!("\"__metadata__\":{unsorted}");
    if let Some(at) = bytes[8..8 + header]
        .windows(key.len())
        .position(|w| w == key.as_bytes())
    {
        let start = 8 + at + key.len() - unsorted.len();
        bytes[start..start + sorted.len()].copy_from_slice(sorted.as_bytes());
    }
    Ok(bytes)
}

/// Reads every tensor of a safetensors file as f32 (f32, bf16 and f16 files: HF exports).
pub fn read_f32(path: &Path) -> Result<HashMap<String, HostTensor>> {
    let bad = |problem: String| Error::Checkpoint {
        path: path.to_path_buf(),
        problem,
        fix: "point at a model.safetensors written by `codeclm train` or an HF Llama export".into(),
    };
    let data = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&data)
        .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let b = view.data();
        let values: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(bad(format!(
                    "tensor {name} has dtype {other:?}; f32, bf16 or f16 expected"
                )))
            }
        };
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// Reads `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    recover(dir)?;
    let cfg_path = dir.join(CONFIG);
    let fix = format!(
        "point --run at a directory written by `codeclm train` (or an HF Llama export) that holds {CONFIG} and {WEIGHTS}"
    );
    let bytes = std::fs::read(&cfg_path).map_err(|e| Error::Checkpoint {
        path: cfg_path.clone(),
        problem: format!("cannot read the model config: {e}"),
        fix: fix.clone(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Checkpoint {
        path: cfg_path.clone(),
        problem: format!("not a Llama config.json: {e}"),
        fix,
    })
}

/// Loads `dir`'s weights into an engine model's flat parameters (every name checked against
/// the config's shapes).
pub fn load_params(dir: &Path, config: &LlamaConfig) -> Result<Vec<f32>> {
    let path = dir.join(WEIGHTS);
    let tensors = read_f32(&path)?;
    flat_from(&tensors, config, &path, "")
}

/// Tensors `prefix + name` for every parameter name, in `parameter_shapes` order, as one flat
/// buffer.
pub fn flat_from(
    tensors: &HashMap<String, HostTensor>,
    config: &LlamaConfig,
    path: &Path,
    prefix: &str,
) -> Result<Vec<f32>> {
    let shapes = config.parameter_shapes();
    let bad = |problem: String, fix: &str| Error::Checkpoint {
        path: path.to_path_buf(),
        problem,
        fix: fix.into(),
    };
    let want = shapes.len();
    let have = tensors.keys().filter(|k| k.starts_with(prefix)).count();
    if have != want {
        return Err(bad(
            format!("{have} tensors named {prefix}*, the config implies {want}"),
            "is this a Llama checkpoint without tied embeddings, and is config.json its own?",
        ));
    }
    let mut flat = Vec::with_capacity(config.num_parameters() as usize);
    for (name, shape) in shapes {
        let key = format!("{prefix}{name}");
        let (s, v) = tensors.get(&key).ok_or_else(|| {
            bad(
                format!("no tensor {key}"),
                "the checkpoint is damaged or from another model; start a new run",
            )
        })?;
        if *s != shape {
            return Err(bad(
                format!("tensor {key} has shape {s:?}, the config implies {shape:?}"),
                "config.json does not belong to these weights",
            ));
        }
        flat.extend_from_slice(v);
    }
    Ok(flat)
}

/// The files of one checkpoint, committed together by [`commit`].
#[derive(Default)]
pub struct CheckpointFiles {
    pub files: Vec<(&'static str, Vec<u8>)>,
}

/// Writes `files` into `dir` through the journal (see the module docs).
pub fn commit(dir: &Path, files: &CheckpointFiles) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let journal = dir.join(JOURNAL);
    if journal.exists() {
        std::fs::remove_dir_all(&journal).map_err(Error::io(&journal))?;
    }
    std::fs::create_dir_all(&journal).map_err(Error::io(&journal))?;
    for (name, bytes) in &files.files {
        codeclm_formats::write_atomic(&journal.join(name), bytes)?;
    }
    let names: Vec<&str> = files.files.iter().map(|(n, _)| *n).collect();
    codeclm_formats::write_atomic(&journal.join(COMMIT), names.join("\n").as_bytes())?;
    roll_forward(dir)
}

fn roll_forward(dir: &Path) -> Result<()> {
    let journal = dir.join(JOURNAL);
    let marker = journal.join(COMMIT);
    let names = std::fs::read_to_string(&marker).map_err(Error::io(&marker))?;
    for name in names.lines().filter(|n| !n.is_empty()) {
        let from = journal.join(name);
        if from.exists() {
            std::fs::rename(&from, dir.join(name)).map_err(Error::io(&from))?;
        }
    }
    // The renamed files are durable before the journal that would redo them goes.
    codeclm_formats::sync_dir(dir)?;
    std::fs::remove_dir_all(&journal).map_err(Error::io(&journal))
}

/// Finishes or discards a checkpoint interrupted while being written.
pub fn recover(dir: &Path) -> Result<()> {
    let journal = dir.join(JOURNAL);
    if !journal.exists() {
        return Ok(());
    }
    if journal.join(COMMIT).exists() {
        roll_forward(dir)
    } else {
        std::fs::remove_dir_all(&journal).map_err(Error::io(&journal))
    }
}

/// The HF `config.json` bytes for a model.
pub fn config_json(config: &LlamaConfig, torch_dtype: &str) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(&config.to_hf_json(torch_dtype))
        .map_err(|e| Error::Config(format!("cannot write config.json: {e}")))
}

/// Writes a model-only run directory (config.json + model.safetensors) from flat parameters in
/// `parameter_shapes` order, e.g. for exports and tests.
pub fn save_model(dir: &Path, config: &LlamaConfig, params: &[f32]) -> Result<()> {
    let shapes = config.parameter_shapes();
    let mut at = 0;
    let mut named = Vec::new();
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        named.push((name.as_str(), shape.as_slice(), &params[at..at + n]));
        at += n;
    }
    let files = CheckpointFiles {
        files: vec![
            (CONFIG, config_json(config, "float32")?),
            (WEIGHTS, serialize_f32(&named, &[])?),
        ],
    };
    commit(dir, &files)
}

pub fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal tensors and metadata give equal bytes, whatever order each HashMap iterates in,
    /// and safetensors reads them back.
    #[test]
    fn equal_checkpoints_are_equal_bytes() {
        let w = [1.0f32, -2.5, 3.25, 0.0];
        let meta: Vec<(&str, String)> =
            [("step", "7"), ("zeta", "z"), ("alpha", "a"), ("mid", "m")]
                .iter()
                .map(|(k, v)| (*k, v.to_string()))
                .collect();
        let first = serialize_f32(&[("w", &[2, 2], &w)], &meta).unwrap();
        for _ in 0..20 {
            assert_eq!(serialize_f32(&[("w", &[2, 2], &w)], &meta).unwrap(), first);
        }
        let (_, m) = safetensors::SafeTensors::read_metadata(&first).unwrap();
        let md = m.metadata().as_ref().unwrap();
        assert_eq!(md.get("zeta").map(String::as_str), Some("z"));
        assert_eq!(md.len(), 5, "format, step and the three others");
    }

    #[test]
    fn interrupted_journal_rolls_forward_or_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let files = CheckpointFiles {
            files: vec![(STATE, b"one".to_vec())],
        };
        commit(d, &files).unwrap();
        assert_eq!(std::fs::read(d.join(STATE)).unwrap(), b"one");
        // A journal without COMMIT (killed mid-write) is discarded.
        std::fs::create_dir_all(d.join(JOURNAL)).unwrap();
        std::fs::write(d.join(JOURNAL).join(STATE), b"half").unwrap();
        recover(d).unwrap();
        assert_eq!(std::fs::read(d.join(STATE)).unwrap(), b"one");
        assert!(!d.join(JOURNAL).exists());
        // A complete journal (killed during the renames) is finished.
        std::fs::create_dir_all(d.join(JOURNAL)).unwrap();
        std::fs::write(d.join(JOURNAL).join(STATE), b"two").unwrap();
        std::fs::write(d.join(JOURNAL).join(COMMIT), STATE).unwrap();
        recover(d).unwrap();
        assert_eq!(std::fs::read(d.join(STATE)).unwrap(), b"two");
    }
}
