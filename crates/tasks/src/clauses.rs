//! `clauses` (legal): contract clause -> clause type, one of [`LABELS`].
//!
//! Each label has 5 TRAIN-only and 2 EVAL-only clause wordings; party names,
//! jurisdictions and numbers (amounts, durations, percentages) come from
//! disjoint pools per split. Several clauses contain distractor words of other
//! labels ("termination" in a confidentiality clause, "liable" in a force
//! majeure clause, ...) so that single keywords do not decide the label.

use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;

use crate::task::{
    example, fill, fix_articles, generate_unique, numbers, rng_for, Example, Metric, Pool, Split,
    Task,
};

pub const LABELS: &[&str] = &[
    "termination",
    "confidentiality",
    "payment",
    "liability",
    "governing law",
    "indemnification",
    "force majeure",
    "intellectual property",
    "non-compete",
    "warranty",
];

pub const SYSTEM_PROMPT: &str = "Classify the contract clause. Answer with one label: termination, \
confidentiality, payment, liability, governing law, indemnification, force majeure, intellectual property, \
non-compete, warranty.";

static PARTIES: Pool = Pool {
    train: &[
        "Norland Logistics",
        "Bexley Software",
        "Crestview Foods",
        "Halden Energy",
        "Marrow & Finch",
        "Pinecrest Media",
        "Tallis Robotics",
        "Quayside Retail",
        "Arden Biotech",
        "Solent Marine",
        "Greywater Capital",
        "Lumen Health",
        "Oakridge Builders",
        "Vireo Telecom",
        "Kinsale Textiles",
        "Redfern Analytics",
        "Stratus Aviation",
        "Bramble Hotels",
    ],
    eval: &[
        "Corvid Labs",
        "Westmere Farms",
        "Ironbark Mining",
        "Selkie Shipping",
        "Thornbury Pharma",
        "Azure Pines Resorts",
        "Galloway Motors",
    ],
};
static JURISDICTIONS: Pool = Pool {
    train: &[
        "the State of Delaware",
        "England and Wales",
        "the State of New York",
        "Ontario",
        "Scotland",
        "the State of California",
        "Texas",
        "Germany",
        "the Netherlands",
    ],
    eval: &[
        "Ireland",
        "the State of Washington",
        "Singapore",
        "Quebec",
        "Switzerland",
    ],
};

// Placeholders: {A} {B} parties, {amt} money, {days} {months} {years} {pct} {miles} numbers, {juris}.
struct LabelTemplates {
    label: &'static str,
    train: &'static [&'static str],
    eval: &'static [&'static str],
}

