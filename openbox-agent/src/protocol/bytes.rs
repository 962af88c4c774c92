//! Readers of fixed-layout fields in a message body, shared by the parsers.
//!
//! Each takes the body and an offset and returns `None` when the field runs past the end
//! (never panics, never reads out of bounds): a short or malformed message is the
//! parser's to count, not a crash.

/// `N` bytes at `at`.
pub(super) fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

pub(super) fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    array(b, at).map(u32::from_be_bytes)
}

pub(super) fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    array(b, at).map(u16::from_le_bytes)
}

pub(super) fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    array(b, at).map(u32::from_le_bytes)
}

pub(super) fn le_i32(b: &[u8], at: usize) -> Option<i32> {
    array(b, at).map(i32::from_le_bytes)
}

pub(super) fn le_i64(b: &[u8], at: usize) -> Option<i64> {
    array(b, at).map(i64::from_le_bytes)
}

/// MySQL's length-encoded integer at `at` ("Protocol::LengthEncodedInteger"): below
/// 0xFB the byte itself, 0xFC + 2 bytes, 0xFD + 3, 0xFE + 8 (little-endian). Its value
/// and the offset after it.
pub(super) fn lenenc_int(b: &[u8], at: usize) -> Option<(u64, usize)> {
    let first = *b.get(at)?;
    let width = match first {
        0..=0xfa => return Some((u64::from(first), at + 1)),
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        // 0xFB is NULL in a row, 0xFF an error header: not integers.
        _ => return None,
    };
    let bytes = b.get(at + 1..at + 1 + width)?;
    let mut v = [0u8; 8];
    v.get_mut(..width)?.copy_from_slice(bytes);
    Some((u64::from_le_bytes(v), at + 1 + width))
}

/// NUL-terminated string at `at`: its bytes and the offset after the NUL.
pub(super) fn cstr(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = b.get(at..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    Some((rest.get(..end)?, at + end + 1))
}

/// NUL-terminated string at `at`, or everything left when the NUL was cut off.
pub(super) fn cstr_or_rest(b: &[u8], at: usize) -> &[u8] {
    let rest = b.get(at..).unwrap_or_default();
    match rest.iter().position(|&c| c == 0) {
        Some(end) => rest.get(..end).unwrap_or_default(),
        None => rest,
    }
}

/// Text as sent, invalid UTF-8 replaced.
pub(super) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_read_in_bounds_only() {
        let b = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(be_u32(&b, 0), Some(0x0102_0304));
        assert_eq!(le_u32(&b, 0), Some(0x0403_0201));
        assert_eq!(le_u16(&b, 7), Some(0x0908));
        assert_eq!(le_i32(&[0xff; 4], 0), Some(-1));
        assert_eq!(le_i64(&b, 1), Some(0x0908_0706_0504_0302));
        assert_eq!(le_u16(&b, 8), None);
        assert_eq!(be_u32(&b, usize::MAX), None);
        assert_eq!(array::<2>(&b, 9), None);
    }

    #[test]
    fn length_encoded_integers() {
        assert_eq!(lenenc_int(&[0xfa], 0), Some((0xfa, 1)));
        assert_eq!(lenenc_int(&[0xfc, 0x34, 0x12], 0), Some((0x1234, 3)));
        assert_eq!(lenenc_int(&[0, 0xfd, 1, 2, 3], 1), Some((0x03_0201, 5)));
        assert_eq!(
            lenenc_int(&[0xfe, 1, 0, 0, 0, 0, 0, 0, 1], 0),
            Some((1 | 1 << 56, 9))
        );
        assert_eq!(lenenc_int(&[0xfb], 0), None);
        assert_eq!(lenenc_int(&[0xff], 0), None);
        assert_eq!(lenenc_int(&[0xfc, 1], 0), None);
    }

    #[test]
    fn c_strings() {
        assert_eq!(cstr(b"ab\0cd\0", 0), Some((&b"ab"[..], 3)));
        assert_eq!(cstr(b"ab\0cd\0", 3), Some((&b"cd"[..], 6)));
        assert_eq!(cstr(b"ab", 0), None);
        assert_eq!(cstr(b"ab", 5), None);
        assert_eq!(cstr_or_rest(b"ab", 0), b"ab");
        assert_eq!(cstr_or_rest(b"ab\0c", 0), b"ab");
        assert_eq!(cstr_or_rest(b"ab", 9), b"");
        assert_eq!(lossy(b"a\xffb"), "a\u{fffd}b");
    }
}
