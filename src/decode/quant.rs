//! ggml's block formats for quantized KV caches, on the host: the quantizer an engine fills its
//! cache with, and the dequantizer the reference reads it back with (the kernels decode the same
//! bytes with the same formulas in registers, so the check stays tight).
//!
//! Both formats quantize blocks of 32 consecutive values along the head dimension:
//! - `q8_0` (34 bytes): an f16 scale `d = amax / 127`, then 32 `i8` values `round(x / d)`;
//!   dequantized `q * d`.
//! - `q4_0` (18 bytes): an f16 scale `d = max / -8` (`max` the value of largest magnitude, its
//!   sign kept), then 16 bytes whose low nibbles are values 0..16 and high nibbles values
//!   16..32, each `min(15, trunc(x / d + 8.5))`; dequantized `(q - 8) * d`.

use half::f16;

use crate::error::{AttnError, Result};

/// Values per quantization block (both formats).
pub const QK: usize = 32;

/// How a KV cache stores its values.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvFormat {
    F32,
    F16,
    /// ggml's `q8_0`: 34-byte blocks of 32 values.
    Q8_0,
    /// ggml's `q4_0`: 18-byte blocks of 32 values.
    Q4_0,
}

impl KvFormat {
    /// Bytes per block of [`QK`] values (floats: 32 values' worth).
    pub fn block_bytes(self) -> usize {
        match self {
            KvFormat::F32 => 4 * QK,
            KvFormat::F16 => 2 * QK,
            KvFormat::Q8_0 => 2 + QK,
            KvFormat::Q4_0 => 2 + QK / 2,
        }
    }
    pub fn is_quantized(self) -> bool {
        matches!(self, KvFormat::Q8_0 | KvFormat::Q4_0)
    }
    /// The name ggml and the CLI use: `f32`, `f16`, `q8_0`, `q4_0`.
    pub fn name(self) -> &'static str {
        match self {
            KvFormat::F32 => "f32",
            KvFormat::F16 => "f16",
            KvFormat::Q8_0 => "q8_0",
            KvFormat::Q4_0 => "q4_0",
        }
    }
    /// Reads a name as [`KvFormat::name`] writes it.
    pub fn parse(s: &str) -> Result<Self> {
        [KvFormat::F32, KvFormat::F16, KvFormat::Q8_0, KvFormat::Q4_0]
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| AttnError::invalid("kv format", "f32, f16, q8_0 or q4_0", s))
    }
    /// Bytes of `n` values (a multiple of [`QK`] for the quantized formats).
    pub fn bytes_for(self, n: usize) -> Result<usize> {
        let too_big = || AttnError::invalid("kv cache", "a size whose bytes fit usize", n);
        match self {
            KvFormat::F32 => n.checked_mul(4).ok_or_else(too_big),
            KvFormat::F16 => n.checked_mul(2).ok_or_else(too_big),
            _ => {
                if !n.is_multiple_of(QK) {
                    return Err(AttnError::shape(
                        "quantized values",
                        format!("a multiple of {QK}"),
                        n,
                    ));
                }
                (n / QK).checked_mul(self.block_bytes()).ok_or_else(too_big)
            }
        }
    }
}

impl std::fmt::Display for KvFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Quantizes `x` (a multiple of 32 values, blocks along the last axis) into ggml's bytes.
/// Floats are written little-endian (`f32`, `f16`), so every format goes through one path.
pub fn quantize(x: &[f32], format: KvFormat) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(format.bytes_for(x.len())?);
    match format {
        KvFormat::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        KvFormat::F16 => x
            .iter()
            .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        KvFormat::Q8_0 => x.chunks_exact(QK).for_each(|b| q8_0_block(b, &mut out)),
        KvFormat::Q4_0 => x.chunks_exact(QK).for_each(|b| q4_0_block(b, &mut out)),
    }
    Ok(out)
}

fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16::from_f32(d).to_le_bytes());
    // `f32::round` rounds half away from zero, as C's roundf
    out.extend(x.iter().map(|v| ((v * id).round() as i8) as u8));
}

fn q4_0_block(x: &[f32], out: &mut Vec<u8>) {
    let max = x
        .iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16::from_f32(d).to_le_bytes());
    // `as u8` truncates toward zero, as C's cast (the argument is at least 0.5)
    let q = |v: f32| ((v * id + 8.5) as u8).min(15);
    out.extend((0..QK / 2).map(|j| q(x[j]) | (q(x[j + QK / 2]) << 4)));
}

/// The values `bytes` hold: `n` of them, read back as the kernels read them.
pub fn dequantize(bytes: &[u8], format: KvFormat, n: usize) -> Result<Vec<f32>> {
    let need = format.bytes_for(n)?;
    if bytes.len() < need {
        return Err(AttnError::shape(
            "quantized bytes",
            format!("at least {need} bytes for {n} {format} values"),
            format!("{} bytes", bytes.len()),
        ));
    }
    let scale = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    let bytes = &bytes[..need];
    Ok(match format {
        KvFormat::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        KvFormat::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        KvFormat::Q8_0 => bytes
            .chunks_exact(format.block_bytes())
            .flat_map(|b| {
                let d = scale(b);
                b[2..].iter().map(move |&q| q as i8 as f32 * d)
            })
            .collect(),
        KvFormat::Q4_0 => bytes
            .chunks_exact(format.block_bytes())
            .flat_map(|b| {
                let d = scale(b);
                let lo = b[2..].iter().map(move |&q| ((q & 15) as f32 - 8.0) * d);
                let hi = b[2..].iter().map(move |&q| ((q >> 4) as f32 - 8.0) * d);
                lo.chain(hi)
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_round_trip_within_their_step() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for f in [KvFormat::F32, KvFormat::F16, KvFormat::Q8_0, KvFormat::Q4_0] {
            let bytes = quantize(&x, f).unwrap();
            assert_eq!(bytes.len(), f.bytes_for(x.len()).unwrap());
            let y = dequantize(&bytes, f, x.len()).unwrap();
            for (blk_x, blk_y) in x.chunks(QK).zip(y.chunks(QK)) {
                let amax = blk_x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let step = match f {
                    KvFormat::F32 => 0.0,
                    KvFormat::F16 => amax / 1024.0,
                    KvFormat::Q8_0 => amax / 127.0,
                    KvFormat::Q4_0 => amax / 8.0,
                };
                for (a, b) in blk_x.iter().zip(blk_y) {
                    // half a step, plus the f16 rounding of the scale; q4_0 is asymmetric
                    // (-8..7 steps): the side opposite its largest value clips by one step
                    let tol = if f == KvFormat::Q4_0 {
                        step
                    } else {
                        0.5 * step
                    };
                    assert!((a - b).abs() <= tol * 1.01 + 1e-6, "{f}: {a} -> {b}");
                }
            }
        }
    }

    #[test]
    fn q4_0_keeps_ggml_nibble_order_and_sign() {
        // the largest magnitude is negative: d > 0 and that value maps to nibble 0
        let mut x = [0.5f32; QK];
        x[3] = -4.0;
        x[20] = 2.0;
        let b = quantize(&x, KvFormat::Q4_0).unwrap();
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        assert_eq!(d, 0.5);
        assert_eq!(b[2 + 3] & 15, 0);
        // value 20 is the high nibble of byte 4: 2 / 0.5 + 8.5 = 12.5 -> 12
        assert_eq!(b[2 + 4] >> 4, 12);
        assert!(quantize(&x[..31], KvFormat::Q4_0).is_err());
        assert!(dequantize(&b[..17], KvFormat::Q4_0, 32).is_err());
    }
}
