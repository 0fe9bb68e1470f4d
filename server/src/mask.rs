//! The masking operators: what a partner sees of each field of a record when
//! it redeems a one-time token.
//!
//! A record is a list of named string fields (`name`, `email`, `iban`,
//! `card`, `phone`, `dob`, `income`, ...). A token names, per field, one
//! [`MaskOp`]; [`apply_all`] returns exactly those fields, in the order
//! requested, each passed through [`apply`]. Fields that were not requested
//! are never returned.
//!
//! | operator     | example input           | partner sees                 | hides                        | still leaks                                        |
//! |--------------|-------------------------|------------------------------|------------------------------|----------------------------------------------------|
//! | `reveal`     | `jane.doe@example.com`  | `jane.doe@example.com`       | nothing                      | everything                                         |
//! | `redact`     | `jane.doe@example.com`  | `[redacted]`                 | the value and its length     | only that the field exists                         |
//! | `partial`    | `jane.doe@example.com`  | `j***@example.com`           | the rest of the local part   | first character, the whole domain                  |
//! | `partial`    | `4111 1111 1111 1234`   | `**** **** **** 1234`        | all but the last four        | last four, the layout and so the length            |
//! | `partial`    | `Jane`                  | `J***`                       | all but the first character  | first character, that it has at least 3 characters |
//! | `tokenize`   | `GB33BUKB20201555555555` | `tok_` + 24 hex digits       | the value                    | equality, to this partner only                     |
//! | `hash`       | `GB33BUKB20201555555555` | 64 hex digits                | the value                    | equality, to every partner                         |
//! | `generalize` | `1815-12-10`            | `1815`                       | month and day                | the year                                           |
//! | `generalize` | `84000`                 | `50000-99999`                | the amount within its band   | the band                                           |
//!
//! # The operators
//!
//! - **`reveal`** returns the value unchanged.
//! - **`redact`** returns the fixed string [`REDACTED`], whatever the value,
//!   so not even the length shows.
//! - **`partial`** looks at the shape of the value, in this order:
//!   1. An e-mail address (exactly one `@`, something before it, a host
//!      name after it, `example.com`: labels of letters, digits and inner
//!      hyphens, in any script, ending in a top-level domain of letters; no
//!      whitespace):
//!      the first character of the local part, `***`, and the domain
//!      unchanged, unless the domain holds 8 ASCII digits or more (a
//!      number written as a host, `x@4111-1111-1111-1234.io`). Anything
//!      else with an `@` (`x@4111-1111-1111-1234`) goes to the next rules,
//!      never shown after its `@`. A local part of one or two characters becomes
//!      just `***`, since its first character would be most of it:
//!      `jo@example.com` → `***@example.com`.
//!   2. A value with at least 8 ASCII digits (card, IBAN, phone, account
//!      number): every letter and digit except the last four ASCII digits
//!      becomes `*` (letters after them too: `4111 1111 1111 1234 Jane`
//!      → `**** **** **** 1234 ****`);
//!      ASCII spaces and punctuation (the ` `, `-`, `/`, `(`, `+` of
//!      formatted numbers) are kept, since they carry layout, not content;
//!      any other character (an emoji, a mark) becomes `*` too.
//!      `GB33BUKB20201555555555` → `******************5555`,
//!      `+44 20 7946 0958` → `+** ** **** 0958`. The output has as many
//!      characters as the input, so the length stays visible: for an IBAN
//!      it tells the country even though the country code is masked.
//!   3. Anything else: the first character and `***` (of a first character
//!      over 32 bytes, a letter with a long run of combining marks, its
//!      first code point), or just `***` for
//!      values of at most two characters (empty included), so the output
//!      tells only "at most two" or "at least three" characters.
//!
//!   All of this counts characters, not bytes, so it never cuts a UTF-8
//!   sequence; rules 1 and 3 count characters as a reader sees them
//!   (grapheme clusters, surrounding whitespace left out), so `Jo ` and
//!   `E` + a combining accent + `d` are two characters and show nothing.
//!   A short categorical value of three characters or more shows its
//!   first one, which may be all it takes (`true`/`false`, `Male`/
//!   `Female`): give such fields `redact`, or `reveal` where they may be
//!   seen.
//! - **`tokenize`** returns `tok_` and the first 24 hex digits (96 bits) of
//!   BLAKE3 in keyed mode over `field || 0x00 || value`, keyed per partner
//!   with `derive_key("fintrust-vault 2026 tokenize v1", master || partner_id)`.
//!   The same value in the same field gives the same token to the same
//!   partner, so a partner can link its own records of one customer; two
//!   partners get unrelated tokens for the same value and cannot join their
//!   data sets on them; the same value in two fields gives two tokens. What it
//!   still leaks: equality and frequency within one partner's view, which on
//!   a low-entropy field (`dob`, `income`) is a histogram of the values.
//! - **`hash`** returns the full 64 hex digits of BLAKE3 in keyed mode over
//!   `field || 0x00 || value`, keyed with
//!   `derive_key("fintrust-vault 2026 hash v1", master)`: the same for every
//!   partner, so partners *can* join on it; that is the difference from
//!   `tokenize`. It is keyed because a bare hash of a birthday or a card
//!   number is inverted by trying every candidate.
//! - **`generalize`** makes a value coarser:
//!   - a date `YYYY-MM-DD` or `YYYY-MM` (checked: month 01–12, a day that
//!     exists in that month) → `YYYY`;
//!   - an amount (digits, optional leading `-`, optional `,` thousands
//!     separators in groups of three, optional `.` and decimals) → its band:
//!     `0-999`, `1000-9999`, `10000-49999`, `50000-99999`, `100000-249999`,
//!     `250000-999999`, `>=1000000`, or `<0` for any negative amount;
//!   - anything else → [`REDACTED`], as `redact` gives: the partner
//!     learns only that the value is neither a date nor an amount, and gets
//!     the record's other fields (an error would spend the token for none
//!     of them, at every redemption of that record).
//!
//!   A bare four-digit `YYYY` is read as an amount, not as a year: by shape
//!   `2024` the year and `2024` the monthly income are the same string, and
//!   returning it unchanged would reveal the income exactly. A year alone
//!   therefore comes out as `1000-9999`. Likewise a date written without
//!   its dashes (`19900101`) is an amount by shape, `>=1000000`: dates
//!   are to be stored as `YYYY-MM-DD` for `generalize` to give their year.
//!
//! # Keys
//!
//! [`MaskKeys`] holds one 32-byte master mask key; the tokenize and hash keys
//! are derived from it per call, in zeroized buffers, and never stored.
//! Anyone holding the master mask key can invert tokens and hashes of
//! low-entropy fields by trying candidates, so it is as sensitive as the data.
//! Changing a derivation context changes every token and hash ever issued:
//! add a `v2` beside `v1`, never edit one.
//!
//! Errors never contain a value, only field names.
//!
//! ```
//! use protocol::MaskOp;
//! use server::mask::{apply, apply_all, MaskKeys};
//!
//! let keys = MaskKeys::derive_from(b"a high-entropy secret of the vault");
//! let card = apply(MaskOp::Partial, "card", "4111 1111 1111 1234", &keys, "acme")?;
//! assert_eq!(card, "**** **** **** 1234");
//!
//! let record = [
//!     ("name".to_string(), "Jane Doe".to_string()),
//!     ("dob".to_string(), "1815-12-10".to_string()),
//!     ("income".to_string(), "84000".to_string()),
//! ];
//! let wanted = [
//!     ("income".to_string(), MaskOp::Generalize),
//!     ("dob".to_string(), MaskOp::Generalize),
//! ];
//! let seen = apply_all(&wanted, &record, &keys, "acme")?;
//! assert_eq!(
//!     seen,
//!     [
//!         ("income".to_string(), "50000-99999".to_string()),
//!         ("dob".to_string(), "1815".to_string()),
//!     ]
//! );
//! # Ok::<(), server::mask::MaskError>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;