static TEMPLATES: &[LabelTemplates] = &[
    LabelTemplates {
        label: "termination",
        train: &[
            "Either {A} or {B} may terminate this Agreement upon {days} days' written notice to the other party.",
            "{A} may terminate this Agreement immediately if {B} materially breaches it and fails to cure the breach within {days} days.",
            "This Agreement shall expire automatically after {years} years unless renewed in writing by {A} and {B}.",
            "Upon termination of this Agreement for any reason, {B} shall cease all use of the services provided by {A}.",
            "{A} may end this Agreement for convenience by giving {B} at least {months} months' prior notice.",
        ],
        eval: &[
            "If {B} becomes insolvent, {A} shall have the right to terminate this Agreement with immediate effect.",
            "This Agreement may be terminated by {A} or {B} on {days} days' notice, without affecting rights accrued before termination.",
        ],
    },
    LabelTemplates {
        label: "confidentiality",
        train: &[
            "{B} shall keep all Confidential Information of {A} strictly confidential and shall not disclose it to any third party.",
            "Neither {A} nor {B} shall disclose the terms of this Agreement without the prior written consent of the other.",
            "{A} shall use the confidential information received from {B} solely for the purpose of performing this Agreement.",
            "The confidentiality obligations of {B} in this section shall survive for {years} years after termination.",
            "{B} shall return or destroy all confidential materials of {A} within {days} days of a written request.",
        ],
        eval: &[
            "All non-public information that {A} shares with {B} is confidential and may only be disclosed to employees who need to know it.",
            "{A} agrees not to reveal any trade secrets or other confidential business information of {B} for {years} years.",
        ],
    },
    LabelTemplates {
        label: "payment",
        train: &[
            "{B} shall pay {A} a fee of {amt} within {days} days of receiving each invoice.",
            "All invoices issued by {A} are payable within {days} days, and late payments bear interest at {pct}% per month.",
            "{B} shall pay {A} a monthly fee of {amt}, payable in advance on the first day of each month.",
            "The total price for the services is {amt}, to be paid by {B} in {months} equal monthly instalments.",
            "{A} may suspend the services if any amount owed by {B} remains unpaid for more than {days} days.",
        ],
        eval: &[
            "In consideration for the services, {B} will pay {A} the sum of {amt}, and each invoice falls due {days} days after receipt.",
            "Fees of {amt} per year shall be invoiced by {A} annually and settled by {B} by bank transfer.",
        ],
    },
    LabelTemplates {
        label: "liability",
        train: &[
            "In no event shall {A} be liable for any indirect, incidental or consequential damages arising out of this Agreement.",
            "The total liability of {A} under this Agreement shall not exceed {amt}.",
            "The aggregate liability of {A} shall be limited to the fees paid by {B} in the {months} months preceding the claim.",
            "Neither {A} nor {B} shall be liable for loss of profits, revenue or data, however caused.",
            "Nothing in this Agreement limits the liability of {A} or {B} for death or personal injury caused by negligence.",
        ],
        eval: &[
            "{B} agrees that the maximum amount for which {A} can be held liable is capped at {amt} in total.",
            "Under no circumstances will {A} be liable to {B} for lost profits or for any special or consequential damages.",
        ],
    },
    LabelTemplates {
        label: "governing law",
        train: &[
            "This Agreement between {A} and {B} shall be governed by and construed in accordance with the laws of {juris}.",
            "Any dispute between {A} and {B} shall be governed by the laws of {juris}.",
            "The laws of {juris}, without regard to conflict of laws principles, shall govern this Agreement.",
            "{A} and {B} agree that this Agreement is subject to the laws of {juris}.",
            "This Agreement and any claims of {A} relating to it are governed by the law of {juris}.",
        ],
        eval: &[
            "{A} and {B} submit to the exclusive jurisdiction of the courts of {juris}, whose laws shall govern this Agreement.",
            "Questions about the validity or interpretation of the contract between {A} and {B} will be decided under the laws in force in {juris}.",
        ],
    },
    LabelTemplates {
        label: "indemnification",
        train: &[
            "{B} shall indemnify and hold harmless {A} from any claims, losses and expenses arising from a breach of this Agreement by {B}.",
            "{A} shall defend, indemnify and hold {B} harmless against all third-party claims alleging infringement.",
            "{A} and {B} shall each indemnify the other against losses caused by its own negligence or wilful misconduct.",
            "{B} agrees to indemnify {A} for all reasonable legal fees incurred in defending any third-party claim.",
            "{A} must notify {B} of any claim for indemnity within {days} days, and {B} shall control the defence of that claim.",
        ],
        eval: &[
            "{A} will indemnify {B} and keep it harmless from any fines or costs resulting from claims brought by third parties.",
            "{B} undertakes to reimburse and indemnify {A} against every loss arising from a violation of applicable law by {B}.",
        ],
    },
    LabelTemplates {
        label: "force majeure",
        train: &[
            "Neither {A} nor {B} shall be liable for any delay caused by events beyond its reasonable control, including floods, fires, strikes or war.",
            "If a force majeure event continues for more than {days} days, {A} may terminate this Agreement.",
            "{A} shall not be responsible for any failure to perform caused by natural disasters, pandemics or government action.",
            "If {B} is affected by a force majeure event, it shall notify {A} within {days} days.",
            "The obligations of {B} are suspended for as long as an act of God prevents their performance.",
        ],
        eval: &[
            "Performance by {A} or {B} is excused to the extent it is prevented by earthquakes, epidemics, riots or other events outside their reasonable control.",
            "Where a force majeure event delays delivery by more than {months} months, {A} and {B} shall meet to discuss the situation in good faith.",
        ],
    },
    LabelTemplates {
        label: "intellectual property",
        train: &[
            "All intellectual property rights in the deliverables shall vest in {A} upon full payment.",
            "{B} retains ownership of all patents, copyrights and trademarks that existed before this Agreement.",
            "{A} grants {B} a non-exclusive, non-transferable licence to use the software for {years} years.",
            "Nothing in this Agreement transfers to {B} any right, title or interest in the trademarks of {A}.",
            "Any inventions created by {B} in performing the services shall be assigned to {A}.",
        ],
        eval: &[
            "Copyright and all other intellectual property in materials produced by {B} under this Agreement will belong exclusively to {A}.",
            "{A} keeps full ownership of its source code and patents, and {B} receives only a limited licence to run the software.",
        ],
    },
    LabelTemplates {
        label: "non-compete",
        train: &[
            "For {years} years after termination, {B} shall not engage in any business that competes with {A}.",
            "{B} shall not, during the term of this Agreement, provide similar services to any competitor of {A}.",
            "{B} agrees not to compete with {A} within {juris} for a period of {months} months.",
            "During the term and for {months} months thereafter, {B} shall not work for a business competing with {A}.",
            "{B} shall not open or operate a competing business within {miles} miles of any location of {A}.",
        ],
        eval: &[
            "For {months} months following the end of the engagement, {B} must refrain from starting any business that competes with {A} in {juris}.",
            "While this Agreement is in force, {B} may not offer competing products to clients of {A}.",
        ],
    },
    LabelTemplates {
        label: "warranty",
        train: &[
            "{A} warrants that the services will be performed in a professional and workmanlike manner.",
            "{A} warrants that the products will be free from defects in materials and workmanship for {months} months after delivery.",
            "Except as expressly stated in this Agreement, {A} makes no other warranties, express or implied.",
            "{B} represents and warrants that it has full authority to enter into this Agreement.",
            "If the software fails to conform to its specifications during the warranty period of {days} days, {A} shall repair or replace it at no charge.",
        ],
        eval: &[
            "{A} guarantees that every product it delivers will conform to the agreed specifications and warrants this for {years} years.",
            "{A} represents that the goods are new and fit for their intended purpose, and provides a warranty of {months} months.",
        ],
    },
];

