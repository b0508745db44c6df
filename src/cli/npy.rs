//! .npy input and output for the CLI: f32/f16 tensors, int lengths. Every failure is an
//! `Failure::Input` naming the file and what was expected, never a panic.

use std::path::Path;

use npyz::WriterBuilder;
use wgpu_attention::{AttnError, DType};

use super::Failure;

type Result<T> = std::result::Result<T, Failure>;

/// A loaded array: its shape, dtype, and the values widened to f32 (exact for f16).
pub struct Array {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub data: Vec<f32>,
}

fn io_err(path: &Path, reason: impl std::fmt::Display) -> Failure {
    Failure::Input(format!("{}: {reason}", path.display()))
}

/// The element count the header's `shape` claims, read before npyz sees the file: npyz
/// multiplies the axes unchecked (a panic in debug builds, a wrapped count in release).
/// `None` where the header has no readable shape (npyz then reports the file as invalid).
fn header_count(bytes: &[u8]) -> Option<std::result::Result<u64, String>> {
    let text = String::from_utf8_lossy(bytes.get(..bytes.len().min(65536 + 16))?);
    let at = text.find("'shape'")?;
    let rest = &text[at..];
    let open = rest.find('(')?;
    let close = open + rest[open..].find(')')?;
    let mut count = 1u64;
    for part in rest[open + 1..close]
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let Ok(n) = part.parse::<u64>() else {
            return Some(Err(format!("shape entry {part:?} is not a length")));
        };
        match count.checked_mul(n) {
            Some(c) => count = c,
            None => {
                return Some(Err(format!(
                    "shape {} overflows a 64-bit count",
                    &rest[open..=close]
                )))
            }
        }
    }
    Some(Ok(count))
}

fn open(path: &Path) -> Result<npyz::NpyFile<std::io::BufReader<std::fs::File>>> {
    let head = {
        use std::io::Read;
        let mut buf = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(65536 + 16).read_to_end(&mut buf))
            .map_err(|e| io_err(path, e))?;
        buf
    };
    if let Some(Err(why)) = header_count(&head) {
        return Err(io_err(path, format!("not a valid .npy file ({why})")));
    }
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let npy = npyz::NpyFile::new(std::io::BufReader::new(f))
        .map_err(|e| io_err(path, format!("not a valid .npy file ({e})")))?;
    if npy.order() != npyz::Order::C {
        return Err(io_err(
            path,
            "Fortran-order arrays are not supported: save with C order",
        ));
    }
    // A header may claim any shape: check it against the file before anything is allocated
    // for it (a lying shape must be an error, not an allocation of terabytes).
    let file_len = std::fs::metadata(path).map_err(|e| io_err(path, e))?.len();
    let item = match npy.dtype() {
        npyz::DType::Plain(t) => t.num_bytes().unwrap_or(0) as u64,
        _ => 0,
    };
    let count = npy.shape().iter().try_fold(1u64, |n, &x| n.checked_mul(x));
    match count.and_then(|n| n.checked_mul(item)) {
        Some(bytes) if bytes <= file_len => Ok(npy),
        _ => Err(io_err(
            path,
            format!(
                "the header's shape {:?} of {item}-byte elements needs more data than the file's {file_len} bytes",
                npy.shape()
            ),
        )),
    }
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
            return Err(Failure::from(AttnError::DType {
                what: path.display().to_string(),
                expected: "float32 (<f4) or float16 (<f2), little-endian".into(),
                actual: ts,
            }))
        }
    };
    Ok(Array { shape, dtype, data })
}

