"""The demo tables in README.md and docs/demo.md are what the committed results render to (a hand edit or
a rerun without regenerating them fails here)."""

from adaswitch.demo import tables


def test_demo_tables_match_committed_results():
    assert tables.main(["--check"]) == 0
    for doc in tables.DOCUMENTS:
        assert "<!-- demo-quick:begin -->" in doc.read_text()
