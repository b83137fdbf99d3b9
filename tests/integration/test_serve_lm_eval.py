"""lm-eval's own `local-completions` model against a real `finemed serve` on loopback (the embedded GGUF): it
finds the server's tokenizer (`/tokenizer_info`, `/tokenize`) by itself and its loglikelihoods are llama.cpp's
own log-probabilities of the continuation, within 1e-4."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("llama_cpp")
pytest.importorskip("tenacity")  # lm-eval[api]
completions = pytest.importorskip("lm_eval.models.openai_completions")

CONTEXT = "<|im_start|>user\nWhich gland makes thyroxine?<|im_end|>\n<|im_start|>assistant\n"
CHOICES = ["The thyroid gland.", "The adrenal gland.", "The pancreas."]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-lm-eval") / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "finemed_cli", "serve", "embedded:smollm2-135m", "--port", "0",
                             "--name", "smol", "--ctx", "1024"], stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        deadline = time.monotonic() + 300
        while not (m := re.search(r"at (http://[\d.]+:\d+)/v1", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield m.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()


def test_lm_eval_loglikelihood_is_llama_cpps_own(url) -> None:
    from lm_eval.api.instance import Instance

    from finemed_cli.checkpoints.embedded import embedded_gguf
    from finemed_cli.generate.llamacpp import LlamaCpp

    lm = completions.LocalCompletionsAPI(base_url=url + "/v1/completions", model="smol", max_retries=1)
    assert lm.tokenizer_backend == "remote"  # found /tokenizer_info and /tokenize: no hub tokenizer needed
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(CONTEXT, c), idx=i)
                for i, c in enumerate(CHOICES)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    with LlamaCpp(embedded_gguf(), n_ctx=1024, exact=True, logits_all=True) as llama:
        # lm-eval moves the context's trailing newline into the continuation, as its _encode_pair does
        ctx = llama.tokenize(CONTEXT.rstrip("\n"))
        for (total, _), choice in zip(got, CHOICES, strict=True):
            ids = llama.tokenize(CONTEXT + choice)
            logp = llama.logprobs(ids)
            assert total == pytest.approx(sum(float(logp[j - 1, ids[j]]) for j in range(len(ctx), len(ids))),
                                          abs=1e-4)