/// Reads a 1-D array of non-negative integers (int32, int64, uint32) as u32.
pub fn read_lens(path: &Path, expected_len: usize) -> Result<Vec<u32>> {
    let npy = open(path)?;
    let shape: Vec<usize> = npy.shape().iter().map(|&x| x as usize).collect();
    if shape != [expected_len] {
        return Err(Failure::from(AttnError::Shape {
            what: path.display().to_string(),
            expected: format!("[{expected_len}] (one length per batch)"),
            actual: format!("{shape:?}"),
        }));
    }
    let ts = type_str(&npy);
    let read_err = |e: std::io::Error| io_err(path, format!("reading data: {e}"));
    let wide: Vec<i64> = match ts.as_str() {
        "<i4" | "=i4" => widen::<i32>(npy).map_err(read_err)?,
        "<i8" | "=i8" => widen::<i64>(npy).map_err(read_err)?,
        "<u4" | "=u4" => widen::<u32>(npy).map_err(read_err)?,
        _ => {
            return Err(Failure::from(AttnError::DType {
                what: path.display().to_string(),
                expected: "int32, int64 or uint32".into(),
                actual: ts,
            }))
        }
    };
    wide.into_iter()
        .map(|x| {
            u32::try_from(x).map_err(|_| {
                Failure::from(AttnError::invalid(
                    path.display().to_string(),
                    "lengths in 0..=u32::MAX",
                    x,
                ))
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
    // outputs are f32 or f16 (the float data of an f32 or f16 tensor)
    match dtype {
        DType::F16 => write_as(&mut w, &shape, data.iter().map(|&x| half::f16::from_f32(x))),
        _ => write_as(&mut w, &shape, data.iter().copied()),
    }
    .map_err(|e| io_err(path, e))?;
    Ok(())
}

/// Writes int32 `data` with `shape` (the top-k routing's selected blocks).
pub fn write_i32(path: &Path, shape: &[usize], data: &[i32]) -> Result<()> {
    let f = std::fs::File::create(path).map_err(|e| io_err(path, e))?;
    let mut w = std::io::BufWriter::new(f);
    let shape: Vec<u64> = shape.iter().map(|&x| x as u64).collect();
    write_as(&mut w, &shape, data.iter().copied()).map_err(|e| io_err(path, e))?;
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

/// Reads a bool or uint8 array (a dense block mask) as booleans, with its shape.
pub fn read_bools(path: &Path) -> Result<(Vec<usize>, Vec<bool>)> {
    let npy = open(path)?;
    let shape = npy.shape().iter().map(|&x| x as usize).collect();
    let ts = type_str(&npy);
    let read_err = |e: std::io::Error| io_err(path, format!("reading data: {e}"));
    let data = match ts.as_str() {
        "|b1" => npy.into_vec::<bool>().map_err(read_err)?,
        "|u1" => npy
            .into_vec::<u8>()
            .map_err(read_err)?
            .into_iter()
            .map(|x| x != 0)
            .collect(),
        _ => {
            return Err(Failure::from(AttnError::DType {
                what: path.display().to_string(),
                expected: "bool (|b1) or uint8 (|u1)".into(),
                actual: ts,
            }))
        }
    };
    Ok((shape, data))
}

/// Reads an aux buffer for a WGSL snippet: float32, int32 or uint32 of any shape, flattened.
pub fn read_aux(path: &Path) -> Result<wgpu_attention::sparse::snippet::Aux> {
    use wgpu_attention::sparse::snippet::Aux;
    let npy = open(path)?;
    let ts = type_str(&npy);
    let read_err = |e: std::io::Error| io_err(path, format!("reading data: {e}"));
    Ok(match ts.as_str() {
        "<f4" | "=f4" => Aux::F32(npy.into_vec().map_err(read_err)?),
        "<i4" | "=i4" => Aux::I32(npy.into_vec().map_err(read_err)?),
        "<u4" | "=u4" => Aux::U32(npy.into_vec().map_err(read_err)?),
        _ => {
            return Err(Failure::from(AttnError::DType {
                what: path.display().to_string(),
                expected: "float32 (<f4), int32 (<i4) or uint32 (<u4)".into(),
                actual: ts,
            }))
        }
    })
}

#[cfg(test)]
mod tests {
    //! The reader against files that lie: every malformed input is an error naming the file,
    //! never a panic, a misread or a huge allocation.
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A version-1.0 .npy file: magic, header length, the header dict padded to 64 bytes.
    fn npy_bytes(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let dict = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        let mut header = dict.into_bytes();
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(b' ');
        }
        header.push(b'\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header);
        out.extend(data);
        out
    }

    fn f32_bytes(x: &[f32]) -> Vec<u8> {
        x.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    struct Tmp(std::path::PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tmp(tag: &str) -> Tmp {
        let dir = std::env::temp_dir().join(format!(
            "wgpu-attention-npy-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Tmp(dir)
    }

    fn read_bytes(dir: &Tmp, bytes: &[u8]) -> Result<Array> {
        let p = dir.0.join("x.npy");
        std::fs::write(&p, bytes).unwrap();
        read_float(&p)
    }

    fn input_err(r: Result<Array>, needle: &str) {
        match r {
            Err(Failure::Input(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
            Err(Failure::Run(m)) => panic!("a file error must be bad input (exit 2), got {m}"),
            Ok(a) => panic!("expected an error, read shape {:?}", a.shape),
        }
    }

    #[test]
    fn well_formed_files_read_exactly() {
        let d = tmp("ok");
        let x = [1.5f32, -2.0, 3.25, 0.0, 7.0, -0.5];
        let a = read_bytes(&d, &npy_bytes("<f4", false, "(2, 3)", &f32_bytes(&x))).unwrap();
        assert_eq!(
            (a.shape.as_slice(), a.dtype, a.data.as_slice()),
            (&[2, 3][..], DType::F32, &x[..])
        );
        let h: Vec<u8> = x
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let a = read_bytes(&d, &npy_bytes("<f2", false, "(6,)", &h)).unwrap();
        assert_eq!((a.dtype, a.data.as_slice()), (DType::F16, &x[..]));
        // a round trip through the writer
        let p = d.0.join("w.npy");
        write(&p, &[3, 2], DType::F32, &x).unwrap();
        assert_eq!(read_float(&p).unwrap().data, x);
    }

    #[test]
    fn malformed_files_are_input_errors() {
        let d = tmp("bad");
        let good = npy_bytes("<f4", false, "(2, 3)", &f32_bytes(&[1.0; 6]));
        input_err(read_bytes(&d, &good[..good.len() - 3]), "x.npy"); // truncated data
        input_err(read_bytes(&d, &good[..20]), "not a valid .npy"); // truncated header
        let mut magic = good.clone();
        magic[1] = b'X';
        input_err(read_bytes(&d, &magic), "not a valid .npy");
        let mut long = good.clone();
        long[8..10].copy_from_slice(&5000u16.to_le_bytes()); // header length past the file
        input_err(read_bytes(&d, &long), "x.npy");
        // shapes that lie: more data than the file holds, overflowing products
        let huge = npy_bytes("<f4", false, "(1000000000000,)", &f32_bytes(&[1.0; 6]));
        input_err(read_bytes(&d, &huge), "needs more data");
        let ovf = npy_bytes("<f4", false, "(4294967296, 4294967296, 16)", &[]);
        input_err(read_bytes(&d, &ovf), "overflows");
        let neg = npy_bytes("<f4", false, "(-3, 2)", &[]);
        input_err(read_bytes(&d, &neg), "not a length");
        input_err(
            read_bytes(&d, &npy_bytes("|O", false, "(2,)", &[0; 16])),
            "x.npy",
        );
        input_err(read_bytes(&d, &[]), "not a valid .npy");
        input_err(read_float(&d.0.join("missing.npy")), "missing.npy");
    }

    #[test]
    fn other_dtypes_and_orders_are_refused_not_misread() {
        let d = tmp("dtypes");
        let f64s: Vec<u8> = [1.0f64, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        input_err(
            read_bytes(&d, &npy_bytes("<f8", false, "(2,)", &f64s)),
            "float32",
        );
        let be: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_be_bytes()).collect();
        input_err(
            read_bytes(&d, &npy_bytes(">f4", false, "(2,)", &be)),
            "little-endian",
        );
        let ints: Vec<u8> = [1i32, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        input_err(
            read_bytes(&d, &npy_bytes("<i4", false, "(2,)", &ints)),
            "float32",
        );
        input_err(
            read_bytes(
                &d,
                &npy_bytes("<f4", true, "(2, 1)", &f32_bytes(&[1.0, 2.0])),
            ),
            "Fortran",
        );
        // lengths: integers widen exactly, floats and negatives are refused
        let p = d.0.join("lens.npy");
        let i64s: Vec<u8> = [3i64, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&p, npy_bytes("<i8", false, "(2,)", &i64s)).unwrap();
        assert_eq!(read_lens(&p, 2).ok(), Some(vec![3, 0]));
        assert!(matches!(read_lens(&p, 3), Err(Failure::Input(_))));
        let neg: Vec<u8> = [-1i32, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&p, npy_bytes("<i4", false, "(2,)", &neg)).unwrap();
        assert!(matches!(read_lens(&p, 2), Err(Failure::Input(_))));
        std::fs::write(&p, npy_bytes("<f4", false, "(2,)", &f32_bytes(&[1.0, 2.0]))).unwrap();
        assert!(matches!(read_lens(&p, 2), Err(Failure::Input(_))));
    }

    /// Mutation fuzzing in the default run: flipped, dropped and inserted bytes of valid files,
    /// each read must end in a value or a typed error. `WGPU_ATTENTION_NPY_FUZZ=N` sets the
    /// count, `WGPU_ATTENTION_SEED=S` replays one seed.
    #[test]
    fn mutated_files_never_panic() {
        let d = tmp("fuzz");
        let n: u64 = std::env::var("WGPU_ATTENTION_NPY_FUZZ")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let base_seed: u64 = std::env::var("WGPU_ATTENTION_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(rand::random);
        let seeds: Vec<u64> = if std::env::var("WGPU_ATTENTION_SEED").is_ok() {
            vec![base_seed]
        } else {
            (0..n).map(|i| base_seed.wrapping_add(i)).collect()
        };
        let originals = [
            npy_bytes("<f4", false, "(2, 3)", &f32_bytes(&[1.0; 6])),
            npy_bytes("<f2", false, "(4,)", &[0; 8]),
            npy_bytes("<i8", false, "(2,)", &[0; 16]),
        ];
        for seed in seeds {
            let mut r = rand::rngs::StdRng::seed_from_u64(seed);
            let mut b = originals[r.random_range(0..originals.len())].clone();
            for _ in 0..r.random_range(1..6) {
                let i = r.random_range(0..b.len().max(1));
                match r.random_range(0..4) {
                    0 if !b.is_empty() => {
                        let at = i.min(b.len() - 1);
                        b[at] ^= 1 << r.random_range(0..8)
                    }
                    1 if !b.is_empty() => b.truncate(i),
                    2 => b.insert(i.min(b.len()), r.random()),
                    _ if i < b.len() => b[i] = r.random(),
                    _ => {}
                }
            }
            let p = d.0.join("m.npy");
            std::fs::write(&p, &b).unwrap();
            let res = std::panic::catch_unwind(|| {
                let _ = read_float(&p);
                let _ = read_lens(&p, 2);
            });
            assert!(res.is_ok(), "the .npy reader panicked on mutation seed {seed} (replay: WGPU_ATTENTION_SEED={seed})");
        }
    }
}
