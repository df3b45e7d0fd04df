//! Lower-case hexadecimal text of bytes, and back: object names, digests and the
//! node API's proofs.

/// Lower-case hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The bytes `text` spells in hex digits (either case); `None` when it has an
/// odd length or anything but hex digits.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&text[at..at + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_only_hex_digits_decode() {
        assert_eq!(encode(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(decode("00ab7f"), Some(vec![0x00, 0xab, 0x7f]));
        assert_eq!(decode("00AB7F"), Some(vec![0x00, 0xab, 0x7f]));
        assert_eq!(decode(""), Some(Vec::new()));
        for bad in ["0", "+f", "-1", "zz", "0 "] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
