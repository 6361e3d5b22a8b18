//! The byte grammar of a dataset's H.264 streams, for constrained sampling (issue #15): a
//! generated video starts with the dataset's parameter sets and keeps the NAL and slice
//! structure its encoder settings produce, so FFmpeg can always open it.
//!
//! What libx264 writes through FFmpeg 5.1 with the paper's options (`h264_mp4toannexb`, x264's
//! SEI stripped), and what the grammar therefore allows:
//! - the stream starts with one of the dataset's parameter-set blocks, byte for byte:
//!   `00 00 00 01` SPS, `00 00 00 01` PPS (and x264's SEI when it is kept), then the first IDR
//!   slice behind a 3-byte start code. The blocks are *not* the same in every video: the SPS's
//!   VUI carries the sample aspect ratio the scaler leaves (it depends on the source's size and
//!   aspect) and the source's colour description, so the grammar holds every distinct block of
//!   the streams it was built from;
//! - `slice-max-mbs=1`: a frame is `mbs_per_frame` slices (144 at 256x144) whose
//!   `first_mb_in_slice` counts up from 0 by `mbs_per_slice`; a frame is whole after its last
//!   one, and only a whole frame may be followed by the next or by the end of the stream;
//! - a frame starts behind a 4-byte start code, its other slices behind 3-byte ones; a
//!   non-IDR frame starts `00 00 00 01 41` (P or I, `nal_ref_idc` 2: with `bf=0` every frame
//!   is a reference), an IDR frame (a scene cut) repeats its stream's SPS and PPS exactly, then
//!   `00 00 01 65` (`nal_ref_idc` 3);
//! - slice headers up to `frame_num` (and `idr_pic_id`), bit exact: `first_mb_in_slice`,
//!   `slice_type` (x264 writes type + 5: 7 in IDR frames, 5 or 7 in the others, one type per
//!   frame), the PPS id, `frame_num` (0 at an IDR, then +1 a frame), `idr_pic_id` (0, 1, 0, ...
//!   over a stream's IDR frames);
//! - NAL payloads: emulation prevention (`00 00` inside a unit is followed by `03`, `03` by a
//!   byte up to `03`, and `00 00 00`, `00 00 01`, `00 00 02` only start the next unit); a unit
//!   ends on a byte holding its stop bit (nonzero, not an emulation-prevention `03`);
//! - slice NAL units (NAL header byte to the unit's last byte, emulation prevention included)
//!   of at most [`max_slice_bytes`](H264Grammar::max_slice_bytes), learned from the streams
//!   ([`slice_cap`]): a model that never draws the `00 00 01` ending a unit would otherwise
//!   write one slice forever. Near the cap only bytes that still let the unit end in time are
//!   allowed, and at it only the next start code (or the end of the stream);
//! - at most `max_frames` frames (the sampler's fps x seconds): after the last, the stream can
//!   only end.
//!
//! Since the parameter sets follow the sources as well as the settings, a grammar is built from
//! real streams ([`H264Grammar::from_streams`]), not from a `VideoConfig` alone. The macroblock
//! data (CAVLC) is free. Every accepted state can still be completed (the
//! [`ByteGrammar`] contract): payload bytes can always reach a stop bit within the slice cap,
//! and the structure ahead is forced or has a choice.

use super::nal::{nal_units, parse_pps_ids, parse_sps};
use crate::grammar::{ByteGrammar, ByteTrie};

/// NAL header byte of an IDR slice as x264 writes it: `nal_ref_idc` 3, type 5.
const IDR_SLICE: u8 = 0x65;
/// NAL header byte of every other slice: `nal_ref_idc` 2, type 1.
const NON_IDR_SLICE: u8 = 0x41;
/// How a non-IDR frame starts: a 4-byte start code and the slice's header byte.
const NON_IDR_START: [u8; 5] = [0, 0, 0, 1, NON_IDR_SLICE];
/// x264's `slice_type` values (type + 5: every slice of the picture has that type).
const P_SLICE: u32 = 5;
const I_SLICE: u32 = 7;

/// How much longer than the longest slice of the streams a generated slice may be, as a
/// factor and a constant ([`slice_cap`]). Generous: the cap is there to end runaway slices (a
/// model that never draws a start code), not to hold a model to the real sizes; a macroblock
/// of finer detail than any in the streams still fits.
pub const SLICE_CAP_FACTOR: f64 = 1.5;
pub const SLICE_CAP_MARGIN: u32 = 16;

/// The slice cap for streams whose longest slice NAL unit is `longest` bytes:
/// `ceil(longest * SLICE_CAP_FACTOR) + SLICE_CAP_MARGIN`.
pub fn slice_cap(longest: u32) -> u32 {
    (longest as f64 * SLICE_CAP_FACTOR).ceil() as u32 + SLICE_CAP_MARGIN
}

/// A stream the grammar cannot be built from, or one it rejects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum H264GrammarError {
    #[error("no streams to build an H.264 grammar from")]
    NoStreams,
    #[error("max_frames must be at least 1")]
    NoFrames,
    #[error("stream {stream}: {message}")]
    Unsupported { stream: usize, message: String },
    #[error(
        "stream {stream} ({frames} frames, {len} bytes) is not accepted by its own grammar at \
         byte {offset}{hint}"
    )]
    Rejected {
        stream: usize,
        offset: usize,
        len: usize,
        frames: usize,
        hint: String,
    },
}

/// The grammar of H.264 streams made with one dataset's settings. See the module docs.
#[derive(Clone, Debug)]
pub struct H264Grammar {
    /// Trie of the parameter-set blocks (stream start to the first slice's header byte). Node 0
    /// is the root; children sorted by byte.
    trie: ByteTrie,
    /// Block ending at each trie node (`NONE` for inner nodes). Blocks end at leaves: each ends
    /// at its only `00 00 01 65`.
    leaf: Vec<u32>,
    /// Per block: the bytes an IDR frame after the first starts with (its SPS and PPS with
    /// their 4-byte start codes, then `00 00 01 65`).
    repeats: Vec<Vec<u8>>,
    mbs_per_frame: u32,
    mbs_per_slice: u32,
    log2_max_frame_num: u32,
    pps_id: u32,
    max_frames: u32,
    /// Longest slice NAL unit of the streams, and the most bytes a slice unit may have.
    longest_slice: u32,
    max_slice_bytes: u32,
}

const NONE: u32 = u32::MAX;

/// Where a stream is in the grammar. Small and `Copy`: the sampler keeps one per candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct H264State {
    phase: Phase,
    /// `Prefix`: trie node; `FrameStart`: bytes of the frame start matched.
    pos: u32,
    /// Parameter-set block the stream started with.
    block: u32,
    /// Frames begun so far (the current one included).
    frames: u32,
    /// `first_mb_in_slice` of the current slice.
    mb: u32,
    frame_num: u32,
    /// `idr_pic_id` of the latest IDR frame.
    idr_id: u8,
    kind: Kind,
    /// `Header`: slice-header bits matched; `FrameStart`: candidates alive (1: non-IDR, 2: IDR).
    bits: u8,
    /// `Header`: header alternatives alive (1: P or the frame's one type, 2: I in a new
    /// non-IDR frame).
    alive: u8,
    /// Zero bytes just written inside the unit (0..=2).
    zeros: u8,
    /// `Header`, `Payload`: bytes of the slice unit so far, its NAL header byte and the
    /// trailing zeros included.
    len: u32,
    /// The last byte was an emulation-prevention `03`.
    epb: bool,
    /// The unit may end at the last nonzero byte (the header is done and that byte can hold
    /// the stop bit); the zeros after it, if any, would then start the next start code.
    end_ok: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Phase {
    /// The stream's parameter-set block (forced, one of the dataset's).
    Prefix,
    /// After `00 00 00` that ended a whole frame: the rest of a non-IDR or IDR frame start.
    FrameStart,
    /// After the `00 00 01` of the next slice in the frame: its NAL header byte.
    SliceNal,
    /// Slice-header bits, checked.
    Header,
    /// Slice data, free but for emulation prevention and the stop bit.
    Payload,
}

