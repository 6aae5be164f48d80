//! CPU kernels for the SAE step over the firing entries of a [B, F] feature matrix
//! (`kernels/sparse.py` explains the step; `kernels/native_sparse.py` wraps these).
//!
//! - `positive_entries`: the entries > 0 of a feature matrix, in CSR form.
//! - `sampled_dot`: the product a @ b.T at those entries only.
//! - `top_k`: the k largest entries of each row of a TopK SAE's pre-activations.
//!
//! Matrices are row-major slices with their shapes passed beside them; f32, or bf16 as its
//! raw 16 bits (`u16`, numpy has no bfloat16). Sums accumulate in f32. Each kernel splits
//! its rows into runs of about equal work, one per thread (`std::thread::scope`).
//!
//! Each kernel is compiled twice: as portable Rust, and on x86-64 for AVX2 + FMA with the
//! inner loops in intrinsics (`mod avx2`), chosen at run time (`Isa::detect`). AVX-512 is left out: Zen 4 runs it on the same 256-bit units, and its
//! target feature needs Rust 1.89 (the crate builds on 1.85).

use std::ops::Range;

use crate::error::{Error, Result};

/// Values per step of the dot products: four 8-wide registers of independent sums.
const LANES: usize = 32;

/// An element of an input matrix: f32, or bf16 as its raw bits.
pub trait Value: Copy + Send + Sync {
    fn to_f32(self) -> f32;

    /// Bit i set where chunk[i] (at most 64 values) is positive or NaN.
    #[inline(always)]
    fn firing_mask(chunk: &[Self]) -> u64 {
        chunk.iter().enumerate().fold(0, |mask, (i, &v)| {
            mask | (u64::from(fires(v.to_f32())) << i)
        })
    }

    /// `firing_mask` of exactly 64 values with AVX2 compares.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn firing_mask_avx2(chunk: &[Self; 64]) -> u64;

    /// Eight values from p, widened to f32.
    ///
    /// # Safety
    /// The CPU must support AVX2; p must point at 8 readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// Bit i set where chunk[i] (at most 64 values) may rank above `t` in `top_k`'s order:
    /// set for every value greater than t or NaN (t itself must not be NaN); it may also
    /// be set for a value that ties t, which the caller's exact comparison turns away.
    #[inline(always)]
    fn above_mask(chunk: &[Self], t: f32) -> u64 {
        chunk.iter().enumerate().fold(0, |mask, (i, &v)| {
            let v = v.to_f32();
            mask | (u64::from(v > t || v.is_nan()) << i)
        })
    }

    /// `above_mask` of exactly 64 values with AVX2 compares. For bf16, a t between two
    /// bf16 values counts as the one nearer zero (only a row's floor lies between them).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn above_mask_avx2(chunk: &[Self; 64], t: f32) -> u64;
}

impl Value for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn firing_mask_avx2(chunk: &[f32; 64]) -> u64 {
        use std::arch::x86_64::*;
        let zero = _mm256_setzero_ps();
        let mut mask = 0u64;
        for (i, group) in chunk.chunks_exact(8).enumerate() {
            let v = _mm256_loadu_ps(group.as_ptr());
            // Not (v <= 0), unordered: true for v > 0 and for NaN.
            let firing = _mm256_cmp_ps::<_CMP_NLE_UQ>(v, zero);
            mask |= u64::from(_mm256_movemask_ps(firing) as u8) << (8 * i);
        }
        mask
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn above_mask_avx2(chunk: &[f32; 64], t: f32) -> u64 {
        use std::arch::x86_64::*;
        let t = _mm256_set1_ps(t);
        let mut mask = 0u64;
        for (i, group) in chunk.chunks_exact(8).enumerate() {
            // Not (v <= t), unordered: true for v > t and for NaN.
            let above = _mm256_cmp_ps::<_CMP_NLE_UQ>(_mm256_loadu_ps(group.as_ptr()), t);
            mask |= u64::from(_mm256_movemask_ps(above) as u8) << (8 * i);
        }
        mask
    }
}

/// bf16 bits: the upper half of the f32 with the same value.
impl Value for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn firing_mask_avx2(chunk: &[u16; 64]) -> u64 {
        use std::arch::x86_64::*;
        // As i16, the positive values and +NaN are 1..=0x7FFF and -NaN is -127..=-1
        // (0xFF81..=0xFFFF; -inf is -128): firing is bits > -128 and bits != 0.
        let neg_inf = _mm256_set1_epi16(-128);
        let zero = _mm256_setzero_si256();
        let firing = |p: *const u16| {
            let v = _mm256_loadu_si256(p.cast());
            _mm256_andnot_si256(_mm256_cmpeq_epi16(v, zero), _mm256_cmpgt_epi16(v, neg_inf))
        };
        let mut mask = 0u64;
        for (i, pair) in chunk.chunks_exact(32).enumerate() {
            let lo = firing(pair.as_ptr());
            let hi = firing(pair[16..].as_ptr());
            // The pack interleaves 128-bit halves (lo0 hi0 lo1 hi1); the permute restores order.
            let bytes = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(lo, hi));
            mask |= u64::from(_mm256_movemask_epi8(bytes) as u32) << (32 * i);
        }
        mask
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
    }

    /// Compares 16-bit keys, 16 values an instruction, instead of widening to f32 (8).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn above_mask_avx2(chunk: &[u16; 64], t: f32) -> u64 {
        use std::arch::x86_64::*;
        let (low, magnitude) = (_mm256_set1_epi16(127), _mm256_set1_epi16(0x7FFF));
        let t = _mm256_set1_epi16(bf16_key((t.to_bits() >> 16) as u16));
        let above = |p: *const u16| {
            let v = _mm256_loadu_si256(p.cast());
            // `bf16_key` of 16 values: flip the magnitude of negatives, then rotate by 127.
            let flip = _mm256_and_si256(_mm256_srai_epi16::<15>(v), magnitude);
            let key = _mm256_sub_epi16(_mm256_xor_si256(v, flip), low);
            _mm256_cmpgt_epi16(key, t)
        };
        let mut mask = 0u64;
        for (i, pair) in chunk.chunks_exact(32).enumerate() {
            let lo = above(pair.as_ptr());
            let hi = above(pair[16..].as_ptr());
            // The pack interleaves 128-bit halves (lo0 hi0 lo1 hi1); the permute restores order.
            let bytes = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(lo, hi));
            mask |= u64::from(_mm256_movemask_epi8(bytes) as u32) << (32 * i);
        }
        mask
    }
}

