//! PEFT's on-disk LoRA format: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Keys are `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`
//! (PEFT ≥ 0.6 strips the adapter name on save; older files and some tools keep it, as in
//! `.lora_A.default.weight`, which is accepted too). Tensors are in HF row layout.
//!
//! Loading is strict: every key must be understood and every module must fit the base model.
//! An adapter that silently half-loads is worse than one that fails, because the result looks
//! like a working (but wrong) fine-tune.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

use crate::adapter::{Adapter, LoraModule, ModuleKey, Provenance, Target};
use crate::config::{InitLoraWeights, LoraConfig};
use crate::error::{LoraError, Result};
use crate::shapes::BaseShapes;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const PICKLE_FILE: &str = "adapter_model.bin";

/// Safetensors `__metadata__` keys carrying [`Provenance`].
pub const META_FINGERPRINT: &str = "lowrank.base_fingerprint";
pub const META_VERSION: &str = "lowrank.version";
pub const META_CREATED: &str = "lowrank.created";

const KEY_PREFIX: &str = "base_model.model.model.layers.";

/// The largest rank (`r`, `rank_pattern`) accepted: far above any useful LoRA rank (PEFT's
/// own examples stop at a few hundred), so nothing sized by a rank read from a file is absurd.
pub const MAX_RANK: usize = 1 << 16;
/// The `safetensors` crate's limit on the JSON header (it refuses larger ones).
pub const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Which factor a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    A,
    B,
}

/// PEFT tensor key of one factor (the name-less form PEFT writes).
pub fn peft_key(key: &ModuleKey, factor: Factor) -> String {
    let f = match factor {
        Factor::A => "lora_A",
        Factor::B => "lora_B",
    };
    format!("{}.{f}.weight", key.peft_prefix())
}

/// Parse a PEFT tensor key; the error says what is wrong with it.
pub fn parse_peft_key(key: &str) -> std::result::Result<(ModuleKey, Factor), String> {
    let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(|| {
        format!("not a LoRA key of a Llama decoder layer (expected `{KEY_PREFIX}{{i}}.{{self_attn|mlp}}.{{proj}}.lora_A|lora_B.weight`)")
    })?;
    let parts: Vec<&str> = rest.split('.').collect();
    // [layer, parent, proj, lora_X, weight] or [layer, parent, proj, lora_X, adapter_name, weight]
    if !(parts.len() == 5 || parts.len() == 6) || parts[parts.len() - 1] != "weight" {
        return Err(
            "unrecognised key layout (only lora_A / lora_B weights are supported; biases, \
                    magnitude vectors and modules_to_save are not)"
                .into(),
        );
    }
    let layer: usize = parts[0]
        .parse()
        .map_err(|_| format!("layer index `{}` is not a number", parts[0]))?;
    let target = Target::from_peft_name(parts[2])
        .ok_or_else(|| format!("unknown projection `{}`", parts[2]))?;
    if parts[1] != target.parent() {
        return Err(format!(
            "`{}` belongs under `{}`, not `{}`",
            parts[2],
            target.parent(),
            parts[1]
        ));
    }
    let factor = match parts[3] {
        "lora_A" => Factor::A,
        "lora_B" => Factor::B,
        other => {
            return Err(format!(
                "unknown LoRA tensor `{other}` (expected lora_A or lora_B)"
            ))
        }
    };
    Ok((ModuleKey::new(layer, target), factor))
}

