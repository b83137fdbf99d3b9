"""`finemed report`'s t-SNE map: one colour per input file (and a department panel beside it)."""

from __future__ import annotations

import numpy as np

from finemed_cli.synth.report import tsne_figure, tsne_points


def test_tsne_colours_each_input_file() -> None:
    datasets = {
        "ours": [{"question": f"q{i}", "department": "Surgery" if i % 2 else None} for i in range(4)],
        "theirs": [{"question": "t0", "department": "Surgery"}, {"no": "question"}, {"question": "t1"}],
    }
    texts, files, departments = tsne_points(datasets)
    assert texts == ["q0", "q1", "q2", "q3", "t0", "t1"]
    assert files == ["ours"] * 4 + ["theirs"] * 2
    assert departments == ["unclassified", "Surgery", "unclassified", "Surgery", "Surgery", "unclassified"]
    fig = tsne_figure(np.arange(12, dtype=float).reshape(6, 2), files, departments)
    by_file, by_dept = fig.axes
    assert [t.get_text() for t in by_file.get_legend().get_texts()] == ["ours (4)", "theirs (2)"]
    colours = [tuple(c.get_facecolor()[0]) for c in by_file.collections]
    assert len(set(colours)) == 2  # a colour per file
    assert [t.get_text() for t in by_dept.get_legend().get_texts()] == ["Surgery (3)", "unclassified (3)"]


def test_files_of_the_same_name_stay_apart(tmp_path) -> None:
    """Two `corpus.jsonl` from two folders were keyed by name: one replaced the other without a word."""
    from finemed_cli.synth.report import dataset_labels

    a, b, c = tmp_path / "a" / "corpus.jsonl", tmp_path / "b" / "corpus.jsonl", tmp_path / "pairs.jsonl"
    assert dataset_labels([a, b, c]) == ["a/corpus", "b/corpus", "pairs"]
    assert dataset_labels([c]) == ["pairs"]
