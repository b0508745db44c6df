//! FlexAttention in WGSL, first step: a user's `mask_mod` / `score_mod` snippet, checked before
//! anything is built, and `create_block_mask` evaluating a `mask_mod` on the GPU.
//!
//! A snippet is plain WGSL defining
//! `fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool` or
//! `fn score_mod(score: f32, b: u32, h: u32, q_idx: u32, kv_idx: u32) -> f32` (`h` the query
//! head, `q_idx`/`kv_idx` positions in the sequence), with helper functions and constants of
//! its own. It may read up to four read-only buffers the library binds as `aux0`..`aux3`
//! (`array<f32>`, `array<i32>` or `array<u32>`, from the [`Aux`] values passed). It may not
//! declare bindings, entry points or directives (`enable`, `requires`, `diagnostic`): the
//! library owns those. naga validates it inside a small module that calls the function with
//! its signature, and an error quotes naga's message and the snippet's own line.
//!
//! [`eval_snippet`] is the reference's half of a snippet: it runs the snippet on the GPU at
//! every pair of a rectangle (a `score_mod` on scores the caller computed in f64 and rounded to
//! f32), so the f64 reference can do the softmax and products on the CPU around a function it
//! cannot run itself. Shipped examples: [`EXAMPLES`] (`mask_mod`) and [`SCORE_EXAMPLES`].
//!
//! The attention kernels splice the same snippets in (`sparse::shader`).

use crate::error::{AttnError, Result};
use crate::pipeline::{declare_bindings, BindingDecl, Kernel};
use crate::resources::StorageData;
use crate::tensor::{DType, Tensor};

pub use super::snippet_eval::{eval_snippet, EvalParams, SnippetEvalKey};
pub use super::snippet_mask::{
    create_block_mask, create_block_mask_async, BlockCountKey, CountParams,
};

/// Which function a snippet defines.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SnippetKind {
    MaskMod,
    ScoreMod,
}

impl SnippetKind {
    pub fn name(self) -> &'static str {
        match self {
            SnippetKind::MaskMod => "mask_mod",
            SnippetKind::ScoreMod => "score_mod",
        }
    }
    /// The signature the snippet must define.
    pub fn signature(self) -> &'static str {
        match self {
            SnippetKind::MaskMod => "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool",
            SnippetKind::ScoreMod => {
                "fn score_mod(score: f32, b: u32, h: u32, q_idx: u32, kv_idx: u32) -> f32"
            }
        }
    }
    /// A call with that signature, typed so that naga refuses any other.
    fn check_call(self) -> &'static str {
        match self {
            SnippetKind::MaskMod => "let m: bool = mask_mod(0u, 0u, 0u, 0u);",
            SnippetKind::ScoreMod => "let s: f32 = score_mod(0.0, 0u, 0u, 0u, 0u);",
        }
    }
}

/// A read-only buffer a snippet reads as `aux0`..`aux3`, flattened: host data (uploaded per
/// call), or a tensor already on the device (bound as it is, no copy: an embedder's own
/// buffer) of dtype f32, i32 or u32, contiguous, starting at a storage-aligned offset.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub enum Aux {
    F32(Vec<f32>),
    I32(Vec<i32>),
    U32(Vec<u32>),
    Tensor(Tensor),
}

impl PartialEq for Aux {
    fn eq(&self, other: &Aux) -> bool {
        match (self, other) {
            (Aux::F32(a), Aux::F32(b)) => a == b,
            (Aux::I32(a), Aux::I32(b)) => a == b,
            (Aux::U32(a), Aux::U32(b)) => a == b,
            (Aux::Tensor(a), Aux::Tensor(b)) => a.same_view(b),
            _ => false,
        }
    }
}

