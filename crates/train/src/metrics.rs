//! Evaluation metrics for the built-in tasks.
//!
//! Units:
//! - [`exact_match`], [`normalize_sql`], [`normalize_label`]: booleans / strings;
//! - [`accuracy`] and [`slot_error_rate`]: fractions in `[0, 1]`;
//! - [`corpus_bleu`]: `[0, 100]`, the usual reporting scale;
//! - [`score`]: every metric on a `[0, 100]` scale (percentages; BLEU as is).
//!   Only [`Metric::SlotError`] is lower-is-better.

use crate::tasks::Metric;

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
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-3
    }

    #[test]
    fn sql_normalisation() {
        let canon = "SELECT name FROM employees WHERE department = 'Sales' AND salary > 50000";
        assert!(exact_match(
            "select NAME from Employees where department='Sales' and salary>50000;",
            canon
        ));
        assert!(exact_match(
            "  SELECT name\n FROM employees WHERE department = \"Sales\" AND salary >  50000 ; ",
            canon
        ));
        assert!(exact_match(
            "SELECT COUNT( * ) FROM products",
            "select count(*) from products"
        ));
        assert!(exact_match(
            "SELECT a FROM t WHERE x >= 3",
            "SELECT a FROM t WHERE x>=3"
        ));
        // Literal content is case-sensitive, other differences are real errors.
        assert!(!exact_match(
            "SELECT name FROM employees WHERE department = 'sales'",
            "SELECT name FROM employees WHERE department = 'Sales'"
        ));
        assert!(!exact_match(
            "SELECT name FROM employees WHERE salary < 50000",
            "SELECT name FROM employees WHERE salary > 50000"
        ));
        assert!(!exact_match(
            "SELECT name FROM employees",
            "SELECT name FROM employees WHERE age > 30"
        ));
        assert!(!exact_match(
            "SELECT name FROM employees WHERE city = 'Cork' AND age > 3",
            "SELECT name FROM employees WHERE city = 'Cork' AND age > 30"
        ));
        // Quotes and escapes.
        assert_eq!(
            normalize_sql("select x from t where n = \"St Anne's\""),
            "select x from t where n = 'St Anne''s'"
        );
        assert_eq!(
            normalize_sql("SELECT x FROM t WHERE n = 'St Anne''s';"),
            "select x from t where n = 'St Anne''s'"
        );
        assert_eq!(
            normalize_sql("SELECT MAX(salary) FROM employees"),
            "select max ( salary ) from employees"
        );
        assert_eq!(normalize_sql(""), "");
    }

    #[test]
    fn label_normalisation_and_accuracy() {
        assert_eq!(normalize_label("  Governing Law. "), "governing law");
        assert_eq!(normalize_label("\"ENT\""), "ent");
        assert_eq!(normalize_label("governing   law"), "governing law");
        assert_eq!(normalize_label("'payment.'"), "payment");
        assert_eq!(normalize_label("`warranty`."), "warranty");
        let golds = s(&["payment", "ENT", "governing law", "warranty"]);
        let preds = s(&["Payment.", "ent", "law", "warranty\n"]);
        assert!(close(accuracy(&preds, &golds), 0.75));
        assert_eq!(accuracy(&[], &[]), 0.0);
        assert!(close(score(&Metric::Accuracy, &preds, &golds, &[]), 75.0));
    }

    #[test]
    fn tokenizer() {
        assert_eq!(
            tokenize("The Eagle's £20-25, OK."),
            s(&["the", "eagle", "'", "s", "£", "20", "-", "25", ",", "ok", "."])
        );
    }

    #[test]
    fn bleu_identical_is_100() {
        let h = s(&["The cat sat on the mat.", "A dog barks loudly at night"]);
        let r: Vec<Vec<String>> = h.iter().map(|x| vec![x.clone()]).collect();
        assert!(close(corpus_bleu(&h, &r), 100.0));
        // Case and spacing of punctuation do not matter.
        assert!(close(
            corpus_bleu(
                &s(&["the cat sat on the mat ."]),
                &[s(&["The cat sat on the mat."])]
            ),
            100.0
        ));
    }

    #[test]
    fn bleu_hand_computed_with_brevity_penalty() {
        // hyp "the cat sat on mat" (c=5), ref "the cat sat on the mat" (r=6)
        // p1 = 5/5; p2: {the cat, cat sat, sat on, on mat} -> 3/4;
        // p3: {the cat sat, cat sat on, sat on mat} -> 2/3; p4: {the cat sat on, cat sat on mat} -> 1/2
        // geo mean = (1 * 3/4 * 2/3 * 1/2)^(1/4) = 0.25^0.25 = 0.707107
        // BP = exp(1 - 6/5) = exp(-0.2) = 0.818731
        // BLEU = 100 * 0.707107 * 0.818731 = 57.8931
        let b = corpus_bleu(
            &s(&["the cat sat on mat"]),
            &[s(&["the cat sat on the mat"])],
        );
        assert!(close(b, 57.8931), "{b}");
    }

    #[test]
    fn bleu_is_corpus_level_not_sentence_average() {
        // s1: hyp = ref = "a b c d" (4 tokens); s2: hyp "x y", ref "x z".
        // 1-grams 4+1 of 4+2 = 5/6; 2-grams 3+0 of 3+1 = 3/4; 3-grams 2/2; 4-grams 1/1.
        // c = r = 6 -> BP 1. BLEU = 100 * (5/6 * 3/4)^(1/4) = 100 * 0.625^0.25 = 88.9140
        let b = corpus_bleu(&s(&["a b c d", "x y"]), &[s(&["a b c d"]), s(&["x z"])]);
        assert!(close(b, 88.9140), "{b}");
    }

    #[test]
    fn bleu_clipping_zero_precision_and_multi_reference() {
        // Clipping: "the the the the" vs "the cat": p1 = 1/4, p2 = 0 -> BLEU 0 (no smoothing).
        assert_eq!(
            corpus_bleu(&s(&["the the the the"]), &[s(&["the cat"])]),
            0.0
        );
        // Too short for 4-grams -> 0.
        assert_eq!(corpus_bleu(&s(&["a b c"]), &[s(&["a b c"])]), 0.0);
        assert_eq!(corpus_bleu(&[], &[]), 0.0);
        // Multiple references: the closest length (4) is used -> BP 1, all precisions 1.
        let b = corpus_bleu(&s(&["a b c d"]), &[s(&["a b c d e f", "a b c d"])]);
        assert!(close(b, 100.0), "{b}");
        // n-grams may come from different references: hyp "a b c d e",
        // refs "a b c d x" and "q b c d e". p1 = 5/5, p2 = 4/4, p3 = 3/3, p4 = 2/2;
        // both refs have length 5 -> BP 1 -> 100.
        let b = corpus_bleu(&s(&["a b c d e"]), &[s(&["a b c d x", "q b c d e"])]);
        assert!(close(b, 100.0), "{b}");
        // Clipping by max over refs: hyp "a a b c d" refs "a b c d e" / "a a x y z":
        // p1: a clipped to 2, b, c, d -> 5/5; p2: {a a, a b, b c, c d} -> 4/4;
        // p3: {a a b (0), a b c, b c d} -> 2/3; p4: {a a b c (0), a b c d} -> 1/2.
        // r = 5 = c -> BP 1. BLEU = 100 * (2/3 * 1/2)^(1/4) = 100 * (1/3)^(1/4) = 75.9836
        let b = corpus_bleu(&s(&["a a b c d"]), &[s(&["a b c d e", "a a x y z"])]);
        assert!(close(b, 75.9836), "{b}");
        // score() wraps golds as single references.
        assert!(close(
            score(
                &Metric::Bleu,
                &s(&["the cat sat on mat"]),
                &s(&["the cat sat on the mat"]),
                &[]
            ),
            57.8931
        ));
    }

    #[test]
    fn mr_parsing() {
        assert_eq!(
            parse_mr("name[The Eagle], eatType[coffee shop], near[Burger King]"),
            vec![
                ("name".to_string(), "The Eagle".to_string()),
                ("eatType".to_string(), "coffee shop".to_string()),
                ("near".to_string(), "Burger King".to_string())
            ]
        );
        assert!(parse_mr("").is_empty());
    }

    #[test]
    fn slot_errors_hand_cases() {
        let mr = "name[The Eagle], eatType[coffee shop], food[Italian], priceRange[cheap], area[riverside], familyFriendly[yes], near[Burger King]";
        let good = "The Eagle is a family-friendly, low-priced Italian coffee shop in the riverside area near Burger King.";
        assert_eq!(slot_errors(mr, good), (0, 7));
        // Missing near, wrong food, family negated -> 3 errors.
        let bad =
            "The Eagle is a cheap French coffee shop by the riverside that is not family friendly.";
        assert_eq!(slot_errors(mr, bad), (3, 7));
        // Case-insensitive values; "inexpensive" must not count as "expensive".
        assert_eq!(
            slot_errors("name[X], priceRange[high]", "x is inexpensive."),
            (1, 2)
        );
        assert_eq!(
            slot_errors("name[X], priceRange[high]", "X is expensive."),
            (0, 2)
        );
        assert_eq!(
            slot_errors("name[X], priceRange[£20-25]", "X costs £20-25."),
            (0, 2)
        );
        assert_eq!(
            slot_errors("name[X], priceRange[£20-25]", "X costs £30."),
            (1, 2)
        );
        // familyFriendly[no] realisations.
        for ok in [
            "X is not family friendly.",
            "X is an adults-only pub.",
            "X is non-family-friendly.",
            "X does not welcome children.",
            "X isn't kid friendly.",
        ] {
            assert_eq!(
                slot_errors("name[X], familyFriendly[no]", ok),
                (0, 2),
                "{ok}"
            );
        }
        for wrong in ["X is family friendly.", "X is a pub.", "X is kid-friendly."] {
            assert_eq!(
                slot_errors("name[X], familyFriendly[no]", wrong),
                (1, 2),
                "{wrong}"
            );
        }
        // "centre" alone is not "city centre"; name must be a whole-token match.
        assert_eq!(
            slot_errors(
                "name[Bell], area[city centre]",
                "Bellhouse is in the centre."
            ),
            (2, 2)
        );
        assert_eq!(
            slot_errors(
                "name[Bell], area[city centre]",
                "bell is in the city center."
            ),
            (0, 2)
        );
    }

    #[test]
    fn slot_error_rate_and_score() {
        let mrs = s(&["name[A], food[Indian]", "name[B], area[riverside], near[C]"]);
        let outs = s(&["A serves Indian food.", "B is in the city centre."]);
        // errors: 0 of 2, then 2 of 3 (riverside, near C) -> 2/5
        assert!(close(slot_error_rate(&mrs, &outs), 0.4));
        assert!(close(score(&Metric::SlotError, &outs, &outs, &mrs), 40.0));
        assert_eq!(slot_error_rate(&[], &[]), 0.0);
    }

    #[test]
    fn exact_score() {
        let golds = s(&[
            "SELECT COUNT(*) FROM products WHERE brand = 'Acorn'",
            "SELECT name FROM products",
        ]);
        let preds = s(&[
            "select count(*) from products where brand = \"Acorn\";",
            "SELECT brand FROM products",
        ]);
        assert!(close(score(&Metric::Exact, &preds, &golds, &[]), 50.0));
    }
}