/// Slice type of the current frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Idr,
    P,
    I,
    /// A non-IDR frame whose first slice header has not chosen P or I yet.
    Open,
}

impl H264Grammar {
    /// The grammar of streams like `stream` (one encoded video of the dataset): its
    /// parameter sets and slice structure, at most `max_frames` frames.
    pub fn from_stream(stream: &[u8], max_frames: u32) -> Result<H264Grammar, H264GrammarError> {
        H264Grammar::from_streams([stream], max_frames)
    }

    /// The grammar of a dataset's streams: every distinct parameter-set block among them is
    /// allowed (a generated stream picks one and repeats it at its IDR frames), with the slice
    /// structure they share and slice units of at most [`slice_cap`] of their longest. Every
    /// stream must walk through the result to a complete end, or
    /// this fails naming the stream and the byte.
    pub fn from_streams<'a, I>(streams: I, max_frames: u32) -> Result<H264Grammar, H264GrammarError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        if max_frames == 0 {
            return Err(H264GrammarError::NoFrames);
        }
        let streams: Vec<&[u8]> = streams.into_iter().collect();
        if streams.is_empty() {
            return Err(H264GrammarError::NoStreams);
        }
        let mut g = H264Grammar {
            trie: ByteTrie::default(),
            leaf: vec![NONE],
            repeats: Vec::new(),
            mbs_per_frame: 0,
            mbs_per_slice: 0,
            log2_max_frame_num: 0,
            pps_id: 0,
            max_frames,
            longest_slice: 0,
            max_slice_bytes: 0,
        };
        let mut shape = None;
        for (i, s) in streams.iter().enumerate() {
            let unsupported =
                |message: String| H264GrammarError::Unsupported { stream: i, message };
            let (block, repeat, this) = structure(s).map_err(unsupported)?;
            if *shape.get_or_insert(this) != this {
                return Err(unsupported(format!(
                    "slice structure {this:?} differs from the first stream's {:?}",
                    shape.unwrap()
                )));
            }
            g.insert(block, repeat);
            for n in nal_units(s).iter().filter(|n| n.is_slice()) {
                g.longest_slice = g.longest_slice.max((n.end - n.header) as u32);
            }
        }
        let shape = shape.expect("at least one stream");
        g.mbs_per_frame = shape.mbs_per_frame;
        g.mbs_per_slice = shape.mbs_per_slice;
        g.log2_max_frame_num = shape.log2_max_frame_num;
        g.pps_id = shape.pps_id;
        g.max_slice_bytes = slice_cap(g.longest_slice).max(g.header_room());
        for (i, s) in streams.iter().enumerate() {
            g.check(i, s)?;
        }
        Ok(g)
    }

    fn insert(&mut self, block: &[u8], repeat: Vec<u8>) {
        let node = self.trie.insert(block);
        self.leaf.resize(self.trie.nodes(), NONE);
        if self.leaf[node] == NONE {
            self.leaf[node] = self.repeats.len() as u32;
            self.repeats.push(repeat);
        }
    }

    /// Walks stream `i` through the grammar: accepted to the end, and complete there.
    fn check(&self, i: usize, s: &[u8]) -> Result<(), H264GrammarError> {
        let mut st = self.start();
        let mut offset = 0;
        while offset < s.len() && self.step(&mut st, s[offset]) {
            offset += 1;
        }
        if offset == s.len() && self.complete(&st) {
            return Ok(());
        }
        let nals = nal_units(s);
        let frames = super::nal::frame_starts(s, &nals).len();
        let hint = if frames > self.max_frames as usize {
            format!(": more frames than max_frames ({})", self.max_frames)
        } else if offset == s.len() {
            ": the stream ends inside a frame".into()
        } else {
            String::new()
        };
        Err(H264GrammarError::Rejected {
            stream: i,
            offset,
            len: s.len(),
            frames,
            hint,
        })
    }

    /// Distinct parameter-set blocks a stream may start with.
    pub fn parameter_sets(&self) -> usize {
        self.repeats.len()
    }

    pub fn max_frames(&self) -> u32 {
        self.max_frames
    }

    pub fn mbs_per_frame(&self) -> u32 {
        self.mbs_per_frame
    }

    /// Longest slice NAL unit among the streams the grammar was built from: bytes from its NAL
    /// header to its end, emulation prevention included.
    pub fn longest_slice(&self) -> u32 {
        self.longest_slice
    }

    /// The most bytes a slice NAL unit may have (counted as [`longest_slice`](Self::longest_slice)):
    /// [`slice_cap`] of the longest, or, for streams of tiny slices, enough for any slice header
    /// the grammar allows and a stop bit.
    pub fn max_slice_bytes(&self) -> u32 {
        self.max_slice_bytes
    }

    /// Bytes the longest slice header the grammar allows may take with its NAL header byte and
    /// the byte that holds its stop bit: the cap is only checked after the header (which is
    /// forced), so it must leave this much room.
    fn header_room(&self) -> u32 {
        let mut bits = Bits::default();
        bits.ue(self.mbs_per_frame);
        bits.ue(I_SLICE);
        bits.ue(self.pps_id);
        bits.u(0, self.log2_max_frame_num);
        bits.ue(1);
        let rbsp = bits.len.div_ceil(8);
        // At most one emulation-prevention byte per two RBSP bytes.
        1 + rbsp + rbsp / 2 + 1
    }

    /// The length of the slice unit if it ends as soon as it can from `s` (a `Payload` state):
    /// at its last nonzero byte when that may hold the stop bit and the zeros after it, if any,
    /// can start a start code; otherwise one byte later (a byte up to 03 after emulation
    /// prevention, a nonzero byte after zeros, or a nonzero byte for the stop bit: each commits
    /// the zeros before it).
    fn shortest_end(&self, s: &H264State) -> u32 {
        let start_code_next = !(self.whole(s) && s.frames >= self.max_frames);
        if s.end_ok && !s.epb && (s.zeros == 0 || start_code_next) {
            s.len - s.zeros as u32
        } else {
            s.len + 1
        }
    }

    /// Frames begun in `state` (the one being written included).
    pub fn frames(&self, state: &H264State) -> u32 {
        state.frames
    }

    /// The current slice is its frame's last.
    fn whole(&self, s: &H264State) -> bool {
        s.mb + self.mbs_per_slice >= self.mbs_per_frame
    }

    /// The slice unit can still end within the cap (the cap binds after the slice header).
    fn fits(&self, s: &H264State) -> bool {
        s.phase != Phase::Payload || self.shortest_end(s) <= self.max_slice_bytes
    }

    /// Begins frame `s.frames + 1` at its first slice's header bits.
    fn begin_frame(&self, s: &mut H264State, idr: bool) {
        if idr {
            s.idr_id = if s.frames == 0 { 0 } else { s.idr_id ^ 1 };
            s.frame_num = 0;
            s.kind = Kind::Idr;
        } else {
            s.frame_num = (s.frame_num + 1) & ((1 << self.log2_max_frame_num) - 1);
            s.kind = Kind::Open;
        }
        s.frames += 1;
        s.mb = 0;
        self.begin_header(s);
    }

    fn begin_header(&self, s: &mut H264State) {
        s.phase = Phase::Header;
        s.bits = 0;
        s.alive = if s.kind == Kind::Open { 3 } else { 1 };
        s.zeros = 0;
        s.epb = false;
        s.end_ok = false;
        s.len = 1;
    }

    /// The header bits alternative `alt` of the current slice must start with, and how many.
    fn header(&self, s: &H264State, alt: u8) -> (u128, u32) {
        let slice_type = match (s.kind, alt) {
            (Kind::P, _) | (Kind::Open, 0) => P_SLICE,
            _ => I_SLICE,
        };
        let mut bits = Bits::default();
        bits.ue(s.mb);
        bits.ue(slice_type);
        bits.ue(self.pps_id);
        bits.u(s.frame_num, self.log2_max_frame_num);
        if s.kind == Kind::Idr {
            bits.ue(s.idr_id as u32);
        }
        (bits.value, bits.len)
    }

    /// Some header alternative can continue with an RBSP byte of 0..=3 (what follows an
    /// emulation-prevention `03`).
    fn header_takes_low_byte(&self, s: &H264State) -> bool {
        let k = s.bits as u32;
        (0..2u8).any(|alt| {
            if s.alive & (1 << alt) == 0 {
                return false;
            }
            let (value, len) = self.header(s, alt);
            if len <= k {
                return false;
            }
            let m = (len - k).min(8);
            let want = (value >> (len - k - m)) & ((1 << m) - 1);
            want <= (3 >> (8 - m))
        })
    }

    /// One RBSP byte of the slice header; false when no alternative continues with it.
    fn header_byte(&self, s: &mut H264State, b: u8) -> bool {
        let k = s.bits as u32;
        let mut alive = 0;
        let mut done = None;
        for alt in 0..2u8 {
            if s.alive & (1 << alt) == 0 {
                continue;
            }
            let (value, len) = self.header(s, alt);
            if len <= k {
                continue;
            }
            let m = (len - k).min(8);
            let want = ((value >> (len - k - m)) & ((1 << m) - 1)) as u8;
            if (b >> (8 - m)) as u32 != want as u32 {
                continue;
            }
            alive |= 1 << alt;
            if k + m == len && done.is_none() {
                // The bits after the header in this byte may hold the stop bit.
                done = Some((alt, b & ((1u16 << (8 - m)) - 1) as u8 != 0));
            }
        }
        if alive == 0 {
            return false;
        }
        match done {
            Some((alt, stop)) => {
                if s.kind == Kind::Open {
                    s.kind = if alt == 0 { Kind::P } else { Kind::I };
                }
                s.phase = Phase::Payload;
                s.end_ok = stop;
            }
            None => {
                s.alive = alive;
                s.bits += 8;
            }
        }
        true
    }
}

