//! JPEG: mozjpeg configured to be byte-identical to Pillow ([`mozjpeg`]), marker-level surgery
//! ([`markers`]) and the baseline scan structure read from the bytes ([`scan`]).

pub mod grammar;
pub mod markers;
#[cfg(feature = "mozjpeg")]
pub mod mozjpeg;
#[cfg(feature = "mozjpeg")]
pub mod report;
pub mod scan;

pub use grammar::{JpegGrammar, JpegState};
pub use markers::{splice_tables, strip_tables, tidy_generated, MarkerError};
#[cfg(feature = "mozjpeg")]
pub use mozjpeg::{
    decode, decode_lenient, encode, read_info, tables_only, DecodeDamage, DecodeOptions,
    DecodedJpeg, JpegError, JpegInfo, JpegSettings, Subsampling,
};
