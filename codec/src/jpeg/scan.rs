//! Baseline JPEG structure read straight from the bytes, without libjpeg: the frame's MCU grid
//! (from SOF and DRI), where each restart interval starts and ends, and a Huffman-level check of
//! every interval. The sampler uses it to cut prompts at MCU rows and to measure which fraction
//! of a generated image's MCUs is well-formed. Pure Rust and bounded by the input's length, so
//! it runs on any bytes a model emits.

use super::markers::{header_segments, is_sof};

/// A frame component as SOF lists it: (id, sampling factors, quantisation table).
type SofComponent = (u8, u8, u8);

/// Why a stream's structure could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("not a JPEG stream: {0}")]
    Header(String),
    #[error("unsupported JPEG: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Cut(String),
}

/// One component of the frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Component {
    pub id: u8,
    pub h: u8,
    pub v: u8,
    /// Huffman table selectors from the scan header (DC, AC).
    pub dc_table: u8,
    pub ac_table: u8,
}

/// The MCU grid of a baseline, single-scan JPEG.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameLayout {
    pub width: u32,
    pub height: u32,
    /// The scan's components, in scan order.
    pub components: Vec<Component>,
    /// MCU size in pixels (16x16 for 4:2:0; 8x8 for a single-component scan).
    pub mcu_width: u32,
    pub mcu_height: u32,
    pub mcus_per_row: u32,
    pub mcu_rows: u32,
    /// MCUs per restart interval (DRI); 0 = no restart markers.
    pub restart_interval: u32,
    /// Offset of the first entropy-coded byte (right after the SOS header).
    pub scan_start: usize,
}

impl FrameLayout {
    /// Reads SOF, DRI and SOS. Only baseline/extended sequential Huffman frames (SOF0/SOF1)
    /// with 8-bit samples are supported, which is what the dataset writes.
    pub fn parse(stream: &[u8]) -> Result<FrameLayout, ScanError> {
        let (segs, scan_start) =
            header_segments(stream).map_err(|e| ScanError::Header(e.to_string()))?;
        // (height, width, components as (id, sampling, table))
        let mut frame: Option<(u32, u32, Vec<SofComponent>)> = None;
        let mut restart_interval = 0u32;
        let mut scan: Option<Vec<(u8, u8, u8)>> = None;
        for seg in &segs {
            let b = seg.bytes;
            match seg.marker {
                m if is_sof(m) => {
                    if m != 0xC0 && m != 0xC1 {
                        return Err(ScanError::Unsupported(format!(
                            "frame type FF {m:02X} is not baseline Huffman (SOF0/SOF1)"
                        )));
                    }
                    if b.len() < 10 {
                        return Err(ScanError::Header("frame header too short".into()));
                    }
                    if b[4] != 8 {
                        return Err(ScanError::Unsupported(format!("{}-bit samples", b[4])));
                    }
                    let height = u16::from_be_bytes([b[5], b[6]]) as u32;
                    let width = u16::from_be_bytes([b[7], b[8]]) as u32;
                    let n = b[9] as usize;
                    if n == 0 || b.len() < 10 + 3 * n {
                        return Err(ScanError::Header("frame header lists no components".into()));
                    }
                    let comps = (0..n)
                        .map(|i| {
                            let c = &b[10 + 3 * i..13 + 3 * i];
                            (c[0], c[1] >> 4, c[1] & 15)
                        })
                        .collect::<Vec<_>>();
                    if comps
                        .iter()
                        .any(|&(_, h, v)| !(1..=4).contains(&h) || !(1..=4).contains(&v))
                    {
                        return Err(ScanError::Header("sampling factor outside 1..4".into()));
                    }
                    frame = Some((width, height, comps));
                }
                0xDD => {
                    if b.len() < 6 {
                        return Err(ScanError::Header("DRI segment too short".into()));
                    }
                    restart_interval = u16::from_be_bytes([b[4], b[5]]) as u32;
                }
                0xDA => {
                    let n = *b.get(4).unwrap_or(&0) as usize;
                    if n == 0 || b.len() < 5 + 2 * n + 3 {
                        return Err(ScanError::Header("scan header too short".into()));
                    }
                    scan = Some(
                        (0..n)
                            .map(|i| (b[5 + 2 * i], b[6 + 2 * i] >> 4, b[6 + 2 * i] & 15))
                            .collect(),
                    );
                }
                _ => {}
            }
        }
        let (width, height, comps) =
            frame.ok_or_else(|| ScanError::Header("no frame header (SOF)".into()))?;
        let scan = scan.ok_or_else(|| ScanError::Header("no scan header (SOS)".into()))?;
        if width == 0 || height == 0 {
            return Err(ScanError::Header(format!("{width}x{height} frame")));
        }
        let hmax = comps.iter().map(|c| c.1 as u32).max().unwrap_or(1);
        let vmax = comps.iter().map(|c| c.2 as u32).max().unwrap_or(1);
        let mut components = Vec::new();
        for &(id, dc, ac) in &scan {
            let &(_, h, v) = comps.iter().find(|c| c.0 == id).ok_or_else(|| {
                ScanError::Header(format!("scan component {id} is not in the frame"))
            })?;
            components.push(Component {
                id,
                h,
                v,
                dc_table: dc,
                ac_table: ac,
            });
        }
        let div = |a: u32, b: u32| a.div_ceil(b);
        let (mcu_width, mcu_height, mcus_per_row, mcu_rows) = if components.len() == 1 {
            // A non-interleaved scan: one block per MCU, over the component's own grid.
            let c = components[0];
            let (cw, ch) = (
                div(width * c.h as u32, hmax),
                div(height * c.v as u32, vmax),
            );
            (
                8 * hmax / c.h as u32,
                8 * vmax / c.v as u32,
                div(cw, 8),
                div(ch, 8),
            )
        } else {
            (
                8 * hmax,
                8 * vmax,
                div(width, 8 * hmax),
                div(height, 8 * vmax),
            )
        };
        Ok(FrameLayout {
            width,
            height,
            components,
            mcu_width,
            mcu_height,
            mcus_per_row,
            mcu_rows,
            restart_interval,
            scan_start,
        })
    }

