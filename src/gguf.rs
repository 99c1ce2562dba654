//! GGUF container parsing: header, metadata and tensor directory.
//!
//! The parser works on a byte slice (normally a memory mapping of the whole
//! file) and never trusts a length it reads: every string, array and tensor
//! range is checked against the bytes that are really there before anything
//! is allocated, so a truncated or hostile file yields a [`GgufError`], never
//! a panic or a huge allocation. It is shared by the content store (which
//! cuts GGUF files into tensor-aligned chunks) and by inference (which reads
//! tensors straight out of the mapping).

use std::collections::BTreeMap;

/// The four magic bytes at the start of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Default tensor-data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest number of dimensions a tensor may have (as in ggml).
pub const MAX_DIMS: u32 = 4;
/// Nesting limit for metadata arrays (GGUF allows arrays of arrays).
const MAX_ARRAY_DEPTH: u32 = 4;

/// Errors from parsing a GGUF file.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GgufError {
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file (bad magic)")]
    BadMagic,
    /// The GGUF version is not one we read (2 and 3 are supported).
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    /// The file ends before the structure it announces.
    #[error("truncated GGUF: {what} needs bytes up to offset {need}, file has {have}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Offset that would be needed.
        need: u64,
        /// Length of the file.
        have: u64,
    },
    /// A metadata value type that GGUF does not define.
    #[error("unknown metadata value type {0}")]
    BadValueType(u32),
    /// A string that is not UTF-8.
    #[error("metadata string is not UTF-8 at offset {0}")]
    BadUtf8(u64),
    /// A structural value is out of range (dims, alignment, counts, offsets).
    #[error("malformed GGUF: {0}")]
    Malformed(String),
}

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `uint8`
    U8(u8),
    /// `int8`
    I8(i8),
    /// `uint16`
    U16(u16),
    /// `int16`
    I16(i16),
    /// `uint32`
    U32(u32),
    /// `int32`
    I32(i32),
    /// `float32`
    F32(f32),
    /// `bool`
    Bool(bool),
    /// `string`
    String(String),
    /// `array` of values of one type
    Array(Vec<Value>),
    /// `uint64`
    U64(u64),
    /// `int64`
    I64(i64),
    /// `float64`
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is any integer type that fits.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a signed integer, if it is any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// ggml tensor element types, with their block layout: every type id that
/// llama.cpp's `ggml.h` defines (ids 4, 5 and 31 to 33, 36 to 38 were
/// removed there and are [`GgmlType::Unknown`] here), plus
/// [`GgmlType::Unknown`] for an id this build does not know. A tensor of an
/// unknown type is an opaque byte span (see [`Gguf::parse_header`]): it
/// can be stored and distributed, not computed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs, non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    Q2_0,
    /// A type id this build has no layout for (a newer ggml's, or a removed
    /// one): its bytes are an opaque span.
    Unknown(u32),
}

/// Every known type: (type, id, elements per block, bytes per block, name as
/// llama.cpp prints it). From `ggml.h` and `type_traits` in `ggml.c`
/// (llama.cpp as vendored by llama-cpp-python 0.3.36).
const TYPES: &[(GgmlType, u32, u64, u64, &str)] = {
    use GgmlType::*;
    &[
        (F32, 0, 1, 4, "f32"),
        (F16, 1, 1, 2, "f16"),
        (Q4_0, 2, 32, 18, "q4_0"),
        (Q4_1, 3, 32, 20, "q4_1"),
        (Q5_0, 6, 32, 22, "q5_0"),
        (Q5_1, 7, 32, 24, "q5_1"),
        (Q8_0, 8, 32, 34, "q8_0"),
        (Q8_1, 9, 32, 36, "q8_1"),
        (Q2_K, 10, 256, 84, "q2_K"),
        (Q3_K, 11, 256, 110, "q3_K"),
        (Q4_K, 12, 256, 144, "q4_K"),
        (Q5_K, 13, 256, 176, "q5_K"),
        (Q6_K, 14, 256, 210, "q6_K"),
        (Q8_K, 15, 256, 292, "q8_K"),
        (IQ2_XXS, 16, 256, 66, "iq2_xxs"),
        (IQ2_XS, 17, 256, 74, "iq2_xs"),
        (IQ3_XXS, 18, 256, 98, "iq3_xxs"),
        (IQ1_S, 19, 256, 50, "iq1_s"),
        (IQ4_NL, 20, 32, 18, "iq4_nl"),
        (IQ3_S, 21, 256, 110, "iq3_s"),
        (IQ2_S, 22, 256, 82, "iq2_s"),
        (IQ4_XS, 23, 256, 136, "iq4_xs"),
        (I8, 24, 1, 1, "i8"),
        (I16, 25, 1, 2, "i16"),
        (I32, 26, 1, 4, "i32"),
        (I64, 27, 1, 8, "i64"),
        (F64, 28, 1, 8, "f64"),
        (IQ1_M, 29, 256, 56, "iq1_m"),
        (BF16, 30, 1, 2, "bf16"),
        (TQ1_0, 34, 256, 54, "tq1_0"),
        (TQ2_0, 35, 256, 66, "tq2_0"),
        (MXFP4, 39, 32, 17, "mxfp4"),
        (NVFP4, 40, 64, 36, "nvfp4"),
        (Q1_0, 41, 128, 18, "q1_0"),
        (Q2_0, 42, 64, 18, "q2_0"),
    ]
};

