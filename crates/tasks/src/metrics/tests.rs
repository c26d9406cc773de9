//! Tests of the metrics (moved out of metrics/mod.rs to keep that file about the metrics).

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
