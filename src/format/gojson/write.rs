//! Writing strings and numbers as Go's `Marshal` does.

use crate::format::{find_marked, Marks};

/// The bytes `write_str` may escape: every escaped character's first byte.
pub(super) const MAY_ESCAPE: Marks<6> = Marks {
    bytes: [b'"', b'\\', b'<', b'>', b'&', 0xe2],
    below: 0x20,
};

/// Appends `s` as Go writes a string: `"`, `\` and control characters escaped (`\b \f \n \r \t`, the
/// rest `\u00XX`), and `<`, `>`, `&`, U+2028 and U+2029 as `\u` escapes.
///
/// Byte by byte, runs without an escape copied whole: every character escaped but two is ASCII, and
/// U+2028 and U+2029 are the only ones encoded `E2 80 A8` and `E2 80 A9` (a lead byte `E2` is never
/// part of another character). The bytes between them are passed in blocks (`find_marked`): the long
/// texts of an event (notes, payloads) hold few or none.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let (mut start, mut i) = (0, 0);
    while let Some(n) = find_marked(&bytes[i..], &MAY_ESCAPE) {
        i += n;
        let b = bytes[i];
        let (escaped, code, len): (Option<&[u8]>, u32, usize) = match b {
            b'"' => (Some(b"\\\""), 0, 1),
            b'\\' => (Some(b"\\\\"), 0, 1),
            0x08 => (Some(b"\\b"), 0, 1),
            0x0c => (Some(b"\\f"), 0, 1),
            b'\n' => (Some(b"\\n"), 0, 1),
            b'\r' => (Some(b"\\r"), 0, 1),
            b'\t' => (Some(b"\\t"), 0, 1),
            b'<' | b'>' | b'&' | 0x00..=0x1f => (None, u32::from(b), 1),
            0xe2 => match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(0x80), Some(&last @ (0xa8 | 0xa9))) => {
                    (None, 0x2028 + u32::from(last - 0xa8), 3)
                }
                _ => {
                    i += 1;
                    continue;
                }
            },
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        match escaped {
            Some(e) => out.extend_from_slice(e),
            None => {
                out.extend_from_slice(b"\\u");
                for shift in [12, 8, 4, 0] {
                    out.push(HEX[((code >> shift) & 0xF) as usize]);
                }
            }
        }
        i += len;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends a float64 as Go's encoding/json writes it: the shortest digits that read back as the same
/// number, without an exponent from 1e-6 up to 1e21, else with one (`1e+21`, `1.5e-7`).
pub fn write_f64(out: &mut Vec<u8>, f: f64) {
    let sign = if f.is_sign_negative() { "-" } else { "" };
    let abs = f.abs();
    let (digits, exp) = shortest(abs);
    let mut text = String::from(sign);
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        text.push_str(&digits[..1]);
        if digits.len() > 1 {
            text.push('.');
            text.push_str(&digits[1..]);
        }
        text.push('e');
        text.push(if exp < 0 { '-' } else { '+' });
        let e = exp.unsigned_abs();
        // Go writes at least two exponent digits, then drops the zero of `e-0N`.
        if e < 10 && exp > 0 {
            text.push('0');
        }
        text.push_str(&e.to_string());
    } else if exp < 0 {
        text.push_str("0.");
        text.push_str(&"0".repeat((-exp - 1) as usize));
        text.push_str(&digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            text.push_str(&digits);
            text.push_str(&"0".repeat(int_len - digits.len()));
        } else {
            text.push_str(&digits[..int_len]);
            text.push('.');
            text.push_str(&digits[int_len..]);
        }
    }
    out.extend_from_slice(text.as_bytes());
}

/// The shortest significant digits that read back as `f` (finite, not negative), as Go's `strconv`
/// picks them, and the decimal exponent of the first: `f == d₁.d₂d₃… × 10^exp`. Zero is `("0", 0)`.
/// Ryu gives them as Go does, ties to an even last digit; its text (`1.0`, `0.001`, `1.5e-7`, `1e16`)
/// is read back into digits and exponent here.
fn shortest(f: f64) -> (String, i32) {
    let mut buffer = ryu::Buffer::new();
    let text = buffer.format_finite(f);
    let (mantissa, exp) = text.split_once('e').unwrap_or((text, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all: String = [int, frac].concat();
    let leading = all.bytes().take_while(|&b| b == b'0').count();
    let digits = all[leading..].trim_end_matches('0');
    if digits.is_empty() {
        return ("0".into(), 0);
    }
    (digits.into(), int.len() as i32 - 1 - leading as i32 + exp)
}
