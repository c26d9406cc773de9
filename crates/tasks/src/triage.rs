//! `triage` (medical): short patient symptom description -> department, one
//! of [`LABELS`].
//!
//! A description is a case frame (template) filled with a patient (name, age,
//! sex), a duration and one or two symptom phrases of the target department.
//! Frames are split (TRAIN-only / EVAL-only), as are the symptom phrases:
//! EVAL phrases are unseen paraphrases that keep the organ/body-part cue of the
//! department (e.g. train "chest pain when climbing stairs", eval "pressure in
//! the chest that spreads to the left arm"). Names and numbers come from
//! disjoint pools.

use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;

use crate::task::{
    example, fill, fix_articles, generate_unique, numbers, rng_for, Example, Metric, Pool, Split,
    Task,
};

pub const LABELS: &[&str] = &[
    "cardiology",
    "neurology",
    "gastroenterology",
    "pulmonology",
    "dermatology",
    "orthopedics",
    "ophthalmology",
    "ENT",
    "urology",
    "psychiatry",
];

pub const SYSTEM_PROMPT: &str = "Route the patient to one department. Answer with one label: cardiology, \
neurology, gastroenterology, pulmonology, dermatology, orthopedics, ophthalmology, ENT, urology, psychiatry.";

static NAMES: Pool = Pool {
    train: &[
        "Maria", "James", "Aisha", "Chen", "Olga", "David", "Fatima", "Lucas", "Sofia", "Kwame",
        "Emma", "Raj", "Noor", "Peter", "Hana", "Miguel", "Zoe", "Arjun", "Leila", "Tomas",
    ],
    eval: &[
        "Beatriz", "Hiroshi", "Amara", "Dmitri", "Freya", "Tariq", "Ines",
    ],
};

struct Dept {
    label: &'static str,
    train: &'static [&'static str],
    eval: &'static [&'static str],
}

static SYMPTOMS: &[Dept] = &[
    Dept {
        label: "cardiology",
        train: &[
            "chest pain when climbing stairs",
            "a racing heartbeat",
            "palpitations at rest",
            "swollen ankles and breathlessness when lying flat",
            "tightness in the chest during exercise",
            "an irregular pulse",
            "very high blood pressure readings",
            "fainting after exertion",
        ],
        eval: &[
            "a pounding, irregular heartbeat",
            "pressure in the chest that spreads to the left arm",
            "chest discomfort on exertion",
        ],
    },
    Dept {
        label: "neurology",
        train: &[
            "recurring migraines",
            "numbness in one hand",
            "tingling in the feet",
            "a tremor in the right hand",
            "episodes of dizziness and confusion",
            "a recent seizure",
            "memory lapses",
            "weakness on one side of the body",
        ],
        eval: &[
            "sudden numbness of the face",
            "repeated headaches and a shaking hand",
            "a seizure at work",
        ],
    },
    Dept {
        label: "gastroenterology",
        train: &[
            "stomach pain after meals",
            "heartburn every night",
            "bloating and diarrhoea",
            "blood in the stool",
            "constant nausea",
            "acid reflux",
            "pain in the upper abdomen",
            "chronic constipation",
        ],
        eval: &[
            "cramping abdominal pain and loose stools",
            "a burning pain in the stomach",
            "nausea and vomiting after eating",
        ],
    },
    Dept {
        label: "pulmonology",
        train: &[
            "a persistent cough",
            "wheezing at night",
            "shortness of breath when walking",
            "coughing up phlegm",
            "asthma attacks",
            "a chronic cough with mucus",
            "frequent chest infections",
            "breathlessness and a dry cough",
        ],
        eval: &[
            "a cough that will not go away",
            "wheezy breathing",
            "trouble breathing and coughing up mucus",
        ],
    },
    Dept {
        label: "dermatology",
        train: &[
            "an itchy rash on the arms",
            "a changing mole",
            "acne on the face and back",
            "dry, scaly patches of skin",
            "red itchy skin",
            "hair loss in patches",
            "a skin lesion that bleeds",
            "eczema flare-ups",
        ],
        eval: &[
            "a spreading red rash",
            "itchy, flaky skin on the elbows",
            "a dark mole that has grown",
        ],
    },
    Dept {
        label: "orthopedics",
        train: &[
            "knee pain when running",
            "a swollen ankle after a fall",
            "lower back pain",
            "a stiff shoulder",
            "hip pain when walking",
            "a possibly broken wrist",
            "stiff and painful knee joints",
            "neck stiffness after lifting",
        ],
        eval: &[
            "a painful, swollen knee",
            "aching in the lower back and hip",
            "wrist pain after a fall",
        ],
    },
    Dept {
        label: "ophthalmology",
        train: &[
            "blurred vision",
            "red, painful eyes",
            "floaters in the vision",
            "loss of vision in one eye",
            "eye pain in bright light",
            "itchy, watery eyes",
            "difficulty reading small print",
            "a gritty feeling in the eye",
        ],
        eval: &[
            "blurry eyesight",
            "a red and sore eye",
            "spots floating across the vision",
        ],
    },
    Dept {
        label: "ENT",
        train: &[
            "ear pain",
            "ringing in the ears",
            "a blocked nose for weeks",
            "a sore throat",
            "hearing loss in one ear",
            "frequent nosebleeds",
            "a hoarse voice",
            "sinus pressure",
        ],
        eval: &[
            "an aching ear and muffled hearing",
            "a constant sore throat",
            "a stuffy nose and sinus pain",
        ],
    },
    Dept {
        label: "urology",
        train: &[
            "pain when urinating",
            "blood in the urine",
            "frequent urination at night",
            "kidney stone pain in the side",
            "difficulty passing urine",
            "a weak urine stream",
            "bladder leakage",
            "testicular pain",
        ],
        eval: &[
            "burning during urination",
            "needing to urinate very often",
            "pink-coloured urine",
        ],
    },
    Dept {
        label: "psychiatry",
        train: &[
            "low mood and loss of interest",
            "panic attacks",
            "constant anxiety",
            "trouble sleeping because of worry",
            "hearing voices",
            "mood swings",
            "obsessive thoughts",
            "feeling hopeless",
        ],
        eval: &[
            "persistent sadness",
            "overwhelming worry and panic",
            "racing thoughts and sudden mood changes",
        ],
    },
];