impl GgmlType {
    /// Every type with a known layout, in id order.
    pub fn known() -> impl Iterator<Item = GgmlType> {
        TYPES.iter().map(|t| t.0)
    }
    fn entry(self) -> Option<&'static (GgmlType, u32, u64, u64, &'static str)> {
        match self {
            GgmlType::Unknown(_) => None,
            _ => TYPES.iter().find(|t| t.0 == self),
        }
    }
    /// Maps a raw ggml type id to a type with a known layout, if it has one.
    pub fn from_id(id: u32) -> Option<Self> {
        TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }
    /// Maps a raw ggml type id to a type, [`GgmlType::Unknown`] if it has no
    /// known layout.
    pub fn from_id_or_unknown(id: u32) -> Self {
        Self::from_id(id).unwrap_or(GgmlType::Unknown(id))
    }
    /// The raw ggml type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Unknown(id) => id,
            _ => self.entry().map_or(u32::MAX, |t| t.1),
        }
    }
    /// Whether the layout of this type is known (not [`GgmlType::Unknown`]).
    pub fn is_known(self) -> bool {
        self.entry().is_some()
    }
    /// (elements per block, bytes per block), `None` for an unknown type.
    pub fn layout(self) -> Option<(u64, u64)> {
        self.entry().map(|t| (t.2, t.3))
    }
    /// (elements per block, bytes per block). An unknown type has no layout:
    /// it answers `(1, 0)`, so code that may meet one must use
    /// [`GgmlType::layout`] (inference never does: it refuses unknown types
    /// before it looks at a layout).
    pub fn block_layout(self) -> (u64, u64) {
        self.layout().unwrap_or((1, 0))
    }
    /// Canonical lower-case name, as llama.cpp prints it (`"unknown"` for an
    /// unknown type; its id is in [`GgmlType::id`] and in `Display`).
    pub fn name(self) -> &'static str {
        self.entry().map_or("unknown", |t| t.4)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgmlType::Unknown(id) => write!(f, "unknown type {id}"),
            _ => f.write_str(self.name()),
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as stored in GGUF.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the tensor's bytes from the start of the tensor-data region.
    pub offset: u64,
    /// Size of the tensor's bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header: metadata, tensor directory and data layout.
#[derive(Debug, Clone)]
pub struct Gguf {
    /// GGUF container version.
    pub version: u32,
    /// Metadata key/value pairs.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor directory, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of tensor data.
    pub alignment: u64,
    /// Absolute offset of the tensor-data region in the file.
    pub data_offset: u64,
    /// Length of the file the header was parsed from (the whole file, even
    /// when only a prefix was parsed: see [`Gguf::parse_header`]).
    pub file_len: u64,
}