use protocol::MaskOp;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// What `redact` returns, whatever the value.
pub const REDACTED: &str = "[redacted]";

/// The prefix of every `tokenize` output.
pub const TOKEN_PREFIX: &str = "tok_";

/// Bytes of the keyed hash kept in a token: 12 bytes, 24 hex digits. At 96
/// bits two values of one partner and field collide only after about 2^48
/// distinct values, far beyond any record count.
const TOKEN_BYTES: usize = 12;

/// `blake3::derive_key` contexts. Globally unique and hard-coded, as BLAKE3
/// asks; editing one changes every key, token and hash derived from it.
const CONTEXT_MASK_KEYS: &str = "fintrust-vault 2026 mask keys v1";
const CONTEXT_TOKENIZE: &str = "fintrust-vault 2026 tokenize v1";
const CONTEXT_HASH: &str = "fintrust-vault 2026 hash v1";

/// Values with at least this many ASCII digits are masked as numbers (card,
/// IBAN, phone, account) by `partial`.
const PARTIAL_MIN_DIGITS: usize = 8;

/// Letters and digits `partial` leaves visible at the end of a number.
const PARTIAL_KEEP_LAST: usize = 4;

/// Errors of masking. None of them carries a field's value, only its name,
/// so an error can be logged or returned to a partner without leaking data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    /// A requested field is not in the record.
    #[error("field {0:?} is not in the record")]
    MissingField(String),
    /// A field was requested twice, or a requested field appears twice in
    /// the record, so which value to mask is ambiguous.
    #[error("field {0:?} appears more than once")]
    DuplicateField(String),
    /// A field name contains a NUL byte. `tokenize` and `hash` separate the
    /// name from the value with a NUL, so such a name would make two
    /// different (field, value) pairs hash alike.
    #[error("field name {field:?} contains a NUL byte")]
    InvalidFieldName { field: String },
}

/// The master mask key from which the tokenize and hash keys are derived.
///
/// Zeroized on drop; `Debug` prints no key material. There is no `Clone`,
/// so the key lives in one place.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct MaskKeys {
    master: [u8; 32],
}

impl MaskKeys {
    /// Wraps a 32-byte master mask key. The caller's copy of `master` is
    /// not zeroized by this.
    pub fn new(master: [u8; 32]) -> MaskKeys {
        MaskKeys { master }
    }

    /// Derives the master mask key from a vault secret with BLAKE3
    /// `derive_key("fintrust-vault 2026 mask keys v1", secret)`.
    ///
    /// This does no stretching: `secret` must already be a high-entropy key
    /// (such as the vault's master key), never a passphrase.
    pub fn derive_from(secret: &[u8]) -> MaskKeys {
        MaskKeys::new(blake3::derive_key(CONTEXT_MASK_KEYS, secret))
    }

    /// `derive_key("fintrust-vault 2026 tokenize v1", master || partner_id)`,
    /// fed to the hasher in two parts (no concatenated copy), whose buffer
    /// holds the master key until it is zeroized here. The master key has
    /// a fixed length, so the concatenation is unambiguous.
    fn tokenize_key(&self, partner_id: &str) -> Zeroizing<[u8; 32]> {
        let mut hasher = blake3::Hasher::new_derive_key(CONTEXT_TOKENIZE);
        hasher.update(&self.master);
        hasher.update(partner_id.as_bytes());
        derived(hasher)
    }

