//! Which int8 kernel path runs: chosen once per process from the CPU's features, or forced
//! with `LOWRANK_INT8_KERNEL` (see the module docs of `quant`), and the dispatch to it.

#[cfg(target_arch = "x86_64")]
use super::{avx2, vnni, NR_AVX2, NR_VNNI, NR_VNNI_LIMBS};
use super::{portable::portable, quantize_act_block, quantize_residual, Call, NR_PORTABLE, QK};
#[cfg(target_arch = "x86_64")]
use crate::isa::Isa;

/// The name of the int8 kernel path this process uses: `"avx512vnni"`, `"avx2"` or
/// `"portable"` (decided once, on first use; see the module docs for the override).
pub fn kernel_name() -> &'static str {
    Kernel::detect().name()
}

/// The int8 kernel paths this CPU can run, best first (`"portable"` always, last).
pub fn supported_kernels() -> Vec<&'static str> {
    Kernel::supported_list().iter().map(|k| k.name()).collect()
}

/// Names [`Kernel::choose`] accepts for `LOWRANK_INT8_KERNEL` (on every architecture).
pub(super) const KERNEL_NAMES: [&str; 3] = ["avx512vnni", "avx2", "portable"];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kernel {
    Portable,
    /// AVX2 + FMA: `vpmaddubsw` / `vpmaddwd` (see [`avx2`]).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F + BW + VNNI: `vpdpbusd`.
    #[cfg(target_arch = "x86_64")]
    Vnni512,
}

