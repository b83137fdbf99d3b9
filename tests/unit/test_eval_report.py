"""What a report says and how portable it is: Wilson intervals and the chance level in report.json and its plots,
every setting resolved, letter/text disagreements scored and counted, the neighbours' retrieval scores, and the
results written in lm-evaluation-harness's format and read back."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from finemed_cli.config.eval import EvalConfig
from finemed_cli.data.records import QuestionRecord
from finemed_cli.eval.lm_eval_output import date_id, write_lm_eval
from finemed_cli.eval.report import write_report
from finemed_cli.eval.score import Labels, Outcome, load_answer_outcomes, score

ANTIDOTES = {"A": "Atropine", "B": "Naloxone", "C": "Flumazenil", "D": "N-acetylcysteine"}
YNM = {"A": "yes", "B": "no", "C": "maybe"}


def _questions() -> dict[str, QuestionRecord]:
    qs = [QuestionRecord(f"medqa-{i}", f"Overdose case {i}: which antidote?", ANTIDOTES, "D") for i in range(4)]
    qs += [QuestionRecord(f"pubmedqa-{i}", f"Does drug {i} work?", YNM, "A") for i in range(3)]
    return {q.id: q for q in qs}


def _labels(questions: dict[str, QuestionRecord]) -> Labels:
    return Labels({i: i.split("-")[0] for i in questions}, {i: "Toxicology" if i.startswith("medqa") else None
                                                           for i in questions},
                  {i: len(q.options or {}) for i, q in questions.items()})


def _answers(path: Path, responses: dict[str, str], scores: dict[str, list[float]] | None = None) -> Path:
    rows = [{"id": i, "response": r, "prediction": None, "answer": None, "generation": {"backend": "hf"},
             "neighbours": [{"id": f"c{j}", "score": s} for j, s in enumerate((scores or {}).get(i, []))]}
            for i, r in responses.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


RESPONSES = {
    "medqa-0": "The answer is D. N-acetylcysteine.",
    "medqa-1": "The correct answer is D. Naloxone.",  # letter D, text B: unanswered unless the letter is trusted
    "medqa-2": "The answer is (B).",
    "medqa-3": "I am not sure.",
    "pubmedqa-0": "Answer: A",
    "pubmedqa-1": "Answer: A",
    "pubmedqa-2": "Answer: B",
}


def test_disagreement_is_unanswered_unless_the_letter_is_trusted(tmp_path: Path) -> None:
    qs = _questions()
    path = _answers(tmp_path / "a.jsonl", RESPONSES)
    strict, trusted = load_answer_outcomes(path, qs), load_answer_outcomes(path, qs, trust_letter=True)
    assert strict["medqa-1"] == Outcome("medqa-1", None, False, {"letter": "D", "text": "B"})
    assert (trusted["medqa-1"].prediction, trusted["medqa-1"].correct) == ("D", True)
    assert all(strict[i] == trusted[i] for i in qs if i != "medqa-1")
    s = score({"strict": strict, "trusted": trusted}, _labels(qs))
    assert s.results["strict"].disagreements == s.results["trusted"].disagreements == 1
    assert s.results["strict"].unanswered == 2 and s.results["trusted"].unanswered == 1
    assert s.results["strict"].accuracy == 3 / 7 and s.results["trusted"].accuracy == 4 / 7
    # without the question file, the flag `finemed answer` wrote decides
    flagged = tmp_path / "b.jsonl"
    flagged.write_text(json.dumps({"id": "q", "prediction": "D", "answer": "D",
                                   "disagreement": {"letter": "D", "text": "B"}}) + "\n")
    assert load_answer_outcomes(flagged)["q"].prediction is None
    assert load_answer_outcomes(flagged, trust_letter=True)["q"].correct


def test_report_json_intervals_chance_and_relevance(tmp_path: Path) -> None:
    qs = _questions()
    rel = {i: [0.9 - 0.1 * n, 0.5] for n, i in enumerate(qs)}
    ttt = load_answer_outcomes(_answers(tmp_path / "ttt.jsonl", RESPONSES, rel), qs)
    none = load_answer_outcomes(_answers(tmp_path / "none.jsonl", dict.fromkeys(qs, "no idea")), qs)
    s = score({"ttt": ttt, "no-ttt": none}, _labels(qs))
    assert s.chance == pytest.approx((4 / 4 + 3 / 3) / 7)  # a uniform guess: 1/4 on MedQA, 1/3 on PubMedQA
    zero = s.results["no-ttt"]
    assert (zero.accuracy, zero.ci95[0]) == (0.0, 0.0) and zero.ci95[1] > 0.25  # 0/7 is not certain
    assert "Wilson" in s.intervals["accuracy"] and "Newcombe" in s.intervals["difference"]
    r = s.results["ttt"].relevance
    every = [x for v in rel.values() for x in v]
    assert r is not None and (r.neighbours, r.items) == (14, 7) and zero.relevance is None
    assert "relevance" not in zero.to_json()
    assert r.mean == pytest.approx(np.mean(every)) and r.median == pytest.approx(np.median(every))
    assert r.top1_mean == pytest.approx(np.mean([max(v) for v in rel.values()]))
    assert sum(r.counts) == 14 and len(r.edges) == 21
    paths = write_report(tmp_path / "r", {"mode": "generate", "seed": 0, "title": "t", "trust_letter": False}, s)
    body = json.loads(paths["json"].read_text())
    assert body["results"]["ttt"]["relevance"]["median"] == pytest.approx(np.median(every))
    md = paths["md"].read_text()
    assert "## Retrieval scores of the neighbours" in md and "| ttt | 14 | 7 |" in md
    assert "letter ≠ text" in md and "scored unanswered" in md and "- trust_letter: False" in md
    assert "chance (a uniform guess over each item's options): 28.6%" in md
    assert paths["relevance_png"].stat().st_size > 5000


def test_accuracy_plot_labels_chance_line_and_zero_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import finemed_cli.plots as plots

    figures: dict[str, Any] = {}
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figures.setdefault(path.name, fig) and path)
    ids = [f"medqa-{i}" for i in range(5)]
    variants = {"ttt": {i: Outcome(i, "A", n < 3) for n, i in enumerate(ids)},
                "no-ttt": {i: Outcome(i, "B", False) for i in ids}}
    s = score(variants, Labels(options=dict.fromkeys(ids, 4)))
    write_report(tmp_path, {"mode": "generate"}, s)
    ax = figures["accuracy.png"].axes[0]
    assert {t.get_text() for t in ax.texts} == {"60.0", "0.0"}  # every bar's value, the 0% one too
    chance = [ln for ln in ax.lines if list(ln.get_ydata()) == [25.0, 25.0]]
    assert chance and "chance 25.0%" in [t.get_text() for t in ax.get_legend().get_texts()]
    marks = [ln for ln in ax.lines if ln.get_marker() == "^"]
    assert len(marks) == 1 and list(marks[0].get_data()[1]) == [0]  # the 0% bar is marked on the axis


def test_report_config_records_resolved_settings() -> None:
    cfg = EvalConfig(inputs=[Path("medqa.jsonl")], out=Path("r"))
    got = cfg.report_config()
    assert got["ttt"]["steps"] == 1 and got["ttt"]["lr"] == 3e-3  # the defaults applied, not null
    assert got["generation"]["max_new_tokens"] == 512 and got["trust_letter"] is False
    assert got["limit"] == "all" and got["medmcqa_cop_base"] == "inferred from the file"
    assert None not in got["ttt"].values() and None not in got["generation"].values()
    paper = EvalConfig(inputs=[Path("m.jsonl")], out=Path("r"), mode="loglik")
    paper.ttt.mode = "paper"
    assert paper.report_config()["ttt"]["lr"] == 1e-6 and "generation" not in paper.report_config()
    scored = cfg.report_config(running=False)  # scoring answer files: nothing was run, no TTT to claim
    assert "ttt" not in scored and "generation" not in scored and scored["trust_letter"] is False


# --- lm-evaluation-harness -------------------------------------------------------------------------------

NOW = dt.datetime(2026, 12, 3, 17, 5, 9, 123456)


def _read_lm_eval(folder: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    (results,) = folder.glob("results_*.json")
    samples = {}
    for p in folder.glob("samples_*.jsonl"):
        # the task and date as lm-eval's readers take them from the name: between the first and the last "_"
        task, stamp = p.name[p.name.find("_") + 1:p.name.rfind("_")], p.name[p.name.rfind("_") + 1:].removesuffix(".jsonl")
        assert stamp == date_id(NOW) == "2026-12-03T17-05-09.123456"
        samples[task] = [json.loads(line) for line in p.read_text().splitlines()]
    return json.loads(results.read_text()), samples


def test_lm_eval_results_and_samples_generate(tmp_path: Path) -> None:
    qs = _questions()
    files = {"ttt": _answers(tmp_path / "ttt.jsonl", RESPONSES, {i: [0.7] for i in qs})}
    outcomes = {"ttt": load_answer_outcomes(files["ttt"], qs)}
    labels = _labels(qs)
    s = score(outcomes, labels)
    report = {"mode": "generate", "model": "m", "seed": 3, "inputs": ["medqa.jsonl"], "dtype": "float32",
              "generation": {"max_new_tokens": 512, "temperature": 0.0}, "variants": {"ttt": {"model": None}},
              "system_prompts": {"m": "Be careful."}, "batch_size": 1, "device": "cpu"}
    paths = write_lm_eval(tmp_path, "generate", files, qs, outcomes, labels, report, now=NOW)
    assert paths["lm_eval_ttt"] == tmp_path / "lm-eval" / "ttt" / "results_2026-12-03T17-05-09.123456.json"
    body, samples = _read_lm_eval(tmp_path / "lm-eval" / "ttt")
    assert set(samples) == {"finemed_medqa", "finemed_pubmedqa"}
    med = body["results"]["finemed_medqa"]
    assert med["alias"] == "finemed_medqa" and med["acc,none"] == 0.25 and med["sample_len"] == 4
    assert med["acc_stderr,none"] == pytest.approx(math.sqrt(0.25 * 0.75 / 3))  # sample sd / √n, as lm-eval
    assert body["results"]["finemed_all"]["acc,none"] == pytest.approx(s.results["ttt"].accuracy)
    assert body["groups"]["finemed_all"] == body["results"]["finemed_all"]
    assert body["group_subtasks"] == {"finemed_all": ["finemed_medqa", "finemed_pubmedqa"]}
    for key in ("configs", "versions", "n-shot", "higher_is_better", "n-samples"):
        assert {"finemed_medqa", "finemed_pubmedqa"} <= set(body[key]), key
    assert body["n-shot"]["finemed_medqa"] == 0 and body["higher_is_better"]["finemed_medqa"] == {"acc": True}
    assert body["n-samples"]["finemed_pubmedqa"] == {"original": 3, "effective": 3}
    assert body["configs"]["finemed_medqa"]["output_type"] == "generate_until"
    cfg = body["config"]
    assert (cfg["model"], cfg["random_seed"], cfg["batch_size"], cfg["device"]) == ("m", 3, "1", "cpu")
    assert cfg["model_args"].startswith("pretrained=m") and cfg["gen_kwargs"]["max_new_tokens"] == 512
    assert body["system_instruction"] == "Be careful." and len(body["task_hashes"]["finemed_medqa"]) == 64
    one = samples["finemed_medqa"][1]
    assert (one["doc_id"], one["target"], one["acc"], one["filter"], one["metrics"]) == (1, "D", 0.0, "none", ["acc"])
    assert one["doc"]["id"] == "medqa-1" and one["doc"]["options"] == ANTIDOTES
    assert one["resps"] == [[RESPONSES["medqa-1"]]] and one["filtered_resps"] == [""]
    assert "Overdose case 1" in one["arguments"]["gen_args_0"]["arg_0"]
    assert json.loads(one["arguments"]["gen_args_0"]["arg_1"])["max_new_tokens"] == 512
    assert one["disagreement"] == {"letter": "D", "text": "B"} and one["neighbours"] == [{"id": "c0", "score": 0.7}]
    assert samples["finemed_medqa"][0]["acc"] == 1.0 and samples["finemed_medqa"][0]["filtered_resps"] == ["D"]
    assert all(len(s[k]) == 64 for s in samples["finemed_medqa"] for k in ("doc_hash", "prompt_hash", "target_hash"))


def test_lm_eval_loglik_has_acc_norm_and_one_request_per_option(tmp_path: Path) -> None:
    qs = {q.id: q for q in list(_questions().values())[4:]}  # the three PubMedQA items: one task, no group
    path = tmp_path / "no-ttt.jsonl"
    rows = []
    for n, i in enumerate(qs):
        lp = {"A": -1.0 - n, "B": -2.0, "C": -3.5}
        rows.append({"id": i, "prediction": max(lp, key=lp.get), "prediction_norm": "B" if n else "A",
                     "scores": {k: {"logprob": v, "tokens": 2, "chars": len(YNM[k])} for k, v in lp.items()}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    acc = {r["id"]: Outcome(r["id"], r["prediction"], r["prediction"] == "A") for r in rows}
    norm = {r["id"]: Outcome(r["id"], r["prediction_norm"], r["prediction_norm"] == "A") for r in rows}
    write_lm_eval(tmp_path, "loglik", {"no-ttt": path}, qs, {"no-ttt": acc, "no-ttt:norm": norm}, _labels(qs),
                  {"model": "m", "inputs": ["p.json"]}, now=NOW)
    body, samples = _read_lm_eval(tmp_path / "lm-eval" / "no-ttt")
    assert "groups" not in body and list(body["results"]) == ["finemed_pubmedqa"]
    res = body["results"]["finemed_pubmedqa"]
    assert res["acc,none"] == pytest.approx(2 / 3) and res["acc_norm,none"] == pytest.approx(1 / 3)
    assert body["configs"]["finemed_pubmedqa"]["output_type"] == "multiple_choice"
    first = samples["finemed_pubmedqa"][0]
    assert list(first["arguments"]) == ["gen_args_0", "gen_args_1", "gen_args_2"]
    assert first["arguments"]["gen_args_1"]["arg_1"] == " no" and first["resps"][0] == [["-1.0"]]
    assert first["scores"]["A"] == {"logprob": -1.0, "tokens": 2, "chars": 3}  # labelled, per option
    assert (first["acc"], first["acc_norm"], first["metrics"]) == (1.0, 1.0, ["acc", "acc_norm"])


def test_lm_eval_own_readers_find_our_files(tmp_path: Path) -> None:
    """lm-eval's helpers (lm_eval.utils, light: numpy, yaml, jinja2, requests) on our files, when installed."""
    utils = pytest.importorskip("lm_eval.utils")
    qs = _questions()
    files = {"ttt": _answers(tmp_path / "ttt.jsonl", RESPONSES)}
    outcomes = {"ttt": load_answer_outcomes(files["ttt"], qs)}
    write_lm_eval(tmp_path, "generate", files, qs, outcomes, _labels(qs), {"model": "m"}, now=NOW)
    names = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "lm-eval").rglob("*.json*"))
    (results,) = utils.get_results_filenames(names)
    samples = utils.get_sample_results_filenames(names)
    assert results == "lm-eval/ttt/results_2026-12-03T17-05-09.123456.json"
    assert sorted(utils.get_file_task_name(Path(s).name) for s in samples) == ["finemed_medqa", "finemed_pubmedqa"]
    assert {utils.get_file_datetime(Path(s).name) for s in samples} == {"2026-12-03T17-05-09.123456"}
    body = json.loads((tmp_path / results).read_text())
    try:
        table = utils.make_table(body)  # needs pytablewriter
    except ImportError:
        return
    assert "finemed_medqa" in table and "0.2500" in table and "acc" in table


def test_lm_eval_samples_load_as_a_hub_dataset(tmp_path: Path) -> None:
    """lm-eval publishes samples files as Hub datasets (`load_dataset("json", …)`); ours load the same way."""
    datasets = pytest.importorskip("datasets")
    qs = _questions()
    files = {"ttt": _answers(tmp_path / "ttt.jsonl", RESPONSES)}
    paths = write_lm_eval(tmp_path, "generate", files, qs, {"ttt": load_answer_outcomes(files["ttt"], qs)},
                          _labels(qs), {"model": "m"}, now=NOW)
    sample_file = paths["lm_eval_samples_ttt_finemed_medqa"]
    ds = datasets.load_dataset("json", data_files=str(sample_file), split="train", cache_dir=str(tmp_path / "c"))
    assert ds.num_rows == 4 and ds["doc_id"] == [0, 1, 2, 3] and ds["acc"] == [1.0, 0.0, 0.0, 0.0]
    assert {"doc", "target", "arguments", "resps", "filtered_resps", "doc_hash", "prompt_hash"} <= set(ds.column_names)
