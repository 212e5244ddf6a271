//! Reading at most a cap into memory: the buffer grows by doubling as bytes arrive, never past the
//! cap plus one byte (`Read::read_to_end` alone doubles past any `take`, up to twice the cap).

use std::io::{self, Read};

/// Reads `reader` to its end, or to `cap + 1` bytes (so the caller sees it passed the cap). The
/// buffer starts at `first` bytes (at most `cap + 1`) and its capacity never exceeds `cap + 1`.
pub fn read(reader: &mut impl Read, cap: u64, first: usize) -> io::Result<Vec<u8>> {
    let most = usize::try_from(cap.saturating_add(1)).unwrap_or(usize::MAX);
    let mut buf = Vec::with_capacity(first.clamp(1, most));
    loop {
        let room = (buf.capacity().min(most) - buf.len()) as u64;
        // `read_to_end` retries an interrupted read itself; `take` keeps it within the capacity.
        reader.by_ref().take(room).read_to_end(&mut buf)?;
        if buf.len() < buf.capacity().min(most) || buf.len() == most {
            return Ok(buf);
        }
        let next = buf.capacity().saturating_mul(2).min(most);
        // Bytes that arrived ask for the growth, yet memory may still run out: an error, not an abort.
        buf.try_reserve_exact(next - buf.len())
            .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_one_byte_past_the_cap_without_growing_past_it() {
        for (len, cap, first) in [
            (0, 10, 4),
            (10, 10, 4),
            (11, 10, 4),
            (1000, 10, 1),
            (5000, 4096, 3000),
        ] {
            let data = vec![7u8; len];
            let got = read(&mut &data[..], cap, first).unwrap();
            assert_eq!(got.len() as u64, (len as u64).min(cap + 1), "{len} {cap}");
            assert!(
                got.capacity() as u64 <= cap + 1,
                "{len} {cap}: {}",
                got.capacity()
            );
        }
    }

    #[test]
    fn a_large_read_grows_by_doubling() {
        let data = vec![1u8; 3 << 20];
        let got = read(&mut &data[..], 64 << 20, 4096).unwrap();
        assert_eq!(got, data);
        assert!(got.capacity() <= 4 << 20, "{}", got.capacity());
    }
}
