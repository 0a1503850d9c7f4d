"""In-house torch rollout engine: batched sampling with a KV cache, for the CPU and the tests.

Each prompt is prefilled once and its KV cache copied to its n candidates. Finished rows are
dropped from the batch once a quarter of it has finished, so long-tail candidates don't drag
the whole batch through every step. Log-probs are those of the distribution actually sampled
from (after temperature and top-p), as vLLM's processed log-probs are.
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from tao_fast.models.llama import KVCache, Transformer
from tao_fast.rollout.protocol import (
    Engine,
    Rollouts,
    SamplingParams,
    check_prompts,
    decode_response,
    stop_token_ids,
)


def sample_tokens(logits, temperature: float, top_p: float, generator=None):
    """logits [B, V] fp32 -> (tokens [B] int64, logprobs [B] fp32 under the processed dist)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    z = logits / temperature
    if top_p < 1.0:
        sz, idx = z.sort(-1, descending=True)
        p = sz.softmax(-1)
        drop = p.cumsum(-1) - p > top_p  # keep the smallest prefix whose mass reaches top_p
        z = z.scatter(-1, idx, sz.masked_fill(drop, float("-inf")))
    logp = torch.log_softmax(z, -1)  # [B, V]
    tok = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def chunk_seed(seed: int, first_prompt: int) -> int:
    """The generator seed of a chunk of prompts starting at global prompt `first_prompt`."""
    return (seed * 1_000_003 + 7_919 * (first_prompt + 1)) % (1 << 63)


class TorchEngine(Engine):
    """Generates with a torch model: the learner's own object (weights shared, a sync costs
    nothing: sync_path "same-tensors"), or a copy in the rollout dtype that each sync casts
    into in place ("copy")."""

    name = "torch"

    def __init__(self, model: Transformer, tokenizer, max_batch_rows: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_rows = max_batch_rows
        self.eos_ids = stop_token_ids(model.args, tokenizer)
        self.max_context = model.args.max_position_embeddings

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams,
                 progress: bool = False) -> Rollouts:
        check_prompts(prompts, sampling.max_tokens, self.max_context)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        stop = torch.tensor(sorted(set(self.eos_ids) | set(sampling.stop_token_ids)))
        per_chunk = max(1, self.max_batch_rows // sampling.n)
        toks, lps, reasons = [], [], []
        bar = tqdm(total=len(prompts) * sampling.n, desc="generate", unit="seq",
                   disable=not progress, leave=False)
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(prompts), per_chunk):
                if gen is not None and sampling.prompt_index is not None:
                    gen.manual_seed(chunk_seed(sampling.seed, sampling.prompt_index + s))
                t, lp, r = self._generate_chunk(prompts[s:s + per_chunk], sampling, stop, gen)
                toks += t
                lps += lp
                reasons += r
                bar.update(len(t))
        finally:
            self.model.train(was_training)
            bar.close()
        n = sampling.n
        group = lambda xs: [xs[i * n:(i + 1) * n] for i in range(len(prompts))]  # noqa: E731
        texts = [decode_response(self.tokenizer, seq, self.eos_ids) for seq in toks]
        secs = time.perf_counter() - t0
        ntok = sum(map(len, toks))
        return Rollouts(prompt_ids=[list(p) for p in prompts], token_ids=group(toks),
                        texts=group(texts), logprobs=group(lps), finish_reasons=group(reasons),
                        stats={"tokens": ntok, "seconds": secs, "tokens_per_s": ntok / secs})

    @torch.no_grad()
    def _generate_chunk(self, prompts, sp: SamplingParams, stop, gen):
        model, n, T = self.model, sp.n, sp.max_tokens
        dev = model.embed_tokens.weight.device
        P, Lp = len(prompts), max(map(len, prompts))
        ids = torch.zeros(P, Lp, dtype=torch.long)
        key_mask = torch.zeros(P, Lp + T, dtype=torch.bool)
        for i, p in enumerate(prompts):  # left-pad: every prompt ends at slot Lp - 1
            ids[i, Lp - len(p):] = torch.tensor(p)
            key_mask[i, Lp - len(p):] = True
        lens = torch.tensor([len(p) for p in prompts])
        pos = (torch.arange(Lp)[None] - (Lp - lens)[:, None]).clamp(min=0)  # [P, Lp]
        cache = KVCache(model.args, P, Lp + T, model.embed_tokens.weight.dtype, dev)
        h = model.forward_cached(ids.to(dev), pos.to(dev), cache, key_mask.to(dev))
        logits = model.logits(h[:, -1]).float()  # [P, V]
        if n > 1:
            cache.repeat_interleave(n)
            logits = logits.repeat_interleave(n, 0)
            key_mask, lens = key_mask.repeat_interleave(n, 0), lens.repeat_interleave(n, 0)
        B = P * n
        out_tok = torch.zeros(B, T, dtype=torch.long)
        out_lp = torch.zeros(B, T)
        out_len = torch.zeros(B, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool)
        rows = torch.arange(B)  # batch slot -> output row
        key_mask = key_mask.to(dev)
        for t in range(T):
            tok, lp = sample_tokens(logits, sp.temperature, sp.top_p, gen)
            tok, lp = tok.cpu(), lp.float().cpu()
            live = ~done[rows]
            r = rows[live]
            out_tok[r, t], out_lp[r, t] = tok[live], lp[live]
            out_len[r] += 1
            done[r] |= torch.isin(tok[live], stop)
            if t == T - 1 or bool(done.all()):
                break
            live = ~done[rows]
            if int(live.sum()) <= 0.75 * len(rows):  # compact: drop finished rows
                keep = live.nonzero()[:, 0]
                cache.index_select(keep.to(dev))
                key_mask, rows, tok, lens = key_mask[keep.to(dev)], rows[keep], tok[keep], lens[keep]
            step_pos = (lens + t)[:, None]  # prompt length + tokens generated so far
            h = model.forward_cached(tok[:, None].to(dev), step_pos.to(dev), cache, key_mask)
            logits = model.logits(h[:, 0]).float()
        toks = [out_tok[i, :out_len[i]].tolist() for i in range(B)]
        lps = [out_lp[i, :out_len[i]].tolist() for i in range(B)]
        reasons = ["stop" if done[i] else "length" for i in range(B)]
        return toks, lps, reasons

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy weights (this model's fused names) in place; a parameter that is the given
        tensor (the learner's own model) is left alone."""
        params = dict(self.model.named_parameters())
        copied = 0
        with torch.no_grad():
            for name, t in named_tensors:
                if name not in params:
                    raise KeyError(f"load_weights: unknown parameter {name!r}")
                if params[name].data_ptr() != t.data_ptr():
                    params[name].copy_(t)
                    copied += 1
        self.sync_path = "copy" if copied else "same-tensors"