impl Aux {
    /// The WGSL element type (a tensor's dtype; `f16` is refused by the checks).
    pub fn wgsl(&self) -> &'static str {
        match self {
            Aux::F32(_) => "f32",
            Aux::I32(_) => "i32",
            Aux::U32(_) => "u32",
            Aux::Tensor(t) => t.dtype().wgsl(),
        }
    }
    /// What a kernel binds: the host data's bytes, or the tensor.
    pub(crate) fn storage(&self) -> StorageData {
        match self {
            Aux::F32(x) => StorageData::Bytes(bytemuck::cast_slice(x).to_vec()),
            Aux::I32(x) => StorageData::Bytes(bytemuck::cast_slice(x).to_vec()),
            Aux::U32(x) => StorageData::Bytes(bytemuck::cast_slice(x).to_vec()),
            Aux::Tensor(t) => StorageData::View(t.clone()),
        }
    }
    /// A one-element stand-in of WGSL element type `ty` (`f32`, `i32`, else `u32`): what
    /// the naga enumeration checks an example snippet with.
    pub fn placeholder(ty: &str) -> Aux {
        match ty {
            "f32" => Aux::F32(vec![0.0]),
            "i32" => Aux::I32(vec![0]),
            _ => Aux::U32(vec![0]),
        }
    }
    fn len(&self) -> usize {
        match self {
            Aux::F32(x) => x.len(),
            Aux::I32(x) => x.len(),
            Aux::U32(x) => x.len(),
            Aux::Tensor(t) => t.numel(),
        }
    }
}

/// At most this many aux buffers.
pub const MAX_AUX: usize = 4;
pub(crate) const AUX_NAMES: [&str; MAX_AUX] = ["aux0", "aux1", "aux2", "aux3"];

/// A validated snippet, with the element types of its aux buffers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Snippet {
    pub kind: SnippetKind,
    pub source: String,
    /// `f32`, `i32` or `u32` per aux buffer.
    pub aux: Vec<&'static str>,
}

/// FNV-1a, 64 bits: a content hash that is the same in every build (pipeline labels and the
/// disk cache key on it).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The snippet without its comments (kept line for line), for the declaration checks.
fn strip_comments(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = 0usize;
    for line in src.lines() {
        let mut kept = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, chars.peek()) {
                ('/', Some('*')) => {
                    chars.next();
                    in_block += 1;
                }
                ('*', Some('/')) if in_block > 0 => {
                    chars.next();
                    in_block -= 1;
                }
                ('/', Some('/')) if in_block == 0 => break,
                _ if in_block == 0 => kept.push(c),
                _ => {}
            }
        }
        out.push(kept);
    }
    out
}

impl Snippet {
    /// Checks `source` as a snippet of `kind` reading `aux` (element types from the values).
    pub fn new(kind: SnippetKind, source: &str, aux: &[Aux]) -> Result<Snippet> {
        let what = kind.name();
        if aux.len() > MAX_AUX {
            return Err(AttnError::invalid(
                format!("{what} aux buffers"),
                format!("at most {MAX_AUX}"),
                aux.len(),
            ));
        }
        for (i, line) in strip_comments(source).iter().enumerate() {
            let t = line.trim_start();
            let refused = ["@group", "@binding", "@compute", "@vertex", "@fragment"]
                .into_iter()
                .find(|a| line.contains(a))
                .or_else(|| {
                    ["enable ", "requires ", "diagnostic"]
                        .into_iter()
                        .find(|d| t.starts_with(d))
                });
            if let Some(r) = refused {
                return Err(AttnError::invalid(
                    what,
                    "WGSL functions and constants only: the library declares the bindings (aux0..aux3), the entry point and the directives",
                    format!("`{}` at line {} of the snippet: `{}`", r.trim(), i + 1, line.trim()),
                ));
            }
        }
        let snippet = Snippet {
            kind,
            source: source.to_string(),
            aux: aux.iter().map(Aux::wgsl).collect(),
        };
        snippet.validate()?;
        Ok(snippet)
    }

    /// The snippet's content hash (with its aux types), as it appears in pipeline labels.
    pub fn hash(&self) -> String {
        let mut bytes = self.source.as_bytes().to_vec();
        for a in &self.aux {
            bytes.extend_from_slice(a.as_bytes());
        }
        format!("{:016x}", fnv1a(&bytes))
    }

