//! JPEG encode and decode through mozjpeg's libjpeg API, configured to be byte-identical to
//! Pillow 13 (libjpeg-turbo 3.2): measured identical on 35 of 35 test images and a quality sweep. The high-level `mozjpeg` crate cannot set the
//! restart interval or suppress tables and forces `force_baseline = false`, so this talks to
//! `mozjpeg-sys` directly.
//!
//! libjpeg reports fatal errors through `error_exit`, which must not return. Ours unwinds with
//! `resume_unwind` (no panic hook, nothing printed), the C library is built with unwinding
//! support (`mozjpeg-sys/unwinding`), and every entry point catches it and turns it into a
//! [`JpegError`] after destroying the libjpeg object. Warnings are counted, not printed; a
//! premature end of data (libjpeg pads with grey and carries on) is reported as truncation,
//! as Pillow does. A deadline ([`DecodeOptions::deadline`]) is checked by libjpeg's progress
//! monitor, which unwinds the same way.
//!
//! Everything libjpeg reaches through a pointer (the codec object, the error manager, the
//! progress monitor, our `Messages` behind `client_data`, the output buffer) lives in one heap
//! block owned through a raw pointer and freed in `Drop`: Rust never holds a `Box` or `&mut` to
//! what C may write through `client_data`, and the encoder writes into a `Vec` of its own
//! (a destination manager) instead of libjpeg's `malloc`ed memory destination, so no path can
//! free the output twice or leak it.

use std::ffi::{c_int, c_ulong, c_void};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr::addr_of_mut;
use std::time::Instant;

use mozjpeg_sys::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JpegError {
    #[error("JPEG data ends early ({0})")]
    Truncated(String),
    #[error("corrupt JPEG: {0}")]
    Corrupt(String),
    #[error("JPEG of {width}x{height} pixels exceeds the limit of {limit} pixels")]
    TooLarge { width: u32, height: u32, limit: u64 },
    #[error("unsupported JPEG: {0}")]
    Unsupported(String),
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error("JPEG decode stopped at the deadline ({0})")]
    Timeout(String),
}

/// Chroma subsampling of the encoded stream (the paper: 4:2:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Subsampling {
    #[serde(rename = "4:2:0")]
    #[default]
    S420,
    #[serde(rename = "4:2:2")]
    S422,
    #[serde(rename = "4:4:4")]
    S444,
}

impl Subsampling {
    pub fn parse(s: &str) -> Option<Subsampling> {
        match s {
            "4:2:0" | "420" => Some(Subsampling::S420),
            "4:2:2" | "422" => Some(Subsampling::S422),
            "4:4:4" | "444" => Some(Subsampling::S444),
            _ => None,
        }
    }

    /// Luma (h, v) sampling factors; chroma is always 1x1.
    fn luma_factors(self) -> (c_int, c_int) {
        match self {
            Subsampling::S420 => (2, 2),
            Subsampling::S422 => (2, 1),
            Subsampling::S444 => (1, 1),
        }
    }

    /// MCU size in pixels (width, height).
    pub fn mcu_size(self) -> (u32, u32) {
        let (h, v) = self.luma_factors();
        (8 * h as u32, 8 * v as u32)
    }
}

/// The encoder's settings; the defaults are the paper's (Jpeg-LM, Appendix D).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JpegSettings {
    /// libjpeg quality 1-100 (paper: 25).
    pub quality: u8,
    /// Chroma subsampling (paper: 4:2:0).
    pub subsampling: Subsampling,
    /// A restart marker after every N MCUs (paper: 1), so MCUs tokenize independently.
    pub restart_interval: u16,
}

impl Default for JpegSettings {
    fn default() -> Self {
        JpegSettings {
            quality: 25,
            subsampling: Subsampling::S420,
            restart_interval: 1,
        }
    }
}

/// What libjpeg said while working: the fatal message, and the warnings it would have printed.
#[derive(Default)]
struct Messages {
    warnings: u32,
    first_warning: Option<String>,
    premature_eof: bool,
    /// A warning that means the entropy-coded data is damaged (the picture is partly garbage).
    damaged: bool,
    /// libjpeg skipped bytes that are not markers where a marker should be, before the data ended.
    extraneous: bool,
    /// The progress monitor gives up once this has passed.
    deadline: Option<Instant>,
}

/// `LibjpegFatal::code` of the deadline (libjpeg's own codes are all positive).
const DEADLINE_PASSED: c_int = -1;

/// Payload carried by the unwind out of `error_exit`.
struct LibjpegFatal {
    code: c_int,
    message: String,
}

