//! `sql`: English question -> SQL over a small fixed two-table schema
//! (WikiSQL-like: one table per query; SELECT col / COUNT / MAX / MIN / AVG,
//! WHERE with 1-2 conditions, ORDER BY ... LIMIT).
//!
//! Canonical output, e.g.
//! `SELECT name FROM employees WHERE department = 'Sales' AND salary > 50000`.
//! Each SQL pattern has several question phrasings; some are TRAIN-only and
//! others EVAL-only, so EVAL asks known patterns in unseen words, about unseen
//! string values and numbers.

use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;

use crate::task::{
    example, fill, fix_articles, generate_unique, numbers, rng_for, Example, Metric, Pool, Split,
    Task,
};

pub const SYSTEM_PROMPT: &str = "Write the SQL query that answers the question. Tables: \
employees(name, department, city, salary, age); products(name, category, brand, price, stock). \
Reply with the SQL only.";

/// A numeric column: name and all candidate values (split by `number_split`).
type NumCol = (&'static str, fn() -> Vec<u64>);

struct Table {
    name: &'static str,
    /// Plural noun used in questions.
    rows: &'static str,
    str_cols: &'static [(&'static str, &'static Pool)],
    num_cols: &'static [NumCol],
}

static PERSONS: Pool = Pool {
    train: &[
        "Ana Ruiz",
        "Tom Becker",
        "Priya Nair",
        "Lars Holm",
        "Mei Chen",
        "Omar Haddad",
        "Julia Novak",
        "Kofi Mensah",
        "Sara Lind",
        "Diego Costa",
        "Hannah Weiss",
        "Ivan Petrov",
        "Lucy Grant",
        "Mateo Silva",
        "Nina Berg",
        "Ravi Kumar",
        "Elena Rossi",
        "Felix Wagner",
    ],
    eval: &[
        "Yuki Tanaka",
        "Grace Okafor",
        "Pablo Herrera",
        "Ingrid Dahl",
        "Samir Aziz",
        "Chloe Martin",
    ],
};
static DEPARTMENTS: Pool = Pool {
    train: &[
        "Sales",
        "Marketing",
        "Finance",
        "Engineering",
        "Support",
        "Legal",
        "Logistics",
        "Research",
    ],
    eval: &["Procurement", "Security", "Training", "Design"],
};
static CITIES: Pool = Pool {
    train: &[
        "Lyon", "Denver", "Osaka", "Porto", "Leeds", "Austin", "Munich", "Tampere", "Cork",
        "Quito", "Perth", "Dakar",
    ],
    eval: &["Bergen", "Tucson", "Nagoya", "Seville", "Halifax"],
};
static PRODUCTS: Pool = Pool {
    train: &[
        "Aero Kettle",
        "Nova Lamp",
        "Trail Boots",
        "Echo Speaker",
        "Pixel Frame",
        "Storm Jacket",
        "Luma Desk",
        "Breeze Fan",
        "Orbit Clock",
        "Cinder Grill",
        "Atlas Backpack",
        "Velvet Chair",
    ],
    eval: &[
        "Summit Tent",
        "Ripple Mug",
        "Falcon Drone",
        "Harbor Rug",
        "Quartz Watch",
    ],
};
static CATEGORIES: Pool = Pool {
    train: &[
        "Garden", "Toys", "Kitchen", "Audio", "Office", "Sports", "Books", "Lighting",
    ],
    eval: &["Camping", "Pet Supplies", "Bath", "Music"],
};
static BRANDS: Pool = Pool {
    train: &[
        "Nordval",
        "Kestrel",
        "Brightline",
        "Acorn",
        "Tidewell",
        "Vantor",
        "Ostrom",
    ],
    eval: &["Quillon", "Marlow", "Zephyra", "Calder"],
};

fn all_salaries() -> Vec<u64> {
    (30..=150).map(|k| k * 1000).collect()
}
fn all_ages() -> Vec<u64> {
    (21..=65).collect()
}
fn all_prices() -> Vec<u64> {
    (1..=100).map(|k| k * 5).collect()
}
fn all_stocks() -> Vec<u64> {
    (1..=40).map(|k| k * 10).collect()
}

static TABLES: [Table; 2] = [
    Table {
        name: "employees",
        rows: "employees",
        str_cols: &[
            ("name", &PERSONS),
            ("department", &DEPARTMENTS),
            ("city", &CITIES),
        ],
        num_cols: &[("salary", all_salaries), ("age", all_ages)],
    },
    Table {
        name: "products",
        rows: "products",
        str_cols: &[
            ("name", &PRODUCTS),
            ("category", &CATEGORIES),
            ("brand", &BRANDS),
        ],
        num_cols: &[("price", all_prices), ("stock", all_stocks)],
    },
];

#[derive(Clone, Copy)]
enum Kind {
    SelectEq,
    CountEq,
    AggEq(&'static str),
    SelectCmp,
    CountCmp,
    SelectEqCmp,
    TopK,
    ArgBestEq,
}

struct Pattern {
    id: &'static str,
    kind: Kind,
    train: &'static [&'static str],
    eval: &'static [&'static str],
}

