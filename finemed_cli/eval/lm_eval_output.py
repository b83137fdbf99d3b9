"""`finemed eval`'s results in lm-evaluation-harness's output format, so its tools (and anything built on them:
leaderboards, comparison scripts) read them: per variant, as lm-eval lays out one model's run,

    lm-eval/<variant>/results_<date>.json            aggregated: results, configs, versions, n-shot, config, …
    lm-eval/<variant>/samples_<task>_<date>.jsonl    one line per item: doc_id, doc, target, arguments, resps, …

A task is a benchmark source (`finemed_medqa`, `finemed_pubmedqa`, …; more than one also gets the group
`finemed_all`). The numbers are the report's: the same items, predictions and scoring (a response whose letter
and option text disagree is wrong unless --trust-letter), with lm-eval's standard error of a mean
(sample standard deviation over √n; "N/A" for one item). The prompts are finemed's (chat template, system
prompt, worked examples for in-context variants), so a task here is not lm-eval's task of a similar name.
`arguments` hold the question as the user turn the model saw, without the chat template around it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from scipy.stats import sem

from finemed_cli.data.jsonl import iter_jsonl
from finemed_cli.data.output import atomic_write
from finemed_cli.eval.results import file_name
from finemed_cli.eval.score import Labels, Outcome, source_of_id
from finemed_cli.manifest import package_versions

FOLDER = "lm-eval"
GROUP = "finemed_all"  # the group over every task, when there are several


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def date_id(now: dt.datetime | None = None) -> str:
    """The timestamp in lm-eval's file names: ISO time with ':' as '-' (no '_': its readers split on it)."""
    return (now or dt.datetime.now()).isoformat().replace(":", "-")


def task_name(source: str) -> str:
    """`finemed_<source>`: not lm-eval's task of that benchmark, whose prompt differs."""
    return source if source.startswith("finemed") else f"finemed_{source}"


def _metric(values: list[float]) -> tuple[float, float | str]:
    """Mean and lm-eval's standard error of it (sample standard deviation / √n; "N/A" under two items)."""
    return float(np.mean(values)), (float(sem(values)) if len(values) > 1 else "N/A")


def _prompt(q: Any) -> str:
    from finemed_cli.modeling.prompts import format_question

    return format_question(q)


def _neighbour_ids(rec: dict[str, Any]) -> list[str]:
    return [n["id"] if isinstance(n, dict) else n for n in rec.get("neighbours") or ()]


def write_lm_eval(out: Path, mode: str, files: dict[str, Path], questions: dict[str, Any],
                  outcomes: dict[str, dict[str, Outcome]], labels: Labels, report: dict[str, Any],
                  now: dt.datetime | None = None) -> dict[str, Path]:
    """Write each variant's results and samples under `out/lm-eval/<variant>/`; returns the paths by kind
    (`lm_eval_<variant>` for a results file).

    Args:
        out: The report folder.
        mode: "generate" (answer records) or "loglik" (loglik records; `<variant>:norm` outcomes give acc_norm).
        files: Each variant's per-item results file.
        questions: id -> QuestionRecord of the items (the docs).
        outcomes: The scored outcomes report.json's numbers come from, by variant name.
        labels: Sources (the tasks) and departments by item id.
        report: report.json's `config` (model, seeds, the variants' settings…).
        now: The run's time (file names and `date`).
    """
    now = now or dt.datetime.now()
    common = set.intersection(*(set(o) for o in outcomes.values())) if outcomes else set()
    ids = [i for i in questions if i in common]  # the question file's order: doc_id follows it
    tasks: dict[str, list[str]] = {}
    for i in ids:
        tasks.setdefault(_task_of(i, labels), []).append(i)
    run = _Run(out, mode, questions, outcomes, labels, report, now, importlib.metadata.version("finemed"))
    paths: dict[str, Path] = {}
    for name, path in files.items():
        paths.update(run.write_variant(name, path, tasks))
    return paths


def _task_of(item_id: str, labels: Labels) -> str:
    return task_name(labels.source.get(item_id) or source_of_id(item_id))


