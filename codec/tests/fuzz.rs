//! A fuzz harness over the codec's parsers, run as part of `cargo test` (issue 17): real
//! fixture bytes mutated (truncations, bit flips, overwritten and inserted runs, random bytes)
//! through JPEG decode (strict and lenient), marker surgery, the scan parser, the NAL parser and
//! the H.264 decoder. Every input must give a result or an error, never a panic, and results
//! must be self-consistent (pixel buffers of the stated size, offsets inside the data). Case
//! counts are small so the whole file runs in seconds; raise `FUZZ_CASES` for a longer run.

use std::path::Path;
use std::sync::OnceLock;

use codeclm_codec::h264::{self, nal, VideoConfig};
use codeclm_codec::jpeg::{self, scan, DecodeOptions, JpegSettings};
use proptest::prelude::*;

fn fixture(rel: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Cases per property: `FUZZ_CASES` or a CI-sized default.
fn cases(default: u32) -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Small JPEGs of every kind the fixtures have (baseline, progressive, grey, CMYK, 4:4:4, a
/// comment segment) and one encoded the dataset's way (restart interval 1), whole.
fn jpeg_seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut seeds: Vec<Vec<u8>> = [
            "odd/progressive.jpg",
            "odd/gray.jpg",
            "odd/cmyk.jpg",
            "odd/yuv444.jpg",
            "odd/comment.jpg",
            "odd/exif_orient6.jpg",
        ]
        .iter()
        .map(|n| fixture(n))
        .collect();
        let (w, h) = (48u32, 32u32);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        seeds.push(jpeg::encode(&rgb, w, h, &JpegSettings::default(), false).unwrap());
        seeds
    })
}

/// The dataset's streams: Annex B from a real clip (1 s: 3 frames at 256x144).
fn h264_seed() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| {
        let clip = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/videos/carphone_pristine.mp4");
        let cfg = VideoConfig {
            duration_ms: 1000,
            ..VideoConfig::default()
        };
        h264::encode_file(&clip, &cfg).unwrap().h264
    })
}

/// One edit of a seed.
#[derive(Clone, Debug)]
enum Edit {
    /// Keep this fraction (per mille) of the data.
    Truncate(u16),
    FlipBit(u32, u8),
    Overwrite(u32, Vec<u8>),
    Insert(u32, Vec<u8>),
    /// Repeat a run (markers and start codes twice, long runs).
    Duplicate(u32, u16),
}

fn edit() -> impl Strategy<Value = Edit> {
    let bytes = prop::collection::vec(
        prop_oneof![
            Just(0x00u8),
            Just(0x01),
            Just(0xFF),
            Just(0xD8),
            any::<u8>()
        ],
        1..12,
    );
    prop_oneof![
        (0u16..1000).prop_map(Edit::Truncate),
        (any::<u32>(), 0u8..8).prop_map(|(p, b)| Edit::FlipBit(p, b)),
        (any::<u32>(), bytes.clone()).prop_map(|(p, v)| Edit::Overwrite(p, v)),
        (any::<u32>(), bytes).prop_map(|(p, v)| Edit::Insert(p, v)),
        (any::<u32>(), 1u16..600).prop_map(|(p, n)| Edit::Duplicate(p, n)),
    ]
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for e in edits {
        let at = |p: u32, len: usize| if len == 0 { 0 } else { p as usize % len };
        match e {
            Edit::Truncate(k) => d.truncate(d.len() * *k as usize / 1000),
            Edit::FlipBit(p, b) if !d.is_empty() => {
                let i = at(*p, d.len());
                d[i] ^= 1 << b;
            }
            Edit::Overwrite(p, v) if !d.is_empty() => {
                let i = at(*p, d.len());
                for (k, b) in v.iter().enumerate() {
                    if let Some(x) = d.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
            Edit::Insert(p, v) => {
                let i = at(*p, d.len() + 1);
                d.splice(i..i, v.iter().copied());
            }
            Edit::Duplicate(p, n) if !d.is_empty() => {
                let i = at(*p, d.len());
                let run = d[i..(i + *n as usize).min(d.len())].to_vec();
                d.splice(i..i, run);
            }
            _ => {}
        }
    }
    d
}

/// A mutated seed, or (one case in eight) random bytes, optionally behind a JPEG/Annex B start.
fn mutated(seeds: &'static [Vec<u8>]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        7 => (0..seeds.len(), prop::collection::vec(edit(), 1..6))
            .prop_map(move |(i, edits)| apply(&seeds[i], &edits)),
        1 => (prop::collection::vec(any::<u8>(), 0..2048), any::<bool>()).prop_map(|(mut v, jpeg)| {
            let head: &[u8] = if jpeg { &[0xFF, 0xD8, 0xFF] } else { &[0, 0, 0, 1, 0x67] };
            v.splice(0..0, head.iter().copied());
            v
        }),
    ]
}

fn h264_seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| vec![h264_seed().to_vec()])
}

