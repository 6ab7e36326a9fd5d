//! Runs every scenario against every built provider and prints the scenario x provider
//! matrix: `pass`, `FAIL`, `not built` (the provider's feature is off), `no fixture`,
//! `n/a` (a restart where the provider has no emulator) or `skipped` (no Docker, outside
//! CI). The last line is `N passed, N failed`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Semaphore;

use super::normalize::{check_golden, Golden};
use super::scenarios::Scenario;
use super::{Column, Names, ProviderFixture};
use crate::runner::{run_case, summary_line};
use iotgw_testkit::{self, DockerStatus};

/// Scenario runs at the same time (each has its own gateway; restarts have their own
/// container). Two cores are the budget.
const PARALLEL: usize = 4;
/// Time limit of one scenario on one provider (a dedicated emulator's start included).
const CASE_LIMIT: Duration = Duration::from_secs(180);

/// One cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cell {
    /// Passed (how long it took).
    Pass(Duration),
    /// Failed: why.
    Fail(String),
    /// The provider's feature is off.
    NotBuilt,
    /// The feature is on but there is no fixture.
    NoFixture,
    /// Does not apply to this provider: why.
    NotApplicable(String),
    /// Could not run here: why.
    Skipped(String),
}

impl Cell {
    fn label(&self) -> String {
        match self {
            Self::Pass(d) => format!("pass {:.1}s", d.as_secs_f64()),
            Self::Fail(_) => "FAIL".into(),
            Self::NotBuilt => "not built".into(),
            Self::NoFixture => "no fixture".into(),
            Self::NotApplicable(_) => "n/a".into(),
            Self::Skipped(_) => "skipped".into(),
        }
    }
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Report {
    /// Provider kinds (columns).
    pub kinds: Vec<&'static str>,
    /// Emulator of each built provider, for the legend.
    pub emulators: Vec<(&'static str, &'static str)>,
    /// `cells[scenario][provider]`.
    pub cells: Vec<Vec<Cell>>,
    /// Golden files written by this run.
    pub written: Vec<String>,
}

impl Report {
    /// Cells that passed.
    pub fn passed(&self) -> usize {
        self.cells
            .iter()
            .flatten()
            .filter(|c| matches!(c, Cell::Pass(_)))
            .count()
    }

    /// Cells that failed.
    pub fn failed(&self) -> usize {
        self.cells
            .iter()
            .flatten()
            .filter(|c| matches!(c, Cell::Fail(_)))
            .count()
    }