// Placeholders: {rows} {col} {scol} {v} {ncol} {n} {cmp} {k} {dir}
static PATTERNS: &[Pattern] = &[
    Pattern {
        id: "select_eq",
        kind: Kind::SelectEq,
        train: &[
            "What is the {col} of the {rows} whose {scol} is {v}?",
            "Show the {col} of {rows} with {scol} {v}.",
            "List the {col} for all {rows} where the {scol} is {v}.",
        ],
        eval: &[
            "For {rows} with a {scol} of {v}, return the {col}.",
            "Tell me the {col} belonging to {rows} that have {v} as their {scol}.",
        ],
    },
    Pattern {
        id: "count_eq",
        kind: Kind::CountEq,
        train: &[
            "How many {rows} have {scol} {v}?",
            "Count the {rows} whose {scol} is {v}.",
            "What is the number of {rows} where the {scol} is {v}?",
        ],
        eval: &[
            "How many of the {rows} list {v} as their {scol}?",
            "Give the total count of {rows} with a {scol} of {v}.",
        ],
    },
    Pattern {
        id: "max_eq",
        kind: Kind::AggEq("MAX"),
        train: &[
            "What is the highest {ncol} among {rows} whose {scol} is {v}?",
            "Find the maximum {ncol} of {rows} with {scol} {v}.",
            "Show the largest {ncol} for {rows} where the {scol} is {v}.",
        ],
        eval: &[
            "Among {rows} that have {v} as their {scol}, what is the maximum {ncol}?",
            "Return the highest {ncol} found for {rows} with a {scol} of {v}.",
        ],
    },
    Pattern {
        id: "min_eq",
        kind: Kind::AggEq("MIN"),
        train: &[
            "What is the lowest {ncol} among {rows} whose {scol} is {v}?",
            "Find the minimum {ncol} of {rows} with {scol} {v}.",
            "Show the smallest {ncol} for {rows} where the {scol} is {v}.",
        ],
        eval: &[
            "Among {rows} that have {v} as their {scol}, what is the minimum {ncol}?",
            "Return the lowest {ncol} found for {rows} with a {scol} of {v}.",
        ],
    },
    Pattern {
        id: "avg_eq",
        kind: Kind::AggEq("AVG"),
        train: &[
            "What is the average {ncol} of {rows} whose {scol} is {v}?",
            "Find the mean {ncol} of {rows} with {scol} {v}.",
            "Show the average {ncol} for {rows} where the {scol} is {v}.",
        ],
        eval: &[
            "Among {rows} that have {v} as their {scol}, what is the mean {ncol}?",
            "Return the average {ncol} computed over {rows} with a {scol} of {v}.",
        ],
    },
    Pattern {
        id: "select_cmp",
        kind: Kind::SelectCmp,
        train: &[
            "What is the {col} of {rows} with {ncol} {cmp} {n}?",
            "List the {col} of all {rows} whose {ncol} is {cmp} {n}.",
            "Show the {col} for {rows} where the {ncol} is {cmp} {n}.",
        ],
        eval: &[
            "For {rows} with a {ncol} {cmp} {n}, return the {col}.",
            "Tell me the {col} belonging to {rows} that have a {ncol} {cmp} {n}.",
        ],
    },
    Pattern {
        id: "count_cmp",
        kind: Kind::CountCmp,
        train: &[
            "How many {rows} have a {ncol} {cmp} {n}?",
            "Count the {rows} whose {ncol} is {cmp} {n}.",
            "What is the number of {rows} where the {ncol} is {cmp} {n}?",
        ],
        eval: &["Give the total count of {rows} with a {ncol} {cmp} {n}."],
    },
    Pattern {
        id: "select_eq_cmp",
        kind: Kind::SelectEqCmp,
        train: &[
            "What is the {col} of {rows} whose {scol} is {v} and whose {ncol} is {cmp} {n}?",
            "List the {col} of {rows} with {scol} {v} and {ncol} {cmp} {n}.",
            "Show the {col} for {rows} where the {scol} is {v} and the {ncol} is {cmp} {n}.",
        ],
        eval: &[
            "For {rows} with a {scol} of {v} and a {ncol} {cmp} {n}, return the {col}.",
            "Tell me the {col} belonging to {rows} that have {v} as their {scol} and a {ncol} {cmp} {n}.",
        ],
    },
    Pattern {
        id: "top_k",
        kind: Kind::TopK,
        train: &[
            "Which {k} {rows} have the {dir} {ncol}?",
            "List the names of the {k} {rows} with the {dir} {ncol}.",
            "Show the {k} {rows} with the {dir} {ncol}.",
        ],
        eval: &["Return the names of the top {k} {rows} ranked by {dir} {ncol}."],
    },
    Pattern {
        id: "arg_best_eq",
        kind: Kind::ArgBestEq,
        train: &[
            "Which of the {rows} with {scol} {v} has the {dir} {ncol}?",
            "Name the one among {rows} whose {scol} is {v} with the {dir} {ncol}.",
        ],
        eval: &["Among {rows} that have {v} as their {scol}, return the name of the one with the {dir} {ncol}."],
    },
];

