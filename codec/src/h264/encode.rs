//! Videos to H.264 with the paper's x264 settings, in-process through FFmpeg 5.1 (rsmpeg's
//! bindings), byte-identical to the ffmpeg CLI running the paper's command (Jpeg-LM, Appendix D).
//!
//! The pipeline reproduces what `fftools/ffmpeg.c` (5.1) does for
//! `ffmpeg -i IN -vf "fps=3,scale=...,pad=..." -t 5 -c:v libx264 -pix_fmt yuv420p ... OUT.h264`:
//! - demux with timestamps shifted by the file's start time (`ts_offset = -start_time`);
//! - decode; frame pts = best-effort timestamp; the stream's sample aspect ratio, when set,
//!   overrides the frame's;
//! - one filter graph, configured from the first decoded frame: buffer -> autorotation from the
//!   display matrix -> the `-vf` chain -> `format=yuv420p` -> `trim` (the output `-t`) ->
//!   buffersink, with `flags=bicubic` for every scaler and one thread;
//! - the CLI's constant-frame-rate output sync (`do_video_out`): frames duplicated when video
//!   starts after another stream, no duplication of the initial gap when the file has one stream;
//! - libx264 opened with the colour properties of the first filtered frame and the paper's
//!   options in the command's order; packets concatenated (already Annex B).

use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use rsmpeg::ffi;

use super::nal::strip_x264_sei;
use crate::{Failure, Limits};
use serde::{Deserialize, Serialize};

/// Everything that determines the H.264 bytes produced for one input video.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VideoConfig {
    /// Output frame rate (paper: 3 fps).
    pub fps: u32,
    /// Output frame size; the source is scaled to fit with its aspect kept, then padded
    /// (paper: 256x144).
    pub width: u32,
    pub height: u32,
    /// How much of the source to keep, in milliseconds (paper: the first 5 s -> 15 frames).
    pub duration_ms: u32,
    /// Constant quantiser (paper: 37).
    pub qp: u32,
    /// Keep x264's SEI (its version and options, 557 bytes identical in every stream) in the
    /// stored bytes. Off by default: it carries no picture information, decoded frames are the
    /// same without it, and it would cost every sample ~560 bytes of tokens. On = the exact
    /// bytes the ffmpeg CLI writes.
    pub keep_x264_sei: bool,
    /// Refuse sources above this many pixels per frame (decompression bombs, bogus headers).
    pub max_pixels: u64,
    /// Stop after reading this many packets (all streams) without finishing: a hostile or
    /// broken file cannot make the decode run forever.
    pub max_packets: u64,
    /// Decoder threads per video (1: parallelism comes from decoding many videos at once).
    pub decoder_threads: u32,
}

impl Default for VideoConfig {
    fn default() -> Self {
        VideoConfig {
            fps: 3,
            width: 256,
            height: 144,
            duration_ms: 5000,
            qp: 37,
            keep_x264_sei: false,
            max_pixels: 4096 * 2304,
            max_packets: 100_000,
            decoder_threads: 1,
        }
    }
}

impl VideoConfig {
    /// The paper's `-vf` string for this configuration.
    pub fn filter_string(&self) -> String {
        let (w, h) = (self.width, self.height);
        format!(
            "fps={},scale={w}:{h}:force_original_aspect_ratio=decrease,pad={w}:{h}:(ow-iw)/2:(oh-ih)/2",
            self.fps
        )
    }

    /// The ffmpeg CLI command this configuration reproduces byte for byte (with
    /// `keep_x264_sei`), as arguments after `ffmpeg`.
    pub fn cli_args(&self, input: &Path, output: &Path) -> Vec<String> {
        let t = format!("{}", self.duration_ms as f64 / 1000.0);
        let mut args: Vec<String> = vec![
            "-nostdin".into(),
            "-loglevel".into(),
            "error".into(),
            "-y".into(),
            "-i".into(),
            input.display().to_string(),
            "-vf".into(),
            self.filter_string(),
            "-t".into(),
            t,
            "-c:v".into(),
            "libx264".into(),
            "-pix_fmt".into(),
            "yuv420p".into(),
        ];
        for (k, v) in self.encoder_options() {
            if k == "x264opts" {
                args.extend(["-an".into(), "-sn".into()]);
            }
            args.push(format!("-{k}"));
            args.push(v);
        }
        args.extend([
            "-bsf:v".into(),
            "h264_mp4toannexb".into(),
            output.display().to_string(),
        ]);
        args
    }

    /// libx264's options, in the order of the paper's command line.
    fn encoder_options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("profile:v", "baseline".into()),
            ("qp", self.qp.to_string()),
            ("bf", "0".into()),
            ("x264opts", "slice-max-mbs=1".into()),
            ("trellis", "0".into()),
            ("me_method", "dia".into()),
            ("threads", "1".into()),
            ("subq", "0".into()),
            ("psy", "0".into()),
            ("mixed-refs", "0".into()),
            ("fast-pskip", "0".into()),
            ("partitions", "none".into()),
            ("refs", "3".into()),
        ]
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=120).contains(&self.fps) {
            return Err(format!("--fps {} is outside 1..120", self.fps));
        }
        if !(16..=4096).contains(&self.width) || !(16..=4096).contains(&self.height) {
            return Err(format!(
                "--video-size {}x{} is outside 16..4096 on a side",
                self.width, self.height
            ));
        }
        if self.width % 2 != 0 || self.height % 2 != 0 {
            return Err(format!(
                "--video-size {}x{} must be even on both sides (4:2:0)",
                self.width, self.height
            ));
        }
        if self.duration_ms == 0 {
            return Err("--seconds must be positive".into());
        }
        if self.qp > 51 {
            return Err(format!("--qp {} is outside 0..51", self.qp));
        }
        Ok(())
    }
}

/// A failed video, with the kind of failure (a dataset records it as the sample's status).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct VideoError {
    pub failure: Failure,
    pub message: String,
}

impl VideoError {
    fn new(failure: Failure, message: impl Into<String>) -> VideoError {
        VideoError {
            failure,
            message: message.into(),
        }
    }
}

/// What came out of one encode.
#[derive(Clone, Debug, Default)]
pub struct EncodedVideo {
    /// Annex B H.264 (without x264's SEI unless `keep_x264_sei`).
    pub h264: Vec<u8>,
    /// The source container's short name (`mov,mp4,m4a,3gp,3g2,mj2` -> `mov`), and video codec.
    pub src_format: String,
    pub src_codec: String,
    pub src_width: u32,
    pub src_height: u32,
    /// Source duration in seconds (container, else stream), when known.
    pub src_duration: Option<f64>,
    /// The source stream's average (else guessed) frame rate, when known.
    pub src_fps: Option<f64>,
    /// Frames given to the encoder.
    pub frames: u32,
    /// NAL units in `h264`.
    pub nal_units: u32,
    /// Packets the source decoder rejected (the CLI goes on past them; so do we).
    pub decode_errors: u32,
}

pub(crate) fn err_str(code: i32) -> String {
    let mut buf = [0 as std::os::raw::c_char; 128];
    // SAFETY: av_strerror writes a NUL-terminated string of at most buf.len() bytes.
    unsafe {
        ffi::av_strerror(code, buf.as_mut_ptr(), buf.len());
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
    }
}

pub(crate) const EAGAIN: i32 = ffi::AVERROR(ffi::EAGAIN);

// ---------------------------------------------------------------------------------------------
// Owned FFmpeg objects (freed on drop; every error path below just returns).

/// FFmpeg returned null from an allocation.
pub(crate) fn out_of_memory(what: &str) -> VideoError {
    VideoError::new(Failure::EncodeError, format!("out of memory ({what})"))
}

