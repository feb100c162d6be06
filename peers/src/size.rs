//! The one grammar for byte sizes that people type: on the `archip` command line, in
//! StorageClass and mutable parameters (`blockSize`, `qosBandwidth`) and in the ublk test
//! driver. One parser, so that a size written in one place means the same in every other.
//!
//! Grammar (surrounding whitespace is ignored; suffixes in any case):
//!
//! ```text
//! size   = digits [ suffix ]
//! suffix = "B" | unit | unit "i" | unit "B" | unit "iB"
//! unit   = "K" | "M" | "G" | "T" | "P"          (powers of 1024: K = 2^10 ... P = 2^50)
//! ```
//!
//! So `4096`, `4K`, `4Ki`, `4KiB`, `4KB` and `4k` are all 4096 bytes: every suffix is binary,
//! as for `qemu-img`, `truncate` and Kubernetes quantities (`Ki`, `Mi`). It is the union of the
//! three grammars this module replaced (the CLI's `K`/`KiB`/`KB`, the StorageClass's `Ki`/`Mi`,
//! the test driver's `K`/`M`/`G`). Refused, each with its own [`SizeFault`]: empty input, a
//! sign, a fraction (`1.5G`: sizes are whole bytes, and a decimal fraction of a binary unit is
//! rarely one; write `1536M`), an unknown suffix, and anything above `u64::MAX` bytes.
//! Zero is a size (a `qosBandwidth` of 0 means unlimited, an offset of 0 is the start); callers
//! for which an empty size makes no sense use [`parse_positive`].

/// Why a size was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SizeFault {
    #[error("empty")]
    Empty,
    #[error("a size cannot be negative or signed")]
    Signed,
    #[error("expected a number")]
    NotANumber,
    #[error("fractions are not accepted (use a smaller unit: 1536M, not 1.5G)")]
    Fraction,
    #[error("unknown suffix (use K, M, G, T or P, optionally followed by i, B or iB)")]
    UnknownSuffix,
    #[error("too large (more than 2^64-1 bytes)")]
    TooLarge,
    #[error("must be positive")]
    Zero,
}

/// A size that was refused, with the text as given: the error names what the user typed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad size {input:?}: {fault} (examples: 10G, 512Mi, 4KiB, 1048576)")]
pub struct SizeError {
    pub input: String,
    pub fault: SizeFault,
}

/// Parses a size in bytes (zero included) by the grammar of this module.
pub fn parse(input: &str) -> Result<u64, SizeError> {
    let bad = |fault| SizeError {
        input: input.to_string(),
        fault,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(bad(SizeFault::Empty));
    }
    if s.starts_with(['-', '+']) {
        return Err(bad(SizeFault::Signed));
    }
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(bad(SizeFault::NotANumber));
    }
    let (number, suffix) = s.split_at(digits);
    if suffix.starts_with(['.', ',']) {
        return Err(bad(SizeFault::Fraction));
    }
    let shift = shift_of(suffix).ok_or_else(|| bad(SizeFault::UnknownSuffix))?;
    // Every digit string parses; only its magnitude can fail.
    let number: u64 = number.parse().map_err(|_| bad(SizeFault::TooLarge))?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad(SizeFault::TooLarge))
}

/// [`parse`], refusing zero: for sizes of things that must hold at least a byte.
pub fn parse_positive(input: &str) -> Result<u64, SizeError> {
    match parse(input)? {
        0 => Err(SizeError {
            input: input.to_string(),
            fault: SizeFault::Zero,
        }),
        n => Ok(n),
    }
}

/// The power of two a suffix multiplies by.
fn shift_of(suffix: &str) -> Option<u32> {
    let lower = suffix.to_ascii_lowercase();
    if lower.is_empty() || lower == "b" {
        return Some(0);
    }
    let mut chars = lower.chars();
    let shift = match chars.next()? {
        'k' => 10,
        'm' => 20,
        'g' => 30,
        't' => 40,
        'p' => 50,
        _ => return None,
    };
    matches!(chars.as_str(), "" | "i" | "b" | "ib").then_some(shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(input: &str) -> SizeFault {
        parse(input).unwrap_err().fault
    }

    #[test]
    fn every_suffix_spelling_is_binary() {
        for (text, want) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("100B", 100),
            ("100b", 100),
            ("4K", 4096),
            ("4k", 4096),
            ("4Ki", 4096),
            ("4KiB", 4096),
            ("4KB", 4096),
            ("4kib", 4096),
            ("64Ki", 64 << 10),
            ("512M", 512 << 20),
            ("4Mi", 4 << 20),
            ("10G", 10 << 30),
            ("10GiB", 10 << 30),
            ("1T", 1 << 40),
            ("1Ti", 1 << 40),
            ("2P", 2 << 50),
            ("2PiB", 2 << 50),
            (" 8M\n", 8 << 20),
            ("16383P", 16383 << 50),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn nonsense_is_refused_with_its_reason() {
        for (text, want) in [
            ("", SizeFault::Empty),
            ("  ", SizeFault::Empty),
            ("-1", SizeFault::Signed),
            ("+1", SizeFault::Signed),
            ("-4K", SizeFault::Signed),
            ("G", SizeFault::NotANumber),
            ("lots", SizeFault::NotANumber),
            ("1.5G", SizeFault::Fraction),
            ("0.5", SizeFault::Fraction),
            ("1,5M", SizeFault::Fraction),
            ("12Q", SizeFault::UnknownSuffix),
            ("4KiBB", SizeFault::UnknownSuffix),
            ("4iB", SizeFault::UnknownSuffix),
            ("10 G", SizeFault::UnknownSuffix),
            ("10 G X", SizeFault::UnknownSuffix),
            ("1e9", SizeFault::UnknownSuffix),
            ("18446744073709551616", SizeFault::TooLarge),
            ("99999999999999999999", SizeFault::TooLarge),
            ("16384P", SizeFault::TooLarge),
            ("16777216T", SizeFault::TooLarge),
        ] {
            assert_eq!(fault(text), want, "{text:?}");
        }
    }

    #[test]
    fn positive_sizes_refuse_zero_only() {
        assert_eq!(parse_positive("0G").unwrap_err().fault, SizeFault::Zero);
        assert_eq!(parse_positive("0").unwrap_err().fault, SizeFault::Zero);
        assert_eq!(parse_positive("1"), Ok(1));
        assert_eq!(
            parse_positive("x").unwrap_err().fault,
            SizeFault::NotANumber
        );
    }

    #[test]
    fn the_error_names_the_input() {
        let e = parse("12Q").unwrap_err().to_string();
        assert!(e.contains("\"12Q\""), "{e}");
        assert!(e.contains("unknown suffix"), "{e}");
    }
}
