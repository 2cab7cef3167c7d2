#!/usr/bin/env python3
"""Renders target/soak-results/*.json (written by `make soak`) into the table of
docs/reliability.md, between the <!-- soak-table --> markers."""
import json
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent
results = root / "target" / "soak-results"
doc = root / "docs" / "reliability.md"

ORDER = [
    "faults_archive_300_segments", "faults_pitr", "crash_wal_push", "crash_backup_push",
    "crash_backup_fetch", "hang_black_holes", "full_disk",
]
SKIP = {"scenario", "seed", "seconds", "date", "rerun", "trials", "failures"}


def fmt(v):
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def main():
    rows = []
    for name in ORDER:
        f = results / f"{name}.json"
        if not f.exists():
            rows.append(f"| {name} | not run | | | | |")
            continue
        r = json.loads(f.read_text())
        figures = "; ".join(f"{k.replace('_', ' ')}: {fmt(v)}" for k, v in r.items() if k not in SKIP)
        rows.append(
            f"| `{name}` | {r.get('trials')} | {figures} | **{r.get('failures')}** | "
            f"{r.get('seconds'):.0f} s, {r.get('date')}, seed {r.get('seed')} | `{r.get('rerun')}` |"
        )
    table = "\n".join([
        "| scenario | trials | figures from the last run | failures | run | rerun |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    text = doc.read_text()
    start, end = "<!-- soak-table -->", "<!-- /soak-table -->"
    if start not in text or end not in text:
        sys.exit(f"{doc}: no {start} ... {end} markers")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    doc.write_text(f"{before}{start}\n{table}\n{end}{after}")
    print(f"rendered {len(ORDER)} scenarios into {doc}")


if __name__ == "__main__":
    main()
