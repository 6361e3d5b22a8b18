//! JPEG stream surgery on the marker level, without decoding: splice a dataset's shared tables
//! back into an abbreviated stream (what `dataset export`, and later the sampler, need to get a
//! file every decoder opens), and strip them again. Pure Rust, so readers need no libjpeg.

use crate::error::{Error, Result};

const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;
const DQT: u8 = 0xDB;
const DHT: u8 = 0xC4;

/// One marker segment of a JPEG header: `bytes` is the whole segment, `FF xx` included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment<'a> {
    pub marker: u8,
    pub bytes: &'a [u8],
}

/// True for the start-of-frame markers (SOF0..SOF15 except DHT, JPG and DAC).
pub fn is_sof(marker: u8) -> bool {
    (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker)
}

/// Splits a stream into its header segments up to and including SOS's header; returns them
/// and the offset where the entropy-coded data starts. Standalone markers (SOI, EOI) are
/// returned with no length field.
pub fn header_segments(data: &[u8]) -> Result<(Vec<Segment<'_>>, usize)> {
    let bad = |msg: String| Error::Invalid(format!("not a JPEG stream: {msg}"));
    if data.len() < 2 || data[0] != 0xFF || data[1] != SOI {
        return Err(bad("it does not start with SOI (FF D8)".into()));
    }
    let mut segments = vec![Segment {
        marker: SOI,
        bytes: &data[0..2],
    }];
    let mut pos = 2;
    loop {
        let start = pos;
        if pos + 1 >= data.len() || data[pos] != 0xFF {
            return Err(bad(format!("expected a marker at byte {pos}")));
        }
        while pos < data.len() && data[pos] == 0xFF {
            pos += 1; // fill bytes
        }
        let Some(&marker) = data.get(pos) else {
            return Err(bad("ends inside a marker".into()));
        };
        pos += 1;
        if marker == EOI || (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            segments.push(Segment {
                marker,
                bytes: &data[start..pos],
            });
            if marker == EOI {
                return Ok((segments, pos));
            }
            continue;
        }
        if pos + 2 > data.len() {
            return Err(bad(format!(
                "segment FF {marker:02X} at byte {start} has no length"
            )));
        }
        let len = u16::from_be_bytes([data[pos], data[pos + 1]]) as usize;
        if len < 2 || pos + len > data.len() {
            return Err(bad(format!(
                "segment FF {marker:02X} at byte {start} runs past the end"
            )));
        }
        pos += len;
        segments.push(Segment {
            marker,
            bytes: &data[start..pos],
        });
        if marker == SOS {
            return Ok((segments, pos));
        }
    }
}

/// Rebuilds a complete (interchange) JPEG from an abbreviated stream and a tables-only
/// stream: DQT segments go right before the frame header and DHT segments right after it,
/// which is where libjpeg puts them, so the result is byte-identical to encoding the full file.
pub fn splice_tables(abbreviated: &[u8], tables: &[u8]) -> Result<Vec<u8>> {
    let (table_segs, _) = header_segments(tables)?;
    let dqt: Vec<&[u8]> = table_segs
        .iter()
        .filter(|s| s.marker == DQT)
        .map(|s| s.bytes)
        .collect();
    let dht: Vec<&[u8]> = table_segs
        .iter()
        .filter(|s| s.marker == DHT)
        .map(|s| s.bytes)
        .collect();
    if dqt.is_empty() {
        return Err(Error::Invalid(
            "the tables stream holds no quantization tables (DQT)".into(),
        ));
    }
    let (segs, data_start) = header_segments(abbreviated)?;
    let extra: usize = dqt.iter().chain(&dht).map(|s| s.len()).sum();
    let mut out = Vec::with_capacity(abbreviated.len() + extra);
    let mut saw_sof = false;
    for seg in &segs {
        if is_sof(seg.marker) && !saw_sof {
            dqt.iter().for_each(|s| out.extend_from_slice(s));
            out.extend_from_slice(seg.bytes);
            dht.iter().for_each(|s| out.extend_from_slice(s));
            saw_sof = true;
        } else {
            out.extend_from_slice(seg.bytes);
        }
    }
    if !saw_sof {
        return Err(Error::Invalid(
            "the stream has no frame header (SOF)".into(),
        ));
    }
    out.extend_from_slice(&abbreviated[data_start..]);
    Ok(out)
}

