"""bench/fairshare.py in its tiny mode, so it can't silently rot. Measures nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import fairshare  # noqa: E402


def test_quick_run_reports_every_mode(tmp_path: Path) -> None:
    out = tmp_path / "fairshare.json"
    res = fairshare.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text()).keys() == res.keys()
    for name in ("uncontended", "fifo", "fair"):
        assert len(res[name]["latencies_s"]) == 2
        assert res[name]["mean_s"] > 0 and res[name]["ratio"] > 0
    assert res["uncontended"]["ratio"] == 1.0
