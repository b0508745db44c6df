//! .npy input and output for the CLI: f32/f16 tensors, int lengths. Every failure is an
//! `AttnError::Io` or `Shape`/`DType` naming the file, never a panic.

use std::path::Path;

use npyz::WriterBuilder;
use wgpu_attention::{AttnError, DType, Result};

/// A loaded array: its shape, dtype, and the values widened to f32 (exact for f16).
pub struct Array {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub data: Vec<f32>,
}

fn io_err(path: &Path, reason: impl std::fmt::Display) -> AttnError {
    AttnError::Io {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn open(path: &Path) -> Result<npyz::NpyFile<std::io::BufReader<std::fs::File>>> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let npy = npyz::NpyFile::new(std::io::BufReader::new(f))
        .map_err(|e| io_err(path, format!("not a valid .npy file ({e})")))?;
    if npy.order() != npyz::Order::C {
        return Err(io_err(
            path,
            "Fortran-order arrays are not supported: save with C order",
        ));
    }
    Ok(npy)
}

fn type_str(npy: &npyz::NpyFile<impl std::io::Read>) -> String {
    match npy.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => format!("{:?}", other.descr()),
    }
}

/// Reads an f32 or f16 array.
pub fn read_float(path: &Path) -> Result<Array> {
    let npy = open(path)?;
    let shape = npy.shape().iter().map(|&x| x as usize).collect();
    let ts = type_str(&npy);
    let read_err = |e: std::io::Error| io_err(path, format!("reading data: {e}"));
    let (dtype, data) = match ts.as_str() {
        "<f4" | "=f4" => (DType::F32, npy.into_vec::<f32>().map_err(read_err)?),
        "<f2" | "=f2" => {
            let v: Vec<half::f16> = npy.into_vec().map_err(read_err)?;
            (DType::F16, v.into_iter().map(f32::from).collect())
        }
        _ => {
            return Err(AttnError::DType {
                what: path.display().to_string(),
                expected: "float32 (<f4) or float16 (<f2), little-endian".into(),
                actual: ts,
            })
        }
    };
    Ok(Array { shape, dtype, data })
}

/// Reads a 1-D array of non-negative integers (int32, int64, uint32) as u32.
pub fn read_lens(path: &Path, expected_len: usize) -> Result<Vec<u32>> {
    let npy = open(path)?;
    let shape: Vec<usize> = npy.shape().iter().map(|&x| x as usize).collect();
    if shape != [expected_len] {
        return Err(AttnError::Shape {
            what: path.display().to_string(),
            expected: format!("[{expected_len}] (one length per batch)"),
            actual: format!("{shape:?}"),
        });
    }
    let ts = type_str(&npy);
    let read_err = |e: std::io::Error| io_err(path, format!("reading data: {e}"));
    let wide: Vec<i64> = match ts.as_str() {
        "<i4" | "=i4" => widen::<i32>(npy).map_err(read_err)?,
        "<i8" | "=i8" => widen::<i64>(npy).map_err(read_err)?,
        "<u4" | "=u4" => widen::<u32>(npy).map_err(read_err)?,
        _ => {
            return Err(AttnError::DType {
                what: path.display().to_string(),
                expected: "int32, int64 or uint32".into(),
                actual: ts,
            })
        }
    };
    wide.into_iter()
        .map(|x| {
            u32::try_from(x).map_err(|_| AttnError::Invalid {
                what: path.display().to_string(),
                expected: "lengths in 0..=u32::MAX".into(),
                actual: x.to_string(),
            })
        })
        .collect()
}

fn widen<T: npyz::Deserialize + Into<i64>>(
    npy: npyz::NpyFile<impl std::io::Read>,
) -> std::io::Result<Vec<i64>> {
    Ok(npy.into_vec::<T>()?.into_iter().map(Into::into).collect())
}

/// Writes `data` with `shape` as f32 or (rounded) f16.
pub fn write(path: &Path, shape: &[usize], dtype: DType, data: &[f32]) -> Result<()> {
    let f = std::fs::File::create(path).map_err(|e| io_err(path, e))?;
    let mut w = std::io::BufWriter::new(f);
    let shape: Vec<u64> = shape.iter().map(|&x| x as u64).collect();
    match dtype {
        DType::F32 => write_as(&mut w, &shape, data.iter().copied()),
        DType::F16 => write_as(&mut w, &shape, data.iter().map(|&x| half::f16::from_f32(x))),
    }
    .map_err(|e| io_err(path, e))?;
    Ok(())
}

fn write_as<T: npyz::AutoSerialize>(
    w: &mut impl std::io::Write,
    shape: &[u64],
    data: impl Iterator<Item = T>,
) -> std::io::Result<()> {
    let mut out = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(w)
        .begin_nd()?;
    out.extend(data)?;
    out.finish()
}