    pub fn total_mcus(&self) -> u64 {
        self.mcus_per_row as u64 * self.mcu_rows as u64
    }

    /// Restart intervals the frame should have (1 when there are no restart markers).
    pub fn total_intervals(&self) -> u64 {
        match self.restart_interval {
            0 => 1,
            ri => self.total_mcus().div_ceil(ri as u64),
        }
    }

    /// Blocks (8x8 data units) per MCU in the scan.
    pub(crate) fn blocks_per_mcu(&self) -> u32 {
        if self.components.len() == 1 {
            1
        } else {
            self.components.iter().map(|c| (c.h * c.v) as u32).sum()
        }
    }
}

/// How a piece of entropy-coded data ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntervalEnd {
    /// A restart marker `FF D0+n`, at this offset.
    Restart { n: u8, at: usize },
    /// EOI (`FF D9`) at this offset.
    Eoi { at: usize },
    /// Some other marker at this offset.
    Marker { marker: u8, at: usize },
    /// The bytes ran out.
    EndOfData,
}

/// One stretch of entropy-coded data between restart markers: `data[start..end]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval {
    pub start: usize,
    pub end: usize,
    pub ended_by: IntervalEnd,
}

/// Splits the scan data starting at `scan_start` into the stretches between restart markers,
/// stopping at EOI, any other marker, or the end of the data. Stuffed `FF 00` and fill bytes
/// (`FF FF`) are data, never boundaries.
pub fn intervals(data: &[u8], scan_start: usize) -> Vec<Interval> {
    let mut out = Vec::new();
    let mut start = scan_start.min(data.len());
    let mut i = start;
    while i + 1 < data.len() {
        if data[i] != 0xFF {
            i += 1;
            continue;
        }
        let next = data[i + 1];
        match next {
            0x00 | 0xFF => i += 1 + (next == 0x00) as usize,
            0xD0..=0xD7 => {
                out.push(Interval {
                    start,
                    end: i,
                    ended_by: IntervalEnd::Restart {
                        n: next - 0xD0,
                        at: i,
                    },
                });
                i += 2;
                start = i;
            }
            marker => {
                let ended_by = if marker == 0xD9 {
                    IntervalEnd::Eoi { at: i }
                } else {
                    IntervalEnd::Marker { marker, at: i }
                };
                out.push(Interval {
                    start,
                    end: i,
                    ended_by,
                });
                return out;
            }
        }
    }
    out.push(Interval {
        start,
        end: data.len(),
        ended_by: IntervalEnd::EndOfData,
    });
    out
}

