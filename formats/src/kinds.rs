//! The two enums every manifest and reader shares: a sample's modality and split. Outside the
//! Parquet code so that the polars-free build (the Python extension, the loader) has them.

use serde::{Deserialize, Serialize};

/// `ALL`, `as_str`, `parse` and `Display` for an enum stored as a string column.
macro_rules! column_values {
    ($t:ident { $($v:ident = $s:literal),+ }) => {
        impl $t {
            pub const ALL: [$t; [$($s),+].len()] = [$($t::$v),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$v => $s),+
                }
            }

            pub fn parse(s: &str) -> Option<$t> {
                $t::ALL.into_iter().find(|x| x.as_str() == s)
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// What a sample is: the `modality` column of every manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    /// A still image, stored as JPEG.
    Image,
    /// A video, stored as H.264 (Annex B).
    Video,
}

column_values!(Modality { Image = "image", Video = "video" });

/// Which split a sample is in: the `split` column of every manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    /// Held out (validation and evaluation).
    Val,
}

column_values!(Split { Train = "train", Val = "val" });
