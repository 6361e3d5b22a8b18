//! The same photos through every source kind give the same codec bytes: a directory, a file
//! list, webdataset tar shards (img2dataset layout) and Hugging Face style Parquet.

use std::collections::BTreeMap;

use crate::common::*;

fn photos() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(fixtures("images"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e != "md"))
        .collect();
    v.sort();
    v
}

/// Bytes keyed by file stem, whatever the source called the sample.
fn by_stem(map: BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    map.into_iter()
        .map(|(k, v)| {
            let key = k.rsplit(['#', '/']).next().unwrap().to_string();
            let stem = key.split('.').next().unwrap().to_string();
            (stem, v)
        })
        .collect()
}

#[test]
fn dir_list_tar_and_parquet_sources_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let photos = photos();
    assert!(photos.len() >= 8);

    build(&fixtures("images"), &t.join("dir"), &[]);
    let from_dir = by_stem(codec_by_source(&t.join("dir")));
    assert_eq!(from_dir.len(), photos.len());

    // File list: absolute paths, a comment and a blank line.
    let list = t.join("list.txt");
    let mut text = String::from("# bundled photos\n\n");
    for p in &photos {
        text.push_str(&format!("{}\n", p.display()));
    }
    std::fs::write(&list, text).unwrap();
    build(&list, &t.join("list"), &[]);
    assert_eq!(by_stem(codec_by_source(&t.join("list"))), from_dir);

    // webdataset: two shards of key.ext + key.json, as img2dataset writes them.
    let shards = t.join("wds");
    assert_eq!(write_wds_shards(&shards, &photos, 5).len(), 2);
    build(&shards, &t.join("tar"), &[]);
    let from_tar = codec_by_source(&t.join("tar"));
    assert!(
        from_tar
            .keys()
            .all(|k| k.starts_with("00000.tar#") || k.starts_with("00001.tar#")),
        "{:?}",
        from_tar.keys()
    );
    assert_eq!(by_stem(from_tar), from_dir);

    // Hugging Face datasets layout: column `image` = struct {bytes, path}, written by Python polars.
    let parquet = t.join("hf.parquet");
    write_hf_parquet(&photos, &parquet, 512);
    build(&parquet, &t.join("pq"), &["--part-size", "4"]);
    let from_pq = codec_by_source(&t.join("pq"));
    // Parquet rows are named file#row; map them back to the photo order.
    let by_row: BTreeMap<String, Vec<u8>> = from_pq
        .into_iter()
        .map(|(k, v)| {
            let row: usize = k.rsplit('#').next().unwrap().parse().unwrap();
            (
                photos[row]
                    .file_stem()
                    .unwrap()
                    .to_string_lossy()
                    .to_string(),
                v,
            )
        })
        .collect();
    assert_eq!(by_row, from_dir);
}

#[test]
fn python_polars_reads_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    build(&fixtures("images"), &ds, &["--val-fraction", "0.3"]);
    // The README's one-liner, then a check of the schema Python sees.
    let script = format!(
        "import polars as pl\ndf = pl.read_parquet({:?})\nassert df.height == 10, df\nassert df.schema['src_width'] == pl.UInt32 and df.schema['checksum'] == pl.UInt64, df.schema\nassert set(df['status']) == {{'ok'}}\nassert df.filter(pl.col('split') == 'val').height >= 1\nprint(df.group_by('split').len().sort('split'))",
        ds.join("samples.parquet").display().to_string()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