/// Byte offset where a prompt of the first `rows` MCU rows ends.
///
/// The cut is at the restart marker that closes the interval holding the last MCU of row
/// `rows - 1` (with a restart interval that does not divide the row, a few MCUs of the next row
/// come along). `after_marker` puts the cut after that marker's two bytes, as the paper's code
/// does (`trim_after_n_occurrences`), otherwise right before it. `rows == 0` cuts at the start of
/// the scan data (header only); `rows >= mcu_rows` keeps the whole scan, up to (not including) EOI.
pub fn row_cut(
    data: &[u8],
    layout: &FrameLayout,
    rows: u32,
    after_marker: bool,
) -> Result<usize, ScanError> {
    if rows == 0 {
        return Ok(layout.scan_start);
    }
    let ivs = intervals(data, layout.scan_start);
    if rows >= layout.mcu_rows {
        return match ivs.last().map(|iv| iv.ended_by) {
            Some(IntervalEnd::Eoi { at }) => Ok(at),
            _ => Err(ScanError::Cut(
                "the stream has no EOI: it is not a complete image".into(),
            )),
        };
    }
    if layout.restart_interval == 0 {
        return Err(ScanError::Cut(
            "the stream has no restart markers, so it cannot be cut at an MCU row: build the dataset with --restart-interval 1 (the paper's setting)".into(),
        ));
    }
    let mcus = rows as u64 * layout.mcus_per_row as u64;
    let markers = mcus.div_ceil(layout.restart_interval as u64) as usize;
    match ivs.get(markers - 1).map(|iv| iv.ended_by) {
        Some(IntervalEnd::Restart { at, .. }) => Ok(if after_marker { at + 2 } else { at }),
        _ => Err(ScanError::Cut(format!(
            "the stream has fewer than {markers} restart markers: it is damaged or not of this layout"
        ))),
    }
}

/// MCU rows kept for a ratio: `round(ratio * rows)`. For a 256x256 4:2:0 image at restart
/// interval 1 (16 rows) and the paper's ratios (0.25, 0.375, 0.4375, 0.5, 0.75) this is the
/// paper's cut after the `int(32 * ratio)`-th `FF D7` (32 * ratio is even there); for ratios
/// where it is odd the paper cuts mid-row and this rounds to a whole row.
pub fn rows_for_ratio(ratio: f64, mcu_rows: u32) -> u32 {
    ((ratio.clamp(0.0, 1.0) * mcu_rows as f64).round() as u32).min(mcu_rows)
}

/// Where a prompt of the first `round(ratio * rows)` MCU rows of `stream` ends: its layout,
/// the rows kept, and the byte offset of the cut (before or after the restart marker that
/// closes the last row kept; `ratio` 0 is the header alone, 1 the whole scan without EOI).
pub fn ratio_cut(
    stream: &[u8],
    ratio: f64,
    after_marker: bool,
) -> Result<(FrameLayout, u32, usize), ScanError> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(ScanError::Cut(format!("ratio {ratio} is outside 0..1")));
    }
    let layout = FrameLayout::parse(stream)?;
    let rows = rows_for_ratio(ratio, layout.mcu_rows);
    let cut = row_cut(stream, &layout, rows, after_marker)?;
    Ok((layout, rows, cut))
}

/// Canonical Huffman decoding tables of one DHT table (JPEG Annex C/F).
#[derive(Clone, Debug)]
struct Huffman {
    /// For each code length 1..=16: (first code, number of codes, index of its first symbol).
    lengths: [(u32, u32, u32); 17],
    symbols: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8], symbols: &[u8]) -> Huffman {
        let mut lengths = [(0u32, 0u32, 0u32); 17];
        let (mut code, mut index) = (0u32, 0u32);
        for len in 1..=16 {
            let n = counts[len - 1] as u32;
            lengths[len] = (code, n, index);
            code = (code + n) << 1;
            index += n;
        }
        Huffman {
            lengths,
            symbols: symbols.to_vec(),
        }
    }

    /// Every code of the table: (code, length in bits, symbol), in symbol order.
    pub(crate) fn codes(&self) -> Vec<(u32, u32, u8)> {
        let mut out = Vec::with_capacity(self.symbols.len());
        for len in 1..=16u32 {
            let (first, n, index) = self.lengths[len as usize];
            for i in 0..n {
                if let Some(&s) = self.symbols.get((index + i) as usize) {
                    out.push((first + i, len, s));
                }
            }
        }
        out
    }

    fn decode(&self, bits: &mut Bits) -> Option<u8> {
        let mut code = 0u32;
        for len in 1..=16 {
            code = (code << 1) | bits.bit()?;
            let (first, n, index) = self.lengths[len];
            if code >= first && code - first < n {
                return self.symbols.get((index + code - first) as usize).copied();
            }
        }
        None
    }
}