fn io_err(path: &Path, msg: impl std::fmt::Display) -> LoraError {
    LoraError::Io {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

fn cfg_err(path: &Path, msg: impl std::fmt::Display) -> LoraError {
    LoraError::Config {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

fn tensor_err(path: &Path, key: &str, msg: impl std::fmt::Display) -> LoraError {
    LoraError::Tensor {
        path: path.to_path_buf(),
        key: key.to_string(),
        msg: msg.to_string(),
    }
}

/// A JSON value that switches a feature on (anything but null / false / empty).
fn is_set(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(false) => false,
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
        serde_json::Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

/// Read and validate `adapter_config.json`.
pub fn read_config(path: &Path) -> Result<LoraConfig> {
    let text = fs::read_to_string(path)
        .map_err(|e| io_err(path, format!("cannot read adapter config: {e}")))?;
    let config: LoraConfig = serde_json::from_str(&text).map_err(|e| cfg_err(path, e))?;
    validate_config(&config).map_err(|m| cfg_err(path, m))?;
    Ok(config)
}

/// The checks a config must pass to be loaded (or saved) by lowrank.
fn validate_config(config: &LoraConfig) -> std::result::Result<(), String> {
    if config.peft_type != "LORA" {
        return Err(format!(
            "peft_type is `{}`, only LORA is supported",
            config.peft_type
        ));
    }
    if config.use_dora {
        return Err("use_dora = true: DoRA adapters are not supported".into());
    }
    if config.fan_in_fan_out {
        return Err(
            "fan_in_fan_out = true (Conv1D/GPT-2 style weights) is not supported for Llama models"
                .into(),
        );
    }
    if config.r == 0 || config.r > MAX_RANK {
        return Err(format!("r = {} is outside 1..={MAX_RANK}", config.r));
    }
    if !config.lora_alpha.is_finite() {
        return Err(format!("lora_alpha {} is not finite", config.lora_alpha));
    }
    for (k, &r) in &config.rank_pattern {
        if r == 0 || r > MAX_RANK {
            return Err(format!(
                "rank_pattern `{k}` = {r} is outside 1..={MAX_RANK}"
            ));
        }
    }
    for (k, a) in &config.alpha_pattern {
        if !a.is_finite() {
            return Err(format!("alpha_pattern `{k}` = {a} is not finite"));
        }
    }
    // Inverted dropout scales kept values by 1/(1 − p): p = 1 is infinite.
    if !(0.0..1.0).contains(&config.lora_dropout) {
        return Err(format!(
            "lora_dropout = {} is outside [0, 1)",
            config.lora_dropout
        ));
    }
    if config.bias != "none" {
        return Err(format!(
            "bias = `{}`: trained biases are not supported (Llama projections have none)",
            config.bias
        ));
    }
    if config
        .modules_to_save
        .as_ref()
        .is_some_and(|m| !m.is_empty())
    {
        return Err(
            "modules_to_save is set: adapters carrying full copies of modules are not supported"
                .into(),
        );
    }
    // PEFT features that change the math; silently ignoring them would give wrong outputs.
    for field in [
        "lora_bias",
        "use_qalora",
        "layer_replication",
        "target_parameters",
        "alora_invocation_tokens",
        "use_bdlora",
    ] {
        if let Some(v) = config.extra.get(field) {
            if is_set(v) {
                return Err(format!("`{field}` = {v} is not supported"));
            }
        }
    }
    config.targets()?;
    Ok(())
}

/// Decode one safetensors view to f32, rejecting other dtypes and non-finite values.
fn decode_f32(view: &TensorView<'_>, path: &Path, key: &str) -> Result<Vec<f32>> {
    let data = view.data();
    let v: Vec<f32> = match view.dtype() {
        StDtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StDtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(tensor_err(
                path,
                key,
                format!("dtype {other:?} not supported (F32, F16 or BF16)"),
            ))
        }
    };
    if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(tensor_err(
            path,
            key,
            format!("non-finite value {x} at flat index {i}"),
        ));
    }
    Ok(v)
}

/// Load a PEFT LoRA adapter directory onto `device` (f32), validated against `shapes`.
pub fn load_peft(dir: &Path, shapes: &BaseShapes, device: &Device) -> Result<Adapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.is_file() {
        return Err(io_err(
            &cfg_path,
            "adapter config not found (is this a PEFT adapter directory?)",
        ));
    }
    let config = read_config(&cfg_path)?;
    let targets = config.targets().map_err(|m| cfg_err(&cfg_path, m))?;

    let st_path = dir.join(WEIGHTS_FILE);
    if !st_path.is_file() {
        let bin = dir.join(PICKLE_FILE);
        if bin.is_file() {
            return Err(io_err(
                &bin,
                format!("only a pickled adapter was found; lowrank reads {WEIGHTS_FILE} only (re-save with safe_serialization=True)"),
            ));
        }
        return Err(io_err(&st_path, "adapter weights not found"));
    }
    check_weights_size(&st_path, &config, &targets, shapes)?;
    let bytes = fs::read(&st_path).map_err(|e| io_err(&st_path, format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        io_err(
            &st_path,
            format!("corrupt or truncated safetensors file: {e}"),
        )
    })?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| io_err(&st_path, format!("corrupt safetensors header: {e}")))?;
    let provenance = provenance_from(meta.metadata());

    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    if names.is_empty() {
        return Err(io_err(&st_path, "contains no tensors"));
    }
    // (key name, tensor, dims) per factor, per module.
    type Part = Option<(String, Vec<f32>, Vec<usize>)>;
    let mut parts: BTreeMap<ModuleKey, (Part, Part)> = BTreeMap::new();
    for name in &names {
        let (mk, factor) = parse_peft_key(name).map_err(|m| tensor_err(&st_path, name, m))?;
        if mk.layer >= shapes.num_layers {
            return Err(tensor_err(
                &st_path,
                name,
                format!(
                    "layer {} but the base model has {} layers",
                    mk.layer, shapes.num_layers
                ),
            ));
        }
        if !targets.contains(&mk.target) {
            return Err(tensor_err(
                &st_path,
                name,
                format!("{} is not in target_modules of {CONFIG_FILE}", mk.target),
            ));
        }
        if !config.applies_to_layer(mk.layer) {
            return Err(tensor_err(
                &st_path,
                name,
                format!(
                    "layer {} is excluded by layers_to_transform in {CONFIG_FILE}",
                    mk.layer
                ),
            ));
        }
        let view = st.tensor(name).map_err(|e| tensor_err(&st_path, name, e))?;
        let dims = view.shape().to_vec();
        if dims.len() != 2 {
            return Err(tensor_err(
                &st_path,
                name,
                format!("expected a 2-D tensor, got shape {dims:?}"),
            ));
        }
        let values = decode_f32(&view, &st_path, name)?;
        let slot = parts.entry(mk).or_insert((None, None));
        let slot = match factor {
            Factor::A => &mut slot.0,
            Factor::B => &mut slot.1,
        };
        if let Some((prev, _, _)) = slot {
            return Err(tensor_err(&st_path, name, format!("duplicate tensor for the same module (also `{prev}`): several adapters in one file?")));
        }
        *slot = Some((name.clone(), values, dims));
    }

    let mut modules = BTreeMap::new();
    for (mk, (a, b)) in parts {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some((n, _, _)), None) => {
                return Err(tensor_err(
                    &st_path,
                    &n,
                    format!("`{}` is missing", peft_key(&mk, Factor::B)),
                ))
            }
            (None, Some((n, _, _))) => {
                return Err(tensor_err(
                    &st_path,
                    &n,
                    format!("`{}` is missing", peft_key(&mk, Factor::A)),
                ))
            }
            (None, None) => unreachable!("entries are created with one factor present"),
        };
        let (out, inp) = shapes.dims_of(mk.target).ok_or_else(|| {
            tensor_err(
                &st_path,
                &a.0,
                format!("the base model has no {} projection", mk.target),
            )
        })?;
        let r = config.rank_for(mk.layer, mk.target);
        // The forward multiplies in f32: a scale beyond f32's range would make every output
        // of this module infinite.
        let scale = config.scale_for(mk.layer, mk.target);
        if !(scale as f32).is_finite() {
            return Err(cfg_err(
                &cfg_path,
                format!(
                    "{}: scale α/r = {scale} is beyond f32's range (lora_alpha {}, r {r})",
                    mk,
                    config.alpha_for(mk.layer, mk.target)
                ),
            ));
        }
        if a.2[1] != inp || b.2[0] != out {
            let (bad, shape) = if a.2[1] != inp {
                (&a.0, &a.2)
            } else {
                (&b.0, &b.2)
            };
            return Err(tensor_err(
                &st_path,
                bad,
                format!("shape {shape:?} does not fit {} of this base model ([{out}, {inp}]): lora_A must be [r, {inp}], lora_B [{out}, r]", mk.target),
            ));
        }
        for (n, got) in [(&a.0, a.2[0]), (&b.0, b.2[1])] {
            if got != r {
                return Err(tensor_err(
                    &st_path,
                    n,
                    format!("tensor rank {got} but {CONFIG_FILE} says r = {r} for this module"),
                ));
            }
        }
        let at = Tensor::from_vec(a.1, (r, inp), device)?;
        let bt = Tensor::from_vec(b.1, (out, r), device)?;
        modules.insert(
            mk,
            LoraModule {
                a: at,
                b: bt,
                scale,
            },
        );
    }
    Ok(Adapter {
        config,
        modules,
        provenance,
    })
}