/// `p`, or the out-of-memory error when FFmpeg's allocation gave null.
pub(crate) fn allocated<T>(p: *mut T, what: &str) -> Result<*mut T, VideoError> {
    if p.is_null() {
        Err(out_of_memory(what))
    } else {
        Ok(p)
    }
}

pub(crate) struct Packet(pub(crate) *mut ffi::AVPacket);
impl Packet {
    pub(crate) fn new() -> Result<Packet, VideoError> {
        // SAFETY: plain allocation, checked.
        allocated(unsafe { ffi::av_packet_alloc() }, "an AVPacket").map(Packet)
    }
}
impl Drop for Packet {
    fn drop(&mut self) {
        // SAFETY: allocated by av_packet_alloc.
        unsafe { ffi::av_packet_free(&mut self.0) }
    }
}

pub(crate) struct Frame(pub(crate) *mut ffi::AVFrame);
impl Frame {
    pub(crate) fn new() -> Result<Frame, VideoError> {
        // SAFETY: plain allocation, checked.
        allocated(unsafe { ffi::av_frame_alloc() }, "an AVFrame").map(Frame)
    }
}
impl Drop for Frame {
    fn drop(&mut self) {
        // SAFETY: allocated by av_frame_alloc.
        unsafe { ffi::av_frame_free(&mut self.0) }
    }
}

pub(crate) struct Codec(pub(crate) *mut ffi::AVCodecContext);
impl Codec {
    pub(crate) fn new(codec: *const ffi::AVCodec) -> Result<Codec, VideoError> {
        // SAFETY: plain allocation (codec may be null: a context without a codec), checked.
        allocated(
            unsafe { ffi::avcodec_alloc_context3(codec) },
            "a codec context",
        )
        .map(Codec)
    }
}
impl Drop for Codec {
    fn drop(&mut self) {
        // SAFETY: allocated by avcodec_alloc_context3.
        unsafe { ffi::avcodec_free_context(&mut self.0) }
    }
}

struct Graph(*mut ffi::AVFilterGraph);
impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: allocated by avfilter_graph_alloc; frees its filters too.
        unsafe { ffi::avfilter_graph_free(&mut self.0) }
    }
}

struct Dict(*mut ffi::AVDictionary);
impl Dict {
    fn set(&mut self, k: &str, v: &str) {
        let (k, v) = (cstring(k), cstring(v));
        // SAFETY: av_dict_set copies key and value.
        unsafe { ffi::av_dict_set(&mut self.0, k.as_ptr(), v.as_ptr(), 0) };
    }
}
impl Drop for Dict {
    fn drop(&mut self) {
        // SAFETY: null or built by av_dict_set.
        unsafe { ffi::av_dict_free(&mut self.0) }
    }
}

pub(crate) fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// The demuxers a source may open (FFmpeg's short names; a demuxer matches when one of its
/// names is here): real video containers and raw video streams. Everything that reads a list
/// of other files or URLs is left out: `hls` and `dash` (playlists), `concat` (`ffconcat`
/// lists), `image2` (numbered file patterns), `tee`, `webm_dash_manifest`, the subtitle and
/// text formats. A file probed as anything else fails as unsupported.
pub const FORMAT_WHITELIST: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,flv,mpegts,mpeg,\
mpegvideo,h264,hevc,m4v,ogg,asf,gif,mxf,ivf,nut,rm,dv,yuv4mpegpipe";

/// An input: a demuxer over our own reader (a file or bytes in memory). FFmpeg never opens
/// anything itself: no protocol is whitelisted and `io_open` (how a demuxer opens another
/// file: playlists, concat lists, MOV references) always refuses.
struct Input {
    fmt: *mut ffi::AVFormatContext,
    avio: *mut ffi::AVIOContext,
    /// Owned through the raw pointer the AVIOContext's callbacks see; freed in Drop.
    reader: *mut Reader,
}

/// What `Input`'s AVIOContext reads: the file or the bytes, and the caller's deadline, checked
/// before every block FFmpeg asks for (interrupting a demuxer stuck in reads).
struct Reader {
    inner: Box<dyn ReadSeek>,
    len: u64,
    deadline: Option<std::time::Instant>,
}

trait ReadSeek: std::io::Read + std::io::Seek {}
impl<T: std::io::Read + std::io::Seek> ReadSeek for T {}

unsafe extern "C" fn reader_read(
    opaque: *mut std::os::raw::c_void,
    buf: *mut u8,
    size: i32,
) -> i32 {
    // SAFETY: opaque is the Reader owned by the Input that owns this AVIOContext; buf has room
    // for `size` bytes.
    let (r, out) = unsafe {
        (
            &mut *(opaque as *mut Reader),
            std::slice::from_raw_parts_mut(buf, size.max(0) as usize),
        )
    };
    if crate::past(r.deadline) {
        return ffi::AVERROR_EXIT;
    }
    loop {
        return match r.inner.read(out) {
            Ok(0) => ffi::AVERROR_EOF,
            Ok(n) => n as i32,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => ffi::AVERROR(ffi::EIO),
        };
    }
}

unsafe extern "C" fn reader_seek(
    opaque: *mut std::os::raw::c_void,
    offset: i64,
    whence: i32,
) -> i64 {
    use std::io::SeekFrom;
    // SAFETY: as in reader_read.
    let r = unsafe { &mut *(opaque as *mut Reader) };
    let to = match whence & !(ffi::AVSEEK_FORCE as i32) {
        w if w == ffi::AVSEEK_SIZE as i32 => return r.len as i64,
        0 if offset >= 0 => SeekFrom::Start(offset as u64), // SEEK_SET
        1 => SeekFrom::Current(offset),                     // SEEK_CUR
        2 => SeekFrom::End(offset),                         // SEEK_END
        _ => return -1,
    };
    r.inner.seek(to).map_or(-1, |p| p as i64)
}

/// The interrupt callback: non-zero once the deadline (behind `opaque`) has passed.
unsafe extern "C" fn interrupt(opaque: *mut std::os::raw::c_void) -> i32 {
    // SAFETY: opaque is the Input's Reader, alive as long as the format context.
    let r = unsafe { &*(opaque as *const Reader) };
    crate::past(r.deadline) as i32
}

/// `AVFormatContext.io_open`: a demuxer asking to open another file or URL is refused.
unsafe extern "C" fn refuse_io_open(
    s: *mut ffi::AVFormatContext,
    _pb: *mut *mut ffi::AVIOContext,
    url: *const std::os::raw::c_char,
    _flags: i32,
    _options: *mut *mut ffi::AVDictionary,
) -> i32 {
    // SAFETY: url is a C string from the demuxer.
    let url = unsafe { CStr::from_ptr(url) }.to_string_lossy();
    tracing::debug!(target: "ffmpeg", "refused to open {url:?} from inside {s:p}");
    ffi::AVERROR(ffi::EPERM)
}

/// The failure of a video stopped at its deadline, saying where.
fn deadline_error(what: &str) -> VideoError {
    VideoError::new(
        Failure::Timeout,
        format!("stopped at the deadline ({what})"),
    )
}