impl Kernel {
    pub(super) fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512 => "avx512vnni",
        }
    }

    /// The kernel of that name compiled into this build (whether or not the CPU runs it).
    pub(super) fn by_name(name: &str) -> Option<Kernel> {
        match name {
            "portable" => Some(Kernel::Portable),
            #[cfg(target_arch = "x86_64")]
            "avx2" => Some(Kernel::Avx2),
            #[cfg(target_arch = "x86_64")]
            "avx512vnni" => Some(Kernel::Vnni512),
            _ => None,
        }
    }

    /// Whether this CPU runs the kernel (every instruction set its functions enable) and
    /// `LOWRANK_ISA` allows it ([`crate::isa`]).
    pub(super) fn supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                Isa::Avx2.allowed()
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512 => {
                Isa::Avx512.allowed()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
        }
    }

    /// Supported kernels, best (fastest) first; the portable one is always last.
    pub(super) fn supported_list() -> Vec<Kernel> {
        let all = [
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2,
            Kernel::Portable,
        ];
        all.into_iter().filter(|k| k.supported()).collect()
    }

    /// The kernel for this process, decided once: every matmul of a process must use the same
    /// one (bitwise-equal paths notwithstanding, one path keeps timing and debugging simple),
    /// and the environment lookup does not belong on the per-matmul path.
    ///
    /// `LOWRANK_INT8_KERNEL=portable|avx2|avx512vnni` forces a path; an unknown name or a path
    /// the CPU cannot run prints one warning on stderr and the best supported path runs (a
    /// forced path is a testing and timing aid, so a server keeps working on another CPU).
    /// `LOWRANK_PORTABLE_INT8` (set, not empty or `0`) is the older spelling of `portable`.
    pub(super) fn detect() -> Kernel {
        static K: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *K.get_or_init(|| {
            let forced = std::env::var("LOWRANK_INT8_KERNEL").ok();
            let legacy = std::env::var_os("LOWRANK_PORTABLE_INT8")
                .is_some_and(|v| !v.is_empty() && v != "0");
            let (kernel, warning) =
                Kernel::choose(forced.as_deref(), legacy, &Kernel::supported_list());
            if let Some(w) = warning {
                eprintln!("lowrank: warning: {w}");
            }
            kernel
        })
    }

    /// The choice [`Kernel::detect`] makes from the environment's values and the supported
    /// kernels (best first), with the warning to print, if any.
    pub(super) fn choose(
        forced: Option<&str>,
        legacy_portable: bool,
        supported: &[Kernel],
    ) -> (Kernel, Option<String>) {
        let best = supported.first().copied().unwrap_or(Kernel::Portable);
        let forced = forced.map(|v| v.trim().to_ascii_lowercase());
        match forced.as_deref() {
            None | Some("") | Some("auto") => {
                let k = if legacy_portable {
                    Kernel::Portable
                } else {
                    best
                };
                (k, None)
            }
            Some(name) => match Kernel::by_name(name) {
                Some(k) if supported.contains(&k) => (k, None),
                _ if KERNEL_NAMES.contains(&name) => (
                    best,
                    Some(format!(
                        "LOWRANK_INT8_KERNEL={name}: this CPU does not support that int8 \
                         kernel (supported: {}); using {}",
                        supported
                            .iter()
                            .map(|k| k.name())
                            .collect::<Vec<_>>()
                            .join(", "),
                        best.name()
                    )),
                ),
                _ => (
                    best,
                    Some(format!(
                        "LOWRANK_INT8_KERNEL={name}: unknown int8 kernel (expected one of \
                         {}, auto); using {}",
                        KERNEL_NAMES.join(", "),
                        best.name()
                    )),
                ),
            },
        }
    }

    /// Most activation rows one kernel call takes (with `limbs`, an even number: whole limb
    /// pairs).
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] // only VNNI's differs
    pub(super) fn rows_per_call(self, limbs: bool) -> usize {
        match self {
            Kernel::Portable => NR_PORTABLE,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => NR_AVX2,
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512 if limbs => NR_VNNI_LIMBS,
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512 => NR_VNNI,
        }
    }

    /// 16-output tiles one kernel call computes (t, t + 1, …, as far as the matrix has
    /// them).
    pub(super) fn tiles_per_call(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512 => 2,
            _ => 1,
        }
    }

    /// One activation block (a short tail block is zero-padded, which changes neither the
    /// maximum nor the sum): (s, Σa).
    ///
    /// # Safety
    /// The CPU supports this kernel ([`Kernel::supported`]).
    pub(super) unsafe fn quantize_block(self, xb: &[f32], ab: &mut [i8; QK]) -> (f32, i32) {
        #[cfg(target_arch = "x86_64")]
        {
            let mut buf = [0f32; QK];
            let full: &[f32; QK] = match xb.try_into() {
                Ok(full) => full,
                Err(_) => {
                    buf[..xb.len()].copy_from_slice(xb);
                    &buf
                }
            };
            match self {
                Kernel::Portable => {}
                // SAFETY: the caller guarantees the CPU has AVX2 + FMA.
                Kernel::Avx2 => return unsafe { avx2::quantize_block(full, ab) },
                // SAFETY: the caller guarantees the CPU has AVX-512 F/BW/VNNI.
                Kernel::Vnni512 => return unsafe { vnni::quantize_block(full, ab) },
            }
        }
        quantize_act_block(xb, ab)
    }

    /// Both limbs of one activation block ([`Activations::quantize_fine`]): the first as
    /// [`Kernel::quantize_block`], then the residual x − s·a ([`quantize_residual`]);
    /// ((s, Σa₁), (s/256, Σa₂)). A short tail block takes the scalar residual (the rest
    /// of `ab2` is zeroed), a full one the kernel's vector routine, bitwise the same.
    ///
    /// # Safety
    /// The CPU supports this kernel ([`Kernel::supported`]).
    pub(super) unsafe fn quantize_fine_block(
        self,
        xb: &[f32],
        ab: &mut [i8; QK],
        ab2: &mut [i8; QK],
    ) -> [(f32, i32); 2] {
        #[cfg(target_arch = "x86_64")]
        if let Ok(full) = <&[f32; QK]>::try_from(xb) {
            match self {
                Kernel::Portable => {}
                // SAFETY: the caller guarantees the CPU has AVX2 + FMA.
                Kernel::Avx2 => return unsafe { avx2::quantize_fine_block(full, ab, ab2) },
                // SAFETY: the caller guarantees the CPU has AVX-512 F/BW/VNNI.
                Kernel::Vnni512 => return unsafe { vnni::quantize_fine_block(full, ab, ab2) },
            }
        }
        // SAFETY: as this function's.
        let (sc, total) = unsafe { self.quantize_block(xb, ab) };
        let mut cur = [0f32; QK];
        let cur = &mut cur[..xb.len()];
        // x − s·a, a product and then a difference, as the vector routines round it.
        for ((v, &x), &a) in cur.iter_mut().zip(xb).zip(ab.iter()) {
            *v = x - sc * a as f32;
        }
        [(sc, total), quantize_residual(cur, sc, ab2)]
    }

    /// The call `c` ([`Call`]): activation rows r0..r0+nr (nr ≤ [`Kernel::rows_per_call`]) of
    /// tiles t..t + tpc (tpc = [`Kernel::tiles_per_call`], those below `w.tiles`) stored into y
    /// (every one of those cells written, none read: y may be uninitialized): row r0 + r at
    /// `y.row(r)`, or with `limbs` (r0 and nr even; [`Activations::quantize_fine`]'s layout)
    /// the limb pair r0 + 2j, r0 + 2j + 1 at `y.row(j)`. Per block and output, every path
    /// computes the same f32 operations in the same order: with D = Σq·a (one limb) or
    /// D = 256·Σq·a₁ + Σq·a₂ (a pair, exact in i32: |D| ≤ 257·32·255·127 < 2³¹),
    /// acc = fma(D as f32, d·s, acc), then acc = fma(m, s·Σa, acc), with the row's (or the
    /// pair's) s and s·Σa for the block.
    ///
    /// # Safety
    /// The CPU supports this kernel; `y.row(r)` for each output row r points at
    /// min(16·tpc, out − 16t) writable f32 that no other thread touches meanwhile; `x` holds
    /// rows ≥ r0 + nr quantized for `w`'s input dim (by `quantize_fine` with `limbs`);
    /// t < `w.tiles`.
    pub(super) unsafe fn run(self, c: Call<'_>) {
        debug_assert!(c.nr >= 1 && c.nr <= self.rows_per_call(c.limbs));
        debug_assert!(!c.limbs || (c.r0.is_multiple_of(2) && c.nr.is_multiple_of(2)));
        match self {
            Kernel::Portable => portable(c),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::run(c),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni512 => vnni::run(c),
        }
    }
}
