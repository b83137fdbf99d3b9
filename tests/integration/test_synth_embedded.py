"""`finemed synth score`, `classify`, `filter` and `finemed report` through the real CLI, with the embedded
GGUF as judge, on 3 of our example questions: every record gets schema-valid scores and a department."""

from __future__ import annotations

import json

import pytest

from tests.conftest import EXAMPLES
from tests.integration.test_cli import finemed, read

pytestmark = pytest.mark.integration


def test_score_classify_filter_report_on_three_questions(tmp_path):
    src = tmp_path / "q.jsonl"
    src.write_text("".join(line + "\n" for line in (EXAMPLES / "questions.jsonl").read_text().splitlines()[:3]))
    scored, classified, kept = tmp_path / "scored.jsonl", tmp_path / "classified.jsonl", tmp_path / "kept.jsonl"
    assert "3 in -> 3 written, 0 rejected" in finemed("synth", "score", src, "-o", scored, "--no-progress").stdout
    for r in read(scored):
        assert all(r[k] in range(1, 11) for k in ("quality", "complexity", "relevance"))
        assert isinstance(r["case_specific"], bool) and r["judge"]["model"].endswith(".gguf")
    assert "3 written" in finemed("synth", "classify", scored, "-o", classified, "--no-progress").stdout
    from finemed_cli.synth.taxonomy import DEPARTMENTS

    for r in read(classified):
        assert r["department"] in DEPARTMENTS
        assert r["subdepartment"] is None or r["subdepartment"] in DEPARTMENTS[r["department"]]
    proc = finemed("synth", "filter", classified, "-o", kept, "--keep-case-specific", "--no-progress")
    assert "3 in -> 3 written" in proc.stdout and {r["tier"] for r in read(kept)} <= {"complex", "common"}
    out = tmp_path / "report"
    finemed("report", classified, "-o", out, "--no-tsne")
    assert (out / "scores.png").stat().st_size > 2000 and "3 records" in (out / "summary.md").read_text()
    assert json.loads((tmp_path / "classified.jsonl").read_text().splitlines()[0])["id"] == "ex-q01"


def test_synth_run_on_three_texts_accounts_for_every_input(tmp_path):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(f"raw: {EXAMPLES / 'raw.jsonl'}\nout_dir: {tmp_path / 'out'}\nlimit: 3\nkeep_case_specific: true\n"
                   "respond_max_tokens: 64\n")
    proc = finemed("synth", "run", cfg, "--no-progress")
    assert "questions: 3 in -> 6 written, 0 rejected" in proc.stdout
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary] == ["questions", "score", "classify", "filter", "respond", "pairs"]
    for s in summary[1:]:  # every stage's inputs are all written or rejected
        assert s["written"] + s["rejected"] == s["inputs"], s
    pairs = read(out / "pairs.jsonl")
    assert pairs and all(p["kind"] == "cold-start" and p["chosen"].startswith("## Thought") for p in pairs)
    corpus = read(out / "corpus.jsonl")
    assert corpus and corpus[0]["reasoning"] and corpus[0]["answer"] and corpus[0]["department"]