/// bf16 bits as an i16 that orders like the values, except that -0.0 sorts just below
/// +0.0 (which `above_mask` may flag; the exact check turns it away): flipping the
/// magnitude bits of the negatives sorts the non-NaN values and puts -NaN below -inf;
/// subtracting 127 wraps the -NaNs round to the top (above +inf and +NaN), -inf to the
/// bottom.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn bf16_key(bits: u16) -> i16 {
    let v = bits as i16;
    (v ^ ((v >> 15) & 0x7FFF)).wrapping_sub(127)
}

/// Whether a feature value counts as firing: positive, or NaN (which compares false).
#[inline(always)]
pub fn fires(x: f32) -> bool {
    x > 0.0 || x.is_nan()
}

/// The instruction set the kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, vectorised by LLVM for the build's baseline (SSE2 on x86-64).
    Portable,
    /// x86-64 with AVX2 and FMA, detected at run time.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2Fma,
}

#[cfg(test)]
thread_local! {
    /// Set by tests to run the portable kernels on a CPU that has AVX2.
    static FORCE_PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Isa {
    pub fn detect() -> Isa {
        #[cfg(test)]
        if FORCE_PORTABLE.get() {
            return Isa::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2Fma;
        }
        Isa::Portable
    }
}

// ---------------------------------------------------------------------------------------
// Checks and work splitting

fn check_len(name: &str, len: usize, shape: &[usize]) -> Result<()> {
    let want: usize = shape.iter().product();
    if len != want {
        return Err(Error::invalid(format!(
            "{name} has {len} elements; shape {shape:?} needs {want}"
        )));
    }
    Ok(())
}

/// `ptr` [S + 1] must start at 0, never decrease and end at `nnz`.
fn check_pointers(name: &str, ptr: &[i64], nnz: usize) -> Result<()> {
    let decreasing = ptr.windows(2).fold(false, |bad, w| bad | (w[1] < w[0]));
    match (ptr.first(), ptr.last()) {
        (Some(0), Some(&last)) if !decreasing && last as u64 == nnz as u64 => Ok(()),
        (None, _) => Err(Error::invalid(format!(
            "{name} is empty; it needs S + 1 entries"
        ))),
        _ if decreasing => Err(Error::invalid(format!("{name} decreases somewhere"))),
        (first, last) => Err(Error::invalid(format!(
            "{name} runs from {first:?} to {last:?}; it must run from 0 to {nnz}"
        ))),
    }
}

/// Every value of `index` must lie in 0..n.
fn check_indices(name: &str, index: &[i64], n: usize) -> Result<()> {
    let bad = index
        .iter()
        .fold(false, |bad, &i| bad | (i as u64 >= n as u64));
    if bad {
        let (j, i) = index
            .iter()
            .enumerate()
            .find(|(_, &i)| i as u64 >= n as u64)
            .expect("a bad index");
        return Err(Error::invalid(format!(
            "{name}[{j}] = {i} is outside 0..{n}"
        )));
    }
    Ok(())
}

/// Up to `parts` consecutive ranges covering 0..n, of about equal cost, where item s costs
/// its entries ptr[s]..ptr[s+1] plus `overhead`.
fn balanced_ranges(ptr: &[i64], parts: usize, overhead: i64) -> Vec<Range<usize>> {
    let n = ptr.len() - 1;
    let cost = |s: usize| ptr[s] + overhead * s as i64;
    let total = cost(n);
    let mut ranges = Vec::with_capacity(parts);
    let mut start = 0;
    for k in 1..=parts {
        let end = if k == parts {
            n
        } else {
            // The first s at or past the k-th share of the cost (cost rises with s).
            let target = total * k as i64 / parts as i64;
            let (mut lo, mut hi) = (start, n);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if cost(mid) < target {
                    lo = mid + 1
                } else {
                    hi = mid
                }
            }
            lo
        };
        if end > start {
            ranges.push(start..end);
            start = end;
        }
    }
    ranges
}

/// Splits `out` into consecutive pieces of the given lengths.
fn split_lengths<T>(mut out: &mut [T], lengths: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    lengths
        .map(|len| {
            let (piece, rest) = std::mem::take(&mut out).split_at_mut(len);
            out = rest;
            piece
        })
        .collect()
}

