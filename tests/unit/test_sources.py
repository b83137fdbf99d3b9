"""Hub datasets (`hf:org/name[:config]`) and `columns:` mappings for `finemed train` and `finemed eval`, read
offline from caches laid out on disk as the installed datasets (5.x) and huggingface_hub leave them:
- the hub cache, `datasets--org--name/snapshots/<commit>/` with parquet files and a README naming the configs
  (what `hf download --repo-type dataset` writes); datasets will not read it offline by itself, finemed does;
- the datasets cache, `org___name/<config>/0.0.0/<hash>/name-<split>.arrow` (what `load_dataset` prepares
  online), which datasets reads offline by itself.
No test here touches the network."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from finemed_cli.data.jsonl import RecordError
from finemed_cli.data.sources import HubDataset, load_hub_rows, map_columns, parse_columns, parse_hub_dataset
from finemed_cli.errors import ConfigError, DataError
from tests.conftest import make_tiny_llama
from tests.unit.test_hub import fake_hf_cache

MCQ = {"prompt": ["Which hormone does the thyroid make?", "Which organ makes insulin?", "Low T4, high TSH?"],
       "choices": [["Thyroxine", "Insulin", "Cortisol"], ["Liver", "Pancreas", "Spleen"],
                   ["Hypothyroidism", "Hyperthyroidism", "Euthyroid"]],
       "label": [0, 1, 0]}
SFT = {"q": [f"Case {i}: high TSH, low T4?" for i in range(12)],
       "a": ["## Thought\nThe thyroid fails.\n\n## Summarization\nHypothyroidism."] * 12}


def fake_hub_dataset(cache: Path, repo_id: str, configs: dict[str, dict[str, dict[str, list]]]) -> Path:
    """A dataset repository in the hub cache: parquet files per config and split, a README whose YAML names
    them (as the hub's own datasets do), blobs linked from a snapshot, refs/main."""
    import datasets

    files, card = {}, []
    for config, splits in configs.items():
        card.append({"config_name": config, "data_files": [{"split": s, "path": f"{config}/{s}-*"} for s in splits]})
        for split, columns in splits.items():
            tmp = cache / "tmp.parquet"
            datasets.Dataset.from_dict(columns).to_parquet(str(tmp))
            files[f"{config}/{split}-00000-of-00001.parquet"] = tmp.read_bytes()
    files["README.md"] = ("---\n" + yaml.safe_dump({"configs": card}) + "---\n").encode()
    (cache / "tmp.parquet").unlink()
    return fake_hf_cache(cache, repo_id, files, kind="datasets")


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE and HF_DATASETS_OFFLINE set, empty caches of this test's own; any network call fails."""
    import datasets
    import huggingface_hub.constants as constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # both libraries read the variables at import
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"network call attempted: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path / "hub"


def test_sources_and_columns_parse() -> None:
    assert parse_hub_dataset("hf:org/med") == HubDataset("org/med")
    assert str(parse_hub_dataset("hf:org/med:pqa_labeled")) == "hf:org/med:pqa_labeled"
    assert parse_hub_dataset("data/med.jsonl") is None
    for bad in ("hf:med", "hf:org/med/x", "hf:org/med:a/b"):
        with pytest.raises(ConfigError, match="hf:org/name or hf:org/name:config"):
            parse_hub_dataset(bad)
    assert parse_columns("question=prompt, options=choices,answer=label") == {
        "question": "prompt", "options": "choices", "answer": "label"}
    with pytest.raises(ConfigError, match="our=theirs pairs"):
        parse_columns("question:prompt")


def test_columns_rename_and_an_integer_answer_becomes_a_letter() -> None:
    columns = {"question": "prompt", "options": "choices", "answer": "label"}
    row = {"prompt": "Q?", "choices": ["a", "b", "c"], "label": 2}
    assert map_columns(row, columns) == {"question": "Q?", "options": ["a", "b", "c"], "answer": "C"}
    assert map_columns(row, None) is row  # no mapping, no Hub row: as it was
    assert map_columns({"question": "Q?", "options": ["a", "b"], "answer": 1}, None, "med-test-4") == {
        "question": "Q?", "options": ["a", "b"], "answer": "B", "id": "med-test-4"}
    with pytest.raises(RecordError, match=r"no column 'choices' \(columns: question=prompt, options=choices, "
                                          r"answer=label\); this record has prompt, label"):
        map_columns({"prompt": "Q?", "label": 0}, columns)
    with pytest.raises(RecordError, match="'answer' is 3, not the index of one of its 3 options"):
        map_columns({**row, "label": 3}, columns)


def test_a_hub_dataset_is_read_offline_from_the_hub_cache(offline) -> None:
    fake_hub_dataset(offline, "org/medbench", {"mc": {"train": MCQ, "test": MCQ, "validation": MCQ}})
    ref = HubDataset("org/medbench", "mc")
    rows = load_hub_rows(ref, None, ("test", "validation"))
    assert rows.split == "test" and rows.name == "hf:org/medbench:mc[test]" and rows.rows[1]["label"] == 1
    assert rows.fingerprint == hashlib.sha1(b"org/medbench").hexdigest()  # the snapshot's commit
    assert load_hub_rows(ref, "train").split == "train"
    with pytest.raises(DataError, match=r"hf:org/medbench:mc split 'dev': .*set split: NAME"):
        load_hub_rows(ref, "dev")
    with pytest.raises(DataError, match=r"hf:org/medbench:nope.*'nope'.*name the config as hf:org/medbench:CONFIG"):
        load_hub_rows(HubDataset("org/medbench", "nope"), "test")


def test_a_dataset_prepared_online_is_read_from_the_datasets_cache(offline, tmp_path) -> None:
    """What `load_dataset('org/medbench', 'mc')` leaves in HF_DATASETS_CACHE on a machine with network, made
    here by preparing the same files from a folder named like the dataset and filing it under org___medbench."""
    import datasets

    snap = fake_hub_dataset(tmp_path / "elsewhere", "org/medbench", {"mc": {"test": MCQ}})
    local = tmp_path / "medbench"
    shutil.copytree(snap, local)
    datasets.load_dataset_builder(str(local), "mc", cache_dir=str(tmp_path / "datasets")).download_and_prepare()
    (tmp_path / "datasets" / "medbench").rename(tmp_path / "datasets" / "org___medbench")
    shutil.rmtree(local)
    rows = load_hub_rows(HubDataset("org/medbench", "mc"), None, ("test", "validation"))
    assert rows.split == "test" and [r["prompt"] for r in rows.rows] == MCQ["prompt"]


def test_a_miss_offline_says_how_to_fetch_it(offline) -> None:
    with pytest.raises(DataError) as e:
        load_hub_rows(HubDataset("org/absent", "cfg"), "train")
    text = str(e.value)
    assert "hf:org/absent:cfg: not in the datasets cache" in text and "HF_HUB_OFFLINE" in text
    assert "datasets.load_dataset('org/absent', 'cfg')" in text
    assert "hf download org/absent --repo-type dataset" in text


def test_an_unreachable_hub_falls_back_to_the_caches_at_once(monkeypatch, tmp_path) -> None:
    """Not offline by setting, but the hub does not answer (a closed port): no wait, the caches, the fix."""
    import time

    import datasets
    import huggingface_hub.constants as constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"hf:org/absent: not in the datasets cache .* the hub cannot be reached "
                                        r"\(ConnectError\); on a machine with network run"):
        load_hub_rows(HubDataset("org/absent"), "train")
    assert time.perf_counter() - start < 5
    assert datasets.config.HF_HUB_OFFLINE is False  # datasets' offline mode was lent for the cache look-up only