unsafe fn format_message(cinfo: &mut jpeg_common_struct) -> String {
    let err = &*cinfo.err;
    let mut buf = [0u8; 200];
    if let Some(f) = err.format_message {
        // The binding declares the buffer as `&[u8; 80]` but libjpeg writes into it: pass a
        // pointer to our (larger, mutable) buffer through a correctly typed signature.
        let f: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8) =
            std::mem::transmute(f);
        f(cinfo, buf.as_mut_ptr());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    let code = (*cinfo.err).msg_code;
    let message = format_message(cinfo);
    resume_unwind(Box::new(LibjpegFatal { code, message }));
}

/// libjpeg's progress hook (every call of `jpeg_read_scanlines`, every iMCU row of a
/// multi-scan image's input pass): past the deadline, a fatal error like any other.
unsafe extern "C-unwind" fn check_deadline(cinfo: &mut jpeg_common_struct) {
    let deadline = (*(cinfo.client_data as *const Messages)).deadline;
    if crate::past(deadline) {
        resume_unwind(Box::new(LibjpegFatal {
            code: DEADLINE_PASSED,
            message: format!(
                "after {} of {} rows of pass {}",
                (*cinfo.progress).pass_counter,
                (*cinfo.progress).pass_limit,
                (*cinfo.progress).completed_passes + 1
            ),
        }));
    }
}

unsafe extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    if level >= 0 {
        return; // trace messages
    }
    // Only through the raw pointer: the Rust side reads `Messages` between libjpeg calls only.
    let messages = &mut *(cinfo.client_data as *mut Messages);
    let code = (*cinfo.err).msg_code;
    (*cinfo.err).num_warnings += 1;
    messages.warnings += 1;
    if code == JWRN_JPEG_EOF as c_int {
        messages.premature_eof = true;
    }
    // Garbage skipped before the data ran out means a damaged stream. After it, a few skipped
    // bytes are only the decoder tripping over the fake EOI it inserts at a truncation, but
    // a long run (reported when that fake EOI is finally found) is garbage too.
    if code == JWRN_EXTRANEOUS_DATA as c_int {
        let skipped = (*(*cinfo.err).msg_parm.i())[0];
        if !messages.premature_eof || skipped >= 64 {
            messages.extraneous = true;
        }
    }
    if [
        JWRN_HIT_MARKER,
        JWRN_HUFF_BAD_CODE,
        JWRN_MUST_RESYNC,
        JWRN_NOT_SEQUENTIAL,
        JWRN_BOGUS_PROGRESSION,
    ]
    .iter()
    .any(|&c| c as c_int == code)
    {
        messages.damaged = true;
    }
    if messages.first_warning.is_none() {
        messages.first_warning = Some(format_message(cinfo));
    }
}

/// Points `common` at the error manager and the messages, fields of the same heap block as
/// `common` (before `jpeg_create_*`, which keeps these two and clears the rest).
unsafe fn wire(common: *mut jpeg_common_struct, err: *mut jpeg_error_mgr, messages: *mut Messages) {
    jpeg_std_error(&mut *err);
    (*err).error_exit = Some(error_exit);
    (*err).emit_message = Some(emit_message);
    (*common).err = err;
    (*common).client_data = messages as *mut c_void;
}

/// With a deadline, installs the progress monitor that checks it (after `jpeg_create_*`).
unsafe fn watch_deadline(
    common: *mut jpeg_common_struct,
    progress: *mut jpeg_progress_mgr,
    messages: *const Messages,
) {
    if (*messages).deadline.is_some() {
        (*progress).progress_monitor = Some(check_deadline);
        (*common).progress = progress;
    }
}

fn fatal_to_error(payload: Box<dyn std::any::Any + Send>, encoding: bool) -> JpegError {
    match payload.downcast::<LibjpegFatal>() {
        Ok(f) if encoding => JpegError::Encode(f.message),
        Ok(f) => classify_fatal(f.code, f.message),
        // A Rust panic inside our own callbacks: a bug, but still not a crash.
        Err(other) => {
            let msg = other
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| other.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            JpegError::Corrupt(format!("internal error: {msg}"))
        }
    }
}

fn classify_fatal(code: c_int, message: String) -> JpegError {
    // Codes from jerror.h: the ones that mean "valid JPEG we cannot decode" vs damage.
    let unsupported = [
        JERR_ARITH_NOTIMPL,
        JERR_NOT_COMPILED,
        JERR_CONVERSION_NOTIMPL,
        JERR_BAD_PRECISION,
        JERR_NOTIMPL,
    ];
    if code == DEADLINE_PASSED {
        JpegError::Timeout(message)
    } else if unsupported.iter().any(|&c| c as c_int == code) {
        JpegError::Unsupported(message)
    } else if code == JERR_NO_SOI as c_int {
        JpegError::Corrupt(format!("not a JPEG stream: {message}"))
    } else if code == JERR_INPUT_EMPTY as c_int || code == JERR_INPUT_EOF as c_int {
        JpegError::Truncated(message)
    } else {
        JpegError::Corrupt(message)
    }
}