/// Refuse, before reading it, a weights file larger than any adapter of this config for this
/// base could be (every module the config allows at f32, plus the largest header), and one
/// whose declared header length runs past its end: the file is read whole into memory.
fn check_weights_size(
    st_path: &Path,
    config: &LoraConfig,
    targets: &[Target],
    shapes: &BaseShapes,
) -> Result<()> {
    let len = fs::metadata(st_path)
        .map_err(|e| io_err(st_path, format!("cannot read: {e}")))?
        .len();
    let mut max = 8 + MAX_SAFETENSORS_HEADER;
    for layer in (0..shapes.num_layers).filter(|&l| config.applies_to_layer(l)) {
        for &t in targets {
            if let Some((out, inp)) = shapes.dims_of(t) {
                let r = config.rank_for(layer, t) as u64;
                let bytes = r.saturating_mul((out + inp) as u64).saturating_mul(4);
                max = max.saturating_add(bytes);
            }
        }
    }
    if len > max {
        return Err(io_err(
            st_path,
            format!("{len} bytes, more than an adapter of this config for this base model can hold ({max}); not an adapter for this model?"),
        ));
    }
    let mut head = [0u8; 8];
    if len >= 8 {
        use std::io::Read;
        fs::File::open(st_path)
            .and_then(|mut f| f.read_exact(&mut head))
            .map_err(|e| io_err(st_path, format!("cannot read: {e}")))?;
        let n = u64::from_le_bytes(head);
        if n > len - 8 {
            return Err(io_err(
                st_path,
                format!("corrupt or truncated safetensors file: its header length {n} runs past the end of the file ({len} bytes)"),
            ));
        }
    }
    Ok(())
}

fn provenance_from(meta: &Option<HashMap<String, String>>) -> Provenance {
    let get = |k: &str| meta.as_ref().and_then(|m| m.get(k).cloned());
    Provenance {
        base_fingerprint: get(META_FINGERPRINT),
        lowrank_version: get(META_VERSION),
        created: get(META_CREATED),
    }
}

/// Raw little-endian bytes of a tensor in `dtype` (F32/F16/BF16).
fn tensor_bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let t = t.to_dtype(dtype)?.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match dtype {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => {
            return Err(LoraError::Invalid(format!(
                "cannot save adapters as {other:?} (F32, F16 or BF16)"
            )))
        }
    })
}

/// Serialize the adapter config as PEFT writes it (pretty JSON, sorted extra keys).
pub fn config_json(config: &LoraConfig) -> Result<String> {
    let mut c = config.clone();
    c.peft_type = "LORA".into();
    c.use_dora = false;
    c.fan_in_fan_out = false;
    if c.task_type.is_none() {
        c.task_type = Some("CAUSAL_LM".into());
    }
    let mut s = serde_json::to_string_pretty(&c)
        .map_err(|e| LoraError::Invalid(format!("cannot serialize adapter config: {e}")))?;
    s.push('\n');
    Ok(s)
}

/// Build the safetensors bytes: tensors via the `safetensors` crate, then the `__metadata__`
/// object spliced into the header with sorted keys. (The crate serializes metadata from a
/// `HashMap`, whose order changes from run to run; splicing keeps the bytes deterministic.)
fn safetensors_bytes(
    tensors: &[(String, StDtype, Vec<usize>, Vec<u8>)],
    meta: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| LoraError::Invalid(format!("safetensors: {e}")))?;
    let raw = safetensors::serialize(views, None)
        .map_err(|e| LoraError::Invalid(format!("safetensors: {e}")))?;
    let n = u64::from_le_bytes(raw[..8].try_into().expect("8-byte length prefix")) as usize;
    let header = std::str::from_utf8(&raw[8..8 + n])
        .map_err(|e| LoraError::Invalid(format!("safetensors header: {e}")))?;
    let header = header.trim_end();
    let body = header
        .strip_prefix('{')
        .ok_or_else(|| LoraError::Invalid("safetensors header is not a JSON object".into()))?;
    let meta_json = serde_json::to_string(meta).map_err(|e| LoraError::Invalid(e.to_string()))?;
    let sep = if body.trim() == "}" { "" } else { "," };
    let mut new_header = format!("{{\"__metadata__\":{meta_json}{sep}{body}").into_bytes();
    // safetensors pads the header with spaces to a multiple of 8 so the data stays aligned.
    while new_header.len() % 8 != 0 {
        new_header.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + new_header.len() + raw.len() - 8 - n);
    out.extend_from_slice(&(new_header.len() as u64).to_le_bytes());
    out.extend_from_slice(&new_header);
    out.extend_from_slice(&raw[8 + n..]);
    Ok(out)
}

