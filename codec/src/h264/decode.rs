//! Annex B H.264 streams after encoding: split into access units, remux to a playable MP4, and
//! decode back to RGB frames (for export, sampling and evaluation). Garbage in never panics and
//! never yields more than the frames asked for (damaged streams can make the decoder emit many
//! more frames than were encoded: 22-132 from 15 measured with random bytes inside slices).

use std::path::Path;
use std::ptr;

use image::RgbImage;
use rsmpeg::ffi;

use super::encode::{
    allocated, cstring, err_str, route_ffmpeg_logs, Codec, Frame, Packet, VideoError, EAGAIN,
};
use super::nal::nal_units;
use crate::Failure;

/// Frames decoded from an H.264 stream.
#[derive(Clone, Debug, Default)]
pub struct DecodedVideo {
    pub frames: Vec<RgbImage>,
    /// Packets the decoder rejected plus decode calls that failed.
    pub decode_errors: u32,
    /// Frames the decoder flagged as damaged (error-concealed slices or a corrupt picture).
    pub concealed_frames: u32,
}

/// The largest picture [`decode_h264`] decodes: a dataset's frames are at most 4096x4096
/// (`VideoConfig::validate`).
const MAX_PIXELS: i64 = 4096 * 4096;

/// One access unit (one picture's NAL units) found by FFmpeg's H.264 parser.
struct AccessUnit {
    data: Vec<u8>,
    key: bool,
}

struct Parser(*mut ffi::AVCodecParserContext);
impl Drop for Parser {
    fn drop(&mut self) {
        // SAFETY: created by av_parser_init.
        unsafe { ffi::av_parser_close(self.0) }
    }
}

/// Splits an Annex B stream into access units; also returns the coded size seen in the SPS.
fn access_units(h264: &[u8]) -> Result<(Vec<AccessUnit>, (i32, i32)), VideoError> {
    // SAFETY: parser and its codec context are owned by guards; input slices outlive the calls.
    unsafe {
        let parser = Parser(ffi::av_parser_init(ffi::AVCodecID_AV_CODEC_ID_H264 as i32));
        let codec = ffi::avcodec_find_decoder(ffi::AVCodecID_AV_CODEC_ID_H264);
        if parser.0.is_null() || codec.is_null() {
            return Err(VideoError {
                failure: Failure::EncodeError,
                message: "this FFmpeg has no H.264 parser/decoder".into(),
            });
        }
        let ctx = Codec::new(codec)?;
        let mut units = Vec::new();
        let mut size = (0, 0);
        // The parser reads up to AV_INPUT_BUFFER_PADDING_SIZE bytes past the input's end: give
        // it a zero-padded copy, never the caller's slice.
        let pad = ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
        let mut padded = Vec::with_capacity(h264.len() + pad);
        padded.extend_from_slice(h264);
        padded.resize(h264.len() + pad, 0);
        let mut rest = &padded[..h264.len()];
        loop {
            let mut out: *mut u8 = ptr::null_mut();
            let mut out_len = 0i32;
            let flushing = rest.is_empty();
            let used = ffi::av_parser_parse2(
                parser.0,
                ctx.0,
                &mut out,
                &mut out_len,
                if flushing { ptr::null() } else { rest.as_ptr() },
                rest.len().min(i32::MAX as usize) as i32,
                ffi::AV_NOPTS_VALUE,
                ffi::AV_NOPTS_VALUE,
                0,
            );
            if used < 0 {
                break;
            }
            rest = &rest[(used as usize).min(rest.len())..];
            if out_len > 0 {
                units.push(AccessUnit {
                    data: std::slice::from_raw_parts(out, out_len as usize).to_vec(),
                    key: (*parser.0).key_frame == 1,
                });
                if (*parser.0).width > 0 {
                    size = ((*parser.0).width, (*parser.0).height);
                }
            }
            if flushing {
                break;
            }
        }
        Ok((units, size))
    }
}