impl Input {
    fn open(src: Source<'_>, cfg: &VideoConfig, limits: &Limits) -> Result<Input, VideoError> {
        let oom = || VideoError::new(Failure::EncodeError, "out of memory");
        let (inner, len, url): (Box<dyn ReadSeek>, u64, CString) = match src {
            Source::Path(p) => {
                let file = std::fs::File::open(p).map_err(|e| {
                    VideoError::new(Failure::ReadError, format!("cannot open the file ({e})"))
                })?;
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                // The path still names the input: probing scores file extensions.
                (Box::new(file), len, cstring(&p.to_string_lossy()))
            }
            Source::Bytes(b) => (
                Box::new(std::io::Cursor::new(b.to_vec())),
                b.len() as u64,
                CString::default(),
            ),
        };
        let mut input = Input {
            fmt: ptr::null_mut(),
            avio: ptr::null_mut(),
            reader: Box::into_raw(Box::new(Reader {
                inner,
                len,
                deadline: limits.deadline,
            })),
        };
        // SAFETY: standard libavformat open sequence with custom IO; every allocation is
        // checked, and Input's Drop releases what was allocated.
        unsafe {
            let size = 32768;
            let buf = ffi::av_malloc(size) as *mut u8;
            if buf.is_null() {
                return Err(oom());
            }
            input.avio = ffi::avio_alloc_context(
                buf,
                size as i32,
                0,
                input.reader as *mut _,
                Some(reader_read),
                None,
                Some(reader_seek),
            );
            if input.avio.is_null() {
                ffi::av_free(buf as *mut _);
                return Err(oom());
            }
            let mut fmt = ffi::avformat_alloc_context();
            if fmt.is_null() {
                return Err(oom());
            }
            (*fmt).pb = input.avio;
            (*fmt).interrupt_callback = ffi::AVIOInterruptCB {
                callback: Some(interrupt),
                opaque: input.reader as *mut _,
            };
            (*fmt).io_open = Some(refuse_io_open);
            let mut opts = Dict(ptr::null_mut());
            opts.set("format_whitelist", FORMAT_WHITELIST);
            // No protocol at all (a name no protocol has): nothing is opened by URL.
            opts.set("protocol_whitelist", "none");
            let ret = ffi::avformat_open_input(&mut fmt, url.as_ptr(), ptr::null(), &mut opts.0);
            if ret < 0 {
                // avformat_open_input freed fmt on failure (not our AVIOContext).
                let (failure, what) = if limits.expired() {
                    return Err(deadline_error("opening the container"));
                } else if ret == ffi::AVERROR_INVALIDDATA {
                    (Failure::Unrecognized, "not a readable video container")
                } else if ret == ffi::AVERROR(ffi::EINVAL) || ret == ffi::AVERROR(ffi::EPERM) {
                    (Failure::Unsupported, "not a video container we read (playlists, file lists and image sequences are refused)")
                } else {
                    (Failure::ReadError, "cannot read the container")
                };
                return Err(VideoError::new(
                    failure,
                    format!("{what} ({})", err_str(ret)),
                ));
            }
            input.fmt = fmt;
            // Stream probing decodes frames too: under the same pixel limit as our decoder.
            let n = (*fmt).nb_streams as usize;
            let mut stream_opts: Vec<Dict> = (0..n).map(|_| Dict(ptr::null_mut())).collect();
            for d in &mut stream_opts {
                d.set("max_pixels", &decoder_max_pixels(cfg).to_string());
            }
            let mut raw: Vec<*mut ffi::AVDictionary> = stream_opts.iter().map(|d| d.0).collect();
            let ret = ffi::avformat_find_stream_info(
                fmt,
                if n == 0 {
                    ptr::null_mut()
                } else {
                    raw.as_mut_ptr()
                },
            );
            // find_stream_info may replace the dictionaries (unused options left in them).
            for (d, r) in stream_opts.iter_mut().zip(raw) {
                d.0 = r;
            }
            if ret < 0 {
                if limits.expired() {
                    return Err(deadline_error("reading the streams"));
                }
                return Err(VideoError::new(
                    Failure::Corrupt,
                    format!("cannot read the streams ({})", err_str(ret)),
                ));
            }
            Ok(input)
        }
    }
}

/// The decoder's own `max_pixels` (FFmpeg refuses larger pictures before allocating them).
fn decoder_max_pixels(cfg: &VideoConfig) -> i64 {
    cfg.max_pixels.min(i32::MAX as u64) as i64
}

impl Drop for Input {
    fn drop(&mut self) {
        // SAFETY: fmt (if opened), the custom AVIOContext and the reader are ours to free, the
        // reader last (the context's callbacks point at it).
        unsafe {
            if !self.fmt.is_null() {
                ffi::avformat_close_input(&mut self.fmt);
            }
            if !self.avio.is_null() {
                ffi::av_freep(&mut (*self.avio).buffer as *mut *mut u8 as *mut _);
                ffi::avio_context_free(&mut self.avio);
            }
            drop(Box::from_raw(self.reader));
        }
    }
}

/// Where a video comes from.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    Path(&'a Path),
    Bytes(&'a [u8]),
}

/// Encodes one video file (path) under `cfg`.
pub fn encode_file(path: &Path, cfg: &VideoConfig) -> Result<EncodedVideo, VideoError> {
    encode(Source::Path(path), cfg, &Limits::default())
}

/// Encodes one video held in memory under `cfg`.
pub fn encode_bytes(bytes: &[u8], cfg: &VideoConfig) -> Result<EncodedVideo, VideoError> {
    if bytes.is_empty() {
        return Err(VideoError::new(Failure::Empty, "zero-byte file"));
    }
    encode(Source::Bytes(bytes), cfg, &Limits::default())
}

/// The ffmpeg CLI's stream choice for a video output: the largest frame area, default
/// disposition as a tie-break bonus, attached pictures (cover art) skipped.
unsafe fn pick_video_stream(fmt: *mut ffi::AVFormatContext) -> Option<usize> {
    let mut best: Option<(usize, i64)> = None;
    // SAFETY: fmt is an opened input; streams has nb_streams entries.
    unsafe {
        for i in 0..(*fmt).nb_streams as usize {
            let st = *(*fmt).streams.add(i);
            let par = (*st).codecpar;
            if (*par).codec_type != ffi::AVMediaType_AVMEDIA_TYPE_VIDEO {
                continue;
            }
            if (*st).disposition & ffi::AV_DISPOSITION_ATTACHED_PIC as i32 != 0 {
                continue;
            }
            let area = (*par).width as i64 * (*par).height as i64
                + if (*st).event_flags & ffi::AVSTREAM_EVENT_FLAG_NEW_PACKETS as i32 != 0 {
                    100_000_000
                } else {
                    0
                }
                + if (*st).disposition & ffi::AV_DISPOSITION_DEFAULT as i32 != 0 {
                    5_000_000
                } else {
                    0
                };
            if best.is_none_or(|(_, a)| area > a) {
                best = Some((i, area));
            }
        }
    }
    best.map(|(i, _)| i)
}

fn rescale(a: i64, from: ffi::AVRational, to: ffi::AVRational) -> i64 {
    // SAFETY: pure arithmetic.
    unsafe { ffi::av_rescale_q(a, from, to) }
}

/// The encoder side: output sync, libx264, collected packets.
struct Output {
    enc: Option<Codec>,
    cfg: VideoConfig,
    /// `VSCFR` (one-stream input: no duplication of an initial gap) or `CFR`.
    vscfr: bool,
    sync_opts: i64,
    frame_number: i64,
    last_frame: Frame,
    last_nb0_frames: [i64; 3],
    last_dropped: bool,
    stopped: bool,
    packet: Packet,
    h264: Vec<u8>,
}