/// Basic facts from a JPEG header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JpegInfo {
    pub width: u32,
    pub height: u32,
    pub components: u32,
}

/// A decoded JPEG: interleaved 8-bit RGB.
#[derive(Clone, Debug)]
pub struct DecodedJpeg {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
    /// Full-size dimensions before DCT scaling.
    pub src_width: u32,
    pub src_height: u32,
    /// The DCT-domain scale denominator that was used (1, 2, 4 or 8).
    pub scale_denom: u32,
    pub components: u32,
    /// The raw EXIF payload (APP1 after "Exif\0\0") if present.
    pub exif: Option<Vec<u8>>,
    /// libjpeg warnings about damaged data it decoded anyway.
    pub warnings: u32,
    /// With [`DecodeOptions::center_square`]: where the centred square of the (scaled) image lies
    /// in `rgb` as (x, y, side). `rgb` then holds only the columns and rows it needed.
    pub square: Option<(u32, u32, u32)>,
}

/// How the decoder should scale and how large an image it may allocate.
pub struct DecodeOptions<'a> {
    /// Pixel limit on the full-size image (width x height), checked before allocating.
    pub max_pixels: u64,
    /// Picks the scale denominator (1, 2, 4 or 8) from the full-size dimensions.
    pub choose_scale: &'a dyn Fn(u32, u32) -> u32,
    /// Keep the APP1 EXIF payload (for orientation).
    pub read_exif: bool,
    /// Only the centred square is wanted: skip the columns (`jpeg_crop_scanline`) and rows
    /// (`jpeg_skip_scanlines`: entropy-decoded, not reconstructed) outside it. Ignored when an
    /// EXIF orientation would rotate the image. Pixels near the crop edge may differ from a full
    /// decode's by the upsampling context, so Pillow-exact paths leave this off.
    pub center_square: bool,
    /// Give up with [`JpegError::Timeout`] once this has passed (checked every few rows and
    /// every scan). `None`: no deadline, and libjpeg runs without a progress monitor.
    pub deadline: Option<Instant>,
}

/// A decompressor and everything libjpeg reaches from it, in one heap block.
struct DecompressState {
    cinfo: jpeg_decompress_struct,
    err: jpeg_error_mgr,
    progress: jpeg_progress_mgr,
    messages: Messages,
}

/// Owns a [`DecompressState`] through the raw pointer C sees (never as a `Box`).
struct Decompress(*mut DecompressState);

impl Decompress {
    fn new(deadline: Option<Instant>) -> Decompress {
        // SAFETY: the libjpeg structs are plain C data, valid zeroed (as jpeg_create_* expects);
        // every pointer handed to libjpeg is derived from the one raw pointer.
        unsafe {
            let raw = Box::into_raw(Box::new(DecompressState {
                cinfo: std::mem::zeroed(),
                err: std::mem::zeroed(),
                progress: std::mem::zeroed(),
                messages: Messages {
                    deadline,
                    ..Messages::default()
                },
            }));
            let common = addr_of_mut!((*raw).cinfo.common);
            let messages = addr_of_mut!((*raw).messages);
            wire(common, addr_of_mut!((*raw).err), messages);
            // Owned from here on (jpeg_create_* can fail, out of memory, and unwind).
            let d = Decompress(raw);
            jpeg_create_decompress(addr_of_mut!((*raw).cinfo));
            watch_deadline(common, addr_of_mut!((*raw).progress), messages);
            d
        }
    }

    /// The libjpeg object, for one libjpeg call at a time.
    fn cinfo(&mut self) -> &mut jpeg_decompress_struct {
        // SAFETY: owned by self; C writes only `messages` behind our back, a disjoint field.
        unsafe { &mut (*self.0).cinfo }
    }

    /// What libjpeg reported so far (read between libjpeg calls, never across one).
    fn messages(&self) -> &Messages {
        // SAFETY: as in cinfo().
        unsafe { &(*self.0).messages }
    }
}

impl Drop for Decompress {
    fn drop(&mut self) {
        // SAFETY: created in new(); destroyed once, then the block is freed once.
        unsafe {
            jpeg_destroy_decompress(&mut (*self.0).cinfo);
            drop(Box::from_raw(self.0));
        }
    }
}

