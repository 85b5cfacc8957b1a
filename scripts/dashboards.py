#!/usr/bin/env python3
"""Writes the Grafana dashboards of charts/site-recovery/files/dashboards/ from the panels below.

    scripts/dashboards.py          write the JSON files
    scripts/dashboards.py --check  exit 1 if the files differ from what this script writes

Every query names only metrics the services export; tests/tests/dashboards.rs checks that against a
running deployment's /metrics.
"""
import json
import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parent.parent / "charts/site-recovery/files/dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}


class Board:
    def __init__(self, uid, title, description, variables=()):
        self.uid, self.title, self.description = uid, title, description
        self.variables = list(variables)
        self.panels, self.x, self.y, self.row_h = [], 0, 0, 0

    def panel(self, kind, title, targets, w=12, h=8, unit=None, description="", **extra):
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_h
            self.row_h = 0
        p = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DS, "expr": e, "legendFormat": legend}
                for i, (e, legend) in enumerate(targets)
            ],
            "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
            "options": {},
        }
        p.update(extra)
        self.panels.append(p)
        self.x += w
        self.row_h = max(self.row_h, h)

    def json(self):
        templating = [
            {
                "name": "datasource",
                "label": "Prometheus",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
            }
        ]
        for name, label, query in self.variables:
            templating.append(
                {
                    "name": name,
                    "label": label,
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": query, "refId": "var"},
                    "definition": query,
                    "refresh": 2,
                    "sort": 3,
                    "current": {},
                    "hide": 0,
                }
            )
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["site-recovery"],
            "editable": True,
            "schemaVersion": 39,
            "version": 1,
            "time": {"from": "now-6h", "to": "now"},
            "refresh": "30s",
            "timezone": "browser",
            "templating": {"list": templating},
            "annotations": {"list": []},
            "links": [
                {"type": "dashboards", "tags": ["site-recovery"], "title": "Site recovery", "asDropdown": True}
            ],
            "panels": self.panels,
        }


def fleet():
    b = Board("sr-fleet", "Site recovery / Fleet", "Every protected item, process server and master target.")
    b.panel("stat", "Protected items", [('sum(sr_config_server_items{state="protected"})', "")], w=6, h=4)
    b.panel(
        "stat",
        "Items needing attention",
        [('sum(sr_config_server_items{state=~"critical|resync_required"})', "")],
        w=6,
        h=4,
        description="Critical, or waiting for a resync.",
    )
    b.panel("stat", "Worst RPO", [("max(sr_config_server_item_rpo_seconds)", "")], w=6, h=4, unit="s")
    b.panel(
        "stat",
        "Alerts firing",
        [('count(ALERTS{alertstate="firing", alertname=~"SiteRecovery.*"}) or vector(0)', "")],
        w=6,
        h=4,
    )
    b.panel("timeseries", "Items by state", [("sum by (state) (sr_config_server_items)", "{{state}}")])
    b.panel(
        "heatmap",
        "RPO of every item",
        [("sr_config_server_item_rpo_seconds", "{{item}}")],
        unit="s",
        options={"calculate": True, "yAxis": {"unit": "s"}},
    )
    b.panel(
        "timeseries",
        "Churn in and out",
        [
            ("sum(rate(sr_agent_written_bytes_total[5m]))", "written on protected disks"),
            ("sum(rate(sr_agent_shipped_bytes_total[5m]))", "shipped to process servers"),
            ("sum(rate(sr_master_target_applied_bytes_total[5m]))", "applied on replicas"),
        ],
        unit="Bps",
    )
    b.panel(
        "timeseries",
        "Process server throughput",
        [
            ("sum by (instance) (rate(sr_process_server_received_bytes_total[5m]))", "{{instance}} in"),
            ("sum by (instance) (rate(sr_process_server_forwarded_bytes_total[5m]))", "{{instance}} out"),
        ],
        unit="Bps",
    )
    b.panel(
        "timeseries",
        "Process server cache",
        [("sr_process_server_cache_bytes / sr_process_server_cache_limit_bytes", "{{instance}}")],
        unit="percentunit",
    )
    b.panel(
        "timeseries",
        "CPU by component",
        [("rate(sr_process_cpu_milliseconds_total[5m]) / 1000", "{{job}} {{instance}}")],
        unit="short",
        description="Cores busy.",
    )
    b.panel(
        "timeseries",
        "Master target apply rate",
        [("sum by (instance) (rate(sr_master_target_applied_bytes_total[5m]))", "{{instance}}")],
        unit="Bps",
    )
    b.panel(
        "timeseries",
        "Master target undo and free space",
        [
            ("sum by (instance) (sr_master_target_undo_bytes)", "{{instance}} undo journals"),
            ("sr_master_target_volume_free_bytes", "{{instance}} free"),
        ],
        unit="bytes",
    )
    b.panel(
        "table",
        "Alerts firing",
        [('ALERTS{alertstate="firing", alertname=~"SiteRecovery.*"}', "")],
        w=24,
        targets_format="table",
    )
    for p in b.panels:
        if p.pop("targets_format", None):
            for t in p["targets"]:
                t["format"], t["instant"] = "table", True
    return b


