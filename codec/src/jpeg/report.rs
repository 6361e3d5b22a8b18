//! The decodability of a (generated) JPEG: a lenient libjpeg decode and the Huffman-level
//! scan check, as `codeclm sample` reports it per generation.

use serde::{Deserialize, Serialize};

use crate::jpeg::scan::{check_scan, FrameLayout, HuffmanTables, ScanCheck};
use crate::jpeg::{decode_lenient, DecodeDamage};

/// Largest frame a generated header may ask the decoder for (a garbled SOF can claim 65535^2).
pub const MAX_SAMPLE_PIXELS: u64 = 4096 * 4096;

/// Decodability of one generated image.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageDecodability {
    pub name: String,
    /// Generated ids, prompt excluded, BOS/EOS/PAD included as generated.
    pub n_tokens: usize,
    /// Codec bytes of the whole generation (prompt included), before cleanup.
    pub n_bytes: usize,
    /// The model ended the sequence with EOS (rather than hitting the token limit).
    pub ended_with_eos: bool,
    /// The stream starts with the dataset's own header (SOI through SOS: its size, sampling
    /// and restart interval), byte for byte.
    #[serde(default)]
    pub header_ok: bool,
    /// libjpeg decoded it with no error and no warning, and every MCU passed the scan check.
    pub decodes_clean: bool,
    /// libjpeg produced pixels at all (possibly with grey or garbled regions).
    pub decodes: bool,
    /// The fatal error or first warning, when not clean.
    pub decoder_message: Option<String>,
    pub decoder_warnings: u32,
    /// Huffman-level check of the restart intervals ([`check_scan`]).
    pub scan: Option<ScanCheck>,
    /// `scan.mcu_fraction()`, 0 when the structure could not be read.
    pub mcu_fraction: f64,
    pub width: u32,
    pub height: u32,
}

/// Decodes a complete JPEG leniently and checks its scan: pixels (when libjpeg gives any) and
/// the decodability figures (lengths left at 0).
pub fn measure_jpeg(jpeg: &[u8], name: &str) -> (Option<Vec<u8>>, ImageDecodability) {
    let mut report = ImageDecodability {
        name: name.to_string(),
        ..ImageDecodability::default()
    };
    let scan = FrameLayout::parse(jpeg).and_then(|layout| {
        let tables = HuffmanTables::from_stream(jpeg)?;
        check_scan(jpeg, &layout, &tables)
    });
    match scan {
        Ok(s) => {
            report.mcu_fraction = s.mcu_fraction();
            report.scan = Some(s);
        }
        Err(e) => report.decoder_message = Some(e.to_string()),
    }
    let rgb = match decode_lenient(jpeg, MAX_SAMPLE_PIXELS) {
        Ok((d, damage)) => {
            let DecodeDamage {
                warnings,
                first_warning,
                ..
            } = damage;
            report.decodes = true;
            report.decodes_clean = warnings == 0;
            report.decoder_warnings = warnings;
            if warnings > 0 {
                report.decoder_message = first_warning;
            }
            report.width = d.width;
            report.height = d.height;
            Some(d.rgb)
        }
        Err(e) => {
            report.decoder_message = Some(e.to_string());
            None
        }
    };
    // libjpeg does not complain about everything the scan check does (bad padding bits, a
    // short MCU count it fills silently): clean means both are satisfied.
    if report.decodes_clean
        && report
            .scan
            .as_ref()
            .is_some_and(|s| s.mcus_ok < s.mcus_total)
    {
        report.decodes_clean = false;
    }
    (rgb, report)
}