/// Decodes a JPEG to RGB. CMYK/YCCK images are converted like Pillow's `convert("RGB")`
/// (Adobe files store inverted CMYK); grayscale is replicated to three channels.
pub fn decode(data: &[u8], opts: &DecodeOptions) -> Result<DecodedJpeg, JpegError> {
    if data.len() < 4 {
        return Err(JpegError::Truncated(format!("only {} bytes", data.len())));
    }
    let mut d = Decompress::new(opts.deadline);
    let result = catch_unwind(AssertUnwindSafe(|| unsafe {
        decode_inner(&mut d, data, opts, true)
    }));
    let e = match result {
        Ok(r) => return r,
        Err(payload) => fatal_to_error(payload, false),
    };
    let m = d.messages();
    match e {
        e @ JpegError::Timeout(_) => Err(e),
        // Data that ran out before the error (e.g. mid-header) is truncation, whatever broke next,
        // unless libjpeg had to skip garbage to get there (a damaged header, not a short file).
        e if m.premature_eof && !m.extraneous => {
            let why = match e {
                JpegError::Corrupt(m)
                | JpegError::Truncated(m)
                | JpegError::Unsupported(m)
                | JpegError::Encode(m) => m,
                other => other.to_string(),
            };
            Err(JpegError::Truncated(format!(
                "data ends early, then: {why}"
            )))
        }
        e => Err(e),
    }
}

/// What libjpeg reported while decoding damaged data it decoded anyway (see [`decode_lenient`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecodeDamage {
    /// Warnings libjpeg emitted (0 for a clean stream).
    pub warnings: u32,
    /// The first warning's text.
    pub first_warning: Option<String>,
    /// The data ended before the last MCU (libjpeg filled the rest with grey).
    pub premature_eof: bool,
    /// Bad Huffman codes, markers in the wrong place or lost restart sync: parts are garbage.
    pub damaged: bool,
}

impl DecodeDamage {
    /// True when libjpeg decoded the stream without a single warning.
    pub fn is_clean(&self) -> bool {
        self.warnings == 0
    }
}

/// Decodes whatever libjpeg can make of `data` at full size, the way a viewer shows it: damaged
/// or missing MCUs come back grey or garbled instead of as an error, and what libjpeg complained
/// about is returned beside the pixels. Only fatal errors (no frame header, no tables, a bad
/// marker segment, more than `max_pixels`) are errors. Never panics: the sampler feeds it
/// whatever bytes a model produced.
pub fn decode_lenient(
    data: &[u8],
    max_pixels: u64,
) -> Result<(DecodedJpeg, DecodeDamage), JpegError> {
    if data.len() < 4 {
        return Err(JpegError::Truncated(format!("only {} bytes", data.len())));
    }
    let opts = DecodeOptions {
        max_pixels,
        choose_scale: &|_, _| 1,
        read_exif: false,
        center_square: false,
        deadline: None,
    };
    let mut d = Decompress::new(None);
    let result = catch_unwind(AssertUnwindSafe(|| unsafe {
        decode_inner(&mut d, data, &opts, false)
    }));
    match result {
        Ok(Ok(decoded)) => {
            let m = d.messages();
            let damage = DecodeDamage {
                warnings: m.warnings,
                first_warning: m.first_warning.clone(),
                premature_eof: m.premature_eof,
                damaged: m.damaged || m.extraneous,
            };
            Ok((decoded, damage))
        }
        Ok(Err(e)) => Err(e),
        Err(payload) => Err(fatal_to_error(payload, false)),
    }
}

