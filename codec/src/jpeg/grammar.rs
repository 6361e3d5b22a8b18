//! The grammar of a dataset's JPEG streams, byte by byte, for constrained sampling.
//!
//! Every stream of a dataset has the same header (SOI, APP0, SOF0, DRI, SOS: the size, the
//! sampling factors and the restart interval are settings of the dataset; the tables are
//! shared and not in the stream), so the header is forced byte for byte. The scan follows a
//! Huffman-level state machine over the dataset's tables: for every block of every MCU (the
//! blocks of an MCU from the sampling factors), a DC code and its amplitude bits, then AC codes
//! and amplitude bits, at most 64 coefficients; a data byte `FF` is followed by the stuffed
//! `00`; each restart interval ends with 1-bit padding to the byte and the next `RSTn` of the
//! cycle; after the last MCU the padding and `EOI`. Nothing may follow `EOI`.
//!
//! A state has no dead ends: a Huffman tree node is entered only while some code below it is
//! still valid at the current coefficient position, so every accepted prefix can be finished.
//! What the grammar accepts is a subset of what [`check_scan`](super::scan::check_scan) counts
//! as well-formed (and so of what libjpeg decodes without a warning); it is stricter in one
//! place: a zero run (`ZRL`) must leave room for a coefficient after it, as encoders do.

use super::scan::{FrameLayout, HuffmanTables, ScanError};
use crate::grammar::ByteGrammar;

const NONE: u32 = u32::MAX;
const LEAF: u32 = 1 << 31;

/// One Huffman table as a binary tree, with what its subtrees can still produce.
#[derive(Clone, Debug)]
struct Tree {
    /// Children of each node (0 is the root): another node's index, `LEAF | symbol`, or NONE.
    child: Vec<[u32; 2]>,
    /// For an AC table, per node: an end of block below it; the smallest zero run of a nonzero
    /// coefficient below it (64: none); a `ZRL` below it.
    eob: Vec<bool>,
    min_run: Vec<u8>,
    zrl: Vec<bool>,
}

impl Tree {
    /// The tree of the codes of one table, keeping only the symbols a baseline stream may use:
    /// DC categories up to 11; AC `EOB`, `ZRL` and run/size pairs with sizes 1..=10.
    fn new(codes: &[(u32, u32, u8)], ac: bool) -> Tree {
        let mut t = Tree {
            child: vec![[NONE; 2]],
            eob: vec![false],
            min_run: vec![64],
            zrl: vec![false],
        };
        for &(code, len, sym) in codes {
            let valid = if ac {
                let (r, s) = (sym >> 4, sym & 15);
                (s == 0 && (r == 0 || r == 15)) || (1..=10).contains(&s)
            } else {
                sym <= 11
            };
            if !valid {
                continue;
            }
            let mut node = 0usize;
            let mut path = vec![0usize];
            for i in (0..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    t.child[node][bit] = LEAF | sym as u32;
                    break;
                }
                let next = t.child[node][bit];
                node = if next == NONE {
                    let n = t.child.len();
                    t.child.push([NONE; 2]);
                    t.eob.push(false);
                    t.min_run.push(64);
                    t.zrl.push(false);
                    t.child[node][bit] = n as u32;
                    n
                } else {
                    next as usize
                };
                path.push(node);
            }
            for n in path {
                let (r, s) = (sym >> 4, sym & 15);
                match (r, s) {
                    (0, 0) => t.eob[n] = true,
                    (15, 0) => t.zrl[n] = true,
                    _ => t.min_run[n] = t.min_run[n].min(r),
                }
            }
        }
        t
    }

    /// True when some AC code below `node` is valid at coefficient position `k` (1..=63).
    fn alive(&self, node: usize, k: u32) -> bool {
        self.eob[node] || k + self.min_run[node] as u32 <= 63 || (self.zrl[node] && k + 16 <= 63)
    }
}

/// Where a stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Inside the fixed header, at byte `header`.
    Header,
    /// Entropy-coded data, at a byte boundary.
    Data,
    /// After a data byte `FF`: the stuffed `00` must follow.
    Stuff,
    /// The interval is complete: the marker's `FF`, then its code.
    MarkerFf,
    Marker,
    /// After EOI.
    Done,
}