/// The stream-wide facts the slice headers and frames follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    mbs_per_frame: u32,
    mbs_per_slice: u32,
    log2_max_frame_num: u32,
    pps_id: u32,
}

/// A stream's parameter-set block, the bytes its later IDR frames start with, and its shape.
fn structure(s: &[u8]) -> Result<(&[u8], Vec<u8>, Shape), String> {
    let nals = nal_units(s);
    let first = nals
        .iter()
        .position(|n| n.is_slice())
        .ok_or("no slice in the stream")?;
    let slice = nals[first];
    if nals[0].start != 0 {
        return Err("the stream does not start with a start code".into());
    }
    if s[slice.header] != IDR_SLICE {
        return Err(format!(
            "the first slice's NAL header is {:#04x}, not an IDR slice ({IDR_SLICE:#04x})",
            s[slice.header]
        ));
    }
    let head = &nals[..first];
    let unit = |t: u8| {
        let mut of = head.iter().filter(|n| n.nal_type == t);
        match (of.next(), of.next()) {
            (Some(n), None) => Ok(n),
            (None, _) => Err(format!("no NAL unit of type {t} before the first slice")),
            _ => Err(format!(
                "several NAL units of type {t} before the first slice"
            )),
        }
    };
    let (sps_nal, pps_nal) = (unit(7)?, unit(8)?);
    let sps = parse_sps(&s[sps_nal.header..sps_nal.end])
        .ok_or("the SPS is unreadable or uses what x264's baseline streams do not")?;
    let (pps_id, pps_sps) =
        parse_pps_ids(&s[pps_nal.header..pps_nal.end]).ok_or("the PPS is unreadable")?;
    if pps_sps != sps.sps_id {
        return Err(format!(
            "the PPS refers to SPS {pps_sps}, the stream has SPS {}",
            sps.sps_id
        ));
    }
    let mbs_per_frame = sps.mbs_per_frame();
    // The first frame's second slice gives the slice size; a frame of one slice has none.
    let mbs_per_slice = nals[first + 1..]
        .iter()
        .find(|n| n.is_slice())
        .and_then(|n| super::nal::first_mb_in_slice(s, n))
        .filter(|&mb| mb > 0)
        .unwrap_or(mbs_per_frame);
    let mut repeat: Vec<u8> = head
        .iter()
        .filter(|n| matches!(n.nal_type, 7 | 8))
        .flat_map(|n| s[n.start..n.end].iter().copied())
        .collect();
    repeat.extend_from_slice(&s[slice.start..=slice.header]);
    if !repeat.starts_with(&[0, 0, 0, 1]) {
        return Err("the parameter sets do not start with a 4-byte start code".into());
    }
    let shape = Shape {
        mbs_per_frame,
        mbs_per_slice,
        log2_max_frame_num: sps.log2_max_frame_num,
        pps_id,
    };
    Ok((&s[..=slice.header], repeat, shape))
}

/// Bits of a slice header, MSB first in the low `len` bits of `value`.
#[derive(Default)]
struct Bits {
    value: u128,
    len: u32,
}

impl Bits {
    fn u(&mut self, v: u32, n: u32) {
        self.value = (self.value << n) | v as u128;
        self.len += n;
    }

    /// Exp-Golomb: `v + 1` in binary behind one zero fewer than its digits.
    fn ue(&mut self, v: u32) {
        let x = v as u64 + 1;
        let digits = 64 - x.leading_zeros();
        self.value = (self.value << (2 * digits - 1)) | x as u128;
        self.len += 2 * digits - 1;
    }
}

impl ByteGrammar for H264Grammar {
    type State = H264State;

    fn start(&self) -> H264State {
        H264State {
            phase: Phase::Prefix,
            pos: 0,
            block: 0,
            frames: 0,
            mb: 0,
            frame_num: 0,
            idr_id: 0,
            kind: Kind::Idr,
            bits: 0,
            alive: 0,
            zeros: 0,
            epb: false,
            end_ok: false,
            len: 0,
        }
    }

    fn step(&self, s: &mut H264State, b: u8) -> bool {
        match s.phase {
            Phase::Prefix => {
                let Some(next) = self.trie.child(s.pos as usize, b) else {
                    return false;
                };
                s.pos = next as u32;
                let block = self.leaf[s.pos as usize];
                if block != NONE {
                    s.block = block;
                    self.begin_frame(s, true);
                }
                true
            }
            Phase::FrameStart => {
                let pos = s.pos as usize;
                let repeat = &self.repeats[s.block as usize];
                let mut alive = 0;
                if s.bits & 1 != 0 && NON_IDR_START.get(pos) == Some(&b) {
                    alive |= 1;
                }
                if s.bits & 2 != 0 && repeat.get(pos) == Some(&b) {
                    alive |= 2;
                }
                if alive == 0 {
                    return false;
                }
                s.pos += 1;
                s.bits = alive;
                if alive == 1 && s.pos as usize == NON_IDR_START.len() {
                    self.begin_frame(s, false);
                } else if alive == 2 && s.pos as usize == repeat.len() {
                    self.begin_frame(s, true);
                }
                true
            }
            Phase::SliceNal => {
                let want = if s.kind == Kind::Idr {
                    IDR_SLICE
                } else {
                    NON_IDR_SLICE
                };
                if b != want {
                    return false;
                }
                s.mb += self.mbs_per_slice;
                self.begin_header(s);
                true
            }
            Phase::Header | Phase::Payload => {
                // Emulation prevention and start codes, on the raw bytes.
                if s.epb {
                    if b > 3 {
                        return false;
                    }
                    s.epb = false;
                    s.zeros = (b == 0) as u8;
                } else if s.zeros >= 2 {
                    match b {
                        0 => {
                            // `00 00 00`: the 4-byte start code of the next frame.
                            let ok = s.phase == Phase::Payload
                                && s.end_ok
                                && self.whole(s)
                                && s.frames < self.max_frames;
                            if ok {
                                s.phase = Phase::FrameStart;
                                s.pos = 3;
                                s.bits = 3;
                            }
                            return ok;
                        }
                        1 => {
                            // `00 00 01`: the next slice of this frame.
                            let ok = s.phase == Phase::Payload && s.end_ok && !self.whole(s);
                            if ok {
                                s.phase = Phase::SliceNal;
                            }
                            return ok;
                        }
                        2 => return false,
                        3 => {
                            // In a header, only where the RBSP byte it protects fits.
                            if s.phase == Phase::Header && !self.header_takes_low_byte(s) {
                                return false;
                            }
                            s.epb = true;
                            s.zeros = 0;
                            s.end_ok = false;
                            s.len += 1;
                            return self.fits(s);
                        }
                        _ => s.zeros = 0,
                    }
                } else {
                    s.zeros = if b == 0 { s.zeros + 1 } else { 0 };
                }
                // `b` is an RBSP byte.
                s.len += 1;
                if s.phase == Phase::Header {
                    let ok = self.header_byte(s, b);
                    debug_assert!(!ok || self.fits(s), "header_room leaves room");
                    return ok;
                }
                if b != 0 {
                    s.end_ok = true;
                }
                self.fits(s)
            }
        }
    }

