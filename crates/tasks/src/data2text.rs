//! `data2text`: E2E-NLG-style meaning representation -> one sentence that
//! realises every slot, e.g.
//! `name[The Anchor], eatType[pub], food[Italian], area[riverside]` ->
//! `The Anchor is an Italian pub in the riverside area.`
//!
//! `name` and `near` values are entities (disjoint pools per split); the other
//! slot values form a closed vocabulary shared by both splits. Realisation
//! styles are split: 4 TRAIN-only styles, 2 EVAL-only styles. Because EVAL
//! references use unseen styles, BLEU on EVAL measures closeness to a
//! differently worded reference; the slot error rate is the primary
//! held-out signal.

use rand::seq::IndexedRandom;
use rand::Rng;

use crate::task::{
    capitalize, example, fix_articles, generate_unique, rng_for, Example, Metric, Pool, Split, Task,
};

pub const SYSTEM_PROMPT: &str =
    "Write one fluent sentence describing the restaurant that mentions every attribute given.";

static NAMES: Pool = Pool {
    train: &[
        "The Copper Kettle",
        "Blue Heron",
        "The Old Mill",
        "Saffron Court",
        "The Red Lantern",
        "Maple House",
        "The Anchor",
        "Olive Grove",
        "The Wandering Fox",
        "Juniper",
        "The Brass Bell",
        "Lotus Garden",
        "The Salt Cellar",
        "Harbour Lights",
        "The Green Door",
        "Plum Tree",
        "The Velvet Spoon",
        "Cedar Hall",
        "The Silver Fern",
        "Bluebell",
        "The Lazy Otter",
        "Sundial",
        "The Golden Hind",
        "Poppy Fields",
        "The Tin Whistle",
        "Orchard Table",
    ],
    eval: &[
        "The Iron Gate",
        "Willow Corner",
        "The Painted Duck",
        "Amber Room",
        "The Quiet Owl",
        "Fig and Thistle",
        "The Crooked Spire",
        "Marigold",
        "Moonrise",
        "The Pelican",
        "Hazel Lodge",
    ],
};
static NEAR: Pool = Pool {
    train: &[
        "Central Library",
        "the Odeon",
        "St Anne's Church",
        "Burger Shack",
        "the Museum of Art",
        "Victoria Station",
        "the Botanic Gardens",
        "Kings Theatre",
        "the Old Bridge",
        "Market Square",
        "the Town Hall",
        "Clifton Park",
        "the Bus Station",
        "Castle Mound",
    ],
    eval: &[
        "the Science Museum",
        "Rowan Hospital",
        "the Ferry Terminal",
        "Abbey Gardens",
        "Granary Wharf",
    ],
};

pub const EAT_TYPES: &[&str] = &["coffee shop", "pub", "restaurant"];
pub const FOODS: &[&str] = &[
    "Italian",
    "French",
    "Chinese",
    "Indian",
    "Japanese",
    "English",
    "Fast food",
];
pub const PRICES: &[&str] = &[
    "cheap",
    "moderate",
    "high",
    "less than £20",
    "£20-25",
    "more than £30",
];
pub const AREAS: &[&str] = &["riverside", "city centre"];

/// A meaning representation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mr {
    pub name: String,
    pub eat_type: Option<&'static str>,
    pub food: Option<&'static str>,
    pub price: Option<&'static str>,
    pub area: Option<&'static str>,
    pub family: Option<bool>,
    pub near: Option<String>,
}

impl Mr {
    /// E2E surface form, slots in a fixed order.
    pub fn to_mr_string(&self) -> String {
        let mut parts = vec![format!("name[{}]", self.name)];
        if let Some(v) = self.eat_type {
            parts.push(format!("eatType[{v}]"));
        }
        if let Some(v) = self.food {
            parts.push(format!("food[{v}]"));
        }
        if let Some(v) = self.price {
            parts.push(format!("priceRange[{v}]"));
        }
        if let Some(v) = self.area {
            parts.push(format!("area[{v}]"));
        }
        if let Some(v) = self.family {
            parts.push(format!("familyFriendly[{}]", if v { "yes" } else { "no" }));
        }
        if let Some(v) = &self.near {
            parts.push(format!("near[{v}]"));
        }
        parts.join(", ")
    }
}

fn is_adjective_price(p: &str) -> bool {
    matches!(p, "cheap" | "moderate" | "high")
}

