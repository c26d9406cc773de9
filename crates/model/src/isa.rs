//! The widest instruction set this process's kernels may use: `LOWRANK_ISA`.
//!
//! Every kernel family picks its path from the CPU's features (the int8 products, the f32
//! gemm, the attention rows, the bf16 dX and casts). `LOWRANK_ISA=avx2` makes all of them
//! choose as on a CPU without AVX-512, and `LOWRANK_ISA=portable` as on one without AVX2,
//! so one variable runs a wider machine's tests and benchmarks on the paths an AVX2-only or
//! a scalar CPU takes (a path above the cap counts as unsupported, like one the CPU lacks).
//! The per-family variables (`LOWRANK_INT8_KERNEL`, `LOWRANK_F32_GEMM`,
//! `LOWRANK_ATTN_KERNEL`, `LOWRANK_TRAIN_DX`) then choose among what is left. Unset, empty
//! or `auto`: no cap. An unknown name prints one warning on stderr and sets no cap.

/// An instruction-set level, ordered: each one's kernels may also use the levels below.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust (whatever the compiler makes of it for the build's target).
    Portable,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 (F, BW, VNNI, BF16 where each kernel needs them).
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// This process's cap, read once from `LOWRANK_ISA`.
    pub fn cap() -> Isa {
        static CAP: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *CAP.get_or_init(|| {
            let (cap, warning) = Isa::parse(std::env::var("LOWRANK_ISA").ok().as_deref());
            if let Some(w) = warning {
                eprintln!("lowrank: warning: {w}");
            }
            cap
        })
    }

    /// Whether kernels of this level may run in this process (the cap allows it; the CPU's
    /// own features are each kernel's to check).
    pub fn allowed(self) -> bool {
        self <= Isa::cap()
    }

    /// The cap a value of `LOWRANK_ISA` sets, with the warning to print, if any.
    fn parse(value: Option<&str>) -> (Isa, Option<String>) {
        let v = value.map(|v| v.trim().to_ascii_lowercase());
        match v.as_deref() {
            None | Some("") | Some("auto") | Some("avx512") => (Isa::Avx512, None),
            Some("avx2") => (Isa::Avx2, None),
            Some("portable") => (Isa::Portable, None),
            Some(_) => (
                Isa::Avx512,
                Some(format!(
                    "LOWRANK_ISA={}: unknown (expected avx512, avx2, portable or auto); no cap",
                    value.unwrap_or_default()
                )),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Isa;

    /// Every family's path in this process, one `family=name` a word.
    fn paths() -> String {
        format!(
            "int8={} f32_gemm={} train_dx={} attention={} to_bf16={}",
            crate::quant::kernel_name(),
            crate::ops::gemm::GemmKernel::detect().name(),
            crate::quant::DxProduct::detect().name(),
            crate::ops::AttnKernel::detect().name(),
            crate::ops::to_bf16_path_name()
        )
    }

    /// Run by [`every_family_obeys_the_cap`] in a child process (the paths are chosen once
    /// a process): prints this process's paths.
    #[test]
    #[ignore = "a child of every_family_obeys_the_cap"]
    fn print_paths_child() {
        println!("PATHS {} CAP {}", paths(), Isa::cap().name());
    }

    /// The paths a child process takes with these variables set (every other `LOWRANK_`
    /// kernel variable removed), and its stderr.
    fn child(vars: &[(&str, &str)]) -> (String, String) {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "isa::tests::print_paths_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ]);
        for var in [
            "LOWRANK_ISA",
            "LOWRANK_INT8_KERNEL",
            "LOWRANK_PORTABLE_INT8",
            "LOWRANK_F32_GEMM",
            "LOWRANK_TRAIN_DX",
            "LOWRANK_ATTN_KERNEL",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(vars.iter().copied());
        let out = cmd.output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        );
        assert!(out.status.success(), "{vars:?}: {stdout}{stderr}");
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("PATHS "))
            .unwrap_or_else(|| panic!("{vars:?}: the child printed no paths:\n{stdout}{stderr}"));
        (line.to_string(), stderr)
    }

    /// `LOWRANK_ISA=avx2` puts every kernel family on its AVX2 path (on a CPU that has one,
    /// else the portable one), `portable` on the portable path, whatever wider paths the
    /// CPU has; a family's own variable cannot go above the cap.
    #[test]
    fn every_family_obeys_the_cap() {
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        let want_avx2 = match avx2 {
            true => "int8=avx2 f32_gemm=avx2 train_dx=f32 attention=avx2 to_bf16=avx2 CAP avx2",
            false => {
                "int8=portable f32_gemm=candle train_dx=f32 attention=portable to_bf16=scalar CAP avx2"
            }
        };
        let want_portable =
            "int8=portable f32_gemm=candle train_dx=f32 attention=portable to_bf16=scalar CAP portable";
        assert_eq!(child(&[("LOWRANK_ISA", "avx2")]).0, want_avx2);
        assert_eq!(child(&[("LOWRANK_ISA", " AVX2 ")]).0, want_avx2);
        assert_eq!(child(&[("LOWRANK_ISA", "portable")]).0, want_portable);
        // A family's own variable chooses below the cap, not above it.
        let (got, stderr) = child(&[
            ("LOWRANK_ISA", "portable"),
            ("LOWRANK_F32_GEMM", "avx2"),
            ("LOWRANK_INT8_KERNEL", "avx2"),
        ]);
        assert_eq!(got, want_portable);
        if avx2 {
            assert!(
                stderr.contains("LOWRANK_F32_GEMM=avx2: this CPU cannot run it"),
                "{stderr}"
            );
            assert!(
                stderr.contains("LOWRANK_INT8_KERNEL=avx2: this CPU does not support"),
                "{stderr}"
            );
        }
        let (got, _) = child(&[("LOWRANK_ISA", "avx2"), ("LOWRANK_F32_GEMM", "candle")]);
        assert!(got.contains(" f32_gemm=candle "), "{got}");
        // No cap: each family's widest path, as in this (uncapped) process's own choice.
        let (got, stderr) = child(&[("LOWRANK_ISA", "sse9")]);
        assert!(stderr.contains("LOWRANK_ISA=sse9: unknown"), "{stderr}");
        assert!(got.ends_with("CAP avx512"), "{got}");
        assert_eq!(got, child(&[]).0);
        if Isa::cap() == Isa::Avx512 {
            let int8_best = crate::quant::supported_kernels()[0];
            assert!(got.starts_with(&format!("int8={int8_best} ")), "{got}");
        }
    }

    #[test]
    fn names_order_and_unknown_values() {
        assert!(Isa::Portable < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        assert_eq!(Isa::parse(None), (Isa::Avx512, None));
        assert_eq!(Isa::parse(Some(" Auto ")), (Isa::Avx512, None));
        assert_eq!(Isa::parse(Some("AVX2")), (Isa::Avx2, None));
        assert_eq!(Isa::parse(Some("portable")), (Isa::Portable, None));
        for level in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
            assert_eq!(Isa::parse(Some(level.name())).0, level);
        }
        let (cap, w) = Isa::parse(Some("sse9"));
        assert_eq!(cap, Isa::Avx512);
        assert!(w.unwrap().contains("LOWRANK_ISA=sse9: unknown"));
    }
}
