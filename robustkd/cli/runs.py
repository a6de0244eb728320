"""The ``runs`` verb: the run folders (and damaged ones) with their state, newest first."""

from __future__ import annotations

import argparse
import json

from robustkd.errors import RobustKDError


def _runs(args: argparse.Namespace) -> int:
    from robustkd.runs.liveness import refresh_state
    from robustkd.runs.progress import run_label
    from robustkd.runs.queue import queue_positions
    from robustkd.runs.store import DAMAGED, default_runs_root, list_damaged_runs, list_runs

    root = args.root or default_runs_root()
    rows = []
    positions = queue_positions(root)
    for run in list_runs(root):
        try:
            status = refresh_state(run)
        except RobustKDError as exc:  # damaged since it was listed
            status = {"state": DAMAGED, "message": str(exc)}
        rows.append(
            {
                "id": run.id,
                "state": run_label(status, positions.get(run.id)),
                "kind": status.get("kind"),
                "phase": status.get("phase"),
                "message": status.get("message"),
                "path": str(run.path),
            }
        )
    for damaged in list_damaged_runs(root):  # shown, not hidden: the user decides what to do
        rows.append(
            {
                "id": damaged.id,
                "state": DAMAGED,
                "kind": None,
                "phase": None,
                "message": damaged.reason,
                "path": str(damaged.path),
            }
        )
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print("no runs yet")
    for r in rows if not args.json else []:
        extra = f" ({r['message']})" if r.get("message") else ""
        print(f"{r['id']:<45} {r['state']:<10} {r.get('phase') or ''}{extra}")
    return 0