/// The state of a stream under a [`JpegGrammar`]: 16 bytes, `Copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JpegState {
    phase: Phase,
    /// Bytes of the header consumed (in `Header`).
    header: u16,
    /// MCUs of the frame finished.
    mcu: u32,
    /// The block of the MCU being coded, and its next coefficient (0: the DC).
    block: u8,
    k: u8,
    /// The Huffman tree node reached by the code bits read so far.
    node: u16,
    /// Amplitude bits still to come.
    bits: u8,
    /// The interval is complete: the rest of the current byte is 1-bit padding.
    pad: bool,
}

impl JpegState {
    /// MCUs of the frame finished so far.
    pub fn mcus(&self) -> u32 {
        self.mcu
    }

    /// True once the fixed header has been written.
    pub fn in_scan(&self) -> bool {
        self.phase != Phase::Header
    }
}

/// The byte grammar of one dataset's abbreviated JPEG streams (see the module docs).
#[derive(Clone, Debug)]
pub struct JpegGrammar {
    header: Vec<u8>,
    /// (DC tree, AC tree) of each block of an MCU, in scan order.
    blocks: Vec<(u8, u8)>,
    trees: Vec<Tree>,
    total_mcus: u32,
    /// MCUs per restart interval (the whole frame without restart markers).
    per_interval: u32,
    layout: FrameLayout,
}

impl JpegGrammar {
    /// The grammar of a dataset's images: the header its encoder writes for `size` x `size`
    /// images with `settings` (a blank image encoded that way; every stream of the dataset
    /// starts with it) and its tables-only stream `tables`.
    #[cfg(feature = "mozjpeg")]
    pub fn of_dataset(
        size: u32,
        settings: &super::JpegSettings,
        tables: &[u8],
    ) -> Result<JpegGrammar, String> {
        let grey = vec![128u8; size as usize * size as usize * 3];
        let blank = super::encode(&grey, size, size, settings, true)
            .map_err(|e| format!("encoding the dataset's JPEG header: {e}"))?;
        let tables = HuffmanTables::from_stream(tables)
            .map_err(|e| format!("the dataset's JPEG tables: {e}"))?;
        JpegGrammar::new(&blank, &tables).map_err(|e| e.to_string())
    }

    /// The grammar of streams with `stream`'s header (everything before its scan data: SOI
    /// through the SOS header, as the dataset writes it) coded with `tables` (the dataset's
    /// shared DQT/DHT). `stream` may be a header alone or a whole stream.
    pub fn new(stream: &[u8], tables: &HuffmanTables) -> Result<JpegGrammar, ScanError> {
        let layout = FrameLayout::parse(stream)?;
        let header = stream[..layout.scan_start].to_vec();
        if header.len() > u16::MAX as usize {
            return Err(ScanError::Unsupported(format!(
                "a {}-byte header (APPn data?): the dataset's streams have short fixed headers",
                header.len()
            )));
        }
        let total = layout.total_mcus();
        if total > u32::MAX as u64 / 2 {
            return Err(ScanError::Unsupported(format!("{total} MCUs")));
        }
        let mut trees: Vec<Tree> = Vec::new();
        let mut tree_of = std::collections::HashMap::new();
        let mut tree = |ac: bool, id: u8| -> Result<u8, ScanError> {
            if let Some(&i) = tree_of.get(&(ac, id)) {
                return Ok(i);
            }
            let codes = tables.codes(ac, id).ok_or_else(|| {
                ScanError::Header(format!(
                    "the scan uses {} Huffman table {id}, which the tables do not define",
                    if ac { "AC" } else { "DC" }
                ))
            })?;
            let t = Tree::new(&codes, ac);
            let usable = if ac {
                t.eob[0]
            } else {
                t.child[0] != [NONE; 2]
            };
            if !usable {
                return Err(ScanError::Unsupported(format!(
                    "{} Huffman table {id} has {}",
                    if ac { "AC" } else { "DC" },
                    if ac {
                        "no end-of-block code"
                    } else {
                        "no baseline category"
                    }
                )));
            }
            let i = trees.len() as u8;
            trees.push(t);
            tree_of.insert((ac, id), i);
            Ok(i)
        };
        let mut blocks = Vec::new();
        for c in &layout.components {
            let (dc, ac) = (tree(false, c.dc_table)?, tree(true, c.ac_table)?);
            let n = if layout.components.len() == 1 {
                1
            } else {
                c.h as usize * c.v as usize
            };
            blocks.extend(std::iter::repeat_n((dc, ac), n));
        }
        if blocks.len() > 10 {
            return Err(ScanError::Unsupported(format!(
                "{} blocks per MCU (at most 10 in a baseline scan)",
                blocks.len()
            )));
        }
        let per_interval = match layout.restart_interval {
            0 => total as u32,
            ri => ri.min(total as u32),
        };
        Ok(JpegGrammar {
            header,
            blocks,
            trees,
            total_mcus: total as u32,
            per_interval,
            layout,
        })
    }