    /// The aux declarations, bound after a kernel's own bindings.
    pub(super) fn aux_bindings(&self) -> Vec<BindingDecl> {
        self.aux
            .iter()
            .zip(AUX_NAMES)
            .map(|(ty, name)| BindingDecl::read(name, *ty, "the snippet's aux buffer"))
            .collect()
    }

    /// naga on the snippet inside a module that declares its aux buffers and calls it with its
    /// signature; errors point at the snippet's own lines.
    fn validate(&self) -> Result<()> {
        let prelude = declare_bindings(&self.aux_bindings());
        let offset = prelude.lines().count();
        let check = format!(
            "{prelude}{}\n@compute @workgroup_size(1)\nfn wgpu_attention_check() {{\n    {}\n}}\n",
            self.source,
            self.kind.check_call()
        );
        let what = self.kind.name();
        let lines: Vec<&str> = self.source.lines().collect();
        let at = |line: Option<u32>| match line {
            Some(l) if (l as usize) > offset && (l as usize) <= offset + lines.len() => {
                let n = l as usize - offset;
                format!(" at line {n} of the snippet: `{}`", lines[n - 1].trim())
            }
            _ => format!(" (the snippet must define `{}`)", self.kind.signature()),
        };
        let fail = |msg: String, line: Option<u32>| {
            AttnError::invalid(
                what,
                format!("valid WGSL defining `{}`", self.kind.signature()),
                format!("naga: {}{}", msg.trim(), at(line)),
            )
        };
        let module = naga::front::wgsl::parse_str(&check).map_err(|e| {
            let line = e.location(&check).map(|l| l.line_number);
            fail(e.message().to_string(), line)
        })?;
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .map_err(|e| {
            // the innermost span is the most precise place
            let line = e
                .spans()
                .last()
                .map(|(span, _)| span.location(&check).line_number);
            // the error and its causes, outermost first
            let mut msg = e.as_inner().to_string();
            let mut cause = std::error::Error::source(e.as_inner());
            while let Some(c) = cause {
                msg.push_str(": ");
                msg.push_str(&c.to_string());
                cause = c.source();
            }
            fail(msg, line)
        })?;
        Ok(())
    }
}

/// A size as a uniform's u32, or a typed error.
pub(crate) fn u(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| AttnError::invalid(what, "at most u32::MAX", x))
}

/// Checks that `aux` are the buffers `snippet` was checked with and not empty.
pub(crate) fn check_aux(snippet: &Snippet, aux: &[Aux]) -> Result<()> {
    for (a, name) in aux.iter().zip(AUX_NAMES) {
        if let Aux::Tensor(t) = a {
            if t.dtype() == DType::F16 {
                return Err(AttnError::DType {
                    what: format!("{name} tensor"),
                    expected: "f32, i32 or u32".into(),
                    actual: t.dtype().to_string(),
                });
            }
            if t.strides() != Tensor::contiguous_strides_of(t.shape()) {
                return Err(AttnError::invalid(
                    format!("{name} tensor"),
                    "a contiguous tensor (read flattened, row-major)",
                    format!("shape {:?} strides {:?}", t.shape(), t.strides()),
                ));
            }
        }
    }
    let types: Vec<&str> = aux.iter().map(Aux::wgsl).collect();
    if types != snippet.aux {
        return Err(AttnError::invalid(
            "aux buffers",
            format!("{:?}, as the snippet was checked with", snippet.aux),
            format!("{types:?}"),
        ));
    }
    if let Some(i) = aux.iter().position(|a| a.len() == 0) {
        return Err(AttnError::invalid(
            AUX_NAMES[i],
            "at least one element",
            "an empty buffer",
        ));
    }
    Ok(())
}

