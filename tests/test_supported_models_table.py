"""The README's "Supported models" table is the rendering of the committed conformance results, which cover
every family of the model zoo (a new family or a hand edit of the table fails here)."""

import json
import sys
from pathlib import Path

from model_zoo import CONFIGS, REFUSED

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import supported_models  # noqa: E402


def test_readme_table_is_generated_from_committed_results():
    results = json.loads(supported_models.RESULTS.read_text())
    assert set(results["families"]) == set(CONFIGS)
    assert set(results["refused"]) == set(REFUSED)
    readme = supported_models.README.read_text()
    assert supported_models._readme_block(readme) == supported_models.render(results)
    for name, row in results["families"].items():
        assert row["generate"] and row["policies"], name
        assert row["flash"] if row["flash_ok"] else row["flash_reason"], name