unsafe fn decode_inner(
    d: &mut Decompress,
    data: &[u8],
    opts: &DecodeOptions,
    strict: bool,
) -> Result<DecodedJpeg, JpegError> {
    // Disjoint fields of the state block: libjpeg works on `cinfo` and writes `messages`
    // through `client_data`; `messages` is read here only after the last libjpeg call.
    let state = d.0;
    let cinfo = &mut (*state).cinfo;
    jpeg_mem_src(cinfo, data.as_ptr(), data.len() as c_ulong);
    if opts.read_exif {
        jpeg_save_markers(cinfo, 0xE1, 0xFFFF);
    }
    jpeg_save_markers(cinfo, 0xEE, 64); // APP14 "Adobe": tells whether CMYK is inverted
    jpeg_read_header(cinfo, 1);
    let (src_width, src_height) = (cinfo.image_width, cinfo.image_height);
    if src_width as u64 * src_height as u64 > opts.max_pixels {
        return Err(JpegError::TooLarge {
            width: src_width,
            height: src_height,
            limit: opts.max_pixels,
        });
    }
    let mut exif = None;
    let mut adobe = false;
    let mut marker = cinfo.marker_list;
    while !marker.is_null() {
        let m = &*marker;
        let payload = std::slice::from_raw_parts(m.data, m.data_length as usize);
        if m.marker == 0xE1 && payload.starts_with(b"Exif\0\0") && exif.is_none() {
            exif = Some(payload[6..].to_vec());
        }
        if m.marker == 0xEE && payload.starts_with(b"Adobe") {
            adobe = true;
        }
        marker = m.next;
    }
    let cmyk = matches!(
        cinfo.jpeg_color_space,
        J_COLOR_SPACE::JCS_CMYK | J_COLOR_SPACE::JCS_YCCK
    );
    cinfo.out_color_space = if cmyk {
        J_COLOR_SPACE::JCS_CMYK
    } else {
        J_COLOR_SPACE::JCS_RGB
    };
    let scale_denom = match (opts.choose_scale)(src_width, src_height) {
        d @ (1 | 2 | 4 | 8) => d,
        _ => 1,
    };
    cinfo.scale_num = 1;
    cinfo.scale_denom = scale_denom;
    cinfo.dct_method = J_DCT_METHOD::JDCT_ISLOW;
    jpeg_start_decompress(cinfo);
    let (full_w, full_h) = (cinfo.output_width, cinfo.output_height);
    let rotated = exif
        .as_deref()
        .and_then(image::metadata::Orientation::from_exif_chunk)
        .is_some_and(|o| o != image::metadata::Orientation::NoTransforms);
    // The rows to keep, and where the square sits in what we keep.
    let (mut keep_top, mut keep_rows, mut square) = (0u32, full_h, None);
    if opts.center_square && !rotated && full_w != full_h {
        let side = full_w.min(full_h);
        if full_w > full_h {
            let (mut xoff, mut width) = ((full_w - side) / 2, side);
            let wanted_x = xoff;
            jpeg_crop_scanline(cinfo, &mut xoff, &mut width); // aligns xoff down to an iMCU
            square = Some((wanted_x - xoff, 0, side));
        } else {
            keep_top = (full_h - side) / 2;
            keep_rows = side;
            square = Some((0, 0, side));
        }
    }
    let (w, h) = (cinfo.output_width as usize, keep_rows as usize);
    let comps = cinfo.output_components as usize;
    let row_bytes = w * comps;
    let mut buf = vec![0u8; row_bytes * h];
    if keep_top > 0 {
        jpeg_skip_scanlines(cinfo, keep_top);
    }
    while ((cinfo.output_scanline - keep_top) as usize) < h {
        let y = (cinfo.output_scanline - keep_top) as usize;
        let mut rows: [*mut u8; 4] = [std::ptr::null_mut(); 4];
        let n = (h - y).min(4);
        for (i, row) in rows.iter_mut().enumerate().take(n) {
            *row = buf.as_mut_ptr().add((y + i) * row_bytes);
        }
        let read = jpeg_read_scanlines(cinfo, rows.as_mut_ptr(), n as u32);
        if read == 0 {
            break;
        }
    }
    // The rest is still entropy-decoded, so damage or truncation below the square is noticed.
    let remaining = cinfo.output_height - cinfo.output_scanline;
    if remaining > 0 {
        jpeg_skip_scanlines(cinfo, remaining);
    }
    // Lenient decodes keep the pixels they have: what follows the last MCU (trailing junk in
    // a generated stream) cannot change them, so it is not read.
    if strict {
        jpeg_finish_decompress(cinfo);
    }
    let messages = &(*state).messages;
    if strict && messages.premature_eof {
        return Err(JpegError::Truncated(
            messages
                .first_warning
                .clone()
                .unwrap_or_else(|| "premature end of JPEG data".into()),
        ));
    }
    if strict && messages.damaged {
        return Err(JpegError::Corrupt(
            messages
                .first_warning
                .clone()
                .unwrap_or_else(|| "damaged scan data".into()),
        ));
    }
    let rgb = if cmyk { cmyk_to_rgb(&buf, adobe) } else { buf };
    Ok(DecodedJpeg {
        width: w as u32,
        height: h as u32,
        rgb,
        src_width,
        src_height,
        scale_denom,
        components: cinfo.num_components as u32,
        exif,
        warnings: messages.warnings,
        square,
    })
}

/// Pillow's `cmyk2rgb` (libImaging/Convert.c), after undoing Adobe's inverted storage like
/// Pillow's "CMYK;I" raw mode does.
fn cmyk_to_rgb(cmyk: &[u8], inverted: bool) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut out = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let v = |i: usize| {
            if inverted {
                255 - px[i] as u32
            } else {
                px[i] as u32
            }
        };
        let nk = 255 - v(3);
        for c in 0..3 {
            out.push(nk.saturating_sub(muldiv255(v(c), nk)) as u8);
        }
    }
    out
}

/// Reads only the header (dimensions, components).
pub fn read_info(data: &[u8]) -> Result<JpegInfo, JpegError> {
    let mut d = Decompress::new(None);
    let result = catch_unwind(AssertUnwindSafe(|| unsafe {
        let cinfo = d.cinfo();
        jpeg_mem_src(cinfo, data.as_ptr(), data.len() as c_ulong);
        jpeg_read_header(cinfo, 1);
        JpegInfo {
            width: cinfo.image_width,
            height: cinfo.image_height,
            components: cinfo.num_components as u32,
        }
    }));
    result.map_err(|p| fatal_to_error(p, false))
}

