//! Video: the stored H.264 is byte-identical to the ffmpeg CLI running the paper's command
//! (Jpeg-LM, Appendix D) on every test clip, bad videos become manifest rows, and the public
//! video API (remux, decode) works on real streams.

use std::path::{Path, PathBuf};
use std::process::Command;

use codeclm_codec::h264::nal;
use codeclm_codec::h264::{self as video, VideoConfig};

use crate::common::{fixtures, AllRows};

fn clips() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures("videos"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "md"))
        .collect();
    v.sort();
    assert!(
        v.len() >= 8,
        "expected the bundled and derived clips, got {v:?}"
    );
    v
}

/// The paper's ffmpeg command (Jpeg-LM, Appendix D) on `input`.
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
        assert_eq!(stripped.h264, nal::strip_x264_sei(&cli), "{name}");
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
    let a = codeclm_codec::h264::decode_h264(&plain, 100).unwrap();
    let b = codeclm_codec::h264::decode_h264(&with_sei, 100).unwrap();
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
        codeclm_codec::h264::decode_h264(&plain, 4)
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
    let cut = codeclm_codec::h264::decode_h264(&plain[..plain.len() / 2], 100).unwrap();
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
    let d = codeclm_codec::h264::decode_h264(&damaged, 40).unwrap();
    assert!(d.frames.len() <= 40);
    // Pure garbage, and nothing at all: zero frames, not a panic.
    let noise: Vec<u8> = (0..50_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert!(
        codeclm_codec::h264::decode_h264(&noise, 40)
            .unwrap()
            .frames
            .len()
            <= 40
    );
    assert!(codeclm_codec::h264::decode_h264(&[], 40)
        .unwrap()
        .frames
        .is_empty());
    // Without SPS/PPS nothing decodes.
    let mut no_headers = Vec::new();
    for n in nal::nal_units(&plain) {
        if !matches!(n.nal_type, 7 | 8) {
            no_headers.extend_from_slice(&plain[n.start..n.end]);
        }
    }
    assert!(no_headers.len() < plain.len());
    let d = codeclm_codec::h264::decode_h264(&no_headers, 40).unwrap();
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
    codeclm_codec::h264::annexb_to_mp4(&bikes_h264(&VideoConfig::default()), 3, &mp4).unwrap();
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
    assert!(codeclm_codec::h264::annexb_to_mp4(b"not h264", 3, &bad).is_err());
    assert!(std::fs::read_dir(dir.path()).unwrap().count() == 1);
}