    /// The fixed header every stream starts with.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    pub fn layout(&self) -> &FrameLayout {
        &self.layout
    }

    /// One bit of entropy-coded data (not padding).
    #[inline]
    fn bit(&self, s: &mut JpegState, bit: usize) -> bool {
        let k = s.k as u32;
        if s.bits > 0 {
            s.bits -= 1;
            if s.bits == 0 {
                s.k += 1;
                if s.k == 64 {
                    self.block_done(s);
                }
            }
            return true;
        }
        let (dc, ac) = self.blocks[s.block as usize];
        let tree = &self.trees[if k == 0 { dc } else { ac } as usize];
        let c = tree.child[s.node as usize][bit];
        if c == NONE {
            return false;
        }
        if c & LEAF == 0 {
            if k > 0 && !tree.alive(c as usize, k) {
                return false;
            }
            s.node = c as u16;
            return true;
        }
        s.node = 0;
        let sym = (c & 0xFF) as u8;
        if k == 0 {
            // DC: the category, then that many amplitude bits; the AC codes start at 1.
            if sym == 0 {
                s.k = 1;
            } else {
                s.bits = sym;
            }
            return true;
        }
        let (r, size) = ((sym >> 4) as u32, sym & 15);
        match (r, size) {
            (0, 0) => self.block_done(s),
            (15, 0) => {
                if k + 16 > 63 {
                    return false;
                }
                s.k += 16;
            }
            _ => {
                if k + r > 63 {
                    return false;
                }
                s.k += r as u8;
                s.bits = size;
            }
        }
        true
    }

    #[inline]
    fn block_done(&self, s: &mut JpegState) {
        s.k = 0;
        s.node = 0;
        s.block += 1;
        if s.block as usize == self.blocks.len() {
            s.block = 0;
            s.mcu += 1;
            if s.mcu % self.per_interval == 0 || s.mcu == self.total_mcus {
                s.pad = true;
            }
        }
    }

    /// The marker code that ends the interval just completed.
    fn marker(&self, s: &JpegState) -> u8 {
        if s.mcu >= self.total_mcus {
            0xD9
        } else {
            0xD0 + ((s.mcu / self.per_interval - 1) % 8) as u8
        }
    }
}

impl ByteGrammar for JpegGrammar {
    type State = JpegState;

    fn start(&self) -> JpegState {
        JpegState {
            phase: if self.header.is_empty() {
                Phase::Data
            } else {
                Phase::Header
            },
            header: 0,
            mcu: 0,
            block: 0,
            k: 0,
            node: 0,
            bits: 0,
            pad: false,
        }
    }