fn area_pp(a: &str) -> &'static str {
    if a == "riverside" {
        "in the riverside area"
    } else {
        "in the city centre"
    }
}

fn food_np(f: &str) -> String {
    if f == "Fast food" {
        "fast food".to_string()
    } else {
        format!("{f} food")
    }
}

fn food_adj(f: &str) -> String {
    if f == "Fast food" {
        "fast food".to_string()
    } else {
        f.to_string()
    }
}

/// Join clauses as "a, b and c".
fn and_list(items: &[String]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        _ => format!(
            "{} and {}",
            items[..items.len() - 1].join(", "),
            items[items.len() - 1]
        ),
    }
}

fn finish(s: String) -> String {
    let s = fix_articles(&s.split_whitespace().collect::<Vec<_>>().join(" "));
    capitalize(&s) + "."
}

/// Number of TRAIN styles and EVAL styles.
pub const TRAIN_STYLES: usize = 4;
pub const EVAL_STYLES: usize = 2;

/// Realise `mr` in style `style` of `split`.
pub fn realise(mr: &Mr, split: Split, style: usize) -> String {
    let name = mr.name.as_str();
    let near = mr.near.as_deref();
    match (split, style) {
        // "X is a family-friendly cheap Italian pub in the riverside area near Y."
        (Split::Train, 0) => {
            let mut s = format!("{name} is a");
            if let Some(f) = mr.family {
                s += if f {
                    " family-friendly"
                } else {
                    " adults-only"
                };
            }
            let mut trailing_price = None;
            if let Some(p) = mr.price {
                match p {
                    "cheap" => s += " cheap",
                    "moderate" => s += " moderately priced",
                    "high" => s += " high-priced",
                    _ => trailing_price = Some(format!(" with prices of {p}")),
                }
            }
            if let Some(f) = mr.food {
                s += &format!(" {}", food_adj(f));
            }
            s += &format!(" {}", mr.eat_type.unwrap_or("place"));
            if let Some(a) = mr.area {
                s += &format!(" {}", area_pp(a));
            }
            if let Some(n) = near {
                s += &format!(" near {n}");
            }
            if let Some(t) = trailing_price {
                s += &t;
            }
            finish(s)
        }
        // "Located in the city centre near Y, X is a pub serving Indian food in the high price range that is kid friendly."
        (Split::Train, 1) => {
            let mut s = String::new();
            match (mr.area, near) {
                (Some(a), Some(n)) => s += &format!("Located {} near {n}, ", area_pp(a)),
                (Some(a), None) => s += &format!("Located {}, ", area_pp(a)),
                (None, Some(n)) => s += &format!("Located near {n}, "),
                (None, None) => {}
            }
            s += &format!("{name} is a {}", mr.eat_type.unwrap_or("venue"));
            if let Some(f) = mr.food {
                s += &format!(" serving {}", food_np(f));
            }
            if let Some(p) = mr.price {
                s += &format!(" in the {p} price range");
            }
            if let Some(f) = mr.family {
                s += if f {
                    " that is kid friendly"
                } else {
                    " that is not kid friendly"
                };
            }
            finish(s)
        }
        // "X is a coffee shop in the riverside area near Y that serves French food, has a cheap price range and is family friendly."
        (Split::Train, 2) => {
            let mut s = format!("{name} is a {}", mr.eat_type.unwrap_or("place"));
            if let Some(a) = mr.area {
                s += &format!(" {}", area_pp(a));
            }
            if let Some(n) = near {
                s += &format!(" near {n}");
            }
            let mut rel = Vec::new();
            if let Some(f) = mr.food {
                rel.push(format!("serves {}", food_np(f)));
            }
            if let Some(p) = mr.price {
                rel.push(if is_adjective_price(p) {
                    format!("has a {p} price range")
                } else {
                    format!("has a price range of {p}")
                });
            }
            if let Some(f) = mr.family {
                rel.push(if f {
                    "is family friendly".into()
                } else {
                    "is not family friendly".into()
                });
            }
            if !rel.is_empty() {
                s += &format!(" that {}", and_list(&rel));
            }
            finish(s)
        }
        // "Near Y in the city centre you can find X, a kid-friendly Chinese restaurant with high prices."
        (Split::Train, _) => {
            let mut s = String::new();
            match (near, mr.area) {
                (Some(n), Some(a)) => s += &format!("Near {n} {} you can find ", area_pp(a)),
                (Some(n), None) => s += &format!("Near {n} you can find "),
                (None, Some(a)) => s += &format!("{} you can find ", area_pp(a)),
                (None, None) => s += "You can find ",
            }
            s += &format!("{name}, a");
            if let Some(f) = mr.family {
                s += if f { " kid-friendly" } else { " adults-only" };
            }
            if let Some(f) = mr.food {
                s += &format!(" {}", food_adj(f));
            }
            s += &format!(" {}", mr.eat_type.unwrap_or("place"));
            if let Some(p) = mr.price {
                s += match p {
                    "cheap" => " with low-cost meals",
                    "moderate" => " with mid-range prices",
                    "high" => " with high prices",
                    "less than £20" => " with meals for less than £20",
                    "£20-25" => " with meals for £20-25",
                    _ => " with meals for more than £30",
                };
            }
            finish(s)
        }
        // EVAL 0: "There is an inexpensive Japanese coffee shop called X in the city centre close to Y that does not welcome children."
        (Split::Eval, 0) => {
            let mut s = "There is a".to_string();
            if mr.family == Some(true) {
                s += " child friendly";
            }
            let mut trailing_price = None;
            if let Some(p) = mr.price {
                match p {
                    "cheap" => s += " inexpensive",
                    "moderate" => s += " moderately priced",
                    "high" => s += " expensive",
                    "less than £20" => trailing_price = Some(" with prices under £20"),
                    "£20-25" => trailing_price = Some(" with prices between £20 and £25"),
                    _ => trailing_price = Some(" with prices over £30"),
                }
            }
            if let Some(f) = mr.food {
                s += &format!(" {}", food_adj(f));
            }
            s += &format!(" {} called {name}", mr.eat_type.unwrap_or("place"));
            if let Some(a) = mr.area {
                s += &format!(" {}", area_pp(a));
            }
            if let Some(n) = near {
                s += &format!(" close to {n}");
            }
            if let Some(t) = trailing_price {
                s += t;
            }
            if mr.family == Some(false) {
                s += " that does not welcome children";
            }
            finish(s)
        }
        // EVAL 1: "If you want Italian food at a low cost, X is a non-family-friendly pub in the riverside area by Y."
        (Split::Eval, _) => {
            let mut want = Vec::new();
            if let Some(f) = mr.food {
                want.push(food_np(f));
            }
            let mut s = if want.is_empty() {
                "If you are looking for a place to eat".to_string()
            } else {
                format!("If you want {}", want[0])
            };
            if let Some(p) = mr.price {
                s += match p {
                    "cheap" => " at a low cost",
                    "moderate" => " at an average price",
                    "high" => " at a high price",
                    "less than £20" => " for less than £20",
                    "£20-25" => " for £20-25",
                    _ => " for more than £30",
                };
            }
            s += &format!(", {name} is a");
            if let Some(f) = mr.family {
                s += if f {
                    " family-friendly"
                } else {
                    " non-family-friendly"
                };
            }
            s += &format!(" {}", mr.eat_type.unwrap_or("spot"));
            if let Some(a) = mr.area {
                s += &format!(" {}", area_pp(a));
            }
            if let Some(n) = near {
                s += &format!(" by {n}");
            }
            finish(s)
        }
    }
}

