//! The trainer in-process: the frozen base stays bit-identical (LoRA and full), full
//! fine-tuning changes every weight it owns, and the loss goes down.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use lowrank_model::LoadedModel;
use lowrank_train::{Method, TrainConfig, Trainer};

fn tiny() -> LoadedModel {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-llama-hf/model"
    );
    LoadedModel::load(p, &Device::Cpu).unwrap()
}

fn snapshot(lm: &LoadedModel) -> Vec<(String, Vec<u8>)> {
    lm.model
        .weights
        .named()
        .into_iter()
        .map(|(n, t)| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (n, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect()
}

fn data(dir: &std::path::Path) -> PathBuf {
    let mut s = String::new();
    for i in 0..16 {
        s.push_str(&serde_json::json!({"prompt": format!("Repeat after me: {i}"), "completion": format!(" {i} {i} {i}")}).to_string());
        s.push('\n');
    }
    let p = dir.join("d.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn base_is_bit_identical_after_lora_and_full_training() {
    let lm = tiny();
    let before = snapshot(&lm);
    let dir = std::env::temp_dir().join(format!("lowrank-trainer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = data(&dir);
    for (method, init) in [
        (Method::Lora, "default"),
        (Method::Lora, "pissa"),
        (Method::Full, "default"),
    ] {
        let cfg = TrainConfig {
            data: Some(d.clone()),
            eval: Some(d.clone()),
            out: Some(dir.join(format!("{method:?}-{init}"))),
            targets: vec!["all-linear".into()],
            rank: 4,
            init: init.into(),
            method,
            max_steps: Some(6),
            lr: 1e-2,
            ..Default::default()
        };
        let mut t = Trainer::new(&lm, cfg).unwrap();
        let s = t.run(None, &AtomicBool::new(false)).unwrap();
        let (b, a) = (s.eval_loss_before.unwrap(), s.eval_loss_after.unwrap());
        assert!(
            a < b - 0.1,
            "{method:?}/{init}: eval loss {b} → {a} did not go down"
        );
        assert_eq!(
            snapshot(&lm),
            before,
            "{method:?}/{init}: the base weights changed"
        );
        if method == Method::Full {
            assert_eq!(s.trainable_params, lm.model.weights.num_params());
            assert!(dir.join("Full-default/model/model.safetensors").exists());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