/// Every pipeline key the sparse family can build, for naga in `cargo test`: the block
/// counter and the evaluator of the shipped example snippets.
pub fn example_kernels() -> Vec<Box<dyn Kernel>> {
    let aux = |types: &[&str]| -> Vec<Aux> { types.iter().map(|t| Aux::placeholder(t)).collect() };
    let mut out: Vec<Box<dyn Kernel>> = Vec::new();
    for (_, src, types) in EXAMPLES {
        if let Ok(snippet) = Snippet::new(SnippetKind::MaskMod, src, &aux(types)) {
            out.push(Box::new(BlockCountKey {
                snippet: snippet.clone(),
            }));
            out.push(Box::new(SnippetEvalKey { snippet }));
        }
    }
    for (_, src, types) in SCORE_EXAMPLES {
        if let Ok(snippet) = Snippet::new(SnippetKind::ScoreMod, src, &aux(types)) {
            out.push(Box::new(SnippetEvalKey { snippet }));
        }
    }
    // the builders' WGSL twins (a broken one is reported by tests/sparse.rs)
    for (snippet, _) in crate::sparse::masks::samples()
        .iter()
        .filter_map(|(m, ..)| m.snippet().ok())
    {
        out.push(Box::new(BlockCountKey {
            snippet: snippet.clone(),
        }));
        out.push(Box::new(SnippetEvalKey { snippet }));
    }
    out
}

/// Shipped `score_mod` examples (name, source, aux element types), tested against the same
/// maths in Rust in `tests/sparse.rs`.
pub const SCORE_EXAMPLES: [(&str, &str, &[&str]); 5] = [
    (
        "softcap 30 (Gemma 2; equal to the built-in softcap)",
        "fn score_mod(score: f32, b: u32, h: u32, q_idx: u32, kv_idx: u32) -> f32 {
    return 30.0 * tanh(score / 30.0);
}",
        &[],
    ),
    (
        "ALiBi (aux0: a slope per head; equal to the built-in ALiBi for Lq = Lk)",
        "fn score_mod(score: f32, b: u32, h: u32, q_idx: u32, kv_idx: u32) -> f32 {
    return score - aux0[h] * abs(f32(i32(q_idx) - i32(kv_idx)));
}",
        &["f32"],
    ),
    (
        "relative position bias from a table (aux0: 2 R + 1 biases, distance clamped to R = 64)",
        "const R: i32 = 64;
fn score_mod(score: f32, b: u32, h: u32, q_idx: u32, kv_idx: u32) -> f32 {
    let d = clamp(i32(kv_idx) - i32(q_idx), -R, R);
    return score + aux0[u32(d + R)];
}",
        &["f32"],
    ),
    (
        "per-query temperature (selective attention; aux0: a factor per query)",
        "fn score_mod(score: f32, b: u32, h: u32, q_idx: u32, kv_idx: u32) -> f32 {
    return score * aux0[q_idx];
}",
        &["f32"],
    ),
    (
        "FlashBias low-rank bias s + qe[q] . ke[k] (aux0: qe [Lq, 4], aux1: ke [Lk, 4])",
        "fn score_mod(score: f32, b: u32, h: u32, q_idx: u32, kv_idx: u32) -> f32 {
    var s = score;
    for (var i = 0u; i < 4u; i++) {
        s += aux0[q_idx * 4u + i] * aux1[kv_idx * 4u + i];
    }
    return s;
}",
        &["f32", "f32"],
    ),
];

/// Shipped `mask_mod` examples (name, source, aux element types), tested against their Rust
/// twins in `tests/sparse.rs`.
pub const EXAMPLES: [(&str, &str, &[&str]); 3] = [
    (
        "causal (bottom-right aligned, aux0[0] = Lk - Lq as i32)",
        "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool {
    return i32(kv_idx) <= i32(q_idx) + aux0[0];
}",
        &["i32"],
    ),
    (
        "document masking (aux0: a document id per token)",
        "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool {
    return aux0[q_idx] == aux0[kv_idx];
}",
        &["u32"],
    ),
    (
        "prefix-LM (aux0[0]: the prefix length; causal after it)",
        "fn mask_mod(b: u32, h: u32, q_idx: u32, kv_idx: u32) -> bool {
    return kv_idx < aux0[0] || kv_idx <= q_idx;
}",
        &["u32"],
    ),
];