/// Decodes an Annex B stream to at most `max_frames` RGB frames. Damaged streams decode as far as
/// they can (errors counted, concealed frames flagged); garbage gives zero frames, not a panic.
pub fn decode_h264(h264: &[u8], max_frames: usize) -> Result<DecodedVideo, VideoError> {
    route_ffmpeg_logs();
    let (units, _) = access_units(h264)?;
    let mut out = DecodedVideo::default();
    // SAFETY: decoder, frames, packet and scaler are owned here; data outlives each call.
    unsafe {
        let codec = ffi::avcodec_find_decoder(ffi::AVCodecID_AV_CODEC_ID_H264);
        let dec = Codec::new(codec)?;
        (*dec.0).thread_count = 1;
        // Refused before allocating: a generated SPS can claim any size.
        (*dec.0).max_pixels = MAX_PIXELS;
        let ret = ffi::avcodec_open2(dec.0, codec, ptr::null_mut());
        if ret < 0 {
            return Err(VideoError {
                failure: Failure::EncodeError,
                message: format!("cannot open the H.264 decoder ({})", err_str(ret)),
            });
        }
        let pkt = Packet::new()?;
        let frame = Frame::new()?;
        let mut sws: *mut ffi::SwsContext = ptr::null_mut();
        let mut staging: Vec<u8> = Vec::new();
        let mut receive = |out: &mut DecodedVideo| -> bool {
            loop {
                if out.frames.len() >= max_frames {
                    return false;
                }
                let r = ffi::avcodec_receive_frame(dec.0, frame.0);
                if r == EAGAIN || r == ffi::AVERROR_EOF {
                    return true;
                }
                if r < 0 {
                    out.decode_errors += 1;
                    return true;
                }
                let f = &*frame.0;
                if f.decode_error_flags != 0 || f.flags & ffi::AV_FRAME_FLAG_CORRUPT as i32 != 0 {
                    out.concealed_frames += 1;
                }
                let (w, h) = (f.width, f.height);
                if w <= 0 || h <= 0 || w as i64 * h as i64 > MAX_PIXELS {
                    out.decode_errors += 1;
                    ffi::av_frame_unref(frame.0);
                    continue;
                }
                sws = ffi::sws_getCachedContext(
                    sws,
                    w,
                    h,
                    f.format,
                    w,
                    h,
                    ffi::AVPixelFormat_AV_PIX_FMT_RGB24,
                    ffi::SWS_BICUBIC as i32,
                    ptr::null_mut(),
                    ptr::null_mut(),
                    ptr::null(),
                );
                if sws.is_null() {
                    out.decode_errors += 1;
                    ffi::av_frame_unref(frame.0);
                    continue;
                }
                // swscale's SIMD paths write whole vectors: rows aligned to 64 bytes and a
                // padded end (as av_image_alloc gives), then the pixels copied out compact.
                let row = w as usize * 3;
                let line = row.div_ceil(64) * 64;
                staging.clear();
                staging.resize(line * h as usize + 64, 0);
                let dst = [
                    staging.as_mut_ptr(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                ];
                let stride = [line as i32, 0, 0, 0];
                ffi::sws_scale(
                    sws,
                    f.data.as_ptr() as *const *const u8,
                    f.linesize.as_ptr(),
                    0,
                    h,
                    dst.as_ptr(),
                    stride.as_ptr(),
                );
                let mut rgb = RgbImage::new(w as u32, h as u32);
                for (y, out_row) in rgb.chunks_exact_mut(row).enumerate() {
                    out_row.copy_from_slice(&staging[y * line..y * line + row]);
                }
                out.frames.push(rgb);
                ffi::av_frame_unref(frame.0);
            }
        };
        let mut more = true;
        for au in &units {
            (*pkt.0).data = au.data.as_ptr() as *mut u8;
            (*pkt.0).size = au.data.len() as i32;
            let r = ffi::avcodec_send_packet(dec.0, pkt.0);
            (*pkt.0).data = ptr::null_mut();
            (*pkt.0).size = 0;
            if r < 0 && r != EAGAIN {
                out.decode_errors += 1;
            }
            more = receive(&mut out);
            if !more {
                break;
            }
        }
        if more {
            ffi::avcodec_send_packet(dec.0, ptr::null());
            receive(&mut out);
        }
        ffi::sws_freeContext(sws);
    }
    Ok(out)
}

/// Remuxes an Annex B stream (as stored) into a playable MP4 at `fps`, in-process, written
/// straight to `out` (commit it through a temp file: `codeclm_formats::write_atomic_with`).
pub fn annexb_to_mp4(h264: &[u8], fps: u32, out: &Path) -> Result<(), VideoError> {
    route_ffmpeg_logs();
    let fail = |what: &str, r: i32| VideoError {
        failure: Failure::EncodeError,
        message: format!("{}: {what} ({})", out.display(), err_str(r)),
    };
    let (units, (w, h)) = access_units(h264)?;
    let Some(first) = units.first() else {
        return Err(VideoError {
            failure: Failure::Corrupt,
            message: "no H.264 access unit in the stream".into(),
        });
    };
    // Parameter sets (SPS, PPS) of the first access unit become the MP4's avcC.
    let extradata: Vec<u8> = nal_units(&first.data)
        .iter()
        .filter(|n| matches!(n.nal_type, 7 | 8))
        .flat_map(|n| first.data[n.start..n.end].iter().copied())
        .collect();
    if extradata.is_empty() || w <= 0 || h <= 0 {
        return Err(VideoError {
            failure: Failure::Corrupt,
            message: "the stream does not start with SPS and PPS".into(),
        });
    }
    let out_c = cstring(&out.to_string_lossy());
    // SAFETY: the standard muxing sequence; the context and its AVIO are freed on every path.
    let result = unsafe {
        let mut oc: *mut ffi::AVFormatContext = ptr::null_mut();
        let r = ffi::avformat_alloc_output_context2(
            &mut oc,
            ptr::null(),
            c"mp4".as_ptr(),
            out_c.as_ptr(),
        );
        if r < 0 || oc.is_null() {
            return Err(fail("cannot create the MP4 muxer", r));
        }
        let run = || -> Result<(), VideoError> {
            let st = ffi::avformat_new_stream(oc, ptr::null());
            if st.is_null() {
                return Err(fail("cannot add a stream", -1));
            }
            let par = (*st).codecpar;
            (*par).codec_type = ffi::AVMediaType_AVMEDIA_TYPE_VIDEO;
            (*par).codec_id = ffi::AVCodecID_AV_CODEC_ID_H264;
            (*par).width = w;
            (*par).height = h;
            let ed = allocated(
                ffi::av_mallocz(extradata.len() + ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize)
                    as *mut u8,
                "the MP4's parameter sets",
            )?;
            ptr::copy_nonoverlapping(extradata.as_ptr(), ed, extradata.len());
            (*par).extradata = ed;
            (*par).extradata_size = extradata.len() as i32;
            let tb = ffi::AVRational {
                num: 1,
                den: fps.max(1) as i32,
            };
            (*st).time_base = tb;
            (*st).avg_frame_rate = ffi::av_inv_q(tb);
            let r = ffi::avio_open(&mut (*oc).pb, out_c.as_ptr(), ffi::AVIO_FLAG_WRITE as i32);
            if r < 0 {
                return Err(fail("cannot create the file", r));
            }
            let r = ffi::avformat_write_header(oc, ptr::null_mut());
            if r < 0 {
                return Err(fail("cannot write the MP4 header", r));
            }
            let stb = (*st).time_base;
            let pkt = Packet::new()?;
            for (i, au) in units.iter().enumerate() {
                let r = ffi::av_new_packet(pkt.0, au.data.len() as i32);
                if r < 0 {
                    return Err(fail("out of memory", r));
                }
                ptr::copy_nonoverlapping(au.data.as_ptr(), (*pkt.0).data, au.data.len());
                let ts = ffi::av_rescale_q(i as i64, tb, stb);
                (*pkt.0).pts = ts;
                (*pkt.0).dts = ts;
                (*pkt.0).duration = ffi::av_rescale_q(1, tb, stb);
                (*pkt.0).stream_index = 0;
                if au.key {
                    (*pkt.0).flags |= ffi::AV_PKT_FLAG_KEY as i32;
                }
                let r = ffi::av_write_frame(oc, pkt.0);
                ffi::av_packet_unref(pkt.0);
                if r < 0 {
                    return Err(fail("cannot write a packet", r));
                }
            }
            let r = ffi::av_write_trailer(oc);
            if r < 0 {
                return Err(fail("cannot finish the MP4", r));
            }
            Ok(())
        };
        let result = run();
        if !(*oc).pb.is_null() {
            ffi::avio_closep(&mut (*oc).pb);
        }
        ffi::avformat_free_context(oc);
        result
    };
    if let Err(e) = result {
        let _ = std::fs::remove_file(out);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ffmpeg(args: &[&str]) -> std::process::Output {
        let out = std::process::Command::new("ffmpeg")
            .args(["-nostdin", "-loglevel", "error", "-y"])
            .args(args)
            .output()
            .expect("the ffmpeg CLI (the byte-identity tests need it too)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A width whose RGB rows are not a multiple of swscale's vector width (250 x 3 bytes):
    /// frames decode to exactly their pixels, as the ffmpeg CLI converts them. (swscale writes
    /// whole vectors; into a compact w x 3 x h buffer the last row ran past its end, which
    /// corrupted the heap under fuzzed streams.)
    #[test]
    fn odd_widths_decode_within_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let h264 = dir.path().join("odd.h264");
        let h = h264.to_str().unwrap();
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=250x146:rate=15",
            "-t",
            "0.4",
            "-pix_fmt",
            "yuv420p",
            "-c:v",
            "libx264",
            "-f",
            "h264",
            h,
        ]);
        let data = std::fs::read(&h264).unwrap();
        let decoded = decode_h264(&data, 16).unwrap();
        assert_eq!(decoded.frames.len(), 6);
        let raw = ffmpeg(&[
            "-i",
            h,
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-sws_flags",
            "bicubic",
            "-",
        ])
        .stdout;
        assert_eq!(raw.len(), 6 * 250 * 146 * 3);
        for (f, reference) in decoded.frames.iter().zip(raw.chunks(250 * 146 * 3)) {
            assert_eq!(f.dimensions(), (250, 146));
            let diff: u64 = f
                .as_raw()
                .iter()
                .zip(reference)
                .map(|(&a, &b)| a.abs_diff(b) as u64)
                .sum();
            assert!(
                diff as f64 / reference.len() as f64 <= 1.0,
                "mean |diff| {}",
                diff as f64 / reference.len() as f64
            );
        }
    }

    #[test]
    fn pictures_over_the_pixel_limit_are_refused_before_allocation() {
        // huge_resolution.mp4's 8192x4608 picture as Annex B (what a model could generate: an
        // SPS may claim any size). The decoder's own max_pixels refuses it; before, it was
        // decoded and converted to a 113 MB RGB image.
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/videos-bad/huge_resolution.mp4");
        let out = dir.path().join("huge.h264");
        let status = std::process::Command::new("ffmpeg")
            .args(["-nostdin", "-loglevel", "error", "-y", "-i"])
            .arg(&src)
            .args(["-c:v", "copy", "-bsf:v", "h264_mp4toannexb", "-f", "h264"])
            .arg(&out)
            .status()
            .expect("the ffmpeg CLI (the byte-identity tests need it too)");
        assert!(status.success());
        let h264 = std::fs::read(&out).unwrap();
        let decoded = decode_h264(&h264, 4).unwrap();
        assert!(decoded.frames.is_empty(), "{} frames", decoded.frames.len());
        assert!(decoded.decode_errors > 0);
    }
}