impl Output {
    /// Opens libx264 the way the CLI's `init_output_stream_encode` does, from the sink and the
    /// first filtered frame.
    unsafe fn open(
        &mut self,
        sink: *mut ffi::AVFilterContext,
        frame: *const ffi::AVFrame,
    ) -> Result<(), VideoError> {
        // SAFETY: sink is a configured buffersink; frame a valid filtered frame.
        unsafe {
            let codec = ffi::avcodec_find_encoder_by_name(c"libx264".as_ptr());
            if codec.is_null() {
                return Err(VideoError::new(
                    Failure::EncodeError,
                    "this FFmpeg has no libx264 encoder (install Debian's libavcodec59)",
                ));
            }
            let enc = Codec::new(codec)?;
            let c = enc.0;
            (*c).width = ffi::av_buffersink_get_w(sink);
            (*c).height = ffi::av_buffersink_get_h(sink);
            (*c).sample_aspect_ratio = ffi::av_buffersink_get_sample_aspect_ratio(sink);
            (*c).pix_fmt = ffi::av_buffersink_get_format(sink);
            let mut rate = ffi::av_buffersink_get_frame_rate(sink);
            if rate.num <= 0 || rate.den <= 0 {
                rate = ffi::AVRational {
                    num: self.cfg.fps as i32,
                    den: 1,
                };
            }
            (*c).time_base = ffi::av_inv_q(rate);
            (*c).framerate = rate;
            (*c).color_range = (*frame).color_range;
            (*c).color_primaries = (*frame).color_primaries;
            (*c).color_trc = (*frame).color_trc;
            (*c).colorspace = (*frame).colorspace;
            (*c).chroma_sample_location = (*frame).chroma_location;
            let mut opts = Dict(ptr::null_mut());
            for (k, v) in self.cfg.encoder_options() {
                // The CLI strips the stream specifier (`profile:v` -> `profile`).
                opts.set(k.split(':').next().unwrap_or(k), &v);
            }
            let ret = ffi::avcodec_open2(c, codec, &mut opts.0);
            if ret < 0 {
                return Err(VideoError::new(
                    Failure::EncodeError,
                    format!("libx264 refused the settings ({})", err_str(ret)),
                ));
            }
            self.enc = Some(enc);
            Ok(())
        }
    }

    /// The CLI's `do_video_out` with vsync CFR/VSCFR; `frame` None = end of stream.
    unsafe fn push(
        &mut self,
        sink: *mut ffi::AVFilterContext,
        frame: Option<*mut ffi::AVFrame>,
    ) -> Result<(), VideoError> {
        if self.stopped {
            return Ok(());
        }
        // SAFETY: frames come from the sink and are valid; the encoder is opened on the first.
        unsafe {
            if let Some(f) = frame {
                if self.enc.is_none() {
                    self.open(sink, f)?;
                }
            }
            let Some(enc) = self.enc.as_ref() else {
                return Ok(());
            };
            let enc_ctx = enc.0;
            let tb = (*enc_ctx).time_base;
            let mut nb_frames: i64;
            let mut nb0_frames: i64;
            match frame {
                None => {
                    let mut v = self.last_nb0_frames;
                    v.sort_unstable();
                    nb_frames = v[1];
                    nb0_frames = nb_frames;
                }
                Some(f) => {
                    // adjust_frame_pts_to_encoder_tb
                    let mut sync_ipts = f64::NAN;
                    if (*f).pts != ffi::AV_NOPTS_VALUE {
                        let filter_tb = ffi::av_buffersink_get_time_base(sink);
                        let extra_bits = (29 - ffi::av_log2(tb.den as u32)).clamp(0, 16);
                        let wide = ffi::AVRational {
                            num: tb.num,
                            den: tb.den << extra_bits,
                        };
                        let mut float_pts =
                            rescale((*f).pts, filter_tb, wide) as f64 / (1i64 << extra_bits) as f64;
                        // FFSIGN: +1 only above zero. Nudges off exact midpoints like the CLI.
                        float_pts += if float_pts > 0.0 { 1.0 } else { -1.0 } / (1 << 17) as f64;
                        sync_ipts = float_pts;
                        (*f).pts = rescale((*f).pts, filter_tb, tb);
                    }
                    let rate = ffi::av_buffersink_get_frame_rate(sink);
                    let mut duration = 0.0f64;
                    if rate.num > 0 && rate.den > 0 {
                        duration = 1.0 / (ffi::av_q2d(rate) * ffi::av_q2d(tb));
                    }
                    if sync_ipts.is_nan() {
                        // AV_NOPTS_VALUE as a double: hugely negative.
                        sync_ipts = ffi::AV_NOPTS_VALUE as f64;
                    }
                    let mut delta0 = sync_ipts - self.sync_opts as f64;
                    let mut delta = delta0 + duration;
                    nb0_frames = 0;
                    nb_frames = 1;
                    if delta0 < 0.0 && delta > 0.0 {
                        sync_ipts = self.sync_opts as f64;
                        duration += delta0;
                        delta0 = 0.0;
                    }
                    if self.vscfr && self.frame_number == 0 && delta0 >= 0.5 {
                        delta = duration;
                        delta0 = 0.0;
                        self.sync_opts = sync_ipts.round_ties_even() as i64;
                    }
                    if delta < -1.1 {
                        nb_frames = 0;
                    } else if delta > 1.1 {
                        nb_frames = lrintf(delta);
                        if delta0 > 1.1 {
                            nb0_frames = lrintf(delta0 - 0.6);
                        }
                    }
                }
            }
            nb0_frames = nb0_frames.min(nb_frames);
            self.last_nb0_frames = [nb0_frames, self.last_nb0_frames[0], self.last_nb0_frames[1]];
            self.last_dropped = nb_frames == nb0_frames && frame.is_some();
            for i in 0..nb_frames {
                let pic = if i < nb0_frames && !(*self.last_frame.0).buf[0].is_null() {
                    self.last_frame.0
                } else {
                    match frame {
                        Some(f) => f,
                        None => return Ok(()),
                    }
                };
                (*pic).pts = self.sync_opts;
                // check_recording_time: stop at the output duration.
                if ffi::av_compare_ts(
                    self.sync_opts,
                    tb,
                    self.cfg.duration_ms as i64 * 1000,
                    ffi::AV_TIME_BASE_Q,
                ) >= 0
                {
                    self.stopped = true;
                    return Ok(());
                }
                (*pic).quality = (*enc_ctx).global_quality;
                (*pic).pict_type = ffi::AVPictureType_AV_PICTURE_TYPE_NONE;
                self.encode(Some(pic))?;
                self.sync_opts += 1;
                self.frame_number += 1;
            }
            ffi::av_frame_unref(self.last_frame.0);
            if let Some(f) = frame {
                ffi::av_frame_move_ref(self.last_frame.0, f);
            }
            Ok(())
        }
    }

    unsafe fn encode(&mut self, frame: Option<*mut ffi::AVFrame>) -> Result<(), VideoError> {
        let Some(enc) = self.enc.as_ref() else {
            return Ok(());
        };
        // SAFETY: encoder opened; packet owned by self.
        unsafe {
            let ret = ffi::avcodec_send_frame(enc.0, frame.unwrap_or(ptr::null_mut()));
            if ret < 0 && ret != ffi::AVERROR_EOF {
                return Err(VideoError::new(
                    Failure::EncodeError,
                    format!("libx264 failed ({})", err_str(ret)),
                ));
            }
            loop {
                let ret = ffi::avcodec_receive_packet(enc.0, self.packet.0);
                if ret == EAGAIN || ret == ffi::AVERROR_EOF {
                    return Ok(());
                }
                if ret < 0 {
                    return Err(VideoError::new(
                        Failure::EncodeError,
                        format!("libx264 failed ({})", err_str(ret)),
                    ));
                }
                let p = &*self.packet.0;
                self.h264
                    .extend_from_slice(std::slice::from_raw_parts(p.data, p.size as usize));
                ffi::av_packet_unref(self.packet.0);
            }
        }
    }
}