def test_columns_rename_a_local_jsonl_for_training(tmp_path) -> None:
    from finemed_cli.train.data import read_training_file

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in zip(SFT["q"][:2], SFT["a"], strict=False)))
    shape, convs = read_training_file(path, "sft", columns={"prompt": "q", "completion": "a"})
    assert shape == "prompt_completion" and [c.id for c in convs] == ["qa-1", "qa-2"]
    assert convs[0].messages[0] == {"role": "user", "content": SFT["q"][0]}
    with pytest.raises(DataError, match=r"qa.jsonl:2: no column 'text' \(columns: prompt=q, completion=text\)"):
        read_training_file(path, "sft", columns={"prompt": "q", "completion": "text"})


def _tiny_model(tmp_path: Path, tokenizer) -> Path:
    model_dir = tmp_path / "tiny"
    make_tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def _finemed(*args: object) -> tuple[int, str]:
    """`finemed ARGS` in this process: the exit code, and the output with the error a user would see."""
    from click.testing import CliRunner

    from finemed_cli.cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output + (str(result.exception) if result.exception else "")


def test_finemed_train_reads_a_hub_dataset_through_a_column_mapping(offline, tmp_path, tiny_tokenizer) -> None:
    fake_hub_dataset(offline, "org/thyroid-sft", {"default": {"train": SFT}})
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "name": "hub", "output_dir": str(tmp_path / "runs"), "seed": 1,
        "model": {"name": str(_tiny_model(tmp_path, tiny_tokenizer)), "lora": {"rank": 4, "alpha": 8},
                  "precision": "fp32"},
        "stages": [{"kind": "sft", "data": ["hf:org/thyroid-sft"], "columns": {"prompt": "q", "completion": "a"},
                    "max_steps": 4, "lr": 1e-2, "batch_size": 4, "scheduler": "constant", "max_length": 128}]}))
    code, output = _finemed("train", config, "--no-progress")
    assert code == 0, output
    stage = tmp_path / "runs" / "hub" / "stage-1-sft"
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["files"] == {"hf:org/thyroid-sft[train]": "prompt_completion"} and summary["records"] == 12
    losses = [json.loads(line)["loss"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    # a column the data does not have: every record named by its row, with the mapping
    from finemed_cli.train.data import read_training_file

    with pytest.raises(DataError) as e:
        read_training_file(HubDataset("org/thyroid-sft"), "sft", columns={"prompt": "q", "completion": "answer"})
    assert "12 bad record(s)" in str(e.value)
    assert "hf:org/thyroid-sft[train]:0: no column 'answer' (columns: prompt=q, completion=answer)" in str(e.value)


def test_finemed_eval_reads_a_hub_benchmark_through_a_column_mapping(offline, tmp_path, tiny_tokenizer) -> None:
    fake_hub_dataset(offline, "org/medbench", {"mc": {"train": MCQ, "test": MCQ}})
    out = tmp_path / "report"
    args = ("eval", "hf:org/medbench:mc", "--columns", "question=prompt,options=choices,answer=label",
            "--mode", "loglik", "--compare", "no-ttt", "--model", _tiny_model(tmp_path, tiny_tokenizer),
            "-o", out, "--no-progress")
    code, output = _finemed(*args)
    assert code == 0, output
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert [q["id"] for q in questions] == ["medbench-test-0", "medbench-test-1", "medbench-test-2"]
    assert [q["answer"] for q in questions] == ["A", "B", "A"]
    assert questions[1]["options"] == {"A": "Liver", "B": "Pancreas", "C": "Spleen"}
    assert json.loads((out / "report.json").read_text())["items"] == 3
    code, output = _finemed(*args[:3], "question=prompt,options=options,answer=label", *args[4:-3], "-o",
                            tmp_path / "r2")
    assert code != 0
    assert "hf:org/medbench:mc[test]:0: no column 'options' (columns: question=prompt, options=options" in output
