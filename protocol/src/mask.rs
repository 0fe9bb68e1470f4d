//! Masking operators: what a minted token lets a partner see of one field.
//!
//! Only the names travel here, in a `Mint` request (one byte per field); the
//! operators themselves are implemented by the server. Byte values and
//! names are part of the wire format and of policy files: never renumber or
//! rename, only add. 0 is left unused so that a zeroed byte is an error.
//!
//! | byte | name         | partner sees                                    |
//! |------|--------------|-------------------------------------------------|
//! | 1    | `reveal`     | the value as stored                             |
//! | 2    | `redact`     | nothing of the value (a fixed placeholder)      |
//! | 3    | `partial`    | part of the value, e.g. the last four digits    |
//! | 4    | `tokenize`   | a stable pseudonym of the value                 |
//! | 5    | `hash`       | a keyed hash of the value                       |
//! | 6    | `generalize` | a coarser value: a date's year, an amount's band; `[redacted]` for anything else |

use std::fmt;
use std::str::FromStr;

/// A masking operator. The discriminant is the wire byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum MaskOp {
    /// The value as stored.
    Reveal = 1,
    /// Nothing of the value (a fixed placeholder).
    Redact = 2,
    /// Part of the value, e.g. the last four digits.
    Partial = 3,
    /// A stable pseudonym of the value.
    Tokenize = 4,
    /// A keyed hash of the value.
    Hash = 5,
    /// A coarser value: a date's year, an amount's band.
    Generalize = 6,
}

impl MaskOp {
    /// Every operator, in byte order.
    pub const ALL: [MaskOp; 6] = [
        MaskOp::Reveal,
        MaskOp::Redact,
        MaskOp::Partial,
        MaskOp::Tokenize,
        MaskOp::Hash,
        MaskOp::Generalize,
    ];

    /// Decodes the wire byte.
    pub fn from_u8(b: u8) -> Option<MaskOp> {
        MaskOp::ALL.get((b as usize).wrapping_sub(1)).copied()
    }

    /// The stable snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            MaskOp::Reveal => "reveal",
            MaskOp::Redact => "redact",
            MaskOp::Partial => "partial",
            MaskOp::Tokenize => "tokenize",
            MaskOp::Hash => "hash",
            MaskOp::Generalize => "generalize",
        }
    }

    /// Parses [`MaskOp::name`].
    pub fn from_name(s: &str) -> Option<MaskOp> {
        MaskOp::ALL.into_iter().find(|m| m.name() == s)
    }
}

impl fmt::Display for MaskOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name is not one of [`MaskOp::name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown masking operator")]
pub struct UnknownMaskOp;

impl FromStr for MaskOp {
    type Err = UnknownMaskOp;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MaskOp::from_name(s).ok_or(UnknownMaskOp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins bytes and names: policy files and peers depend on both.
    #[test]
    fn bytes_and_names_are_stable() {
        let expected = [
            (1, "reveal"),
            (2, "redact"),
            (3, "partial"),
            (4, "tokenize"),
            (5, "hash"),
            (6, "generalize"),
        ];
        let actual: Vec<(u8, &str)> = MaskOp::ALL.iter().map(|m| (*m as u8, m.name())).collect();
        assert_eq!(actual, expected);
    }

    #[test]
    fn round_trips_and_rejects_unknown() {
        for m in MaskOp::ALL {
            assert_eq!(MaskOp::from_u8(m as u8), Some(m));
            assert_eq!(m.name().parse::<MaskOp>(), Ok(m));
            assert_eq!(m.to_string(), m.name());
        }
        assert_eq!(MaskOp::from_u8(0), None);
        assert_eq!(MaskOp::from_u8(7), None);
        assert_eq!(MaskOp::from_u8(255), None);
        assert_eq!("Reveal".parse::<MaskOp>(), Err(UnknownMaskOp));
    }
}