class _Run:
    """What every variant's lm-eval files share: the items, their outcomes and the run's settings."""

    def __init__(self, out: Path, mode: str, questions: dict[str, Any], outcomes: dict[str, dict[str, Outcome]],
                 labels: Labels, report: dict[str, Any], now: dt.datetime, version: str) -> None:
        self.out, self.mode, self.questions, self.outcomes = out, mode, questions, outcomes
        self.labels, self.report, self.now, self.version = labels, report, now, version
        self.metric_names = ["acc", "acc_norm"] if mode == "loglik" else ["acc"]
        self.gen_kwargs = report.get("generation") if mode == "generate" else None

    def write_variant(self, name: str, path: Path, tasks: dict[str, list[str]]) -> dict[str, Path]:
        records = {r["id"]: r for _, r in iter_jsonl(path) if isinstance(r, dict) and isinstance(r.get("id"), str)}
        described = (self.report.get("variants") or {}).get(name, {})
        # scored answer files say which model wrote them
        model = described.get("model") or self.report.get("model") or next(
            (r["model"] for r in records.values() if isinstance(r.get("model"), str)), "unknown")
        n_shot = (described.get("icl") or {}).get("k", 0)
        folder = self.out / FOLDER / file_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = date_id(self.now)
        paths: dict[str, Path] = {}
        results: dict[str, Any] = {}
        configs, task_hashes, n_samples = {}, {}, {}
        every: dict[str, list[float]] = {"acc": [], "acc_norm": []}
        for task, members in sorted(tasks.items()):
            lines = [self._sample_of(name, doc_id, i, records) for doc_id, i in enumerate(members)]
            results[task] = self._task_entry(task, lines, every)
            configs[task] = self._task_config(task, n_shot, described)
            task_hashes[task] = _sha("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in lines))
            n_samples[task] = {"original": sum(1 for q in self.questions.values()
                                               if _task_of(q.id, self.labels) == task),
                               "effective": len(lines)}
            sample_path = folder / f"samples_{task}_{stamp}.jsonl"
            _write(sample_path, b"".join(_dumps(s) + b"\n" for s in lines))
            paths[f"lm_eval_samples_{name}_{task}"] = sample_path
        body: dict[str, Any] = {"results": results, "group_subtasks": {}, "configs": configs,
                                "versions": {t: self.version for t in results},
                                "n-shot": {t: n_shot for t in results},
                                "higher_is_better": {t: {m: True for m in ("acc", "acc_norm") if f"{m},none" in results[t]}
                                                     for t in results},
                                "n-samples": n_samples}
        if len(results) > 1:
            self._add_group(body, every, n_shot)
        body["config"] = self._run_config(model, described)
        body.update(self._provenance(model, folder, name, task_hashes, n_shot))
        results_path = folder / f"results_{stamp}.json"
        _write(results_path, orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        paths[f"lm_eval_{name}"] = results_path
        return paths

    def _sample_of(self, name: str, doc_id: int, item_id: str, records: dict[str, Any]) -> dict[str, Any]:
        """Item `item_id` of variant `name` as an lm-eval sample line (its `arguments`, `resps` and `filtered_resps`
        sanitised to strings as lm-eval's writer does), with finemed's own fields after lm-eval's."""
        from finemed_cli.eval.loglik import option_scores

        q, rec, outcome = self.questions[item_id], records.get(item_id, {}), self.outcomes[name][item_id]
        norm = self.outcomes.get(name + ":norm", {}).get(item_id) if self.mode == "loglik" else None
        source = self.labels.source.get(item_id) or source_of_id(item_id)
        department = self.labels.department.get(item_id)
        prompt = _prompt(q)
        doc = {"id": q.id, "question": q.question, "options": q.options, "answer": q.answer, "source": source,
               "department": department, **({"context": q.context} if q.context else {})}
        target = str(q.answer)
        if self.mode == "loglik":
            scores = option_scores(rec)
            letters = list(q.options)
            arguments = {f"gen_args_{i}": {"arg_0": prompt, "arg_1": " " + q.options[k]} for i, k in enumerate(letters)}
            resps: list[Any] = [[[str(scores[k]["logprob"])]] for k in letters]  # requests × repeats × [logprob]
            filtered: list[Any] = [[str(scores[k]["logprob"])] for k in letters]
        else:
            scores = None
            arguments = {"gen_args_0": {"arg_0": prompt, "arg_1": _dumps(self.gen_kwargs or {}).decode()}}
            resps = [[str(rec.get("response", ""))]]
            filtered = [str(outcome.prediction) if outcome.prediction is not None else ""]
        metrics = {"acc": float(bool(outcome.correct))}
        if norm is not None:
            metrics["acc_norm"] = float(bool(norm.correct))
        sample = {
            "doc_id": doc_id, "doc": doc, "target": target, "arguments": arguments, "resps": resps,
            "filtered_resps": filtered, "filter": "none", "metrics": list(metrics),
            "doc_hash": _sha(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()), "prompt_hash": _sha(prompt),
            "target_hash": _sha(target), **metrics,
            # finemed's own, after lm-eval's fields
            "prediction": outcome.prediction, "disagreement": outcome.disagreement,
            "neighbours": [{"id": i, "score": s} for i, s in zip(_neighbour_ids(rec), outcome.relevance, strict=False)],
        }
        if scores is not None:
            sample["scores"] = scores  # letter -> {logprob, tokens, chars}
            sample["prediction_norm"] = norm.prediction if norm is not None else None
        return sample

    def _task_entry(self, task: str, lines: list[dict[str, Any]], every: dict[str, list[float]]) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": task, "alias": task, "sample_len": len(lines)}
        for m in self.metric_names:
            values = [s[m] for s in lines]
            every[m] += values
            entry[f"{m},none"], entry[f"{m}_stderr,none"] = _metric(values)
        return entry

    def _task_config(self, task: str, n_shot: int, described: dict[str, Any]) -> dict[str, Any]:
        return {
            "task": task, "task_alias": task, "dataset_path": ", ".join(self.report.get("inputs", [])),
            "output_type": "multiple_choice" if self.mode == "loglik" else "generate_until", "num_fewshot": n_shot,
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in self.metric_names],
            "metadata": {"version": self.version, "finemed": described},
        }

    def _add_group(self, body: dict[str, Any], every: dict[str, list[float]], n_shot: int) -> None:
        """One group over every item, as lm-eval reports a group of tasks."""
        group: dict[str, Any] = {"name": GROUP, "alias": GROUP, "sample_len": len(every["acc"])}
        for m, values in every.items():
            if values:
                group[f"{m},none"], group[f"{m}_stderr,none"] = _metric(values)
        tasks = sorted(body["results"])
        body["results"] = {GROUP: group, **body["results"]}
        body["groups"] = {GROUP: group}
        body["group_subtasks"] = {GROUP: tasks}
        body["versions"][GROUP] = self.version
        body["n-shot"][GROUP] = n_shot
        body["higher_is_better"][GROUP] = {m: True for m, v in every.items() if v}

    def _run_config(self, model: Any, described: dict[str, Any]) -> dict[str, Any]:
        report, seed = self.report, self.report.get("seed", 0)
        return {
            "model": str(model), "model_args": f"pretrained={model},dtype={report.get('dtype', 'auto')}",
            "model_dtype": report.get("dtype"), "batch_size": str(report.get("batch_size", 1)), "batch_sizes": [],
            "device": report.get("device"), "use_cache": None,
            "limit": None if report.get("limit") in (None, "all") else report.get("limit"),
            "bootstrap_iters": 0,  # the standard errors are analytic; report.json has the intervals
            "gen_kwargs": self.gen_kwargs, "random_seed": seed, "numpy_seed": seed, "torch_seed": seed,
            "fewshot_seed": seed, "finemed": described,
        }

    def _provenance(self, model: Any, folder: Path, name: str, task_hashes: dict[str, str],
                    n_shot: int) -> dict[str, Any]:
        prompts = set((self.report.get("system_prompts") or {}).values())
        system = prompts.pop() if len(prompts) == 1 else None  # several models may differ: their own then
        return {
            "date": self.now.timestamp(), "transformers_version": package_versions().get("transformers", "N/A"),
            "task_hashes": task_hashes, "model_source": "finemed", "model_name": str(model),
            "model_name_sanitized": folder.name, "system_instruction": system,
            "system_instruction_sha": _sha(system) if system else None,
            "fewshot_as_multiturn": bool(n_shot),  # worked examples are earlier chat turns
            "finemed_variant": name, "finemed_version": self.version,
        }


def _write(path: Path, data: bytes) -> None:
    atomic_write(path, data)