    /// The matrix as text (what the binary prints and the README shows), without the
    /// failure details.
    pub fn matrix(&self) -> String {
        let name_w = Scenario::ALL
            .iter()
            .map(|s| s.name().len())
            .max()
            .unwrap_or(0);
        let col_w: Vec<usize> = self
            .kinds
            .iter()
            .enumerate()
            .map(|(i, k)| {
                self.cells
                    .iter()
                    .map(|row| row[i].label().len())
                    .chain([k.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = format!("{:name_w$}", "scenario \\ provider");
        for (k, w) in self.kinds.iter().zip(&col_w) {
            out.push_str(&format!("  {k:w$}"));
        }
        out.push('\n');
        for (s, row) in Scenario::ALL.iter().zip(&self.cells) {
            out.push_str(&format!("{:name_w$}", s.name()));
            for (c, w) in row.iter().zip(&col_w) {
                out.push_str(&format!("  {:w$}", c.label()));
            }
            out.push('\n');
        }
        out.lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The whole report: matrix, legend, details of what did not pass, summary line.
    pub fn render(&self) -> String {
        let mut out = String::from("provider conformance: scenario x provider\n\n");
        out.push_str(&self.matrix());
        out.push('\n');
        for (k, e) in &self.emulators {
            out.push_str(&format!("{k}: against {e}\n"));
        }
        if self.cells.iter().flatten().any(|c| *c == Cell::NotBuilt) {
            out.push_str("not built: the provider's Cargo feature is off in this build\n");
        }
        if self.cells.iter().flatten().any(|c| *c == Cell::NoFixture) {
            out.push_str(
                "no fixture: the provider is built and tested on its own, but has no \
                 conformance fixture yet (tests/README.md, \"Adding a provider\")\n",
            );
        }
        for path in &self.written {
            out.push_str(&format!("golden file written: {path} (commit it)\n"));
        }
        for (s, row) in Scenario::ALL.iter().zip(&self.cells) {
            for (k, c) in self.kinds.iter().zip(row) {
                match c {
                    Cell::Fail(why) => {
                        out.push_str(&format!("\nFAIL {k} / {}:\n{why}\n", s.name()))
                    }
                    Cell::Skipped(why) | Cell::NotApplicable(why) => {
                        out.push_str(&format!("{} {k} / {}: {why}\n", c.label(), s.name()))
                    }
                    _ => {}
                }
            }
        }
        out.push('\n');
        out.push_str(&summary_line(self.passed(), self.failed()));
        out.push('\n');
        out
    }
}

/// Runs every scenario of [`Scenario::ALL`] against every column.
pub async fn run(columns: Vec<Column>) -> Report {
    let kinds: Vec<&'static str> = columns.iter().map(Column::kind).collect();
    let fixtures: Vec<Option<Arc<dyn ProviderFixture>>> = columns
        .into_iter()
        .map(|c| match c {
            Column::Built(f) => Some(Arc::from(f)),
            _ => None,
        })
        .collect();
    let emulators = fixtures
        .iter()
        .flatten()
        .map(|f| (f.kind(), f.against()))
        .collect();
    let docker_problem = match iotgw_testkit::status() {
        DockerStatus::Available { .. } => None,
        DockerStatus::Unavailable(why) => Some(format!(
            "Docker is unreachable ({why}): start Docker (or set DOCKER_HOST) and run scripts/test.sh"
        )),
    };
    if let Some(why) = &docker_problem {
        if iotgw_testkit::ci() {
            eprintln!("CI=true and {why}: every emulator scenario fails");
        } else {
            eprintln!("SKIPPED: the conformance suite: {why}");
        }
    }

    // Start every runnable cell; the semaphore bounds how many run at once.
    let gate = Arc::new(Semaphore::new(PARALLEL));
    let mut cells: Vec<Vec<Cell>> = Vec::new();
    let mut pending = Vec::new();
    for (si, scenario) in Scenario::ALL.iter().copied().enumerate() {
        let mut row = Vec::new();
        for (pi, (col_fixture, kind)) in fixtures.iter().zip(&kinds).enumerate() {
            let cell = match (col_fixture, &docker_problem) {
                (None, _) => {
                    // Column::NotBuilt or NoFixture: tell them apart by the feature list.
                    if crate::conformance::fixtures::feature_on(kind) {
                        Cell::NoFixture
                    } else {
                        Cell::NotBuilt
                    }
                }
                (Some(f), _) if scenario.restarts_emulator() && f.emulator().is_none() => {
                    Cell::NotApplicable(format!("{kind} has no emulator to restart"))
                }
                (Some(_), Some(why)) if iotgw_testkit::ci() => Cell::Fail(why.clone()),
                (Some(_), Some(why)) => Cell::Skipped(why.clone()),
                (Some(f), None) => {
                    let f = f.clone();
                    let gate = gate.clone();
                    let names = Names::new(scenario.name(), kind);
                    let label = format!("{kind} / {}", scenario.name());
                    pending.push((
                        si,
                        pi,
                        tokio::spawn(async move {
                            let _permit = gate.acquire_owned().await;
                            eprintln!("conformance: {label}: running (nonce {})", names.nonce);
                            let (r, took) = run_case(&label, CASE_LIMIT, async move {
                                scenario.run(f.as_ref(), &names).await
                            })
                            .await;
                            eprintln!(
                                "conformance: {label}: {} in {:.1}s",
                                if r.is_ok() { "done" } else { "FAILED" },
                                took.as_secs_f64()
                            );
                            (r, took)
                        }),
                    ));
                    Cell::Fail("did not run".into())
                }
            };
            row.push(cell);
        }
        cells.push(row);
    }

    // Collect, then compare with the goldens in column order (the first built provider
    // writes a missing golden, the others are compared with it).
    let mut snapshots: Vec<Vec<Option<(Value, Duration)>>> =
        vec![vec![None; kinds.len()]; Scenario::ALL.len()];
    for (si, pi, task) in pending {
        match task.await {
            Ok((Ok(v), took)) => snapshots[si][pi] = Some((v, took)),
            Ok((Err(why), _)) => cells[si][pi] = Cell::Fail(why),
            Err(e) => cells[si][pi] = Cell::Fail(format!("the scenario task failed: {e}")),
        }
    }
    let mut written = Vec::new();
    for (si, scenario) in Scenario::ALL.iter().enumerate() {
        for (pi, kind) in kinds.iter().enumerate() {
            if let Some((snapshot, took)) = snapshots[si][pi].take() {
                cells[si][pi] = match check_golden(scenario.name(), kind, &snapshot) {
                    Ok(Golden::Same) => Cell::Pass(took),
                    Ok(Golden::Written(p)) => {
                        written.push(p.display().to_string());
                        Cell::Pass(took)
                    }
                    Err(e) => Cell::Fail(format!("{e:#}")),
                };
            }
        }
    }
    Report {
        kinds,
        emulators,
        cells,
        written,
    }
}
