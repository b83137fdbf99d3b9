"""The real `finemed` CLI on the embedded defaults (SmolLM2-135M-Instruct, all-MiniLM-L6-v2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import EXAMPLES

pytestmark = pytest.mark.integration
FINEMED = [sys.executable, "-m", "finemed_cli"]


def finemed(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*FINEMED, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"finemed {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("idx") / "corpus.index"
    proc = finemed("index", "build", EXAMPLES / "corpus.jsonl", "-o", out)
    assert "60 records, 384-d" in proc.stdout
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["embedder"] == "sentence-transformers/all-MiniLM-L6-v2" and manifest["count"] == 60
    assert len(manifest["corpus_sha256"]) == 64 and "torch" in manifest["versions"]
    return out


def test_index_query_finds_the_topical_neighbour(index_dir):
    proc = finemed("index", "query", index_dir, "first-line oral drug for type 2 diabetes", "-k", "2")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and "Endocrinology" in lines[0]


def test_answer_with_lora_ttt_writes_records(index_dir, tmp_path):
    out = tmp_path / "answers.jsonl"
    proc = finemed("answer", EXAMPLES / "questions.jsonl", "-o", out, "--index", index_dir, "--limit", "2",
                   "--max-new-tokens", "24", "--no-progress")
    records = read(out)
    assert [r["id"] for r in records] == ["ex-q01", "ex-q02"]
    for r in records:
        assert r["model"] == "SmolLM2-135M-Instruct"
        assert r["neighbours"] and r["neighbours"][0]["id"].startswith("ex-c")
        assert r["ttt"]["mode"] == "lora" and r["ttt"]["loss_after"] < r["ttt"]["loss_before"]
        assert 0 < r["generation"]["tokens"] <= 24 and r["response"]
    assert "2 answered" in proc.stdout


def test_answer_with_the_ggml_ttt_engine_loads_no_torch_model(index_dir, tmp_path):
    """`--ttt-engine ggml`: the adapter is trained by ggml on the GGUF llama.cpp generates from; the answer
    records the step, and the run never builds the torch model (its loader is not reached)."""
    out = tmp_path / "answers.jsonl"
    proc = finemed("answer", EXAMPLES / "questions.jsonl", "-o", out, "--index", index_dir, "--limit", "1",
                   "--max-new-tokens", "8", "--ttt-engine", "ggml", "--no-progress", "-vv")
    (r,) = read(out)
    assert r["ttt"]["mode"] == "lora" and r["ttt"]["loss_after"] < r["ttt"]["loss_before"]
    assert r["generation"]["backend"] == "llama.cpp" and r["settings"]["ttt"]["engine"] == "ggml"
    assert "answer: loading the model" not in proc.stderr


def test_answer_resumes_after_kill(index_dir, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = [*FINEMED, "answer", str(EXAMPLES / "questions.jsonl"), "-o", str(out), "--index", str(index_dir),
            "--limit", "3", "--max-new-tokens", "8", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 1):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert out.read_bytes().count(b"\n") >= 1
    finemed(*args[3:])
    ids = [r["id"] for r in read(out)]
    assert ids == ["ex-q01", "ex-q02", "ex-q03"]


def test_answer_refuses_an_index_of_another_embedder(index_dir, tmp_path):
    proc = finemed("answer", EXAMPLES / "questions.jsonl", "-o", tmp_path / "a.jsonl", "--index", index_dir,
                   "--embedder", "BAAI/bge-large-en-v1.5", check=False)
    assert proc.returncode == 2
    assert "built with embedder 'sentence-transformers/all-MiniLM-L6-v2'" in proc.stderr
    assert "Traceback" not in proc.stderr


BAD_INPUTS = {
    "malformed": (b'{"id": "a", "question": "ok?"}\n{"id": "b", "question": \n', ":2: invalid JSON"),
    "missing_field": (b'{"id": "a"}\n', ":1: missing field 'question'"),
    "empty": (b"", "no records"),
    "option_letter": (b'{"id": "a", "question": "q?", "options": {"A": "x", "B": "y", "X": "z"}}\n',
                      ":1: field 'options' has key 'X'"),
    "answer_letter": (b'{"id": "a", "question": "q?", "options": {"A": "x", "B": "y"}, "answer": "E"}\n',
                      ":1: field 'answer' is 'E'"),
    "not_utf8": ('{"id": "a", "question": "caf\u00e9?"}\n'.encode("latin-1"), ":1: not valid UTF-8"),
    "duplicate": (b'{"id": "a", "question": "q?"}\n{"id": "a", "question": "r?"}\n', ":2: duplicate id 'a'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_and_line(case, tmp_path):
    data, expected = BAD_INPUTS[case]
    bad = tmp_path / f"{case}.jsonl"
    bad.write_bytes(data)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "earlier", "response": "kept"}\n')
    proc = finemed("answer", bad, "-o", out, "--no-ttt", check=False)
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert out.read_bytes() == b'{"id": "earlier", "response": "kept"}\n'  # nothing already written is lost


def test_answer_with_no_index_indexes_the_shipped_corpus_once(tmp_path):
    # A FINEMED_HOME of its own for the index, sharing the session's materialised models (no rebuild of them).
    home = tmp_path / "home"
    home.mkdir()
    for entry in Path(os.environ["FINEMED_HOME"]).iterdir():
        if entry.name != "index":
            (home / entry.name).symlink_to(entry)
    env = {**os.environ, "FINEMED_HOME": str(home)}

    def answer(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*FINEMED, "answer", str(EXAMPLES / "questions.jsonl"), *args], capture_output=True,
                              text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc

    out = tmp_path / "a.jsonl"
    first = answer("-o", str(out), "--limit", "1", "--max-new-tokens", "8", "--no-progress")
    (index,) = (home / "index").iterdir()
    assert f"no --index: TTT retrieves from finemed's example corpus, indexing it once into {index}" in first.stderr
    assert first.stderr.splitlines()[0].startswith("no --index")  # before anything else is loaded
    (rec,) = read(out)
    assert rec["ttt"]["mode"] == "lora" and rec["neighbours"][0]["id"].startswith("ex-c")
    manifest = (index / "manifest.json").read_bytes()
    again = answer("-o", str(out), "--limit", "1", "--max-new-tokens", "8", "--no-progress")
    assert f"indexed in {index}" in again.stderr and (index / "manifest.json").read_bytes() == manifest
    plain = answer("-o", str(tmp_path / "b.jsonl"), "--no-ttt", "--limit", "1", "--max-new-tokens", "8",
                   "--no-progress")
    assert "no --index" not in plain.stderr


def test_help_is_instant():
    start = time.perf_counter()
    finemed("--help")
    proc = subprocess.run([*FINEMED[:1], "-X", "importtime", "-m", "finemed_cli", "--help"],
                          capture_output=True, text=True)
    assert "torch" not in {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
    assert time.perf_counter() - start < 20


def test_eval_loglik_ttt_against_no_ttt_writes_the_report_and_resumes(index_dir, tmp_path):
    out = tmp_path / "report"
    args = ("eval", EXAMPLES / "questions.jsonl", "--mode", "loglik", "--index", index_dir, "--limit", "4",
            "-o", out, "--no-progress")
    proc = finemed(*args)
    assert "ttt: accuracy" in proc.stdout and "McNemar" in proc.stdout
    body = orjson.loads((out / "report.json").read_bytes())
    assert body["items"] == 4 and set(body["results"]) == {"ttt", "no-ttt", "ttt:norm", "no-ttt:norm"}
    assert body["results"]["ttt"]["by_department"]
    assert [(c["a"], c["b"]) for c in body["comparisons"]] == [("ttt", "no-ttt"), ("ttt:norm", "no-ttt:norm")]
    assert {r["id"] for r in read(out / "loglik" / "ttt.jsonl")} == {f"ex-q0{i}" for i in range(1, 5)}
    for name in ("report.md", "accuracy.png", "relevance.png"):
        assert (out / name).stat().st_size > 500
    assert body["config"]["ttt"]["steps"] == 1 and body["config"]["ttt"]["lr"] == 3e-3  # resolved, not null
    assert body["results"]["ttt"]["relevance"]["neighbours"] == 4 and "relevance" not in body["results"]["no-ttt"]
    (lm_eval,) = (out / "lm-eval" / "ttt").glob("results_*.json")
    lm = orjson.loads(lm_eval.read_bytes())
    assert sum(r["sample_len"] for t, r in lm["results"].items() if t not in lm.get("groups", {})) == 4
    assert lm["config"]["model"] and all("acc_norm,none" in r for r in lm["results"].values())
    before = (out / "loglik" / "no-ttt.jsonl").read_bytes()
    finemed(*args)  # a rerun finds every item done: nothing recomputed, nothing lost
    assert (out / "loglik" / "no-ttt.jsonl").read_bytes() == before


@pytest.mark.slow  # 51 s (eight runs): make test keeps eval's resume (test_eval_loglik_ttt_against_no_ttt...) and check_resume's unit tests
def test_eval_rerun_scores_against_the_current_key_and_refuses_other_settings(tmp_path):
    rows = [orjson.loads(line) for line in (EXAMPLES / "questions.jsonl").read_bytes().splitlines()[:3]]
    qs = tmp_path / "qs.jsonl"
    qs.write_bytes(b"\n".join(map(orjson.dumps, rows)) + b"\n")
    out = tmp_path / "r"
    args = ("eval", qs, "--mode", "loglik", "--compare", "no-ttt", "-o", out, "--no-progress", "--seed", "3")
    finemed(*args)
    preds = {r["id"]: r["prediction"] for r in read(out / "loglik" / "no-ttt.jsonl")}
    for r in rows:  # the answer key is corrected to what the model predicted: the rerun must score 3 of 3
        r["answer"] = preds[r["id"]]
    qs.write_bytes(b"\n".join(map(orjson.dumps, rows)) + b"\n")
    before = (out / "loglik" / "no-ttt.jsonl").read_bytes()
    assert "no-ttt: accuracy 100.0%" in finemed(*args).stdout
    assert (out / "loglik" / "no-ttt.jsonl").read_bytes() == before  # resumed, not recomputed
    assert "no-ttt: accuracy 100.0%" in finemed(*args[:-1], "4").stdout  # no TTT: the seed changes nothing
    proc = finemed(*args, "--dtype", "float16", check=False)
    assert proc.returncode != 0 and "no-ttt.jsonl holds results made with dtype=" in proc.stderr
    assert "this run has dtype='float16'" in proc.stderr
    from finemed_cli.modeling.prompts import SYSTEM_PROMPT

    body = orjson.loads((out / "report.json").read_bytes())
    assert body["config"]["system_prompts"] == {"SmolLM2-135M-Instruct": SYSTEM_PROMPT}
    proc = finemed(*args, "--system-prompt", "Be brief.", check=False)  # results made under another prompt
    assert proc.returncode != 0 and "this run has system_prompt='Be brief.'" in proc.stderr
    # --limit with --drop-contaminated looks only at the first items: the open questions later in the file are
    # never needed, so they are no error
    proc = finemed("eval", EXAMPLES / "questions.jsonl", "--mode", "loglik", "--compare", "no-ttt", "--limit", "2",
                   "--drop-contaminated", "-o", tmp_path / "d", "--no-progress")
    assert "on 2 items" in proc.stdout
    bad = finemed("eval", qs, "--mode", "perplexity", "--compare", "no-ttt", "-o", tmp_path / "p", check=False)
    assert bad.returncode != 0 and "--mode perplexity reads corpus records" in bad.stderr


def test_eval_perplexity_never_trains_on_the_record_itself(index_dir, tmp_path):
    out = tmp_path / "ppl"
    proc = finemed("eval", EXAMPLES / "corpus.jsonl", "--mode", "perplexity", "--index", index_dir, "--limit", "2",
                   "-o", out, "--no-progress")
    assert "bits/token" in proc.stdout
    body = orjson.loads((out / "report.json").read_bytes())
    ppl = body["perplexity"]
    assert set(ppl["variants"]) == {"ttt", "no-ttt"} and ppl["items"] == 2
    for r in read(out / "perplexity" / "ttt.jsonl"):
        assert r["neighbours"] and r["id"] not in r["neighbours"]
    assert "bits per token" in (out / "report.md").read_text()


def test_eval_scores_existing_answer_files(tmp_path):
    for name, preds in (("ttt", "BBCA"), ("base", "BACD")):
        rows = [{"id": f"q{i}", "response": "…", "prediction": p, "answer": "BBCD"[i], "correct": p == "BBCD"[i]}
                for i, p in enumerate(preds)]
        (tmp_path / f"{name}.answers.jsonl").write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
    proc = finemed("eval", tmp_path / "ttt.answers.jsonl", tmp_path / "base.answers.jsonl", "-o", tmp_path / "r")
    assert "ttt: accuracy 75.0%" in proc.stdout and "base: accuracy 75.0%" in proc.stdout
    assert "| ttt | base | 0.0 |" in (tmp_path / "r" / "report.md").read_text()


def test_eval_answer_files_with_no_item_in_common_is_an_error(tmp_path):
    for name, ids in (("a", "q1 q2"), ("b", "q3 q4")):
        rows = [{"id": i, "response": "The answer is (A).", "prediction": "A", "answer": "A"} for i in ids.split()]
        (tmp_path / f"{name}.answers.jsonl").write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
    proc = finemed("eval", tmp_path / "a.answers.jsonl", tmp_path / "b.answers.jsonl", "-o", tmp_path / "r",
                   check=False)
    assert proc.returncode != 0 and "nothing to score" in proc.stderr and "a.answers.jsonl 2" in proc.stderr


def test_eval_generate_mode_answers_each_variant_and_pairs_them(index_dir, tmp_path):
    out = tmp_path / "gen"
    proc = finemed("eval", EXAMPLES / "questions.jsonl", "--index", index_dir, "--limit", "2", "--max-new-tokens",
                   "16", "--generator", "transformers", "-o", out, "--no-progress")
    assert "ttt - no-ttt:" in proc.stdout
    ttt, base = read(out / "answers" / "ttt.jsonl"), read(out / "answers" / "no-ttt.jsonl")
    assert [r["id"] for r in ttt] == [r["id"] for r in base] == ["ex-q01", "ex-q02"]
    assert all(r["ttt"]["mode"] == "lora" for r in ttt) and all(r["ttt"]["mode"] == "off" for r in base)
    body = orjson.loads((out / "report.json").read_bytes())
    assert body["items"] == 2 and body["comparisons"][0]["a"] == "ttt" and body["config"]["mode"] == "generate"


def test_eval_reads_pubmedqa_ori_pqal_json_as_it_comes(tmp_path):
    doc = {"12345": {"QUESTION": "Does daily walking lower blood pressure in adults?",
                     "CONTEXTS": ["Adults walked 30 minutes daily for a year.", "Systolic pressure fell."],
                     "LABELS": ["METHODS", "RESULTS"], "final_decision": "yes", "LONG_ANSWER": "Yes."}}
    path = tmp_path / "ori_pqal.json"
    path.write_text(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())  # one document over many lines
    finemed("eval", path, "--mode", "loglik", "--compare", "no-ttt", "-o", tmp_path / "r", "--no-progress")
    (rec,) = read(tmp_path / "r" / "loglik" / "no-ttt.jsonl")
    assert rec["id"] == "pubmedqa-12345" and rec["answer"] == "A" and set(rec["scores"]) == {"A", "B", "C"}


def test_answer_takes_the_4bit_plan_when_full_precision_does_not_fit(index_dir, tmp_path, monkeypatch):
    """Memory planned, not discovered: with less memory than the full-precision plan needs (FINEMED_MEMORY, as
    a small card would have), `answer` says so, trains on a 4-bit base and generates from a Q4_K_M GGUF."""
    from finemed_cli.config.answer import TTTConfig
    from finemed_cli.pipeline.plan import RunLoad, plan_run

    monkeypatch.delenv("FINEMED_MEMORY", raising=False)
    full = plan_run(RunLoad(None, "cpu", "auto", "none", "llama.cpp", "auto"), TTTConfig(), 600).total
    small = plan_run(RunLoad(None, "cpu", "auto", "nf4", "llama.cpp", "auto"), TTTConfig(), 600).total
    assert small < full
    out = tmp_path / "answers.jsonl"
    env = {**os.environ, "FINEMED_MEMORY": str(int((small + full) / 2))}
    proc = subprocess.run([*FINEMED, "answer", EXAMPLES / "questions.jsonl", "-o", out, "--index", index_dir,
                           "--limit", "1", "--max-new-tokens", "8", "--no-progress"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "using a 4-bit base (nf4) and a q4_k_m llama.cpp generator" in proc.stderr
    (rec,) = read(out)
    assert rec["quantized"] == {"base": "nf4", "gguf": "q4_k_m"}
    assert rec["ttt"]["loss_after"] < rec["ttt"]["loss_before"] and rec["response"]
    env["FINEMED_MEMORY"] = "500MB"  # below every plan
    proc = subprocess.run([*FINEMED, "answer", EXAMPLES / "questions.jsonl", "-o", tmp_path / "b.jsonl", "--index",
                           index_dir, "--limit", "1", "--no-progress"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "is available" in proc.stderr
    assert "loading the embedder" not in proc.stderr and not (tmp_path / "b.jsonl").exists()
