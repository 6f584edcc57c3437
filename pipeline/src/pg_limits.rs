//! What PostgreSQL refuses for its data, checked by ingest so that nothing it accepts can fail
//! in the database because of its value (each limit was verified against PostgreSQL 15).
//!
//! - text: no NUL byte (SQLSTATE 22021).
//! - jsonb: no `\u0000` escape (22P05), no unpaired UTF-16 surrogate escape (22P02), numbers
//!   within `numeric`'s range (22003), nesting at most [`JSON_MAX_DEPTH`] (PostgreSQL stops
//!   with 54001 at about 30,000 levels on a 2 MB stack; TimescaleDB earlier).
//! - timestamptz: [`MIN_TIME_US`] ..= [`MAX_TIME_US`] (years 1 to 9999, so partition bounds,
//!   chunks and the lake's `date=YYYY-MM-DD` paths all hold them).
//! - B-tree index entries: at most [`BTREE_MAX_INDEX_ROW`] bytes (54000), estimated
//!   conservatively from these constants by `schema::index_entry_estimate` (over the row's cells; kept there so this module needs nothing of `schema`).
//!
//! Every check is one pass over bytes the parser already holds, and allocates only to build an
//! error message.

use std::fmt;

/// The earliest accepted time, `0001-01-01T00:00:00Z`, in µs since the Unix epoch.
pub const MIN_TIME_US: i64 = -62_135_596_800_000_000;
/// The latest accepted time, `9999-12-31T23:59:59.999999Z`, in µs since the Unix epoch.
pub const MAX_TIME_US: i64 = 253_402_300_799_999_999;
/// [`MIN_TIME_US`] as RFC 3339, for messages.
pub const MIN_TIME_TEXT: &str = "0001-01-01T00:00:00Z";
/// [`MAX_TIME_US`] as RFC 3339, for messages.
pub const MAX_TIME_TEXT: &str = "9999-12-31T23:59:59.999999Z";

/// Deepest nesting of arrays and objects accepted in a jsonb value.
pub const JSON_MAX_DEPTH: usize = 128;
/// Nesting limit of a decoded MessagePack payload, in rmpv's depth units (two per array or map
/// level): a payload nested deeper than a jsonb value may be is refused while decoding, before
/// recursion could exhaust a worker thread's stack.
pub const MSGPACK_MAX_DEPTH: usize = 2 * (JSON_MAX_DEPTH + 2);
/// `numeric` holds at most this many decimal digits before the decimal point
/// (weight 32767 in base-10000 digits): `1e131071` is stored, `10e131071` is refused.
pub const NUMERIC_MAX_INT_DIGITS: i64 = 131_072;
/// `numeric` holds at most this many decimal digits after the decimal point:
/// `1e-16383` is stored, `1e-16384` and `1.5e-16383` are refused.
pub const NUMERIC_MAX_SCALE: i64 = 16_383;
/// Exponents are read up to this magnitude; anything larger is out of range anyway.
const EXPONENT_CAP: i64 = 1 << 32;

/// PostgreSQL's largest B-tree index entry (version 4, 8 kB pages), in bytes.
pub const BTREE_MAX_INDEX_ROW: usize = 2704;
/// Index tuple header (8 bytes) plus a null bitmap, aligned (8 bytes).
pub const INDEX_TUPLE_OVERHEAD: usize = 16;
/// What each indexed column costs besides its data: a fixed-width value (at most 8 bytes), or
/// a variable-length header (at most 4 bytes) and alignment padding.
pub const INDEX_COLUMN_OVERHEAD: usize = 8;
/// jsonb's binary form is counted as this many times its text length…
pub const JSONB_INDEX_FACTOR: usize = 8;
/// …plus this much (measured: `[1,1,…]` grows 6×, the text `1` becomes 20 bytes).
pub const JSONB_INDEX_BASE: usize = 16;

/// Whether `us` (µs since the Unix epoch) is within [`MIN_TIME_US`] ..= [`MAX_TIME_US`].
pub fn time_in_range(us: i64) -> bool {
    (MIN_TIME_US..=MAX_TIME_US).contains(&us)
}

/// The message for a time outside the accepted range; `what` says which value it was.
pub fn time_out_of_range(what: impl fmt::Display) -> String {
    format!("{what} is outside the accepted range {MIN_TIME_TEXT} to {MAX_TIME_TEXT}")
}

/// Checks a text value for the NUL byte PostgreSQL text cannot hold.
pub fn check_text(text: &[u8]) -> Result<(), String> {
    match memchr::memchr(0, text) {
        None => Ok(()),
        Some(at) => Err(format!(
            "NUL (0x00) at byte {at}: PostgreSQL text cannot hold it"
        )),
    }
}

/// Why a JSON text cannot be stored as jsonb. Positions are byte offsets into the JSON text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonLimit {
    /// Arrays and objects nest deeper than [`JSON_MAX_DEPTH`].
    TooDeep { at: usize },
    /// The escape `\u0000`.
    NulEscape { at: usize },
    /// A `\uXXXX` surrogate escape that is not a high one followed by a low one.
    LoneSurrogate { at: usize, unit: u16 },
    /// A number outside [`NUMERIC_MAX_INT_DIGITS`] / [`NUMERIC_MAX_SCALE`].
    NumberOutOfRange { at: usize },
}