// Placeholders: {name} {age} {sex} {s1} {s2} {dur}
const TRAIN_FRAMES: &[&str] = &[
    "{name}, {age}, has had {s1} for {dur}.",
    "A {age}-year-old {sex} reports {s1} and {s2}.",
    "{name} ({age}) complains of {s1} that started {dur} ago.",
    "Patient {name}, age {age}: {s1}, also {s2}.",
    "{name} is {age} and describes {s1} over the past {dur}, along with {s2}.",
    "{age}-year-old {sex} with {s1} for {dur}.",
];
const EVAL_FRAMES: &[&str] = &[
    "Over the last {dur}, {name} (aged {age}) has noticed {s1} as well as {s2}.",
    "Walk-in: {sex}, {age} years old, presenting with {s1}.",
    "{name} says {s1} started {dur} ago, together with {s2}.",
];

pub struct TriageTask;

impl Task for TriageTask {
    fn name(&self) -> &'static str {
        "triage"
    }
    fn description(&self) -> &'static str {
        "Medical: patient symptom description -> hospital department (10 labels, accuracy)"
    }
    fn metrics(&self) -> Vec<Metric> {
        vec![Metric::Accuracy]
    }
    fn generate(&self, split: Split, n: usize, seed: u64) -> Vec<Example> {
        let mut rng = rng_for(self.name(), split, seed);
        let mut order: Vec<usize> = (0..n).map(|i| i % SYMPTOMS.len()).collect();
        order.shuffle(&mut rng);
        generate_unique(n, |i| one(&mut rng, split, &SYMPTOMS[order[i]]))
    }
}

fn one(rng: &mut impl Rng, split: Split, dept: &Dept) -> Example {
    let (frames, syms, tag) = match split {
        Split::Train => (TRAIN_FRAMES, dept.train, "t"),
        Split::Eval => (EVAL_FRAMES, dept.eval, "e"),
    };
    let fi = rng.random_range(0..frames.len());
    let frame = frames[fi];
    let s1 = *syms.choose(rng).unwrap();
    let s2 = loop {
        let s = *syms.choose(rng).unwrap();
        if s != s1 {
            break s;
        }
    };
    let name = *NAMES.get(split).choose(rng).unwrap();
    let age = numbers(split, 18..=85).choose(rng).unwrap().to_string();
    let dur_n = *numbers(split, 2..=12).choose(rng).unwrap();
    let unit = ["days", "weeks", "months"].choose(rng).unwrap();
    let dur = format!("{dur_n} {unit}");
    let sex = *["man", "woman"].choose(rng).unwrap();

    let mut entities = Vec::new();
    if frame.contains("{age}") {
        entities.push(age.clone());
    }
    if frame.contains("{name}") {
        entities.push(name.to_string());
    }
    if frame.contains("{dur}") {
        entities.push(dur_n.to_string());
    }
    let text = fill(
        frame,
        &[
            ("name", name),
            ("age", &age),
            ("sex", sex),
            ("s1", s1),
            ("s2", s2),
            ("dur", &dur),
        ],
    );
    let text = crate::task::capitalize(&fix_articles(&text));
    example(
        SYSTEM_PROMPT,
        text,
        dept.label.to_string(),
        format!("triage/{tag}{fi}"),
        entities,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symptom_phrases_are_split_and_cover_labels() {
        assert_eq!(SYMPTOMS.len(), LABELS.len());
        let mut seen = std::collections::HashSet::new();
        for (d, l) in SYMPTOMS.iter().zip(LABELS) {
            assert_eq!(d.label, *l);
            assert!(d.train.len() >= 6 && d.eval.len() >= 2);
            for s in d.train.iter().chain(d.eval) {
                assert!(seen.insert(*s), "symptom phrase {s:?} used twice");
            }
        }
        for f in EVAL_FRAMES {
            assert!(!TRAIN_FRAMES.contains(f));
        }
    }

    #[test]
    fn eval_uses_only_eval_symptoms() {
        for e in TriageTask.generate(Split::Eval, 100, 3) {
            let dept = SYMPTOMS.iter().find(|d| d.label == e.answer()).unwrap();
            assert!(
                dept.eval.iter().any(|s| e.user().contains(s)),
                "{}",
                e.user()
            );
            assert!(
                !dept.train.iter().any(|s| e.user().contains(s)),
                "{}",
                e.user()
            );
        }
    }
}