    #[inline]
    fn step(&self, s: &mut JpegState, byte: u8) -> bool {
        match s.phase {
            Phase::Header => {
                if self.header[s.header as usize] != byte {
                    return false;
                }
                s.header += 1;
                if s.header as usize == self.header.len() {
                    s.phase = Phase::Data;
                }
                true
            }
            Phase::Data => {
                for i in (0..8).rev() {
                    let bit = (byte >> i) & 1;
                    if s.pad {
                        if bit == 0 {
                            return false;
                        }
                    } else if !self.bit(s, bit as usize) {
                        return false;
                    }
                }
                s.phase = if byte == 0xFF {
                    Phase::Stuff
                } else if s.pad {
                    Phase::MarkerFf
                } else {
                    Phase::Data
                };
                true
            }
            Phase::Stuff => {
                if byte != 0 {
                    return false;
                }
                s.phase = if s.pad { Phase::MarkerFf } else { Phase::Data };
                true
            }
            Phase::MarkerFf => {
                if byte != 0xFF {
                    return false;
                }
                s.phase = Phase::Marker;
                true
            }
            Phase::Marker => {
                if byte != self.marker(s) {
                    return false;
                }
                s.phase = if byte == 0xD9 {
                    Phase::Done
                } else {
                    s.pad = false;
                    Phase::Data
                };
                true
            }
            Phase::Done => false,
        }
    }