/// Write `adapter` to `dir` in PEFT format with tensors stored as `dtype` (F32, F16 or BF16).
///
/// The write is atomic: files go into a fresh directory beside `dir`, are fsynced, and the
/// directory is renamed into place; an existing `dir` is replaced as a whole (renamed aside,
/// then removed). On error nothing is left at `dir` (an old `dir` stays as it was).
/// Same adapter → identical bytes: `lowrank.created` is written only if the provenance has it.
pub fn save_peft(adapter: &Adapter, dir: &Path, dtype: DType) -> Result<()> {
    let st_dtype = match dtype {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        other => {
            return Err(LoraError::Invalid(format!(
                "cannot save adapters as {other:?} (F32, F16 or BF16)"
            )))
        }
    };
    let st_path = dir.join(WEIGHTS_FILE);
    let config = &adapter.config;
    validate_config(config).map_err(|m| cfg_err(&dir.join(CONFIG_FILE), m))?;
    if adapter.modules.is_empty() {
        return Err(LoraError::Invalid(format!(
            "{}: adapter has no modules to save",
            dir.display()
        )));
    }
    let targets = config
        .targets()
        .map_err(|m| cfg_err(&dir.join(CONFIG_FILE), m))?;
    let mut tensors = Vec::with_capacity(adapter.modules.len() * 2);
    for (mk, m) in &adapter.modules {
        let ka = peft_key(mk, Factor::A);
        let kb = peft_key(mk, Factor::B);
        // Refuse what load_peft would refuse, so a saved adapter always loads back.
        if !targets.contains(&mk.target) || !config.applies_to_layer(mk.layer) {
            return Err(tensor_err(
                &st_path,
                &ka,
                "module is not covered by the config's target_modules / layers_to_transform",
            ));
        }
        let (r, _) =
            m.a.dims2()
                .map_err(|_| tensor_err(&st_path, &ka, format!("not 2-D: {:?}", m.a.dims())))?;
        let (_, br) =
            m.b.dims2()
                .map_err(|_| tensor_err(&st_path, &kb, format!("not 2-D: {:?}", m.b.dims())))?;
        let want_r = config.rank_for(mk.layer, mk.target);
        if r != want_r || br != want_r {
            return Err(tensor_err(
                &st_path,
                &ka,
                format!("tensor rank {r} (lora_B {br}) but config r = {want_r}"),
            ));
        }
        let want_s = config.scale_for(mk.layer, mk.target);
        if (m.scale - want_s).abs() > 1e-9 * want_s.abs().max(1.0) {
            return Err(tensor_err(&st_path, &ka, format!("module scale {} differs from the config's α/r = {want_s}; the file could not express it", m.scale)));
        }
        for (k, t) in [(ka, &m.a), (kb, &m.b)] {
            let bytes = tensor_bytes(t, dtype)?;
            let finite = match dtype {
                DType::F32 => bytes
                    .chunks_exact(4)
                    .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
                DType::F16 => bytes
                    .chunks_exact(2)
                    .all(|c| half::f16::from_le_bytes([c[0], c[1]]).is_finite()),
                _ => bytes
                    .chunks_exact(2)
                    .all(|c| half::bf16::from_le_bytes([c[0], c[1]]).is_finite()),
            };
            if !finite {
                return Err(tensor_err(
                    &st_path,
                    &k,
                    format!("non-finite values (in {dtype:?})"),
                ));
            }
            tensors.push((k, st_dtype, t.dims().to_vec(), bytes));
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let p = &adapter.provenance;
    if let Some(f) = &p.base_fingerprint {
        meta.insert(META_FINGERPRINT.to_string(), f.clone());
    }
    meta.insert(
        META_VERSION.to_string(),
        p.lowrank_version
            .clone()
            .unwrap_or_else(|| crate::VERSION.to_string()),
    );
    if let Some(c) = &p.created {
        meta.insert(META_CREATED.to_string(), c.clone());
    }
    let st_bytes = safetensors_bytes(&tensors, &meta)?;
    let cfg = config_json(config)?;
    write_dir_atomically(
        dir,
        &[(CONFIG_FILE, cfg.as_bytes()), (WEIGHTS_FILE, &st_bytes)],
    )
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Best-effort directory fsync (makes the renames durable on Linux; a no-op error elsewhere).
fn sync_dir(path: &Path) {
    if let Ok(f) = fs::File::open(path) {
        let _ = f.sync_all();
    }
}

/// Replace `path` with `bytes` atomically: a hidden sibling is written and flushed to disk,
/// then renamed over it, so a crash leaves either the old file or the new one.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    sync_dir(dir);
    Ok(())
}

/// Create `dir` containing exactly `files`, atomically (see [`save_peft`]).
pub fn write_dir_atomically(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let name = dir
        .file_name()
        .ok_or_else(|| io_err(dir, "output path has no directory name"))?
        .to_string_lossy()
        .into_owned();
    let parent: PathBuf = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent)
        .map_err(|e| io_err(&parent, format!("cannot create parent directory: {e}")))?;
    if let Ok(md) = fs::symlink_metadata(dir) {
        if !md.is_dir() {
            return Err(io_err(
                dir,
                "exists and is not a directory; refusing to replace it",
            ));
        }
    }
    let suffix = unique_suffix();
    let tmp = parent.join(format!(".{name}.tmp-{suffix}"));
    fs::create_dir(&tmp)
        .map_err(|e| io_err(&tmp, format!("cannot create temporary directory: {e}")))?;
    let write_all = || -> Result<()> {
        for (fname, bytes) in files {
            let p = tmp.join(fname);
            let mut f = fs::File::create(&p).map_err(|e| io_err(&p, e))?;
            f.write_all(bytes).map_err(|e| io_err(&p, e))?;
            f.sync_all().map_err(|e| io_err(&p, e))?;
        }
        sync_dir(&tmp);
        Ok(())
    };
    if let Err(e) = write_all() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{suffix}"));
        if let Err(e) = fs::rename(dir, &old) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(io_err(
                dir,
                format!("cannot move the existing directory aside: {e}"),
            ));
        }
        if let Err(e) = fs::rename(&tmp, dir) {
            // Put the old directory back so the user loses nothing.
            let _ = fs::rename(&old, dir);
            let _ = fs::remove_dir_all(&tmp);
            return Err(io_err(
                dir,
                format!("cannot move the new adapter into place: {e}"),
            ));
        }
        // The new adapter is in place; a leftover hidden `.old-` directory is only clutter.
        let _ = fs::remove_dir_all(&old);
    } else if let Err(e) = fs::rename(&tmp, dir) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(io_err(
            dir,
            format!("cannot move the new adapter into place: {e}"),
        ));
    }
    sync_dir(&parent);
    Ok(())
}