/// `work(item)` for each item: the first on this thread, the others on scoped threads.
fn run_parallel<W: Send, R: Send>(items: Vec<W>, work: impl Fn(W) -> R + Sync) -> Vec<R> {
    let work = &work;
    std::thread::scope(|scope| {
        let mut items = items.into_iter();
        let first = items.next();
        let handles: Vec<_> = items.map(|item| scope.spawn(move || work(item))).collect();
        let mut results: Vec<R> = first.into_iter().map(work).collect();
        for handle in handles {
            results.push(
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        results
    })
}

// ---------------------------------------------------------------------------------------
// positive_entries

/// The entries of a matrix in CSR form, row-major, columns increasing within a row.
#[derive(Debug, PartialEq)]
pub struct Entries<T> {
    /// [B + 1]: row b's entries are col[row_ptr[b]..row_ptr[b + 1]].
    pub row_ptr: Vec<i64>,
    /// [nnz] column of each entry.
    pub col: Vec<i64>,
    /// [nnz] value of each entry.
    pub val: Vec<T>,
}

/// The entries of `feats` [rows, cols] that are positive, or NaN (kept so that a NaN from
/// upstream reaches the finiteness checks after the step instead of vanishing here);
/// -0.0 and negative values are left out. `threads` scan disjoint runs of rows.
pub fn positive_entries<T: Value>(
    feats: &[T],
    rows: usize,
    cols: usize,
    threads: usize,
) -> Result<Entries<T>> {
    check_len("feats", feats.len(), &[rows, cols])?;
    let parts = threads.clamp(1, rows.max(1));
    let ranges: Vec<Range<usize>> = (0..parts)
        .map(|k| rows * k / parts..rows * (k + 1) / parts)
        .collect();
    let isa = Isa::detect();
    let pieces = run_parallel(ranges, |range| {
        let block = &feats[range.start * cols..range.end * cols];
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` found AVX2 and FMA.
            Isa::Avx2Fma => unsafe { scan_rows_avx2(block, range.len(), cols) },
            _ => scan_rows::<T, false>(block, range.len(), cols),
        }
    });
    let nnz = pieces.iter().map(|p| p.col.len()).sum();
    let mut row_ptr = Vec::with_capacity(rows + 1);
    let (mut col, mut val) = (Vec::with_capacity(nnz), Vec::with_capacity(nnz));
    row_ptr.push(0);
    for piece in pieces {
        let offset = col.len() as i64;
        row_ptr.extend(piece.row_ptr[1..].iter().map(|p| p + offset));
        col.extend_from_slice(&piece.col);
        val.extend_from_slice(&piece.val);
    }
    Ok(Entries { row_ptr, col, val })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_rows_avx2<T: Value>(feats: &[T], rows: usize, cols: usize) -> Entries<T> {
    scan_rows::<T, true>(feats, rows, cols)
}

/// `positive_entries` of one run of rows, 64 columns at a time: one compare mask per
/// chunk, then only its set bits (a chunk of zeros costs the compares alone).
#[inline(always)]
fn scan_rows<T: Value, const SIMD: bool>(feats: &[T], rows: usize, cols: usize) -> Entries<T> {
    let mut out = Entries {
        row_ptr: Vec::with_capacity(rows + 1),
        col: Vec::new(),
        val: Vec::new(),
    };
    out.row_ptr.push(0);
    for r in 0..rows {
        let row = &feats[r * cols..(r + 1) * cols];
        for (c, chunk) in row.chunks(64).enumerate() {
            let mut mask = chunk_mask::<T, SIMD>(chunk);
            while mask != 0 {
                let i = mask.trailing_zeros() as usize;
                out.col.push((c * 64 + i) as i64);
                out.val.push(chunk[i]);
                mask &= mask - 1;
            }
        }
        out.row_ptr.push(out.col.len() as i64);
    }
    out
}

#[inline(always)]
fn chunk_mask<T: Value, const SIMD: bool>(chunk: &[T]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        if let Ok(full) = <&[T; 64]>::try_from(chunk) {
            // SAFETY: SIMD is true only inside `scan_rows_avx2`, run after detection.
            return unsafe { T::firing_mask_avx2(full) };
        }
    }
    T::firing_mask(chunk)
}

// ---------------------------------------------------------------------------------------
// sampled_dot

/// out[j] = a[r] . b[col[j]] for each entry j of row r (row_ptr [B + 1], col [nnz]):
/// a [B, D] @ b [F, D].T sampled at the entries, summed in f32.
#[allow(clippy::too_many_arguments)] // two matrices with their shapes, the pattern, the output
pub fn sampled_dot<T: Value>(
    a: &[f32],
    b: &[T],
    n_b: usize,
    dim: usize,
    row_ptr: &[i64],
    col: &[i64],
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let rows = row_ptr.len().saturating_sub(1);
    check_len("a", a.len(), &[rows, dim])?;
    check_len("b", b.len(), &[n_b, dim])?;
    check_len("out", out.len(), &[col.len()])?;
    check_pointers("row_ptr", row_ptr, col.len())?;
    check_indices("col", col, n_b)?;
    let ranges = balanced_ranges(row_ptr, threads.max(1), 1);
    let lengths = ranges
        .iter()
        .map(|r| (row_ptr[r.end] - row_ptr[r.start]) as usize);
    let pieces: Vec<_> = ranges
        .iter()
        .cloned()
        .zip(split_lengths(out, lengths))
        .collect();
    let isa = Isa::detect();
    run_parallel(pieces, |(range, out)| match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` found AVX2 and FMA.
        Isa::Avx2Fma => unsafe { sampled_rows_avx2(a, b, dim, row_ptr, col, range, out) },
        _ => sampled_rows::<T, false>(a, b, dim, row_ptr, col, range, out),
    });
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sampled_rows_avx2<T: Value>(
    a: &[f32],
    b: &[T],
    dim: usize,
    row_ptr: &[i64],
    col: &[i64],
    rows: Range<usize>,
    out: &mut [f32],
) {
    sampled_rows::<T, true>(a, b, dim, row_ptr, col, rows, out)
}

/// `sampled_dot` over a run of rows; `out` holds just their entries.
#[inline(always)]
fn sampled_rows<T: Value, const SIMD: bool>(
    a: &[f32], // [B, D]
    b: &[T],   // [F, D]
    dim: usize,
    row_ptr: &[i64], // [B + 1]
    col: &[i64],     // [nnz]
    rows: Range<usize>,
    out: &mut [f32], // [row_ptr[rows.end] - row_ptr[rows.start]]
) {
    let base = row_ptr[rows.start] as usize;
    let b_row = |j: usize| &b[col[j] as usize * dim..(col[j] as usize + 1) * dim];
    for r in rows {
        let a_row = &a[r * dim..(r + 1) * dim];
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let (mut j, end) = (row_ptr[r] as usize, row_ptr[r + 1] as usize);
        #[cfg(target_arch = "x86_64")]
        if SIMD {
            while j + 4 <= end {
                for ahead in j + 4..j + 8 {
                    prefetch_row::<T, SIMD>(b, dim, col.get(ahead));
                }
                let rows = [0, 1, 2, 3].map(|k| b_row(j + k).as_ptr());
                // SAFETY: SIMD is true only inside the `_avx2` kernels; each row holds D values.
                let dots = unsafe { avx2::dot4(a_row, rows) };
                out[j - base..j - base + 4].copy_from_slice(&dots);
                j += 4;
            }
        }
        for j in j..end {
            prefetch_row::<T, SIMD>(b, dim, col.get(j + PREFETCH));
            out[j - base] = dot::<T, SIMD>(a_row, b_row(j));
        }
    }
}

/// Entries ahead whose matrix row is fetched into cache before its turn.
const PREFETCH: usize = 4;

/// Fetches row `row` of `m` [_, D] towards the cache (a no-op without one, or past the end).
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn prefetch_row<T: Value, const SIMD: bool>(m: &[T], dim: usize, row: Option<&i64>) {
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(&row)) = (SIMD, row) {
        // SAFETY: SIMD is true only inside the `_avx2` kernels; a prefetch of any address
        // is harmless (the wrapping pointer is never read).
        unsafe { avx2::prefetch(m.as_ptr().wrapping_add(row as usize * dim), dim) };
    }
}

/// a . b in f32.
#[inline(always)]
fn dot<T: Value, const SIMD: bool>(a: &[f32], b: &[T]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: SIMD is true only inside the `_avx2` kernels, run after detection.
        return unsafe { avx2::dot(a, b) };
    }
    let mut acc = [0.0f32; LANES];
    let (a_groups, b_groups) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_tail, b_tail) = (a_groups.remainder(), b_groups.remainder());
    for (x, y) in a_groups.zip(b_groups) {
        for k in 0..LANES {
            acc[k] += x[k] * y[k].to_f32();
        }
    }
    for (k, (&x, &y)) in a_tail.iter().zip(b_tail).enumerate() {
        acc[k] += x * y.to_f32();
    }
    acc.iter().sum()
}

