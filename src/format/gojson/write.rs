//! Writing strings and numbers as Go's `Marshal` does.

/// Appends `s` as Go writes a string: `"`, `\` and control characters escaped (`\b \f \n \r \t`, the
/// rest `\u00XX`), and `<`, `>`, `&`, U+2028 and U+2029 as `\u` escapes.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let escaped: Option<&[u8]> = match c {
            '"' => Some(b"\\\""),
            '\\' => Some(b"\\\\"),
            '\u{8}' => Some(b"\\b"),
            '\u{c}' => Some(b"\\f"),
            '\n' => Some(b"\\n"),
            '\r' => Some(b"\\r"),
            '\t' => Some(b"\\t"),
            '<' | '>' | '&' | '\u{0}'..='\u{1f}' | '\u{2028}' | '\u{2029}' => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escaped {
            Some(e) => out.extend_from_slice(e),
            None => {
                let n = c as u32;
                out.extend_from_slice(b"\\u");
                for shift in [12, 8, 4, 0] {
                    out.push(HEX[((n >> shift) & 0xF) as usize]);
                }
            }
        }
        start = i + c.len_utf8();
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends a float64 as Go's encoding/json writes it: the shortest digits that read back as the same
/// number, without an exponent from 1e-6 up to 1e21, else with one (`1e+21`, `1.5e-7`).
pub fn write_f64(out: &mut Vec<u8>, f: f64) {
    // Rust's `{:e}` gives the same shortest digits: `d[.ddd]e<exp>`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let abs = f.abs();
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