def item():
    b = Board(
        "sr-item",
        "Site recovery / Item",
        "One protected item: RPO, state, journal headroom, recovery points, resync.",
        variables=[
            ("item", "Item", "label_values(sr_config_server_item_state, item)"),
            ("machine", "Machine", 'label_values(sr_config_server_item_state{item="$item"}, machine)'),
        ],
    )
    b.panel(
        "timeseries",
        "RPO",
        [
            ('sr_config_server_item_rpo_seconds{item="$item"}', "RPO"),
            ('sr_config_server_item_rpo_threshold_seconds{item="$item"}', "policy threshold"),
        ],
        unit="s",
    )
    b.panel(
        "state-timeline",
        "State",
        [('sr_config_server_item_state{item="$item"} == 1', "{{state}}")],
    )
    b.panel(
        "timeseries",
        "Changes not yet on the replica",
        [
            (
                'sr_agent_replication_lag_changes * on (instance) group_left (node) sr_agent_info{node="$machine"}',
                "agent {{disk}}",
            ),
            ('sr_process_server_replication_lag_changes{item="$item"}', "process server disk {{disk}}"),
        ],
    )
    b.panel(
        "timeseries",
        "Journal headroom",
        [
            (
                "(1 - sr_agent_journal_bytes / sr_agent_journal_limit_bytes)"
                ' * on (instance) group_left (node) sr_agent_info{node="$machine"}',
                "{{disk}}",
            )
        ],
        unit="percentunit",
        description="The share of the journal's limit still free; at 0 the disk needs a resync.",
    )
    b.panel(
        "timeseries",
        "Recovery-point range",
        [
            ('sr_master_target_oldest_point_age_seconds{item="$item"}', "oldest point, disk {{disk}}"),
            ('sr_master_target_inconsistent_window_seconds{item="$item"}', "open window, disk {{disk}}"),
        ],
        unit="s",
        description="Any instant from the oldest point to now can be recovered.",
    )
    b.panel(
        "timeseries",
        "Initial replication and resync progress",
        [
            ('sr_config_server_item_sync_progress_ratio{item="$item"}', "item"),
            (
                'sr_agent_resync_compared_ratio * on (instance) group_left (node) sr_agent_info{node="$machine"}',
                "compared, {{disk}}",
            ),
            (
                "sr_agent_initial_copy_progress_ratio"
                ' * on (instance) group_left (node) sr_agent_info{node="$machine"}',
                "initial copy, {{disk}}",
            ),
        ],
        unit="percentunit",
    )
    b.panel(
        "timeseries",
        "Undo journal",
        [('sr_master_target_undo_bytes{item="$item"}', "disk {{disk}}")],
        unit="bytes",
    )
    b.panel(
        "timeseries",
        "Writes and shipping",
        [
            (
                'rate(sr_agent_written_bytes_total[5m]) * on (instance) group_left (node) sr_agent_info{node="$machine"}',
                "written {{disk}}",
            ),
            (
                'rate(sr_agent_shipped_bytes_total[5m]) * on (instance) group_left (node) sr_agent_info{node="$machine"}',
                "shipped {{disk}}",
            ),
        ],
        unit="Bps",
    )
    return b


def control_plane():
    b = Board("sr-control-plane", "Site recovery / Control plane", "Jobs, registrations and heartbeats.")
    b.panel(
        "timeseries",
        "Jobs ended by kind and result",
        [("sum by (kind, result) (increase(sr_config_server_jobs_total[1h]))", "{{kind}} {{result}}")],
        description="Per hour.",
    )
    b.panel(
        "timeseries",
        "Jobs started by kind",
        [("sum by (kind) (increase(sr_config_server_jobs_started_total[1h]))", "{{kind}}")],
        description="Per hour.",
    )
    b.panel(
        "timeseries",
        "Registrations",
        [
            ("sum by (role) (increase(sr_config_server_registrations_total[1h]))", "{{role}}"),
            ("increase(sr_config_server_registrations_refused_total[1h])", "refused"),
        ],
        description="Per hour.",
    )
    b.panel(
        "timeseries",
        "Seconds since each component's last heartbeat",
        [
            ("sr_config_server_component_heartbeat_age_seconds >= 0", "{{role}} {{component}}"),
            ("max(sr_config_server_component_timeout_seconds)", "timeout"),
        ],
        unit="s",
    )
    b.panel(
        "stat",
        "Components up by role",
        [("sum by (role) (sr_config_server_component_up)", "{{role}}")],
        w=12,
        h=6,
    )
    b.panel(
        "timeseries",
        "Configuration server CPU and memory",
        [
            ('rate(sr_process_cpu_milliseconds_total{job=~".*config-server.*"}[5m]) / 1000', "cores"),
            ('sr_process_resident_memory_bytes{job=~".*config-server.*"}', "resident bytes"),
        ],
        h=6,
    )
    b.panel(
        "table",
        "Certificates by expiry",
        [("sort(sr_tls_certificate_expiry_timestamp_seconds - time())", "")],
        w=24,
        unit="s",
    )
    for t in b.panels[-1]["targets"]:
        t["format"], t["instant"] = "table", True
    return b


def main():
    check = "--check" in sys.argv[1:]
    differ = []
    for name, board in [("fleet", fleet()), ("item", item()), ("control-plane", control_plane())]:
        text = json.dumps(board.json(), indent=2, sort_keys=True) + "\n"
        path = OUT / f"{name}.json"
        if check:
            if not path.exists() or path.read_text() != text:
                differ.append(str(path))
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if differ:
        print("dashboards differ from scripts/dashboards.py; run it: " + ", ".join(differ), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
