"""Reward model: a local transformers sequence-classification model scores (prompt, response).

The model directory must hold safetensors weights (a pickle-only checkpoint is refused). Each
candidate is rendered with the tokenizer's chat template (the prompt's messages + the response
as the assistant turn; "prompt\\n\\nresponse" when there is no template), candidates are sorted
by length and run in padded batches of `batch_size` on the GPU when there is one. The reward
is the logit of a 1-label head, or the probability of `label` for a multi-label head.
"""
from __future__ import annotations

from pathlib import Path

from tao_fast.scoring.base import ScoreResult, Scorer, failed_batch


class RewardModelScorer(Scorer):
    def __init__(self, path: str, batch_size: int = 16, max_length: int = 2048, label: int = 1,
                 device: str = "auto", dtype: str = "auto", name: str = "reward_model",
                 failure_value: float = 0.0, base_dir: Path | str = "."):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_dir = Path(path) if Path(path).is_absolute() else Path(base_dir) / path
        if not model_dir.is_dir():
            raise FileNotFoundError(f"reward model directory {model_dir} does not exist")
        if not any(model_dir.glob("*.safetensors")):
            raise ValueError(f"{model_dir} has no .safetensors weights (pickle checkpoints "
                             f"are not loaded)")
        if batch_size < 1 or max_length < 8:
            raise ValueError("batch_size must be >= 1 and max_length >= 8")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" \
            else device
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, use_safetensors=True, dtype=getattr(torch, dtype)).to(self.device).eval()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.tok.padding_side = "right"
        n_labels = self.model.config.num_labels
        if n_labels > 1 and not 0 <= label < n_labels:
            raise ValueError(f"label {label} out of range for a {n_labels}-label head")
        self.label, self.n_labels = label, n_labels
        self.batch_size, self.max_length = batch_size, max_length
        self.name, self.failure_value = name, failure_value

    def render(self, rec, response: str) -> str:
        if self.tok.chat_template:
            msgs = [*rec.messages, {"role": "assistant", "content": response}]
            return self.tok.apply_chat_template(msgs, tokenize=False)
        return f"{rec.text}\n\n{response}"

    def score(self, prompts, candidates) -> ScoreResult:
        import torch

        texts = [(p, c, self.render(rec, t)) for p, (rec, group) in
                 enumerate(zip(prompts, candidates, strict=True)) for c, t in enumerate(group)]
        texts.sort(key=lambda x: len(x[2]))  # similar lengths share a batch: less padding
        rewards = [[0.0] * len(g) for g in candidates]
        try:
            for i in range(0, len(texts), self.batch_size):
                chunk = texts[i:i + self.batch_size]
                enc = self.tok([t for _, _, t in chunk], return_tensors="pt", padding=True,
                               truncation=True, max_length=self.max_length,
                               add_special_tokens=False).to(self.device)
                with torch.inference_mode():
                    logits = self.model(**enc).logits.float()  # [B, n_labels]
                vals = logits[:, 0] if self.n_labels == 1 else logits.softmax(-1)[:, self.label]
                for (p, c, _), v in zip(chunk, vals.tolist()):
                    rewards[p][c] = v
        except (RuntimeError, ValueError) as e:  # e.g. out of memory: the run goes on
            return failed_batch(self.name, candidates, self.failure_value,
                                f"{type(e).__name__}: {e}")
        return ScoreResult(rewards, [[{"reward_model": r} for r in rs] for rs in rewards])