    fn complete(&self, s: &H264State) -> bool {
        s.phase == Phase::Payload && s.zeros == 0 && !s.epb && s.end_ok && self.whole(s)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet, VecDeque};
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    use super::*;
    use crate::h264::nal::{first_mb_in_slice, frame_starts, Nal};
    use crate::h264::{annexb_to_mp4, decode_h264, encode_file, VideoConfig};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/videos")
            .join(name)
    }

    /// Every bundled clip encoded with the dataset's default settings, once per test binary.
    fn clips() -> &'static [(String, Vec<u8>)] {
        static CLIPS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
        CLIPS.get_or_init(|| {
            let mut names: Vec<String> = std::fs::read_dir(fixture(""))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".md"))
                .collect();
            names.sort();
            names
                .into_iter()
                .map(|n| {
                    let v = encode_file(&fixture(&n), &VideoConfig::default())
                        .unwrap_or_else(|e| panic!("{n}: {e}"));
                    (n, v.h264)
                })
                .collect()
        })
    }

    fn clip(name: &str) -> &'static [u8] {
        &clips().iter().find(|(n, _)| n == name).unwrap().1
    }

    /// Bikes at 32x32: four one-macroblock slices a frame, so random walks reach frame starts,
    /// IDR repeats and the frame cap quickly.
    fn small_bikes() -> &'static [u8] {
        static SMALL: OnceLock<Vec<u8>> = OnceLock::new();
        SMALL.get_or_init(|| {
            let cfg = VideoConfig {
                width: 32,
                height: 32,
                ..VideoConfig::default()
            };
            encode_file(&fixture("bikes.mp4"), &cfg).unwrap().h264
        })
    }

    fn all_clips_grammar() -> H264Grammar {
        H264Grammar::from_streams(clips().iter().map(|(_, v)| v.as_slice()), 15).unwrap()
    }

    /// Offset of the first byte the grammar rejects.
    fn rejected_at(g: &H264Grammar, bytes: &[u8]) -> Option<usize> {
        let mut s = g.start();
        bytes.iter().position(|&b| !g.step(&mut s, b))
    }

    fn walk(g: &H264Grammar, bytes: &[u8]) -> H264State {
        g.walk(g.start(), bytes).expect("accepted")
    }

    fn slices(data: &[u8]) -> Vec<Nal> {
        nal_units(data)
            .into_iter()
            .filter(|n| n.is_slice())
            .collect()
    }

    /// Where each frame's bytes begin (its first unit's first byte: the SPS of an IDR frame
    /// after the first, its first slice otherwise), and the stream's length last.
    fn frame_bounds(data: &[u8]) -> Vec<usize> {
        let nals = nal_units(data);
        let mut bounds: Vec<usize> = frame_starts(data, &nals)
            .into_iter()
            .map(|i| {
                let mut j = i;
                while j > 0 && matches!(nals[j - 1].nal_type, 7 | 8) {
                    j -= 1;
                }
                nals[j].start
            })
            .collect();
        bounds[0] = 0;
        bounds.push(data.len());
        bounds
    }

    #[test]
    fn the_streams_the_settings_produce() {
        for (name, data) in clips() {
            let nals = nal_units(data);
            let code_len = |n: &Nal| n.header - n.start;
            // SPS and PPS behind 4-byte codes, then the first IDR frame: nothing else (no AUD;
            // x264's SEI is stripped).
            assert_eq!(
                (nals[0].nal_type, nals[1].nal_type, nals[2].nal_type),
                (7, 8, 5),
                "{name}"
            );
            let mut frames = 0;
            let mut k = 0;
            while k < nals.len() {
                let idr = nals[k].nal_type == 7;
                if idr {
                    assert_eq!(
                        (
                            code_len(&nals[k]),
                            nals[k + 1].nal_type,
                            code_len(&nals[k + 1])
                        ),
                        (4, 8, 4),
                        "{name}: an IDR frame repeats SPS and PPS"
                    );
                    assert_eq!(
                        data[nals[k].start..nals[k + 2].start],
                        data[nals[0].start..nals[2].start],
                        "{name}: the repeated parameter sets are the stream's own"
                    );
                    k += 2;
                }
                // 144 one-macroblock slices: first_mb_in_slice 0..143.
                for mb in 0..144u32 {
                    let n = &nals[k];
                    assert_eq!(data[n.header], if idr { 0x65 } else { 0x41 }, "{name}");
                    assert_eq!(first_mb_in_slice(data, n), Some(mb), "{name}");
                    let want = if mb == 0 && !idr { 4 } else { 3 };
                    assert_eq!(code_len(n), want, "{name}: start code of slice {mb}");
                    assert_ne!(data[n.end - 1], 0, "{name}: units end on the stop bit");
                    k += 1;
                }
                frames += 1;
            }
            let want = if name.starts_with("carphone") { 12 } else { 15 };
            assert_eq!(frames, want, "{name}");
        }
    }

    #[test]
    fn parameter_sets_depend_on_the_source_not_only_the_settings() {
        let prefix = |data: &[u8]| data[..slices(data)[0].header + 1].to_vec();
        let bikes = prefix(clip("bikes.mp4"));
        // Clips made from bikes.mp4 (same frame aspect after scaling, untagged colour) share it.
        for n in [
            "audio_first.mp4",
            "rotated90.mp4",
            "tenbit.mp4",
            "two_video_streams.mkv",
            "vfr.mkv",
        ] {
            assert_eq!(prefix(clip(n)), bikes, "{n}");
        }
        // Carphone (QCIF, SAR 128:117) and the full-range MJPEG (SAR 4:3, BT.470BG matrix)
        // get other VUIs in the SPS; same geometry, same PPS.
        let sps_pps = |data: &[u8]| {
            let nals = nal_units(data);
            (
                parse_sps(&data[nals[0].header..nals[0].end]).unwrap(),
                data[nals[1].start..nals[1].end].to_vec(),
            )
        };
        for n in ["carphone_pristine.mp4", "fullrange_mjpeg.avi"] {
            assert_ne!(prefix(clip(n)), bikes, "{n}");
            assert_eq!(sps_pps(clip(n)), sps_pps(clip("bikes.mp4")), "{n}");
        }
        let g = all_clips_grammar();
        assert_eq!(g.parameter_sets(), 3);
        assert_eq!(g.mbs_per_frame(), 144);
        // A grammar from one clip refuses another's parameter sets at their first difference.
        let one = H264Grammar::from_stream(clip("bikes.mp4"), 15).unwrap();
        assert_eq!(one.parameter_sets(), 1);
        let carphone = clip("carphone_pristine.mp4");
        let differ = bikes.iter().zip(carphone).position(|(a, b)| a != b);
        assert!(differ.unwrap() > 5, "inside the SPS");
        assert_eq!(rejected_at(&one, carphone), differ);
    }

    #[test]
    fn every_bundled_clip_walks_to_the_end_complete_only_at_frame_ends() {
        let g = all_clips_grammar();
        let t = std::time::Instant::now();
        let mut bytes = 0;
        for (name, data) in clips() {
            let bounds = frame_bounds(data);
            let mut s = g.start();
            let mut complete_at = Vec::new();
            for (i, &b) in data.iter().enumerate() {
                if g.complete(&s) {
                    complete_at.push(i);
                }
                assert!(g.step(&mut s, b), "{name}: rejected at {i}");
            }
            assert!(g.complete(&s), "{name}: complete at the end");
            complete_at.push(data.len());
            // Complete at every frame's end, and elsewhere only inside a frame's last slice
            // after its header (any nonzero byte there may hold the stop bit: the macroblock
            // data is not parsed); never after the parameter sets or a slice inside a frame.
            let sl = slices(data);
            let last_slices: Vec<&Nal> = sl.iter().skip(143).step_by(144).collect();
            assert_eq!(last_slices.len(), bounds.len() - 1);
            for (f, n) in last_slices.iter().enumerate() {
                assert_eq!(n.end, bounds[f + 1], "{name}");
                assert!(complete_at.contains(&n.end), "{name}: frame {f}'s end");
            }
            for &p in &complete_at {
                assert!(
                    last_slices.iter().any(|n| n.header + 2 < p && p <= n.end),
                    "{name}: complete at {p}"
                );
            }
            assert_eq!(g.frames(&s) as usize, bounds.len() - 1, "{name}");
            bytes += data.len();
        }
        eprintln!(
            "grammar: {bytes} bytes of real streams walked (with complete() at each) in {:?}",
            t.elapsed()
        );
        // A cut at a slice's end inside a frame is not complete; a cut inside a unit is not.
        let data = clip("bikes.mp4");
        let s3 = slices(data)[3];
        assert!(!g.complete(&walk(&g, &data[..s3.start])));
        assert!(!g.complete(&walk(&g, &data[..s3.start + 1])));
        assert!(!g.complete(&walk(&g, &data[..s3.header + 2])));
        assert!(!g.complete(&walk(&g, &data[..slices(data)[0].header])));
    }

    #[test]
    fn x264s_sei_is_part_of_the_first_block_only() {
        let keep = VideoConfig {
            keep_x264_sei: true,
            ..VideoConfig::default()
        };
        let with_sei = encode_file(&fixture("bikes.mp4"), &keep).unwrap().h264;
        assert_eq!(nal_units(&with_sei)[2].nal_type, 6);
        // Built from it, the grammar takes it (later IDR frames repeat SPS and PPS only) ...
        let g = H264Grammar::from_stream(&with_sei, 15).unwrap();
        assert!(g.complete(&walk(&g, &with_sei)));
        // ... and a grammar of SEI-less streams refuses the SEI's start code.
        let sei = nal_units(&with_sei)[2];
        let g = H264Grammar::from_stream(clip("bikes.mp4"), 15).unwrap();
        assert_eq!(rejected_at(&g, &with_sei), Some(sei.start + 3));
    }

    fn splice(data: &[u8], at: usize, cut: usize, insert: &[u8]) -> Vec<u8> {
        [&data[..at], insert, &data[at + cut..]].concat()
    }

    #[test]
    fn streams_out_of_the_grammar_are_rejected_at_the_right_byte() {
        let data = clip("bikes.mp4");
        let g = H264Grammar::from_stream(data, 15).unwrap();
        let sl = slices(data);
        // No SPS/PPS: starts `00 00 01 65`, the grammar wants `00 00 00 01 67`.
        assert_eq!(rejected_at(&g, &data[sl[0].start..]), Some(2));
        // first_mb_in_slice out of order: slice 1 left out, slice 2 follows slice 0 (ue(2)
        // `011` where ue(1) `010` is due: the first header byte).
        let dropped = splice(data, sl[1].start, sl[1].end - sl[1].start, &[]);
        assert_eq!(rejected_at(&g, &dropped), Some(sl[1].start + 4));
        // ... or repeated.
        let twice = splice(data, sl[2].start, 0, &data[sl[1].start..sl[1].end]);
        assert_eq!(rejected_at(&g, &twice), Some(sl[2].start + 4));
        // A non-IDR slice with nal_ref_idc 0.
        let p = sl[144 * 2 + 5];
        let unref = splice(data, p.header, 1, &[0x01]);
        assert_eq!(rejected_at(&g, &unref), Some(p.header));
        // An IDR slice NAL in a P frame.
        let idr = splice(data, p.header, 1, &[0x65]);
        assert_eq!(rejected_at(&g, &idr), Some(p.header));
        // frame_num: frame 2 (P) left out, frame 3 comes with frame_num 3 where 2 is due
        // (header bits 1 00110 1 | 0011: the frame_num's last bits are in the second byte).
        let b = frame_bounds(data);
        let skip = splice(data, b[2], b[3] - b[2], &[]);
        assert_eq!(data[b[3]..b[3] + 5], NON_IDR_START);
        assert_eq!(rejected_at(&g, &skip), Some(b[2] + 6));
        // idr_pic_id: audio_first's IDR frames 0, 8, 13 have ids 0, 1, 0; without frames
        // 8..12 the id-0 IDR follows the id-0 IDR (bits 1 0001000 1 0000 | 1 for ue(0) where
        // 010 is due, in the second header byte).
        let af = clip("audio_first.mp4");
        let ga = H264Grammar::from_stream(af, 15).unwrap();
        let ab = frame_bounds(af);
        let no_middle = splice(af, ab[8], ab[13] - ab[8], &[]);
        let idr13 = slices(af)[144 * 13];
        let at = idr13.header - (ab[13] - ab[8]);
        assert_eq!(no_middle[at], 0x65);
        assert_eq!(rejected_at(&ga, &no_middle), Some(at + 2));
        // A later IDR frame with another stream's SPS.
        let carphone = clip("carphone_pristine.mp4");
        let other_sps = &carphone[..nal_units(carphone)[1].start];
        let idr4 = b[4];
        let mixed = splice(data, idr4, nal_units(data)[0].end, other_sps);
        let first_diff = data.iter().zip(carphone).position(|(x, y)| x != y).unwrap();
        assert_eq!(rejected_at(&g, &mixed), Some(idr4 + first_diff));
    }

    #[test]
    fn a_non_idr_frame_may_be_intra_with_one_slice_type() {
        let data = clip("bikes.mp4");
        let g = H264Grammar::from_stream(data, 15).unwrap();
        let b = frame_bounds(data);
        // Frame 1 begins `00 00 00 01 41`; x264 would write an I frame there at a scene cut
        // too close to the last IDR. Header bits, then the stop bit:
        // ue(0) ue(7) ue(0) u4(1) 1 = 1 0001000 1 0001 1(00).
        let s = walk(&g, &data[..b[1] + 5]);
        let s = g
            .walk(s, &[0x88, 0x8C])
            .expect("an I slice in a non-IDR frame");
        assert!(s.end_ok);
        // Its next slice: ue(1) ue(7) ue(0) u4(1) 1 = 010 0001000 1 0001 1 is fine, P
        // (ue(5) = 00110) is not: one slice type per frame.
        let next = g.walk(s, &[0, 0, 1, 0x41]).unwrap();
        assert!(g.walk(next, &[0x42, 0x23]).is_some());
        assert_eq!(g.walk(next, &[0x46]), None);
        // An IDR slice must be I: ue(0) ue(5) = 1 00110(..) after the parameter sets.
        let idr = walk(&g, &data[..slices(data)[0].header + 1]);
        assert_eq!(g.walk(idr, &[0x9A]), None);
        assert!(g.walk(idr, &[data[slices(data)[0].header + 1]]).is_some());
    }

    #[test]
    fn start_codes_and_emulation_prevention_inside_payloads() {
        let data = clip("bikes.mp4");
        let g = H264Grammar::from_stream(data, 15).unwrap();
        let sl = slices(data);
        // A slice inside frame 1 (not its last) with a few payload bytes, and frame 1's last.
        let mid = *sl[144..288]
            .iter()
            .find(|n| n.end - n.header > 8 && data[n.end - 2] != 0 && data[n.end - 1] != 0x41)
            .unwrap();
        let last = sl[287];
        assert!(data[last.end - 2] != 0);
        // Bytes put in before a unit's last byte: inside a slice that is not its frame's last
        // (`at`), and inside frame 1's last slice (`at_last`).
        let (at, at_last) = (mid.end - 1, last.end - 1);
        let rejected = |at: usize, bytes: &[u8]| rejected_at(&g, &splice(data, at, 0, bytes));
        let cases: [(usize, &[u8], Option<usize>); 9] = [
            // `00 00 01` starts the next slice: the byte after must be its NAL header (41).
            (at, &[0, 0, 1], Some(at + 3)),
            // After a frame's last slice only a 4-byte code (the next frame) may come.
            (at_last, &[0, 0, 1], Some(at_last + 2)),
            // ... and not inside a frame.
            (at, &[0, 0, 0], Some(at + 2)),
            // `00 00 02` never.
            (at, &[0, 0, 2], Some(at + 2)),
            (at_last, &[0, 0, 2], Some(at_last + 2)),
            // After emulation prevention only 00..03.
            (at, &[0, 0, 3, 4], Some(at + 3)),
            (at, &[0, 0, 3, 1], None),
            (at_last, &[0, 0, 3, 0, 0, 3, 2], None),
            // `00 00` then a byte above 03 needs no emulation prevention.
            (at, &[0, 0, 5], None),
        ];
        for (at, bytes, want) in cases {
            assert_eq!(rejected(at, bytes), want, "{bytes:02x?} at {at}");
        }
        // A unit cannot end on a zero byte or on emulation prevention.
        let next = sl[sl.iter().position(|n| *n == mid).unwrap() + 1];
        assert_eq!(next.start, mid.end);
        assert_eq!(
            rejected_at(&g, &splice(data, mid.end, 0, &[0, 0, 3])),
            Some(mid.end + 5)
        );
        assert_eq!(
            rejected_at(&g, &splice(data, mid.end, 0, &[0x80, 0])),
            Some(mid.end + 3)
        );
    }

    #[test]
    fn the_frame_cap_leaves_only_the_end() {
        let data = clip("bikes.mp4");
        let b = frame_bounds(data);
        // Built from its first 5 frames (a stream cut at a frame boundary), capped at 5.
        let g = H264Grammar::from_stream(&data[..b[5]], 5).unwrap();
        assert_eq!(rejected_at(&g, data), Some(b[5] + 2));
        let s = walk(&g, &data[..b[5]]);
        assert!(g.complete(&s) && g.frames(&s) == 5);
        // Payload bytes may still follow; a start code may not.
        assert!(g.walk(s, &[0x12, 0x34]).is_some());
        assert!(g.walk(s, &[0, 0, 0]).is_none());
        assert!(g.walk(s, &[0, 0, 1]).is_none());
        // A stream over its own cap is refused when building, naming the byte.
        let e = H264Grammar::from_stream(data, 5).unwrap_err();
        assert!(
            matches!(e, H264GrammarError::Rejected { stream: 0, offset, frames: 15, .. } if offset == b[5] + 2),
            "{e}"
        );
        assert!(
            e.to_string().contains("more frames than max_frames (5)"),
            "{e}"
        );
        // Other streams the grammar cannot be made from.
        let sl = slices(data);
        assert!(matches!(
            H264Grammar::from_stream(&data[sl[0].start..], 15),
            Err(H264GrammarError::Unsupported { .. })
        ));
        assert!(H264Grammar::from_stream(data, 0).is_err());
        assert!(H264Grammar::from_streams([], 15).is_err());
        let e = H264Grammar::from_stream(&data[..sl[144 * 5 - 1].start], 15).unwrap_err();
        assert!(e.to_string().contains("ends inside a frame"), "{e}");
        let e = H264Grammar::from_streams([data, small_bikes()], 15).unwrap_err();
        assert!(e.to_string().contains("slice structure"), "{e}");
    }

    #[test]
    fn slices_are_capped_at_a_margin_over_the_longest_of_the_streams() {
        let g = all_clips_grammar();
        let longest = clips()
            .iter()
            .flat_map(|(_, data)| slices(data).into_iter().map(|n| n.end - n.header))
            .max()
            .unwrap() as u32;
        assert_eq!(g.longest_slice(), longest);
        assert_eq!(g.max_slice_bytes(), slice_cap(longest));
        assert_eq!(slice_cap(51), 93);
        let cap = g.max_slice_bytes() as usize;
        eprintln!("longest slice of the bundled clips {longest} bytes, cap {cap}");
        let data = clip("bikes.mp4");
        let sl = slices(data);
        // Frame 0's slice 1 (a start code follows) and the stream's last slice (the end of
        // the stream follows: 15 frames is the frame cap), made `extra` bytes longer than
        // the cap by 0x80 bytes before their last byte.
        let last = *sl.last().unwrap();
        assert_eq!(last.end, data.len());
        for n in [sl[1], last] {
            let grown = |extra: isize| {
                let k = (cap as isize + extra - (n.end - n.header) as isize) as usize;
                splice(data, n.end - 1, 0, &vec![0x80; k])
            };
            // At the cap: accepted, complete at the end.
            let at_cap = grown(0);
            assert!(g.complete(&walk(&g, &at_cap)));
            // One byte over: rejected at the byte past the cap.
            assert_eq!(rejected_at(&g, &grown(1)), Some(n.header + cap));
            // Near the cap, what would leave no way to end the unit in time is refused.
            let at = |len: usize| walk(&g, &at_cap[..n.header + len]);
            if n == last {
                // Nothing after the cap: the stream is complete there and must end.
                assert!(g.complete(&at(cap)) && accepted(&g, &at(cap)).is_empty());
                // A zero needs a nonzero byte after it (no start code may follow the last
                // frame): one byte before the cap, only nonzero bytes.
                assert_eq!(accepted(&g, &at(cap - 1)), (1..=255).collect::<Vec<u8>>());
                assert_eq!(accepted(&g, &at(cap - 2)), (0..=255).collect::<Vec<u8>>());
                assert!(g.walk(at(cap - 2), &[0, 0x80]).is_some());
                assert!(g.walk(at(cap - 2), &[0, 0]).is_none());
            } else {
                // After the cap only the start code of the next slice.
                assert_eq!(accepted(&g, &at(cap)), vec![0]);
                assert!(g.walk(at(cap), &[0, 0, 1, IDR_SLICE]).is_some());
                // A zero one byte before the cap may only start the start code.
                let code = g.walk(at(cap - 1), &[0, 0, 1]).unwrap();
                assert_eq!(code.phase, Phase::SliceNal);
                assert!(g.walk(at(cap - 1), &[0, 0x80]).is_none());
                assert!(g.walk(at(cap - 1), &[0x80]).is_some());
                // `00 00 03` three bytes before the cap leaves no room for the byte emulation
                // prevention protects; `00 00 05` fits, and `00 00 03 01` one byte earlier.
                assert!(g.walk(at(cap - 3), &[0, 0, 3]).is_none());
                assert!(g.walk(at(cap - 3), &[0, 0, 5]).is_some());
                assert!(g.walk(at(cap - 4), &[0, 0, 3, 1]).is_some());
                assert!(g.walk(at(cap - 4), &[0, 0, 3, 0]).is_none());
            }
        }
    }

    /// SplitMix64, for seeded walks.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn accepted(g: &H264Grammar, s: &H264State) -> Vec<u8> {
        (0..=255u8).filter(|&b| g.step(&mut s.clone(), b)).collect()
    }

    /// Bytes of the shortest continuation from `s` to a complete state (breadth first over
    /// distinct states), if one is at most `limit` bytes long. In slice data every byte above
    /// 03 is tried as 04 (they are all alike there): the slice's length is part of the state,
    /// so trying all 256 would make a search across a frame's slices take seconds. Trying fewer
    /// bytes can only miss completions, never invent one.
    fn shortest_completion(g: &H264Grammar, s: H264State, limit: usize) -> Option<usize> {
        let mut seen = HashSet::from([s]);
        let mut queue = VecDeque::from([(s, 0)]);
        while let Some((s, d)) = queue.pop_front() {
            if g.complete(&s) {
                return Some(d);
            }
            if d == limit {
                continue;
            }
            let last = if s.phase == Phase::Payload { 4 } else { 255 };
            for b in 0..=last {
                let mut t = s;
                if g.step(&mut t, b) && seen.insert(t) {
                    queue.push_back((t, d + 1));
                }
            }
        }
        None
    }

    /// How a random walk picks among the accepted bytes.
    #[derive(Clone, Copy, Debug)]
    enum Bias {
        /// Half the time among the accepted of 00, 01, 03 (start codes, emulation
        /// prevention), else uniform.
        Structural,
        /// As a model that never draws the start code ending a unit: 00 one time in `n` (never
        /// for 0) unless it is the only byte accepted, else uniform among the others.
        AgainstZeros(usize),
    }

    /// What a random walk went through.
    #[derive(Default)]
    struct Walked {
        /// Most frames begun in one stream.
        frames: u32,
        /// Streams walked to a complete state that accepts nothing more (the walk restarts).
        ended: Vec<Vec<u8>>,
        /// Longest shortest completion at the checks.
        longest: usize,
    }

    /// A random walk of `steps` bytes picked by `bias`; every `check_every` steps (never for 0)
    /// the state must be completable within `limit` bytes, and a state that accepts no byte must be
    /// complete (the end of a stream: the walk starts another).
    fn random_walk(
        g: &H264Grammar,
        seed: u64,
        steps: usize,
        bias: Bias,
        check_every: usize,
        limit: usize,
    ) -> Walked {
        let mut rng = Rng(seed);
        let mut s = g.start();
        let mut out = Vec::new();
        let mut w = Walked::default();
        for i in 0..steps {
            if check_every > 0 && i % check_every == 0 {
                let d = shortest_completion(g, s, limit).unwrap_or_else(|| {
                    panic!("seed {seed} step {i}: no completion in {limit} bytes from {s:?}")
                });
                w.longest = w.longest.max(d);
            }
            let ok = accepted(g, &s);
            if ok.is_empty() {
                assert!(g.complete(&s), "seed {seed} step {i}: dead end at {s:?}");
                w.ended.push(std::mem::take(&mut out));
                s = g.start();
                continue;
            }
            let pick = match bias {
                Bias::Structural => {
                    let structural: Vec<u8> = ok
                        .iter()
                        .copied()
                        .filter(|b| [0, 1, 3].contains(b))
                        .collect();
                    if rng.below(2) == 0 && !structural.is_empty() {
                        structural[rng.below(structural.len())]
                    } else {
                        ok[rng.below(ok.len())]
                    }
                }
                Bias::AgainstZeros(n) => {
                    let zero_ok = ok[0] == 0;
                    if ok == [0] || (zero_ok && n > 0 && rng.below(n) == 0) {
                        0
                    } else {
                        let others = &ok[zero_ok as usize..];
                        others[rng.below(others.len())]
                    }
                }
            };
            assert!(g.step(&mut s, pick));
            out.push(pick);
            w.frames = w.frames.max(g.frames(&s));
        }
        w
    }

    /// Random walks biased towards start codes and emulation prevention: every state on the
    /// way can be completed.
    fn no_dead_ends(g: &H264Grammar, seed: u64, steps: usize, check_every: usize, limit: usize) {
        let w = random_walk(g, seed, steps, Bias::Structural, check_every, limit);
        eprintln!(
            "seed {seed}: {steps} steps, {} frames begun, {} streams ended, longest shortest \
             completion {} bytes",
            w.frames,
            w.ended.len(),
            w.longest
        );
    }

    #[test]
    fn no_dead_ends_on_random_walks() {
        // Four-slice frames, cap 3: walks reach IDR repeats and the cap.
        let small = H264Grammar::from_stream(small_bikes(), 15).unwrap();
        assert_eq!(small.mbs_per_frame(), 4);
        let capped =
            H264Grammar::from_stream(&small_bikes()[..frame_bounds(small_bikes())[3]], 3).unwrap();
        for seed in 0..4 {
            no_dead_ends(&small, seed, 3000, 7, 200);
            no_dead_ends(&capped, 100 + seed, 3000, 7, 200);
        }
        // The dataset's grammar: 144 slices a frame, so a completion can be ~1000 bytes.
        let g = all_clips_grammar();
        no_dead_ends(&g, 7, 3000, 300, 2000);
    }

    /// The slice units of `stream` (its NAL header byte to its end) are all `len` bytes long,
    /// or (`at_most`) no longer; their count.
    fn slice_lengths(stream: &[u8], len: u32, at_most: bool) -> usize {
        let sl = slices(stream);
        for n in &sl {
            let l = (n.end - n.header) as u32;
            assert!(
                if at_most { l <= len } else { l == len },
                "a slice of {l} bytes, cap {len}"
            );
        }
        sl.len()
    }

    #[test]
    fn the_smallest_cap_leaves_room_for_every_slice_header() {
        // The cap binds after the (forced) slice header, so it is never below header_room:
        // at exactly that cap, walks of every bias still end every slice and every stream.
        let mut small = H264Grammar::from_stream(small_bikes(), 15).unwrap();
        let mut g = all_clips_grammar();
        for (k, g) in [&mut small, &mut g].into_iter().enumerate() {
            g.max_slice_bytes = g.header_room();
            let steps = capped_stream_bytes(g);
            for bias in [
                Bias::Structural,
                Bias::AgainstZeros(0),
                Bias::AgainstZeros(8),
            ] {
                let w = random_walk(g, 60 + k as u64, steps, bias, 997, 2000);
                assert!(!w.ended.is_empty(), "{bias:?}: no stream ended");
                for stream in &w.ended {
                    assert!(g.complete(&walk(g, stream)));
                    slice_lengths(stream, g.max_slice_bytes, true);
                }
                eprintln!(
                    "cap {} ({} slices a frame), {bias:?}: {} streams ended",
                    g.max_slice_bytes,
                    g.mbs_per_frame(),
                    w.ended.len()
                );
            }
        }
    }

    /// More than the bytes of a stream whose every slice is at the cap: the slices behind their
    /// start codes, the prefix and the IDR repeats.
    fn capped_stream_bytes(g: &H264Grammar) -> usize {
        (g.max_frames() * (g.mbs_per_frame() * (g.max_slice_bytes() + 4) + 60)) as usize
    }

    #[test]
    fn walks_that_avoid_start_codes_end_slices_at_the_cap_and_reach_the_end() {
        // A walk that never picks 00 while anything else is accepted (the runaway model):
        // every slice runs to the cap exactly, is ended there, and the stream ends after the
        // frame cap, complete. With 00 one byte in 8, slices hold zeros, emulation prevention
        // and pending zeros near the cap, and stay within it.
        let small = H264Grammar::from_stream(small_bikes(), 15).unwrap();
        let capped =
            H264Grammar::from_stream(&small_bikes()[..frame_bounds(small_bikes())[3]], 3).unwrap();
        let g = all_clips_grammar();
        // (grammar, streams, check every, completion limit)
        let cases: [(&H264Grammar, u32, usize, usize); 3] = [
            (&capped, 3, 37, 300),
            (&small, 2, 101, 300),
            (&g, 1, 10_007, 2000),
        ];
        for (k, &(g, streams, check_every, limit)) in cases.iter().enumerate() {
            let cap = g.max_slice_bytes();
            let steps = streams as usize * capped_stream_bytes(g);
            for (bias, at_most) in [
                (Bias::AgainstZeros(0), false),
                (Bias::AgainstZeros(8), true),
            ] {
                let t = std::time::Instant::now();
                let seed = 40 + k as u64;
                let w = random_walk(g, seed, steps, bias, check_every, limit);
                assert!(
                    !w.ended.is_empty(),
                    "{bias:?}: no stream ended in {steps} steps"
                );
                for stream in &w.ended {
                    assert_eq!(g.frames(&walk(g, stream)), g.max_frames());
                    assert!(g.complete(&walk(g, stream)));
                    let n = slice_lengths(stream, cap, at_most);
                    assert_eq!(n as u32, g.max_frames() * g.mbs_per_frame());
                }
                eprintln!(
                    "{bias:?}, {} frames x {} slices, cap {cap}: {} streams ended in {steps} \
                     steps, {:.0} bytes each, longest shortest completion {} bytes ({:?})",
                    g.max_frames(),
                    g.mbs_per_frame(),
                    w.ended.len(),
                    w.ended.iter().map(Vec::len).sum::<usize>() as f64 / w.ended.len() as f64,
                    w.longest,
                    t.elapsed()
                );
            }
        }
    }

    /// A random stream through the grammar, as a model that only knew the structure would
    /// write it: slice data uniform among accepted bytes for about `mean_payload` bytes, then
    /// the unit is ended; the stream ends at the first complete state once it has `frames`.
    fn random_stream(g: &H264Grammar, rng: &mut Rng, mean_payload: usize, frames: u32) -> Vec<u8> {
        let mut s = g.start();
        let mut out = Vec::new();
        let mut ending = false;
        let mut payload = 0;
        loop {
            if g.complete(&s) && g.frames(&s) >= frames {
                return out;
            }
            let ok = accepted(g, &s);
            if s.phase == Phase::Payload {
                payload += 1;
                if rng.below(mean_payload) == 0 {
                    ending = true;
                }
            } else {
                payload = 0;
                ending = false;
            }
            let prefer: &[u8] = match (ending, s.end_ok, s.zeros) {
                (true, true, _) => &[0, 1],
                (true, false, 0) => &[0x80, 0x01],
                _ => &[],
            };
            let pick = prefer
                .iter()
                .copied()
                .find(|b| ok.contains(b))
                .unwrap_or_else(|| ok[rng.below(ok.len())]);
            assert!(g.step(&mut s, pick));
            out.push(pick);
            assert!(payload < 100_000, "runaway unit");
        }
    }

    #[derive(Default, Debug)]
    struct DecodeFigures {
        streams: usize,
        opened: usize,
        decoded: usize,
        frames: usize,
        errors: u64,
        concealed: u64,
        clean: usize,
    }

    fn decode_figures(streams: &[Vec<u8>], max_frames: usize) -> DecodeFigures {
        let dir = tempfile::tempdir().unwrap();
        let mut f = DecodeFigures::default();
        for (i, h264) in streams.iter().enumerate() {
            f.streams += 1;
            // The remux reads the SPS's coded size and takes SPS + PPS as avcC.
            if annexb_to_mp4(h264, 3, &dir.path().join(format!("{i}.mp4"))).is_ok() {
                f.opened += 1;
            }
            let d = decode_h264(h264, max_frames).unwrap();
            if !d.frames.is_empty() {
                f.decoded += 1;
                assert!(d.frames.iter().all(|fr| fr.dimensions() == (256, 144)));
            }
            if !d.frames.is_empty() && d.decode_errors == 0 && d.concealed_frames == 0 {
                f.clean += 1;
            }
            f.frames += d.frames.len();
            f.errors += d.decode_errors as u64;
            f.concealed += d.concealed_frames as u64;
        }
        f
    }

    fn report(label: &str, f: &DecodeFigures) {
        let n = f.streams as f64;
        eprintln!(
            "{label}: {}/{} open with SPS+PPS, {}/{} decode >= 1 frame ({:.0}%), {:.1} frames, \
             {:.1} decoder errors, {:.1} concealed frames per stream; {} clean",
            f.opened,
            f.streams,
            f.decoded,
            f.streams,
            100.0 * f.decoded as f64 / n,
            f.frames as f64 / n,
            f.errors as f64 / n,
            f.concealed as f64 / n,
            f.clean
        );
    }

    /// Issue #15's figure: streams drawn through the grammar against unconstrained bytes, and
    /// walks that never end a unit by choice (every slice at the cap).
    #[test]
    fn random_streams_through_the_grammar_open_and_decode_in_ffmpeg() {
        let g = all_clips_grammar();
        let mut rng = Rng(15);
        let constrained: Vec<Vec<u8>> = (0..24)
            .map(|_| {
                let frames = 1 + rng.below(15) as u32;
                random_stream(&g, &mut rng, 14, frames)
            })
            .collect();
        for s in &constrained {
            assert!(g.complete(&walk(&g, s)));
        }
        let lens: Vec<usize> = constrained.iter().map(|s| s.len()).collect();
        // Unconstrained: uniform bytes of the same lengths; and the real parameter sets
        // followed by uniform bytes (a prefix but no NAL structure).
        let uniform: Vec<Vec<u8>> = lens
            .iter()
            .map(|&n| (0..n).map(|_| rng.next() as u8).collect())
            .collect();
        let bikes = clip("bikes.mp4");
        let prefix = &bikes[..slices(bikes)[0].start];
        let prefixed: Vec<Vec<u8>> = lens
            .iter()
            .map(|&n| {
                let mut v = prefix.to_vec();
                v.extend((prefix.len()..n).map(|_| rng.next() as u8));
                v
            })
            .collect();
        // As a model that never ends a unit writes: 00 only where nothing else is accepted, so
        // every slice runs to the cap and the stream to the frame cap.
        let runaway: Vec<Vec<u8>> = (0..4)
            .flat_map(|seed| {
                let steps = capped_stream_bytes(&g);
                random_walk(&g, 200 + seed, steps, Bias::AgainstZeros(0), 0, 0).ended
            })
            .collect();
        assert_eq!(runaway.len(), 4);
        let c = decode_figures(&constrained, 15);
        let u = decode_figures(&uniform, 15);
        let p = decode_figures(&prefixed, 15);
        let r = decode_figures(&runaway, 15);
        eprintln!(
            "{} grammar walks, {:.0} bytes and {:.1} frames (by the grammar) on average",
            constrained.len(),
            lens.iter().sum::<usize>() as f64 / lens.len() as f64,
            constrained
                .iter()
                .map(|s| g.frames(&walk(&g, s)))
                .sum::<u32>() as f64
                / lens.len() as f64
        );
        report("through the grammar", &c);
        report("uniform random bytes", &u);
        report("parameter sets + random bytes", &p);
        eprintln!(
            "{} walks avoiding 00, {:.0} bytes, slices of {} bytes (the cap)",
            runaway.len(),
            runaway.iter().map(Vec::len).sum::<usize>() as f64 / runaway.len() as f64,
            g.max_slice_bytes()
        );
        report("through the grammar, avoiding 00", &r);
        // What the forced prefix guarantees: FFmpeg finds SPS and PPS and opens every stream.
        assert_eq!(c.opened, c.streams);
        assert!(c.decoded > 0);
        assert_eq!(r.opened, r.streams);
        assert!(r.decoded > 0);
        assert_eq!(u.decoded, 0, "unconstrained bytes essentially never decode");
    }

    #[test]
    fn the_token_trie_walks_a_real_stream_token_by_token() {
        use crate::grammar::TokenTrie;
        // A toy vocabulary: every byte, plus some longer pieces seen in the streams.
        let data = clip("vfr.mkv");
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        tokens.extend([
            vec![0, 0, 0, 1],
            vec![0, 0, 1],
            vec![0, 0, 1, 0x41],
            vec![0, 0, 0, 1, 0x67],
        ]);
        let ids: HashMap<Vec<u8>, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let trie = TokenTrie::new(&tokens);
        let g = all_clips_grammar();
        let mut s = g.start();
        let mut i = 0;
        while i < data.len() {
            // Longest token at i, as a tokenizer might pick.
            let len = (1..=5)
                .rev()
                .find(|&l| i + l <= data.len() && ids.contains_key(&data[i..i + l]))
                .unwrap();
            let id = ids[&data[i..i + len]];
            let mut next = None;
            trie.allowed(&g, &s, &mut |t, st| {
                if t == id {
                    next = Some(*st);
                }
            });
            s = next.unwrap_or_else(|| panic!("token {id} at byte {i} not allowed"));
            i += len;
        }
        assert!(g.complete(&s));
        // At the start only tokens that begin the parameter sets: 00 and 00 00 00 01 (67).
        let mut first = Vec::new();
        trie.allowed(&g, &g.start(), &mut |t, _| first.push(t));
        first.sort();
        assert_eq!(first, vec![0, 256, 259]);
    }
}
