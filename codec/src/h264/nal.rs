//! H.264 Annex B structure from the bytes alone: NAL units (one splitter), x264's SEI, the
//! parameter-set fields slice headers depend on, slice headers (`first_mb_in_slice`) and where
//! each frame starts. Video prompts are the first N
//! frames cut at such a NAL boundary (Avc-LM: 10 of 15 frames). Pure byte work, bounded by the
//! input's length.

/// One NAL unit of an Annex B stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nal {
    /// First byte of the unit's start code, the leading `00` of a 4-byte start code included:
    /// `data[start..end]` is the whole unit as a muxer or an SEI filter removes it.
    pub start: usize,
    /// Offset of the 3-byte `00 00 01`: where token pieces and frame cuts split (a 4-byte start
    /// code's leading zero stays with the previous unit, as in the tokenizer's start-code pieces).
    pub code: usize,
    /// Offset of the NAL header byte.
    pub header: usize,
    /// End of the unit: the next unit's `start`, or the end of the data.
    pub end: usize,
    /// `nal_unit_type` (1 = slice, 5 = IDR slice, 6 = SEI, 7 = SPS, 8 = PPS).
    pub nal_type: u8,
}

impl Nal {
    pub fn is_slice(&self) -> bool {
        matches!(self.nal_type, 1 | 5)
    }
}

/// Splits an Annex B stream at every start code (`00 00 01`, or `00 00 00 01`): the one
/// splitter of the project. Bytes before the first start code are skipped, and so is a start
/// code with no header byte of its own after it (at the end of the data, or right before the
/// next start code, as in `00 00 01 00 00 01`: its bytes stay with the unit before). Every unit
/// has `code + 3 == header < end <= data.len()`, so `data[header]` is its own header byte.
pub fn nal_units(data: &[u8]) -> Vec<Nal> {
    let mut codes = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            codes.push(i);
            i += 3;
        } else {
            i += 1;
        }
    }
    let start_of = |c: usize| if c > 0 && data[c - 1] == 0 { c - 1 } else { c };
    // A code whose unit would be empty (the next code's bytes begin at its header byte) is no
    // unit: issue 17 (such a unit's `data[header]` was the next start code's zero).
    let ends: Vec<usize> = (0..codes.len())
        .map(|k| codes.get(k + 1).map_or(data.len(), |&n| start_of(n)))
        .collect();
    let codes: Vec<usize> = codes
        .iter()
        .zip(&ends)
        .filter(|&(&c, &end)| c + 3 < end)
        .map(|(&c, _)| c)
        .collect();
    codes
        .iter()
        .enumerate()
        .map(|(k, &c)| Nal {
            start: start_of(c),
            code: c,
            header: c + 3,
            end: codes.get(k + 1).map_or(data.len(), |&n| start_of(n)),
            nal_type: data[c + 3] & 0x1F,
        })
        .collect()
}

/// Removes x264's own SEI (user data unregistered: "x264 - core ... options: ..."), start code
/// included; every other byte is kept.
pub fn strip_x264_sei(h264: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(h264.len());
    let mut last = 0;
    for nal in nal_units(h264) {
        let is_x264_sei = nal.nal_type == 6
            && h264[nal.header..nal.end]
                .windows(11)
                .take(64)
                .any(|w| w == b"x264 - core");
        if is_x264_sei {
            out.extend_from_slice(&h264[last..nal.start]);
            last = nal.end;
        }
    }
    out.extend_from_slice(&h264[last..]);
    out
}

/// Exp-Golomb `ue(v)` from the start of an RBSP (emulation prevention `00 00 03` removed on
/// the fly). `None` when the bytes run out or the code is longer than 32 bits.
pub fn read_ue(payload: &[u8]) -> Option<u32> {
    rbsp(payload).ue()
}

/// The bits of a NAL payload, MSB first, with emulation prevention removed.
struct Rbsp<I>(I);

