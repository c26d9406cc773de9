"""Write a randomly initialised HF Llama of a given shape, for speed and memory benchmarks
(model hubs are out of reach; the weights' values do not matter for timing).

Usage: python bench/make_random_llama.py OUT_DIR [--gguf DEFAULT_MODEL.gguf] [--hidden 2048
       --layers 22 --heads 32 --kv-heads 4 --intermediate 5632 --dtype bfloat16 --seed 0]

The defaults are TinyLlama-1.1B's shape. The vocabulary and tokenizer are the default model's
(SmolLM2-135M-Instruct, read from its GGUF with transformers), so the same data and chat
template work on both. Needs torch and transformers (>= 4.45 for GGUF tokenizers)."""
import argparse, json, os, sys, time

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--gguf", default=os.path.expanduser("~/.cache/lowrank/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
                help="GGUF whose tokenizer (and vocabulary size) the model gets")
ap.add_argument("--hidden", type=int, default=2048)
ap.add_argument("--layers", type=int, default=22)
ap.add_argument("--heads", type=int, default=32)
ap.add_argument("--kv-heads", type=int, default=4)
ap.add_argument("--intermediate", type=int, default=5632)
ap.add_argument("--max-positions", type=int, default=2048)
ap.add_argument("--tie", action="store_true", help="tie the LM head to the embedding")
ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

if a.hidden % a.heads or a.heads % a.kv_heads:
    sys.exit(f"error: hidden {a.hidden} must divide by heads {a.heads}, and heads by kv-heads {a.kv_heads}")
if not os.path.isfile(a.gguf):
    sys.exit(f"error: {a.gguf}: no such GGUF (run `lowrank demo` once, or pass --gguf)")
t0 = time.time()
d, f = os.path.split(os.path.abspath(a.gguf))
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
cfg = LlamaConfig(
    vocab_size=len(tok),
    hidden_size=a.hidden,
    intermediate_size=a.intermediate,
    num_hidden_layers=a.layers,
    num_attention_heads=a.heads,
    num_key_value_heads=a.kv_heads,
    max_position_embeddings=a.max_positions,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=a.tie,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
    pad_token_id=tok.pad_token_id,
)
torch.manual_seed(a.seed)
dtype = getattr(torch, a.dtype)
# Initialise in the target dtype directly: a 1.1 B model in f32 would need 4.4 GB first.
torch.set_default_dtype(dtype)
model = LlamaForCausalLM(cfg)
torch.set_default_dtype(torch.float32)
n = sum(p.numel() for p in model.parameters())
tmp = a.out.rstrip("/") + ".partial"
os.makedirs(tmp, exist_ok=True)
model.save_pretrained(tmp, safe_serialization=True)
tok.save_pretrained(tmp)
if os.path.exists(a.out):
    sys.exit(f"error: {a.out} exists; remove it first (the new model is in {tmp})")
os.replace(tmp, a.out)
print(json.dumps({"out": a.out, "params": n, "dtype": a.dtype, "layers": a.layers, "hidden": a.hidden,
                  "heads": a.heads, "kv_heads": a.kv_heads, "intermediate": a.intermediate,
                  "vocab": len(tok), "seconds": round(time.time() - t0, 1)}))
