//! Evaluation metrics for the built-in tasks.
//!
//! Units:
//! - [`exact_match`], [`normalize_sql`], [`normalize_label`]: booleans / strings;
//! - [`accuracy`] and [`slot_error_rate`]: fractions in `[0, 1]`;
//! - [`corpus_bleu`]: `[0, 100]`, the usual reporting scale;
//! - [`score`]: every metric on a `[0, 100]` scale (percentages; BLEU as is).
//!   Only [`Metric::SlotError`] is lower-is-better.

use crate::task::Metric;

// ---------------------------------------------------------------------------
// SQL

/// Canonical form of a SQL query for exact-match comparison:
/// - a trailing `;` and surrounding whitespace are removed;
/// - outside string literals everything is lowercased (keywords and
///   identifiers are case-insensitive) and split into tokens (words/numbers,
///   comparison operators, punctuation), re-joined with single spaces, so
///   `COUNT( * )`, `count(*)` and `salary>5` vs `salary > 5` all agree;
/// - string literals in `'...'` or `"..."` are both rendered as `'...'`; their
///   content is kept verbatim (case-sensitive, as in SQL comparisons).
///   A doubled quote inside a literal is an escaped quote.
pub fn normalize_sql(sql: &str) -> String {
    let mut s = sql.trim();
    while let Some(rest) = s.strip_suffix(';') {
        s = rest.trim_end();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut tokens: Vec<String> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' || c == '"' {
            let q = c;
            let mut lit = String::new();
            i += 1;
            while i < chars.len() {
                if chars[i] == q {
                    if i + 1 < chars.len() && chars[i + 1] == q {
                        lit.push(q);
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                lit.push(chars[i]);
                i += 1;
            }
            tokens.push(format!("'{}'", lit.replace('\'', "''")));
        } else if c.is_alphanumeric() || c == '_' || c == '.' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect::<String>().to_lowercase());
        } else if "<>!=".contains(c) {
            let start = i;
            while i < chars.len() && "<>!=".contains(chars[i]) {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect());
        } else {
            tokens.push(c.to_string());
            i += 1;
        }
    }
    tokens.join(" ")
}

/// Exact match of two SQL queries after [`normalize_sql`].
pub fn exact_match(pred: &str, gold: &str) -> bool {
    normalize_sql(pred) == normalize_sql(gold)
}

// ---------------------------------------------------------------------------
// Labels