/// The inner loops with AVX2 + FMA intrinsics. LLVM's own vectorisation of the portable
/// loops used 128-bit halves here: 12.3 ms for the sampled dot at B 2048, D 768, F 1536
/// (65k entries, one thread) against 4.0 ms with these.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Value, LANES};

    /// Asks for the cache lines of `bytes` bytes from p ahead of their use.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn prefetch<T>(p: *const T, len: usize) {
        let (p, bytes) = (p.cast::<i8>(), len * std::mem::size_of::<T>());
        for offset in (0..bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(offset));
        }
    }

    /// Sum of the 8 lanes of v.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn sum8(v: __m256) -> f32 {
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
    }

    /// a . b with four 8-wide partial sums.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn dot<T: Value>(a: &[f32], b: &[T]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); LANES / 8];
        let mut i = 0;
        while i + LANES <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let at = i + 8 * k;
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(at)), T::load8(pb.add(at)), *acc);
            }
            i += LANES;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), T::load8(pb.add(i)), acc[0]);
            i += 8;
        }
        let mut sum = sum8(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        for j in i..n {
            sum += a[j] * b[j].to_f32();
        }
        sum
    }

    /// The dots of a with four rows of b at once (a loaded once for all four), two 8-wide
    /// partial sums each.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn dot4<T: Value>(a: &[f32], b: [*const T; 4]) -> [f32; 4] {
        let (n, pa) = (a.len(), a.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut i = 0;
        while i + 16 <= n {
            let (a0, a1) = (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pa.add(i + 8)));
            for (acc, &row) in acc.iter_mut().zip(&b) {
                acc[0] = _mm256_fmadd_ps(a0, T::load8(row.add(i)), acc[0]);
                acc[1] = _mm256_fmadd_ps(a1, T::load8(row.add(i + 8)), acc[1]);
            }
            i += 16;
        }
        if i + 8 <= n {
            let a0 = _mm256_loadu_ps(pa.add(i));
            for (acc, &row) in acc.iter_mut().zip(&b) {
                acc[0] = _mm256_fmadd_ps(a0, T::load8(row.add(i)), acc[0]);
            }
            i += 8;
        }
        let mut sums = [0.0; 4];
        for ((sum, acc), &row) in sums.iter_mut().zip(&acc).zip(&b) {
            *sum = sum8(_mm256_add_ps(acc[0], acc[1]));
            for (j, &x) in a.iter().enumerate().skip(i) {
                *sum = x.mul_add((*row.add(j)).to_f32(), *sum);
            }
        }
        sums
    }
}

// ---------------------------------------------------------------------------------------
// top_k