impl Gguf {
    /// Parses a whole GGUF file held in memory (usually a memory mapping).
    ///
    /// Checks that every tensor lies inside the file, so a truncated file is
    /// an error here rather than a fault later.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        Self::parse_header(bytes, bytes.len() as u64).map(|(g, _)| g)
    }

    /// Parses the header (metadata and tensor directory) from `prefix`, the
    /// first bytes of a file of `file_len` bytes (the whole file, or only its
    /// first chunks: no tensor data is read). Returns the header and the
    /// number of bytes it used.
    ///
    /// A prefix too short for the header is [`GgufError::Truncated`] (fetch
    /// more and try again). Tensor ranges are checked against `file_len`: a
    /// tensor past the end, or two overlapping tensors, are errors here.
    ///
    /// A tensor of a type id with no known layout ([`GgmlType::Unknown`]) is
    /// an opaque span: it runs from its offset to the next larger tensor
    /// offset, or to the end of the file for the last one, and must not be
    /// empty.
    // long: (~130 lines), kept whole: one pass over the header in file
    // order whose reader position and alignment every step shares.
    pub fn parse_header(prefix: &[u8], file_len: u64) -> Result<(Self, u64), GgufError> {
        let mut r = Reader { b: prefix, pos: 0 };
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic);
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each KV needs at least 8 (key len) + 4 (type) + 1 bytes; each tensor at least 8+4+8+4+8.
        r.check_count(n_kv, 13, "metadata")?;
        r.check_count(n_tensors, 32, "tensor directory")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata type")?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => {
                let a = v.as_u64().ok_or_else(|| {
                    GgufError::Malformed("general.alignment is not an integer".into())
                })?;
                if a == 0 || !a.is_power_of_two() || a > 1 << 20 {
                    return Err(GgufError::Malformed(format!("bad alignment {a}")));
                }
                a
            }
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dims")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Malformed(format!(
                    "tensor {name}: {n_dims} dimensions"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dim")?);
            }
            let ty = GgmlType::from_id_or_unknown(r.u32("tensor type")?);
            let offset = r.u64("tensor offset")?;
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    GgufError::Malformed(format!("tensor {name}: element count overflows"))
                })?;
            // Unknown types get their size below, from the offsets.
            let size = match ty.layout() {
                None => 0,
                Some((blk, bytes_per)) => {
                    if dims[0] % blk != 0 {
                        return Err(GgufError::Malformed(format!(
                            "tensor {name}: row of {} elements is not a multiple of the {} block of {blk}",
                            dims[0],
                            ty.name()
                        )));
                    }
                    (elements / blk).checked_mul(bytes_per).ok_or_else(|| {
                        GgufError::Malformed(format!("tensor {name}: size overflows"))
                    })?
                }
            };
            if offset % alignment != 0 {
                return Err(GgufError::Malformed(format!(
                    "tensor {name}: offset {offset} is not aligned to {alignment}"
                )));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                size,
            });
        }
        let header_end = r.pos as u64;
        let data_offset = header_end.div_ceil(alignment) * alignment;
        let mut g = Gguf {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            file_len,
        };
        g.size_opaque_tensors()?;
        g.check_tensor_bounds()?;
        Ok((g, header_end))
    }

    /// Gives each tensor of an unknown type the span up to the next larger
    /// tensor offset, or to the end of the data for the last one.
    fn size_opaque_tensors(&mut self) -> Result<(), GgufError> {
        if self.tensors.iter().all(|t| t.ty.is_known()) {
            return Ok(());
        }
        let data_len = self.file_len.saturating_sub(self.data_offset);
        let mut offsets: Vec<u64> = self.tensors.iter().map(|t| t.offset).collect();
        offsets.sort_unstable();
        offsets.dedup();
        for t in self.tensors.iter_mut().filter(|t| !t.ty.is_known()) {
            let next = match offsets.binary_search(&t.offset) {
                Ok(i) => offsets.get(i + 1).copied(),
                Err(_) => None,
            };
            let end = next.unwrap_or(data_len);
            if end <= t.offset {
                return Err(GgufError::Malformed(format!(
                    "tensor {} of {}: no bytes between its offset {} and the next tensor or the end of the data",
                    t.name, t.ty, t.offset
                )));
            }
            t.size = end - t.offset;
        }
        Ok(())
    }

    fn check_tensor_bounds(&self) -> Result<(), GgufError> {
        let data_len = self.file_len.saturating_sub(self.data_offset);
        if self.file_len < self.data_offset && !self.tensors.is_empty() {
            return Err(GgufError::Truncated {
                what: "tensor data",
                need: self.data_offset,
                have: self.file_len,
            });
        }
        for t in &self.tensors {
            let end = t.offset.checked_add(t.size).ok_or_else(|| {
                GgufError::Malformed(format!("tensor {}: range overflows", t.name))
            })?;
            if end > data_len {
                return Err(GgufError::Truncated {
                    what: "tensor data",
                    need: self.data_offset.saturating_add(end),
                    have: self.file_len,
                });
            }
        }
        // Tensors must not overlap: sort by offset and check neighbours.
        let mut spans: Vec<(u64, u64, &str)> = self
            .tensors
            .iter()
            .map(|t| (t.offset, t.offset + t.size, t.name.as_str()))
            .collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(GgufError::Malformed(format!(
                    "tensors {} and {} overlap",
                    w[0].2, w[1].2
                )));
            }
        }
        Ok(())
    }

    /// Looks up a metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The `general.architecture` string, if present.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// Finds a tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Absolute byte range of a tensor in the file.
    pub fn tensor_range(&self, t: &TensorInfo) -> std::ops::Range<u64> {
        let start = self.data_offset + t.offset;
        start..start + t.size
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let rem = (self.b.len() - self.pos) as u64;
        if n > rem {
            return Err(GgufError::Truncated {
                what,
                need: (self.pos as u64).saturating_add(n),
                have: self.b.len() as u64,
            });
        }
        let n = n as usize;
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    /// Refuses a count whose minimal encoding could not fit in the rest of the input.
    fn check_count(&self, n: u64, min_each: u64, what: &'static str) -> Result<(), GgufError> {
        let rem = (self.b.len() - self.pos) as u64;
        match n.checked_mul(min_each) {
            Some(need) if need <= rem => Ok(()),
            _ => Err(GgufError::Truncated {
                what,
                need: (self.pos as u64).saturating_add(n.saturating_mul(min_each)),
                have: self.b.len() as u64,
            }),
        }
    }
    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let at = self.pos as u64;
        let s = self.take(len, what)?;
        std::str::from_utf8(s)
            .map(str::to_owned)
            .map_err(|_| GgufError::BadUtf8(at))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>("u8")?[0]),
            1 => Value::I8(self.arr::<1>("i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr("u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.arr("i16")?)),
            4 => Value::U32(self.u32("u32")?),
            5 => Value::I32(i32::from_le_bytes(self.arr("i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.arr("f32")?)),
            7 => match self.arr::<1>("bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(GgufError::Malformed(format!("bool byte {b}"))),
            },
            8 => Value::String(self.string("string")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Malformed(
                        "metadata arrays nested too deep".into(),
                    ));
                }
                let ety = self.u32("array type")?;
                let n = self.u64("array length")?;
                let min = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 => 8,
                    9 => 12,
                    10..=12 => 8,
                    other => return Err(GgufError::BadValueType(other)),
                };
                self.check_count(n, min, "array")?;
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(i64::from_le_bytes(self.arr("i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.arr("f64")?)),
            other => return Err(GgufError::BadValueType(other)),
        })
    }
}

