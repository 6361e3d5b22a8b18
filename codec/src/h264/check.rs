//! The slice structure of a stream encoded one macroblock per slice, read from slice headers
//! alone (no decoder): how much of the promised frames sits where it should.

use serde::{Deserialize, Serialize};

use crate::h264::nal::{first_mb_in_slice, nal_units};

/// What [`check_slices`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceCheck {
    /// Macroblocks the settings promise: frames x macroblocks per frame.
    pub mbs_expected: u64,
    /// Macroblocks covered by slices that sit where they should.
    pub mbs_ok: u64,
    /// Slice NAL units found, and frames they start (`first_mb_in_slice == 0`).
    pub slices: u64,
    pub frames: u64,
}

impl SliceCheck {
    pub fn fraction(&self) -> f64 {
        if self.mbs_expected == 0 {
            0.0
        } else {
            self.mbs_ok as f64 / self.mbs_expected as f64
        }
    }
}

/// Checks the slice structure of a stream encoded one macroblock per slice (the paper's
/// `slice-max-mbs=1`): a slice is in place when its `first_mb_in_slice` is the next macroblock
/// of the current frame (0 starts a new frame); slices of frames past `frames_expected` and
/// slices before any SPS/PPS are not counted. The fraction is in-place macroblocks over
/// `frames_expected x mbs_per_frame`. It reads slice headers only: a slice whose data is
/// garbage still counts, which a decoder's error counts catch.
pub fn check_slices(h264: &[u8], mbs_per_frame: u32, frames_expected: u32) -> SliceCheck {
    let mut c = SliceCheck {
        mbs_expected: mbs_per_frame as u64 * frames_expected as u64,
        ..SliceCheck::default()
    };
    let (mut have_sps, mut have_pps) = (false, false);
    let mut frame: i64 = -1;
    let mut next_mb: u32 = 0;
    for nal in nal_units(h264) {
        match nal.nal_type {
            7 => have_sps = true,
            8 => have_pps = true,
            1 | 5 => {
                c.slices += 1;
                let Some(mb) = first_mb_in_slice(h264, &nal) else {
                    continue;
                };
                if mb == 0 {
                    frame += 1;
                    c.frames += 1;
                    next_mb = 0;
                }
                let in_place = frame >= 0 && mb == next_mb && mb < mbs_per_frame;
                if in_place && have_sps && have_pps && frame < frames_expected as i64 {
                    c.mbs_ok += 1;
                }
                next_mb = mb.saturating_add(1);
            }
            _ => {}
        }
    }
    c
}
