//! Prometheus metrics (text exposition format 0.0.4), kept in process.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    inner: Mutex<HistInner>,
}

#[derive(Debug, Default, Clone)]
struct HistInner {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
    max: f64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            inner: Mutex::new(HistInner {
                counts: vec![0; bounds.len()],
                sum: 0.0,
                count: 0,
                max: 0.0,
            }),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += v;
        h.count += 1;
        h.max = h.max.max(v);
    }

    /// (sum, count) of the observations.
    pub fn sum_count(&self) -> (f64, u64) {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (h.sum, h.count)
    }

    /// Largest value observed (0 if none).
    pub fn max(&self) -> f64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).max
    }

    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&h.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            h.count, h.sum, h.count
        );
    }
}

const LATENCY_BOUNDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BOUNDS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    adapter_requests: Mutex<BTreeMap<String, u64>>,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub queue_depth: AtomicU64,
    pub running: AtomicU64,
    pub kv_cache_bytes: AtomicU64,
    /// KV bytes reserved for the running requests (prompt + max_tokens each), which admission
    /// holds within `kv_cache_budget_bytes`.
    pub kv_cache_reserved_bytes: AtomicU64,
    pub kv_cache_budget_bytes: AtomicU64,
    pub resident_adapters: AtomicU64,
    pub resident_adapter_bytes: AtomicU64,
    pub batch_rows: Histogram,
    pub batch_tokens: Histogram,
    pub ttft: Histogram,
    pub itl: Histogram,
    /// Steps in which every row was decoding (no prompt chunk): forward + sampling time.
    pub decode_steps: Histogram,
    /// Tokens those steps generated.
    pub decode_step_tokens: AtomicU64,
    /// Requests failed because their logits were NaN or infinite.
    pub non_finite_logits: AtomicU64,
    /// Adapter versions downloaded from the object store (cache misses).
    pub adapter_downloads: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            adapter_requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            running: AtomicU64::new(0),
            kv_cache_bytes: AtomicU64::new(0),
            kv_cache_reserved_bytes: AtomicU64::new(0),
            kv_cache_budget_bytes: AtomicU64::new(0),
            resident_adapters: AtomicU64::new(0),
            resident_adapter_bytes: AtomicU64::new(0),
            batch_rows: Histogram::new(&BATCH_BOUNDS),
            batch_tokens: Histogram::new(&[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0]),
            ttft: Histogram::new(&LATENCY_BOUNDS),
            itl: Histogram::new(&LATENCY_BOUNDS),
            decode_steps: Histogram::new(&LATENCY_BOUNDS),
            decode_step_tokens: AtomicU64::new(0),
            non_finite_logits: AtomicU64::new(0),
            adapter_downloads: AtomicU64::new(0),
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((endpoint.to_string(), status))
            .or_insert(0) += 1;
    }

    pub fn adapter_request(&self, adapter: &str) {
        *self
            .adapter_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(adapter.to_string())
            .or_insert(0) += 1;
    }

    /// Drop a deleted adapter's series: names come and go with the admin API, and a map keyed
    /// by every name ever served would only grow.
    pub fn forget_adapter(&self, adapter: &str) {
        self.adapter_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(adapter);
    }

    /// Adapters with a request series.
    pub fn adapter_series(&self) -> usize {
        self.adapter_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Requests counted for (endpoint, status).
    pub fn requests_of(&self, endpoint: &str, status: u16) -> u64 {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(endpoint.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let _ = writeln!(o, "# HELP lowrank_requests_total HTTP requests by endpoint and status.\n# TYPE lowrank_requests_total counter");
        for ((e, s), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "lowrank_requests_total{{endpoint=\"{}\",status=\"{s}\"}} {n}",
                escape(e)
            );
        }
        g(
            &mut o,
            "lowrank_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lowrank_completion_tokens_total",
            "counter",
            "Tokens generated.",
            self.completion_tokens.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lowrank_queue_depth",
            "gauge",
            "Requests waiting for a batch slot.",
            self.queue_depth.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lowrank_running_sequences",
            "gauge",
            "Sequences being generated.",
            self.running.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lowrank_kv_cache_bytes",
            "gauge",
            "Bytes held by KV caches.",
            self.kv_cache_bytes.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lowrank_kv_cache_reserved_bytes",
            "gauge",
            "KV cache bytes reserved for the running requests (prompt + max_tokens each).",
            self.kv_cache_reserved_bytes.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lowrank_kv_cache_budget_bytes",
            "gauge",
            "The KV cache budget admission keeps the reserved bytes within.",
            self.kv_cache_budget_bytes.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lowrank_resident_adapters",
            "gauge",
            "Adapters loaded in memory.",
            self.resident_adapters.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lowrank_resident_adapter_bytes",
            "gauge",
            "Tensor bytes of loaded adapters.",
            self.resident_adapter_bytes.load(Ordering::Relaxed),
        );
        let _ = writeln!(o, "# HELP lowrank_adapter_requests_total Requests per adapter.\n# TYPE lowrank_adapter_requests_total counter");
        for (a, n) in self
            .adapter_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "lowrank_adapter_requests_total{{adapter=\"{}\"}} {n}",
                escape(a)
            );
        }
        self.batch_rows.render(
            &mut o,
            "lowrank_batch_size",
            "Sequences per batched forward.",
        );
        self.batch_tokens.render(
            &mut o,
            "lowrank_batch_tokens",
            "Tokens per batched forward.",
        );
        self.decode_steps.render(
            &mut o,
            "lowrank_decode_step_seconds",
            "Duration of steps in which every row was decoding (forward and sampling).",
        );
        g(
            &mut o,
            "lowrank_decode_step_tokens_total",
            "counter",
            "Tokens generated by decode-only steps (divide by the step seconds' sum for \
             aggregate decode tok/s).",
            self.decode_step_tokens.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lowrank_non_finite_logits_total",
            "counter",
            "Requests failed because the model's logits for them were NaN or infinite.",
            self.non_finite_logits.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "lowrank_adapter_downloads_total",
            "counter",
            "Adapter versions downloaded from the object store (loads served from the local \
             cache are not counted).",
            self.adapter_downloads.load(Ordering::Relaxed),
        );
        self.ttft.render(
            &mut o,
            "lowrank_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
        );
        self.itl.render(
            &mut o,
            "lowrank_inter_token_latency_seconds",
            "Time between consecutive generated tokens.",
        );
        o
    }
}
