//! Nix's base-32 encoding ("nix32").
//!
//! The alphabet omits `e`, `o`, `u` and `t`, and the encoding starts from the *last* bit of the
//! input, so it is not RFC 4648 base32 read backwards: it is its own format.

use thiserror::Error;

/// The 32 characters Nix uses, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a nix32 string could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The string has a character outside [`ALPHABET`].
    #[error("invalid nix32 character {0:?}")]
    InvalidChar(char),
    /// The string's length is not the encoding of the expected number of bytes.
    #[error("nix32 string has length {found}, expected {expected}")]
    WrongLength {
        /// The length that was expected.
        expected: usize,
        /// The length that was found.
        found: usize,
    },
    /// The leading character carries bits beyond the decoded length.
    #[error("nix32 string has non-zero padding bits")]
    NonZeroPadding,
}

/// The length of the nix32 encoding of `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 { 0 } else { (len * 8 - 1) / 5 + 1 }
}

/// The number of bytes a nix32 string of `len` characters decodes to.
pub const fn decoded_len(len: usize) -> usize {
    len * 5 / 8
}

/// Encodes bytes as nix32.
pub fn encode(input: &[u8]) -> String {
    let len = encoded_len(input.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let low = input[i] >> j;
        let high = if i + 1 < input.len() {
            // Bits of the next byte that spill into this digit; shifting by 8 would overflow.
            ((input[i + 1] as u16) << (8 - j)) as u8
        } else {
            0
        };
        out.push(ALPHABET[((low | high) & 0x1f) as usize] as char);
    }
    out
}

/// Each byte's digit value, or `INVALID`: a table, since a server decodes a hash per request.
const DIGITS: [u8; 256] = {
    let mut t = [INVALID; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};
const INVALID: u8 = 0xff;

fn digit(c: u8) -> Option<u8> {
    Some(DIGITS[c as usize]).filter(|&d| d != INVALID)
}

/// Decodes a nix32 string into exactly `N` bytes.
pub fn decode_exact<const N: usize>(input: &str) -> Result<[u8; N], DecodeError> {
    let mut out = [0u8; N];
    decode_into(input.as_bytes(), &mut out)?;
    Ok(out)
}

/// Decodes a nix32 string of any length.
pub fn decode(input: &str) -> Result<Vec<u8>, DecodeError> {
    let mut out = vec![0u8; decoded_len(input.len())];
    decode_into(input.as_bytes(), &mut out)?;
    Ok(out)
}

fn decode_into(input: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    let expected = encoded_len(out.len());
    if input.len() != expected {
        return Err(DecodeError::WrongLength { expected, found: input.len() });
    }
    for (n, &c) in input.iter().rev().enumerate() {
        let d = digit(c).ok_or(DecodeError::InvalidChar(c as char))?;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= d << j;
        let carry = ((d as u16) >> (8 - j)) as u8;
        if i + 1 < out.len() {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(DecodeError::NonZeroPadding);
        }
    }
    Ok(())
}

/// True if every byte of `s` is a nix32 digit.
pub fn is_nix32(s: &str) -> bool {
    s.bytes().all(|c| digit(c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values_from_nix() {
        // `nix hash to-base32 sha256:e3b0c442...` (sha256 of the empty string).
        let empty_sha256 = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
            0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
        ];
        let s = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        assert_eq!(encode(&empty_sha256), s);
        assert_eq!(decode_exact::<32>(s).unwrap(), empty_sha256);
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
        assert_eq!(encode(&[]), "");
    }

    #[test]
    fn the_digit_table_is_the_alphabet() {
        for c in 0..=255u8 {
            assert_eq!(digit(c), ALPHABET.iter().position(|&a| a == c).map(|p| p as u8), "byte {c}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode_exact::<20>("e").unwrap_err(), DecodeError::WrongLength { expected: 32, found: 1 });
        let mut s = "0".repeat(32);
        s.replace_range(3..4, "e");
        assert_eq!(decode_exact::<20>(&s).unwrap_err(), DecodeError::InvalidChar('e'));
        // 52 chars hold 260 bits for 256: the top digit may only use its lowest bit.
        let mut s = "0".repeat(52);
        s.replace_range(0..1, "z");
        assert_eq!(decode_exact::<32>(&s).unwrap_err(), DecodeError::NonZeroPadding);
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            prop_assert!(is_nix32(&s));
            prop_assert_eq!(decode(&s).unwrap(), bytes);
        }
    }
}
