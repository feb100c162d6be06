//! Byte sizes as people type them (`10G`, `512M`, `4K`, `4KiB`, `1000`) and as `archip` prints
//! them. The grammar is [`peers::size`]'s, shared with StorageClass parameters, so a size means
//! the same on the command line and in a class; `archip` refuses zero (no size it takes may be
//! empty).

use peers::size::parse_positive as parse_size;

/// `clap` value parser for size arguments.
pub fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A size for humans: the largest binary unit that keeps at least one whole unit, with up to
/// one decimal (`10 GiB`, `1.5 MiB`, `512 B`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let value = bytes as f64 / (1u64 << (10 * unit)) as f64;
    if bytes % (1u64 << (10 * unit)) == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peers::size::SizeFault;

    #[test]
    fn suffixes_are_binary() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("100B"), Ok(100));
    }

    #[test]
    fn nonsense_is_refused() {
        for bad in [
            "",
            "0",
            "0G",
            "12Q",
            "G",
            "-1",
            "1.5G",
            "10 G X",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            parse_size("16777216T").unwrap_err().fault,
            SizeFault::TooLarge
        );
        assert!(parse_size("12Q").unwrap_err().to_string().contains("12Q"));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(4096), "4 KiB");
        assert_eq!(human(10 << 30), "10 GiB");
        assert_eq!(human(3 << 19), "1.5 MiB");
    }
}