/// Builds GGUF files: used by tests, fuzz seeds and benchmarks to make
/// small or synthetic models without shipping binaries.
pub mod writer {
    use super::{GgmlType, Value};

    /// A tensor to be written: name, dims (innermost first), type and raw bytes.
    pub struct TensorSpec {
        /// Tensor name.
        pub name: String,
        /// Dimensions, innermost first.
        pub dims: Vec<u64>,
        /// Element type.
        pub ty: GgmlType,
        /// Raw bytes; must match the size implied by dims and type.
        pub data: Vec<u8>,
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(u8::from(*x)),
            Value::String(s) => put_str(out, s),
            Value::Array(a) => {
                let ety = a.first().map(type_id).unwrap_or(0);
                out.extend_from_slice(&ety.to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    put_value(out, x);
                }
            }
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// A copy of the GGUF file `bytes` with the metadata `key` set to
    /// `value` (replaced or added) and the same tensors: how tests make
    /// variants of a real model (another chat template, another id).
    pub fn with_metadata(
        bytes: &[u8],
        key: &str,
        value: Value,
    ) -> Result<Vec<u8>, super::GgufError> {
        let g = super::Gguf::parse(bytes)?;
        // `write` lays the tensors out at its own alignment.
        let mut meta: Vec<(&str, Value)> = g
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != "general.alignment" && k.as_str() != key)
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        meta.push((key, value));
        let mut tensors = Vec::with_capacity(g.tensors.len());
        for t in &g.tensors {
            let r = g.tensor_range(t);
            let data = usize::try_from(r.start)
                .ok()
                .zip(usize::try_from(r.end).ok())
                .and_then(|(a, b)| bytes.get(a..b))
                .ok_or(super::GgufError::Truncated {
                    what: "tensor data",
                    need: r.end,
                    have: bytes.len() as u64,
                })?;
            tensors.push(TensorSpec {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
                data: data.to_vec(),
            });
        }
        Ok(write(&meta, &tensors))
    }