/// C's `lrintf` (round half to even on the float value).
fn lrintf(x: f64) -> i64 {
    (x as f32).round_ties_even() as i64
}

/// The display-matrix rotation the CLI applies (`get_rotation` in cmdutils).
unsafe fn autorotate_filters(st: *mut ffi::AVStream) -> Vec<String> {
    // SAFETY: st is a stream of an opened input.
    unsafe {
        let m = ffi::av_stream_get_side_data(
            st,
            ffi::AVPacketSideDataType_AV_PKT_DATA_DISPLAYMATRIX,
            ptr::null_mut(),
        ) as *const i32;
        if m.is_null() {
            return Vec::new();
        }
        let mut theta = -(ffi::av_display_rotation_get(m)).round();
        theta -= 360.0 * (theta / 360.0 + 0.9 / 360.0).floor();
        let d = std::slice::from_raw_parts(m, 9);
        let mut out = Vec::new();
        if (theta - 90.0).abs() < 1.0 {
            out.push(if d[3] > 0 {
                "transpose=cclock_flip".into()
            } else {
                "transpose=clock".into()
            });
        } else if (theta - 180.0).abs() < 1.0 {
            if d[0] < 0 {
                out.push("hflip".into());
            }
            if d[4] < 0 {
                out.push("vflip".into());
            }
        } else if (theta - 270.0).abs() < 1.0 {
            out.push(if d[3] < 0 {
                "transpose=clock_flip".into()
            } else {
                "transpose=cclock".into()
            });
        } else if theta.abs() > 1.0 {
            out.push(format!("rotate={theta:.6}*PI/180"));
        } else if d[4] < 0 {
            out.push("vflip".into());
        }
        out
    }
}

/// Encodes one video under `cfg` (see the module doc for what "the CLI's way" covers), within
/// `limits`: past the deadline it stops with [`Failure::Timeout`], past `max_frames` decoded
/// source frames with [`Failure::TooLarge`]. `Limits::default()` bounds nothing.
pub fn encode(
    src: Source<'_>,
    cfg: &VideoConfig,
    limits: &Limits,
) -> Result<EncodedVideo, VideoError> {
    cfg.validate()
        .map_err(|e| VideoError::new(Failure::EncodeError, e))?;
    route_ffmpeg_logs();
    let input = Input::open(src, cfg, limits)?;
    // SAFETY: the whole FFmpeg conversation; objects are owned by guards declared in this scope.
    unsafe { encode_input(&input, cfg, limits) }
}

unsafe fn encode_input(
    input: &Input,
    cfg: &VideoConfig,
    limits: &Limits,
) -> Result<EncodedVideo, VideoError> {
    // SAFETY: see encode().
    unsafe {
        let fmt = input.fmt;
        let mut out = EncodedVideo {
            src_format: CStr::from_ptr((*(*fmt).iformat).name)
                .to_string_lossy()
                .split(',')
                .next()
                .unwrap_or("")
                .to_string(),
            ..EncodedVideo::default()
        };
        if (*fmt).duration != ffi::AV_NOPTS_VALUE && (*fmt).duration > 0 {
            out.src_duration = Some((*fmt).duration as f64 / 1e6);
        }
        let Some(vi) = pick_video_stream(fmt) else {
            let has_audio = (0..(*fmt).nb_streams as usize).any(|i| {
                (*(*(*(*fmt).streams.add(i))).codecpar).codec_type
                    == ffi::AVMediaType_AVMEDIA_TYPE_AUDIO
            });
            return Err(VideoError::new(
                Failure::Unsupported,
                if has_audio {
                    "no video stream (audio only)"
                } else {
                    "no video stream"
                },
            ));
        };
        let st = *(*fmt).streams.add(vi);
        let par = (*st).codecpar;
        out.src_width = (*par).width.max(0) as u32;
        out.src_height = (*par).height.max(0) as u32;
        out.src_codec = CStr::from_ptr(ffi::avcodec_get_name((*par).codec_id))
            .to_string_lossy()
            .into_owned();
        if out.src_duration.is_none() && (*st).duration > 0 {
            out.src_duration = Some((*st).duration as f64 * ffi::av_q2d((*st).time_base));
        }
        let guessed = ffi::av_guess_frame_rate(fmt, st, ptr::null_mut());
        let rate = if (*st).avg_frame_rate.num > 0 && (*st).avg_frame_rate.den > 0 {
            (*st).avg_frame_rate
        } else {
            guessed
        };
        if rate.num > 0 && rate.den > 0 {
            out.src_fps = Some(ffi::av_q2d(rate));
        }
        if out.src_width as u64 * out.src_height as u64 > cfg.max_pixels {
            return Err(VideoError::new(
                Failure::TooLarge,
                format!(
                    "{}x{} is over the {} pixel limit",
                    out.src_width, out.src_height, cfg.max_pixels
                ),
            ));
        }
        let decoder = ffi::avcodec_find_decoder((*par).codec_id);
        if decoder.is_null() {
            return Err(VideoError::new(
                Failure::Unsupported,
                format!("no decoder for the video codec '{}'", out.src_codec),
            ));
        }
        // Set (through the decoder's `opaque`) when FFmpeg refuses a picture over max_pixels.
        let over_limit = AtomicBool::new(false);
        let dec = Codec::new(decoder)?;
        if ffi::avcodec_parameters_to_context(dec.0, par) < 0 {
            return Err(VideoError::new(Failure::Corrupt, "bad codec parameters"));
        }
        (*dec.0).pkt_timebase = (*st).time_base;
        (*dec.0).thread_count = cfg.decoder_threads.max(1) as i32;
        // The container's size is checked above; this catches a bitstream that claims more.
        (*dec.0).max_pixels = decoder_max_pixels(cfg);
        (*dec.0).opaque = &over_limit as *const AtomicBool as *mut _;
        let ret = ffi::avcodec_open2(dec.0, decoder, ptr::null_mut());
        if ret < 0 {
            return Err(VideoError::new(
                Failure::Unsupported,
                format!(
                    "cannot open the '{}' decoder ({})",
                    out.src_codec,
                    err_str(ret)
                ),
            ));
        }

        let ts_offset = if (*fmt).start_time != ffi::AV_NOPTS_VALUE {
            -(*fmt).start_time
        } else {
            0
        };
        let stb = (*st).time_base;
        let mut state = Decode {
            graph: None,
            src: ptr::null_mut(),
            sink: ptr::null_mut(),
            ended: false,
            next_pts_us: ffi::AV_NOPTS_VALUE,
            output: Output {
                enc: None,
                cfg: *cfg,
                vscfr: (*fmt).nb_streams == 1,
                sync_opts: 0,
                frame_number: 0,
                last_frame: Frame::new()?,
                last_nb0_frames: [0; 3],
                last_dropped: false,
                stopped: false,
                packet: Packet::new()?,
                h264: Vec::new(),
            },
            filtered: Frame::new()?,
            stream: st,
            fmt,
            cfg,
            limits,
            decoded: 0,
        };
        let pkt = Packet::new()?;
        let frame = Frame::new()?;
        let mut packets = 0u64;
        let mut read_error = None;
        loop {
            if limits.expired() {
                return Err(deadline_error(&format!("after {packets} packets")));
            }
            let ret = ffi::av_read_frame(fmt, pkt.0);
            if ret < 0 {
                if limits.expired() {
                    return Err(deadline_error(&format!("after {packets} packets")));
                }
                if ret != ffi::AVERROR_EOF {
                    read_error = Some(ret);
                }
                break;
            }
            packets += 1;
            if packets > cfg.max_packets {
                return Err(VideoError::new(
                    Failure::TooLarge,
                    format!(
                        "gave up after {} packets without reaching {} ms of video",
                        cfg.max_packets, cfg.duration_ms
                    ),
                ));
            }
            if (*pkt.0).stream_index as usize != vi {
                ffi::av_packet_unref(pkt.0);
                continue;
            }
            let off = rescale(ts_offset, ffi::AV_TIME_BASE_Q, stb);
            if (*pkt.0).dts != ffi::AV_NOPTS_VALUE {
                (*pkt.0).dts += off;
            }
            if (*pkt.0).pts != ffi::AV_NOPTS_VALUE {
                (*pkt.0).pts += off;
            }
            let pkt_duration = (*pkt.0).duration;
            let r = ffi::avcodec_send_packet(dec.0, pkt.0);
            ffi::av_packet_unref(pkt.0);
            if r < 0 && r != EAGAIN {
                out.decode_errors += 1;
            }
            state.drain_decoder(dec.0, frame.0, pkt_duration, &mut out)?;
            if state.ended {
                break;
            }
        }
        if !state.ended {
            ffi::avcodec_send_packet(dec.0, ptr::null());
            state.drain_decoder(dec.0, frame.0, 0, &mut out)?;
            if state.graph.is_none() {
                if over_limit.load(Ordering::Relaxed) {
                    return Err(VideoError::new(
                        Failure::TooLarge,
                        format!(
                            "the stream's pictures are over the {} pixel limit (the container \
                             declared {}x{})",
                            cfg.max_pixels, out.src_width, out.src_height
                        ),
                    ));
                }
                let why = match read_error {
                    Some(code) => format!("no frame decoded ({})", err_str(code)),
                    None if out.decode_errors > 0 => {
                        format!("no frame decoded ({} packets rejected)", out.decode_errors)
                    }
                    None => "no frame decoded".to_string(),
                };
                let status = if read_error.is_some() || out.decode_errors > 0 {
                    Failure::Corrupt
                } else {
                    Failure::Truncated
                };
                return Err(VideoError::new(status, why));
            }
            // The CLI closes the filter input at the stream's next pts (last frame + duration).
            if !state.ended {
                let pts = if state.next_pts_us == ffi::AV_NOPTS_VALUE {
                    ffi::AV_NOPTS_VALUE
                } else {
                    ffi::av_rescale_q_rnd(
                        state.next_pts_us,
                        ffi::AV_TIME_BASE_Q,
                        stb,
                        ffi::AVRounding_AV_ROUND_NEAR_INF | ffi::AVRounding_AV_ROUND_PASS_MINMAX,
                    )
                };
                ffi::av_buffersrc_close(state.src, pts, ffi::AV_BUFFERSRC_FLAG_PUSH);
                state.pull()?;
            }
        }
        state.output.push(state.sink, None)?;
        state.output.encode(None)?;
        out.frames = state.output.frame_number as u32;
        if out.frames == 0 {
            return Err(VideoError::new(
                Failure::Corrupt,
                "no frame reached the encoder (the video has no decodable picture in range)",
            ));
        }
        let mut h264 = std::mem::take(&mut state.output.h264);
        if !cfg.keep_x264_sei {
            h264 = strip_x264_sei(&h264);
        }
        out.nal_units = super::nal::nal_units(&h264).len() as u32;
        out.h264 = h264;
        if let Some(code) = read_error {
            tracing::debug!("read error after {} frames: {}", out.frames, err_str(code));
        }
        Ok(out)
    }
}