/// A destination manager writing into a `Vec` that Rust owns: libjpeg's memory destination
/// `malloc`s its buffers and frees the first one when it grows past 4 KiB, before `finish`
/// hands the new one back, so an unwind in between left the caller a pointer to freed memory
/// (freed again on drop) and leaked the live buffer. `mgr` comes first: `cinfo.dest` points
/// at it and casts back to the whole struct.
#[repr(C)]
struct VecDest {
    mgr: jpeg_destination_mgr,
    buf: Vec<u8>,
}

/// libjpeg's `OUTPUT_BUF_SIZE`: the first buffer, doubled whenever it fills.
const FIRST_OUTPUT: usize = 4096;

unsafe extern "C-unwind" fn dest_init(cinfo: &mut jpeg_compress_struct) {
    let dest = &mut *(cinfo.dest as *mut VecDest);
    dest.buf.clear();
    dest.buf.resize(FIRST_OUTPUT, 0);
    dest.mgr.next_output_byte = dest.buf.as_mut_ptr();
    dest.mgr.free_in_buffer = dest.buf.len();
}

unsafe extern "C-unwind" fn dest_grow(cinfo: &mut jpeg_compress_struct) -> boolean {
    // Called when the buffer is full (`free_in_buffer` is 0): everything in it is output.
    let dest = &mut *(cinfo.dest as *mut VecDest);
    let used = dest.buf.len();
    dest.buf.resize(used * 2, 0);
    dest.mgr.next_output_byte = dest.buf.as_mut_ptr().add(used);
    dest.mgr.free_in_buffer = dest.buf.len() - used;
    1
}

unsafe extern "C-unwind" fn dest_term(cinfo: &mut jpeg_compress_struct) {
    let dest = &mut *(cinfo.dest as *mut VecDest);
    let used = dest.buf.len() - dest.mgr.free_in_buffer;
    dest.buf.truncate(used);
}

/// A compressor and everything libjpeg reaches from it, in one heap block.
struct CompressState {
    cinfo: jpeg_compress_struct,
    err: jpeg_error_mgr,
    progress: jpeg_progress_mgr,
    messages: Messages,
    dest: VecDest,
}

/// Owns a [`CompressState`] through the raw pointer C sees (never as a `Box`).
struct Compress(*mut CompressState);

impl Compress {
    /// A compressor set up exactly as Pillow's encoder is (the order matters: the compress
    /// profile must be chosen before `jpeg_set_defaults`).
    unsafe fn new(settings: &JpegSettings, width: u32, height: u32) -> Compress {
        let raw = Box::into_raw(Box::new(CompressState {
            cinfo: std::mem::zeroed(),
            err: std::mem::zeroed(),
            progress: std::mem::zeroed(),
            messages: Messages::default(),
            dest: VecDest {
                mgr: jpeg_destination_mgr {
                    next_output_byte: std::ptr::null_mut(),
                    free_in_buffer: 0,
                    init_destination: Some(dest_init),
                    empty_output_buffer: Some(dest_grow),
                    term_destination: Some(dest_term),
                },
                buf: Vec::new(),
            },
        }));
        let common = addr_of_mut!((*raw).cinfo.common);
        let messages = addr_of_mut!((*raw).messages);
        wire(common, addr_of_mut!((*raw).err), messages);
        // Owned from here on: a fatal error below unwinds through Drop.
        let mut c = Compress(raw);
        jpeg_create_compress(addr_of_mut!((*raw).cinfo));
        watch_deadline(common, addr_of_mut!((*raw).progress), messages);
        (*raw).cinfo.dest = addr_of_mut!((*raw).dest.mgr);
        let cinfo = c.cinfo();
        cinfo.image_width = width;
        cinfo.image_height = height;
        cinfo.input_components = 3;
        cinfo.in_color_space = J_COLOR_SPACE::JCS_RGB;
        jpeg_c_set_int_param(
            cinfo,
            J_INT_PARAM::JINT_COMPRESS_PROFILE,
            JCP_FASTEST as c_int,
        );
        jpeg_set_defaults(cinfo);
        jpeg_set_quality(cinfo, settings.quality as c_int, 1);
        let (h, v) = settings.subsampling.luma_factors();
        let comps = std::slice::from_raw_parts_mut(cinfo.comp_info, cinfo.num_components as usize);
        comps[0].h_samp_factor = h;
        comps[0].v_samp_factor = v;
        for comp in &mut comps[1..] {
            comp.h_samp_factor = 1;
            comp.v_samp_factor = 1;
        }
        cinfo.optimize_coding = 0;
        cinfo.dct_method = J_DCT_METHOD::JDCT_ISLOW;
        cinfo.restart_interval = settings.restart_interval as u32;
        cinfo.smoothing_factor = 0;
        c
    }

    /// The libjpeg object, for one libjpeg call at a time.
    fn cinfo(&mut self) -> &mut jpeg_compress_struct {
        // SAFETY: owned by self; C writes `messages` and `dest` behind our back, disjoint fields.
        unsafe { &mut (*self.0).cinfo }
    }