/// Canonical form of a class label: trimmed, surrounding quotes/backticks
/// removed, trailing periods removed, whitespace collapsed, lowercased.
pub fn normalize_label(s: &str) -> String {
    let mut t = s.trim();
    loop {
        let before = t;
        t = t.trim_end_matches('.').trim();
        for q in ['"', '\'', '`'] {
            if t.len() >= 2 && t.starts_with(q) && t.ends_with(q) {
                t = t[1..t.len() - 1].trim();
            }
        }
        if t == before {
            break;
        }
    }
    t.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Fraction in `[0, 1]` of predictions equal to their gold label after
/// [`normalize_label`]. Zero examples give 0.
pub fn accuracy(preds: &[String], golds: &[String]) -> f64 {
    assert_eq!(preds.len(), golds.len(), "accuracy: length mismatch");
    if golds.is_empty() {
        return 0.0;
    }
    let ok = preds
        .iter()
        .zip(golds)
        .filter(|(p, g)| normalize_label(p) == normalize_label(g))
        .count();
    ok as f64 / golds.len() as f64
}

// ---------------------------------------------------------------------------
// BLEU

/// Lowercased tokens: maximal runs of alphanumeric characters, and every
/// other non-space character on its own (`£20-25` -> `£ 20 - 25`).
pub fn tokenize(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in s.chars() {
        if c.is_alphanumeric() {
            word.extend(c.to_lowercase());
        } else {
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            if !c.is_whitespace() {
                out.push(c.to_lowercase().collect());
            }
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

fn ngram_counts(toks: &[String], n: usize) -> std::collections::HashMap<&[String], usize> {
    let mut m = std::collections::HashMap::new();
    if toks.len() >= n {
        for w in toks.windows(n) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

/// Corpus BLEU-4 (Papineni et al. 2002) on a `[0, 100]` scale: clipped n-gram
/// precisions summed over the corpus for n = 1..4, uniform weights, no
/// smoothing (any zero precision gives 0), brevity penalty
/// `exp(1 - r/c)` when `c <= r`, where `c` is the total hypothesis length and
/// `r` the sum over sentences of the reference length closest to the
/// hypothesis length (ties: the shorter). Tokens come from [`tokenize`]
/// (lowercased, punctuation split). `refs[i]` holds one or more references
/// for `hyps[i]`; counts are clipped by the maximum count in any reference.
pub fn corpus_bleu(hyps: &[String], refs: &[Vec<String>]) -> f64 {
    assert_eq!(hyps.len(), refs.len(), "corpus_bleu: length mismatch");
    let mut matched = [0usize; 4];
    let mut total = [0usize; 4];
    let (mut c, mut r) = (0usize, 0usize);
    for (h, rs) in hyps.iter().zip(refs) {
        let ht = tokenize(h);
        let rts: Vec<Vec<String>> = rs.iter().map(|x| tokenize(x)).collect();
        c += ht.len();
        r += rts
            .iter()
            .map(|t| t.len())
            .min_by_key(|&l| (l.abs_diff(ht.len()), l))
            .unwrap_or(0);
        for n in 1..=4 {
            let hc = ngram_counts(&ht, n);
            let rcs: Vec<_> = rts.iter().map(|t| ngram_counts(t, n)).collect();
            for (g, &cnt) in &hc {
                let max_ref = rcs
                    .iter()
                    .map(|m| m.get(g).copied().unwrap_or(0))
                    .max()
                    .unwrap_or(0);
                matched[n - 1] += cnt.min(max_ref);
            }
            total[n - 1] += ht.len().saturating_sub(n - 1);
        }
    }
    if c == 0 || (0..4).any(|i| total[i] == 0 || matched[i] == 0) {
        return 0.0;
    }
    let log_p: f64 = (0..4)
        .map(|i| (matched[i] as f64 / total[i] as f64).ln())
        .sum::<f64>()
        / 4.0;
    let bp = if c > r {
        1.0
    } else {
        (1.0 - r as f64 / c as f64).exp()
    };
    100.0 * bp * log_p.exp()
}

// ---------------------------------------------------------------------------
// Slot errors (data2text)

/// Parse an E2E meaning representation `key[value], key[value], ...`.
pub fn parse_mr(mr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = mr;
    while let Some(open) = rest.find('[') {
        let key = rest[..open].trim().trim_start_matches(',').trim();
        let Some(close) = rest[open..].find(']') else {
            break;
        };
        let value = &rest[open + 1..open + close];
        out.push((key.to_string(), value.trim().to_string()));
        rest = &rest[open + close + 1..];
    }
    out
}

/// Tokens for slot matching: [`tokenize`] without hyphens, so that
/// `family-friendly` and `family friendly` agree.
fn slot_tokens(s: &str) -> Vec<String> {
    tokenize(s).into_iter().filter(|t| t != "-").collect()
}

/// Start positions of `needle` (a phrase) in `hay` (tokens).
fn find_phrase(hay: &[String], needle: &str) -> Vec<usize> {
    let n = slot_tokens(needle);
    if n.is_empty() || n.len() > hay.len() {
        return Vec::new();
    }
    (0..=hay.len() - n.len())
        .filter(|&i| hay[i..i + n.len()] == n[..])
        .collect()
}

fn has_phrase(hay: &[String], needles: &[&str]) -> bool {
    needles.iter().any(|n| !find_phrase(hay, n).is_empty())
}

/// Accepted realisations of a priceRange value.
fn price_synonyms(v: &str) -> Vec<&'static str> {
    match v.to_lowercase().as_str() {
        "cheap" => vec![
            "cheap",
            "low-priced",
            "inexpensive",
            "low cost",
            "low-cost meals",
            "budget",
            "less than £20",
            "under £20",
        ],
        "less than £20" => vec![
            "less than £20",
            "under £20",
            "below £20",
            "cheap",
            "inexpensive",
            "low-priced",
            "low cost",
        ],
        "moderate" => vec![
            "moderate",
            "moderately priced",
            "mid-priced",
            "mid-range",
            "average price",
            "average-priced",
            "£20-25",
        ],
        "£20-25" => vec![
            "£20-25",
            "£20-£25",
            "20-25",
            "between £20 and £25",
            "moderate",
            "moderately priced",
            "mid-priced",
            "mid-range",
            "average price",
        ],
        "high" => vec![
            "high",
            "expensive",
            "high-priced",
            "pricey",
            "upscale",
            "more than £30",
            "over £30",
        ],
        "more than £30" => vec![
            "more than £30",
            "over £30",
            "above £30",
            "expensive",
            "high-priced",
            "pricey",
            "high price",
            "high prices",
        ],
        _ => vec![],
    }
}

/// Positive family-friendliness phrases; negated when preceded by a negator.
const FAMILY_POS: &[&str] = &[
    "family friendly",
    "kid friendly",
    "kids friendly",
    "child friendly",
    "children friendly",
    "welcomes families",
    "welcomes children",
    "welcomes kids",
    "welcome families",
    "welcome children",
    "welcome kids",
    "good for families",
    "suitable for families",
    "suitable for children",
    "for families",
    "for children",
    "for kids",
];
/// Phrases that only express "not family friendly".
const FAMILY_NEG: &[&str] = &["adults only", "adult only", "no children", "no kids"];
const NEGATORS: &[&str] = &["not", "non", "never", "t", "no"];

/// (says yes, says no) about family-friendliness.
fn family_polarity(toks: &[String]) -> (bool, bool) {
    let mut pos = false;
    let mut neg = has_phrase(toks, FAMILY_NEG);
    for p in FAMILY_POS {
        for i in find_phrase(toks, p) {
            // Look back over a couple of filler words: "is not really family friendly",
            // "does not welcome children".
            let negated = (1..=3).any(|k| {
                i >= k
                    && NEGATORS.contains(&toks[i - k].as_str())
                    && (k == 1
                        || !toks[i - k + 1..i]
                            .iter()
                            .any(|t| t == "," || t == "and" || t == "but"))
            });
            if negated {
                neg = true;
            } else {
                pos = true;
            }
        }
    }
    (pos, neg)
}

/// Count missing slots of `mr` in `output`: returns `(errors, total_slots)`.
///
/// Rules (matching is on lowercased tokens, hyphens ignored):
/// - `name`, `near`, `food`, `eatType`, unknown keys: the value verbatim
///   (`coffee shop` also as `café`/`cafe`, `city centre` also `city center`,
///   `centre of the city`);
/// - `priceRange`: the value or a synonym from a fixed map (e.g. `cheap`:
///   `low-priced`, `inexpensive`, `less than £20`...; `high`: `expensive`,
///   `more than £30`...);
/// - `familyFriendly[yes]`: a positive phrase (`family friendly`, `kid
///   friendly`, `child friendly`, `welcomes children`...) that is not negated,
///   and no negative phrase; `familyFriendly[no]`: a negated positive phrase
///   (`not family friendly`, `non-family-friendly`, `does not welcome
///   children`...) or `adults only`/`no children`, and no plain positive one.
pub fn slot_errors(mr: &str, output: &str) -> (usize, usize) {
    let toks = slot_tokens(output);
    let slots = parse_mr(mr);
    let mut errors = 0;
    for (key, value) in &slots {
        let ok = match key.as_str() {
            "priceRange" => {
                let syn = price_synonyms(value);
                if syn.is_empty() {
                    has_phrase(&toks, &[value])
                } else {
                    has_phrase(&toks, &syn)
                }
            }
            "familyFriendly" => {
                let (pos, neg) = family_polarity(&toks);
                match value.to_lowercase().as_str() {
                    "yes" => pos && !neg,
                    "no" => neg && !pos,
                    _ => false,
                }
            }
            "eatType" if value.eq_ignore_ascii_case("coffee shop") => {
                has_phrase(&toks, &["coffee shop", "coffeeshop", "café", "cafe"])
            }
            "area" if value.eq_ignore_ascii_case("city centre") => has_phrase(
                &toks,
                &[
                    "city centre",
                    "city center",
                    "centre of the city",
                    "center of the city",
                ],
            ),
            _ => has_phrase(&toks, &[value]),
        };
        if !ok {
            errors += 1;
        }
    }
    (errors, slots.len())
}

/// Corpus slot error rate in `[0, 1]`: total missing slots / total slots.
pub fn slot_error_rate(mrs: &[String], outputs: &[String]) -> f64 {
    assert_eq!(mrs.len(), outputs.len(), "slot_error_rate: length mismatch");
    let (mut e, mut t) = (0, 0);
    for (m, o) in mrs.iter().zip(outputs) {
        let (a, b) = slot_errors(m, o);
        e += a;
        t += b;
    }
    if t == 0 {
        0.0
    } else {
        e as f64 / t as f64
    }
}

// ---------------------------------------------------------------------------

/// Score predictions on a `[0, 100]` scale:
/// - `Exact`: % of SQL exact matches ([`exact_match`]);
/// - `Bleu`: [`corpus_bleu`] with one reference per example (`golds`);
/// - `SlotError`: % slot error rate, `inputs` being the meaning
///   representations (the user messages); lower is better;
/// - `Accuracy`: % of label matches ([`accuracy`]).
///
/// `inputs` is only read by `SlotError` (it may be empty otherwise).
pub fn score(metric: &Metric, preds: &[String], golds: &[String], inputs: &[String]) -> f64 {
    assert_eq!(preds.len(), golds.len(), "score: length mismatch");
    match metric {
        Metric::Exact => {
            if golds.is_empty() {
                return 0.0;
            }
            let ok = preds
                .iter()
                .zip(golds)
                .filter(|(p, g)| exact_match(p, g))
                .count();
            100.0 * ok as f64 / golds.len() as f64
        }
        Metric::Bleu => {
            let refs: Vec<Vec<String>> = golds.iter().map(|g| vec![g.clone()]).collect();
            corpus_bleu(preds, &refs)
        }
        Metric::SlotError => 100.0 * slot_error_rate(inputs, preds),
        Metric::Accuracy => 100.0 * accuracy(preds, golds),
    }
}

#[cfg(test)]
mod tests;
