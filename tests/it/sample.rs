//! Sampling's codec side on a real dataset: prompts from files go through the dataset's own
//! settings, decodability of stored, truncated and damaged streams, the paper's cut.

use std::path::Path;

use codeclm_manifests::Dataset;
use codeclm_pipeline::jpeg_scan::{check_scan, FrameLayout, HuffmanTables};
use codeclm_pipeline::prompt;
use codeclm_pipeline::sample;

use crate::common::*;

fn photo_dataset(root: &Path, extra: &[&str]) -> Dataset {
    let ds = root.join("ds");
    build(&fixtures("images"), &ds, extra);
    Dataset::open(&ds).unwrap()
}

#[test]
fn a_prompt_file_is_encoded_exactly_as_the_dataset_encoded_it() {
    let tmp = tempfile::tempdir().unwrap();
    for (sub, extra) in [
        ("a", &[][..]),
        ("b", &["--preprocess", "paper", "--quality", "40"][..]),
    ] {
        let root = tmp.path().join(sub);
        let ds = photo_dataset(&root, extra);
        for row in ds.rows().iter().filter(|r| r.is_ok()) {
            let file = fixtures("images").join(&row.source);
            let (name, stream) = prompt::prompt_stream(&ds, file.to_str().unwrap()).unwrap();
            assert_eq!(name, file.to_str().unwrap());
            assert_eq!(
                stream,
                ds.codec_bytes(row).unwrap(),
                "{} ({sub})",
                row.source
            );
            // And by sample id.
            let (id, stored) = prompt::prompt_stream(&ds, &row.sample_id).unwrap();
            assert_eq!((id, stored), (row.sample_id.clone(), stream));
        }
        let err = prompt::prompt_stream(&ds, "no-such-thing")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-such-thing") && err.contains("sample id"),
            "{err}"
        );
        let bad = fixtures("bad").join("truncated.png");
        assert!(prompt::prompt_stream(&ds, bad.to_str().unwrap()).is_err());
    }
}

/// The decodability measure on real streams with known damage; prints the figures.
#[test]
fn decodability_of_clean_truncated_and_damaged_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = photo_dataset(tmp.path(), &[]);
    let tables = ds.jpeg_tables().unwrap().to_vec();
    let huff = HuffmanTables::from_stream(&tables).unwrap();
    let (mut clean, mut half, mut flipped) = (Vec::new(), Vec::new(), Vec::new());
    for row in ds.rows().iter().filter(|r| r.is_ok()) {
        let full = ds.jpeg_file(row).unwrap();
        let (_, r) = sample::measure_jpeg(&full, &row.sample_id);
        assert!(r.decodes_clean && r.mcu_fraction == 1.0, "{r:?}");
        clean.push(r.mcu_fraction);
        let stored = ds.codec_bytes(row).unwrap();
        let start = FrameLayout::parse(&stored).unwrap().scan_start;
        let cut = start + (stored.len() - start) / 2;
        let tidy = sample::generated_to_jpeg(&stored[..cut], &tables).unwrap();
        let (rgb, r) = sample::measure_jpeg(&tidy, "half");
        assert!(rgb.is_some() && r.decodes && !r.decodes_clean, "{r:?}");
        half.push(r.mcu_fraction);
        // One byte flipped every 1000 bytes of scan data.
        let layout = FrameLayout::parse(&full).unwrap();
        let mut f = full.clone();
        let mut i = layout.scan_start + 500;
        while i + 2 < f.len() {
            if f[i] != 0xFF && f[i - 1] != 0xFF && f[i] ^ 0x24 != 0xFF {
                f[i] ^= 0x24;
            }
            i += 1000;
        }
        let c = check_scan(&f, &layout, &huff).unwrap();
        flipped.push(c.mcu_fraction());
        let (_, r) = sample::measure_jpeg(&f, "flipped");
        // A flip in amplitude bits changes a coefficient, not the code structure: undetectable
        // at this level, so single images may still score 1.0.
        assert!(r.mcu_fraction > 0.8, "{r:?}");
        assert_eq!(r.mcu_fraction, c.mcu_fraction());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!(
        "decodability on {} real streams: clean {:.3}, truncated at half the scan {:.3} (min {:.3}, max {:.3}), a byte flipped per KB {:.3}",
        clean.len(),
        mean(&clean),
        mean(&half),
        half.iter().cloned().fold(1.0, f64::min),
        half.iter().cloned().fold(0.0, f64::max),
        mean(&flipped)
    );
    assert!((0.35..0.65).contains(&mean(&half)), "{half:?}");
    assert!(mean(&flipped) < 1.0, "{flipped:?}");
}