/// The `init_lora_weights` value as PEFT spells it (for messages).
pub fn init_name(i: &InitLoraWeights) -> String {
    match i {
        InitLoraWeights::Bool(b) => b.to_string(),
        InitLoraWeights::Named(s) => s.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/smollm2-135m/peft_adapter"
    );

    /// The PEFT fixture adapter (tests/fixtures, in the repository): a missing fixture fails.
    fn fixture() -> PathBuf {
        let p = PathBuf::from(FIXTURE);
        assert!(
            p.join(WEIGHTS_FILE).is_file(),
            "fixture {FIXTURE} not found (tests/fixtures is part of the repository)"
        );
        p
    }

    /// A fresh, unique temp directory (removed by the guard).
    struct TmpDir(PathBuf);
    impl TmpDir {
        fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("lowrank-lora-test-{tag}-{}", unique_suffix()));
            fs::create_dir_all(&p).unwrap();
            TmpDir(p)
        }
    }
    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tiny_shapes() -> BaseShapes {
        BaseShapes::llama(2, 16, 8, 24)
    }

    fn tiny_adapter(dev: &Device) -> Adapter {
        let shapes = tiny_shapes();
        let config = LoraConfig::new(4, 8.0, &[Target::Q, Target::V, Target::Down]);
        let mut modules = BTreeMap::new();
        for layer in 0..2 {
            for t in [Target::Q, Target::V, Target::Down] {
                let (o, i) = shapes.dims_of(t).unwrap();
                modules.insert(
                    ModuleKey::new(layer, t),
                    LoraModule {
                        a: Tensor::randn(0f32, 1., (4, i), dev).unwrap(),
                        b: Tensor::randn(0f32, 1., (o, 4), dev).unwrap(),
                        scale: 2.0,
                    },
                );
            }
        }
        Adapter {
            config,
            modules,
            provenance: Provenance {
                base_fingerprint: Some("sha256s:abc".into()),
                lowrank_version: None,
                created: None,
            },
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn err_string<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected an error").to_string()
    }

    #[test]
    fn fixture_loads() {
        let dir = fixture();
        let a = load_peft(&dir, &BaseShapes::smollm2_135m(), &Device::Cpu).unwrap();
        assert_eq!(a.modules.len(), 210);
        assert_eq!(a.modules.len() * 2, 420);
        assert!(a.modules.values().all(|m| m.scale == 2.0 && m.rank() == 2));
        assert_eq!(a.config.r, 2);
        assert_eq!(a.config.lora_alpha, 4.0);
        let q = a.get(&ModuleKey::new(0, Target::Q)).unwrap();
        assert_eq!(q.a.dims(), &[2, 576]);
        assert_eq!(
            a.get(&ModuleKey::new(29, Target::Down)).unwrap().b.dims(),
            &[576, 2]
        );
        assert_eq!(
            a.get(&ModuleKey::new(3, Target::K)).unwrap().b.dims(),
            &[192, 2]
        );
        // r=2 × 7 projections × 30 layers.
        let per_layer = 2 * ((576 + 576) * 2 + (192 + 576) * 2 + (1536 + 576) * 3);
        assert_eq!(a.num_params(), per_layer * 30);
        // Wrong base (too few layers) is rejected, naming a key.
        let e = err_string(load_peft(
            &dir,
            &BaseShapes::llama(20, 576, 192, 1536),
            &Device::Cpu,
        ));
        assert!(e.contains("layers.2") && e.contains("20 layers"), "{e}");
    }

    #[test]
    fn fixture_roundtrip_bit_identical() {
        let dir = fixture();
        let dev = Device::Cpu;
        let a = load_peft(&dir, &BaseShapes::smollm2_135m(), &dev).unwrap();
        let tmp = TmpDir::new("rt");
        let out = tmp.0.join("adapter");
        // The fixture is stored in f16 (as fp16 trainings write it): saved back in its dtype,
        // same keys, shapes and bytes as PEFT's file.
        save_peft(&a, &out, DType::F16).unwrap();
        let orig = fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let ours = fs::read(out.join(WEIGHTS_FILE)).unwrap();
        let so = SafeTensors::deserialize(&orig).unwrap();
        let sn = SafeTensors::deserialize(&ours).unwrap();
        let mut ko: Vec<_> = so.names().into_iter().map(String::from).collect();
        let mut kn: Vec<_> = sn.names().into_iter().map(String::from).collect();
        ko.sort();
        kn.sort();
        assert_eq!(ko.len(), 420);
        assert_eq!(ko, kn);
        for k in &ko {
            let (x, y) = (so.tensor(k).unwrap(), sn.tensor(k).unwrap());
            assert_eq!(x.shape(), y.shape(), "{k}");
            assert_eq!(x.dtype(), y.dtype(), "{k}");
            assert_eq!(x.data(), y.data(), "{k}");
        }
        let (_, meta) = SafeTensors::read_metadata(&ours).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
        assert_eq!(
            meta.get(META_VERSION).map(String::as_str),
            Some(crate::VERSION)
        );
        // Load back: bit-identical tensors and the same config semantics.
        let b = load_peft(&out, &BaseShapes::smollm2_135m(), &dev).unwrap();
        assert_eq!(b.modules.len(), 210);
        for (k, m) in &a.modules {
            let n = &b.modules[k];
            assert_eq!(m.a.to_vec2::<f32>().unwrap(), n.a.to_vec2::<f32>().unwrap());
            assert_eq!(m.b.to_vec2::<f32>().unwrap(), n.b.to_vec2::<f32>().unwrap());
            assert_eq!(m.scale, n.scale);
        }
        assert_eq!(b.config.targets().unwrap(), a.config.targets().unwrap());
        // Deterministic bytes: saving again gives the identical file.
        let out2 = tmp.0.join("adapter2");
        save_peft(&b, &out2, DType::F16).unwrap();
        assert_eq!(ours, fs::read(out2.join(WEIGHTS_FILE)).unwrap());
        assert_eq!(
            fs::read(out.join(CONFIG_FILE)).unwrap(),
            fs::read(out2.join(CONFIG_FILE)).unwrap()
        );
    }

    #[test]
    fn saved_config_has_peft_fields() {
        let dev = Device::Cpu;
        let tmp = TmpDir::new("cfg");
        let out = tmp.0.join("a");
        save_peft(&tiny_adapter(&dev), &out, DType::F32).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(out.join(CONFIG_FILE)).unwrap()).unwrap();
        for f in [
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "layers_to_transform",
            "rank_pattern",
            "alpha_pattern",
            "use_rslora",
            "use_dora",
            "bias",
            "init_lora_weights",
            "fan_in_fan_out",
            "modules_to_save",
            "inference_mode",
            "base_model_name_or_path",
        ] {
            assert!(v.get(f).is_some(), "missing {f}");
        }
        assert_eq!(v["peft_type"], "LORA");
        assert_eq!(v["task_type"], "CAUSAL_LM");
        assert_eq!(v["use_dora"], false);
        assert_eq!(v["fan_in_fan_out"], false);
        assert!(v["modules_to_save"].is_null());
        assert!(v["target_modules"].is_array());
        let st = fs::read(out.join(WEIGHTS_FILE)).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&st).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(
            meta.get(META_FINGERPRINT).map(String::as_str),
            Some("sha256s:abc")
        );
        let back = load_peft(&out, &tiny_shapes(), &dev).unwrap();
        assert_eq!(
            back.provenance.base_fingerprint.as_deref(),
            Some("sha256s:abc")
        );
        // No temp or old directories left beside the target.
        let leftovers: Vec<_> = fs::read_dir(&tmp.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn half_precision_roundtrip() {
        let dev = Device::Cpu;
        let a = tiny_adapter(&dev);
        let tmp = TmpDir::new("half");
        for dt in [DType::F16, DType::BF16] {
            let out = tmp.0.join(format!("{dt:?}"));
            save_peft(&a, &out, dt).unwrap();
            let st = fs::read(out.join(WEIGHTS_FILE)).unwrap();
            let s = SafeTensors::deserialize(&st).unwrap();
            let want = if dt == DType::F16 {
                StDtype::F16
            } else {
                StDtype::BF16
            };
            assert!(s.tensors().iter().all(|(_, v)| v.dtype() == want));
            let b = load_peft(&out, &tiny_shapes(), &dev).unwrap();
            for (k, m) in &a.modules {
                let n = &b.modules[k];
                assert_eq!(n.a.dtype(), DType::F32);
                // bf16 keeps 8 bits of mantissa: relative error ≤ 2^-8 of values ~N(0,1) up to ~4.
                assert!(max_diff(&m.a, &n.a) < 0.02, "{dt:?}");
                assert!(max_diff(&m.b, &n.b) < 0.02, "{dt:?}");
            }
        }
        assert!(save_peft(&a, &tmp.0.join("x"), DType::U8).is_err());
    }

    /// Save a tiny adapter, then let `mutate` corrupt the directory; returns the load error.
    fn broken(tag: &str, mutate: impl FnOnce(&Path)) -> String {
        let dev = Device::Cpu;
        let tmp = TmpDir::new(tag);
        let out = tmp.0.join("a");
        save_peft(&tiny_adapter(&dev), &out, DType::F32).unwrap();
        mutate(&out);
        err_string(load_peft(&out, &tiny_shapes(), &dev))
    }

    fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
        let p = dir.join(CONFIG_FILE);
        let mut v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    }

    /// Rewrite the safetensors file with `f` applied to the (name, dtype, shape, f32 values) list.
    fn edit_tensors(dir: &Path, f: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
        let p = dir.join(WEIGHTS_FILE);
        let bytes = fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut ts: Vec<(String, Vec<usize>, Vec<f32>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    v.shape().to_vec(),
                    decode_f32(&v, &p, &n).unwrap(),
                )
            })
            .collect();
        f(&mut ts);
        let raw: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = ts
            .into_iter()
            .map(|(n, s, v)| {
                (
                    n,
                    StDtype::F32,
                    s,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            })
            .collect();
        fs::write(&p, safetensors_bytes(&raw, &BTreeMap::new()).unwrap()).unwrap();
    }

    const QKEY: &str = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";

    #[test]
    fn missing_config() {
        let e = broken("nocfg", |d| fs::remove_file(d.join(CONFIG_FILE)).unwrap());
        assert!(e.contains(CONFIG_FILE) && e.contains("not found"), "{e}");
    }

    #[test]
    fn missing_weights_and_pickle_only() {
        let e = broken("nost", |d| fs::remove_file(d.join(WEIGHTS_FILE)).unwrap());
        assert!(e.contains(WEIGHTS_FILE), "{e}");
        let e = broken("bin", |d| {
            fs::rename(d.join(WEIGHTS_FILE), d.join(PICKLE_FILE)).unwrap();
        });
        assert!(
            e.contains(PICKLE_FILE) && e.contains("safe_serialization"),
            "{e}"
        );
    }

    #[test]
    fn unknown_target_module() {
        let e = broken("tgt", |d| {
            edit_config(d, |v| {
                v["target_modules"] =
                    serde_json::json!(["q_proj", "v_proj", "down_proj", "lm_head"])
            })
        });
        assert!(e.contains(CONFIG_FILE) && e.contains("lm_head"), "{e}");
    }

    #[test]
    fn config_feature_flags_rejected() {
        let e = broken("dora", |d| edit_config(d, |v| v["use_dora"] = true.into()));
        assert!(e.contains(CONFIG_FILE) && e.contains("DoRA"), "{e}");
        let e = broken("fifo", |d| {
            edit_config(d, |v| v["fan_in_fan_out"] = true.into())
        });
        assert!(e.contains("fan_in_fan_out"), "{e}");
        let e = broken("ptype", |d| {
            edit_config(d, |v| v["peft_type"] = "IA3".into())
        });
        assert!(e.contains("IA3"), "{e}");
        let e = broken("lbias", |d| {
            edit_config(d, |v| v["lora_bias"] = true.into())
        });
        assert!(e.contains("lora_bias"), "{e}");
        let e = broken("json", |d| {
            fs::write(d.join(CONFIG_FILE), "{ not json").unwrap()
        });
        assert!(e.contains(CONFIG_FILE), "{e}");
    }

    #[test]
    fn key_not_targeted_by_config() {
        let e = broken("nottgt", |d| {
            edit_config(d, |v| {
                v["target_modules"] = serde_json::json!(["v_proj", "down_proj"])
            })
        });
        assert!(
            e.contains(WEIGHTS_FILE) && e.contains("q_proj") && e.contains("target_modules"),
            "{e}"
        );
    }

    #[test]
    fn shape_mismatch() {
        let e = broken("shape", |d| {
            edit_tensors(d, |ts| {
                let t = ts.iter_mut().find(|t| t.0 == QKEY).unwrap();
                t.1 = vec![4, 8];
                t.2.truncate(32);
            })
        });
        assert!(
            e.contains(WEIGHTS_FILE) && e.contains(QKEY) && e.contains("[4, 8]"),
            "{e}"
        );
    }

    #[test]
    fn rank_mismatch() {
        let e = broken("rank", |d| edit_config(d, |v| v["r"] = 6.into()));
        assert!(
            e.contains(WEIGHTS_FILE)
                && e.contains("layers.0.self_attn.q_proj.lora_A")
                && e.contains("rank 4")
                && e.contains("r = 6"),
            "{e}"
        );
        // rank_pattern for one module.
        let e = broken("rankpat", |d| {
            edit_config(d, |v| v["rank_pattern"] = serde_json::json!({"q_proj": 2}))
        });
        assert!(e.contains("q_proj.lora_A") && e.contains("r = 2"), "{e}");
    }

    #[test]
    fn nan_and_inf() {
        let e = broken("nan", |d| {
            edit_tensors(d, |ts| {
                ts.iter_mut().find(|t| t.0 == QKEY).unwrap().2[5] = f32::NAN;
            })
        });
        assert!(
            e.contains(WEIGHTS_FILE) && e.contains(QKEY) && e.contains("NaN"),
            "{e}"
        );
        let key_b = QKEY.replace("lora_A", "lora_B");
        let e = broken("inf", |d| {
            edit_tensors(d, |ts| {
                ts.iter_mut().find(|t| t.0 == key_b).unwrap().2[0] = f32::INFINITY;
            })
        });
        assert!(e.contains(&key_b) && e.contains("inf"), "{e}");
    }

    #[test]
    fn unknown_and_missing_keys() {
        let e = broken("unk", |d| {
            edit_tensors(d, |ts| {
                ts.push((
                    "base_model.model.lm_head.lora_A.weight".into(),
                    vec![4, 16],
                    vec![0.0; 64],
                ))
            })
        });
        assert!(e.contains("base_model.model.lm_head.lora_A.weight"), "{e}");
        let e = broken("magn", |d| {
            edit_tensors(d, |ts| {
                ts.push((
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
                    vec![16, 1],
                    vec![0.0; 16],
                ))
            })
        });
        assert!(e.contains("lora_magnitude_vector"), "{e}");
        let e = broken("missb", |d| {
            let kb = QKEY.replace("lora_A", "lora_B");
            edit_tensors(d, |ts| ts.retain(|t| t.0 != kb))
        });
        assert!(
            e.contains(QKEY) && e.contains("lora_B.weight` is missing"),
            "{e}"
        );
        let e = broken("layer", |d| {
            edit_tensors(d, |ts| {
                for t in ts.iter_mut() {
                    t.0 = t.0.replace("layers.1.", "layers.7.");
                }
            })
        });
        assert!(e.contains("layers.7") && e.contains("2 layers"), "{e}");
    }

    #[test]
    fn adapter_name_segment_accepted() {
        let dev = Device::Cpu;
        let tmp = TmpDir::new("named");
        let out = tmp.0.join("a");
        let orig = tiny_adapter(&dev);
        save_peft(&orig, &out, DType::F32).unwrap();
        edit_tensors(&out, |ts| {
            for t in ts.iter_mut() {
                t.0 =
                    t.0.replace(".lora_A.weight", ".lora_A.default.weight")
                        .replace(".lora_B.weight", ".lora_B.default.weight");
            }
        });
        let a = load_peft(&out, &tiny_shapes(), &dev).unwrap();
        assert_eq!(a.modules.len(), 6);
        for (k, m) in &orig.modules {
            assert_eq!(max_diff(&m.a, &a.modules[k].a), 0.0);
        }
        // Two adapter names for the same module is ambiguous.
        edit_tensors(&out, |ts| {
            let extra: Vec<_> = ts
                .iter()
                .filter(|t| t.0.contains(".lora_A.default."))
                .map(|t| {
                    (
                        t.0.replace(".default.", ".other."),
                        t.1.clone(),
                        t.2.clone(),
                    )
                })
                .collect();
            ts.extend(extra);
        });
        let e = err_string(load_peft(&out, &tiny_shapes(), &dev));
        assert!(e.contains("duplicate"), "{e}");
    }

    #[test]
    fn truncated_file() {
        let e = broken("trunc", |d| {
            let p = d.join(WEIGHTS_FILE);
            let b = fs::read(&p).unwrap();
            fs::write(&p, &b[..b.len() - 10]).unwrap();
        });
        assert!(e.contains(WEIGHTS_FILE) && e.contains("truncated"), "{e}");
        let e = broken("trunchdr", |d| {
            fs::write(d.join(WEIGHTS_FILE), [1u8, 2, 3]).unwrap()
        });
        assert!(e.contains(WEIGHTS_FILE), "{e}");
        // Also on the real fixture file.
        let fx = fixture();
        let tmp = TmpDir::new("fxtrunc");
        fs::copy(fx.join(CONFIG_FILE), tmp.0.join(CONFIG_FILE)).unwrap();
        let b = fs::read(fx.join(WEIGHTS_FILE)).unwrap();
        fs::write(tmp.0.join(WEIGHTS_FILE), &b[..b.len() / 2]).unwrap();
        let e = err_string(load_peft(&tmp.0, &BaseShapes::smollm2_135m(), &Device::Cpu));
        assert!(e.contains(WEIGHTS_FILE) && e.contains("truncated"), "{e}");
    }

    #[test]
    fn save_is_atomic_and_replaces() {
        let dev = Device::Cpu;
        let tmp = TmpDir::new("atomic");
        let out = tmp.0.join("a");
        let good = tiny_adapter(&dev);
        save_peft(&good, &out, DType::F32).unwrap();
        fs::write(out.join("stale.txt"), "old").unwrap();
        let before = fs::read(out.join(WEIGHTS_FILE)).unwrap();
        // A failing save (NaN) leaves the old directory untouched and no temp dirs behind.
        let mut bad = good.clone();
        let m = bad.modules.get_mut(&ModuleKey::new(1, Target::V)).unwrap();
        m.b = m.b.affine(f64::NAN, 0.0).unwrap();
        let e = err_string(save_peft(&bad, &out, DType::F32));
        assert!(
            e.contains("layers.1.self_attn.v_proj.lora_B.weight") && e.contains("non-finite"),
            "{e}"
        );
        assert_eq!(fs::read(out.join(WEIGHTS_FILE)).unwrap(), before);
        assert!(out.join("stale.txt").exists());
        // A failing save to a new path leaves nothing there.
        let fresh = tmp.0.join("fresh");
        assert!(save_peft(&bad, &fresh, DType::F32).is_err());
        assert!(!fresh.exists());
        // Scale the config cannot express.
        let mut odd = good.clone();
        odd.modules.values_mut().next().unwrap().scale = 3.0;
        assert!(err_string(save_peft(&odd, &fresh, DType::F32)).contains("scale"));
        assert!(!fresh.exists());
        // Successful save replaces the whole directory.
        let mut good2 = good.clone();
        good2.config.base_model_name_or_path = Some("x".into());
        save_peft(&good2, &out, DType::F32).unwrap();
        assert!(!out.join("stale.txt").exists());
        let names: Vec<_> = fs::read_dir(&tmp.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["a".to_string()], "leftovers: {names:?}");
        // A regular file in the way is not replaced.
        let file = tmp.0.join("file");
        fs::write(&file, "x").unwrap();
        assert!(err_string(save_peft(&good, &file, DType::F32)).contains("not a directory"));
        assert_eq!(fs::read_to_string(&file).unwrap(), "x");
    }

    #[test]
    fn key_parsing() {
        let (k, f) =
            parse_peft_key("base_model.model.model.layers.12.mlp.gate_proj.lora_B.weight").unwrap();
        assert_eq!((k, f), (ModuleKey::new(12, Target::Gate), Factor::B));
        assert_eq!(
            peft_key(&k, Factor::B),
            "base_model.model.model.layers.12.mlp.gate_proj.lora_B.weight"
        );
        assert!(
            parse_peft_key("base_model.model.model.layers.1.mlp.q_proj.lora_A.weight").is_err()
        );
        assert!(
            parse_peft_key("base_model.model.model.layers.x.mlp.up_proj.lora_A.weight").is_err()
        );
        assert!(
            parse_peft_key("base_model.model.model.layers.1.mlp.up_proj.lora_C.weight").is_err()
        );
        assert!(parse_peft_key("base_model.model.model.layers.1.mlp.up_proj.lora_A.bias").is_err());
    }
}