struct Decode<'c> {
    graph: Option<Graph>,
    src: *mut ffi::AVFilterContext,
    sink: *mut ffi::AVFilterContext,
    /// The trim has ended: nothing more to decode.
    ended: bool,
    /// The CLI's `ist->next_pts` (AV_TIME_BASE units): where the input ends.
    next_pts_us: i64,
    output: Output,
    filtered: Frame,
    stream: *mut ffi::AVStream,
    fmt: *mut ffi::AVFormatContext,
    cfg: &'c VideoConfig,
    limits: &'c Limits,
    /// Source frames the decoder returned (bounded by `limits.max_frames`).
    decoded: u64,
}

impl Decode<'_> {
    unsafe fn drain_decoder(
        &mut self,
        dec: *mut ffi::AVCodecContext,
        frame: *mut ffi::AVFrame,
        pkt_duration: i64,
        out: &mut EncodedVideo,
    ) -> Result<(), VideoError> {
        // SAFETY: dec is open; frame owned by the caller.
        unsafe {
            loop {
                let r = ffi::avcodec_receive_frame(dec, frame);
                if r == EAGAIN || r == ffi::AVERROR_EOF {
                    return Ok(());
                }
                if r < 0 {
                    out.decode_errors += 1;
                    return Ok(());
                }
                self.decoded += 1;
                if self.limits.expired() {
                    ffi::av_frame_unref(frame);
                    return Err(deadline_error(&format!("after {} frames", self.decoded)));
                }
                if self.limits.max_frames.is_some_and(|m| self.decoded > m) {
                    ffi::av_frame_unref(frame);
                    return Err(VideoError::new(
                        Failure::TooLarge,
                        format!(
                            "gave up after decoding {} frames without reaching {} ms of video",
                            self.decoded - 1,
                            self.cfg.duration_ms
                        ),
                    ));
                }
                let stb = (*self.stream).time_base;
                let best = (*frame).best_effort_timestamp;
                if best != ffi::AV_NOPTS_VALUE {
                    (*frame).pts = best;
                    self.next_pts_us = rescale(best, stb, ffi::AV_TIME_BASE_Q);
                }
                if self.next_pts_us != ffi::AV_NOPTS_VALUE {
                    let d = (*frame).pkt_duration;
                    if d > 0 {
                        self.next_pts_us += rescale(d, stb, ffi::AV_TIME_BASE_Q);
                    } else if pkt_duration > 0 {
                        self.next_pts_us += rescale(pkt_duration, stb, ffi::AV_TIME_BASE_Q);
                    } else if (*dec).framerate.num > 0 && (*dec).framerate.den > 0 {
                        self.next_pts_us +=
                            1_000_000 * (*dec).framerate.den as i64 / (*dec).framerate.num as i64;
                    }
                }
                let ssar = (*self.stream).sample_aspect_ratio;
                if ssar.num != 0 {
                    (*frame).sample_aspect_ratio = ssar;
                }
                if self.graph.is_none() {
                    self.configure(frame)?;
                } else if ((*frame).width, (*frame).height, (*frame).format) != self.src_par() {
                    return Err(VideoError::new(
                        Failure::Unsupported,
                        "the video changes size or pixel format mid-stream",
                    ));
                }
                if self.ended {
                    ffi::av_frame_unref(frame);
                    return Ok(());
                }
                let r = ffi::av_buffersrc_add_frame_flags(
                    self.src,
                    frame,
                    ffi::AV_BUFFERSRC_FLAG_PUSH as i32,
                );
                ffi::av_frame_unref(frame);
                if r < 0 && r != ffi::AVERROR_EOF {
                    return Err(VideoError::new(
                        Failure::EncodeError,
                        format!("filter graph failed ({})", err_str(r)),
                    ));
                }
                self.pull()?;
                if !self.ended {
                    // Lets the trim signal its end without another frame being pushed.
                    if let Some(g) = &self.graph {
                        ffi::avfilter_graph_request_oldest(g.0);
                    }
                    self.pull()?;
                }
                if self.ended {
                    return Ok(());
                }
            }
        }
    }

    /// Size and pixel format the graph was configured for.
    fn src_par(&self) -> (i32, i32, i32) {
        // SAFETY: src is configured when this is called.
        unsafe {
            let link = *(*self.src).outputs;
            ((*link).w, (*link).h, (*link).format)
        }
    }

    /// Pulls every frame the sink has into the output sync.
    unsafe fn pull(&mut self) -> Result<(), VideoError> {
        // SAFETY: sink configured; filtered frame owned by self.
        unsafe {
            loop {
                let r = ffi::av_buffersink_get_frame_flags(
                    self.sink,
                    self.filtered.0,
                    ffi::AV_BUFFERSINK_FLAG_NO_REQUEST as i32,
                );
                if r == EAGAIN {
                    return Ok(());
                }
                if r == ffi::AVERROR_EOF {
                    self.ended = true;
                    return Ok(());
                }
                if r < 0 {
                    return Err(VideoError::new(
                        Failure::EncodeError,
                        format!("filter graph failed ({})", err_str(r)),
                    ));
                }
                self.output.push(self.sink, Some(self.filtered.0))?;
                ffi::av_frame_unref(self.filtered.0);
            }
        }
    }

    /// The CLI's `configure_filtergraph` for a simple graph, from the first decoded frame.
    unsafe fn configure(&mut self, frame: *const ffi::AVFrame) -> Result<(), VideoError> {
        // SAFETY: standard libavfilter graph construction; the graph guard frees everything.
        unsafe {
            let fail = |what: &str, r: i32| {
                VideoError::new(
                    Failure::EncodeError,
                    format!("filter graph: {what} ({})", err_str(r)),
                )
            };
            let graph = Graph(allocated(ffi::avfilter_graph_alloc(), "a filter graph")?);
            ffi::av_opt_set(graph.0 as *mut _, c"threads".as_ptr(), c"1".as_ptr(), 0);
            (*graph.0).scale_sws_opts =
                allocated(ffi::av_strdup(c"flags=bicubic".as_ptr()), "scaler options")?;
            let st = self.stream;
            let tb = (*st).time_base;
            let mut sar = (*frame).sample_aspect_ratio;
            if sar.den == 0 {
                sar = ffi::AVRational { num: 0, den: 1 };
            }
            let mut args = format!(
                "video_size={}x{}:pix_fmt={}:time_base={}/{}:pixel_aspect={}/{}",
                (*frame).width,
                (*frame).height,
                (*frame).format,
                tb.num,
                tb.den,
                sar.num,
                sar.den
            );
            let fr = ffi::av_guess_frame_rate(self.fmt, st, ptr::null_mut());
            if fr.num != 0 && fr.den != 0 {
                args.push_str(&format!(":frame_rate={}/{}", fr.num, fr.den));
            }
            let args = cstring(&args);
            let mut src = ptr::null_mut();
            let r = ffi::avfilter_graph_create_filter(
                &mut src,
                ffi::avfilter_get_by_name(c"buffer".as_ptr()),
                c"in".as_ptr(),
                args.as_ptr(),
                ptr::null_mut(),
                graph.0,
            );
            if r < 0 {
                return Err(fail("buffer source", r));
            }
            let mut sink = ptr::null_mut();
            let r = ffi::avfilter_graph_create_filter(
                &mut sink,
                ffi::avfilter_get_by_name(c"buffersink".as_ptr()),
                c"out".as_ptr(),
                ptr::null(),
                ptr::null_mut(),
                graph.0,
            );
            if r < 0 {
                return Err(fail("buffer sink", r));
            }
            let mut chain = autorotate_filters(st);
            chain.push(self.cfg.filter_string());
            chain.push("format=yuv420p".into());
            chain.push(format!("trim=duration={}ms", self.cfg.duration_ms));
            let desc = cstring(&chain.join(","));
            let mut outputs = ffi::avfilter_inout_alloc();
            let mut inputs = ffi::avfilter_inout_alloc();
            if outputs.is_null() || inputs.is_null() {
                ffi::avfilter_inout_free(&mut inputs);
                ffi::avfilter_inout_free(&mut outputs);
                return Err(out_of_memory("filter graph ends"));
            }
            (*outputs).name = ffi::av_strdup(c"in".as_ptr());
            (*outputs).filter_ctx = src;
            (*outputs).pad_idx = 0;
            (*outputs).next = ptr::null_mut();
            (*inputs).name = ffi::av_strdup(c"out".as_ptr());
            (*inputs).filter_ctx = sink;
            (*inputs).pad_idx = 0;
            (*inputs).next = ptr::null_mut();
            if (*outputs).name.is_null() || (*inputs).name.is_null() {
                ffi::avfilter_inout_free(&mut inputs);
                ffi::avfilter_inout_free(&mut outputs);
                return Err(out_of_memory("filter graph ends"));
            }
            let r = ffi::avfilter_graph_parse_ptr(
                graph.0,
                desc.as_ptr(),
                &mut inputs,
                &mut outputs,
                ptr::null_mut(),
            );
            ffi::avfilter_inout_free(&mut inputs);
            ffi::avfilter_inout_free(&mut outputs);
            if r < 0 {
                return Err(fail("parse", r));
            }
            let r = ffi::avfilter_graph_config(graph.0, ptr::null_mut());
            if r < 0 {
                return Err(fail("configure", r));
            }
            self.graph = Some(graph);
            self.src = src;
            self.sink = sink;
            Ok(())
        }
    }
}