fn rbsp(payload: &[u8]) -> Rbsp<impl Iterator<Item = u8> + '_> {
    Rbsp(payload_bits(payload))
}

impl<I: Iterator<Item = u8>> Rbsp<I> {
    /// `u(n)`, n <= 32.
    fn u(&mut self, n: u32) -> Option<u32> {
        let mut v = 0u64;
        for _ in 0..n {
            v = (v << 1) | self.0.next()? as u64;
        }
        Some(v as u32)
    }

    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.0.next()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        let v = (1u64 << zeros) | self.u(zeros)? as u64;
        Some((v - 1) as u32)
    }

    fn se(&mut self) -> Option<i64> {
        let k = self.ue()? as i64;
        Some(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) })
    }
}

fn payload_bits(payload: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut zeros = 0;
    payload
        .iter()
        .filter(move |&&b| {
            let skip = zeros >= 2 && b == 3;
            zeros = if b == 0 { zeros + 1 } else { 0 };
            if skip {
                zeros = 0;
            }
            !skip
        })
        .flat_map(|&b| (0..8).rev().map(move |k| (b >> k) & 1))
}

/// What a slice header's first fields depend on, from a sequence parameter set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sps {
    pub profile_idc: u8,
    pub sps_id: u32,
    /// `frame_num` is `u(log2_max_frame_num)` in every slice header.
    pub log2_max_frame_num: u32,
    pub pic_order_cnt_type: u32,
    pub width_mbs: u32,
    /// In frame macroblocks (`frame_mbs_only_flag` is 1: no field coding).
    pub height_mbs: u32,
}

impl Sps {
    pub fn mbs_per_frame(&self) -> u32 {
        self.width_mbs * self.height_mbs
    }
}

/// Parses an SPS NAL (`data[nal.header..nal.end]`, header byte included). `None` for other
/// units, unreadable bits, and what this crate's streams never use: the High profiles' extra
/// fields and field coding (`frame_mbs_only_flag` 0).
pub fn parse_sps(nal: &[u8]) -> Option<Sps> {
    if nal.first()? & 0x1F != 7 {
        return None;
    }
    let mut r = rbsp(&nal[1..]);
    let profile_idc = r.u(8)? as u8;
    if !matches!(profile_idc, 66 | 77 | 88) {
        return None;
    }
    r.u(16)?; // constraint flags, reserved bits, level_idc
    let sps_id = r.ue()?;
    let log2_max_frame_num = r.ue()? + 4;
    let pic_order_cnt_type = r.ue()?;
    match pic_order_cnt_type {
        0 => {
            r.ue()?; // log2_max_pic_order_cnt_lsb_minus4
        }
        1 => {
            r.u(1)?;
            r.se()?;
            r.se()?;
            for _ in 0..r.ue()?.min(255) {
                r.se()?;
            }
        }
        _ => {}
    }
    r.ue()?; // max_num_ref_frames
    r.u(1)?; // gaps_in_frame_num_value_allowed_flag
    let width_mbs = r.ue()?.checked_add(1)?;
    let height_mbs = r.ue()?.checked_add(1)?;
    if r.u(1)? != 1 || log2_max_frame_num > 16 {
        return None;
    }
    Some(Sps {
        profile_idc,
        sps_id,
        log2_max_frame_num,
        pic_order_cnt_type,
        width_mbs,
        height_mbs,
    })
}

/// `(pic_parameter_set_id, seq_parameter_set_id)` of a PPS NAL (header byte included).
pub fn parse_pps_ids(nal: &[u8]) -> Option<(u32, u32)> {
    if nal.first()? & 0x1F != 8 {
        return None;
    }
    let mut r = rbsp(&nal[1..]);
    Some((r.ue()?, r.ue()?))
}

/// `first_mb_in_slice` of a slice NAL (`None` for other units or unreadable headers).
pub fn first_mb_in_slice(data: &[u8], nal: &Nal) -> Option<u32> {
    if !nal.is_slice() {
        return None;
    }
    read_ue(&data[nal.header + 1..nal.end])
}

