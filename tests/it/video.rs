//! Video: the stored H.264 is byte-identical to the ffmpeg CLI running the paper's command
//! (REFERENCE.md s1, s4) on every test clip, bad videos become manifest rows, and the public
//! video API (remux, decode) works on real streams.

use std::path::{Path, PathBuf};
use std::process::Command;

use codeclm_pipeline::video::{self, VideoConfig};

use crate::common::fixtures;

fn clips() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures("videos"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.extension().is_some_and(|e| e == "md"))
        .collect();
    v.sort();
    assert!(
        v.len() >= 8,
        "expected the bundled and derived clips, got {v:?}"
    );
    v
}

/// The paper's ffmpeg command (REFERENCE.md s1) on `input`.
fn ffmpeg_cli(input: &Path, cfg: &VideoConfig) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.h264");
    let status = Command::new("ffmpeg")
        .args(cfg.cli_args(input, &out))
        .status()
        .expect("the ffmpeg CLI (apt-get install ffmpeg) must be installed for this test");
    assert!(status.success(), "ffmpeg failed on {}", input.display());
    std::fs::read(&out).unwrap()
}

#[test]
fn identical_to_the_ffmpeg_cli_on_every_test_clip() {
    let keep = VideoConfig {
        keep_x264_sei: true,
        ..VideoConfig::default()
    };
    let default = VideoConfig::default();
    let mut failures = Vec::new();
    for clip in clips() {
        let cli = ffmpeg_cli(&clip, &keep);
        let ours = video::encode_file(&clip, &keep).unwrap();
        let name = clip.file_name().unwrap().to_string_lossy().to_string();
        if ours.h264 != cli {
            failures.push(format!(
                "{name}: {} bytes vs the CLI's {} ({} vs ? frames)",
                ours.h264.len(),
                cli.len(),
                ours.frames
            ));
            continue;
        }
        // The default drops exactly x264's SEI: a 557-byte NAL unit after a 3-byte start code.
        let stripped = video::encode_file(&clip, &default).unwrap();
        assert_eq!(stripped.h264, video::strip_x264_sei(&cli), "{name}");
        assert_eq!(cli.len() - stripped.h264.len(), 557 + 3, "{name}");
        assert_eq!(stripped.nal_units + 1, ours.nal_units, "{name}");
        // From memory (the dataset sources hand bytes, not paths): the same stream.
        let from_bytes = video::encode_bytes(&std::fs::read(&clip).unwrap(), &default).unwrap();
        assert_eq!(from_bytes.h264, stripped.h264, "{name} from memory");
        assert!(
            ours.frames >= 12 && ours.frames <= 15,
            "{name}: {} frames",
            ours.frames
        );
    }
    assert!(
        failures.is_empty(),
        "not identical to the CLI:\n{}",
        failures.join("\n")
    );
}

fn bikes_h264(cfg: &VideoConfig) -> Vec<u8> {
    video::encode_file(&fixtures("videos").join("bikes.mp4"), cfg)
        .unwrap()
        .h264
}

#[test]
fn decode_h264_gives_the_encoded_frames_and_the_sei_changes_no_pixel() {
    let plain = bikes_h264(&VideoConfig::default());
    let with_sei = bikes_h264(&VideoConfig {
        keep_x264_sei: true,
        ..VideoConfig::default()
    });
    let a = codeclm_pipeline::decode_h264(&plain, 100).unwrap();
    let b = codeclm_pipeline::decode_h264(&with_sei, 100).unwrap();
    assert_eq!(a.frames.len(), 15);
    assert_eq!((a.decode_errors, a.concealed_frames), (0, 0));
    assert!(a.frames.iter().all(|f| f.dimensions() == (256, 144)));
    assert!(
        a.frames == b.frames,
        "dropping x264's SEI changed decoded pixels"
    );
    // The frames are a real picture, not a flat fill: the middle rows vary.
    let f = &a.frames[7];
    let lumas: Vec<u8> = (0..256).map(|x| f.get_pixel(x, 72).0[1]).collect();
    assert!(lumas.iter().max().unwrap() - lumas.iter().min().unwrap() > 40);
    // max_frames is a hard cap.
    assert_eq!(
        codeclm_pipeline::decode_h264(&plain, 4)
            .unwrap()
            .frames
            .len(),
        4
    );
}

#[test]
fn decode_h264_survives_damage_and_garbage() {
    let plain = bikes_h264(&VideoConfig::default());
    // Truncated: decodes up to the cut.
    let cut = codeclm_pipeline::decode_h264(&plain[..plain.len() / 2], 100).unwrap();
    assert!(
        (5..15).contains(&cut.frames.len()),
        "{} frames",
        cut.frames.len()
    );
    // Garbage in the slices: bounded, no panic.
    let mut damaged = plain.clone();
    let mut x = 0x2545F4914F6CDD1Du64;
    for _ in 0..300 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = 2000 + (x as usize) % (damaged.len() - 2000);
        damaged[i] = (x >> 32) as u8;
    }
    let d = codeclm_pipeline::decode_h264(&damaged, 40).unwrap();
    assert!(d.frames.len() <= 40);
    // Pure garbage, and nothing at all: zero frames, not a panic.
    let noise: Vec<u8> = (0..50_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert!(
        codeclm_pipeline::decode_h264(&noise, 40)
            .unwrap()
            .frames
            .len()
            <= 40
    );
    assert!(codeclm_pipeline::decode_h264(&[], 40)
        .unwrap()
        .frames
        .is_empty());
    // Without SPS/PPS nothing decodes.
    let mut no_headers = Vec::new();
    for (sc, hdr, end) in video::nal_units(&plain) {
        if !matches!(plain[hdr] & 0x1f, 7 | 8) {
            no_headers.extend_from_slice(&plain[sc..end]);
        }
    }
    assert!(no_headers.len() < plain.len());
    let d = codeclm_pipeline::decode_h264(&no_headers, 40).unwrap();
    assert!(
        d.frames.is_empty(),
        "{} frames without SPS/PPS",
        d.frames.len()
    );
}

/// `ffprobe` on a file: codec, size, frame count (decoded), as ffprobe prints them.
fn ffprobe(path: &Path) -> String {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
        ])
        .arg("stream=codec_name,profile,width,height,nb_read_frames,avg_frame_rate")
        .args(["-of", "default=nw=1"])
        .arg(path)
        .output()
        .expect("ffprobe (apt-get install ffmpeg)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn annexb_to_mp4_writes_a_playable_mp4() {
    let dir = tempfile::tempdir().unwrap();
    let mp4 = dir.path().join("bikes.mp4");
    codeclm_pipeline::annexb_to_mp4(&bikes_h264(&VideoConfig::default()), 3, &mp4).unwrap();
    let probe = ffprobe(&mp4);
    for want in [
        "codec_name=h264",
        "profile=Constrained Baseline",
        "width=256",
        "height=144",
        "avg_frame_rate=3/1",
        "nb_read_frames=15",
    ] {
        assert!(probe.contains(want), "{want} not in:\n{probe}");
    }
    // Garbage is an error, and leaves no file behind.
    let bad = dir.path().join("bad.mp4");
    assert!(codeclm_pipeline::annexb_to_mp4(b"not h264", 3, &bad).is_err());
    assert!(std::fs::read_dir(dir.path()).unwrap().count() == 1);
}
