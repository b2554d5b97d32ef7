"""bench/common.compare: the implementations take turns, results pool, and paired ratios come per round."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402

# A stand-in for a bench script: appends its name to a log (to see the order of the processes) and reports
# times that drift upwards with every process, the way this VM's CPU does.
FAKE = """
import json, sys
log, name = sys.argv[-3], sys.argv[-1]
with open(log, "a") as f:
    f.write(name + "\\n")
k = len(open(log).read().split())
scale = {"ours": 1.0, "theirs": 2.0}[name]
print("noise on stdout first")
print(json.dumps({"median_s": scale * k, "times": [scale * k, scale * k + 0.5], "peak_gib": k, "load_s": k}))
"""


def test_compare_alternates_pools_and_pairs(tmp_path, monkeypatch):
    script, log = tmp_path / "fake.py", tmp_path / "order.log"
    script.write_text(FAKE)
    monkeypatch.setattr(sys, "argv", ["fake.py"])  # run_impl forwards the parent's own arguments
    res, ratios = common.compare(str(script), {"ours": [str(log), "--impl", "ours"],
                                               "theirs": [str(log), "--impl", "theirs"]}, rounds=3)
    assert log.read_text().split() == ["ours", "theirs"] * 3
    # process k (1-based) of the six reports times k*scale and k*scale + 0.5
    assert res["ours"]["times"] == [1, 1.5, 3, 3.5, 5, 5.5] and res["ours"]["median_s"] == 3.25
    assert res["theirs"]["peak_gib"] == 6 and res["theirs"]["load_s"] == 4
    assert ratios == [1 / 4, 3 / 8, 5 / 12]
    assert common.ratio_text(ratios) == "0.375 (median of 3 paired rounds, 0.250..0.417)"
    assert common.ratio_text([1.0123]) == "1.012"
