"""Embedding backends compared: sentence-transformers (torch) vs ONNX Runtime (fp32).

The knowledge-base issue welcomed an ONNX Runtime path "if it wins the benchmark".
This script is that benchmark: it exports the configured model once with
``torch.onnx.export`` (opset 17), runs it with ONNX Runtime + ``tokenizers`` (mean or CLS
pooling as the model says, L2-normalised), checks the vectors agree with the torch
backend, and reports throughput of both on the same texts, in the same run.
On the project's 2-core machine it did not win (docs/benchmarks.md), so the
product keeps the torch backend only.

    .venv/bin/pip install -r benchmarks/requirements-embedding.txt
    .venv/bin/python benchmarks/embedding_backends.py [--model packaged:all-MiniLM-L6-v2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.config import EmbeddingSettings
from services.kb.embedder import Embedder, resolve_model


def export(model_dir: Path, out_dir: Path, max_seq_length: int) -> Path:
    """Export ``model_dir`` (a sentence-transformers directory) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _export_into(model_dir, out_dir, max_seq_length)
    return out_dir


def pooling_mode(model_dir: Path) -> str:
    cfg_path = model_dir / "1_Pooling" / "config.json"
    if not cfg_path.is_file():
        return "mean"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise ValueError(f"{cfg_path}: only mean or CLS pooling is supported by the ONNX backend")


def _export_into(model_dir: Path, tmp: Path, max_seq_length: int) -> None:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir)).eval()

    class Encoder(torch.nn.Module):
        """Positional inputs, one output: what the exporter traces reliably."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    dummy = {
        "input_ids": torch.ones((1, 8), dtype=torch.long),
        "attention_mask": torch.ones((1, 8), dtype=torch.long),
        "token_type_ids": torch.zeros((1, 8), dtype=torch.long),
    }
    dynamic = {0: "batch", 1: "seq"}
    with torch.no_grad():
        torch.onnx.export(
            Encoder().eval(),
            tuple(dummy.values()),
            str(tmp / "model.onnx"),
            input_names=list(dummy),
            output_names=["last_hidden_state"],
            dynamic_axes={**{k: dynamic for k in dummy}, "last_hidden_state": dynamic},
            opset_version=17,
            dynamo=False,
        )
    shutil.copy(model_dir / "tokenizer.json", tmp / "tokenizer.json")
    meta = {
        "pooling": pooling_mode(model_dir),
        "max_seq_length": max_seq_length,
        "dimension": int(model.config.hidden_size),
        "source": str(model_dir),
    }
    (tmp / "export.json").write_text(json.dumps(meta, indent=2))


class OnnxEncoder:
    """Tokenise with ``tokenizers``, run ONNX Runtime, pool, normalise."""

    def __init__(self, export_dir: Path) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        meta = json.loads((export_dir / "export.json").read_text())
        self.pooling: str = meta["pooling"]
        self.dimension: int = meta["dimension"]
        self.max_seq_length: int = meta["max_seq_length"]
        self.tokenizer = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)
        self.tokenizer.enable_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        self.session = ort.InferenceSession(
            str(export_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self.session.get_inputs()}

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        # sorting by length keeps padding (wasted compute) low inside each batch
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = self.tokenizer.encode_batch([texts[i] for i in idx])
            feeds = {
                "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
            }
            hidden = self.session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0]
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = feeds["attention_mask"][..., None].astype(np.float32)
                pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            out[idx] = pooled
        return out


def throughput(encode, texts: list[str], repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    encode(texts[:32])  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        encode(texts)
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    settings = EmbeddingSettings(model=args.model, batch_size=args.batch_size)
    torch_backend = Embedder(settings)
    model_dir = Path(resolve_model(args.model))
    work = Path(tempfile.mkdtemp(prefix="dualtrack-onnx-"))
    try:
        export(model_dir, work, torch_backend._model.max_seq_length)
        onnx_backend = OnnxEncoder(work)
        short = [f"Robot {i} carries up to {i * 3} kg and charges in {i % 5 + 1} hours." for i in range(512)]
        long = [" ".join(f"word{j}" for j in range(300)) + f" end {i}." for i in range(64)]
        a = torch_backend.embed_passages(short + long)
        b = onnx_backend.encode(short + long, args.batch_size)
        result = {"model": args.model, "min_cosine_torch_vs_onnx": round(float((a * b).sum(axis=1).min()), 6)}
        for name, texts in (("short_sentences", short), ("passages_256_tokens", long)):
            t = throughput(torch_backend.embed_passages, texts)
            o = throughput(lambda x: onnx_backend.encode(x, args.batch_size), texts)
            result[name] = {
                "torch_per_s": round(t, 1),
                "onnx_per_s": round(o, 1),
                "onnx_vs_torch": round(o / t, 3),
            }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