/// Removes DQT and DHT segments from a complete JPEG's header (the inverse of [`splice_tables`]).
pub fn strip_tables(full: &[u8]) -> Result<Vec<u8>> {
    let (segs, data_start) = header_segments(full)?;
    let mut out = Vec::with_capacity(full.len());
    for seg in segs.iter().filter(|s| s.marker != DQT && s.marker != DHT) {
        out.extend_from_slice(seg.bytes);
    }
    out.extend_from_slice(&full[data_start..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A hand-made miniature: SOI, APP0, SOF0, DRI, SOS, 2 data bytes, EOI.
    fn abbreviated() -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x4A, 0x46];
        v.extend([0xFF, 0xC0, 0x00, 0x05, 8, 0, 16]);
        v.extend([0xFF, 0xDD, 0x00, 0x04, 0x00, 0x01]);
        v.extend([0xFF, 0xDA, 0x00, 0x03, 1, 0x12, 0xFF, 0x00, 0xFF, 0xD9]);
        v
    }

    fn tables() -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8];
        v.extend([0xFF, 0xDB, 0x00, 0x03, 0xAA]);
        v.extend([0xFF, 0xC4, 0x00, 0x03, 0xBB]);
        v.extend([0xFF, 0xD9]);
        v
    }

    #[test]
    fn splice_places_tables_around_sof_and_strip_inverts() {
        let full = splice_tables(&abbreviated(), &tables()).unwrap();
        let (segs, _) = header_segments(&full).unwrap();
        let markers: Vec<u8> = segs.iter().map(|s| s.marker).collect();
        assert_eq!(markers, vec![0xD8, 0xE0, 0xDB, 0xC0, 0xC4, 0xDD, 0xDA]);
        assert_eq!(strip_tables(&full).unwrap(), abbreviated());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(splice_tables(b"\x00\x01\x02", &tables()).is_err());
        assert!(splice_tables(&abbreviated()[..9], &tables()).is_err());
        assert!(header_segments(&[]).is_err());
    }
}

/// Cleans up a generated abbreviated stream the way the paper's code does: keep from the first
/// SOI to the first EOI after it, adding SOI in front or EOI at the end where missing.
pub fn tidy_generated(bytes: &[u8]) -> Vec<u8> {
    let find = |from: usize, m: u8| {
        (from..bytes.len().saturating_sub(1)).find(|&i| bytes[i] == 0xFF && bytes[i + 1] == m)
    };
    let start = find(0, SOI);
    let body = match start {
        Some(s) => &bytes[s..],
        None => bytes,
    };
    let mut out = Vec::with_capacity(body.len() + 4);
    if start.is_none() {
        out.extend_from_slice(&[0xFF, SOI]);
    }
    match (2..body.len().saturating_sub(1)).find(|&i| body[i] == 0xFF && body[i + 1] == EOI) {
        Some(e) => out.extend_from_slice(&body[..e + 2]),
        None => {
            out.extend_from_slice(body);
            out.extend_from_slice(&[0xFF, EOI]);
        }
    }
    out
}

#[cfg(test)]
mod tidy_tests {
    use super::*;

    #[test]
    fn tidy_adds_missing_markers_and_drops_trailing_junk() {
        assert_eq!(tidy_generated(&[1, 2]), vec![0xFF, 0xD8, 1, 2, 0xFF, 0xD9]);
        assert_eq!(
            tidy_generated(&[9, 0xFF, 0xD8, 5, 0xFF, 0xD9, 7, 7]),
            vec![0xFF, 0xD8, 5, 0xFF, 0xD9]
        );
        assert_eq!(tidy_generated(&[]), vec![0xFF, 0xD8, 0xFF, 0xD9]);
    }
}