    /// `derive_key("fintrust-vault 2026 hash v1", master)`: one key for all
    /// partners, which is what makes hashes joinable across partners.
    fn hash_key(&self) -> Zeroizing<[u8; 32]> {
        let mut hasher = blake3::Hasher::new_derive_key(CONTEXT_HASH);
        hasher.update(&self.master);
        derived(hasher)
    }
}

/// The key `hasher` derives; the hasher, which holds key material in its
/// buffers, is zeroized, as is the intermediate hash.
fn derived(mut hasher: blake3::Hasher) -> Zeroizing<[u8; 32]> {
    use zeroize::Zeroize as _;
    let mut hash = hasher.finalize();
    hasher.zeroize();
    let key = Zeroizing::new(*hash.as_bytes());
    hash.zeroize();
    key
}

impl fmt::Debug for MaskKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MaskKeys").finish_non_exhaustive()
    }
}

/// Masks one field's `value` with `op`, for the partner `partner_id`.
///
/// Never panics, whatever the strings. Fails only for `tokenize` or `hash`
/// of a field whose name contains a NUL byte.
pub fn apply(
    op: MaskOp,
    field: &str,
    value: &str,
    keys: &MaskKeys,
    partner_id: &str,
) -> Result<String, MaskError> {
    match op {
        MaskOp::Reveal => Ok(value.to_owned()),
        MaskOp::Redact => Ok(REDACTED.to_owned()),
        MaskOp::Partial => Ok(partial(value)),
        MaskOp::Tokenize => {
            let digest = keyed_digest(&keys.tokenize_key(partner_id), field, value)?;
            let (head, _) = digest.as_bytes().split_at(TOKEN_BYTES);
            Ok(format!("{TOKEN_PREFIX}{}", hex::encode(head)))
        }
        MaskOp::Hash => {
            let digest = keyed_digest(&keys.hash_key(), field, value)?;
            Ok(digest.to_hex().to_string())
        }
        MaskOp::Generalize => Ok(generalize(value).unwrap_or_else(|| REDACTED.to_owned())),
    }
}

/// Masks a record for a partner: for each `(name, op)` of `fields`, in that
/// order, the record's value of `name` passed through [`apply`] with `op`.
///
/// The result has exactly one entry per requested field and nothing else.
/// A requested field absent from the record is [`MaskError::MissingField`];
/// a field requested twice, or present twice in the record while requested,
/// is [`MaskError::DuplicateField`]. On any error nothing is returned.
pub fn apply_all(
    fields: &[(String, MaskOp)],
    record: &[(String, String)],
    keys: &MaskKeys,
    partner_id: &str,
) -> Result<Vec<(String, String)>, MaskError> {
    // An index rather than a scan per requested field, so that a large
    // record with many requested fields stays linear. `None` marks a name
    // the record holds more than once.
    let mut by_name: HashMap<&str, Option<&str>> = HashMap::with_capacity(record.len());
    for (name, value) in record {
        by_name
            .entry(name.as_str())
            .and_modify(|seen| *seen = None)
            .or_insert(Some(value.as_str()));
    }

    let mut requested = HashSet::with_capacity(fields.len());
    let mut out = Vec::with_capacity(fields.len());
    for (name, op) in fields {
        if !requested.insert(name.as_str()) {
            return Err(MaskError::DuplicateField(name.clone()));
        }
        let value = match by_name.get(name.as_str()) {
            None => return Err(MaskError::MissingField(name.clone())),
            Some(None) => return Err(MaskError::DuplicateField(name.clone())),
            Some(Some(value)) => value,
        };
        out.push((name.clone(), apply(*op, name, value, keys, partner_id)?));
    }
    Ok(out)
}

/// BLAKE3 keyed with `key` over `field || 0x00 || value`, streamed so that
/// the value is not copied into another buffer.
fn keyed_digest(key: &[u8; 32], field: &str, value: &str) -> Result<blake3::Hash, MaskError> {
    if field.contains('\0') {
        return Err(MaskError::InvalidFieldName {
            field: field.to_owned(),
        });
    }
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(field.as_bytes());
    hasher.update(&[0]);
    hasher.update(value.as_bytes());
    let digest = hasher.finalize();
    // Its buffers hold the key's chaining value and part of the value.
    zeroize::Zeroize::zeroize(&mut hasher);
    Ok(digest)
}

/// `partial`: see the module documentation for the three shapes.
fn partial(value: &str) -> String {
    if let Some(masked) = partial_email(value) {
        return masked;
    }
    if value.chars().filter(char::is_ascii_digit).count() >= PARTIAL_MIN_DIGITS {
        return partial_number(value);
    }
    first_char_and_stars(value)
}