/// The DC and AC Huffman tables (ids 0..3) found in DHT segments.
#[derive(Clone, Debug, Default)]
pub struct HuffmanTables {
    dc: [Option<Huffman>; 4],
    ac: [Option<Huffman>; 4],
}

impl HuffmanTables {
    /// Collects the DHT tables of a JPEG header (a tables-only stream, or a full file).
    pub fn from_stream(stream: &[u8]) -> Result<HuffmanTables, ScanError> {
        let (segs, _) = header_segments(stream).map_err(|e| ScanError::Header(e.to_string()))?;
        let mut t = HuffmanTables::default();
        for seg in segs.iter().filter(|s| s.marker == 0xC4) {
            let mut p = &seg.bytes[4..];
            while p.len() >= 17 {
                let (class, id) = (p[0] >> 4, (p[0] & 15) as usize);
                let counts = &p[1..17];
                let n: usize = counts.iter().map(|&c| c as usize).sum();
                if p.len() < 17 + n || id > 3 || class > 1 {
                    return Err(ScanError::Header("malformed DHT segment".into()));
                }
                let h = Huffman::new(counts, &p[17..17 + n]);
                if class == 0 {
                    t.dc[id] = Some(h);
                } else {
                    t.ac[id] = Some(h);
                }
                p = &p[17 + n..];
            }
        }
        Ok(t)
    }

    /// The codes of DC (`ac == false`) or AC table `id`, when defined.
    pub(crate) fn codes(&self, ac: bool, id: u8) -> Option<Vec<(u32, u32, u8)>> {
        let t = if ac { &self.ac } else { &self.dc };
        t.get(id as usize)?.as_ref().map(Huffman::codes)
    }

    fn is_empty(&self) -> bool {
        self.dc.iter().chain(&self.ac).all(Option::is_none)
    }
}

/// Reads the bits of one interval's entropy-coded bytes, with `FF 00` unstuffed.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u32,
    n: u32,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8]) -> Bits<'a> {
        Bits {
            data,
            pos: 0,
            acc: 0,
            n: 0,
        }
    }

    fn bit(&mut self) -> Option<u32> {
        if self.n == 0 {
            let &b = self.data.get(self.pos)?;
            self.pos += 1;
            if b == 0xFF {
                match self.data.get(self.pos) {
                    Some(0x00) => self.pos += 1,
                    // Fill bytes before a marker are not data.
                    _ => return None,
                }
            }
            self.acc = b as u32;
            self.n = 8;
        }
        self.n -= 1;
        Some((self.acc >> self.n) & 1)
    }

    fn bits(&mut self, n: u32) -> Option<u32> {
        (0..n).try_fold(0u32, |v, _| Some((v << 1) | self.bit()?))
    }

    /// True when what is left is padding: fewer than 8 bits, all ones, then nothing (or fill).
    fn only_padding_left(&mut self) -> bool {
        let pad = (1u32 << self.n) - 1;
        if self.acc & pad != pad {
            return false;
        }
        self.data[self.pos..].iter().all(|&b| b == 0xFF)
    }
}

/// Huffman-decodes one block; false on an invalid code, a coefficient past 63 or running out.
fn block_ok(bits: &mut Bits, dc: &Huffman, ac: &Huffman) -> bool {
    let Some(s) = dc.decode(bits) else {
        return false;
    };
    if s > 11 || bits.bits(s as u32).is_none() {
        return false;
    }
    let mut k = 1;
    while k < 64 {
        let Some(rs) = ac.decode(bits) else {
            return false;
        };
        let (r, s) = ((rs >> 4) as usize, (rs & 15) as u32);
        if s == 0 {
            if r == 15 {
                k += 16;
                continue;
            }
            return true; // end of block
        }
        k += r;
        if k > 63 || s > 10 || bits.bits(s).is_none() {
            return false;
        }
        k += 1;
    }
    k == 64
}

/// What [`check_scan`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScanCheck {
    /// MCUs the frame header promises.
    pub mcus_total: u64,
    /// MCUs in well-formed intervals at their right place (see [`check_scan`]).
    pub mcus_ok: u64,
    /// Restart intervals the frame should have, found, and well-formed.
    pub intervals_expected: u64,
    pub intervals_found: u64,
    pub intervals_ok: u64,
    /// The scan ended with EOI (not a truncation or a stray marker).
    pub ends_with_eoi: bool,
}