    /// The stream, after `jpeg_finish_compress` or `jpeg_write_tables` (which truncate it).
    fn take_output(&mut self) -> Vec<u8> {
        // SAFETY: between libjpeg calls; the Vec is ours.
        unsafe { std::mem::take(&mut (*self.0).dest.buf) }
    }
}

impl Drop for Compress {
    fn drop(&mut self) {
        // SAFETY: created in new(); destroyed once, then the block (output included) freed once.
        unsafe {
            jpeg_destroy_compress(&mut (*self.0).cinfo);
            drop(Box::from_raw(self.0));
        }
    }
}

/// Encodes interleaved RGB. `abbreviated` leaves out the DQT/DHT tables (Pillow's
/// `streamtype=2`, what the dataset stores); otherwise a normal interchange JPEG.
pub fn encode(
    rgb: &[u8],
    width: u32,
    height: u32,
    settings: &JpegSettings,
    abbreviated: bool,
) -> Result<Vec<u8>, JpegError> {
    validate(settings)?;
    if width == 0 || height == 0 || width > 65_500 || height > 65_500 {
        return Err(JpegError::Encode(format!(
            "{width}x{height} is outside JPEG's 1..65500 range"
        )));
    }
    if rgb.len() != width as usize * height as usize * 3 {
        return Err(JpegError::Encode(format!(
            "{} bytes is not a {width}x{height} RGB image",
            rgb.len()
        )));
    }
    let result = catch_unwind(AssertUnwindSafe(|| unsafe {
        let mut c = Compress::new(settings, width, height);
        let cinfo = c.cinfo();
        if abbreviated {
            jpeg_suppress_tables(cinfo, 1);
            jpeg_start_compress(cinfo, 0);
        } else {
            jpeg_start_compress(cinfo, 1);
        }
        let row_bytes = width as usize * 3;
        let rows: Vec<*const u8> = (0..height as usize)
            .map(|y| rgb.as_ptr().add(y * row_bytes))
            .collect();
        while cinfo.next_scanline < height {
            let y = cinfo.next_scanline as usize;
            jpeg_write_scanlines(cinfo, rows.as_ptr().add(y), height - y as u32);
        }
        jpeg_finish_compress(cinfo);
        c.take_output()
    }));
    result.map_err(|p| fatal_to_error(p, true))
}

/// The tables-only stream (SOI, DQT, DHT, EOI; Pillow's `streamtype=1`) that completes every
/// abbreviated stream encoded with the same settings.
pub fn tables_only(settings: &JpegSettings) -> Result<Vec<u8>, JpegError> {
    validate(settings)?;
    let result = catch_unwind(AssertUnwindSafe(|| unsafe {
        let mut c = Compress::new(settings, 16, 16);
        jpeg_write_tables(c.cinfo());
        c.take_output()
    }));
    result.map_err(|p| fatal_to_error(p, true))
}