/// The k largest entries of each row of `pre` [rows, cols] into `values` [rows, k] and
/// `indices` [rows, k], each row's by increasing column: exactly the first k of a stable
/// descending sort of the row (`torch.sort(stable=True)`), so a tie goes to the lower
/// column, NaN ranks above every number (lower column first among NaNs) and -0.0 ties
/// +0.0. Values keep their bits (a NaN's payload, a zero's sign). `threads` take disjoint
/// runs of rows.
#[allow(clippy::too_many_arguments)] // the matrix with its shape, k, two outputs, threads
pub fn top_k<T: Value>(
    pre: &[T],
    rows: usize,
    cols: usize,
    k: usize,
    values: &mut [T],
    indices: &mut [i64],
    threads: usize,
) -> Result<()> {
    check_len("pre", pre.len(), &[rows, cols])?;
    if k == 0 || k > cols {
        return Err(Error::invalid(format!(
            "k = {k} must lie in 1..={cols} (the columns of pre)"
        )));
    }
    if u32::try_from(cols).is_err() {
        return Err(Error::invalid(format!(
            "pre has {cols} columns; top_k takes at most 2^32 - 1"
        )));
    }
    check_len("values", values.len(), &[rows, k])?;
    check_len("indices", indices.len(), &[rows, k])?;
    let parts = threads.clamp(1, rows.max(1));
    let ranges: Vec<Range<usize>> = (0..parts)
        .map(|p| rows * p / parts..rows * (p + 1) / parts)
        .collect();
    let lengths = || ranges.iter().map(|r| r.len() * k);
    let pieces: Vec<_> = ranges
        .iter()
        .cloned()
        .zip(split_lengths(values, lengths()))
        .zip(split_lengths(indices, lengths()))
        .collect();
    let isa = Isa::detect();
    run_parallel(pieces, |((range, values), indices)| {
        let block = &pre[range.start * cols..range.end * cols];
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` found AVX2 and FMA.
            Isa::Avx2Fma => unsafe { top_k_rows_avx2(block, cols, k, values, indices) },
            _ => top_k_rows::<T, false>(block, cols, k, values, indices),
        }
    });
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn top_k_rows_avx2<T: Value>(
    pre: &[T],
    cols: usize,
    k: usize,
    values: &mut [T],
    indices: &mut [i64],
) {
    top_k_rows::<T, true>(pre, cols, k, values, indices)
}

/// Largest k whose kept entries live in a sorted array (`Sorted`, or `avx2_topk::Lanes`)
/// rather than a heap: an insertion there costs O(k) compares but no branch, against a
/// heap's log2(k) mispredicted ones, and the array names its (k/2)-th entry for the next
/// row's floor. At B 2048, bf16: F 1536, k 32, two threads, before floors: 4.8 ms with the
/// heap, 3.0 ms with the array in memory; F 4096, k 128, one thread: 32 ms with the heap,
/// 13 ms with the lanes and floors.
const SORTED_MAX_K: usize = 128;

/// `top_k` of one run of rows.
#[inline(always)]
fn top_k_rows<T: Value, const SIMD: bool>(
    pre: &[T], // [R, F]
    cols: usize,
    k: usize,
    values: &mut [T],    // [R, k]
    indices: &mut [i64], // [R, k]
) {
    #[cfg(target_arch = "x86_64")]
    if SIMD && k <= SORTED_MAX_K {
        // SAFETY: SIMD is true only inside `top_k_rows_avx2`, run after detection.
        let args = (pre, cols, k, values, indices);
        return unsafe {
            match k.div_ceil(4) {
                1 => top_k_lanes::<T, 1>(args),
                2 => top_k_lanes::<T, 2>(args),
                3..=4 => top_k_lanes::<T, 4>(args),
                5..=8 => top_k_lanes::<T, 8>(args),
                9..=16 => top_k_lanes::<T, 16>(args),
                _ => top_k_lanes::<T, 32>(args),
            }
        };
    }
    if k <= SORTED_MAX_K {
        top_k_rows_in::<T, _, SIMD>(Sorted::new(k), pre, cols, values, indices)
    } else {
        top_k_rows_in::<T, _, SIMD>(Heap(vec![SEED; k]), pre, cols, values, indices)
    }
}

/// `top_k_rows` with the kept entries in N AVX2 vectors.
///
/// # Safety
/// The CPU must support AVX2; k <= 4N.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn top_k_lanes<T: Value, const N: usize>(
    (pre, cols, k, values, indices): (&[T], usize, usize, &mut [T], &mut [i64]),
) {
    let lanes = avx2_topk::Lanes::<N>::new(k);
    top_k_rows_in::<T, _, true>(lanes, pre, cols, values, indices)
}

#[inline(always)]
fn top_k_rows_in<T: Value, K: Kept, const SIMD: bool>(
    mut kept: K,
    pre: &[T], // [R, F]
    cols: usize,
    values: &mut [T],    // [R, k]
    indices: &mut [i64], // [R, k]
) {
    let k = kept.len();
    // Bit c set for a kept column c: reading them in order sorts the columns.
    let mut chosen = vec![0u64; cols.div_ceil(64)];
    let rows = pre.chunks_exact(cols).zip(values.chunks_exact_mut(k));
    let mut floor = None;
    for ((row, values), indices) in rows.zip(indices.chunks_exact_mut(k)) {
        kept.reset();
        if !top_k_row::<T, K, SIMD>(row, &mut kept, floor) {
            // Fewer than k above the floor: the row again with none.
            kept.reset();
            top_k_row::<T, K, SIMD>(row, &mut kept, None);
        }
        floor = kept.floor();
        kept.for_each(|e| {
            let col = entry_col(e);
            chosen[col as usize / 64] |= 1 << (col % 64);
        });
        let mut slots = values.iter_mut().zip(indices.iter_mut());
        for (w, word) in chosen.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let col = w * 64 + bits.trailing_zeros() as usize;
                let (value, index) = slots.next().expect("k kept columns");
                (*value, *index) = (row[col], col as i64);
                bits &= bits - 1;
            }
        }
    }
}

/// Offers the columns of `row` to `kept`, which keeps the k largest entries; false when
/// fewer than k were above `floor`, whose offers are then not the row's top k.
///
/// Scans 64 columns at a time: one compare mask per chunk, then an offer for its set bits
/// only (an offer that turns out no larger changes nothing). The mask holds the values
/// above the smallest entry kept, or until k are kept, above the floor (every value
/// without one). Once the smallest kept is NaN, all k are NaNs of the lowest columns and
/// nothing can displace them.
///
/// If at least k values lie above the floor, the k largest do, so the floor only saves
/// offers: taken from the row before (`Kept::floor`), near its 2k-th largest value, it
/// lets about 2k columns through instead of the k + k ln(F / k) insertions of a plain
/// scan. 1.5x at B 2048, F 4096, k 32 and 2.4x at k 128 (bf16, one thread); a row far
/// from its neighbour costs a second scan at worst.
#[inline(always)]
fn top_k_row<T: Value, K: Kept, const SIMD: bool>(
    row: &[T],
    kept: &mut K,
    floor: Option<f32>,
) -> bool {
    let mut start = 0;
    while start < row.len() {
        let least = kept.least();
        if entry_key(least) == u32::MAX {
            break;
        }
        let chunk = &row[start..row.len().min(start + 64)];
        let t = if least == SEED {
            floor
        } else {
            Some(row[entry_col(least) as usize].to_f32())
        };
        let mut mask = match t {
            Some(t) => chunk_above::<T, SIMD>(chunk, t),
            None => u64::MAX >> (64 - chunk.len()),
        };
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            kept.offer(entry(chunk[i], start + i));
            mask &= mask - 1;
        }
        start += 64;
    }
    kept.least() != SEED
}

#[inline(always)]
fn chunk_above<T: Value, const SIMD: bool>(chunk: &[T], t: f32) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        if let Ok(full) = <&[T; 64]>::try_from(chunk) {
            // SAFETY: SIMD is true only inside `top_k_rows_avx2`, run after detection.
            return unsafe { T::above_mask_avx2(full, t) };
        }
    }
    T::above_mask(chunk, t)
}

/// The rank of column `col` holding `v`, as one integer: `order_key(v)` above, the column
/// reversed below, so that of equal values the lower column ranks higher. Every entry is
/// above `SEED`.
#[inline(always)]
fn entry<T: Value>(v: T, col: usize) -> u64 {
    (u64::from(order_key(v.to_f32())) << 32) | u64::from(u32::MAX - col as u32)
}

/// The entry below every real one that fills a keeper before any column is offered
/// (`order_key` is never 0).
const SEED: u64 = 0;

#[inline(always)]
fn entry_key(entry: u64) -> u32 {
    (entry >> 32) as u32
}

#[inline(always)]
fn entry_col(entry: u64) -> u32 {
    u32::MAX - entry as u32
}

/// x as a u32 that orders like the values: the sign bit flipped for non-negatives, every
/// bit for negatives (-inf becomes 0x007F_FFFF); -0.0 as +0.0 (they compare equal) and
/// every NaN as u32::MAX.
#[inline(always)]
fn order_key(x: f32) -> u32 {
    if x.is_nan() {
        return u32::MAX;
    }
    let bits = (x + 0.0).to_bits(); // -0.0 + 0.0 = +0.0
    bits ^ (((bits as i32 >> 31) as u32) | 1 << 31)
}

/// The value of a non-NaN `order_key`.
#[inline(always)]
fn key_value(key: u32) -> f32 {
    f32::from_bits(key ^ ((((key as i32) >> 31) as u32 ^ u32::MAX) | 1 << 31))
}

/// A floor for the next row from the kept entries of this one, ascending (k >= 8): as far
/// below the k-th largest value as the (k/2)-th lies above it, about the 2k-th largest of
/// a row with a smooth tail. None where that is not a finite number.
fn floor_below(kth: u64, middle: u64) -> Option<f32> {
    if entry_key(middle) == u32::MAX {
        return None;
    }
    let (low, mid) = (key_value(entry_key(kth)), key_value(entry_key(middle)));
    Some(low - (mid - low)).filter(|f| f.is_finite())
}

/// The k largest entries offered since `reset`, starting from k `SEED`s.
trait Kept {
    fn len(&self) -> usize;
    fn reset(&mut self);
    /// The smallest entry kept.
    fn least(&self) -> u64;
    /// Keeps `e` in place of the smallest if it is larger; `e` is not kept already.
    fn offer(&mut self, e: u64);
    /// f(e) for each entry kept.
    fn for_each(&self, f: impl FnMut(u64));
    /// A floor for `top_k_row` on the next row, from the entries of a complete one.
    fn floor(&self) -> Option<f32> {
        None
    }
}

/// The entries in an ascending array, padded with u64::MAX above (an entry equal to the
/// padding, a NaN in column 0, stands for itself either way).
struct Sorted(Vec<u64>);

impl Sorted {
    fn new(k: usize) -> Self {
        Sorted(vec![u64::MAX; k + 1])
    }
}

impl Kept for Sorted {
    fn len(&self) -> usize {
        self.0.len() - 1
    }

    fn reset(&mut self) {
        let k = self.len();
        self.0[..k].fill(SEED);
    }

    #[inline(always)]
    fn least(&self) -> u64 {
        self.0[0]
    }

    /// Drops the least and slides e into order, with no branch: each entry becomes its
    /// upper neighbour if that is below e, else e if it is itself below e, else stays (so
    /// an e no larger than the least changes nothing).
    #[inline(always)]
    fn offer(&mut self, e: u64) {
        for j in 0..self.len() {
            let (here, above) = (self.0[j], self.0[j + 1]);
            self.0[j] = if above < e {
                above
            } else if here < e {
                e
            } else {
                here
            };
        }
    }

    fn for_each(&self, f: impl FnMut(u64)) {
        self.0[..self.len()].iter().copied().for_each(f)
    }

    fn floor(&self) -> Option<f32> {
        let k = self.len();
        (k >= 8)
            .then(|| floor_below(self.0[0], self.0[k / 2]))
            .flatten()
    }
}

/// The entries in a binary min-heap.
struct Heap(Vec<u64>);

impl Kept for Heap {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn reset(&mut self) {
        self.0.fill(SEED);
    }

    #[inline(always)]
    fn least(&self) -> u64 {
        self.0[0]
    }

    #[inline(always)]
    fn offer(&mut self, e: u64) {
        if e > self.0[0] {
            self.0[0] = e;
            sift_down(&mut self.0, 0);
        }
    }

    fn for_each(&self, f: impl FnMut(u64)) {
        self.0.iter().copied().for_each(f)
    }
}

/// Moves heap[i] down until neither child is smaller (a min-heap).
#[inline(always)]
fn sift_down(heap: &mut [u64], mut i: usize) {
    let n = heap.len();
    let item = heap[i];
    loop {
        let left = 2 * i + 1;
        if left >= n {
            break;
        }
        let child = if left + 1 < n && heap[left + 1] < heap[left] {
            left + 1
        } else {
            left
        };
        if heap[child] >= item {
            break;
        }
        heap[i] = heap[child];
        i = child;
    }
    heap[i] = item;
}

/// `Sorted` held in AVX2 registers.
#[cfg(target_arch = "x86_64")]
mod avx2_topk {
    use std::arch::x86_64::*;

    use super::{floor_below, Kept, SEED};

    /// The entries in N vectors of four ascending lanes, as i64 with the top bit flipped
    /// (AVX2 compares signed 64-bit lanes), padded with i64::MAX. While a row is scanned
    /// they stay in registers (up to k 64): the same array in memory, where each insertion
    /// waits on the last one's stores, took 6.7 ms against 5.8 ms at B 2048, F 4096, k 32,
    /// bf16, one thread, before floors.
    pub(super) struct Lanes<const N: usize> {
        k: usize,
        v: [__m256i; N],
    }

    #[inline(always)]
    fn flip(e: u64) -> i64 {
        (e ^ 1 << 63) as i64
    }

    impl<const N: usize> Lanes<N> {
        /// # Safety
        /// The CPU must support AVX2 (the methods use it); k <= 4N.
        pub(super) unsafe fn new(k: usize) -> Self {
            debug_assert!(k <= 4 * N);
            Lanes {
                k,
                v: [_mm256_set1_epi64x(i64::MAX); N],
            }
        }
    }

    impl<const N: usize> Kept for Lanes<N> {
        fn len(&self) -> usize {
            self.k
        }

        #[inline(always)]
        fn reset(&mut self) {
            // SAFETY: `new` checked the CPU.
            unsafe { seed(&mut self.v, self.k) }
        }

        #[inline(always)]
        fn least(&self) -> u64 {
            // SAFETY: `new` checked the CPU.
            flip(unsafe { least(&self.v) } as u64) as u64
        }

        #[inline(always)]
        fn offer(&mut self, e: u64) {
            // SAFETY: `new` checked the CPU.
            unsafe { slide_in(&mut self.v, flip(e)) }
        }

        fn for_each(&self, mut f: impl FnMut(u64)) {
            let mut lanes = [0i64; 4];
            for (i, v) in self.v.iter().enumerate() {
                // SAFETY: `new` checked the CPU; lanes holds four i64.
                unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), *v) };
                for (j, &lane) in lanes.iter().enumerate() {
                    if 4 * i + j < self.k {
                        f(flip(lane as u64) as u64);
                    }
                }
            }
        }

        fn floor(&self) -> Option<f32> {
            let (k, mut seen, mut middle) = (self.k, 0, 0);
            self.for_each(|e| {
                if seen == k / 2 {
                    middle = e;
                }
                seen += 1;
            });
            (k >= 8)
                .then(|| floor_below(self.least(), middle))
                .flatten()
        }
    }

    /// k `SEED`s, then the padding.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn seed<const N: usize>(v: &mut [__m256i; N], k: usize) {
        let lane = _mm256_setr_epi64x(0, 1, 2, 3);
        for (i, v) in v.iter_mut().enumerate() {
            // Lanes below k (lane + 4i < k) take the seed.
            let below = _mm256_cmpgt_epi64(_mm256_set1_epi64x(k as i64 - 4 * i as i64), lane);
            let pad = _mm256_set1_epi64x(i64::MAX);
            *v = _mm256_blendv_epi8(pad, _mm256_set1_epi64x(flip(SEED)), below);
        }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn least<const N: usize>(v: &[__m256i; N]) -> i64 {
        _mm256_extract_epi64::<0>(v[0])
    }

    /// `Sorted::offer` four lanes at a time: each lane's upper neighbour comes from its
    /// vector and the next by a permute.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn slide_in<const N: usize>(v: &mut [__m256i; N], e: i64) {
        let e = _mm256_set1_epi64x(e);
        for i in 0..N {
            let next = if i + 1 < N {
                v[i + 1]
            } else {
                _mm256_set1_epi64x(i64::MAX)
            };
            // (here1, here2, here3, next0): the 128-bit halves (here.hi, next.lo), then
            // an 8-byte shift across each pair of halves.
            let here = v[i];
            let above =
                _mm256_alignr_epi8::<8>(_mm256_permute2x128_si256::<0x21>(here, next), here);
            let kept = _mm256_blendv_epi8(here, e, _mm256_cmpgt_epi64(e, here));
            v[i] = _mm256_blendv_epi8(kept, above, _mm256_cmpgt_epi64(e, above));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift) of values in [-1, 1).
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    fn bf16(x: f32) -> u16 {
        (x.to_bits() >> 16) as u16
    }

    /// A [rows, cols] ReLU-like matrix, about `density` positive, with an empty row 1 and a
    /// full row 2.
    fn relu_matrix(rows: usize, cols: usize, density: f32, seed: u64) -> Vec<f32> {
        let mut gen = Gen(seed);
        let mut m: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let x = gen.next();
                if (x + 1.0) / 2.0 < density {
                    (x + 1.0) / 2.0 + 0.01
                } else {
                    0.0
                }
            })
            .collect();
        m[cols..2 * cols].fill(0.0);
        m[2 * cols..3 * cols].fill(0.5);
        m
    }

    fn naive_entries<T: Value>(m: &[T], rows: usize, cols: usize) -> Entries<T> {
        let mut e = Entries {
            row_ptr: vec![0],
            col: vec![],
            val: vec![],
        };
        for r in 0..rows {
            for c in 0..cols {
                let v = m[r * cols + c];
                if fires(v.to_f32()) {
                    e.col.push(c as i64);
                    e.val.push(v);
                }
            }
            e.row_ptr.push(e.col.len() as i64);
        }
        e
    }

    #[test]
    fn positive_entries_match_a_scan_for_every_thread_count() {
        let (rows, cols) = (37, 203);
        let m = relu_matrix(rows, cols, 0.1, 7);
        let m16: Vec<u16> = m.iter().map(|&x| bf16(x)).collect();
        for threads in [1, 2, 5, 100] {
            assert_eq!(
                positive_entries(&m, rows, cols, threads).unwrap(),
                naive_entries(&m, rows, cols)
            );
            assert_eq!(
                positive_entries(&m16, rows, cols, threads).unwrap(),
                naive_entries(&m16, rows, cols)
            );
        }
    }

    #[test]
    fn positive_entries_keep_nan_and_drop_negative_zero() {
        let row = [
            0.0,
            -0.0,
            f32::NAN,
            -f32::NAN,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -2.0,
            1e-44,
        ];
        let mut m = vec![0.0f32; 2 * 64];
        m[60..69].copy_from_slice(&row); // across the 64-column chunk boundary
        let want = vec![62, 63, 64, 65, 68];
        assert_eq!(positive_entries(&m, 1, 128, 1).unwrap().col, want);
        let m16: Vec<u16> = m.iter().map(|&x| bf16(x)).collect();
        assert_eq!(m16[61], 0x8000);
        // 1e-44 is a subnormal f32 whose upper half is 0: zero in bf16.
        assert_eq!(positive_entries(&m16, 1, 128, 1).unwrap().col, want[..4]);
    }

    #[test]
    fn every_bf16_pattern_is_classified_like_its_float() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let got = positive_entries(&all, 1024, 64, 2).unwrap();
        let want: Vec<i64> = (0..=u16::MAX)
            .filter(|&b| fires(b.to_f32()))
            .map(|b| i64::from(b % 64))
            .collect();
        assert_eq!(got.col, want);
    }

    #[test]
    fn positive_entries_of_empty_shapes() {
        let none: Vec<f32> = vec![];
        assert_eq!(positive_entries(&none, 0, 5, 2).unwrap().row_ptr, vec![0]);
        assert_eq!(
            positive_entries(&none, 3, 0, 2).unwrap().row_ptr,
            vec![0; 4]
        );
        assert!(positive_entries(&none, 3, 1, 2).is_err());
    }

    fn close(got: f32, want: f64) -> bool {
        (f64::from(got) - want).abs() <= 1e-5 * want.abs() + 1e-5
    }

    #[test]
    fn sampled_dot_matches_f64_dots() {
        let (rows, n_b, dim) = (23, 71, 45);
        let mut gen = Gen(3);
        let a: Vec<f32> = (0..rows * dim).map(|_| gen.next()).collect();
        let b: Vec<f32> = (0..n_b * dim).map(|_| gen.next()).collect();
        let b16: Vec<u16> = b.iter().map(|&x| bf16(x)).collect();
        let e = positive_entries(&relu_matrix(rows, n_b, 0.2, 5), rows, n_b, 1).unwrap();
        for isa_threads in [1, 3] {
            let mut out = vec![0.0; e.col.len()];
            let mut out16 = vec![0.0; e.col.len()];
            sampled_dot(&a, &b, n_b, dim, &e.row_ptr, &e.col, &mut out, isa_threads).unwrap();
            sampled_dot(
                &a,
                &b16,
                n_b,
                dim,
                &e.row_ptr,
                &e.col,
                &mut out16,
                isa_threads,
            )
            .unwrap();
            for r in 0..rows {
                for j in e.row_ptr[r] as usize..e.row_ptr[r + 1] as usize {
                    let c = e.col[j] as usize;
                    let dot = |bv: &dyn Fn(usize) -> f64| {
                        (0..dim)
                            .map(|d| f64::from(a[r * dim + d]) * bv(c * dim + d))
                            .sum::<f64>()
                    };
                    assert!(
                        close(out[j], dot(&|i| f64::from(b[i]))),
                        "{} at {j}",
                        out[j]
                    );
                    assert!(close(out16[j], dot(&|i| f64::from(b16[i].to_f32()))));
                }
            }
        }
    }

    #[test]
    fn sampled_dot_checks_its_pattern() {
        let (a, b) = (vec![1.0f32; 4], vec![1.0f32; 6]);
        let mut out = vec![0.0; 2];
        let ok = sampled_dot(&a, &b, 3, 2, &[0, 1, 2], &[0, 2], &mut out, 2);
        assert!(ok.is_ok() && out == [2.0, 2.0]);
        let err = sampled_dot(&a, &b, 3, 2, &[0, 1, 2], &[0, 3], &mut out, 2).unwrap_err();
        assert!(err.to_string().contains("col[1] = 3"), "{err}");
        assert!(sampled_dot(&a, &b, 3, 2, &[0, 2, 1], &[0, 1], &mut out, 2).is_err());
        assert!(sampled_dot(&a, &b, 3, 2, &[0, 1, 1], &[0, 1], &mut out, 2).is_err());
        assert!(sampled_dot(&a, &b, 3, 2, &[1, 1, 2], &[0, 1], &mut out, 2).is_err());
        assert!(sampled_dot(&a, &b, 3, 2, &[0, 1, 2], &[0, -1], &mut out, 2).is_err());
    }

    /// `top_k` by a stable descending sort of each row, NaN above everything.
    fn naive_top_k<T: Value>(m: &[T], cols: usize, k: usize) -> (Vec<T>, Vec<i64>) {
        let (mut values, mut indices) = (vec![], vec![]);
        for row in m.chunks_exact(cols) {
            let rank = |c: &usize| {
                let v = row[*c].to_f32();
                (!v.is_nan(), if v.is_nan() { 0.0 } else { -v })
            };
            let mut order: Vec<usize> = (0..cols).collect();
            order.sort_by(|a, b| rank(a).partial_cmp(&rank(b)).unwrap()); // stable
            let mut top = order[..k].to_vec();
            top.sort();
            indices.extend(top.iter().map(|&c| c as i64));
            values.extend(top.iter().map(|&c| row[c]));
        }
        (values, indices)
    }

    fn run_top_k<T: Value + Default>(
        m: &[T],
        cols: usize,
        k: usize,
        threads: usize,
    ) -> (Vec<T>, Vec<i64>) {
        let rows = m.len() / cols;
        let (mut values, mut indices) = (vec![T::default(); rows * k], vec![0; rows * k]);
        top_k(m, rows, cols, k, &mut values, &mut indices, threads).unwrap();
        (values, indices)
    }

    fn assert_top_k<T: Value + Default + PartialEq + std::fmt::Debug>(
        m: &[T],
        cols: usize,
        k: usize,
    ) {
        let want = naive_top_k(m, cols, k);
        for threads in [1, 2, 5] {
            let got = run_top_k(m, cols, k, threads);
            assert_eq!(
                got.1, want.1,
                "indices, cols {cols}, k {k}, {threads} threads"
            );
            let bits = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.0), bits(&want.0));
        }
    }

    /// A [rows, cols] matrix of small integers (many ties) with NaN, infinities and both
    /// zeros sprinkled in, an all-equal row 1 and a negative row 2.
    fn tied_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
        ];
        let mut gen = Gen(seed);
        let mut m: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let x = gen.next();
                if x > 0.97 {
                    specials[((x - 0.97) * 200.0) as usize % specials.len()]
                } else {
                    (x * 3.0).round()
                }
            })
            .collect();
        m[cols..2 * cols].fill(1.5);
        for x in &mut m[2 * cols..3 * cols] {
            *x = -1.0 - x.abs();
        }
        m
    }

    #[test]
    fn top_k_matches_a_stable_sort() {
        let mut gen = Gen(11);
        for (rows, cols) in [(9, 203), (7, 64), (6, 65), (4, 1000), (3, 1)] {
            let random: Vec<f32> = (0..rows * cols).map(|_| gen.next()).collect();
            let tied = tied_matrix(rows, cols, cols as u64);
            for m in [random, tied] {
                let m16: Vec<u16> = m.iter().map(|&x| bf16(x)).collect();
                for k in [1, 2, 7, 32, 63, 64, 65, cols - 1, cols] {
                    if (1..=cols).contains(&k) {
                        assert_top_k(&m, cols, k);
                        assert_top_k(&m16, cols, k);
                    }
                }
            }
        }
    }

    #[test]
    fn top_k_of_rows_unlike_the_last() {
        // Each row's floor comes from the one before: far too high, too low, or none.
        let scales = [1.0, 1e-3, 1e3, -1.0, 0.0, 1e30, f32::INFINITY, 1.0];
        let mut gen = Gen(9);
        let (rows, cols) = (3 * scales.len(), 300);
        let m: Vec<f32> = (0..rows * cols)
            .map(|i| gen.next() * scales[i / cols % scales.len()])
            .collect();
        let m16: Vec<u16> = m.iter().map(|&x| bf16(x)).collect();
        for k in [1, 8, 9, 32, 100, 128, 129, 300] {
            assert_top_k(&m, cols, k);
            assert_top_k(&m16, cols, k);
        }
    }

    #[test]
    fn order_keys_sort_like_the_values() {
        let xs = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-44,
            -0.0,
            1e-44,
            1.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            let (a, b) = (order_key(w[0]), order_key(w[1]));
            assert!(a < b || (w[0] == 0.0 && a == b), "{w:?}");
        }
        for x in xs {
            assert_eq!(key_value(order_key(x)), x);
        }
        assert_eq!(order_key(-0.0), order_key(0.0));
        assert_eq!(order_key(-f32::NAN), u32::MAX);
        assert!(order_key(f32::NEG_INFINITY) > 0); // above SEED's key
    }

    #[test]
    fn top_k_ranks_every_bf16_pattern_like_its_float() {
        // Every pattern once, shuffled into rows of 4096, and the NaNs of the lowest rows.
        let mut all: Vec<u16> = (0..=u16::MAX).collect();
        let mut gen = Gen(5);
        for i in (1..all.len()).rev() {
            all.swap(
                i,
                ((gen.next() + 1.0) / 2.0 * (i + 1) as f32) as usize % (i + 1),
            );
        }
        for k in [1, 100, 300, 4000] {
            assert_top_k(&all, 4096, k);
        }
    }

    #[test]
    fn top_k_checks_k_and_shapes() {
        let m = vec![1.0f32; 6];
        let (mut values, mut indices) = (vec![0.0; 4], vec![0; 4]);
        let ok = top_k(&m, 2, 3, 2, &mut values, &mut indices, 2);
        assert!(ok.is_ok() && indices == [0, 1, 0, 1]);
        for k in [0, 4] {
            let err = top_k(&m, 2, 3, k, &mut values, &mut indices, 1).unwrap_err();
            assert!(err.to_string().contains("must lie in 1..=3"), "{err}");
        }
        assert!(top_k(&m, 2, 3, 1, &mut values, &mut indices, 1).is_err());
        assert!(top_k(&m, 3, 3, 2, &mut values, &mut indices, 1).is_err());
        let none: Vec<f32> = vec![];
        assert!(top_k(&none, 0, 3, 2, &mut [], &mut [], 4).is_ok());
    }

    #[test]
    fn portable_kernels_pass_the_same_tests() {
        FORCE_PORTABLE.set(true);
        assert_eq!(Isa::detect(), Isa::Portable);
        positive_entries_match_a_scan_for_every_thread_count();
        positive_entries_keep_nan_and_drop_negative_zero();
        every_bf16_pattern_is_classified_like_its_float();
        sampled_dot_matches_f64_dots();
        top_k_matches_a_stable_sort();
        top_k_of_rows_unlike_the_last();
        top_k_ranks_every_bf16_pattern_like_its_float();
        FORCE_PORTABLE.set(false);
    }

    #[test]
    fn balanced_ranges_cover_everything_in_order() {
        let ptr = [0, 100, 100, 101, 102, 103, 104, 400];
        for parts in 1..10 {
            let ranges = balanced_ranges(&ptr, parts, 1);
            assert!(ranges.len() <= parts && ranges[0].start == 0);
            assert_eq!(ranges.last().unwrap().end, 7);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        }
        assert_eq!(balanced_ranges(&[0], 4, 1), vec![]);
    }
}