/// Sends FFmpeg's log lines to `tracing` (target `ffmpeg`) instead of stderr, once per process.
/// Errors and warnings come at `debug`: FFmpeg is noisy on damaged input, and the outcome is
/// already the sample's status and message; `RUST_LOG=ffmpeg=debug` shows them, `trace` adds
/// FFmpeg's info lines (nothing more verbose reaches the callback). Logging never changes an output byte. The callback also
/// notices a picture refused for its size and flags the decoder's `opaque` (see
/// `encode_input`), which is how a too-large stream becomes `TooLarge` rather than `Corrupt`.
pub(crate) fn route_ffmpeg_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sets global settings; the callback is thread-safe.
        unsafe {
            ffi::av_log_set_level(ffi::AV_LOG_INFO as i32);
            ffi::av_log_set_callback(Some(log_to_tracing));
        }
    });
}

/// `av_image_check_size2`'s message for a picture over `max_pixels`.
const OVER_MAX_PIXELS: &[u8] = b"exceeds specified max pixel count";

unsafe extern "C" fn log_to_tracing(
    avcl: *mut std::os::raw::c_void,
    level: i32,
    fmt: *const std::os::raw::c_char,
    vl: *mut ffi::__va_list_tag,
) {
    if fmt.is_null() {
        return;
    }
    // SAFETY: fmt is FFmpeg's format string, avcl null or an object starting with an AVClass.
    unsafe {
        if CStr::from_ptr(fmt)
            .to_bytes()
            .windows(OVER_MAX_PIXELS.len())
            .any(|w| w == OVER_MAX_PIXELS)
        {
            flag_over_limit(avcl);
        }
    }
    let wanted = if level <= ffi::AV_LOG_WARNING as i32 {
        tracing::enabled!(target: "ffmpeg", tracing::Level::DEBUG)
    } else {
        tracing::enabled!(target: "ffmpeg", tracing::Level::TRACE)
    };
    if !wanted {
        return;
    }
    let mut line = [0 as std::os::raw::c_char; 1024];
    let mut print_prefix = 1;
    // SAFETY: formats into our buffer (NUL-terminated, truncated to its size); vl is used once.
    let text = unsafe {
        ffi::av_log_format_line2(
            avcl,
            level,
            fmt,
            vl,
            line.as_mut_ptr(),
            line.len() as i32,
            &mut print_prefix,
        );
        CStr::from_ptr(line.as_ptr()).to_string_lossy()
    };
    let text = text.trim_end();
    if text.is_empty() {
        return;
    }
    if level <= ffi::AV_LOG_ERROR as i32 {
        tracing::debug!(target: "ffmpeg", level = "error", "{text}");
    } else if level <= ffi::AV_LOG_WARNING as i32 {
        tracing::debug!(target: "ffmpeg", level = "warning", "{text}");
    } else {
        tracing::trace!(target: "ffmpeg", "{text}");
    }
}