/// The first character and `***`, or only `***` when the value has at most
/// two characters: there the first character would be half of it or more.
/// Characters as a reader sees them: the value without its surrounding
/// whitespace, in grapheme clusters (`E` and a combining accent are one
/// `É`; a Hangul syllable written as jamo is one syllable), and without
/// those that show nothing (a zero-width space, a soft hyphen: `J`, a
/// zero-width space and `o` are two characters, not three).
fn first_char_and_stars(value: &str) -> String {
    use unicode_segmentation::UnicodeSegmentation as _;
    // Those that show nothing go first, so that one beside the
    // surrounding whitespace does not keep it from being trimmed.
    // A space with a joiner or variation selector after it is one
    // grapheme, and as blank.
    let blank = |g: &&str| g.chars().all(|c| c.is_whitespace() || shows_nothing(c));
    let mut shown = value
        .graphemes(true)
        .filter(|g| !g.chars().all(shows_nothing))
        .skip_while(blank);
    let Some(first) = shown.next() else {
        return "***".to_owned();
    };
    // Two more up to the last one that is not blank (blanks between count,
    // trailing ones do not), read only as far as needed.
    let (mut counted, mut blanks) = (0usize, 0usize);
    for g in shown {
        if blank(&g) {
            blanks += 1;
            continue;
        }
        counted += blanks + 1;
        blanks = 0;
        if counted >= 2 {
            // A cluster of one letter and a run of combining marks shows
            // its letter: the marks could be as long as the value.
            let first = if first.len() > 32 {
                &first[..first.chars().next().map_or(0, char::len_utf8)]
            } else {
                first
            };
            return format!("{first}***");
        }
    }
    "***".to_owned()
}