impl ScanCheck {
    /// Fraction of the frame's MCUs that decode (0 when the frame has none).
    pub fn mcu_fraction(&self) -> f64 {
        if self.mcus_total == 0 {
            0.0
        } else {
            self.mcus_ok as f64 / self.mcus_total as f64
        }
    }
}

/// Checks every restart interval of a stream at the Huffman level.
///
/// An interval counts as well-formed when (1) it is in sequence: the `j`-th interval is preceded
/// by marker `RST((j-1) mod 8)` and every earlier interval was found, (2) each of its MCUs
/// (the restart interval's count, fewer in the last one) Huffman-decodes with the stream's
/// tables: valid codes, at most 64 coefficients per block, magnitude categories in range, and
/// (3) nothing but the 1-bit padding is left after its last MCU. `mcus_ok` counts the MCUs of
/// well-formed intervals; intervals past the frame's end are ignored. A clean stream scores
/// 1.0; one truncated halfway about 0.5. Huffman validity does not prove the pixels are
/// plausible, only that a decoder reads them without losing sync. Bounded by the data length.
pub fn check_scan(
    stream: &[u8],
    layout: &FrameLayout,
    tables: &HuffmanTables,
) -> Result<ScanCheck, ScanError> {
    if tables.is_empty() {
        return Err(ScanError::Header(
            "no Huffman tables: splice the dataset's tables into the stream first".into(),
        ));
    }
    let mut comps = Vec::new();
    for c in &layout.components {
        let dc = tables.dc[(c.dc_table & 3) as usize].as_ref();
        let ac = tables.ac[(c.ac_table & 3) as usize].as_ref();
        match (dc, ac) {
            (Some(dc), Some(ac)) if c.dc_table < 4 && c.ac_table < 4 => {
                let blocks = if layout.components.len() == 1 {
                    1
                } else {
                    c.h as u32 * c.v as u32
                };
                comps.push((blocks, dc, ac));
            }
            _ => {
                return Err(ScanError::Header(format!(
                    "component {} uses Huffman tables ({}, {}) that are not defined",
                    c.id, c.dc_table, c.ac_table
                )))
            }
        }
    }
    debug_assert_eq!(
        comps.iter().map(|c| c.0).sum::<u32>(),
        layout.blocks_per_mcu()
    );
    let total = layout.total_mcus();
    let per_interval = match layout.restart_interval {
        0 => total,
        ri => ri as u64,
    };
    let expected = layout.total_intervals();
    let ivs = intervals(stream, layout.scan_start);
    let mut check = ScanCheck {
        mcus_total: total,
        intervals_expected: expected,
        intervals_found: ivs.len() as u64,
        ends_with_eoi: matches!(
            ivs.last().map(|i| i.ended_by),
            Some(IntervalEnd::Eoi { .. })
        ),
        ..ScanCheck::default()
    };
    for (j, iv) in ivs.iter().enumerate().take(expected as usize) {
        let j = j as u64;
        let in_sequence = j == 0
            || matches!(ivs[j as usize - 1].ended_by,
                IntervalEnd::Restart { n, .. } if n as u64 == (j - 1) % 8);
        if !in_sequence {
            // A marker out of order: libjpeg resynchronises, but from here on the MCUs land in
            // the wrong place, so none of them count.
            break;
        }
        let mcus = per_interval.min(total - j * per_interval);
        let mut bits = Bits::new(&stream[iv.start..iv.end]);
        let ok = (0..mcus).all(|_| {
            comps
                .iter()
                .all(|&(blocks, dc, ac)| (0..blocks).all(|_| block_ok(&mut bits, dc, ac)))
        }) && bits.only_padding_left();
        if ok {
            check.intervals_ok += 1;
            check.mcus_ok += mcus;
        }
    }
    Ok(check)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::jpeg::markers::splice_tables;
    use crate::jpeg::mozjpeg::{self as jpeg, JpegSettings, Subsampling};

    /// A smooth gradient plus noise, `w x h` RGB: realistic code lengths.
    pub(crate) fn noise(w: u32, h: u32, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..w * h * 3)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // Smooth gradient plus noise: realistic code lengths.
                ((i / 3 % w) as u64 * 200 / w as u64 + (s % 40)) as u8
            })
            .collect()
    }

    fn stream(w: u32, h: u32, settings: JpegSettings) -> (Vec<u8>, HuffmanTables) {
        let abbr = jpeg::encode(&noise(w, h, 7), w, h, &settings, true).unwrap();
        let tables = jpeg::tables_only(&settings).unwrap();
        let full = splice_tables(&abbr, &tables).unwrap();
        (full, HuffmanTables::from_stream(&tables).unwrap())
    }

    #[test]
    fn layout_of_the_papers_stream() {
        let (full, tables) = stream(256, 256, JpegSettings::default());
        let l = FrameLayout::parse(&full).unwrap();
        assert_eq!(
            (
                l.mcu_width,
                l.mcu_height,
                l.mcus_per_row,
                l.mcu_rows,
                l.restart_interval
            ),
            (16, 16, 16, 16, 1)
        );
        let ivs = intervals(&full, l.scan_start);
        assert_eq!(ivs.len(), 256);
        assert!(matches!(ivs[255].ended_by, IntervalEnd::Eoi { .. }));
        let c = check_scan(&full, &l, &tables).unwrap();
        assert_eq!((c.mcus_ok, c.mcus_total, c.intervals_ok), (256, 256, 256));
        assert!(c.ends_with_eoi);
    }

    #[test]
    fn other_sizes_sampling_and_intervals() {
        for (w, h, sub, ri, mcu, grid) in [
            (100, 60, Subsampling::S444, 3, (8, 8), (13, 8)),
            (100, 60, Subsampling::S422, 2, (16, 8), (7, 8)),
            (33, 47, Subsampling::S420, 5, (16, 16), (3, 3)),
        ] {
            let settings = JpegSettings {
                quality: 50,
                subsampling: sub,
                restart_interval: ri,
            };
            let (full, tables) = stream(w, h, settings);
            let l = FrameLayout::parse(&full).unwrap();
            assert_eq!((l.mcu_width, l.mcu_height), mcu, "{w}x{h} {sub:?}");
            assert_eq!((l.mcus_per_row, l.mcu_rows), grid, "{w}x{h} {sub:?}");
            let c = check_scan(&full, &l, &tables).unwrap();
            assert_eq!(c.mcus_ok, c.mcus_total, "{w}x{h} {sub:?} ri {ri}");
            assert_eq!(c.intervals_found, l.total_intervals());
        }
    }

    #[test]
    fn truncation_and_damage_lower_the_fraction() {
        let (full, tables) = stream(256, 256, JpegSettings::default());
        let l = FrameLayout::parse(&full).unwrap();
        let ivs = intervals(&full, l.scan_start);
        // Cut in the middle of interval 128: intervals 0..127 survive.
        let cut = (ivs[128].start + ivs[128].end) / 2;
        let c = check_scan(&full[..cut], &l, &tables).unwrap();
        assert_eq!(c.mcus_ok, 128);
        assert!((c.mcu_fraction() - 0.5).abs() < 1e-9);
        assert!(!c.ends_with_eoi);
        // A swapped restart marker: everything after it is out of sequence.
        let mut swapped = full.clone();
        let IntervalEnd::Restart { at, .. } = ivs[63].ended_by else {
            panic!()
        };
        swapped[at + 1] = 0xD0 + ((swapped[at + 1] - 0xD0 + 3) % 8);
        let c = check_scan(&swapped, &l, &tables).unwrap();
        assert_eq!(c.mcus_ok, 64);
        // Flipping bits inside one MCU breaks that interval only (or, rarely, none).
        let mut flipped = full.clone();
        let i = ivs[10].start + 1;
        assert!(flipped[i - 1] != 0xFF && flipped[i] != 0xFF && flipped[i] ^ 0x5A != 0xFF);
        flipped[i] ^= 0x5A;
        let c = check_scan(&flipped, &l, &tables).unwrap();
        assert_eq!(c.mcus_ok, 255, "{c:?}");
    }

    #[test]
    fn row_cuts_land_on_markers() {
        let (full, _) = stream(256, 256, JpegSettings::default());
        let l = FrameLayout::parse(&full).unwrap();
        assert_eq!(row_cut(&full, &l, 0, true).unwrap(), l.scan_start);
        let end = row_cut(&full, &l, 16, true).unwrap();
        assert_eq!(&full[end..], &[0xFF, 0xD9]);
        for k in 1..16 {
            let at = row_cut(&full, &l, k, false).unwrap();
            // The marker after MCU 16k is RST((16k - 1) mod 8).
            assert_eq!(&full[at..at + 2], &[0xFF, 0xD0 + ((16 * k - 1) % 8) as u8]);
            assert_eq!(row_cut(&full, &l, k, true).unwrap(), at + 2);
        }
        assert!(row_cut(&full[..full.len() / 3], &l, 12, true).is_err());
    }
}