    /// Serializes a GGUF v3 file with 32-byte alignment.
    pub fn write(metadata: &[(&str, Value)], tensors: &[TensorSpec]) -> Vec<u8> {
        const ALIGN: u64 = 32;
        let mut out = Vec::new();
        out.extend_from_slice(super::MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + t.data.len() as u64).div_ceil(ALIGN) * ALIGN;
        }
        let pad = (out.len() as u64).div_ceil(ALIGN) * ALIGN;
        out.resize(pad as usize, 0);
        for t in tensors {
            out.extend_from_slice(&t.data);
            let pad = (out.len() as u64).div_ceil(ALIGN) * ALIGN;
            out.resize(pad as usize, 0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{TensorSpec, write};
    use super::*;

    fn sample() -> Vec<u8> {
        write(
            &[
                ("general.architecture", Value::String("llama".into())),
                ("llama.block_count", Value::U32(1)),
                (
                    "tokenizer.ggml.tokens",
                    Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
                ),
            ],
            &[
                TensorSpec {
                    name: "a".into(),
                    dims: vec![8, 2],
                    ty: GgmlType::F32,
                    data: vec![1; 64],
                },
                TensorSpec {
                    name: "b".into(),
                    dims: vec![32],
                    ty: GgmlType::Q8_0,
                    data: vec![2; 34],
                },
            ],
        )
    }

    #[test]
    fn round_trip() {
        let b = sample();
        let g = Gguf::parse(&b).expect("parse");
        assert_eq!(g.architecture(), Some("llama"));
        assert_eq!(g.tensors.len(), 2);
        assert_eq!(g.tensors[1].offset, 64);
        assert_eq!(g.tensors[1].size, 34);
        let r = g.tensor_range(&g.tensors[1]);
        assert!(b[r.start as usize..r.end as usize].iter().all(|&x| x == 2));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = sample();
        for n in 0..b.len() - 30 {
            assert!(Gguf::parse(&b[..n]).is_err(), "prefix {n} parsed");
        }
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = sample();
        b[0] = b'X';
        assert_eq!(Gguf::parse(&b).expect_err("must fail"), GgufError::BadMagic);
        let mut b = sample();
        b[4] = 9;
        assert_eq!(
            Gguf::parse(&b).expect_err("must fail"),
            GgufError::UnsupportedVersion(9)
        );
    }

    /// Found by `scripts/fuzz.sh` (gguf_header): a string length near
    /// u64::MAX overflowed while building the truncation error.
    #[test]
    fn fuzz_regression_huge_string_length() {
        let b = include_bytes!("../tests/fixtures/fuzz/gguf_header_overflow.bin");
        match Gguf::parse(b) {
            Err(GgufError::Truncated { need, have, .. }) => {
                assert!(need > have, "need {need} <= have {have}")
            }
            other => panic!("expected a truncation error, got {other:?}"),
        }
    }

    fn with_types(a: GgmlType, b: GgmlType) -> Vec<u8> {
        write(
            &[("general.architecture", Value::String("llama".into()))],
            &[
                TensorSpec {
                    name: "a".into(),
                    dims: vec![256, 2],
                    ty: a,
                    data: vec![3; 272],
                },
                TensorSpec {
                    name: "b".into(),
                    dims: vec![256],
                    ty: b,
                    data: vec![4; 136],
                },
            ],
        )
    }

    #[test]
    fn every_ggml_type_has_its_llama_cpp_layout() {
        let known: Vec<GgmlType> = GgmlType::known().collect();
        assert_eq!(known.len(), 35);
        for t in &known {
            assert_eq!(GgmlType::from_id(t.id()), Some(*t));
            assert!(t.layout().is_some_and(|(b, n)| b > 0 && n > 0), "{t}");
        }
        assert_eq!(GgmlType::IQ4_XS.layout(), Some((256, 136)));
        assert_eq!(GgmlType::IQ4_NL.layout(), Some((32, 18)));
        assert_eq!(GgmlType::MXFP4.layout(), Some((32, 17)));
        assert_eq!(GgmlType::TQ1_0.layout(), Some((256, 54)));
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 43, 9999] {
            assert_eq!(GgmlType::from_id(removed), None);
            assert_eq!(GgmlType::from_id_or_unknown(removed).id(), removed);
        }
    }

    #[test]
    fn iq4_xs_tensors_parse_with_their_size() {
        let b = with_types(GgmlType::IQ4_XS, GgmlType::IQ4_XS);
        let g = Gguf::parse(&b).expect("parse");
        assert_eq!(g.tensors[0].size, 272);
        assert_eq!(g.tensors[1].ty, GgmlType::IQ4_XS);
        assert_eq!(g.tensors[1].size, 136);
    }

    #[test]
    fn an_unknown_type_is_an_opaque_span_to_the_next_tensor_or_the_end() {
        let b = with_types(GgmlType::Unknown(77), GgmlType::Unknown(200));
        let g = Gguf::parse(&b).expect("parse");
        // 272 bytes padded to 288 (32-byte alignment), then 136 padded to 160.
        assert_eq!(g.tensors[0].ty, GgmlType::Unknown(77));
        assert_eq!(g.tensors[0].size, 288);
        assert_eq!(g.tensors[1].offset, 288);
        assert_eq!(g.tensors[1].size, b.len() as u64 - g.data_offset - 288);
        assert_eq!(g.tensors[0].ty.to_string(), "unknown type 77");
        // Known after unknown, and the other way round.
        let b = with_types(GgmlType::IQ4_XS, GgmlType::Unknown(77));
        let g = Gguf::parse(&b).expect("parse");
        assert_eq!((g.tensors[0].size, g.tensors[1].size), (272, 160));
    }

    #[test]
    fn an_unknown_type_with_no_bytes_is_refused() {
        let mut b = with_types(GgmlType::IQ4_XS, GgmlType::Unknown(77));
        // Cut the data after the first tensor: the opaque one would be empty.
        let g = Gguf::parse(&b).expect("parse");
        b.truncate((g.data_offset + 288) as usize);
        match Gguf::parse(&b) {
            Err(GgufError::Malformed(m)) => assert!(m.contains("unknown type 77"), "{m}"),
            other => panic!("expected malformed, got {other:?}"),
        }
    }

    #[test]
    fn the_header_parses_from_a_prefix_with_the_file_length_known() {
        let b = sample();
        let full = Gguf::parse(&b).expect("parse");
        let (g, used) =
            Gguf::parse_header(&b[..full.data_offset as usize], b.len() as u64).expect("prefix");
        assert_eq!(g.tensors, full.tensors);
        assert_eq!(g.file_len, b.len() as u64);
        assert!(used <= full.data_offset);
        // Too short a prefix asks for more.
        assert!(matches!(
            Gguf::parse_header(&b[..40], b.len() as u64),
            Err(GgufError::Truncated { .. })
        ));
        // A file length shorter than the tensors is refused from the header alone.
        assert!(matches!(
            Gguf::parse_header(&b[..full.data_offset as usize], full.data_offset + 10),
            Err(GgufError::Truncated {
                what: "tensor data",
                ..
            })
        ));
    }

    #[test]
    fn overlapping_tensors_are_refused() {
        let mut b = sample();
        let g = Gguf::parse(&b).expect("parse");
        // Tensor "b"'s offset field is the last 8 bytes of the directory: point it into "a".
        let hdr_end = b
            .windows(8)
            .rposition(|w| w == 64u64.to_le_bytes())
            .expect("offset of b");
        assert!(hdr_end < g.data_offset as usize);
        b[hdr_end..hdr_end + 8].copy_from_slice(&32u64.to_le_bytes());
        match Gguf::parse(&b) {
            Err(GgufError::Malformed(m)) => assert!(m.contains("overlap"), "{m}"),
            other => panic!("expected an overlap error, got {other:?}"),
        }
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut b = sample();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Truncated { .. })));
    }
}
