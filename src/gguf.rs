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
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
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
    /// A tensor type id that we do not know the layout of.
    #[error("tensor {name}: unknown ggml type {ty}")]
    UnknownTensorType {
        /// Tensor name.
        name: String,
        /// The raw type id.
        ty: u32,
    },
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

/// ggml tensor element types, with their block layout.
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
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

impl GgmlType {
    /// Maps a raw ggml type id to a type, if known.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            _ => return None,
        })
    }
    /// The raw ggml type id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
        }
    }
    /// (elements per block, bytes per block).
    pub fn block_layout(self) -> (u64, u64) {
        use GgmlType::*;
        match self {
            F32 => (1, 4),
            F16 | BF16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 | F64 => (1, 8),
        }
    }
    /// Canonical lower-case name, as llama.cpp prints it.
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "f32",
            F16 => "f16",
            Q4_0 => "q4_0",
            Q4_1 => "q4_1",
            Q5_0 => "q5_0",
            Q5_1 => "q5_1",
            Q8_0 => "q8_0",
            Q8_1 => "q8_1",
            Q2_K => "q2_K",
            Q3_K => "q3_K",
            Q4_K => "q4_K",
            Q5_K => "q5_K",
            Q6_K => "q6_K",
            Q8_K => "q8_K",
            I8 => "i8",
            I16 => "i16",
            I32 => "i32",
            I64 => "i64",
            F64 => "f64",
            BF16 => "bf16",
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
    /// Length of the file the header was parsed from.
    pub file_len: u64,
}

impl Gguf {
    /// Parses a whole GGUF file held in memory (usually a memory mapping).
    ///
    /// Checks that every tensor lies inside the file, so a truncated file is
    /// an error here rather than a fault later.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        let (mut g, _) = Self::parse_header(bytes)?;
        g.file_len = bytes.len() as u64;
        g.check_tensor_bounds()?;
        Ok(g)
    }

    /// Parses only the header (metadata and tensor directory) from a prefix
    /// of the file. Returns the header and the number of bytes it used.
    /// Tensor ranges are not checked against the file length (unknown here);
    /// `file_len` is set to the prefix length.
    pub fn parse_header(bytes: &[u8]) -> Result<(Self, u64), GgufError> {
        let mut r = Reader { b: bytes, pos: 0 };
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
            let raw_ty = r.u32("tensor type")?;
            let ty = GgmlType::from_id(raw_ty).ok_or_else(|| GgufError::UnknownTensorType {
                name: name.clone(),
                ty: raw_ty,
            })?;
            let offset = r.u64("tensor offset")?;
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    GgufError::Malformed(format!("tensor {name}: element count overflows"))
                })?;
            let (blk, bytes_per) = ty.block_layout();
            if dims[0] % blk != 0 {
                return Err(GgufError::Malformed(format!(
                    "tensor {name}: row of {} elements is not a multiple of the {} block of {blk}",
                    dims[0],
                    ty.name()
                )));
            }
            let size = (elements / blk)
                .checked_mul(bytes_per)
                .ok_or_else(|| GgufError::Malformed(format!("tensor {name}: size overflows")))?;
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
        let g = Gguf {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            file_len: bytes.len() as u64,
        };
        Ok((g, header_end))
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

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut b = sample();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Gguf::parse(&b), Err(GgufError::Truncated { .. })));
    }
}
