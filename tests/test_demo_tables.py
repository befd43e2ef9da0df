"""The demo's numbers in README.md, docs/demo.md and docs/ablation.md are what the committed results render
to (a hand edit or a rerun without regenerating them fails here), and the renderers read what they are
given: a second run's file, results written before a meta key existed."""

import copy
import json

from adaswitch.demo import tables


def test_demo_tables_match_committed_results():
    assert tables.main(["--check"]) == 0
    readme, demo, ablation, real = (doc.read_text() for doc in tables.DOCUMENTS)
    for text in (readme, demo):
        assert "<!-- demo-quick:begin -->" in text and "<!-- demo-rerun:begin -->" in text
    for text in (readme, real):
        assert "<!-- real-pair:begin -->" in text
    assert "<!-- demo-real:begin -->" in real and "<!-- demo-real-summary:begin -->" in readme
    for name in ("window-ablation", "switch-ablation-setting", "switch-ablation", "switch-summary"):
        assert f"<!-- {name}:begin -->" in ablation
    assert "<!-- demo-checkpoints:begin -->" in demo


def test_check_fails_on_a_hand_edit():
    text = tables.DOCUMENTS[2].read_text()
    edited = text.replace("<!-- switch-summary:begin -->\n", "<!-- switch-summary:begin -->\n* typed 1.0\n", 1)
    assert edited != text and tables.updated(edited) == text


def _write(path, results):
    path.write_text(json.dumps(results))
    return path


def test_rerun_block_compares_per_method(tmp_path):
    committed = json.loads(tables.QUICK.read_text())
    rerun = copy.deepcopy(committed)
    rerun["meta"].update(commit="abc1234", machine="Other CPU", date="2027-01-02 03:04 UTC", workers=2,
                         threads_per_worker=1)
    first = rerun["results"][0]
    first["accuracy"] += 0.012
    first["step_accuracy"] -= 0.004
    text = tables.render_rerun(_write(tmp_path / "results.json", committed), _write(tmp_path / "rerun.json", rerun))
    assert "commit abc1234, Other CPU, 2027-01-02 03:04 UTC" in text
    assert f"commit {committed['meta']['commit']}, {committed['meta']['machine']}, {committed['meta']['date']}" in text
    assert "2 runs at a time, 1 torch thread each" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == [r["method"] for r in committed["results"]]
    cells = [c.strip() for c in rows[0].split("|")[2:-1]]
    assert cells[0] == f"{100 * committed['results'][0]['accuracy']:.1f}"
    assert cells[1] == f"{100 * first['accuracy']:.1f}" and cells[2] == "+1.2" and cells[5] == "-0.4"
    assert all(c.split("|")[4].strip() == "+0.0" for c in rows[1:])


def test_rerun_block_without_a_rerun_is_one_line(tmp_path):
    text = tables.render_rerun(tables.QUICK, tmp_path / "rerun.json")
    assert len(text.splitlines()) == 1 and "does not exist" in text


def test_quick_header_renders_results_with_or_without_the_worker_keys():
    results = json.loads(tables.QUICK.read_text())
    meta = results["meta"]
    for key in ("workers", "threads_per_worker", "torch_threads"):
        meta.pop(key, None)
    meta["torch_threads"] = 2  # a file written before the worker pool
    assert "one run at a time, 2 torch threads" in tables.render_quick(results)
    meta.pop("torch_threads")
    meta.update(workers=2, threads_per_worker=1)
    assert "2 runs at a time, 1 torch thread each" in tables.render_quick(results)
    meta.pop("workers")
    assert "threads not recorded" in tables.render_quick(results)