impl fmt::Display for JsonLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            JsonLimit::TooDeep { at } => write!(
                f,
                "JSON nests deeper than {JSON_MAX_DEPTH} levels (at byte {at})"
            ),
            JsonLimit::NulEscape { at } => {
                write!(f, "JSON escape \\u0000 at byte {at}: jsonb cannot hold NUL")
            }
            JsonLimit::LoneSurrogate { at, unit } => write!(
                f,
                "JSON escape \\u{unit:04x} at byte {at} is an unpaired UTF-16 surrogate"
            ),
            JsonLimit::NumberOutOfRange { at } => write!(
                f,
                "JSON number at byte {at} is outside numeric's range (at most \
                 {NUMERIC_MAX_INT_DIGITS} digits before the decimal point and \
                 {NUMERIC_MAX_SCALE} after, exponent applied)"
            ),
        }
    }
}

/// Checks JSON text for what jsonb refuses beyond syntax (which serde_json checks): one pass,
/// no allocation. Text that is not JSON may pass; a caller still parses it.
pub fn check_json(json: &[u8]) -> Result<(), JsonLimit> {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = json.get(i) {
        i = match b {
            b'"' => scan_string(json, i + 1)?,
            b'[' | b'{' => {
                depth += 1;
                if depth > JSON_MAX_DEPTH {
                    return Err(JsonLimit::TooDeep { at: i });
                }
                i + 1
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i + 1
            }
            b'-' | b'0'..=b'9' => scan_number(json, i)?,
            _ => i + 1,
        };
    }
    Ok(())
}

/// Skips a string whose opening quote is before `i`; returns the offset after its closing quote.
/// A plain loop: telemetry strings are short, where it beats `memchr2`'s setup.
fn scan_string(json: &[u8], mut i: usize) -> Result<usize, JsonLimit> {
    while let Some(&b) = json.get(i) {
        match b {
            b'"' => return Ok(i + 1),
            b'\\' => {
                i = match json.get(i + 1) {
                    Some(b'u') => scan_unicode_escape(json, i)?,
                    Some(_) => i + 2,
                    None => return Ok(json.len()),
                }
            }
            _ => i += 1,
        }
    }
    Ok(json.len())
}

/// Checks the `\uXXXX` escape at `at` (and the low surrogate a high one needs); returns the
/// offset after it. A malformed escape is skipped: serde_json reports it.
fn scan_unicode_escape(json: &[u8], at: usize) -> Result<usize, JsonLimit> {
    let Some(unit) = hex4(json, at + 2) else {
        return Ok(at + 2);
    };
    match unit {
        0 => Err(JsonLimit::NulEscape { at }),
        0xd800..=0xdbff => {
            let low = if json.get(at + 6..at + 8) == Some(b"\\u") {
                hex4(json, at + 8)
            } else {
                None
            };
            match low {
                Some(0xdc00..=0xdfff) => Ok(at + 12),
                _ => Err(JsonLimit::LoneSurrogate { at, unit }),
            }
        }
        0xdc00..=0xdfff => Err(JsonLimit::LoneSurrogate { at, unit }),
        _ => Ok(at + 6),
    }
}

/// The four hex digits at `at`, if there are four.
fn hex4(json: &[u8], at: usize) -> Option<u16> {
    json.get(at..at + 4)?.iter().try_fold(0u16, |acc, &b| {
        let d = (b as char).to_digit(16)?;
        Some(acc << 4 | d as u16)
    })
}

