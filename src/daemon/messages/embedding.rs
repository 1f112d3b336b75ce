//! Embeddings as base64 of little-endian f32: the fast SIMD decoder, the reference decoder that
//! defines the accepted language and its errors, and the encoder.

use super::*;

/// Standard base64 alphabet; padding optional on input, always written on output.
pub(super) const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes base64 of little-endian f32.
///
/// The hot path of ingest: a SIMD decoder (`simdutf`, or `base64-simd` for unpadded input; both choose
/// AVX2/SSSE3/NEON at run time) writes straight into the `f32` buffer. Whatever it refuses goes through
/// the `base64` crate instead, which gives the precise error (symbol and offset) and defines the accepted
/// language: padding optional, no whitespace, non-zero trailing bits refused. A differential test checks
/// that the fast path accepts nothing the reference refuses and decodes identically.
pub fn decode_f32_b64(field: &str, s: &str) -> Result<Vec<f32>, Rejection> {
    decode_f32_b64_fast(s.as_bytes()).map_or_else(|| decode_f32_b64_reference(field, s), Ok)
}

/// The fast path of [`decode_f32_b64`]: `None` for anything that is not canonical base64 of a whole
/// number of f32 (the caller then asks the reference decoder for the error).
///
/// Padded input (what standard encoders such as Python's `base64.b64encode` send) goes through
/// `simdutf`, whose decoder is about twice as fast as `base64-simd`'s on this project's bench host
/// (docs/bench/history.md, "Daemon" §1, fourth round); unpadded input through `base64-simd`.
pub(super) fn decode_f32_b64_fast(src: &[u8]) -> Option<Vec<f32>> {
    if src.len() % 4 != 0 {
        return decode_unpadded(src);
    }
    // The exact length canonical input decodes to. `simdutf` follows WHATWG forgiving-base64 and
    // skips ASCII whitespace, which armd refuses: whitespace makes it decode fewer bytes than this.
    let padding = src.iter().rev().take(2).take_while(|&&c| c == b'=').count();
    let bytes = (src.len() / 4 * 3).checked_sub(padding)?;
    if bytes % 4 != 0 {
        return None;
    }
    let n = bytes / 4;
    let mut out: Vec<f32> = Vec::with_capacity(n + 1);
    // SAFETY: `simdutf` needs `maximal_binary_length_from_base64` writable bytes: for a length that is a
    // multiple of four that is `3 len / 4` minus the padding, i.e. `bytes`, and `out` has
    // `4 (n + 1) > bytes` bytes of capacity (the extra float covers any rounding in that bound, which
    // is checked against the capacity before the call anyway).
    let result = unsafe {
        let max = simdutf::maximal_binary_length_from_base64(src.as_ptr(), src.len());
        if max > 4 * out.capacity() {
            return None;
        }
        simdutf::base64_to_binary(
            src.as_ptr(),
            src.len(),
            out.as_mut_ptr().cast::<u8>(),
            simdutf::Base64Options::Default,
            simdutf::LastChunkHandlingOptions::Strict,
        )
    };
    if result.error != simdutf::ErrorCode::Success || result.count != bytes {
        return None;
    }
    // SAFETY: the decoder wrote exactly `bytes = 4 n` bytes (checked just above), so the first `n`
    // floats are initialised, and every bit pattern is a valid f32.
    unsafe { out.set_len(n) };
    Some(from_le(out))
}

/// Unpadded base64 (`len % 4` is 2 or 3), decoded by `base64-simd`.
pub(super) fn decode_unpadded(src: &[u8]) -> Option<Vec<f32>> {
    use base64_simd::AsOut as _;
    let engine = &base64_simd::STANDARD_NO_PAD;
    let bytes = engine.decoded_length(src).ok()?;
    if bytes % 4 != 0 {
        return None;
    }
    // Decoded straight into uninitialised capacity: zeroing the buffer first cost about a tenth of the
    // decode (a 3–8 kB memset per message).
    let n = bytes / 4;
    let mut out: Vec<f32> = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    // SAFETY: `MaybeUninit<f32>` has no validity requirement and the size and alignment of four
    // `MaybeUninit<u8>`, so the `n` reserved floats are exactly `4 n` writable bytes.
    let spare: &mut [std::mem::MaybeUninit<u8>] =
        unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast(), 4 * n) };
    if engine.decode(src, spare.as_out()).ok()?.len() != 4 * n {
        return None;
    }
    // SAFETY: the decoder wrote all `4 n` bytes (checked just above), so the first `n` floats are
    // initialised, and every bit pattern is a valid f32.
    unsafe { out.set_len(n) };
    Some(from_le(out))
}

/// The wire's little-endian floats in native order (a no-op on little-endian hosts).
pub(super) fn from_le(mut v: Vec<f32>) -> Vec<f32> {
    if cfg!(target_endian = "big") {
        for x in &mut v {
            *x = f32::from_bits(u32::from_le(x.to_bits()));
        }
    }
    v
}

/// The reference decoder (`base64` crate): the accepted language and the error messages.
pub(super) fn decode_f32_b64_reference(field: &str, s: &str) -> Result<Vec<f32>, Rejection> {
    let bytes = B64.decode(s.as_bytes()).map_err(|e| {
        Rejection::new(
            Reason::InvalidBase64,
            format!("`{field}` is not valid base64: {e}"),
        )
    })?;
    if bytes.len() % 4 != 0 {
        return Err(Rejection::new(
            Reason::InvalidBase64,
            format!(
                "`{field}` decodes to {} bytes, not a whole number of f32 (4 bytes each)",
                bytes.len()
            ),
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Encodes f32 values as base64 of their little-endian bytes.
pub fn encode_f32_b64(values: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    B64.encode(bytes)
}