    fn complete(&self, s: &JpegState) -> bool {
        s.phase == Phase::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grammar::TokenTrie;
    use crate::jpeg::markers::splice_tables;
    use crate::jpeg::mozjpeg::{self as jpeg, JpegSettings, Subsampling};
    use crate::jpeg::scan::check_scan;
    use crate::jpeg::scan::tests::noise;

    fn settings(sub: Subsampling, ri: u16) -> JpegSettings {
        JpegSettings {
            restart_interval: ri,
            subsampling: sub,
            ..JpegSettings::default()
        }
    }

    /// (abbreviated stream, tables-only stream) of a noisy image.
    fn stream(w: u32, h: u32, s: &JpegSettings, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let abbr = jpeg::encode(&noise(w, h, seed), w, h, s, true).unwrap();
        (abbr, jpeg::tables_only(s).unwrap())
    }

    fn grammar(abbr: &[u8], tables: &[u8]) -> JpegGrammar {
        JpegGrammar::new(abbr, &HuffmanTables::from_stream(tables).unwrap()).unwrap()
    }

    /// The cases of the issue: 4:2:0 and 4:4:4, restart intervals 1 and 4, sizes 256 and 64
    /// (and an odd size and no restart markers).
    fn cases() -> Vec<(u32, u32, JpegSettings)> {
        let mut out = Vec::new();
        for sub in [Subsampling::S420, Subsampling::S444] {
            for ri in [1, 4] {
                for size in [256, 64] {
                    out.push((size, size, settings(sub, ri)));
                }
            }
        }
        out.push((40, 24, settings(Subsampling::S422, 3)));
        out.push((64, 64, settings(Subsampling::S420, 0)));
        out
    }

    #[test]
    fn every_encoded_stream_is_accepted_and_complete_at_its_end() {
        for (w, h, s) in cases() {
            for seed in 1..3 {
                let (abbr, tables) = stream(w, h, &s, seed);
                let g = grammar(&abbr, &tables);
                let mut st = g.start();
                for (i, &b) in abbr.iter().enumerate() {
                    assert!(!g.complete(&st), "{w}x{h} {s:?}: complete before byte {i}");
                    assert!(
                        g.step(&mut st, b),
                        "{w}x{h} {s:?}: byte {i} of {} rejected",
                        abbr.len()
                    );
                }
                assert!(g.complete(&st), "{w}x{h} {s:?}");
                assert_eq!(st.mcus() as u64, g.layout().total_mcus());
                // Nothing may follow EOI.
                assert!(!g.step(&mut st.clone(), 0));
            }
        }
    }

    #[test]
    fn damage_is_rejected_where_it_happens() {
        let s = settings(Subsampling::S420, 1);
        let (abbr, tables) = stream(64, 64, &s, 5);
        let g = grammar(&abbr, &tables);
        let start = g.layout().scan_start;
        // A header byte changed.
        let mut bad = abbr.clone();
        bad[start - 3] ^= 1;
        assert_eq!(g.walk(g.start(), &bad[..start]), None);
        // A restart marker out of its cycle: RST0 becomes RST1.
        let mut bad = abbr.clone();
        let at = (start..bad.len() - 1)
            .find(|&i| bad[i] == 0xFF && bad[i + 1] == 0xD0)
            .unwrap();
        bad[at + 1] = 0xD1;
        assert!(g.walk(g.start(), &bad[..=at]).is_some());
        assert_eq!(g.walk(g.start(), &bad[..at + 2]), None);
        // A marker where data should be (cut an interval short).
        let mut cut = abbr[..start + 2].to_vec();
        cut.extend_from_slice(&[0xFF, 0xD0]);
        assert_eq!(g.walk(g.start(), &cut), None);
        // An unstuffed FF inside data: FF must be followed by 00 (or, at an interval's end,
        // by nothing but the marker).
        let st = g.walk(g.start(), &abbr[..start]).unwrap();
        let mut after_ff = st;
        if g.step(&mut after_ff, 0xFF) {
            assert!(!g.step(&mut after_ff.clone(), 0x01));
        }
    }

    /// Random walks: from the start, bytes drawn uniformly among those the grammar accepts.
    fn random_stream(g: &JpegGrammar, seed: u64, limit: usize) -> Option<Vec<u8>> {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut st = g.start();
        let mut out = Vec::new();
        let mut ok = Vec::with_capacity(256);
        while !g.complete(&st) {
            if out.len() > limit {
                return None;
            }
            ok.clear();
            ok.extend((0..=255u8).filter(|&b| g.step(&mut st.clone(), b)));
            assert!(!ok.is_empty(), "dead end after {} bytes: {st:?}", out.len());
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let b = ok[(rng % ok.len() as u64) as usize];
            assert!(g.step(&mut st, b));
            out.push(b);
        }
        Some(out)
    }

    #[test]
    fn random_streams_decode_without_a_warning() {
        for (w, h, s) in cases() {
            let (abbr, tables) = stream(w, h, &s, 1);
            let g = grammar(&abbr, &tables);
            let ht = HuffmanTables::from_stream(&tables).unwrap();
            for seed in 0..3 {
                let bytes = random_stream(&g, seed, 4 << 20).expect("a stream under 4 MiB");
                let full = splice_tables(&bytes, &tables).unwrap();
                let layout = FrameLayout::parse(&full).unwrap();
                let c = check_scan(&full, &layout, &ht).unwrap();
                assert_eq!(c.mcus_ok, c.mcus_total, "{w}x{h} {s:?} seed {seed}: {c:?}");
                assert!(c.ends_with_eoi);
                let (d, damage) = jpeg::decode_lenient(&full, 1 << 24).unwrap();
                assert_eq!((d.width, d.height), (w, h));
                assert_eq!(
                    damage.warnings, 0,
                    "{w}x{h} {s:?} seed {seed}: {:?}",
                    damage.first_warning
                );
            }
        }
    }

    #[test]
    fn the_token_walk_matches_stepping_each_token() {
        let s = settings(Subsampling::S420, 1);
        let (abbr, tables) = stream(64, 64, &s, 3);
        let g = grammar(&abbr, &tables);
        // A vocabulary: every byte, and pieces of a real stream (header pieces, markers, data).
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        tokens.push(Vec::new()); // a special token
        for i in (0..abbr.len() - 4).step_by(7) {
            tokens.push(abbr[i..i + 2 + i % 3].to_vec());
        }
        tokens.push(vec![0xFF, 0x00]);
        tokens.push(vec![0xFF, 0xD0]);
        tokens.push(vec![0xFF, 0xD9]);
        let trie = TokenTrie::new(&tokens);
        // Along the real stream, at every byte boundary.
        let mut st = g.start();
        for (i, &b) in abbr.iter().enumerate() {
            let mut walked = Vec::new();
            trie.allowed(&g, &st, &mut |t, after| walked.push((t, *after)));
            walked.sort_by_key(|w| w.0);
            let direct: Vec<(u32, JpegState)> = tokens
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.is_empty())
                .filter_map(|(id, t)| g.walk(st, t).map(|a| (id as u32, a)))
                .collect();
            assert_eq!(walked, direct, "at byte {i}");
            assert!(!walked.is_empty());
            assert!(g.step(&mut st, b));
        }
    }
}