/// Reads the number starting at `start` and checks it against `numeric`'s range; returns the
/// offset after it. The rule, for a number written `I.FeE`: `len(I) + E ≤ 131072` and
/// `len(F) − E ≤ 16383` (conservative by one digit for a leading `0`).
fn scan_number(json: &[u8], start: usize) -> Result<usize, JsonLimit> {
    let mut i = start + usize::from(json[start] == b'-');
    let int_digits = count_digits(json, i);
    i += int_digits;
    let mut frac_digits = 0;
    if json.get(i) == Some(&b'.') {
        frac_digits = count_digits(json, i + 1);
        i += 1 + frac_digits;
    }
    let mut exponent: i64 = 0;
    if matches!(json.get(i), Some(b'e' | b'E')) {
        i += 1;
        let negative = json.get(i) == Some(&b'-');
        if matches!(json.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        while let Some(&d) = json.get(i).filter(|d| d.is_ascii_digit()) {
            exponent = (exponent * 10 + i64::from(d - b'0')).min(EXPONENT_CAP);
            i += 1;
        }
        if negative {
            exponent = -exponent;
        }
    }
    let (int_digits, frac_digits) = (int_digits as i64, frac_digits as i64);
    if int_digits + exponent > NUMERIC_MAX_INT_DIGITS || frac_digits - exponent > NUMERIC_MAX_SCALE
    {
        return Err(JsonLimit::NumberOutOfRange { at: start });
    }
    Ok(i)
}

fn count_digits(json: &[u8], at: usize) -> usize {
    json.get(at..).map_or(0, |rest| {
        rest.iter().take_while(|b| b.is_ascii_digit()).count()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use rand::{Rng, SeedableRng};

    fn json(s: &str) -> Result<(), JsonLimit> {
        check_json(s.as_bytes())
    }

    #[test]
    fn time_bounds_are_the_documented_instants() {
        let min = Utc.timestamp_micros(MIN_TIME_US).unwrap();
        let max = Utc.timestamp_micros(MAX_TIME_US).unwrap();
        let fmt = |d: chrono::DateTime<Utc>| d.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        assert_eq!(fmt(min), MIN_TIME_TEXT);
        assert_eq!(fmt(max), MAX_TIME_TEXT);
        assert!(time_in_range(MIN_TIME_US) && time_in_range(MAX_TIME_US));
        assert!(!time_in_range(MIN_TIME_US - 1) && !time_in_range(MAX_TIME_US + 1));
    }

    #[test]
    fn text_with_nul_is_refused() {
        assert_eq!(
            check_text(b"ab\0c").unwrap_err(),
            "NUL (0x00) at byte 2: PostgreSQL text cannot hold it"
        );
        assert!(check_text("héllo \\0 \\u0000".as_bytes()).is_ok());
    }

    #[test]
    fn nesting_is_limited() {
        let at_limit = "[".repeat(JSON_MAX_DEPTH) + &"]".repeat(JSON_MAX_DEPTH);
        assert_eq!(json(&at_limit), Ok(()));
        let over = "{\"a\":".repeat(JSON_MAX_DEPTH) + "[1]" + &"}".repeat(JSON_MAX_DEPTH);
        let err = json(&over).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("JSON nests deeper than 128 levels (at byte {})", 5 * 128)
        );
        // Brackets inside strings do not count.
        assert_eq!(json(&format!("\"{}\"", "[".repeat(1000))), Ok(()));
    }

    #[test]
    fn nul_and_surrogate_escapes() {
        assert_eq!(
            json(r#"{"a":"x\u0000"}"#).unwrap_err().to_string(),
            "JSON escape \\u0000 at byte 7: jsonb cannot hold NUL"
        );
        assert_eq!(
            json(r#""\ud800""#).unwrap_err().to_string(),
            "JSON escape \\ud800 at byte 1 is an unpaired UTF-16 surrogate"
        );
        assert_eq!(
            json(r#""\uDC00\uD800""#).unwrap_err(),
            JsonLimit::LoneSurrogate {
                at: 1,
                unit: 0xdc00
            }
        );
        assert_eq!(
            json(r#""\ud800\u0041""#).unwrap_err(),
            JsonLimit::LoneSurrogate {
                at: 1,
                unit: 0xd800
            }
        );
        assert_eq!(
            json(r#""\ud83d\ude00 \u00e9 \\u0000 \"\u0000""#),
            Err(JsonLimit::NulEscape { at: 31 })
        );
        assert_eq!(json(r#"["\ud83d\ude00", "\u0041\\", "\u00"]"#), Ok(()));
    }

    #[test]
    fn numbers_within_numeric() {
        for ok in [
            "1e131071",
            "-1E+131071",
            "1e-16383",
            "0.5e-16382",
            "123.456",
            "[0, -0.0, 1e300, 5e-324]",
        ] {
            assert_eq!(json(ok), Ok(()), "{ok}");
        }
        for bad in [
            "1e131072",
            "10e131071",
            "1e-16384",
            "1.5e-16383",
            "0e-16384",
            "1e1000000000",
            "-1e-99999999999999999999",
            "0e1000000000000000000000",
        ] {
            assert_eq!(
                json(bad),
                Err(JsonLimit::NumberOutOfRange { at: 0 }),
                "{bad}"
            );
        }
        assert_eq!(
            json("[1, 1e131072]").unwrap_err().to_string(),
            "JSON number at byte 4 is outside numeric's range (at most 131072 digits before the \
             decimal point and 16383 after, exponent applied)"
        );
    }

    /// Arbitrary and JSON-like bytes: the checker never panics and stops within the input.
    #[test]
    fn checker_survives_arbitrary_bytes() {
        const ALPHABET: &[u8] = b"[]{}\"\\u0123456789abcdefABCDEF.eE+-, :dD8";
        for seed in 0..2000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let len = rng.random_range(0..300);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    if seed % 2 == 0 {
                        ALPHABET[rng.random_range(0..ALPHABET.len())]
                    } else {
                        rng.random()
                    }
                })
                .collect();
            let _ = check_json(&bytes);
        }
        // A whole event of brackets fails at the limit, not on the stack.
        assert!(matches!(
            check_json(&vec![b'['; 1 << 20]),
            Err(JsonLimit::TooDeep { at: 128 })
        ));
    }
}
