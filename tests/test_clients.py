"""Real clients against the live server on 127.0.0.1, offline (nothing reaches the hub):

- lm-eval (`local-completions`) runs a loglikelihood task and a generate_until task defined from
  local files (tests/data/lm_eval/): each choice's loglikelihood equals transformers' own on the same
  weights (within 1e-3), each generation equals transformers' greedy continuation cut at the stop.
  Once with the checkpoint folder's tokenizer, once with lm-eval's remote tokenizer (it then reads
  /tokenizer_info and tokenizes through /tokenize and /detokenize).
- aiperf profiles a short streamed shared-system-prompt chat load with no failed request.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_no_leaks
from nanovllm.entrypoints.serve import ServerThread

DATA = Path(__file__).parent / "data" / "lm_eval"
MAX_MODEL_LEN = 512

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model):
    s = ServerThread(tiny_model, ["tiny"], max_model_len=MAX_MODEL_LEN, max_num_seqs=32).start()
    yield s
    s.stop()
    assert_no_leaks(s.engine.engine)


def offline_env(tmp_path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "datasets"), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    return env


def run_lm_eval(server, tiny_model, tmp_path, tokenizer_args: str) -> dict[str, list[dict]]:
    """lm-eval's CLI on both local tasks; the logged samples by task."""
    out = tmp_path / "out"
    model_args = (f"model=tiny,base_url={server.url}/v1/completions,{tokenizer_args},num_concurrent=2,"
                  f"max_retries=1,max_length={MAX_MODEL_LEN - 16}")
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
           "--tasks", "nanovllm_loglikelihood,nanovllm_generate", "--include_path", str(DATA),
           "--output_path", str(out), "--log_samples", "--batch_size", "2"]
    proc = subprocess.run(cmd, cwd=DATA, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    samples = {}
    for task in ("nanovllm_loglikelihood", "nanovllm_generate"):
        files = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        assert len(files) == 1, files
        samples[task] = [json.loads(line) for line in open(files[0])]
    return samples


@pytest.fixture(scope="module")
def reference(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)

    def loglikelihood(context: str, continuation: str) -> float:
        """lm-eval's split (trailing spaces of the context go to the continuation, the continuation
        is what encoding the whole adds), scored by transformers."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = tok.encode(context, add_special_tokens=False)
        whole = tok.encode(context + continuation, add_special_tokens=False)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
        n = len(context_ids)
        return sum(logprobs[p - 1, whole[p]].item() for p in range(n, len(whole)))

    def greedy(prompt: str, max_tokens: int, stops: list[str]) -> str:
        ids = tok.encode(prompt, add_special_tokens=False)
        eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
                  else [model.generation_config.eos_token_id]) | {tok.eos_token_id}
        out = []
        with torch.no_grad():
            for _ in range(max_tokens):
                token = model(torch.tensor([ids + out])).logits[0, -1].argmax().item()
                if token in eos:
                    break
                out.append(token)
        text = tok.decode(out)
        for stop in stops:
            text = text.split(stop)[0]
        return text
    return loglikelihood, greedy


@pytest.mark.parametrize("tokenizer_args", ["tokenizer_backend=huggingface,tokenizer={model}",
                                            "tokenizer_backend=remote"], ids=["hf-tokenizer", "remote-tokenizer"])
def test_lm_eval(server, tiny_model, tmp_path, reference, tokenizer_args):
    loglikelihood, greedy = reference
    samples = run_lm_eval(server, tiny_model, tmp_path, tokenizer_args.format(model=tiny_model))
    docs = [json.loads(line) for line in open(DATA / "loglikelihood.jsonl")]
    ll = sorted(samples["nanovllm_loglikelihood"], key=lambda s: s["doc_id"])
    assert len(ll) == len(docs)
    for sample, doc in zip(ll, docs):
        got = [float(r[0][0]) for r in sample["resps"]]
        pairs = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]  # as lm-eval scored them
        assert [c for c, _ in pairs] == [doc["context"]] * len(doc["choices"])
        assert [x.strip() for _, x in pairs] == [c.strip() for c in doc["choices"]]
        expected = [loglikelihood(context, continuation) for context, continuation in pairs]
        assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-3, (got, expected)
    gen_docs = [json.loads(line) for line in open(DATA / "generate.jsonl")]
    gen = sorted(samples["nanovllm_generate"], key=lambda s: s["doc_id"])
    assert len(gen) == len(gen_docs)
    for sample, doc in zip(gen, gen_docs):
        assert sample["resps"][0][0] == greedy(doc["question"], 8, ["\n", "<|im_end|>"])


def test_aiperf_shared_system_prompt_chat(server, tiny_model, tmp_path):
    """A short streamed chat load whose requests share a 128-token system prompt: every request
    completes, none fails, and the shared prompt is read from the prefix cache.

    aiperf 0.13 cannot load a tokenizer from a local folder while HF_HUB_OFFLINE is set: its offline
    branch resolves the name with huggingface_hub.snapshot_download(name, local_files_only=True),
    which takes only a repo id (HFValidationError). So the variable is unset for this process alone;
    a local folder is then read from disk and nothing asks the hub."""
    if shutil.which("aiperf") is None:
        pytest.skip("aiperf is not installed")
    env = offline_env(tmp_path)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name)
    art = tmp_path / "aiperf"
    cmd = ["aiperf", "profile", "--model", "tiny", "--url", server.url, "--endpoint-type", "chat", "--streaming",
           "--tokenizer", tiny_model, "--shared-system-prompt-length", "128", "--user-context-prompt-length", "16",
           "--synthetic-input-tokens-mean", "32", "--output-tokens-mean", "16", "--extra-inputs", "ignore_eos:true",
           "--num-conversations", "12", "--request-count", "12", "--concurrency", "4", "--random-seed", "1",
           "--ui", "none", "--no-gpu-telemetry", "--no-server-metrics", "--artifact-dir", str(art)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((art / "profile_export_aiperf.json").read_text())
    assert result["completed_request_count"]["avg"] == 12
    assert result["error_summary"] == [] and result["request_error_rate"]["avg"] == 0
    # the shared system prompt comes from the prefix cache (the first wave of 4 may compute it)
    assert result["total_usage_prompt_cache_read_tokens"]["avg"] >= 8 * 128
    assert result["output_token_count"]["count"] == 12