const GT: &[&str] = &["greater than", "more than", "above", "over"];
const LT: &[&str] = &["less than", "below", "under", "lower than"];
const DESC: &[&str] = &["highest", "largest"];
const ASC: &[&str] = &["lowest", "smallest"];

pub struct SqlTask;

impl Task for SqlTask {
    fn name(&self) -> &'static str {
        "sql"
    }
    fn description(&self) -> &'static str {
        "English question -> SQL over a fixed employees/products schema (exact match after normalisation)"
    }
    fn metrics(&self) -> Vec<Metric> {
        vec![Metric::Exact]
    }
    fn generate(&self, split: Split, n: usize, seed: u64) -> Vec<Example> {
        let mut rng = rng_for(self.name(), split, seed);
        // Balanced pattern schedule, shuffled.
        let mut order: Vec<usize> = (0..n).map(|i| i % PATTERNS.len()).collect();
        order.shuffle(&mut rng);
        generate_unique(n, |i| one(&mut rng, split, &PATTERNS[order[i]]))
    }
}

fn one(rng: &mut impl Rng, split: Split, p: &Pattern) -> Example {
    let phrasings = match split {
        Split::Train => p.train,
        Split::Eval => p.eval,
    };
    let ti = rng.random_range(0..phrasings.len());
    let template_id = format!(
        "sql/{}/{}{}",
        p.id,
        match split {
            Split::Train => "t",
            Split::Eval => "e",
        },
        ti
    );
    let table = TABLES.choose(rng).unwrap();
    // Filtering on the (unique) name only makes sense when selecting another column of it.
    let str_cols: Vec<_> = table
        .str_cols
        .iter()
        .filter(|c| matches!(p.kind, Kind::SelectEq) || c.0 != "name")
        .collect();
    let (scol, spool) = **str_cols.choose(rng).unwrap();
    let v = *spool.get(split).choose(rng).unwrap();
    let (ncol, nvals) = *table.num_cols.choose(rng).unwrap();
    let nv = *numbers(split, nvals()).choose(rng).unwrap();
    let n = nv.to_string();
    // Selected column: any column other than the filter columns.
    let all_cols: Vec<&str> = table
        .str_cols
        .iter()
        .map(|c| c.0)
        .chain(table.num_cols.iter().map(|c| c.0))
        .collect();
    let col = *all_cols
        .iter()
        .filter(|c| **c != scol && **c != ncol)
        .collect::<Vec<_>>()
        .choose(rng)
        .unwrap();
    let greater = rng.random_bool(0.5);
    let (op, cmp) = if greater {
        (">", *GT.choose(rng).unwrap())
    } else {
        ("<", *LT.choose(rng).unwrap())
    };
    let desc = rng.random_bool(0.5);
    let (order, dir) = if desc {
        ("DESC", *DESC.choose(rng).unwrap())
    } else {
        ("ASC", *ASC.choose(rng).unwrap())
    };
    let k = *numbers(split, 2..=10).choose(rng).unwrap();
    let k = k.to_string();
    let t = table.name;

    let (sql, mut entities) = match p.kind {
        Kind::SelectEq => (
            format!("SELECT {col} FROM {t} WHERE {scol} = '{v}'"),
            vec![v.to_string()],
        ),
        Kind::CountEq => (
            format!("SELECT COUNT(*) FROM {t} WHERE {scol} = '{v}'"),
            vec![v.to_string()],
        ),
        Kind::AggEq(f) => (
            format!("SELECT {f}({ncol}) FROM {t} WHERE {scol} = '{v}'"),
            vec![v.to_string()],
        ),
        Kind::SelectCmp => (
            format!("SELECT {col} FROM {t} WHERE {ncol} {op} {n}"),
            vec![n.clone()],
        ),
        Kind::CountCmp => (
            format!("SELECT COUNT(*) FROM {t} WHERE {ncol} {op} {n}"),
            vec![n.clone()],
        ),
        Kind::SelectEqCmp => (
            format!("SELECT {col} FROM {t} WHERE {scol} = '{v}' AND {ncol} {op} {n}"),
            vec![v.to_string(), n.clone()],
        ),
        Kind::TopK => (
            format!("SELECT name FROM {t} ORDER BY {ncol} {order} LIMIT {k}"),
            vec![k.clone()],
        ),
        Kind::ArgBestEq => (
            format!("SELECT name FROM {t} WHERE {scol} = '{v}' ORDER BY {ncol} {order} LIMIT 1"),
            vec![v.to_string()],
        ),
    };
    let question = fix_articles(&fill(
        phrasings[ti],
        &[
            ("rows", table.rows),
            ("col", col),
            ("scol", scol),
            ("v", v),
            ("ncol", ncol),
            ("n", &n),
            ("cmp", cmp),
            ("k", &k),
            ("dir", dir),
        ],
    ));
    entities.retain(|e| question.contains(e.as_str()));
    example(SYSTEM_PROMPT, question, sql, template_id, entities)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{exact_match, normalize_sql};
    use std::collections::{HashMap, HashSet};

    #[test]
    fn every_pattern_has_train_and_eval_phrasings() {
        for p in PATTERNS {
            assert!(p.train.len() >= 2, "{}", p.id);
            assert!(!p.eval.is_empty(), "{}", p.id);
            for e in p.eval {
                assert!(!p.train.contains(e), "{}: phrasing in both splits", p.id);
            }
        }
    }

    #[test]
    fn pools_are_disjoint_and_nonempty() {
        for t in &TABLES {
            for (c, pool) in t.str_cols {
                assert!(pool.train.len() >= 4 && pool.eval.len() >= 3, "{c}");
                for e in pool.eval {
                    assert!(!pool.train.contains(e), "{c}: {e} in both pools");
                }
            }
            for (c, f) in t.num_cols {
                assert!(numbers(Split::Train, f()).len() >= 10, "{c}");
                assert!(numbers(Split::Eval, f()).len() >= 5, "{c}");
            }
        }
    }

    #[test]
    fn answers_are_canonical_and_mention_the_question_values() {
        for split in [Split::Train, Split::Eval] {
            let exs = SqlTask.generate(split, 400, 1);
            let mut per_pattern: HashMap<String, usize> = HashMap::new();
            for e in &exs {
                let sql = e.answer();
                assert!(sql.starts_with("SELECT "), "{sql}");
                assert!(!sql.ends_with(';'));
                // Canonical form is a fixed point of normalisation (modulo case).
                assert!(exact_match(sql, sql));
                assert_eq!(normalize_sql(sql), normalize_sql(&normalize_sql(sql)));
                // Every literal in the SQL is copied from the question.
                for lit in sql.split('\'').skip(1).step_by(2) {
                    assert!(e.user().contains(lit), "{lit} not in {}", e.user());
                }
                assert!(!e.meta.entities.is_empty(), "{e:?}");
                let pid = e.meta.template.split('/').nth(1).unwrap().to_string();
                *per_pattern.entry(pid).or_default() += 1;
            }
            assert_eq!(per_pattern.len(), PATTERNS.len());
            assert!(per_pattern.values().all(|&c| c == 40), "{per_pattern:?}");
        }
    }

    #[test]
    fn eval_uses_every_eval_phrasing() {
        let exs = SqlTask.generate(Split::Eval, 400, 2);
        let tpls: HashSet<_> = exs.iter().map(|e| e.meta.template.clone()).collect();
        let expected: usize = PATTERNS.iter().map(|p| p.eval.len()).sum();
        assert_eq!(tpls.len(), expected);
    }
}