fn check_jpeg(data: &[u8]) {
    let opts = DecodeOptions {
        max_pixels: 1 << 22,
        choose_scale: &|w, _| if w > 64 { 2 } else { 1 },
        read_exif: true,
        center_square: true,
        deadline: None,
    };
    if let Ok(d) = jpeg::decode(data, &opts) {
        assert_eq!(d.rgb.len(), d.width as usize * d.height as usize * 3);
        if let Some((x, y, side)) = d.square {
            assert!(
                x + side <= d.width && y + side <= d.height,
                "{:?}",
                d.square
            );
        }
    }
    if let Ok((d, _)) = jpeg::decode_lenient(data, 1 << 22) {
        assert_eq!(d.rgb.len(), d.width as usize * d.height as usize * 3);
    }
    let _ = jpeg::read_info(data);
    let _ = jpeg::tidy_generated(data);
    if let Ok(abbreviated) = jpeg::strip_tables(data) {
        let _ = jpeg::splice_tables(&abbreviated, data);
    }
    if let Ok(layout) = scan::FrameLayout::parse(data) {
        let _ = layout.total_mcus();
        let _ = layout.total_intervals();
        let mut last = layout.scan_start.min(data.len());
        for iv in scan::intervals(data, layout.scan_start) {
            assert!(last <= iv.start && iv.start <= iv.end && iv.end <= data.len());
            last = iv.end;
        }
        for rows in [0, 1, layout.mcu_rows / 2, layout.mcu_rows] {
            for after in [false, true] {
                if let Ok(cut) = scan::row_cut(data, &layout, rows, after) {
                    assert!(cut <= data.len(), "cut {cut} of {}", data.len());
                }
            }
        }
        if let Ok(tables) = scan::HuffmanTables::from_stream(data) {
            if let Ok(check) = scan::check_scan(data, &layout, &tables) {
                let f = check.mcu_fraction();
                assert!((0.0..=1.0).contains(&f), "fraction {f}");
            }
        }
    }
}

fn check_h264(data: &[u8]) {
    let nals = nal::nal_units(data);
    let mut last_end = 0;
    for n in &nals {
        assert!(last_end <= n.start && n.start <= n.code && n.code + 3 == n.header);
        assert!(
            n.header < data.len() && n.header < n.end && n.end <= data.len(),
            "{n:?}"
        );
        last_end = n.end;
        let unit = &data[n.header..n.end];
        let _ = nal::parse_sps(unit);
        let _ = nal::parse_pps_ids(unit);
        let _ = nal::first_mb_in_slice(data, n);
        let _ = nal::read_ue(&unit[1..]);
    }
    let _ = nal::frame_starts(data, &nals);
    for frames in 0..4 {
        if let Ok(cut) = nal::frame_cut(data, frames) {
            assert!(cut < data.len());
        }
    }
    let _ = nal::strip_x264_sei(data);
    if let Ok(v) = h264::decode_h264(data, 6) {
        assert!(v.frames.len() <= 6);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(1024),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn jpeg_parsers_never_panic(data in mutated(jpeg_seeds())) {
        check_jpeg(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn h264_parsers_and_decoder_never_panic(data in mutated(h264_seeds())) {
        check_h264(&data);
    }
}

/// The unmutated seeds pass the same checks and decode: the harness exercises real paths.
#[test]
fn the_seeds_decode() {
    for s in jpeg_seeds() {
        check_jpeg(s);
        assert!(jpeg::decode_lenient(s, 1 << 22).is_ok());
    }
    let h = h264_seed();
    check_h264(h);
    assert_eq!(h264::decode_h264(h, 6).unwrap().frames.len(), 3);
    assert!(nal::frame_cut(h, 2).is_ok());
}