pub struct ClausesTask;

impl Task for ClausesTask {
    fn name(&self) -> &'static str {
        "clauses"
    }
    fn description(&self) -> &'static str {
        "Legal: contract clause -> clause type (10 labels, accuracy)"
    }
    fn metrics(&self) -> Vec<Metric> {
        vec![Metric::Accuracy]
    }
    fn generate(&self, split: Split, n: usize, seed: u64) -> Vec<Example> {
        let mut rng = rng_for(self.name(), split, seed);
        let mut order: Vec<usize> = (0..n).map(|i| i % TEMPLATES.len()).collect();
        order.shuffle(&mut rng);
        generate_unique(n, |i| one(&mut rng, split, &TEMPLATES[order[i]]))
    }
}

/// `1234567` -> `1,234,567`.
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn one(rng: &mut impl Rng, split: Split, lt: &LabelTemplates) -> Example {
    let wordings = match split {
        Split::Train => lt.train,
        Split::Eval => lt.eval,
    };
    let ti = rng.random_range(0..wordings.len());
    let tpl = wordings[ti];
    let parties = PARTIES.get(split);
    let a = *parties.choose(rng).unwrap();
    let b = loop {
        let b = *parties.choose(rng).unwrap();
        if b != a {
            break b;
        }
    };
    let juris = *JURISDICTIONS.get(split).choose(rng).unwrap();
    let amt = thousands(
        *numbers(split, (2..=400).map(|k| k * 500))
            .choose(rng)
            .unwrap(),
    );
    let amt = format!("${amt}");
    let days = numbers(split, (1..=24).map(|k| k * 5))
        .choose(rng)
        .unwrap()
        .to_string();
    let months = numbers(split, 2..=36).choose(rng).unwrap().to_string();
    let years = numbers(split, 2..=10).choose(rng).unwrap().to_string();
    let pct = numbers(split, 1..=9).choose(rng).unwrap().to_string();
    let miles = numbers(split, (1..=20).map(|k| k * 5))
        .choose(rng)
        .unwrap()
        .to_string();

    let mut entities = Vec::new();
    for (key, val) in [
        ("{A}", a),
        ("{B}", b),
        ("{juris}", juris),
        ("{amt}", amt.as_str()),
        ("{days}", days.as_str()),
        ("{months}", months.as_str()),
        ("{years}", years.as_str()),
        ("{pct}", pct.as_str()),
        ("{miles}", miles.as_str()),
    ] {
        if tpl.contains(key) {
            entities.push(val.to_string());
        }
    }
    let text = fix_articles(&fill(
        tpl,
        &[
            ("A", a),
            ("B", b),
            ("juris", juris),
            ("amt", &amt),
            ("days", &days),
            ("months", &months),
            ("years", &years),
            ("pct", &pct),
            ("miles", &miles),
        ],
    ));
    let tag = match split {
        Split::Train => "t",
        Split::Eval => "e",
    };
    let id = format!("clauses/{}/{tag}{ti}", lt.label.replace(' ', "_"));
    example(SYSTEM_PROMPT, text, lt.label.to_string(), id, entities)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_cover_labels_and_are_split() {
        assert_eq!(TEMPLATES.len(), LABELS.len());
        for (t, l) in TEMPLATES.iter().zip(LABELS) {
            assert_eq!(t.label, *l);
            assert!(t.train.len() >= 4 && t.eval.len() >= 2, "{l}");
            for e in t.eval {
                assert!(!t.train.contains(e));
            }
        }
        for p in [&PARTIES, &JURISDICTIONS] {
            for e in p.eval {
                assert!(!p.train.contains(e));
            }
        }
    }

    #[test]
    fn money_formatting() {
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(250000), "250,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn clauses_mention_parties() {
        for e in ClausesTask.generate(Split::Eval, 100, 9) {
            assert!(e.user().ends_with('.'), "{}", e.user());
            assert!(e.user().len() < 260, "{}", e.user());
        }
    }
}
