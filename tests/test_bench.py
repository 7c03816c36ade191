"""``tr-align bench`` writes comparable results for every reference mode (no timing asserts)."""

import json

import jax

from tr_align.tools import bench


def test_bench_writes_json_and_table(tiny_config, tmp_path):
    out = str(tmp_path / "b" / "results.json")
    report, table = bench.run(tiny_config(), out, steps=2, warmup=1, devices=jax.devices()[:1])
    saved = json.loads(open(out).read())
    assert [r["mode"] for r in saved["results"]] == ["vanilla", "tr-soft", "tr-hard"]
    by_mode = {r["mode"]: r for r in saved["results"]}
    assert by_mode["vanilla"]["step_time_vs_vanilla"] == 1.0
    assert by_mode["tr-soft"]["alpha"] == 0.6 and by_mode["tr-hard"]["tau"] == 512
    for r in saved["results"]:
        assert r["step_ms_median"] > 0 and r["alias_bytes"] >= r["state_bytes"]
    rows = table.splitlines()[-3:]
    assert [r.split(" | ")[0] for r in rows] == ["| vanilla", "| tr-soft", "| tr-hard"]
    assert open(out + ".md").read().strip() == table