/// The NAL indices where frames start: every slice with `first_mb_in_slice == 0`.
pub fn frame_starts(data: &[u8], nals: &[Nal]) -> Vec<usize> {
    nals.iter()
        .enumerate()
        .filter(|(_, n)| first_mb_in_slice(data, n) == Some(0))
        .map(|(i, _)| i)
        .collect()
}

/// Byte offset where the first `frames` frames end: the start code of frame `frames`'s first
/// slice (so SPS, PPS and SEI in front of the first frame are in the prompt). `frames == 0`
/// keeps what precedes the first slice (the parameter sets). Errors when the stream has no more
/// than `frames` frames: nothing would be left to generate.
pub fn frame_cut(data: &[u8], frames: usize) -> Result<usize, String> {
    let nals = nal_units(data);
    let starts = frame_starts(data, &nals);
    starts.get(frames).map(|&i| nals[i].code).ok_or_else(|| {
        format!(
            "the video has {} frames: a prompt of {frames} would leave nothing to generate",
            starts.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_golomb() {
        assert_eq!(read_ue(&[0b1000_0000]), Some(0));
        assert_eq!(read_ue(&[0b0100_0000]), Some(1));
        assert_eq!(read_ue(&[0b0110_0000]), Some(2));
        assert_eq!(read_ue(&[0b0000_1000, 0]), Some(15));
        // 143 = 0000000 1 0010000 (the last macroblock of a 256x144 frame)
        assert_eq!(read_ue(&[0b0000_0001, 0b0010_0000]), Some(143));
        // 00 00 03 80: the 03 is emulation prevention, so 16 zeros and a 1, then the bits run out.
        assert_eq!(read_ue(&[0, 0, 3, 0x80]), None);
        assert_eq!(read_ue(&[]), None);
    }

    #[test]
    fn parameter_sets() {
        // bikes.mp4's SPS and PPS at 256x144 (x264 baseline, SAR 545:544 in the VUI).
        let sps = [
            0x67, 0x42, 0xc0, 0x0b, 0xd9, 0x01, 0x01, 0x3b, 0xff, 0x02, 0x21, 0x02, 0x20, 0x10,
            0x00, 0x00, 0x03, 0x00, 0x10, 0x00, 0x00, 0x03, 0x00, 0x60, 0xf1, 0x42, 0xa4, 0x80,
        ];
        let got = parse_sps(&sps).unwrap();
        assert_eq!(
            got,
            Sps {
                profile_idc: 66,
                sps_id: 0,
                log2_max_frame_num: 4,
                pic_order_cnt_type: 2,
                width_mbs: 16,
                height_mbs: 9,
            }
        );
        assert_eq!(got.mbs_per_frame(), 144);
        assert_eq!(parse_pps_ids(&[0x68, 0xcb, 0x80, 0xb7, 0x20]), Some((0, 0)));
        assert_eq!(parse_sps(&[0x68, 0xcb]), None, "not an SPS");
        assert_eq!(parse_sps(&sps[..6]), None, "cut short");
        let mut high = sps;
        high[1] = 100;
        assert_eq!(parse_sps(&high), None, "High profile fields are not read");
    }

    #[test]
    fn frames_and_cuts() {
        // SPS, PPS, then two frames of two slices each (first_mb 0, 1), 4-byte start codes on
        // frame starts as x264 writes them.
        let mut v = vec![0, 0, 0, 1, 0x67, 0xAA, 0, 0, 0, 1, 0x68, 0xBB];
        for t in [0x65u8, 0x41] {
            v.extend([0, 0, 0, 1, t, 0b1000_0000, 0x11]); // first_mb_in_slice 0
            v.extend([0, 0, 1, t, 0b0100_0000, 0x22]); // first_mb_in_slice 1
        }
        let nals = nal_units(&v);
        assert_eq!(
            nals.iter().map(|n| n.nal_type).collect::<Vec<_>>(),
            vec![7, 8, 5, 5, 1, 1]
        );
        assert_eq!(frame_starts(&v, &nals), vec![2, 4]);
        let cut = frame_cut(&v, 1).unwrap();
        assert_eq!(&v[cut..cut + 4], &[0, 0, 1, 0x41]);
        assert_eq!(
            v[cut - 1],
            0,
            "the 4-byte start code's zero stays with the prompt"
        );
        assert_eq!(&v[frame_cut(&v, 0).unwrap()..][..4], &[0, 0, 1, 0x65]);
        assert!(frame_cut(&v, 2).is_err());
    }

    #[test]
    fn units_and_sei_stripping() {
        let sei = [
            &[0u8, 0, 0, 1, 6, 5][..],
            b"....x264 - core 164 options",
            &[0x80],
        ]
        .concat();
        let stream = [
            &[0u8, 0, 0, 1, 0x67, 1, 2][..],
            &[0, 0, 1, 0x68, 3],
            &sei,
            &[0, 0, 1, 0x65, 9, 9, 9],
            &[0, 0, 0, 1, 6, 5, 1, 2], // another SEI, not x264's: kept
        ]
        .concat();
        let nals = nal_units(&stream);
        let types: Vec<_> = nals.iter().map(|n| n.nal_type).collect();
        assert_eq!(types, [7, 8, 6, 5, 6]);
        // 4-byte codes: `start` includes the leading zero, `code` does not; units tile the data.
        assert_eq!((nals[0].start, nals[0].code), (0, 1));
        assert_eq!((nals[1].start, nals[1].code), (7, 7));
        assert!(nals.windows(2).all(|w| w[0].end == w[1].start));
        let stripped = strip_x264_sei(&stream);
        assert_eq!(stripped.len(), stream.len() - sei.len());
        let types: Vec<_> = nal_units(&stripped).iter().map(|n| n.nal_type).collect();
        assert_eq!(types, [7, 8, 5, 6]);
        assert!(nal_units(&[]).is_empty());
        assert!(
            nal_units(&[0, 0, 1]).is_empty(),
            "a start code with no header is no unit"
        );
    }

    /// Issue 17: a start code at the very end, or right before the next one, gave a unit with
    /// no header byte of its own (`header == end`; `data[header]` was another code's byte).
    #[test]
    fn every_unit_has_its_own_header_byte() {
        let slice = [0, 0, 0, 1, 0x65, 0x88, 0x84];
        let trailing = [&slice[..], &[0, 0, 1]].concat();
        assert_eq!(nal_units(&trailing).len(), 1);
        assert_eq!(nal_units(&trailing)[0].end, trailing.len());
        let doubled = [&[0u8, 0, 1, 0, 0, 1, 0x41, 0x9A][..], &slice].concat();
        let nals = nal_units(&doubled);
        assert_eq!(
            nals.iter()
                .map(|n| (n.nal_type, n.header))
                .collect::<Vec<_>>(),
            vec![(1, 6), (5, 12)]
        );
        // Every string of length <= 9 over the bytes that matter: the invariants callers index by.
        let alphabet = [0u8, 1, 0x65];
        for len in 0..=9u32 {
            for k in 0..3usize.pow(len) {
                let data: Vec<u8> = (0..len).map(|i| alphabet[k / 3usize.pow(i) % 3]).collect();
                let nals = nal_units(&data);
                for n in &nals {
                    assert!(
                        n.start <= n.code && n.code + 3 == n.header,
                        "{data:?} {n:?}"
                    );
                    assert!(n.header < n.end && n.end <= data.len(), "{data:?} {n:?}");
                    assert_eq!(n.nal_type, data[n.header] & 0x1F);
                    let _ = first_mb_in_slice(&data, n);
                }
                assert!(nals.windows(2).all(|w| w[0].end == w[1].start), "{data:?}");
                let _ = frame_cut(&data, 1);
            }
        }
    }
}
