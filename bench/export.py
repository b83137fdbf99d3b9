"""Seconds and MB/s of `export_gguf` for each outtype against llama.cpp's own `convert_hf_to_gguf.py`, on the
embedded model, each export a fresh process timed end to end (interpreter start and imports included, as the
converter's are); then our F16 file is compared with the converter's, key by key and tensor by tensor.

    python bench/export.py --llama-cpp-src /tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp
    python bench/export.py --outtypes f16,q4_k_m --repeat 3

The converter is not part of finemed; get a llama.cpp source tree matching the installed llama-cpp-python:
    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:
    tar xzf llama_cpp_python-0.3.36.tar.gz
    # then --llama-cpp-src llama_cpp_python-0.3.36/vendor/llama.cpp
Without --llama-cpp-src the baseline and the comparison are skipped. Appends to bench/results/export.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_csv import append_results

REPO = Path(__file__).resolve().parents[1]
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # the outtypes convert_hf_to_gguf.py shares with us
GET_SRC = ("pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: && tar xzf "
           "llama_cpp_python-0.3.36.tar.gz, then --llama-cpp-src llama_cpp_python-0.3.36/vendor/llama.cpp")


def one(outtype: str, out: Path) -> None:
    """The child process: one export, its result as JSON on the last line of stdout."""
    from finemed_cli.checkpoints.embedded import embedded_model_dir
    from finemed_cli.export.gguf import export_gguf

    r = export_gguf(embedded_model_dir(), out, outtype)
    print(json.dumps({"seconds": r.seconds, "bytes": r.bytes, "tensors": r.tensors}))


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def run_ours(outtype: str, out: Path) -> tuple[float, dict]:
    seconds, stdout = timed([sys.executable, __file__, "--one", outtype, "--out", str(out)])
    return seconds, json.loads(stdout.strip().splitlines()[-1])


def run_converter(src: Path, model_dir: Path, outtype: str, out: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"), HF_HUB_OFFLINE="1")
    return timed([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
                  "--outfile", str(out)], env)[0]


def compare(ours: Path, theirs: Path, show: int = 10) -> None:
    """Print what differs between two GGUF files: metadata keys and values, tensor types, shapes and bytes."""
    import numpy as np
    from gguf import GGUFReader

    a, b = GGUFReader(ours), GGUFReader(theirs)
    fa = {k: f for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f for k, f in b.fields.items() if not k.startswith("GGUF.")}

    def value(f: object) -> object:
        v = f.contents()  # type: ignore[attr-defined]
        return v.tolist() if isinstance(v, np.ndarray) else v

    def listing(title: str, items: list[str]) -> None:
        print(f"  {title} ({len(items)}): {', '.join(items[:show])}{' …' if len(items) > show else ''}")

    listing("keys only in ours", sorted(fa.keys() - fb.keys()))
    listing("keys only in the converter's", sorted(fb.keys() - fa.keys()))
    differ = []
    for k in sorted(fa.keys() & fb.keys()):
        va, vb = value(fa[k]), value(fb[k])
        if va != vb:
            short = [repr(v)[:60] for v in (va, vb)]
            differ.append(f"{k} ({short[0]} vs {short[1]})")
    listing("keys whose values differ", differ)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    listing("tensors only in ours", sorted(ta.keys() - tb.keys()))
    listing("tensors only in the converter's", sorted(tb.keys() - ta.keys()))
    common = sorted(ta.keys() & tb.keys())
    bad = []
    for name in common:
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type:
            bad.append(f"{name} (type {x.tensor_type.name} vs {y.tensor_type.name})")
        elif list(x.shape) != list(y.shape):
            bad.append(f"{name} (shape {list(x.shape)} vs {list(y.shape)})")
        elif not np.array_equal(x.data.view(np.uint8), y.data.view(np.uint8)):
            n = int((x.data.view(np.uint8) != y.data.view(np.uint8)).sum())
            bad.append(f"{name} ({n} of {x.n_bytes} bytes)")
    listing("tensors whose type, shape or bytes differ", bad)
    print(f"  {len(common)} tensors compared, {len(bad)} differ; {len(fa.keys() & fb.keys())} keys compared, "
          f"{len(differ)} differ")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp-src", type=Path, default=None,
                    help="llama.cpp source tree holding convert_hf_to_gguf.py and gguf-py/ (the baseline)")
    ap.add_argument("--outtypes", default=None, help="comma-separated [default: all of finemed's OUTTYPES]")
    ap.add_argument("--repeat", type=int, default=1, help="runs per outtype and tool; the fastest is kept")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one, args.out)
        return

    from finemed_cli.checkpoints.embedded import embedded_model_dir
    from finemed_cli.gguf.constants import OUTTYPES

    outtypes = args.outtypes.split(",") if args.outtypes else list(OUTTYPES)
    unknown = [t for t in outtypes if t not in OUTTYPES]
    if unknown:
        sys.exit(f"unknown outtypes {unknown}; use some of {', '.join(OUTTYPES)}")
    src = args.llama_cpp_src
    if src is None:
        print(f"no --llama-cpp-src: the converter baseline is skipped. To get it: {GET_SRC}\n")
    elif not (src / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"{src}/convert_hf_to_gguf.py not found; {GET_SRC}")
    model_dir = embedded_model_dir()
    rows = []
    print(f"{'outtype':<8} {'ours s':>8} {'in-proc s':>9} {'MB':>8} {'MB/s':>7} {'converter s':>11} "
          f"{'conv/ours':>9}")
    with tempfile.TemporaryDirectory(prefix="finemed-bench-export-") as tmp:
        tmp_dir = Path(tmp)
        for t in outtypes:
            ours = [run_ours(t, tmp_dir / f"ours-{t}.gguf") for _ in range(args.repeat)]
            seconds, res = min(ours, key=lambda r: r[0])
            conv = None
            if src is not None and t in CONVERTER_TYPES:
                conv = min(run_converter(src, model_dir, t, tmp_dir / f"conv-{t}.gguf")
                           for _ in range(args.repeat))
            mb = res["bytes"] / 1e6
            ratio = conv / seconds if conv else None
            conv_s, ratio_s = ("-", "-") if conv is None else (f"{conv:.2f}", f"{ratio:.2f}x")
            print(f"{t:<8} {seconds:>8.2f} {res['seconds']:>9.2f} {mb:>8.1f} {mb / seconds:>7.1f} "
                  f"{conv_s:>11} {ratio_s:>9}", flush=True)
            rows.append((t, seconds, conv, ratio, mb))
            if t != "f16":  # only the F16 files are compared; free the disk as we go
                (tmp_dir / f"ours-{t}.gguf").unlink(missing_ok=True)
                (tmp_dir / f"conv-{t}.gguf").unlink(missing_ok=True)
        if (tmp_dir / "ours-f16.gguf").is_file() and (tmp_dir / "conv-f16.gguf").is_file():
            print("\nF16: ours vs convert_hf_to_gguf.py (GGUF.* header fields skipped)")
            compare(tmp_dir / "ours-f16.gguf", tmp_dir / "conv-f16.gguf")
    for t, seconds, conv, ratio, _ in rows:
        if ratio is not None:
            print(f"{t}: finemed export is {ratio:.2f}x the converter's speed "
                  f"({seconds:.2f} s vs {conv:.2f} s)")

    append_results("export", ["model", "outtype", "ours_s", "converter_s", "converter_over_ours", "mb", "mb_per_s"],
                   [["SmolLM2-135M-Instruct (embedded)", t, f"{seconds:.3f}", "" if conv is None else f"{conv:.3f}",
                     "" if ratio is None else f"{ratio:.3f}", f"{mb:.1f}", f"{mb / seconds:.1f}"]
                    for t, seconds, conv, ratio, mb in rows])


if __name__ == "__main__":
    main()
