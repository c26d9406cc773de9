//! The one place that draws progress: the libraries report [`Event`]s through a callback and
//! [`Bars`] renders them with indicatif — a bar for training steps, one for other counted work
//! (generation eval, amplify), a spinner for waits, log lines printed above the bars.

use indicatif::{ProgressBar, ProgressStyle};
use lowrank_train::progress::Event;

const BAR: &str = "{prefix} {bar:25} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]";
const SPINNER: &str = "{spinner} {msg} [{elapsed_precise}]";

pub struct Bars {
    /// Draw bars and log lines (warnings and interruptions are printed regardless).
    show: bool,
    train: Option<ProgressBar>,
    work: Option<ProgressBar>,
}

impl Bars {
    pub fn new(show: bool) -> Self {
        Bars {
            show,
            train: None,
            work: None,
        }
    }

    /// A bar of `len` steps (`None`: a spinner), hidden unless shown.
    fn bar(&self, len: Option<usize>) -> ProgressBar {
        let (bar, style) = match (self.show, len) {
            (false, _) => return ProgressBar::hidden(),
            (true, Some(n)) => (
                ProgressBar::new(n as u64),
                ProgressStyle::with_template(BAR).unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            (true, None) => {
                let b = ProgressBar::new_spinner();
                b.enable_steady_tick(std::time::Duration::from_millis(200));
                (
                    b,
                    ProgressStyle::with_template(SPINNER)
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                )
            }
        };
        bar.set_style(style);
        bar
    }

    /// A line above the bars (or on stderr when none is drawn).
    fn println(&self, line: &str) {
        match self.work.as_ref().or(self.train.as_ref()) {
            Some(b) if !b.is_hidden() => b.println(line),
            _ => eprintln!("{line}"),
        }
    }

    pub fn handle(&mut self, e: &Event) {
        match e {
            Event::TrainStart {
                method,
                step,
                total,
            } => {
                let b = self.bar(Some(*total));
                b.set_prefix(format!("train {}", method.name()));
                b.set_position(*step as u64);
                self.train = Some(b);
            }
            Event::TrainStep {
                step,
                loss,
                lr,
                tok_per_s,
            } => {
                if let Some(b) = &self.train {
                    b.set_message(format!("loss {loss:.4} lr {lr:.2e} {tok_per_s:.0} tok/s"));
                    b.set_position(*step as u64);
                }
            }
            Event::TrainEval { step, loss } => {
                if self.show {
                    self.println(&format!("step {step}: eval loss {loss:.4}"));
                }
            }
            Event::TrainEnd => {
                if let Some(b) = self.train.take() {
                    b.finish_and_clear();
                }
            }
            Event::Interrupted { step, checkpoint } => eprintln!(
                "interrupted at step {step}: checkpoint saved to {} (continue with --resume {})",
                checkpoint.display(),
                checkpoint.display()
            ),
            Event::Begin { label, total } => {
                let b = self.bar(*total);
                match total {
                    Some(_) => b.set_prefix(format!("{label:<12}")),
                    None => b.set_message(label.clone()),
                }
                if let Some(old) = self.work.replace(b) {
                    old.finish_and_clear();
                }
            }
            Event::Advance { done, item } => {
                if let Some(b) = &self.work {
                    b.set_position(*done as u64);
                    if let Some(i) = item {
                        b.set_message(i.clone());
                    }
                }
            }
            Event::End => {
                if let Some(b) = self.work.take() {
                    b.finish_and_clear();
                }
            }
            Event::Note(line) => {
                if self.show {
                    self.println(line);
                }
            }
            Event::Warning(line) => self.println(line),
        }
    }
}
