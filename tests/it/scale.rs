//! `codeclm bench scale` at a small size: the synthetic dataset it writes is a real dataset, and
//! every command it measures succeeds on it.

use crate::common::*;

#[test]
fn bench_scale_runs_every_command_on_its_synthetic_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let out = run_ok(
        codeclm()
            .current_dir(repo())
            .args([
                "bench",
                "scale",
                "--rows",
                "20000",
                "--part-rows",
                "3000",
                "--dir",
            ])
            .arg(&dir),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON line in {stdout}"));
    let results = json["results"].as_array().unwrap();
    let names: Vec<&str> = results
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 7, "{names:?}");
    for r in results {
        assert_eq!(r["ok"], true, "{r}");
        assert!(r["peak_rss_mb"].as_f64().unwrap() > 1.0, "{r}");
    }
    // A real dataset: 20,000 rows in 7 parts, about 0.5% failed, every ok row readable.
    let ds = codeclm_formats::Dataset::open(&dir).unwrap();
    assert_eq!(ds.len(), 20_000);
    let s = ds.summary().unwrap();
    let ok = s.by_status["ok"];
    assert!((19_800..20_000).contains(&ok), "{:?}", s.by_status);
    assert_eq!(ds.parts().unwrap().len(), 7);
    let exported: Vec<_> = std::fs::read_dir(dir.with_extension("out").join("export1"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    assert_eq!(exported.len(), 3);
    for jpeg in exported {
        let opts = codeclm_codec::jpeg::DecodeOptions {
            max_pixels: 1 << 20,
            choose_scale: &|_, _| 1,
            read_exif: false,
            center_square: false,
            deadline: None,
        };
        let img = codeclm_codec::jpeg::decode(&jpeg, &opts).unwrap();
        assert_eq!((img.width, img.height), (16, 16));
    }
}
