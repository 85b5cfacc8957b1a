//! The Grafana dashboards and the Prometheus alert rules name only what the services export: every
//! PromQL expression in `charts/site-recovery/files/` is parsed, and each metric it selects, each label
//! it matches or groups by, must appear in the `/metrics` of a running deployment (configuration
//! server, process server, master target and agent, one item protected and resynchronized).

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use promql_parser::parser::{self, Expr, LabelModifier};
use promql_parser::util::{walk_expr, ExprVisitor};
use sr_tests::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Labels Prometheus adds to what it scrapes, or that belong to its own series.
const TARGET_LABELS: &[&str] = &["job", "instance", "pod", "namespace", "service", "container", "endpoint"];
/// Series Prometheus makes itself.
const PROMETHEUS_SERIES: &[&str] = &["ALERTS", "ALERTS_FOR_STATE", "up"];

fn chart_files() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/site-recovery/files")
}

/// One PromQL expression and where it came from.
struct Query {
    whence: String,
    expr: String,
}

/// Every query of the dashboards: panel targets, and the selectors of `label_values(...)` variables
/// (with the label they read). Grafana's `$var` references become a value.
fn dashboard_queries() -> Vec<Query> {
    let mut out = Vec::new();
    let dir = chart_files().join("dashboards");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    assert!(names.len() >= 3, "fleet, item and control-plane dashboards in {}", dir.display());
    for path in names {
        let board: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        assert!(board["uid"].is_string() && board["title"].is_string(), "{file}: uid and title");
        let panels = board["panels"].as_array().unwrap();
        assert!(!panels.is_empty(), "{file}: no panels");
        let mut ids = BTreeSet::new();
        for p in panels {
            assert!(ids.insert(p["id"].as_u64().unwrap()), "{file}: panel ids are unique");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file}: panel {} has no query", p["title"]);
            for t in targets {
                let expr = t["expr"].as_str().unwrap();
                out.push(Query { whence: format!("{file}: panel {}", p["title"]), expr: grafana_vars(expr) });
            }
        }
        for v in board["templating"]["list"].as_array().unwrap() {
            let Some(def) = v["definition"].as_str() else { continue };
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|s| s.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{file}: variable {}: only label_values(selector, label)", v["name"]));
            let (selector, label) = inner.rsplit_once(',').unwrap();
            // `selector` grouped by `label`: the label must exist like any grouping label.
            let expr = format!("count by ({}) ({})", label.trim(), selector.trim());
            out.push(Query { whence: format!("{file}: variable {}", v["name"]), expr: grafana_vars(&expr) });
        }
    }
    out
}

fn grafana_vars(expr: &str) -> String {
    expr.replace("$item", "1").replace("$machine", "m")
}

/// Every `expr:` of the alert rules. The file keeps each expression inline or as a folded block
/// (`>-`); promtool checks the YAML itself in CI.
fn rule_queries() -> Vec<Query> {
    let path = chart_files().join("rules.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut alert = String::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim_start();
        if let Some(a) = l.strip_prefix("- alert:") {
            alert = a.trim().to_string();
        }
        if let Some(e) = l.strip_prefix("expr:") {
            let indent = lines[i].len() - l.len();
            let mut expr = e.trim().to_string();
            if expr == ">-" || expr == ">" {
                expr.clear();
                while i + 1 < lines.len() && lines[i + 1].len() - lines[i + 1].trim_start().len() > indent {
                    i += 1;
                    expr.push_str(lines[i].trim());
                    expr.push(' ');
                }
            }
            out.push(Query { whence: format!("rules.yaml: {alert}"), expr });
        }
        i += 1;
    }
    assert!(out.len() >= 10, "the rules file lost its alerts: {}", out.len());
    out
}

/// What a query selects: each metric with the labels it matches, and the labels it groups by.
#[derive(Default)]
struct Uses {
    selectors: Vec<(String, Vec<String>)>,
    grouping: Vec<String>,
}

impl ExprVisitor for Uses {
    type Error = String;
    fn pre_visit(&mut self, e: &Expr) -> Result<bool, String> {
        let vs = match e {
            Expr::VectorSelector(vs) => Some(vs),
            Expr::MatrixSelector(ms) => Some(&ms.vs),
            _ => None,
        };
        if let Some(vs) = vs {
            let name = vs.name.clone().ok_or("a selector without a metric name")?;
            let labels = vs.matchers.matchers.iter().map(|m| m.name.clone()).filter(|n| n != "__name__").collect();
            self.selectors.push((name, labels));
        }
        if let Expr::Aggregate(a) = e {
            if let Some(LabelModifier::Include(l)) = &a.modifier {
                self.grouping.extend(l.labels.iter().cloned());
            }
        }
        if let Expr::Binary(b) = e {
            if let Some(m) = &b.modifier {
                if let Some(promql_parser::parser::LabelModifier::Include(l)) = &m.matching {
                    self.grouping.extend(l.labels.iter().cloned());
                }
                if let promql_parser::parser::VectorMatchCardinality::ManyToOne(l)
                | promql_parser::parser::VectorMatchCardinality::OneToMany(l) = &m.card
                {
                    self.grouping.extend(l.labels.iter().cloned());
                }
            }
        }
        Ok(true)
    }
}