/// Walks from a log context up its parents (`AVClass::parent_log_context_offset`: the image
/// size check logs through a small object whose parent is the codec context) to one of our
/// decoders, and sets the flag its `opaque` points at. Contexts FFmpeg made itself (stream
/// probing) have a null `opaque` and are left alone.
unsafe fn flag_over_limit(mut ctx: *mut std::os::raw::c_void) {
    // SAFETY: every FFmpeg log context starts with a pointer to its AVClass; a parent offset
    // names a pointer field of the same object.
    unsafe {
        let codec_class = ffi::avcodec_get_class();
        for _ in 0..4 {
            if ctx.is_null() {
                return;
            }
            let class = *(ctx as *const *const ffi::AVClass);
            if class.is_null() {
                return;
            }
            if class == codec_class {
                let flag = (*(ctx as *mut ffi::AVCodecContext)).opaque as *const AtomicBool;
                if !flag.is_null() {
                    (*flag).store(true, Ordering::Relaxed);
                }
                return;
            }
            let offset = (*class).parent_log_context_offset;
            if offset <= 0 {
                return;
            }
            ctx = *((ctx as *const u8).add(offset as usize) as *const *mut std::os::raw::c_void);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_args_are_the_papers_command() {
        let args = VideoConfig::default().cli_args(Path::new("IN"), Path::new("OUT.h264"));
        // The paper's command (Jpeg-LM, Appendix D), after `ffmpeg` (we add -nostdin -loglevel error -y up front).
        let paper = "-i IN -vf fps=3,scale=256:144:force_original_aspect_ratio=decrease,pad=256:144:(ow-iw)/2:(oh-ih)/2 -t 5 -c:v libx264 -pix_fmt yuv420p -profile:v baseline -qp 37 -bf 0 -an -sn -x264opts slice-max-mbs=1 -trellis 0 -me_method dia -threads 1 -subq 0 -psy 0 -mixed-refs 0 -fast-pskip 0 -partitions none -refs 3 -bsf:v h264_mp4toannexb OUT.h264";
        assert_eq!(args[4..].join(" "), paper);
        assert_eq!(args[..4].join(" "), "-nostdin -loglevel error -y");
    }

    #[test]
    fn config_defaults_are_the_papers_and_validate() {
        let c = VideoConfig::default();
        assert_eq!(
            (c.fps, c.width, c.height, c.duration_ms, c.qp),
            (3, 256, 144, 5000, 37)
        );
        assert!(!c.keep_x264_sei && c.validate().is_ok());
        for bad in [
            VideoConfig { fps: 0, ..c },
            VideoConfig { width: 255, ..c },
            VideoConfig { qp: 52, ..c },
            VideoConfig {
                duration_ms: 0,
                ..c
            },
        ] {
            assert!(bad.validate().is_err());
        }
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VideoConfig>(&json).unwrap(), c);
    }

    fn fixture(dir: &str, name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(dir)
            .join(name)
    }

    #[test]
    fn limits_stop_a_video_and_no_limits_change_nothing() {
        let clip = fixture("videos", "carphone_pristine.mp4");
        let cfg = VideoConfig::default();
        let free = encode_file(&clip, &cfg).unwrap();
        let far = Limits {
            deadline: Some(std::time::Instant::now() + std::time::Duration::from_secs(3600)),
            max_frames: Some(1_000_000),
        };
        let bytes = std::fs::read(&clip).unwrap();
        for src in [Source::Path(&clip), Source::Bytes(&bytes)] {
            let watched = encode(src, &cfg, &far).unwrap();
            assert_eq!(watched.h264, free.h264, "limits not reached change no byte");
            let past = Limits::until(std::time::Instant::now());
            let e = encode(src, &cfg, &past).unwrap_err();
            assert_eq!(e.failure, Failure::Timeout, "{e}");
            // 5 s at the source's 30 fps is ~150 decoded frames: 10 is too few.
            let few = Limits {
                max_frames: Some(10),
                ..Limits::default()
            };
            let e = encode(src, &cfg, &few).unwrap_err();
            assert_eq!(e.failure, Failure::TooLarge, "{e}");
        }
    }

    /// Issue 17: a playlist or a concat list saved as `.mp4`, next to a real video it names.
    #[test]
    fn playlists_and_file_lists_never_open_another_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("videos", "bikes.mp4"), dir.path().join("real.mp4")).unwrap();
        let lists = [
            (
                "hls.mp4",
                "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:20\n#EXT-X-MEDIA-SEQUENCE:0\n\
                 #EXTINF:20.0,\nREF\n#EXT-X-ENDLIST\n",
            ),
            ("concat.mp4", "ffconcat version 1.0\nfile REF\n"),
        ];
        let cfg = VideoConfig::default();
        for (name, text) in lists {
            let mut outcomes = Vec::new();
            // The named file exists (a video that encodes) or does not: the same failure.
            for target in ["real.mp4", "missing.mp4"] {
                let path = dir.path().join(name);
                std::fs::write(&path, text.replace("REF", target)).unwrap();
                let e = encode_file(&path, &cfg).unwrap_err();
                assert!(
                    matches!(
                        e.failure,
                        Failure::Unrecognized | Failure::Unsupported | Failure::Corrupt
                    ),
                    "{name} -> {target}: {e}"
                );
                let bytes = std::fs::read(&path).unwrap();
                let from_memory = encode_bytes(&bytes, &cfg).unwrap_err();
                outcomes.push((e.failure, e.message, from_memory.failure));
            }
            assert_eq!(outcomes[0], outcomes[1], "{name}");
        }
        assert!(encode_file(&dir.path().join("real.mp4"), &cfg).is_ok());
    }

    #[test]
    fn a_stream_larger_than_its_container_says_is_too_large() {
        // huge_resolution.mp4 is one 8192x4608 picture; its `avc1` entry is patched to claim
        // 256x144. Stream probing (now under the same pixel limit, so it no longer decodes the
        // picture) still reads the real size from the parameter sets.
        let mut bytes = std::fs::read(fixture("videos-bad", "huge_resolution.mp4")).unwrap();
        // avc1: 6 reserved, 2 data-reference index, 16 pre-defined/reserved, then width, height
        // (the first "avc1" is a brand in `ftyp`).
        let dims = (0..bytes.len() - 32)
            .filter(|&i| &bytes[i..i + 4] == b"avc1")
            .map(|i| i + 4 + 6 + 2 + 16)
            .find(|&d| bytes[d..d + 4] == [0x20, 0x00, 0x12, 0x00])
            .expect("an avc1 sample entry of 8192x4608");
        bytes[dims..dims + 4].copy_from_slice(&[0x01, 0x00, 0x00, 0x90]);
        let e = encode_bytes(&bytes, &VideoConfig::default()).unwrap_err();
        assert_eq!(e.failure, Failure::TooLarge, "{e}");
    }
}