/// Whether `c` is a default-ignorable code point (Unicode's
/// `Default_Ignorable_Code_Point`, DerivedCoreProperties.txt): a format
/// or filler character that a text shows nothing for, such as U+200B
/// ZERO WIDTH SPACE, U+00AD SOFT HYPHEN or U+2060 WORD JOINER.
fn shows_nothing(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// `j***@example.com` for `jane.doe@example.com`; `None` when the value is
/// not shaped like an e-mail address: a domain that is not a host name
/// (`x@4111-1111-1111-1234`, `J@nedoe`) would be shown whole, so such a
/// value goes to the other rules.
fn partial_email(value: &str) -> Option<String> {
    let (local, domain) = value.split_once('@')?;
    if local.is_empty() || value.chars().any(char::is_whitespace) || !is_host_name(domain) {
        return None;
    }
    // A number written as a host name (`4111-1111-1111-1234.io`) is a
    // number: rule 2 shows its last four digits, not all of them.
    if domain.chars().filter(char::is_ascii_digit).count() >= PARTIAL_MIN_DIGITS {
        return None;
    }
    Some(format!("{}@{domain}", first_char_and_stars(local)))
}

/// Whether `domain` is a host name with a top-level domain: at least two
/// dot-separated labels of letters, digits and inner hyphens (letters of
/// any script: `ü.de`), the last one of two or more letters.
fn is_host_name(domain: &str) -> bool {
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.chars().count() <= 63
            && l.chars().all(|c| c.is_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    labels.len() >= 2
        && domain.chars().count() <= 253
        && labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|tld| tld.chars().count() >= 2 && tld.chars().all(char::is_alphabetic))
}

/// Every letter, digit or non-ASCII character becomes `*`, except the last
/// [`PARTIAL_KEEP_LAST`] ASCII digits; ASCII spaces and punctuation stay,
/// so `4111 1111 1111 1234` keeps its grouping. Letters are never kept: a
/// name after a card number (`… 1234 Jane`) is masked with the rest.
fn partial_number(value: &str) -> String {
    let digits = value.chars().filter(char::is_ascii_digit).count();
    let keep_after = digits.saturating_sub(PARTIAL_KEEP_LAST);
    let mut seen = 0usize;
    value
        .chars()
        .map(|c| {
            if c.is_ascii_digit() {
                seen += 1;
                if seen > keep_after {
                    c
                } else {
                    '*'
                }
            } else if c.is_alphanumeric() {
                '*'
            } else if c.is_ascii_whitespace() || c.is_ascii_punctuation() {
                c
            } else {
                '*'
            }
        })
        .collect()
}

/// `generalize`: a date's year, or an amount's band; `None` for anything
/// else.
fn generalize(value: &str) -> Option<String> {
    if let Some(year) = year_of_date(value) {
        return Some(year.to_owned());
    }
    amount_band(value).map(str::to_owned)
}

/// The `YYYY` of a valid `YYYY-MM-DD` or `YYYY-MM`. A bare `YYYY` is not
/// taken: see the module documentation.
fn year_of_date(value: &str) -> Option<&str> {
    let (year, month, day) = match *value.as_bytes() {
        [y0, y1, y2, y3, b'-', m0, m1] => (digits4(y0, y1, y2, y3)?, digits2(m0, m1)?, None),
        [y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1] => (
            digits4(y0, y1, y2, y3)?,
            digits2(m0, m1)?,
            Some(digits2(d0, d1)?),
        ),
        _ => return None,
    };
    if !(1..=12).contains(&month) {
        return None;
    }
    if let Some(day) = day {
        if day < 1 || day > days_in_month(year, month) {
            return None;
        }
    }
    // The first four bytes are ASCII digits, so 4 is a char boundary.
    value.get(..4)
}

fn digit(b: u8) -> Option<u32> {
    b.is_ascii_digit().then(|| u32::from(b - b'0'))
}

fn digits2(a: u8, b: u8) -> Option<u32> {
    Some(digit(a)? * 10 + digit(b)?)
}

fn digits4(a: u8, b: u8, c: u8, d: u8) -> Option<u32> {
    Some(digits2(a, b)? * 100 + digits2(c, d)?)
}

/// Days of `month` (1–12) in the proleptic Gregorian calendar.
fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The band of an amount such as `84000`, `-5` or `1,234,567.89`; `None`
/// when the value is not one.
///
/// The integer part is never parsed into a fixed-width integer before its
/// length is known, so a megabyte of digits is simply `>=1000000`.
fn amount_band(value: &str) -> Option<&'static str> {
    let (negative, unsigned) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (integer, fraction) = match unsigned.split_once('.') {
        Some((integer, fraction)) => (integer, Some(fraction)),
        None => (unsigned, None),
    };
    if let Some(fraction) = fraction {
        if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    if !valid_integer_part(integer) {
        return None;
    }

    let significant = integer
        .bytes()
        .filter(|&b| b != b',')
        .skip_while(|&b| b == b'0');
    let is_zero = significant.clone().next().is_none()
        && fraction.is_none_or(|f| f.bytes().all(|b| b == b'0'));
    if negative && !is_zero {
        return Some("<0");
    }
    // Seven significant digits or fewer fit a u64 with room to spare; more
    // is at least 10,000,000.
    if significant.clone().count() > 7 {
        return Some(">=1000000");
    }
    let whole = significant.fold(0u64, |n, b| n * 10 + u64::from(b - b'0'));
    Some(match whole {
        0..=999 => "0-999",
        1_000..=9_999 => "1000-9999",
        10_000..=49_999 => "10000-49999",
        50_000..=99_999 => "50000-99999",
        100_000..=249_999 => "100000-249999",
        250_000..=999_999 => "250000-999999",
        _ => ">=1000000",
    })
}

/// Digits, either without separators or with `,` between groups of three
/// (the first group one to three digits): `84000`, `1,234,567`.
fn valid_integer_part(integer: &str) -> bool {
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !integer.contains(',') {
        return !integer.is_empty() && all_digits(integer);
    }
    let mut groups = integer.split(',');
    let first_ok = groups
        .next()
        .is_some_and(|g| (1..=3).contains(&g.len()) && all_digits(g));
    first_ok && groups.all(|g| g.len() == 3 && all_digits(g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PARTNER: &str = "partner-acme";

    /// A fixed key, so that token and hash outputs can be pinned.
    fn keys() -> MaskKeys {
        MaskKeys::new([0x42; 32])
    }

    fn mask(op: MaskOp, field: &str, value: &str) -> Result<String, MaskError> {
        apply(op, field, value, &keys(), PARTNER)
    }

    /// Exact outputs of every operator. The tokenize and hash vectors were
    /// also computed with the Python `blake3` bindings, independently of
    /// this code; a change in any of them is a format change.
    #[test]
    fn table_of_exact_outputs() {
        let cases: &[(MaskOp, &str, &str, &str)] = &[
            (MaskOp::Reveal, "name", "Jane Doe", "Jane Doe"),
            (MaskOp::Reveal, "name", "", ""),
            (MaskOp::Redact, "name", "Jane Doe", "[redacted]"),
            (MaskOp::Redact, "name", "", "[redacted]"),
            (
                MaskOp::Partial,
                "email",
                "jane.doe@example.com",
                "j***@example.com",
            ),
            (
                MaskOp::Partial,
                "email",
                "jo@example.com",
                "***@example.com",
            ),
            (
                MaskOp::Partial,
                "card",
                "4111 1111 1111 1234",
                "**** **** **** 1234",
            ),
            (
                MaskOp::Partial,
                "card",
                "4111-1111-1111-1234",
                "****-****-****-1234",
            ),
            (
                MaskOp::Partial,
                "iban",
                "GB33BUKB20201555555555",
                "******************5555",
            ),
            (
                MaskOp::Partial,
                "iban",
                "GB33 BUKB 2020 1555 5555 55",
                "**** **** **** **** **55 55",
            ),
            (
                MaskOp::Partial,
                "phone",
                "+44 20 7946 0958",
                "+** ** **** 0958",
            ),
            (MaskOp::Partial, "account", "12345678", "****5678"),
            // Seven digits are not a number to `partial`.
            (MaskOp::Partial, "phone", "1234567", "1***"),
            (MaskOp::Partial, "name", "Jane Doe", "J***"),
            (MaskOp::Partial, "name", "Zoë", "Z***"),
            (MaskOp::Partial, "name", "Jo", "***"),
            (MaskOp::Partial, "name", "J", "***"),
            (MaskOp::Partial, "name", "", "***"),
            (MaskOp::Partial, "name", "😀😀😀", "😀***"),
            (
                MaskOp::Tokenize,
                "iban",
                "GB33BUKB20201555555555",
                "tok_a946be0cc4dc7b6ef1374523",
            ),
            (MaskOp::Tokenize, "name", "", "tok_b24a7fa3587d5a8bda299ea1"),
            (
                MaskOp::Hash,
                "iban",
                "GB33BUKB20201555555555",
                "bed848c877f76d351dbb96911584b32c833e14de0e06504f5a79748dbd6f9f2e",
            ),
            (
                MaskOp::Hash,
                "dob",
                "1815-12-10",
                "19a9fdfcaf2e498f0dfb8114f64ee5f1f35aad8f715c13c2ad12d4cfe921829d",
            ),
            (MaskOp::Generalize, "dob", "1815-12-10", "1815"),
            (MaskOp::Generalize, "dob", "1815-12", "1815"),
            (MaskOp::Generalize, "dob", "2024-02-29", "2024"),
            (MaskOp::Generalize, "income", "84000", "50000-99999"),
            (MaskOp::Generalize, "income", "0", "0-999"),
            (MaskOp::Generalize, "income", "999.99", "0-999"),
            (MaskOp::Generalize, "income", "1000", "1000-9999"),
            (MaskOp::Generalize, "income", "49,999", "10000-49999"),
            (MaskOp::Generalize, "income", "100000", "100000-249999"),
            (MaskOp::Generalize, "income", "250000.5", "250000-999999"),
            (MaskOp::Generalize, "income", "999999", "250000-999999"),
            (MaskOp::Generalize, "income", "1000000", ">=1000000"),
            (MaskOp::Generalize, "income", "1,234,567.89", ">=1000000"),
            (MaskOp::Generalize, "income", "-5", "<0"),
            (MaskOp::Generalize, "income", "-0.00", "0-999"),
            (MaskOp::Generalize, "income", "0084000", "50000-99999"),
        ];
        for &(op, field, value, expected) in cases {
            assert_eq!(
                mask(op, field, value).as_deref(),
                Ok(expected),
                "{op} of {field}={value:?}"
            );
        }
    }

    /// The streamed derivations are the formulas of the module docs,
    /// computed here with one-shot calls over concatenated buffers.
    #[test]
    fn derivations_match_the_documented_formulas() {
        let keys = keys();
        let (field, value) = ("iban", "GB33BUKB20201555555555");
        let input = [field.as_bytes(), &[0], value.as_bytes()].concat();

        let material = [&keys.master[..], PARTNER.as_bytes()].concat();
        let partner_key = blake3::derive_key("fintrust-vault 2026 tokenize v1", &material);
        let token = blake3::keyed_hash(&partner_key, &input).to_hex();
        assert_eq!(
            mask(MaskOp::Tokenize, field, value),
            Ok(format!("tok_{}", &token[..24]))
        );

        let hash_key = blake3::derive_key("fintrust-vault 2026 hash v1", &keys.master);
        let hash = blake3::keyed_hash(&hash_key, &input).to_hex();
        assert_eq!(mask(MaskOp::Hash, field, value), Ok(hash.to_string()));

        let derived = MaskKeys::derive_from(b"vault secret");
        assert_eq!(
            derived.master,
            blake3::derive_key("fintrust-vault 2026 mask keys v1", b"vault secret")
        );
    }

    #[test]
    fn debug_prints_no_key() {
        let keys = MaskKeys::new([0xab; 32]);
        let printed = format!("{keys:?}");
        assert_eq!(printed, "MaskKeys { .. }");
        assert!(!printed.contains("171") && !printed.contains("ab"));
    }

    #[test]
    fn tokens_are_stable_per_partner_and_field() {
        let keys = keys();
        let token = |field: &str, value: &str, partner: &str| {
            apply(MaskOp::Tokenize, field, value, &keys, partner)
        };
        let iban = "GB33BUKB20201555555555";

        assert_eq!(token("iban", iban, "a"), token("iban", iban, "a"));
        assert_ne!(token("iban", iban, "a"), token("iban", iban, "b"));
        assert_ne!(token("iban", iban, "a"), token("account", iban, "a"));
        // The field/value boundary is part of the input.
        assert_ne!(token("ib", "an", "a"), token("i", "ban", "a"));

        let other_keys = MaskKeys::new([0x43; 32]);
        assert_ne!(
            token("iban", iban, "a"),
            apply(MaskOp::Tokenize, "iban", iban, &other_keys, "a")
        );
    }

    #[test]
    fn hash_is_keyed_and_the_same_for_every_partner() -> Result<(), MaskError> {
        let keys = keys();
        let value = "1815-12-10";
        let hashed = apply(MaskOp::Hash, "dob", value, &keys, "a")?;
        assert_eq!(hashed, apply(MaskOp::Hash, "dob", value, &keys, "b")?);
        assert_eq!(hashed.len(), 64);
        assert_ne!(hashed, blake3::hash(value.as_bytes()).to_hex().as_str());
        let bare_with_field = blake3::hash(b"dob\x001815-12-10");
        assert_ne!(hashed, bare_with_field.to_hex().as_str());
        assert_ne!(
            Ok(hashed),
            apply(MaskOp::Hash, "dob", value, &MaskKeys::new([0x43; 32]), "a")
        );
        Ok(())
    }

    #[test]
    fn nul_in_a_field_name_is_refused_where_it_would_be_ambiguous() {
        let refused = Err(MaskError::InvalidFieldName {
            field: "a\0b".into(),
        });
        assert_eq!(mask(MaskOp::Tokenize, "a\0b", "c"), refused);
        assert_eq!(mask(MaskOp::Hash, "a\0b", "c"), refused);
        assert_eq!(mask(MaskOp::Reveal, "a\0b", "c"), Ok("c".into()));
    }

    #[test]
    fn redact_never_depends_on_the_value() {
        for len in [0, 1, 2, 9, 10, 11, 1000, 1 << 20] {
            let value = "x".repeat(len);
            assert_eq!(
                mask(MaskOp::Redact, "name", &value).as_deref(),
                Ok(REDACTED)
            );
        }
        assert_eq!(mask(MaskOp::Redact, "name", "😀").as_deref(), Ok(REDACTED));
    }

    #[test]
    fn partial_survives_awkward_values() -> Result<(), MaskError> {
        let mib = 1 << 20;
        let cases = [
            String::new(),
            "a".into(),
            "é".into(),
            "😀".into(),
            "😀😀".into(),
            "👩‍👩‍👧".into(),
            "@".into(),
            "@@".into(),
            "a@".into(),
            "@b".into(),
            "é@ü.de".into(),
            "a".repeat(mib),
            "😀".repeat(mib / 4),
            "7".repeat(mib),
            "1😀".repeat(mib / 5),
            format!("{}@example.com", "x".repeat(mib)),
            format!("{}@example.com", "😀".repeat(mib / 4)),
        ];
        for value in &cases {
            let out = mask(MaskOp::Partial, "f", value)?;
            // Output is either short, or has one character per input
            // character (the number shape), or is `***@` and a kept domain.
            assert!(
                out.chars().count() <= 4
                    || out.chars().count() == value.chars().count()
                    || out
                        .split_once('@')
                        .is_some_and(|(_, domain)| value.ends_with(&format!("@{domain}"))),
                "{} bytes in, {} bytes out",
                value.len(),
                out.len()
            );
        }
        assert_eq!(mask(MaskOp::Partial, "f", "😀"), Ok("***".into()));
        assert_eq!(mask(MaskOp::Partial, "f", "é@ü.de"), Ok("***@ü.de".into()));
        // What follows an `@` is shown only when it is a host name.
        for (value, seen) in [
            ("x@4111-1111-1111-1234", "*@****-****-****-1234"),
            ("J@nedoe", "J***"),
            ("ref@12345678901", "***@*******8901"),
            ("a@b.c", "a***"),
            ("jane@mail.example.co.uk", "j***@mail.example.co.uk"),
        ] {
            assert_eq!(
                mask(MaskOp::Partial, "f", value),
                Ok(seen.into()),
                "{value}"
            );
        }
        // Characters as a reader counts them: whitespace around the value
        // and combining marks do not make a two-letter value longer.
        for (value, seen) in [
            ("Jo ", "***"),
            (" Jo", "***"),
            ("E\u{301}d", "***"),
            ("jo\u{308}@example.com", "***@example.com"),
            ("\u{1100}\u{1175}\u{11B7}", "***"),
            ("E\u{301}dith", "E\u{301}***"),
            // Characters that show nothing are not counted, nor shown.
            ("J\u{200B}o", "***"),
            ("J\u{AD}o", "***"),
            ("\u{2060}J\u{2060}o\u{2060}", "***"),
            ("\u{FEFF}Jane", "J***"),
            ("\u{200B}\u{200B}\u{200B}", "***"),
            ("Jo \u{200B}", "***"),
            ("\u{AD} J  \u{AD}", "***"),
            ("\u{200B} Jane\t\u{2060}", "J***"),
            ("Jo \u{200C}", "***"),
            (" \u{200D}Jane", "J***"),
            ("Jo\u{FE0F} ", "***"),
        ] {
            assert_eq!(
                mask(MaskOp::Partial, "f", value),
                Ok(seen.into()),
                "{value:?}"
            );
        }
        // Digits and emoji alike are masked; only the last four digits stay.
        let out = mask(MaskOp::Partial, "f", &"1😀".repeat(mib / 5))?;
        assert!(out.starts_with("****") && out.ends_with("**1*1*1*1*"));
        Ok(())
    }

    /// A first character of one letter and a long run of combining marks
    /// shows the letter, not the run.
    #[test]
    fn partial_shows_a_bounded_first_character() -> Result<(), MaskError> {
        let long = format!("a{}bc", "\u{301}".repeat(100_000));
        assert_eq!(mask(MaskOp::Partial, "f", &long), Ok("a***".into()));
        assert_eq!(mask(MaskOp::Partial, "f", "É d"), Ok("É***".into()));
        assert_eq!(mask(MaskOp::Partial, "f", " Jo  "), Ok("***".into()));
        Ok(())
    }

    #[test]
    fn partial_numbers_never_show_more_than_four() -> Result<(), MaskError> {
        for value in ["12345678", "4111 1111 1111 1234", "ABCD-12345678-ÉFGH"] {
            let out = mask(MaskOp::Partial, "f", value)?;
            let visible = out.chars().filter(|c| c.is_alphanumeric()).count();
            assert_eq!(visible, 4, "{value:?} → {out:?}");
        }
        assert_eq!(
            mask(MaskOp::Partial, "f", "ABCD-12345678-ÉFGH"),
            Ok("****-****5678-****".into())
        );
        // Text after the number is masked, not shown as its last four.
        assert_eq!(
            mask(MaskOp::Partial, "card", "4111 1111 1111 1234 Jane"),
            Ok("**** **** **** 1234 ****".into())
        );
        // A number written as an e-mail's host is a number.
        let out = mask(MaskOp::Partial, "f", "x@4111-1111-1111-1234.io")?;
        assert!(
            out.chars().filter(char::is_ascii_digit).count() <= 4,
            "{out}"
        );
        assert_eq!(
            mask(MaskOp::Partial, "f", "jane@163.com"),
            Ok("j***@163.com".into())
        );
        Ok(())
    }

    #[test]
    fn generalize_redacts_what_is_neither_date_nor_amount() {
        for value in [
            "abc",
            "",
            "-",
            ".",
            "1.",
            ".5",
            "--5",
            "+5",
            "1,23",
            "1234,567",
            ",123",
            "1,234,",
            "1.2.3",
            " 84000",
            "84000 ",
            "1e6",
            "١٢٣",
            "1815-13-01",
            "1815-00",
            "1815-02-29",
            "1900-02-29",
            "1815-04-31",
            "1815-12-00",
            "1815-12-1",
            "18151-12-10",
            "1815/12/10",
            "😀",
        ] {
            assert_eq!(
                mask(MaskOp::Generalize, "income", value),
                Ok(REDACTED.to_owned()),
                "{value:?}"
            );
        }
    }

    /// A bare year is read as an amount: the same four digits could be a
    /// monthly income, which must not come back unchanged.
    #[test]
    fn generalize_never_returns_a_four_digit_amount_unchanged() {
        assert_eq!(
            mask(MaskOp::Generalize, "dob", "1990"),
            Ok("1000-9999".into())
        );
        assert_eq!(
            mask(MaskOp::Generalize, "income", "3500"),
            Ok("1000-9999".into())
        );
    }

    #[test]
    fn generalize_of_huge_amounts() {
        let huge = "9".repeat(1 << 20);
        assert_eq!(mask(MaskOp::Generalize, "f", &huge), Ok(">=1000000".into()));
        let negative = format!("-{huge}.{huge}");
        assert_eq!(mask(MaskOp::Generalize, "f", &negative), Ok("<0".into()));
        let zeros = format!("{}1", "0".repeat(1 << 20));
        assert_eq!(mask(MaskOp::Generalize, "f", &zeros), Ok("0-999".into()));
    }

    fn record() -> Vec<(String, String)> {
        [
            ("name", "Jane Doe"),
            ("email", "jane.doe@example.com"),
            ("iban", "GB33BUKB20201555555555"),
            ("dob", "1815-12-10"),
            ("income", "84000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn request(fields: &[(&str, MaskOp)]) -> Vec<(String, MaskOp)> {
        fields
            .iter()
            .map(|(f, op)| ((*f).to_owned(), *op))
            .collect()
    }

    #[test]
    fn apply_all_returns_only_the_requested_fields_in_order() {
        let wanted = request(&[
            ("income", MaskOp::Generalize),
            ("email", MaskOp::Partial),
            ("name", MaskOp::Redact),
        ]);
        let seen = apply_all(&wanted, &record(), &keys(), PARTNER);
        let expected: Vec<(String, String)> = [
            ("income", "50000-99999"),
            ("email", "j***@example.com"),
            ("name", "[redacted]"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(seen, Ok(expected));

        assert_eq!(apply_all(&[], &record(), &keys(), PARTNER), Ok(vec![]));
    }

    #[test]
    fn apply_all_refuses_missing_duplicate_and_ungeneralizable_fields() {
        let keys = keys();
        let missing = request(&[("name", MaskOp::Reveal), ("card", MaskOp::Partial)]);
        assert_eq!(
            apply_all(&missing, &record(), &keys, PARTNER),
            Err(MaskError::MissingField("card".into()))
        );

        let twice = request(&[("name", MaskOp::Redact), ("name", MaskOp::Reveal)]);
        assert_eq!(
            apply_all(&twice, &record(), &keys, PARTNER),
            Err(MaskError::DuplicateField("name".into()))
        );

        let mut doubled = record();
        doubled.push(("name".into(), "John Roe".into()));
        let name = request(&[("name", MaskOp::Reveal)]);
        assert_eq!(
            apply_all(&name, &doubled, &keys, PARTNER),
            Err(MaskError::DuplicateField("name".into()))
        );
        // A duplicate nobody asked for is not the partner's concern.
        let email = request(&[("email", MaskOp::Reveal)]);
        assert!(apply_all(&email, &doubled, &keys, PARTNER).is_ok());

        // A value `generalize` cannot take is redacted, the other fields
        // given: the token is not spent for nothing.
        let name_generalized = request(&[("name", MaskOp::Generalize), ("email", MaskOp::Reveal)]);
        let masked = apply_all(&name_generalized, &record(), &keys, PARTNER).expect("masked");
        assert_eq!(masked[0], ("name".to_string(), REDACTED.to_string()));
        assert_eq!(masked.len(), 2);
    }

    #[test]
    fn errors_name_the_field_but_never_the_value() {
        let shown = match mask(MaskOp::Tokenize, "in\0come", "secret-value") {
            Err(err) => err.to_string(),
            Ok(out) => panic!("a field name with a NUL was taken: {out:?}"),
        };
        assert!(shown.contains("come") && !shown.contains("secret-value"));
    }

    /// Strings that reach every branch more often than uniform ones do.
    fn shaped_string() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[0-9 ,.+-]{0,40}",
            "[a-zA-Z0-9.é😀]{0,8}@[a-z0-9.-]{0,12}",
            "[0-9]{4}-[0-9]{2}(-[0-9]{2})?",
            "-?[0-9]{1,3}(,[0-9]{3}){0,4}(\\.[0-9]{0,3})?",
            "[\\x00-\\x7f]{0,30}",
        ]
    }

    proptest! {
        #[test]
        fn apply_never_panics(
            field in shaped_string(),
            value in shaped_string(),
            partner in any::<String>(),
        ) {
            let keys = keys();
            for op in MaskOp::ALL {
                let out = apply(op, &field, &value, &keys, &partner);
                match op {
                    MaskOp::Reveal => prop_assert_eq!(out, Ok(value.clone())),
                    MaskOp::Redact => prop_assert_eq!(out, Ok(REDACTED.to_owned())),
                    MaskOp::Partial => prop_assert!(out.is_ok()),
                    MaskOp::Tokenize | MaskOp::Hash => {
                        prop_assert_eq!(out.is_ok(), !field.contains('\0'));
                    }
                    MaskOp::Generalize => {}
                }
            }
        }

        #[test]
        fn partial_numbers_show_at_most_four(value in "[0-9A-Za-z -]{8,60}") {
            prop_assume!(value.chars().filter(char::is_ascii_digit).count() >= 8);
            let out = partial(&value);
            prop_assert_eq!(out.chars().count(), value.chars().count());
            prop_assert!(out.chars().filter(|c| c.is_alphanumeric()).count() <= 4);
        }
    }
}