/// Metric families in Prometheus text format: each name with every label name its samples carry.
/// Histogram and summary samples (`_bucket`, `_sum`, `_count`) count for their family too.
fn families(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let mut labels = BTreeSet::new();
        if line[name_end..].starts_with('{') {
            // name="value" pairs; values may hold escaped quotes and commas.
            let mut rest = &line[name_end + 1..];
            while let Some(eq) = rest.find('=') {
                labels.insert(rest[..eq].trim_start_matches(',').trim().to_string());
                let mut chars = rest[eq + 2..].char_indices();
                let mut end = 0;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            end = i;
                            break;
                        }
                        _ => {}
                    }
                }
                rest = &rest[eq + 2 + end + 1..];
                if rest.starts_with('}') {
                    break;
                }
            }
        }
        for suffix in ["", "_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix).filter(|_| !suffix.is_empty()) {
                out.entry(base.to_string()).or_default().extend(labels.iter().filter(|l| *l != "le").cloned());
            }
        }
        out.entry(name.to_string()).or_default().extend(labels);
    }
    out
}

/// What `queries` name that `exported` lacks, one line each.
fn missing(queries: &[Query], exported: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut out = Vec::new();
    for q in queries {
        let ast = match parser::parse(&q.expr) {
            Ok(a) => a,
            Err(e) => {
                out.push(format!("{}: does not parse: {e}: {}", q.whence, q.expr));
                continue;
            }
        };
        let mut uses = Uses::default();
        if let Err(e) = walk_expr(&mut uses, &ast) {
            out.push(format!("{}: {e}: {}", q.whence, q.expr));
            continue;
        }
        let mut named_labels = BTreeSet::new();
        for (name, labels) in &uses.selectors {
            if PROMETHEUS_SERIES.contains(&name.as_str()) {
                continue;
            }
            let Some(have) = exported.get(name) else {
                out.push(format!("{}: metric {name} is not exported", q.whence));
                continue;
            };
            named_labels.extend(have.iter().cloned());
            for l in labels.iter().filter(|l| !TARGET_LABELS.contains(&l.as_str())) {
                if !have.contains(l) {
                    out.push(format!("{}: metric {name} has no label {l}", q.whence));
                }
            }
        }
        for l in uses.grouping.iter().filter(|l| !TARGET_LABELS.contains(&l.as_str())) {
            if !named_labels.contains(l) {
                out.push(format!("{}: groups by {l}, which none of its metrics has", q.whence));
            }
        }
    }
    out
}

#[test]
fn the_checker_finds_unknown_metrics_labels_and_bad_syntax() {
    let exported =
        families("# TYPE a counter\na_total{item=\"1\",state=\"x,\\\"y\"} 1\nb 2\nh_bucket{le=\"1\",disk=\"d\"} 3\n");
    assert_eq!(exported["a_total"], BTreeSet::from(["item".to_string(), "state".to_string()]));
    assert_eq!(exported["h"], BTreeSet::from(["disk".to_string()]));
    let q = |e: &str| Query { whence: "t".into(), expr: e.into() };
    let good = [
        q("sum by (state) (rate(a_total{item=\"1\"}[5m])) / on (instance) b"),
        q("histogram_quantile(0.9, sum by (le, disk) (rate(h_bucket[5m])))"),
        q("up"),
    ];
    assert_eq!(missing(&good, &exported), Vec::<String>::new());
    let bad =
        [q("c"), q("a_total{disk=\"d\"}"), q("sum by (machine) (b)"), q("rate(b[5m]"), q("b * on (disk) a_total")];
    let found = missing(&bad, &exported);
    assert_eq!(found.len(), 5, "{found:#?}");
}

#[test]
fn dashboards_and_alert_rules_name_only_exported_metrics() {
    let dir = test_dir();
    let disk = dir.path().join("source.img");
    make_disk(&disk, 8 << 20).unwrap();
    let d = Deployment::start(dir.path());
    let local = d.site(&dir.path().join("site"), "", &disk);
    // Recovery-point gauges are set at each retention run: one a second here.
    let _mt = local.start_env(Component::MasterTarget, &[("SR_MT__POINTS__EXPIRY_INTERVAL_SECS", "1")]).unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();
    let item = d.protect(&local.node(Component::Agent));
    qemu_io(&local.agent_uri("disk0"), &["write -P 0x5a 0 1M".into(), "flush".into()]).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    // A resync, for its progress metrics.
    d.srctl(&["resync", &item.to_string(), "--watch"]);
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();

    let mut exported: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // The fleet gauges are set each second, the master target's point gauges at each retention run:
    // wait until they name the item.
    let has = |text: &str, what: &[&str]| what.iter().all(|w| text.contains(w));
    let cs_metrics = wait_until("the configuration server's item gauges", Duration::from_secs(20), || {
        let client = d.cp.client(&d.admin).ok()?;
        let (_, text) = client.request(d.cp.api, "GET", "/metrics", None).ok()?;
        has(&text, &["sr_config_server_item_state{", "sr_config_server_item_rpo_seconds{"]).then_some(text)
    });
    let mt_metrics = wait_until("the master target's point gauges", Duration::from_secs(20), || {
        let text = local.metrics(Component::MasterTarget).ok()?;
        has(&text, &["sr_master_target_oldest_point_age_seconds{"]).then_some(text)
    });
    for text in [
        cs_metrics,
        local.metrics(Component::ProcessServer).unwrap(),
        mt_metrics,
        local.metrics(Component::Agent).unwrap(),
    ] {
        for (name, labels) in families(&text) {
            exported.entry(name).or_default().extend(labels);
        }
    }
    let queries: Vec<Query> = dashboard_queries().into_iter().chain(rule_queries()).collect();
    let found = missing(&queries, &exported);
    assert!(found.is_empty(), "queries name what no service exports:\n{}", found.join("\n"));
}