fn validate(settings: &JpegSettings) -> Result<(), JpegError> {
    if !(1..=100).contains(&settings.quality) {
        return Err(JpegError::Encode(format!(
            "quality {} is outside 1..100",
            settings.quality
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> Vec<u8> {
        (0..h)
            .flat_map(|y| {
                (0..w).flat_map(move |x| {
                    [
                        (x * 255 / w) as u8,
                        (y * 255 / h) as u8,
                        ((x + y) % 256) as u8,
                    ]
                })
            })
            .collect()
    }

    fn opts(max_pixels: u64) -> DecodeOptions<'static> {
        DecodeOptions {
            max_pixels,
            choose_scale: &|_, _| 1,
            read_exif: true,
            center_square: false,
            deadline: None,
        }
    }

    /// Deterministic noise: incompressible enough that a few rows pass libjpeg's first 4 KiB.
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn an_unwind_after_the_output_grew_frees_it_once() {
        // Issue 17: libjpeg's memory destination reallocates past 4 KiB and frees the first
        // buffer; an unwind before `finish` then freed it a second time in `Compress::drop`.
        let (w, h) = (256u32, 256u32);
        let rgb = noise((w * h * 3) as usize);
        let q100 = JpegSettings {
            quality: 100,
            ..Default::default()
        };
        for _ in 0..20 {
            let r = catch_unwind(AssertUnwindSafe(|| unsafe {
                let mut c = Compress::new(&q100, w, h);
                let cinfo = c.cinfo();
                jpeg_start_compress(cinfo, 1);
                let rows: Vec<*const u8> = (0..h as usize / 2)
                    .map(|y| rgb.as_ptr().add(y * w as usize * 3))
                    .collect();
                jpeg_write_scanlines(cinfo, rows.as_ptr(), rows.len() as u32);
                // A second start is a libjpeg fatal error (bad state): error_exit unwinds here,
                // with ~50 KB of output written.
                jpeg_start_compress(cinfo, 1);
            }));
            let e = fatal_to_error(r.expect_err("libjpeg must fail"), true);
            assert!(matches!(e, JpegError::Encode(_)), "{e:?}");
        }
        // The allocator is intact: a normal encode still works.
        assert!(encode(&rgb, w, h, &q100, false).unwrap().len() > 4096);
    }

    #[test]
    fn encode_decode_round_trip() {
        let rgb = gradient(64, 48);
        let full = encode(
            &rgb,
            64,
            48,
            &JpegSettings {
                quality: 95,
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!(&full[..2], &[0xFF, 0xD8]);
        let d = decode(&full, &opts(1 << 30)).unwrap();
        assert_eq!((d.width, d.height, d.rgb.len()), (64, 48, 64 * 48 * 3));
        let max_diff = d
            .rgb
            .iter()
            .zip(&rgb)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(max_diff < 40, "max diff {max_diff}");
    }

    #[test]
    fn abbreviated_has_no_tables_and_restart_markers() {
        let rgb = gradient(64, 64);
        let abbr = encode(&rgb, 64, 64, &JpegSettings::default(), true).unwrap();
        let has = |m: u8| abbr.windows(2).any(|w| w == [0xFF, m]);
        assert!(!has(0xDB) && !has(0xC4), "DQT/DHT must be suppressed");
        assert!(has(0xDD), "DRI expected");
        // 16 MCUs of 16x16 -> 15 restart markers.
        let rst = abbr
            .windows(2)
            .filter(|w| w[0] == 0xFF && (0xD0..=0xD7).contains(&w[1]))
            .count();
        assert_eq!(rst, 15);
        let tables = tables_only(&JpegSettings::default()).unwrap();
        assert_eq!(
            tables.len(),
            574,
            "Pillow's streamtype=1 at q25 is 574 bytes"
        );
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        assert!(matches!(
            decode(b"hello world, not a jpeg", &opts(1 << 30)),
            Err(JpegError::Corrupt(_))
        ));
        let full = encode(
            &gradient(256, 256),
            256,
            256,
            &JpegSettings {
                quality: 90,
                ..Default::default()
            },
            false,
        )
        .unwrap();
        for cut in [full.len() / 2, 300, 100] {
            let r = decode(&full[..cut], &opts(1 << 30));
            assert!(
                matches!(r, Err(JpegError::Truncated(_))),
                "cut at {cut}: {:?}",
                r.err()
            );
        }
        assert!(matches!(
            decode(&full, &opts(100)),
            Err(JpegError::TooLarge { .. })
        ));
        // Abbreviated streams have no tables: a decoder must refuse them cleanly.
        let abbr = encode(&gradient(16, 16), 16, 16, &JpegSettings::default(), true).unwrap();
        assert!(decode(&abbr, &opts(1 << 30)).is_err());
    }

    #[test]
    fn scaled_decode_divides_dimensions() {
        let full = encode(
            &gradient(128, 96),
            128,
            96,
            &JpegSettings {
                quality: 90,
                ..Default::default()
            },
            false,
        )
        .unwrap();
        let d = decode(
            &full,
            &DecodeOptions {
                max_pixels: 1 << 30,
                choose_scale: &|_, _| 4,
                read_exif: false,
                center_square: false,
                deadline: None,
            },
        )
        .unwrap();
        assert_eq!(
            (d.width, d.height, d.scale_denom, d.src_width),
            (32, 24, 4, 128)
        );
    }

    fn photo(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn a_passed_deadline_stops_the_decode_and_none_changes_nothing() {
        // Baseline (rows through jpeg_read_scanlines) and progressive (scans consumed in
        // jpeg_start_decompress): the progress monitor sees both.
        for name in ["images/rocket.jpg", "odd/progressive.jpg", "odd/cmyk.jpg"] {
            let bytes = photo(name);
            let free = decode(&bytes, &opts(1 << 30)).unwrap();
            let far = DecodeOptions {
                deadline: Some(Instant::now() + std::time::Duration::from_secs(3600)),
                ..opts(1 << 30)
            };
            let watched = decode(&bytes, &far).unwrap();
            assert_eq!(
                watched.rgb, free.rgb,
                "{name}: a deadline not reached changes no pixel"
            );
            let past = DecodeOptions {
                deadline: Some(Instant::now()),
                ..opts(1 << 30)
            };
            let r = decode(&bytes, &past);
            assert!(matches!(r, Err(JpegError::Timeout(_))), "{name}: {r:?}");
        }
        // A deadline does not hide a broken file behind a timeout: the header is read first.
        let past = DecodeOptions {
            deadline: Some(Instant::now()),
            ..opts(1 << 30)
        };
        assert!(matches!(
            decode(b"hello world, not a jpeg", &past),
            Err(JpegError::Corrupt(_))
        ));
    }
}
