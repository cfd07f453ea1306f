//! `vfud bench --compare OLD.json`: this run's ratios against a saved `--json` run, scenario
//! by scenario, so a change can be judged against the last measurement. Rows keep their
//! names across commits; a row only one side has is listed as new or gone.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::harness::Row;

/// One scenario in both runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// Scenario and metric.
    pub name: String,
    /// Ratio in the old run (`None`: the row is new).
    pub old: Option<f64>,
    /// Ratio now (`None`: the row is gone).
    pub new: Option<f64>,
}

impl Change {
    /// New ratio over old ratio (> 1: the ratio grew).
    pub fn factor(&self) -> Option<f64> {
        match (self.old, self.new) {
            (Some(o), Some(n)) if o != 0.0 => Some(n / o),
            _ => None,
        }
    }
}

/// The rows of a saved `vfud bench --json` document as scenario → ratio.
pub fn ratios(doc: &Value) -> Result<BTreeMap<String, f64>> {
    let rows = doc["rows"]
        .as_array()
        .context("not a `vfud bench --json` document (no \"rows\")")?;
    Ok(rows
        .iter()
        .filter_map(|r| Some((r["scenario"].as_str()?.to_string(), r["ratio"].as_f64()?)))
        .collect())
}

/// Pair this run's rows with the old ratios, in this run's order, then the rows that went.
pub fn compare(rows: &[Row], old: &BTreeMap<String, f64>) -> Vec<Change> {
    let mut out: Vec<Change> = rows
        .iter()
        .map(|r| Change {
            name: r.name.clone(),
            old: old.get(&r.name).copied(),
            new: Some(r.ratio()),
        })
        .collect();
    for (name, ratio) in old {
        if !rows.iter().any(|r| &r.name == name) {
            out.push(Change {
                name: name.clone(),
                old: Some(*ratio),
                new: None,
            });
        }
    }
    out
}

/// Read `path` and compare.
pub fn load_and_compare(path: &Path, rows: &[Row]) -> Result<Vec<Change>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(compare(rows, &ratios(&doc)?))
}

/// The comparison as a table.
pub fn table(changes: &[Change]) -> String {
    let f = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.3}"));
    let mut s = format!(
        "{:<47}  {:>9}  {:>9}  {:>8}\n",
        "scenario", "old ratio", "new ratio", "change"
    );
    s.push_str(&format!("{}\n", "-".repeat(47 + 2 + 9 + 2 + 9 + 2 + 8)));
    for c in changes {
        let change = match (c.old, c.new, c.factor()) {
            (None, _, _) => "new".to_string(),
            (_, None, _) => "gone".to_string(),
            (_, _, Some(x)) => format!("×{x:.3}"),
            _ => "—".to_string(),
        };
        s.push_str(&format!(
            "{:<47}  {:>9}  {:>9}  {:>8}\n",
            c.name,
            f(c.old),
            f(c.new),
            change
        ));
    }
    s
}

/// The comparison for `--json` output.
pub fn to_json(changes: &[Change]) -> Value {
    changes
        .iter()
        .map(|c| json!({"scenario": c.name, "old_ratio": c.old, "new_ratio": c.new, "change": c.factor()}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::harness::{Goal, Unit};
    use super::*;

    #[test]
    fn rows_pair_by_name_and_new_and_gone_rows_are_listed() {
        let rows = vec![
            Row::new("a", Unit::Us, 2.0, 1.0, "raw", Goal::None),
            Row::new("b", Unit::Us, 3.0, 1.0, "raw", Goal::None),
        ];
        let old =
            json!({"rows": [{"scenario": "a", "ratio": 4.0}, {"scenario": "c", "ratio": 1.0}]});
        let changes = compare(&rows, &ratios(&old).unwrap());
        assert_eq!(changes[0].factor(), Some(0.5));
        assert_eq!(changes[1].old, None);
        assert_eq!(changes[2].new, None);
        let t = table(&changes);
        assert!(
            t.contains("×0.500") && t.contains("new") && t.contains("gone"),
            "{t}"
        );
        assert!(ratios(&json!({"x": 1})).is_err());
    }
}