pub struct Data2TextTask;

impl Task for Data2TextTask {
    fn name(&self) -> &'static str {
        "data2text"
    }
    fn description(&self) -> &'static str {
        "E2E-style restaurant meaning representation -> one sentence (BLEU-4, slot error rate)"
    }
    fn metrics(&self) -> Vec<Metric> {
        vec![Metric::Bleu, Metric::SlotError]
    }
    fn generate(&self, split: Split, n: usize, seed: u64) -> Vec<Example> {
        let mut rng = rng_for(self.name(), split, seed);
        generate_unique(n, |_| one(&mut rng, split))
    }
}

fn sample_mr(rng: &mut impl Rng, split: Split) -> Mr {
    loop {
        let mut mr = Mr {
            name: NAMES.get(split).choose(rng).unwrap().to_string(),
            ..Default::default()
        };
        let p = 0.6;
        if rng.random_bool(p) {
            mr.eat_type = Some(EAT_TYPES.choose(rng).unwrap());
        }
        if rng.random_bool(p) {
            mr.food = Some(FOODS.choose(rng).unwrap());
        }
        if rng.random_bool(p) {
            mr.price = Some(PRICES.choose(rng).unwrap());
        }
        if rng.random_bool(p) {
            mr.area = Some(AREAS.choose(rng).unwrap());
        }
        if rng.random_bool(p) {
            mr.family = Some(rng.random_bool(0.5));
        }
        if rng.random_bool(0.5) {
            mr.near = Some(NEAR.get(split).choose(rng).unwrap().to_string());
        }
        let optional = [
            mr.eat_type.is_some(),
            mr.food.is_some(),
            mr.price.is_some(),
            mr.area.is_some(),
            mr.family.is_some(),
            mr.near.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if optional >= 2 {
            return mr;
        }
    }
}

fn one(rng: &mut impl Rng, split: Split) -> Example {
    let mr = sample_mr(rng, split);
    let styles = match split {
        Split::Train => TRAIN_STYLES,
        Split::Eval => EVAL_STYLES,
    };
    let style = rng.random_range(0..styles);
    let text = realise(&mr, split, style);
    let tag = match split {
        Split::Train => "t",
        Split::Eval => "e",
    };
    let mut entities = vec![mr.name.clone()];
    entities.extend(mr.near.clone());
    example(
        SYSTEM_PROMPT,
        mr.to_mr_string(),
        text,
        format!("data2text/{tag}{style}"),
        entities,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{parse_mr, slot_errors};

    fn full_mr(family: bool, price: &'static str) -> Mr {
        Mr {
            name: "The Anchor".into(),
            eat_type: Some("pub"),
            food: Some("Fast food"),
            price: Some(price),
            area: Some("city centre"),
            family: Some(family),
            near: Some("the Odeon".into()),
        }
    }

    #[test]
    fn every_style_realises_every_slot() {
        // Exhaustive over price x family x all styles for a full MR, plus sparse MRs.
        for split in [Split::Train, Split::Eval] {
            let styles = if split == Split::Train {
                TRAIN_STYLES
            } else {
                EVAL_STYLES
            };
            for style in 0..styles {
                for price in PRICES {
                    for family in [true, false] {
                        let mr = full_mr(family, price);
                        let text = realise(&mr, split, style);
                        let (err, total) = slot_errors(&mr.to_mr_string(), &text);
                        assert_eq!((err, total), (0, 7), "style {split:?}/{style}: {text}");
                    }
                }
                let sparse = Mr {
                    name: "Juniper".into(),
                    food: Some("Indian"),
                    ..Default::default()
                };
                let text = realise(&sparse, split, style);
                assert_eq!(slot_errors(&sparse.to_mr_string(), &text), (0, 2), "{text}");
                assert!(
                    text.ends_with('.') && text.chars().next().unwrap().is_uppercase(),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn generated_golds_have_zero_slot_errors() {
        for split in [Split::Train, Split::Eval] {
            for e in Data2TextTask.generate(split, 300, 4) {
                let (err, total) = slot_errors(e.user(), e.answer());
                assert_eq!(err, 0, "{} -> {}", e.user(), e.answer());
                assert!(total >= 3, "{}", e.user());
                assert_eq!(parse_mr(e.user())[0].0, "name");
            }
        }
    }

    #[test]
    fn styles_differ_between_splits() {
        let mr = full_mr(true, "cheap");
        let train: Vec<_> = (0..TRAIN_STYLES)
            .map(|s| realise(&mr, Split::Train, s))
            .collect();
        for s in 0..EVAL_STYLES {
            let e = realise(&mr, Split::Eval, s);
            assert!(!train.contains(&e), "{e}");
        }
    }

    #[test]
    fn mr_format() {
        let mr = full_mr(false, "£20-25");
        assert_eq!(
            mr.to_mr_string(),
            "name[The Anchor], eatType[pub], food[Fast food], priceRange[£20-25], area[city centre], \
             familyFriendly[no], near[the Odeon]"
        );
    }

    #[test]
    fn pools_are_clean() {
        // Entity values must not contain slot words, or SER would be fooled.
        let banned = [
            "riverside",
            "centre",
            "pub",
            "restaurant",
            "coffee",
            "cheap",
            "high",
            "friendly",
            "food",
        ];
        for v in NAMES
            .train
            .iter()
            .chain(NAMES.eval)
            .chain(NEAR.train)
            .chain(NEAR.eval)
        {
            for b in banned.iter().chain(FOODS) {
                assert!(
                    !v.to_lowercase().contains(&b.to_lowercase()),
                    "{v} contains {b}"
                );
            }
        }
    }
}