#[test]
fn images_and_videos_in_one_dataset_with_bad_videos_as_rows_and_export_to_mp4() {
    use codeclm_formats::{Dataset, Status};
    let dir = tempfile::tempdir().unwrap();
    // Good and bad videos together in one source (a file list), plus the bundled photos.
    let list = dir.path().join("videos.txt");
    let mut lines = Vec::new();
    for sub in ["videos", "videos-bad"] {
        for e in std::fs::read_dir(fixtures(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "md") {
                lines.push(p.display().to_string());
            }
        }
    }
    lines.sort();
    std::fs::write(&list, lines.join("\n")).unwrap();
    let out = dir.path().join("ds");
    crate::common::run_ok(
        crate::common::codeclm()
            .args(["dataset", "build", "--no-progress", "--images"])
            .arg(fixtures("images"))
            .arg("--videos")
            .arg(&list)
            .arg("--out")
            .arg(&out),
    );
    let ds = Dataset::open(&out).unwrap();
    let status_of = |name: &str| {
        let r = ds
            .rows()
            .into_iter()
            .find(|r| r.source.ends_with(name))
            .unwrap_or_else(|| panic!("no row for {name}"));
        (r.status, r.error.clone().unwrap_or_default())
    };
    for (name, want, says) in [
        ("empty.mp4", Status::Empty, "zero-byte"),
        ("truncated.mp4", Status::Unrecognized, "container"),
        ("corrupt.mp4", Status::Unrecognized, "container"),
        ("random.mp4", Status::Unrecognized, "container"),
        ("audio_only.m4a", Status::Unsupported, "audio only"),
        ("huge_resolution.mp4", Status::TooLarge, "8192x4608"),
        ("unknown_codec.mkv", Status::Unsupported, "no decoder"),
    ] {
        let (status, error) = status_of(name);
        assert_eq!(status, want, "{name}: {error}");
        assert!(error.contains(says), "{name}: {error}");
    }
    let videos: Vec<_> = ds
        .rows()
        .into_iter()
        .filter(|r| r.modality == codeclm_formats::Modality::Video && r.is_ok())
        .collect();
    let images = ds
        .rows()
        .iter()
        .filter(|r| r.modality == codeclm_formats::Modality::Image)
        .count();
    assert_eq!((videos.len(), images), (clips().len(), 10));
    // The stored stream is the encoder's (SEI dropped by default), in an h264 shard, and the
    // manifest's video columns are filled.
    let bikes = videos
        .iter()
        .find(|r| r.source.ends_with("bikes.mp4"))
        .unwrap();
    let direct = bikes_h264(&VideoConfig::default());
    assert_eq!(ds.codec_bytes(bikes).unwrap(), direct);
    assert!(bikes.shard.as_deref().unwrap().contains("-h264-"));
    assert_eq!(bikes.codec.as_deref(), Some("h264"));
    assert_eq!(
        (bikes.frames, bikes.src_codec.as_deref()),
        (Some(15), Some("h264"))
    );
    assert_eq!(bikes.src_duration, Some(10.0));
    assert_eq!(bikes.src_fps, Some(25.0));
    assert_eq!(bikes.nal_units, Some(nal::nal_units(&direct).len() as u32));
    let carphone = videos
        .iter()
        .find(|r| r.source.ends_with("carphone_pristine.mp4"))
        .unwrap();
    assert_eq!(carphone.frames, Some(12), "a 4 s clip gives 4 s of frames");
    // Images rows keep the video columns null.
    assert!(ds
        .rows()
        .iter()
        .filter(|r| r.modality == codeclm_formats::Modality::Image)
        .all(|r| r.frames.is_none()));

    // Export: <id>.h264 (the stored bytes) and a playable <id>.mp4.
    let exp = dir.path().join("export");
    crate::common::run_ok(
        crate::common::codeclm()
            .args(["dataset", "export", "--dataset"])
            .arg(&out)
            .arg("--out")
            .arg(&exp)
            .args(["--ids", &bikes.sample_id]),
    );
    let h264 = std::fs::read(exp.join(format!("{}.h264", bikes.sample_id))).unwrap();
    assert_eq!(h264, direct);
    let probe = ffprobe(&exp.join(format!("{}.mp4", bikes.sample_id)));
    assert!(
        probe.contains("nb_read_frames=15") && probe.contains("width=256"),
        "{probe}"
    );

    // Python polars reads the new columns with the types the contract gives.
    let py = format!(
        "import polars as pl\ndf = pl.read_parquet({:?})\nassert df.schema['frames'] == pl.UInt32 and df.schema['src_duration'] == pl.Float64 and df.schema['nal_units'] == pl.UInt32, df.schema\nv = df.filter(pl.col('modality') == 'video', pl.col('status') == 'ok')\nassert v.height == {} and v['frames'].min() >= 12, v\nassert df.filter(pl.col('modality') == 'image')['frames'].null_count() == 10",
        out.join("samples.parquet").display().to_string(),
        videos.len()
    );
    let st = Command::new("python3").args(["-c", &py]).status().unwrap();
    assert!(st.success(), "polars could not read the video columns");
}

#[test]
fn decoding_is_bounded_by_the_packet_limit() {
    let clip = fixtures("videos").join("bikes.mp4");
    let tight = VideoConfig {
        max_packets: 10,
        ..VideoConfig::default()
    };
    let e = video::encode_file(&clip, &tight).unwrap_err();
    assert_eq!(e.failure, codeclm_codec::Failure::TooLarge);
    assert!(e.message.contains("10 packets"), "{e}");
    // The 5 s are reached long before the end of a 10 s clip: trim ends the decode early,
    // well under the 250 packets of the whole clip suffice.
    let enough = VideoConfig {
        max_packets: 200,
        ..VideoConfig::default()
    };
    assert_eq!(video::encode_file(&clip, &enough).unwrap().frames, 15);
}
